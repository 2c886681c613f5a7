//! `cairn-bench`: load generator for etcd v3 servers.
//!
//! - `cairn-bench run --endpoints 127.0.0.1:2379 --workload put --clients 16 --duration 10s`
//!   runs one workload against running servers and prints one line per client count.
//! - `cairn-bench compare` starts a fresh real etcd and a fresh Cairn per workload (one per
//!   `--backends` entry: native, postgres, tikv), runs the workload against each in turn (never
//!   two loaded at once) and prints a Cairn/etcd table per backend.
//! - `cairn-bench floor` measures the latency floor of a durable 1-client put here (fdatasync
//!   plus a loopback round trip); `compare` measures it too when it runs put with 1 client.
//!
//! Only loopback targets are accepted; every loop is bounded in time and in operations.

mod floor;
mod keys;
mod report;
mod servers;
mod workloads;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};

use report::{CompareRow, Outcome};
use servers::{FakeTikv, ServerProc};
use workloads::{Params, Workload};

#[derive(Parser)]
#[command(
    name = "cairn-bench",
    about = "Benchmarks etcd v3 servers (Cairn, etcd) on this machine"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one workload against running servers.
    Run(RunArgs),
    /// Start fresh etcd and Cairn servers per workload and compare them side by side.
    Compare(CompareArgs),
    /// List the workloads.
    Workloads,
    /// Measure the latency floor of a durable 1-client write on this machine.
    Floor {
        /// Where to write (default: the temp dir, where `compare` puts the data dirs).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Args, Clone)]
struct Common {
    /// Client counts, e.g. 1,16,256.
    #[arg(long, default_value = "1,16,256", value_parser = keys::parse_list)]
    clients: std::vec::Vec<usize>,
    /// Measured time per run (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = keys::parse_duration)]
    duration: Duration,
    /// gRPC connections (default: min(clients, 16)).
    #[arg(long)]
    conns: Option<usize>,
    /// Number of distinct keys for put, range and txn (preloaded for range and txn).
    #[arg(long, default_value_t = 10_000)]
    keyspace: u64,
    /// Watchers in watch-1000.
    #[arg(long, default_value_t = 1000)]
    watchers: usize,
    /// gRPC streams (one connection each) carrying the watch-1000 watchers.
    #[arg(long, default_value_t = 4)]
    watch_streams: usize,
    /// Total puts per second in watch-1000.
    #[arg(long, default_value_t = 100)]
    watch_rate: u64,
    /// How long watchers may lag behind after the writers stop before events count as undelivered.
    #[arg(long, default_value = "30s", value_parser = keys::parse_duration)]
    drain_timeout: Duration,
    /// Upper bound on operations per client per run.
    #[arg(long, default_value_t = 10_000_000)]
    max_ops_per_client: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Args)]
struct RunArgs {
    /// Comma-separated host:port on loopback.
    #[arg(long, default_value = "127.0.0.1:2379", value_parser = keys::parse_endpoints)]
    endpoints: std::vec::Vec<String>,
    #[arg(long, value_parser = Workload::parse)]
    workload: Workload,
    /// The server's pid, to report its peak RSS (VmHWM).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Pids of the server's storage processes (e.g. the PostgreSQL postmaster), whose process
    /// trees' CPU is reported as store_cpu_us/op.
    #[arg(long, value_delimiter = ',')]
    store_pid: Vec<u32>,
    #[command(flatten)]
    common: Common,
}

/// A Cairn backend `compare` can start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Backend {
    /// The native backend (its own raft log and redb store).
    Native,
    /// PostgreSQL: a throwaway server from Debian's binaries (or the one
    /// CAIRN_TEST_POSTGRES_URL names), one fresh database per workload.
    Postgres,
    /// TiKV on `cairn-tikv-fake` (a PD + TiKV test server, not a real TiKV), one per workload.
    Tikv,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Native => "native",
            Backend::Postgres => "postgres",
            Backend::Tikv => "tikv",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Backend::Native => "cairn",
            Backend::Postgres => "cairn-pg",
            Backend::Tikv => "cairn-tikv",
        }
    }
}

#[derive(Args)]
struct CompareArgs {
    #[arg(long, default_value = "target/release/cairn")]
    cairn: PathBuf,
    #[arg(long, default_value = "/usr/bin/etcd")]
    etcd: PathBuf,
    /// Cairn backends to compare with etcd, each on its own fresh server.
    #[arg(long, value_delimiter = ',', value_enum, default_value = "native")]
    backends: Vec<Backend>,
    /// The TiKV test server for `--backends tikv`.
    #[arg(long, default_value = "target/release/cairn-tikv-fake")]
    tikv_fake: PathBuf,
    /// Comma-separated workloads (default: all).
    #[arg(long, value_delimiter = ',', value_parser = Workload::parse)]
    workloads: Option<Vec<Workload>>,
    /// Also print the table as markdown (for BENCHMARKS.md).
    #[arg(long)]
    markdown: bool,
    /// Pause between runs, letting the previous server settle.
    #[arg(long, default_value = "1s", value_parser = keys::parse_duration)]
    pause: Duration,
    /// Rounds per workload, each on fresh servers; the table shows each side's median round
    /// and the notes every round's ratio (runs here move by 10-30 % from one to the next).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    #[command(flatten)]
    common: Common,
}

