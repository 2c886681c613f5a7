#!/usr/bin/env python3
"""Turn `go test -test.v` output of etcd's e2e suite into a markdown report.

One row per top-level test (subtests roll up into their parent): result, seconds, and the
first line of the failure message. Tests that were selected but never reported a result are
failures ("did not run", or the panic that ended the binary). Optionally gates on a list of
tests expected to pass.

Called by compat-tests/e2e/run; usable on its own:

    results.py --log work/e2e.log --selected work/selected.txt --out RESULTS.md \
        [--server DESC] [--check expected-pass.txt]

The last line on stdout is always `e2e: N passed, N failed, N skipped`.
Exit status: 0, or 1 when --check finds an expected test that did not pass
(or names a test the suite does not have).
"""

import argparse
import datetime
import os
import re
import sys

E2E_SRC = "/usr/share/gocode/src/go.etcd.io/etcd/tests/e2e"

RE_START = re.compile(r"^=== (RUN|CONT|PAUSE|NAME)\s+(\S+)")
RE_RESULT = re.compile(r"^(\s*)--- (PASS|FAIL|SKIP): (\S+) \(([0-9.]+)s\)")
RE_MSG = re.compile(r"^(?: {4})+([\w.-]+\.go):(\d+): (.*)$")
RE_STACK = re.compile(r"^\S+\.go:\d+: goroutine \d+ \[")
RE_PANIC = re.compile(r"^panic: (.*)$")
RE_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x08\x0b-\x1f\x7f]")

STATUS = {"PASS": "pass", "FAIL": "fail", "SKIP": "skip"}


def top(name):
    return name.split("/", 1)[0]


class LogLineClassifier:
    """Tells t.Log/t.Logf lines (informational) from t.Error/t.Fatal ones, by reading the
    source line the message points at. Unknown files count as failure messages."""

    def __init__(self, src_dir):
        self.src_dir = src_dir
        self.cache = {}

    def is_log(self, fname, lineno):
        path = os.path.join(self.src_dir, os.path.basename(fname))
        if path not in self.cache:
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    self.cache[path] = f.read().split("\n")
            except OSError:
                self.cache[path] = None
        lines = self.cache[path]
        if not lines or not 0 < lineno <= len(lines):
            return False
        return re.search(r"\.Logf?\(", lines[lineno - 1]) is not None


class Test:
    def __init__(self, name):
        self.name = name
        self.status = None  # pass / fail / skip, from the top-level result line
        self.seconds = None
        self.sub_failed = False
        self.messages = []  # (is_log, text)
        self.panic = None

    def reason(self):
        if self.status == "pass":
            return ""
        errors = [t for is_log, t in self.messages if not is_log]
        # testutil.FatalStack (the suite's per-test timeout) logs a goroutine dump first
        errors = [t for t in errors if not RE_STACK.match(t)] or errors
        if errors:
            return errors[0]
        if self.panic:
            return "panic: " + self.panic
        if self.messages:
            return self.messages[0][1]
        return ""


def parse(log_path, classifier):
    tests = {}  # top-level name -> Test, in order of first appearance
    current = None  # test whose output is streaming
    running = []  # top-level tests started without a result yet
    panic = None

    def get(name):
        t = tests.get(name)
        if t is None:
            t = tests[name] = Test(name)
        return t

    with open(log_path, encoding="utf-8", errors="replace") as f:
        for raw in f:
            line = RE_ANSI.sub("", raw.rstrip("\n"))
            m = RE_START.match(line)
            if m:
                name = m.group(2)
                current = top(name)
                get(current)
                if m.group(1) == "RUN" and "/" not in name and current not in running:
                    running.append(current)
                continue
            m = RE_RESULT.match(line)
            if m:
                status, name, secs = STATUS[m.group(2)], m.group(3), float(m.group(4))
                t = get(top(name))
                current = t.name
                if "/" in name:
                    if status == "fail":
                        t.sub_failed = True
                else:
                    t.status, t.seconds = status, secs
                    if t.name in running:
                        running.remove(t.name)
                continue
            m = RE_MSG.match(line)
            if m and current is not None:
                fname, lineno, text = m.group(1), int(m.group(2)), m.group(3)
                tests[current].messages.append(
                    (classifier.is_log(fname, lineno), "%s:%d: %s" % (fname, lineno, text.strip()))
                )
                continue
            m = RE_PANIC.match(line)
            if m:
                msg = m.group(1).strip()
                if panic is None:
                    panic = msg
                # a panicking test prints its --- FAIL line first; otherwise blame what runs
                victims = running or ([current] if current else [])
                for name in victims:
                    if tests[name].panic is None:
                        tests[name].panic = msg
                running = []  # the test binary ends here (a later one may follow)
    return tests, running, panic


def md_cell(text, limit=300):
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("\\", "\\\\").replace("|", "\\|")


