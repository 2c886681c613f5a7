//! Latency histograms and the text / markdown renderings of results.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Latencies are recorded in microseconds, from 1 µs up to one hour, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Records a duration (saturating at the histogram's top, and at least 1 µs).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
    h.saturating_record(us);
}

/// The value at quantile `q` in milliseconds, or `None` for an empty histogram.
pub fn quantile_ms(h: &Histogram<u64>, q: f64) -> Option<f64> {
    if h.is_empty() {
        None
    } else {
        Some(h.value_at_quantile(q) as f64 / 1000.0)
    }
}

/// One measured result: one workload at one client count against one server.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub workload: String,
    pub clients: usize,
    pub conns: usize,
    /// Operations (for watch workloads: events delivered) in the measured window.
    pub ops: u64,
    /// The measured window (for watch workloads: until the last event arrived).
    pub elapsed: Duration,
    /// Per-operation latency (for watch workloads: delivery lag).
    pub hist: Histogram<u64>,
    pub errors: u64,
    /// The server's VmHWM in kB, when its pid was known.
    pub peak_rss_kb: Option<u64>,
    /// CPU time (user + system) the server used during the measured window, when its pid was
    /// known: a figure that other load on the machine disturbs less than ops/s.
    pub server_cpu: Option<Duration>,
    /// CPU time the server's storage processes (PostgreSQL, a TiKV test server) used in the
    /// same window, when their pids were known.
    pub store_cpu: Option<Duration>,
    /// Workload-specific extras, `key=value` separated by spaces.
    pub note: String,
    /// The first error seen, for diagnosis.
    pub first_error: Option<String>,
}

impl Outcome {
    pub fn ops_per_sec(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s <= 0.0 {
            0.0
        } else {
            self.ops as f64 / s
        }
    }
    pub fn p50_ms(&self) -> Option<f64> {
        quantile_ms(&self.hist, 0.50)
    }
    pub fn p99_ms(&self) -> Option<f64> {
        quantile_ms(&self.hist, 0.99)
    }
    /// Server CPU microseconds per operation.
    pub fn cpu_us_per_op(&self) -> Option<f64> {
        self.per_op(self.server_cpu)
    }
    /// The storage processes' CPU microseconds per operation.
    pub fn store_cpu_us_per_op(&self) -> Option<f64> {
        self.per_op(self.store_cpu)
    }
    fn per_op(&self, cpu: Option<Duration>) -> Option<f64> {
        match cpu {
            Some(c) if self.ops > 0 => Some(c.as_secs_f64() * 1e6 / self.ops as f64),
            _ => None,
        }
    }
}

pub fn fmt_cpu(v: Option<f64>) -> String {
    match v {
        None => "-".to_string(),
        Some(v) if v < 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.0}"),
    }
}

/// Formats milliseconds with precision that suits their size.
pub fn fmt_ms(v: Option<f64>) -> String {
    match v {
        None => "-".to_string(),
        Some(v) if v < 10.0 => format!("{v:.2}"),
        Some(v) if v < 100.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.0}"),
    }
}

/// Formats a rate with thousands separators and no decimals (one decimal below 100).
pub fn fmt_rate(v: f64) -> String {
    if v < 100.0 {
        return format!("{v:.1}");
    }
    let n = v.round() as u64;
    let s = n.to_string();
    let head = s.len() % 3;
    let mut groups: Vec<&str> = Vec::new();
    if head > 0 {
        groups.push(&s[..head]);
    }
    groups.extend(
        s.as_bytes()[head..]
            .chunks(3)
            .map(|c| std::str::from_utf8(c).expect("ascii digits")),
    );
    groups.join(",")
}

pub fn fmt_rss(kb: Option<u64>) -> String {
    match kb {
        None => "-".to_string(),
        Some(kb) => format!("{}", (kb + 512) / 1024),
    }
}

pub const LINE_HEADER: &str =
    "workload        clients conns        ops/s   p50_ms   p99_ms   errors  peak_rss_mb  notes";