fn params(
    c: &Common,
    endpoints: Vec<String>,
    clients: usize,
    server_pid: Option<u32>,
    store_pids: Vec<u32>,
) -> Params {
    Params {
        endpoints,
        clients,
        conns: c.conns.unwrap_or_else(|| workloads::default_conns(clients)),
        duration: c.duration,
        keyspace: c.keyspace,
        server_pid,
        store_pids,
        watchers: c.watchers,
        watch_streams: c.watch_streams,
        watch_rate: c.watch_rate,
        drain_timeout: c.drain_timeout,
        max_ops_per_client: c.max_ops_per_client,
        seed: c.seed,
    }
}

/// jemalloc, as the server's: the load generator shares the machine's cores with the servers
/// it measures, and glibc's malloc and free were a visible part of its CPU per request.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The HTTP/2 client opens trace spans on every frame; with no subscriber set they are
    // offered to the `log` crate (tracing's "log" feature, which sqlx turns on), about 2.5 % of
    // the load generator's CPU at 256 clients. A subscriber that wants nothing turns them off.
    let _ = tracing::subscriber::set_global_default(tracing::subscriber::NoSubscriber::default());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async move {
        match cli.cmd {
            Cmd::Run(a) => run_cmd(a).await,
            Cmd::Compare(a) => compare_cmd(a).await,
            Cmd::Floor { dir } => {
                let dir = dir.unwrap_or_else(std::env::temp_dir);
                let f = tokio::task::spawn_blocking(move || floor::measure(&dir)).await??;
                println!("{}", f.describe());
                Ok(true)
            }
            Cmd::Workloads => {
                for w in Workload::ALL {
                    println!("{:<16} {}", w.name(), w.describe());
                }
                Ok(true)
            }
        }
    });
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("cairn-bench: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run_cmd(a: RunArgs) -> Result<bool> {
    println!("{}", report::LINE_HEADER);
    let mut ok = true;
    for &clients in &a.common.clients {
        let p = params(
            &a.common,
            a.endpoints.clone(),
            clients,
            a.server_pid,
            a.store_pid.clone(),
        );
        match workloads::run(a.workload, &p).await {
            Ok(o) => println!("{}", report::format_line(&o)),
            Err(e) => {
                ok = false;
                println!("{:<15} {:>7} failed: {e:#}", a.workload.name(), clients);
            }
        }
    }
    Ok(ok)
}

async fn run_against(
    server: &mut Result<ServerProc, String>,
    store_pids: &[u32],
    w: Workload,
    c: &Common,
    clients: usize,
) -> Result<Outcome, String> {
    let s = server
        .as_mut()
        .map_err(|e| format!("not started: {}", e.lines().next().unwrap_or("")))?;
    if !s.alive() {
        return Err(format!(
            "{} is no longer running; log tail:\n{}",
            s.label,
            s.log_tail(10)
        ));
    }
    let p = params(c, vec![s.endpoint.clone()], clients, Some(s.pid), store_pids.to_vec());
    let r = workloads::run(w, &p).await.map_err(|e| format!("{e:#}"));
    match &r {
        Ok(o) => eprintln!("  {:<10} {}", s.label, report::format_line(o)),
        Err(e) => eprintln!("  {:<10} {} clients={clients} failed: {e}", s.label, w.name()),
    }
    r
}

/// One backend's Cairn for one workload, with what it stores into.
struct Contender {
    backend: Backend,
    server: Result<ServerProc, String>,
    store_pids: Vec<u32>,
    _fake: Option<FakeTikv>,
}

async fn start_contender(
    b: Backend,
    a: &CompareArgs,
    pg: Option<&cairn_postgres::testing::TestServer>,
) -> Contender {
    let mut store_pids = Vec::new();
    let mut fake = None;
    let extra: Result<Vec<String>> = async {
        Ok(match b {
            Backend::Native => Vec::new(),
            Backend::Postgres => {
                let pg = pg.context("no PostgreSQL server")?;
                store_pids.extend(pg.pid());
                let url = pg.create_database().await?;
                vec!["--backend".into(), "postgres".into(), "--postgres-url".into(), url]
            }
            Backend::Tikv => {
                let f = FakeTikv::start(&a.tikv_fake).await?;
                store_pids.push(f.pid);
                let pd = f.pd_endpoint.clone();
                fake = Some(f);
                vec!["--backend".into(), "tikv".into(), "--tikv-pd-endpoints".into(), pd]
            }
        })
    }
    .await;
    let server = match extra {
        Ok(extra) => ServerProc::start(b.label(), &a.cairn, &extra).await,
        Err(e) => Err(e),
    }
    .map_err(|e| format!("{e:#}"));
    if let Err(e) = &server {
        eprintln!("  {}: {e}", b.label());
    }
    Contender { backend: b, server, store_pids, _fake: fake }
}

