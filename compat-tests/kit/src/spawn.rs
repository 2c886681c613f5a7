//! Starting etcd or Cairn on free loopback ports with a fresh data dir, for `diff --spawn-*` and
//! the tests.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// A server process; killed (and its data dir removed) on drop.
pub struct Server {
    child: Child,
    pub endpoint: String,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Server {
    /// Starts `bin` with etcd's flags for a one-member cluster on free 127.0.0.1 ports and a
    /// fresh data dir, plus `extra` arguments, and polls until a Range succeeds (at most
    /// `ready_within`).
    pub async fn start(bin: &Path, name: &str, extra: &[String], ready_within: Duration) -> anyhow::Result<Self> {
        Self::start_tls(bin, name, extra, ready_within, None).await
    }

    /// As [`Server::start`]; with `tls`, the client URL is https (`extra` carries the server's
    /// TLS flags) and readiness is polled over TLS with these client files.
    pub async fn start_tls(
        bin: &Path,
        name: &str,
        extra: &[String],
        ready_within: Duration,
        tls: Option<&crate::client::TlsFiles>,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(bin.exists(), "server binary {} does not exist", bin.display());
        let dir = tempfile::Builder::new().prefix(&format!("cairn-compat-{name}-")).tempdir()?;
        let (cp, pp) = (free_port()?, free_port()?);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{cp}");
        let peer = format!("http://127.0.0.1:{pp}");
        let log = dir.path().join("server.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(bin)
            .args(["--name", name])
            .args(["--data-dir", &dir.path().join("data").to_string_lossy()])
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("{name}={peer}")])
            .args(extra)
            .env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let endpoint = if tls.is_some() { client.clone() } else { format!("127.0.0.1:{cp}") };
        let target = match tls {
            Some(files) => crate::client::Target::new(&endpoint, files)?,
            None => crate::client::Target::plain(&endpoint),
        };
        let mut s = Server { child, endpoint, log, _dir: dir };
        let deadline = Instant::now() + ready_within;
        loop {
            if let Some(status) = s.child.try_wait()? {
                bail!("{} exited with {status} before it was ready:\n{}", bin.display(), s.log_tail());
            }
            if let Ok(mut c) = crate::client::connect_to(&target).await {
                if crate::client::current_rev(&mut c).await.is_ok() {
                    return Ok(s);
                }
            }
            if Instant::now() > deadline {
                bail!("{} not ready within {ready_within:?}:\n{}", bin.display(), s.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The last lines of the server's output.
    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}
