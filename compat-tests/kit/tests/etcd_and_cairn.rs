//! The kit against real etcd (/usr/bin/etcd) and against the `cairn` binary of this workspace:
//! `check` passes on both, and `diff` finds no difference between them, for every backend
//! (native, memory, and postgres on a throwaway PostgreSQL from `cairn_postgres::testing`,
//! which fails the test with the reason when no PostgreSQL can be started).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use cairn_compat::spawn::Server;

const ETCD: &str = "/usr/bin/etcd";

fn etcd() -> PathBuf {
    let p = PathBuf::from(ETCD);
    assert!(p.exists(), "{ETCD} is missing: install Debian's etcd-server (scripts/test does when run as root)");
    p
}

/// target/<profile>/cairn, next to the directory of this test binary (target/<profile>/deps).
fn cairn() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join("cairn");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build --workspace` in the same profile \
         (scripts/test runs `cargo build --release --workspace --all-targets`)",
        bin.display()
    );
    bin
}

fn compat(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cairn-compat")).args(args).output().expect("run cairn-compat");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn last_line(s: &str) -> &str {
    s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("")
}

async fn start(bin: PathBuf, name: &str, extra: &[&str]) -> Server {
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    Server::start(&bin, name, &extra, Duration::from_secs(60)).await.unwrap_or_else(|e| panic!("{e:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_etcd_and_cairn() {
    let e = start(etcd(), "etcd", &[]).await;
    let c = start(cairn(), "cairn", &[]).await;
    for (what, s) in [("etcd", &e), ("cairn", &c)] {
        let (ok, out) = tokio::task::spawn_blocking({
            let ep = s.endpoint.clone();
            move || compat(&["check", "--endpoints", &ep, "--allow-compact"])
        })
        .await
        .unwrap();
        println!("{out}");
        assert!(ok, "check failed against {what}:\n{out}\n--- server log ---\n{}", s.log_tail());
        assert!(last_line(&out).ends_with(" passed, 0 failed"), "closing line: {out}");
        // Run again on the now non-empty server: the cases are self-contained.
        let rows = cairn_compat::check::run(&s.endpoint, false, "").await.unwrap();
        let failed: Vec<_> = rows.iter().filter(|r| r.outcome == cairn_compat::check::Outcome::Fail).collect();
        assert!(failed.is_empty(), "second run against {what}: {failed:?}");
    }
}

fn assert_no_differences(what: &str, ok: bool, out: &str, log: &str) {
    println!("{out}");
    assert!(ok && last_line(out).ends_with(" 0 differences"), "diff etcd vs {what}:\n{out}\n{log}");
}

#[test]
fn diff_etcd_against_cairn_native_spawned() {
    let (etcd, cairn) = (etcd(), cairn());
    let (ok, out) = compat(&[
        "diff",
        "--spawn-etcd",
        etcd.to_str().unwrap(),
        "--spawn-cairn",
        cairn.to_str().unwrap(),
        "--cairn-args",
        "--backend native",
    ]);
    assert_no_differences("cairn (native)", ok, &out, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_etcd_against_cairn_memory_and_postgres() {
    let e = start(etcd(), "etcd", &[]).await;
    // Something already on the servers: revisions are compared relative to each script's start.
    let mut c = cairn_compat::client::connect(&e.endpoint).await.unwrap();
    c.kv.put(cairn_compat::client::put("unrelated", "x")).await.unwrap();
    let pg = cairn_postgres::testing::server().create_database().await.expect("create a database");
    let backends = [
        ("memory", vec!["--backend", "memory"]),
        ("postgres", vec!["--backend", "postgres", "--postgres-url", pg.as_str()]),
    ];
    for (what, args) in backends {
        let s = start(cairn(), "cairn", &args).await;
        let (a, b) = (e.endpoint.clone(), s.endpoint.clone());
        let (ok, out) = tokio::task::spawn_blocking(move || compat(&["diff", "--a", &a, "--b", &b])).await.unwrap();
        assert_no_differences(what, ok, &out, &format!("--- server log ---\n{}", s.log_tail()));
    }
}
