//! A real `cairn` process (the built binary) and the real `etcdctl` against it.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const ETCDCTL: &str = "/usr/bin/etcdctl";

/// A running `cairn` process, killed on drop.
pub struct Cairn {
    child: Child,
    pub endpoint: String,
}

impl Drop for Cairn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `cairn` process started but not yet ready.
pub struct Starting {
    cairn: Cairn,
    ready: std::sync::mpsc::Receiver<()>,
    args: Vec<String>,
    /// Its stderr so far, for the message when it does not become ready.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Starting {
    /// Waits for etcd's second readiness line.
    pub fn ready(mut self) -> Cairn {
        if self.ready.recv_timeout(Duration::from_secs(60)).is_err() {
            let status = self.cairn.child.try_wait();
            let log = self.log.lock().unwrap().join("\n");
            panic!("cairn {:?} did not become ready (exit: {status:?}); its stderr:\n{log}", self.args);
        }
        self.cairn
    }
}

/// Starts `cairn --name NAME ARGS...` on a free loopback port and waits for etcd's second
/// readiness line.
pub fn start(name: &str, args: &[&str]) -> Cairn {
    spawn(name, args).ready()
}

/// Starts `cairn --name NAME ARGS...` on a free loopback port without waiting (members of a
/// cluster become ready only together).
pub fn spawn(name: &str, args: &[&str]) -> Starting {
    let endpoint = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["--name", name])
        .args(args)
        .args(["--listen-client-urls", &format!("http://{endpoint}")])
        .args(["--advertise-client-urls", &format!("http://{endpoint}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cairn");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = log.clone();
    std::thread::spawn(move || {
        let mut ready = 0;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if ready < 2 {
                kept.lock().unwrap().push(line.clone());
            }
            if line.contains("published") || line.contains("enabled capabilities for version") {
                ready += 1;
                if ready == 2 {
                    let _ = tx.send(());
                }
            }
        }
    });
    Starting {
        cairn: Cairn { child, endpoint },
        ready: rx,
        args: args.iter().map(|a| a.to_string()).collect(),
        log,
    }
}

/// Runs etcdctl (v3 API) against `s`; returns whether it exited 0, its stdout and its stderr.
pub fn try_ctl(s: &Cairn, args: &[&str]) -> (bool, String, String) {
    try_ctl_at(&s.endpoint, args)
}

/// [`try_ctl`] against any endpoint (a real etcd's, for instance).
pub fn try_ctl_at(endpoint: &str, args: &[&str]) -> (bool, String, String) {
    assert!(
        std::path::Path::new(ETCDCTL).exists(),
        "{ETCDCTL} is missing: install Debian's etcd-client"
    );
    let out = Command::new(ETCDCTL)
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoint, "--command-timeout", "10s"])
        .args(args)
        .output()
        .expect("run etcdctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs etcdctl (v3 API) against `s` and returns its stdout; fails the test on a non-zero exit.
pub fn ctl(s: &Cairn, args: &[&str]) -> String {
    let (ok, stdout, stderr) = try_ctl(s, args);
    assert!(ok, "etcdctl {args:?} failed: {stderr}");
    stdout
}