async fn compare_cmd(a: CompareArgs) -> Result<bool> {
    let list = a.workloads.clone().unwrap_or_else(|| Workload::ALL.to_vec());
    let mut backends: Vec<Backend> = Vec::new();
    for &b in &a.backends {
        if !backends.contains(&b) {
            backends.push(b);
        }
    }
    let pg = if backends.contains(&Backend::Postgres) {
        let pg = tokio::task::spawn_blocking(cairn_postgres::testing::TestServer::start)
            .await?
            .context("starting PostgreSQL for --backends postgres")?;
        eprintln!("PostgreSQL for the postgres backend: {}", pg.admin_url());
        Some(pg)
    } else {
        None
    };
    // The floor the 1-client put is judged against, measured before any server runs.
    let floor = if list.contains(&Workload::Put) && a.common.clients.contains(&1) {
        let dir = std::env::temp_dir();
        match tokio::task::spawn_blocking(move || floor::measure(&dir)).await? {
            Ok(f) => {
                eprintln!("floor: {}", f.describe());
                Some(f)
            }
            Err(e) => {
                eprintln!("floor: not measured: {e:#}");
                None
            }
        }
    } else {
        None
    };
    let mut rows: Vec<CompareRow> = Vec::new();
    eprintln!("  {:<10} {}", "", report::LINE_HEADER);
    for &w in &list {
        eprintln!("== {} ({})", w.name(), w.describe());
        for round in 1..=a.rounds {
            if a.rounds > 1 {
                eprintln!("  round {round} of {}", a.rounds);
            }
            compare_round(w, &a, &backends, pg.as_ref(), &mut rows).await;
        }
    }
    let all_ok = rows.iter().all(|r| r.etcd.is_ok() && r.cairn.is_ok());
    let rounds_note = report::rounds_note(&rows);
    let rows = report::median_rows(&rows);
    let per_backend: Vec<(Backend, Vec<CompareRow>)> = backends
        .iter()
        .map(|&b| (b, rows.iter().filter(|r| r.backend == b.name()).cloned().collect()))
        .collect();
    for (b, of) in &per_backend {
        println!("\nCairn ({}) against etcd:", b.name());
        print!("{}", report::compare_table(of));
    }
    let mut notes = report::compare_notes(&rows);
    notes.push_str(&rounds_note);
    if let Some(f) = &floor {
        notes.push_str(&report::floor_note(f, &rows));
    }
    if !notes.is_empty() {
        println!("\nnotes:\n{notes}");
    }
    if a.markdown {
        for (b, of) in &per_backend {
            println!("\nCairn ({}) against etcd:\n", b.name());
            println!("{}", report::compare_markdown(of));
        }
        println!("Workloads:");
        for w in &list {
            println!("- `{}`: {}", w.name(), w.describe());
        }
        if !notes.is_empty() {
            println!("\nNotes per run:\n{notes}");
        }
    }
    Ok(all_ok)
}

/// One round of workload `w`: fresh servers, every client count against etcd and then each
/// Cairn backend.
async fn compare_round(
    w: Workload,
    a: &CompareArgs,
    backends: &[Backend],
    pg: Option<&cairn_postgres::testing::TestServer>,
    rows: &mut Vec<CompareRow>,
) {
    let mut etcd = ServerProc::start("etcd", &a.etcd, &[]).await.map_err(|e| format!("{e:#}"));
    if let Err(e) = &etcd {
        eprintln!("  etcd: {e}");
    }
    let mut cairns = Vec::new();
    for &b in backends {
        cairns.push(start_contender(b, a, pg).await);
    }
    for &clients in &a.common.clients {
        let e = run_against(&mut etcd, &[], w, &a.common, clients).await;
        tokio::time::sleep(a.pause).await;
        for c in &mut cairns {
            let r = run_against(&mut c.server, &c.store_pids, w, &a.common, clients).await;
            tokio::time::sleep(a.pause).await;
            rows.push(CompareRow {
                backend: c.backend.name().to_string(),
                workload: w.name().to_string(),
                clients,
                etcd: e.clone(),
                cairn: r,
            });
        }
    }
    if let Ok(s) = &mut etcd {
        s.stop().await;
    }
    for c in &mut cairns {
        if let Ok(s) = &mut c.server {
            s.stop().await;
        }
    }
}
