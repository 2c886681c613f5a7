//! Starting and stopping a server (real etcd or Cairn) on loopback with a fresh data dir.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use cairn_proto::etcdserverpb::kv_client::KvClient;
use cairn_proto::etcdserverpb::RangeRequest;
use tempfile::TempDir;
use tonic::transport::Endpoint;

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(10);

pub struct ServerProc {
    pub label: String,
    pub endpoint: String,
    pub pid: u32,
    child: Option<Child>,
    log: PathBuf,
    _dir: TempDir,
}

/// Two distinct free ports on 127.0.0.1 (bound together, then released).
fn free_ports() -> Result<(u16, u16)> {
    let a = TcpListener::bind("127.0.0.1:0")?;
    let b = TcpListener::bind("127.0.0.1:0")?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

/// etcd's flags for a single member on 127.0.0.1; Cairn takes the same ones.
pub fn etcd_args(name: &str, data_dir: &Path, client_port: u16, peer_port: u16) -> Vec<String> {
    let client = format!("http://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    vec![
        "--name".into(),
        name.into(),
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--listen-client-urls".into(),
        client.clone(),
        "--advertise-client-urls".into(),
        client,
        "--listen-peer-urls".into(),
        peer.clone(),
        "--initial-advertise-peer-urls".into(),
        peer.clone(),
        "--initial-cluster".into(),
        format!("{name}={peer}"),
    ]
}

impl ServerProc {
    /// Starts `bin` with a fresh temporary data dir (and `extra` arguments after etcd's) and
    /// waits until a linearizable Range succeeds.
    pub async fn start(label: &str, bin: &Path, extra: &[String]) -> Result<ServerProc> {
        if !bin.exists() {
            bail!("{label}: binary {} not found", bin.display());
        }
        let dir = tempfile::Builder::new()
            .prefix(&format!("cairn-bench-{label}-"))
            .tempdir()?;
        let (client_port, peer_port) = free_ports()?;
        let log = dir.path().join("server.log");
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        let mut args = etcd_args(
            &format!("bench-{label}"),
            &dir.path().join("data"),
            client_port,
            peer_port,
        );
        args.extend_from_slice(extra);
        let child = Command::new(bin)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut s = ServerProc {
            label: label.to_string(),
            endpoint: format!("http://127.0.0.1:{client_port}"),
            pid: child.id(),
            child: Some(child),
            log,
            _dir: dir,
        };
        if let Err(e) = s.wait_ready().await {
            let tail = s.log_tail(20);
            s.stop().await;
            bail!("{label} did not become ready: {e:#}\n--- log tail ---\n{tail}");
        }
        Ok(s)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::from("no attempt");
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("exited during startup with {status}");
                }
            }
            match self.probe().await {
                Ok(()) => return Ok(()),
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("no successful Range within {READY_TIMEOUT:?}; last error: {last}")
    }

    async fn probe(&self) -> Result<()> {
        let ch = Endpoint::from_shared(self.endpoint.clone())?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(2))
            .connect()
            .await?;
        KvClient::new(ch)
            .range(RangeRequest {
                key: b"cairn-bench-ready".to_vec(),
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGTERM, then SIGKILL after a grace period.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        if let Ok(None) = child.try_wait() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            eprintln!(
                "{}: still running {STOP_GRACE:?} after SIGTERM; sending SIGKILL",
                self.label
            );
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

/// A `cairn-tikv-fake` (PD + TiKV test server) on a free loopback port, killed on drop.
pub struct FakeTikv {
    pub pd_endpoint: String,
    pub pid: u32,
    child: Child,
}

impl FakeTikv {
    pub async fn start(bin: &Path) -> Result<FakeTikv> {
        if !bin.exists() {
            bail!(
                "{} not found (cargo build --release -p cairn-tikv-fake, or --tikv-fake)",
                bin.display()
            );
        }
        let (port, _) = free_ports()?;
        let addr = format!("127.0.0.1:{port}");
        let mut child = Command::new(bin)
            .arg(&addr)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let deadline = Instant::now() + READY_TIMEOUT;
        while tokio::net::TcpStream::connect(&addr).await.is_err() {
            if let Some(status) = child.try_wait()? {
                bail!("{} exited during startup with {status}", bin.display());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} did not listen on {addr} within {READY_TIMEOUT:?}", bin.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(FakeTikv { pd_endpoint: addr, pid: child.id(), child })
    }
}

impl Drop for FakeTikv {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_name_one_member_on_loopback() {
        let a = etcd_args("bench-etcd", Path::new("/tmp/d"), 1234, 5678);
        let joined = a.join(" ");
        assert!(joined.contains("--listen-client-urls http://127.0.0.1:1234"));
        assert!(joined.contains("--initial-cluster bench-etcd=http://127.0.0.1:5678"));
        assert!(joined.contains("--data-dir /tmp/d"));
        let (p1, p2) = free_ports().unwrap();
        assert_ne!(p1, p2);
    }
}
