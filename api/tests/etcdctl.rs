//! The real `etcdctl` (v3 API) against a Cairn server: what users type must work unchanged.

mod common;

use std::process::Stdio;

use common::TestServer;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

const ETCDCTL: &str = "/usr/bin/etcdctl";

/// Runs etcdctl against the server and returns its stdout; fails the test on a non-zero exit.
async fn ctl(s: &TestServer, args: &[&str], stdin: Option<&str>) -> String {
    ctl_at(&s.addr.to_string(), args, stdin).await
}

/// As [`ctl`], against an endpoint written as given (e.g. with an `http://` scheme).
async fn ctl_at(endpoint: &str, args: &[&str], stdin: Option<&str>) -> String {
    assert!(
        std::path::Path::new(ETCDCTL).exists(),
        "{ETCDCTL} is missing: install Debian's etcd-client (apt-get install etcd-client)"
    );
    let mut child = Command::new(ETCDCTL)
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoint, "--command-timeout", "5s"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn etcdctl");
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).await.unwrap();
    }
    drop(input);
    let out = child.wait_with_output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "etcdctl {args:?} failed: {stderr}\n{stdout}");
    stdout
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).expect("etcdctl printed JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_del() {
    let s = TestServer::start().await;
    assert_eq!(ctl(&s, &["put", "foo", "bar"], None).await, "OK\n");
    assert_eq!(ctl(&s, &["put", "foo2", "bar2"], None).await, "OK\n");
    assert_eq!(ctl(&s, &["put", "zoo", "z"], None).await, "OK\n");
    assert_eq!(ctl(&s, &["get", "foo"], None).await, "foo\nbar\n");
    assert_eq!(ctl(&s, &["get", "foo", "--prefix"], None).await, "foo\nbar\nfoo2\nbar2\n");
    assert_eq!(ctl(&s, &["get", "foo", "--prefix", "--keys-only"], None).await, "foo\n\nfoo2\n\n");
    assert_eq!(ctl(&s, &["get", "foo", "--prefix", "--limit", "1"], None).await, "foo\nbar\n");
    let sorted =
        ctl(&s, &["get", "", "--prefix", "--sort-by", "MODIFY", "--order", "DESCEND", "--keys-only"], None).await;
    assert_eq!(sorted, "zoo\n\nfoo2\n\nfoo\n\n");
    assert_eq!(ctl(&s, &["put", "foo", "new"], None).await, "OK\n");
    assert_eq!(ctl(&s, &["get", "foo", "--rev", "2"], None).await, "foo\nbar\n");
    let j = json(&ctl(&s, &["get", "foo", "-w", "json"], None).await);
    assert_eq!(j["count"].as_i64(), Some(1));
    assert_eq!(j["header"]["revision"].as_i64(), Some(5));
    assert_eq!(j["header"]["member_id"].as_u64(), Some(0x8e9e05c52164694d));
    assert_eq!(j["kvs"][0]["version"].as_i64(), Some(2));
    assert_eq!(ctl(&s, &["del", "foo", "--prefix"], None).await, "2\n");
    assert_eq!(ctl(&s, &["get", "foo", "--prefix"], None).await, "");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_interactive() {
    let s = TestServer::start().await;
    ctl(&s, &["put", "key1", "v1"], None).await;
    let script = "value(\"key1\") = \"v1\"\n\nput key1 v2\nput key2 x\n\nget key1\n\n";
    let out = ctl(&s, &["txn"], Some(script)).await;
    assert_eq!(out, "SUCCESS\n\nOK\n\nOK\n");
    let out = ctl(&s, &["txn"], Some(script)).await;
    assert_eq!(out, "FAILURE\n\nkey1\nv2\n");
    let bad = ctl_fails(&s, &["put", "", "x"]).await;
    assert!(bad.contains("key is not provided") || bad.contains("put command needs"), "{bad}");
    s.stop().await;
}

async fn ctl_fails(s: &TestServer, args: &[&str]) -> String {
    let out = Command::new(ETCDCTL)
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &s.addr.to_string()])
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "etcdctl {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases() {
    let s = TestServer::start().await;
    let out = ctl(&s, &["lease", "grant", "100"], None).await;
    let id = out.split_whitespace().nth(1).expect("lease id").to_string();
    assert_eq!(out, format!("lease {id} granted with TTL(100s)\n"));
    ctl(&s, &["put", "lk", "v", "--lease", &id], None).await;
    let ttl = ctl(&s, &["lease", "timetolive", &id, "--keys"], None).await;
    assert!(ttl.starts_with(&format!("lease {id} granted with TTL(100s), remaining(")), "{ttl}");
    assert!(ttl.trim_end().ends_with("attached keys([lk])"), "{ttl}");
    let list = ctl(&s, &["lease", "list"], None).await;
    assert_eq!(list, format!("found 1 leases\n{id}\n"));
    let ka = ctl(&s, &["lease", "keep-alive", "--once", &id], None).await;
    assert_eq!(ka, format!("lease {id} keepalived with TTL(100)\n"));
    assert_eq!(ctl(&s, &["lease", "revoke", &id], None).await, format!("lease {id} revoked\n"));
    assert_eq!(ctl(&s, &["get", "lk"], None).await, "");
    let gone = ctl(&s, &["lease", "timetolive", &id], None).await;
    assert_eq!(gone, format!("lease {id} already expired\n"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_status_members() {
    let s = TestServer::start().await;
    for i in 0..3 {
        ctl(&s, &["put", "c", &i.to_string()], None).await;
    }
    assert_eq!(ctl(&s, &["compaction", "3"], None).await, "compacted revision 3\n");
    assert_eq!(ctl(&s, &["compaction", "--physical", "4"], None).await, "compacted revision 4\n");
    let err = ctl_fails(&s, &["get", "c", "--rev", "2"]).await;
    assert!(err.contains("etcdserver: mvcc: required revision has been compacted"), "{err}");

    let st = json(&ctl(&s, &["endpoint", "status", "-w", "json"], None).await);
    let status = &st[0]["Status"];
    assert_eq!(status["version"].as_str(), Some("3.5.17"));
    assert_eq!(status["leader"].as_u64(), Some(0x8e9e05c52164694d));
    assert_eq!(status["header"]["revision"].as_i64(), Some(4));

    let table = ctl(&s, &["member", "list"], None).await;
    assert_eq!(table, "8e9e05c52164694d, started, default, http://localhost:2380, http://localhost:2379, false\n");
    let ml = json(&ctl(&s, &["member", "list", "-w", "json"], None).await);
    assert_eq!(ml["members"][0]["name"].as_str(), Some("default"));
    assert_eq!(ml["header"]["cluster_id"].as_u64(), Some(0xcdf818194e3a8c32));
    s.stop().await;
}

/// etcdctl 3.4 sends `:authority: http://host:port` on per-endpoint Maintenance calls when the
/// endpoint has a scheme; the server must accept it as etcd does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_with_scheme_endpoints() {
    let s = TestServer::start().await;
    let port = s.addr.port();
    for ep in [format!("http://127.0.0.1:{port}"), format!("http://localhost:{port}")] {
        let st = ctl_at(&ep, &["endpoint", "status"], None).await;
        assert!(st.starts_with(&format!("{ep}, 8e9e05c52164694d, 3.5.17,")), "{st}");
        let defrag = ctl_at(&ep, &["defrag"], None).await;
        assert_eq!(defrag, format!("Finished defragmenting etcd member[{ep}]\n"));
        assert!(ctl_at(&ep, &["endpoint", "hashkv"], None).await.starts_with(&ep));
    }
    s.stop().await;
}
