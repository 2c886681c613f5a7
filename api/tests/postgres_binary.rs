//! The `cairn` binary on the PostgreSQL backend: two server processes on one database behave
//! as one etcd to the real etcdctl (a write through one is read and watched through the other).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::process::{ctl, start, ETCDCTL};

#[test]
fn two_processes_on_one_database() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = rt.block_on(cairn_postgres::testing::server().create_database()).expect("create a database");
    let a = start("a", &["--backend", "postgres", "--postgres-url", &url]);
    let b = start("b", &["--backend", "postgres", "--postgres-url", &url]);

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