def read_names(path):
    names = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                names.append(line)
    return names


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--log", required=True, help="raw -test.v output")
    ap.add_argument("--selected", help="tests the run selected, one a line (e2e.test -test.list REGEX)")
    ap.add_argument("--all-tests", help="every test in the suite, one a line (e2e.test -test.list .)")
    ap.add_argument("--out", required=True, help="markdown report to write")
    ap.add_argument("--server", default="unknown", help="server description for the header")
    ap.add_argument("--selection", default="", help="how the tests were selected, for the header")
    ap.add_argument("--wall", type=int, help="wall time of the run in seconds")
    ap.add_argument("--exit-code", type=int, help="exit status of the test binary")
    ap.add_argument("--check", help="expected-pass list; exit 1 unless each selected one passed")
    ap.add_argument("--src", default=E2E_SRC, help="e2e test sources, to tell t.Log lines from errors")
    ap.add_argument("--not-applicable", help="tests not selected, with the reason (name, whitespace, reason)")
    ap.add_argument("--retried", help="tests that failed and were run a second time, one a line")
    args = ap.parse_args()

    tests, running, panic = parse(args.log, LogLineClassifier(args.src))

    selected = read_names(args.selected) if args.selected else []
    order = selected + [n for n in tests if n not in set(selected)]

    rows = []  # (name, status, seconds, reason)
    for name in order:
        t = tests.get(name)
        if t is None:
            rows.append((name, "fail", None, "did not run"))
            continue
        status = t.status
        reason = t.reason()
        if status is None:
            # started, never finished: the binary died or timed out under it
            status = "fail"
            if not reason:
                reason = "no result (test binary exited %s)" % (
                    args.exit_code if args.exit_code is not None else "early")
        elif status == "pass" and t.sub_failed:
            status = "fail"
        if status == "fail" and not reason:
            reason = "failed without a message"
        rows.append((name, status, t.seconds, reason))

    retried = set(read_names(args.retried)) if args.retried and os.path.exists(args.retried) else set()
    rows = [
        (n, st, secs, ("passed on a second run; first run: " if st == "pass" else "failed twice; first run: ")
         + (why or "no message"))
        if n in retried else (n, st, secs, why)
        for n, st, secs, why in rows
    ]
    counts = {s: sum(1 for r in rows if r[1] == s) for s in ("pass", "fail", "skip")}
    totals = "%d passed, %d failed, %d skipped" % (counts["pass"], counts["fail"], counts["skip"])
    na_rows = []
    if args.not_applicable:
        run = {r[0] for r in rows}
        with open(args.not_applicable, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                name, _, reason = line.partition(" ")
                if name not in run:
                    na_rows.append((name, "n/a", None, reason.strip()))
    report_totals = totals + (", %d not run (n/a rows)" % len(na_rows) if na_rows else "")

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = []
    out.append("# etcd e2e suite results: %s" % args.server.split(" ", 1)[0])
    out.append("")
    out.append("- Server under test: %s" % args.server)
    out.append("- Date: %s" % now)
    out.append("- Suite: etcd 3.4.23 `tests/e2e` (Debian golang-etcd-server-dev), real `etcdctl` 3.4")
    if args.selection:
        out.append("- Selection: `%s` (%d tests)" % (args.selection, len(selected) or len(rows)))
    if args.wall is not None:
        out.append("- Wall time: %d s" % args.wall)
    if args.exit_code is not None:
        out.append("- Test binary exit status: %d" % args.exit_code)
    if panic:
        out.append("- The test binary panicked: `%s`" % md_cell(panic).replace("`", "'"))
    out.append("- Generated by `compat-tests/e2e/run`; raw log in the work dir (`e2e.log`)")
    out.append("")
    out.append("Totals: " + report_totals)
    out.append("")
    out.append("| Test | Result | Seconds | First failure line |")
    out.append("|---|---|---:|---|")
    for name, status, secs, reason in rows + na_rows:
        out.append("| %s | %s | %s | %s |" % (
            md_cell(name), status, "" if secs is None else "%.2f" % secs, md_cell(reason)))
    out.append("")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(out))

    failed = [r for r in rows if r[1] == "fail"]
    if failed:
        print("failed tests:")
        for name, _, _, reason in failed:
            print("  %s: %s" % (name, " ".join(reason.split())[:200]))
    print("report written to %s" % args.out)

    rc = 0
    if args.check:
        expected = read_names(args.check)
        known = set(read_names(args.all_tests)) if args.all_tests else None
        by_name = {r[0]: r for r in rows}
        unknown = [n for n in expected if known is not None and n not in known]
        not_selected = [n for n in expected if n not in by_name and n not in unknown]
        missed = [by_name[n] for n in expected if n in by_name and by_name[n][1] != "pass"]
        newly = [r[0] for r in rows if r[1] == "pass" and r[0] not in set(expected)]
        for n in unknown:
            print("check: %s is not a test of the suite (typo?)" % n)
        if not_selected:
            print("check: %d expected tests were not in this selection (not checked)" % len(not_selected))
        for n in newly:
            print("newly passing (add to expected-pass.txt): %s" % n)
        if missed:
            print("check FAILED: %d expected tests did not pass:" % len(missed))
            for name, status, _, reason in missed:
                print("  %s: %s%s" % (name, status, (" - " + " ".join(reason.split())[:200]) if reason else ""))
        if missed or unknown:
            rc = 1
        else:
            print("check passed: all %d expected tests in the selection passed" % (len(expected) - len(not_selected)))

    print("e2e: " + totals)
    return rc


if __name__ == "__main__":
    sys.exit(main())