/// One line for `run`: workload, clients, conns, ops/s, p50, p99, errors, peak RSS (MB), notes.
pub fn format_line(o: &Outcome) -> String {
    let mut line = format!(
        "{:<15} {:>7} {:>5} {:>12} {:>8} {:>8} {:>8} {:>12}",
        o.workload,
        o.clients,
        o.conns,
        fmt_rate(o.ops_per_sec()),
        fmt_ms(o.p50_ms()),
        fmt_ms(o.p99_ms()),
        o.errors,
        fmt_rss(o.peak_rss_kb),
    );
    if o.server_cpu.is_some() {
        line.push_str(&format!("  srv_cpu_us/op={}", fmt_cpu(o.cpu_us_per_op())));
    }
    if o.store_cpu.is_some() {
        line.push_str(&format!("  store_cpu_us/op={}", fmt_cpu(o.store_cpu_us_per_op())));
    }
    if !o.note.is_empty() {
        line.push_str("  ");
        line.push_str(&o.note);
    }
    if let Some(e) = &o.first_error {
        line.push_str(&format!("  first_error=\"{}\"", one_line(e, 160)));
    }
    line
}

fn one_line(s: &str, max: usize) -> String {
    let flat: String = s.chars().map(|c| if c == '\n' { ' ' } else { c }).collect();
    if flat.chars().count() > max {
        let cut: String = flat.chars().take(max).collect();
        format!("{cut}…")
    } else {
        flat
    }
}

/// One row of `compare`: the same workload and client count against etcd and against Cairn on
/// one backend.
#[derive(Debug, Clone)]
pub struct CompareRow {
    /// Cairn's backend in this row (`native`, `postgres`, `tikv`).
    pub backend: String,
    pub workload: String,
    pub clients: usize,
    pub etcd: Result<Outcome, String>,
    pub cairn: Result<Outcome, String>,
}

impl CompareRow {
    pub fn ratio(&self) -> Option<f64> {
        match (&self.etcd, &self.cairn) {
            (Ok(e), Ok(c)) if e.ops_per_sec() > 0.0 => Some(c.ops_per_sec() / e.ops_per_sec()),
            _ => None,
        }
    }
}

const COMPARE_COLUMNS: [&str; 16] = [
    "workload",
    "clients",
    "etcd ops/s",
    "cairn ops/s",
    "cairn/etcd",
    "etcd p50 ms",
    "etcd p99 ms",
    "cairn p50 ms",
    "cairn p99 ms",
    "etcd err",
    "cairn err",
    "etcd RSS MB",
    "cairn RSS MB",
    "etcd CPU µs/op",
    "cairn CPU µs/op",
    "cairn store CPU µs/op",
];

fn compare_cells(r: &CompareRow) -> Vec<String> {
    fn side(o: &Result<Outcome, String>) -> [String; 7] {
        match o {
            Ok(o) => [
                fmt_rate(o.ops_per_sec()),
                fmt_ms(o.p50_ms()),
                fmt_ms(o.p99_ms()),
                o.errors.to_string(),
                fmt_rss(o.peak_rss_kb),
                fmt_cpu(o.cpu_us_per_op()),
                fmt_cpu(o.store_cpu_us_per_op()),
            ],
            Err(_) => {
                let mut cells: [String; 7] = Default::default();
                cells[0] = "failed".into();
                for c in &mut cells[1..] {
                    *c = "-".into();
                }
                cells
            }
        }
    }
    let [eo, e50, e99, eerr, erss, ecpu, _] = side(&r.etcd);
    let [co, c50, c99, cerr, crss, ccpu, cstore] = side(&r.cairn);
    let ratio = r.ratio().map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
    vec![
        r.workload.clone(),
        r.clients.to_string(),
        eo,
        co,
        ratio,
        e50,
        e99,
        c50,
        c99,
        eerr,
        cerr,
        erss,
        crss,
        ecpu,
        ccpu,
        cstore,
    ]
}

/// A plain-text table with aligned columns.
pub fn compare_table(rows: &[CompareRow]) -> String {
    let cells: Vec<Vec<String>> = rows.iter().map(compare_cells).collect();
    let mut widths: Vec<usize> = COMPARE_COLUMNS.iter().map(|c| c.chars().count()).collect();
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let fmt_row = |row: &[String], out: &mut String| {
        let parts: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| if i == 0 { format!("{c:<w$}") } else { format!("{c:>w$}") })
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    let header: Vec<String> = COMPARE_COLUMNS.iter().map(|s| s.to_string()).collect();
    fmt_row(&header, &mut out);
    for row in &cells {
        fmt_row(row, &mut out);
    }
    out
}

