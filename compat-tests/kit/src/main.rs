//! `cairn-compat check` and `cairn-compat diff`: see compat-tests/README.md.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cairn-compat",
    about = "Black-box conformance kit and differential tester for etcd v3 gRPC endpoints"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the conformance cases against one endpoint and print a table.
    Check {
        /// host:port, http://host:port or https://host:port of the endpoint; the first of a
        /// comma-separated list is used. host:port is https when a TLS option is given.
        #[arg(long, default_value = "127.0.0.1:2379")]
        endpoints: String,
        /// CA bundle (PEM) that verifies the server certificate (TLS).
        #[arg(long)]
        cacert: Option<PathBuf>,
        /// Client certificate (PEM) for TLS.
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        /// Private key (PEM) of the client certificate.
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
        /// The endpoint requires client certificates: check that a TLS client without one is refused.
        #[arg(long)]
        client_cert_auth: bool,
        /// Also run the compaction case (compaction is global: it discards old revisions of every key).
        #[arg(long)]
        allow_compact: bool,
        /// Also run the auth cases: they enable auth (global) as a root user they create, and
        /// disable it and delete what they created afterwards, also when a case fails.
        #[arg(long)]
        allow_auth: bool,
        /// Run only the cases whose name contains this text.
        #[arg(long, default_value = "")]
        only: String,
    },
    /// Send the same request scripts to two endpoints and print every difference.
    Diff {
        /// First endpoint (the reference, usually etcd).
        #[arg(long, required_unless_present = "spawn_etcd")]
        a: Option<String>,
        /// Second endpoint (the server under test).
        #[arg(long, required_unless_present = "spawn_cairn")]
        b: Option<String>,
        /// Start this etcd binary as endpoint a (free loopback ports, fresh data dir).
        #[arg(long)]
        spawn_etcd: Option<PathBuf>,
        /// Start this Cairn binary as endpoint b.
        #[arg(long)]
        spawn_cairn: Option<PathBuf>,
        /// Extra arguments for the spawned Cairn (split on whitespace).
        #[arg(long, default_value = "", allow_hyphen_values = true)]
        cairn_args: String,
        /// Extra arguments for the spawned etcd (split on whitespace).
        #[arg(long, default_value = "", allow_hyphen_values = true)]
        etcd_args: String,
        /// Also run the compaction script (always on when both servers are spawned).
        #[arg(long)]
        allow_compact: bool,
        /// Run only the scripts whose name contains this text.
        #[arg(long, default_value = "")]
        only: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("cairn-compat: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn split(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    match cli.cmd {
        Cmd::Check { endpoints, cacert, cert, key, client_cert_auth, allow_compact, allow_auth, only } => {
            let ep = endpoints.split(',').next().unwrap_or_default().trim().to_string();
            let target = cairn_compat::client::Target::new(&ep, &cairn_compat::client::TlsFiles { cacert, cert, key })?;
            let opts = cairn_compat::check::Options { allow_compact, allow_auth, client_cert_auth };
            let rows = cairn_compat::check::run_with(&target, &opts, &only).await?;
            print!("{}", cairn_compat::check::render(&ep, &rows));
            Ok(rows.iter().all(|r| r.outcome != cairn_compat::check::Outcome::Fail))
        }
        Cmd::Diff { a, b, spawn_etcd, spawn_cairn, cairn_args, etcd_args, allow_compact, only } => {
            let ready = Duration::from_secs(60);
            let sa = match &spawn_etcd {
                Some(bin) => Some(cairn_compat::spawn::Server::start(bin, "etcd-a", &split(&etcd_args), ready).await?),
                None => None,
            };
            let sb = match &spawn_cairn {
                Some(bin) => {
                    Some(cairn_compat::spawn::Server::start(bin, "cairn-b", &split(&cairn_args), ready).await?)
                }
                None => None,
            };
            let a = sa.as_ref().map(|s| s.endpoint.clone()).or(a).unwrap_or_default();
            let b = sb.as_ref().map(|s| s.endpoint.clone()).or(b).unwrap_or_default();
            // Fresh servers of our own: compaction harms nobody.
            let allow_compact = allow_compact || (sa.is_some() && sb.is_some());
            let report = cairn_compat::diff::run(&a, &b, allow_compact, &only).await?;
            print!("{}", cairn_compat::diff::render(&a, &b, &report));
            Ok(report.differences.is_empty())
        }
    }
}
