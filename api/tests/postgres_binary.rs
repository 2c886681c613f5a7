//! The `cairn` binary on the PostgreSQL backend: two server processes on one database behave
//! as one etcd to the real etcdctl (a write through one is read and watched through the other).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ETCDCTL: &str = "/usr/bin/etcdctl";

struct Server {
    child: Child,
    endpoint: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts `cairn --backend postgres` and waits for etcd's second readiness line.
fn start(url: &str, name: &str) -> Server {
    let port = free_port();
    let endpoint = format!("127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["--name", name, "--backend", "postgres", "--postgres-url", url])
        .args(["--listen-client-urls", &format!("http://{endpoint}")])
        .args(["--advertise-client-urls", &format!("http://{endpoint}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cairn");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut ready = 0;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("published") || line.contains("enabled capabilities for version") {
                ready += 1;
                if ready == 2 {
                    let _ = tx.send(());
                }
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60)).expect("cairn --backend postgres did not become ready");
    Server { child, endpoint }
}

fn ctl(s: &Server, args: &[&str]) -> String {
    assert!(std::path::Path::new(ETCDCTL).exists(), "{ETCDCTL} is missing: install Debian's etcd-client");
    let out = Command::new(ETCDCTL)
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &s.endpoint, "--command-timeout", "5s"])
        .args(args)
        .output()
        .expect("run etcdctl");
    assert!(out.status.success(), "etcdctl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn two_processes_on_one_database() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = rt.block_on(cairn_postgres::testing::server().create_database()).expect("create a database");
    let a = start(&url, "a");
    let b = start(&url, "b");

    // A watcher on b, then a write through a.
    let mut watch = Command::new(ETCDCTL)
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &b.endpoint, "watch", "--prefix", "k"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn etcdctl watch");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ctl(&a, &["put", "k1", "v1"]), "OK\n");
    assert_eq!(ctl(&b, &["get", "k1"]), "k1\nv1\n", "a write through one process is read through the other");
    assert_eq!(ctl(&b, &["put", "k2", "v2"]), "OK\n");

    let rev_a: serde_json::Value = serde_json::from_str(&ctl(&a, &["get", "k2", "-w", "json"])).unwrap();
    assert_eq!(rev_a["kvs"][0]["mod_revision"], 3, "revisions are one sequence across processes");

    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while seen.len() < 6 && Instant::now() < deadline {
        match lines.next() {
            Some(Ok(l)) => seen.push(l),
            _ => break,
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    assert_eq!(seen, ["PUT", "k1", "v1", "PUT", "k2", "v2"], "the watcher on b saw both writes in order");
}
