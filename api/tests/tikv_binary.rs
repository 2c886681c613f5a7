//! The `cairn` binary on the TiKV backend, against the in-process fake PD + TiKV
//! (`cairn-tikv-fake`): two server processes on one TiKV behave as one etcd to the real
//! etcdctl (revisions are one sequence, a write through one is read and watched through the
//! other, a lease granted through one is seen and revoked through the other).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_tikv_fake::FakeTikv;

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

/// Starts `cairn --backend tikv` and waits for etcd's second readiness line.
fn start(pd: &str, name: &str) -> Server {
    let port = free_port();
    let endpoint = format!("127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["--name", name, "--backend", "tikv", "--tikv-pd-endpoints", pd])
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
    rx.recv_timeout(Duration::from_secs(60)).expect("cairn --backend tikv did not become ready");
    Server { child, endpoint }
}

fn ctl(s: &Server, args: &[&str]) -> String {
    assert!(std::path::Path::new(ETCDCTL).exists(), "{ETCDCTL} is missing: install Debian's etcd-client");
    let out = Command::new(ETCDCTL)
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &s.endpoint, "--command-timeout", "10s"])
        .args(args)
        .output()
        .expect("run etcdctl");
    assert!(out.status.success(), "etcdctl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn two_processes_on_one_tikv() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let fake = rt.block_on(FakeTikv::start()).expect("start the fake PD + TiKV");
    let pd = fake.endpoint();
    let a = start(&pd, "a");
    let b = start(&pd, "b");

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
    let got: serde_json::Value = serde_json::from_str(&ctl(&a, &["get", "k2", "-w", "json"])).unwrap();
    assert_eq!(got["kvs"][0]["mod_revision"], 3, "revisions are one sequence across processes");

    let lease = ctl(&a, &["lease", "grant", "60"]);
    let id = lease.split_whitespace().nth(1).expect("lease id").to_string();
    assert_eq!(ctl(&a, &["put", "k3", "v3", "--lease", &id]), "OK\n");
    assert!(ctl(&b, &["lease", "list"]).contains(&id), "a lease granted through one process is listed by the other");
    ctl(&b, &["lease", "revoke", &id]);
    assert_eq!(ctl(&a, &["get", "k3"]), "", "revoking through the other process deleted the lease's key");

    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while seen.len() < 11 && Instant::now() < deadline {
        match lines.next() {
            Some(Ok(l)) => seen.push(l),
            _ => break,
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    assert_eq!(
        seen,
        ["PUT", "k1", "v1", "PUT", "k2", "v2", "PUT", "k3", "v3", "DELETE", "k3"],
        "the watcher on b saw every write in order"
    );
    drop((a, b));
    drop(fake);
}