/// The same table in GitHub markdown, for BENCHMARKS.md.
pub fn compare_markdown(rows: &[CompareRow]) -> String {
    let mut out = String::new();
    out.push_str(&format!("| {} |\n", COMPARE_COLUMNS.join(" | ")));
    out.push_str(&format!("|{}\n", "---|".repeat(COMPARE_COLUMNS.len())));
    for r in rows {
        out.push_str(&format!("| {} |\n", compare_cells(r).join(" | ")));
    }
    out
}

/// Notes and errors of each side, one line each, printed under the table (etcd's once per
/// workload and client count, however many backends share its run).
pub fn compare_notes(rows: &[CompareRow]) -> String {
    let mut out = String::new();
    let mut etcd_seen: Vec<(&str, usize)> = Vec::new();
    for r in rows {
        let first_etcd = !etcd_seen.contains(&(r.workload.as_str(), r.clients));
        etcd_seen.push((r.workload.as_str(), r.clients));
        let cairn = format!("cairn ({})", r.backend);
        let sides = [("etcd", &r.etcd, first_etcd), (cairn.as_str(), &r.cairn, true)];
        for (name, side, show) in sides {
            let text = match side {
                Ok(o) => {
                    let mut t = o.note.clone();
                    if let Some(e) = &o.first_error {
                        t.push_str(&format!(" first_error=\"{}\"", one_line(e, 160)));
                    }
                    t
                }
                Err(e) => format!("failed: {}", one_line(e, 200)),
            };
            if show && !text.trim().is_empty() {
                out.push_str(&format!("- {} c={} {}: {}\n", r.workload, r.clients, name, text.trim()));
            }
        }
    }
    out
}

/// Folds the rows of several rounds (each round on fresh servers) into one row per backend,
/// workload and client count: each side is its median round by ops/s (the lower middle one
/// for an even count), and a round that failed counts only when every round failed. Rows keep
/// the order of the first round. With one round the rows come back as they were.
pub fn median_rows(rows: &[CompareRow]) -> Vec<CompareRow> {
    let mut out: Vec<CompareRow> = Vec::new();
    for r in rows {
        if out
            .iter()
            .any(|o| (&o.backend, &o.workload, o.clients) == (&r.backend, &r.workload, r.clients))
        {
            continue;
        }
        let same: Vec<&CompareRow> = rows
            .iter()
            .filter(|o| (&o.backend, &o.workload, o.clients) == (&r.backend, &r.workload, r.clients))
            .collect();
        out.push(CompareRow {
            backend: r.backend.clone(),
            workload: r.workload.clone(),
            clients: r.clients,
            etcd: median_side(same.iter().map(|o| &o.etcd)),
            cairn: median_side(same.iter().map(|o| &o.cairn)),
        });
    }
    out
}

fn median_side<'a>(
    sides: impl Iterator<Item = &'a Result<Outcome, String>>,
) -> Result<Outcome, String> {
    let sides: Vec<&Result<Outcome, String>> = sides.collect();
    let mut ok: Vec<&Outcome> = sides.iter().filter_map(|s| s.as_ref().ok()).collect();
    if ok.is_empty() {
        return sides
            .first()
            .map(|s| (*s).clone())
            .unwrap_or_else(|| Err("no round ran".into()));
    }
    ok.sort_by(|a, b| a.ops_per_sec().total_cmp(&b.ops_per_sec()));
    Ok(ok[(ok.len() - 1) / 2].clone())
}

