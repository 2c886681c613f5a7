//! Moving from etcd to Cairn: a real etcd 3.4 writes keys, deletes, a lease, a compaction and an
//! auth store; Cairn started on that etcd's data dir serves the same data at the same revisions,
//! with the same users, roles and passwords.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::process::{free_port, start, try_ctl, try_ctl_at, Cairn, ETCDCTL};

const ETCD: &str = "/usr/bin/etcd";

struct Etcd {
    child: Child,
    endpoint: String,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn etcd_ctl(e: &Etcd, args: &[&str]) -> String {
    let (ok, out, err) = try_ctl_at(&e.endpoint, args);
    assert!(ok, "etcdctl {args:?} against etcd failed: {err}");
    out
}

/// Cairn (a single node named "default") on `data`.
fn cairn_on(data: &std::path::Path, extra: &[&str]) -> Cairn {
    let peer = format!("http://127.0.0.1:{}", free_port());
    let mut args = vec!["--data-dir", data.to_str().unwrap()];
    if !extra.contains(&"--listen-peer-urls") {
        args.extend(["--listen-peer-urls", peer.as_str()]);
    }
    args.extend(extra);
    start("default", &args)
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The kvs of a `get -w json` answer and its header revision.
fn kvs(text: &str) -> (serde_json::Value, i64) {
    let v = json(text);
    (v["kvs"].clone(), v["header"]["revision"].as_i64().unwrap())
}

#[test]
fn cairn_starts_on_an_etcd_data_dir() {
    assert!(
        std::path::Path::new(ETCD).exists(),
        "{ETCD} is missing: install Debian's etcd-server"
    );
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (client, peer) = (free_port(), free_port());
    let endpoint = format!("127.0.0.1:{client}");
    let etcd = Etcd {
        child: Command::new(ETCD)
            .env("ETCD_UNSUPPORTED_ARCH", "amd64")
            .args(["--name", "default", "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &format!("http://{endpoint}")])
            .args(["--advertise-client-urls", &format!("http://{endpoint}")])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args([
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{peer}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd"),
        endpoint,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Command::new(ETCDCTL)
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &etcd.endpoint, "endpoint", "health"])
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "etcd did not come up");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Revisions 2..: a=1, b=1, a=2, delete b, c (a 10 KB value), compaction at 3, then a key
    // on a lease.
    etcd_ctl(&etcd, &["put", "a", "1"]);
    etcd_ctl(&etcd, &["put", "b", "1"]);
    etcd_ctl(&etcd, &["put", "a", "2"]);
    etcd_ctl(&etcd, &["del", "b"]);
    etcd_ctl(&etcd, &["put", "c", &"z".repeat(10_000)]);
    etcd_ctl(&etcd, &["compact", "3"]);
    let lease = etcd_ctl(&etcd, &["lease", "grant", "600"]);
    let lease_id = lease.split_whitespace().nth(1).unwrap().to_string();
    etcd_ctl(&etcd, &["put", "l", "x", "--lease", &lease_id]);
    // Auth: root, a role that may read and write "a", a user holding it; then auth on.
    etcd_ctl(&etcd, &["user", "add", "root:rootpw"]);
    etcd_ctl(&etcd, &["role", "add", "r1"]);
    etcd_ctl(&etcd, &["role", "grant-permission", "r1", "readwrite", "a"]);
    etcd_ctl(&etcd, &["user", "add", "u:upw"]);
    etcd_ctl(&etcd, &["user", "grant-role", "u", "r1"]);
    etcd_ctl(&etcd, &["auth", "enable"]);
    let root = ["--user", "root:rootpw"];
    let want_all = etcd_ctl(&etcd, &[&root[..], &["get", "", "--prefix", "-w", "json"]].concat());
    let want_a4 = etcd_ctl(&etcd, &[&root[..], &["get", "a", "--rev", "4", "-w", "json"]].concat());
    let (want_kvs, want_rev) = kvs(&want_all);
    assert_eq!(want_rev, 7, "{want_all}");
    // A clean stop, which commits etcd's backend: Cairn reads that file, not etcd's WAL.
    let mut etcd = etcd;
    let status = Command::new("kill")
        .args(["-TERM", &etcd.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    etcd.child.wait().unwrap();
    drop(etcd);

    let cairn: Cairn = cairn_on(&data, &[]);
    let ctl = |args: &[&str]| {
        let (ok, out, err) = try_ctl(&cairn, args);
        assert!(ok, "etcdctl {args:?} against Cairn failed: {err}");
        out
    };
    // The same keys, values, revisions, versions and lease, at the same current revision.
    let got_all = ctl(&[&root[..], &["get", "", "--prefix", "-w", "json"]].concat());
    let (got_kvs, got_rev) = kvs(&got_all);
    assert_eq!(got_kvs, want_kvs);
    assert_eq!(got_rev, want_rev);
    // History above the compaction, and the compaction itself.
    let got_a4 = ctl(&[&root[..], &["get", "a", "--rev", "4", "-w", "json"]].concat());
    assert_eq!(kvs(&got_a4).0, kvs(&want_a4).0);
    let (ok, _, err) = try_ctl(&cairn, &[&root[..], &["get", "a", "--rev", "2"]].concat());
    assert!(!ok && err.contains("required revision has been compacted"), "{err}");
    let leases = ctl(&[&root[..], &["lease", "list"]].concat());
    assert!(leases.contains(&lease_id), "{leases}");
    let ttl = ctl(&[&root[..], &["lease", "timetolive", &lease_id, "--keys"]].concat());
    assert!(ttl.contains("attached keys([l])"), "{ttl}");
    // Auth carried over: enabled, passwords (bcrypt hashes) valid, permissions enforced.
    let (ok, _, err) = try_ctl(&cairn, &["get", "a"]);
    assert!(!ok && err.contains("user name is empty"), "{err}");
    let (ok, _, err) = try_ctl(&cairn, &["--user", "u:wrong", "get", "a"]);
    assert!(!ok && err.contains("authentication failed"), "{err}");
    assert_eq!(ctl(&["--user", "u:upw", "get", "a", "--print-value-only"]), "2\n");
    assert_eq!(ctl(&["--user", "u:upw", "put", "a", "3"]), "OK\n");
    let (ok, _, err) = try_ctl(&cairn, &["--user", "u:upw", "put", "c", "y"]);
    assert!(!ok && err.contains("permission denied"), "{err}");
    // Writes go on from etcd's revision.
    let after = ctl(&[&root[..], &["get", "a", "-w", "json"]].concat());
    assert_eq!(kvs(&after).1, want_rev + 1);
    assert_eq!(kvs(&after).0[0]["version"], 3);
    drop(cairn);

    // A restart does not import again (the store is Cairn's now) and keeps the new write.
    let cairn = cairn_on(&data, &[]);
    let (ok, out, err) = try_ctl(&cairn, &["--user", "u:upw", "get", "a", "--print-value-only"]);
    assert!(ok, "{err}");
    assert_eq!(out, "3\n");
}

/// A Cairn snapshot carries the auth store too: `etcdctl snapshot save` from Cairn, `etcdctl
/// snapshot restore` (real bbolt rewrites the file), then Cairn on the restored data dir.
#[test]
fn snapshot_restore_round_trip_keeps_auth() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first");
    let cairn = cairn_on(&first, &[]);
    let ctl = |c: &Cairn, args: &[&str]| {
        let (ok, out, err) = try_ctl(c, args);
        assert!(ok, "etcdctl {args:?} failed: {err}");
        out
    };
    ctl(&cairn, &["put", "k", "v1"]);
    ctl(&cairn, &["put", "k", "v2"]);
    ctl(&cairn, &["user", "add", "root:rootpw"]);
    ctl(&cairn, &["role", "add", "reader"]);
    ctl(&cairn, &["role", "grant-permission", "reader", "read", "k"]);
    ctl(&cairn, &["user", "add", "r:rpw"]);
    ctl(&cairn, &["user", "grant-role", "r", "reader"]);
    ctl(&cairn, &["auth", "enable"]);
    let file = dir.path().join("snap.db");
    ctl(
        &cairn,
        &["--user", "root:rootpw", "snapshot", "save", file.to_str().unwrap()],
    );
    drop(cairn);

    let restored = dir.path().join("restored");
    let peer = format!("http://127.0.0.1:{}", free_port());
    let out = Command::new(ETCDCTL)
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "restore", file.to_str().unwrap(), "--name", "default"])
        .args(["--data-dir", restored.to_str().unwrap()])
        .args(["--initial-cluster", &format!("default={peer}")])
        .args(["--initial-advertise-peer-urls", &peer])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let cluster = format!("default={peer}");
    let cairn = cairn_on(
        &restored,
        &[
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &cluster,
        ],
    );
    assert_eq!(
        ctl(&cairn, &["--user", "r:rpw", "get", "k", "--print-value-only"]),
        "v2\n"
    );
    let (ok, _, err) = try_ctl(&cairn, &["--user", "r:rpw", "put", "k", "v3"]);
    assert!(!ok && err.contains("permission denied"), "{err}");
    let (ok, _, err) = try_ctl(&cairn, &["get", "k"]);
    assert!(!ok && err.contains("user name is empty"), "{err}");
    let roles = ctl(&cairn, &["--user", "root:rootpw", "user", "get", "r"]);
    assert!(roles.contains("reader"), "{roles}");
}