/// Each round's Cairn/etcd ratio per row, when there was more than one round.
pub fn rounds_note(rows: &[CompareRow]) -> String {
    let mut out = String::new();
    for m in median_rows(rows) {
        let ratios: Vec<String> = rows
            .iter()
            .filter(|o| (&o.backend, &o.workload, o.clients) == (&m.backend, &m.workload, m.clients))
            .map(|o| o.ratio().map_or_else(|| "-".to_string(), |x| format!("{x:.2}")))
            .collect();
        if ratios.len() > 1 {
            out.push_str(&format!(
                "- {} c={} cairn ({})/etcd per round: {}\n",
                m.workload,
                m.clients,
                m.backend,
                ratios.join(" ")
            ));
        }
    }
    out
}

/// The floor and each server's 1-client put p50 against it (etcd's once).
pub fn floor_note(f: &crate::floor::Floor, rows: &[CompareRow]) -> String {
    let mut out = format!("- floor: {}\n", f.describe());
    let floor_ms = f.floor().as_secs_f64() * 1e3;
    let against = |name: &str, o: &Outcome| match o.p50_ms() {
        Some(p50) => format!("- put c=1 {name}: p50 {p50:.3} ms = {:.2}x the floor\n", p50 / floor_ms),
        None => String::new(),
    };
    let mut etcd_done = false;
    for r in rows.iter().filter(|r| r.workload == "put" && r.clients == 1) {
        if let (Ok(o), false) = (&r.etcd, etcd_done) {
            out.push_str(&against("etcd", o));
            etcd_done = true;
        }
        if let Ok(o) = &r.cairn {
            out.push_str(&against(&format!("cairn ({})", r.backend), o));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_note_puts_each_servers_1_client_put_against_the_floor() {
        let f = crate::floor::Floor {
            fsync_p50: Duration::from_micros(120),
            fsync_p99: Duration::from_micros(250),
            rtt_p50: Duration::from_micros(80),
            rtt_p99: Duration::from_micros(100),
        };
        let row = |backend: &str, clients, etcd_us, cairn_us| CompareRow {
            backend: backend.into(),
            workload: "put".into(),
            clients,
            etcd: Ok(outcome(1, 1, &[etcd_us])),
            cairn: Ok(outcome(1, 1, &[cairn_us])),
        };
        let rows = [
            row("native", 1, 460, 300),
            row("postgres", 1, 460, 1_200),
            row("native", 16, 1_000, 900),
        ];
        let note = floor_note(&f, &rows);
        let lines: Vec<&str> = note.lines().collect();
        assert_eq!(lines.len(), 4, "{note}");
        assert!(lines[0].starts_with("- floor: "), "{note}");
        assert_eq!(lines[1], "- put c=1 etcd: p50 0.460 ms = 2.30x the floor");
        assert_eq!(lines[2], "- put c=1 cairn (native): p50 0.300 ms = 1.50x the floor");
        assert_eq!(lines[3], "- put c=1 cairn (postgres): p50 1.200 ms = 6.00x the floor");
    }

    #[test]
    fn rounds_fold_into_their_median_round_per_side() {
        let row = |clients, etcd_ops, cairn: Result<u64, &str>| CompareRow {
            backend: "native".into(),
            workload: "put".into(),
            clients,
            etcd: Ok(outcome(etcd_ops, 1, &[500])),
            cairn: cairn.map(|ops| outcome(ops, 1, &[300])).map_err(str::to_string),
        };
        let rows = [
            row(1, 100, Ok(300)),
            row(16, 1_000, Ok(1_000)),
            row(1, 300, Ok(100)),
            row(16, 3_000, Err("refused")),
            row(1, 200, Ok(200)),
            row(16, 2_000, Ok(5_000)),
        ];
        let m = median_rows(&rows);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].clients, m[1].clients), (1, 16), "the first round's order");
        let ops = |o: &Result<Outcome, String>| o.as_ref().map(|o| o.ops).unwrap();
        // Each side on its own: the 1-client row's median etcd round is not its median Cairn one.
        assert_eq!((ops(&m[0].etcd), ops(&m[0].cairn)), (200, 200));
        // Two good Cairn rounds: the lower one; the failed round does not count.
        assert_eq!((ops(&m[1].etcd), ops(&m[1].cairn)), (2_000, 1_000));
        let note = rounds_note(&rows);
        assert_eq!(
            note,
            "- put c=1 cairn (native)/etcd per round: 3.00 0.33 1.00\n\
             - put c=16 cairn (native)/etcd per round: 1.00 - 2.50\n"
        );
        let all_failed = [row(1, 100, Err("a")), row(1, 100, Err("b"))];
        assert_eq!(median_rows(&all_failed)[0].cairn.as_ref().unwrap_err(), "a");
        assert_eq!(median_rows(&rows[..2]).len(), 2, "one round");
        assert!(rounds_note(&rows[..2]).is_empty(), "one round: no note");
    }

    fn outcome(ops: u64, secs: u64, lat_us: &[u64]) -> Outcome {
        let mut hist = new_histogram();
        for &l in lat_us {
            record(&mut hist, Duration::from_micros(l));
        }
        Outcome {
            workload: "put".into(),
            clients: 16,
            conns: 16,
            ops,
            elapsed: Duration::from_secs(secs),
            hist,
            errors: 2,
            peak_rss_kb: Some(138 * 1024),
            server_cpu: None,
            store_cpu: None,
            note: String::new(),
            first_error: None,
        }
    }

    #[test]
    fn quantiles_come_from_the_histogram() {
        let lat: Vec<u64> = (1..=1000).map(|i| i * 10).collect(); // 10 µs .. 10 ms
        let o = outcome(87_260, 10, &lat);
        let p50 = o.p50_ms().unwrap();
        let p99 = o.p99_ms().unwrap();
        assert!((p50 - 5.0).abs() < 0.01, "p50 {p50}");
        assert!((p99 - 9.9).abs() < 0.01, "p99 {p99}");
        assert_eq!(o.ops_per_sec(), 8726.0);
        assert_eq!(quantile_ms(&new_histogram(), 0.5), None);
    }

    #[test]
    fn zero_and_huge_durations_are_recorded_saturating() {
        let mut h = new_histogram();
        record(&mut h, Duration::ZERO);
        record(&mut h, Duration::from_secs(100_000));
        assert_eq!(h.len(), 2);
        assert_eq!(h.min(), 1);
    }

    #[test]
    fn line_and_numbers_format() {
        assert_eq!(fmt_rate(17_584.4), "17,584");
        assert_eq!(fmt_rate(1_000_000.0), "1,000,000");
        assert_eq!(fmt_rate(35.04), "35.0");
        assert_eq!(fmt_ms(Some(0.456)), "0.46");
        assert_eq!(fmt_ms(Some(44.44)), "44.4");
        assert_eq!(fmt_ms(Some(1506.2)), "1506");
        assert_eq!(fmt_ms(None), "-");
        assert_eq!(fmt_rss(None), "-");
        let o = outcome(87_260, 10, &[1700, 5350]);
        let line = format_line(&o);
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields, ["put", "16", "16", "8,726", "1.70", "5.35", "2", "138"]);
        assert_eq!(LINE_HEADER.split_whitespace().count(), 9);
        let mut o = o;
        o.server_cpu = Some(Duration::from_secs(2));
        assert_eq!(o.cpu_us_per_op(), Some(2e6 / 87_260.0));
        assert!(format_line(&o).contains("srv_cpu_us/op=23"));
    }

    #[test]
    fn compare_table_has_ratio_and_failed_sides() {
        let rows = vec![
            CompareRow {
                backend: "native".into(),
                workload: "put".into(),
                clients: 16,
                etcd: Ok(outcome(80_000, 10, &[1000])),
                cairn: Ok(outcome(120_000, 10, &[500])),
            },
            CompareRow {
                backend: "native".into(),
                workload: "txn".into(),
                clients: 1,
                etcd: Ok(outcome(10, 1, &[1])),
                cairn: Err("no start".into()),
            },
        ];
        let t = compare_table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[1].contains("1.50"), "{t}");
        assert!(lines[2].contains("failed"), "{t}");
        let md = compare_markdown(&rows);
        assert_eq!(md.lines().count(), 4);
        assert!(md.lines().all(|l| l.starts_with('|') && l.ends_with('|')));
        assert_eq!(
            md.lines().nth(2).unwrap().matches('|').count(),
            COMPARE_COLUMNS.len() + 1
        );
        assert!(compare_notes(&rows).contains("failed: no start"));
    }
}
