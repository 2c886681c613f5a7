//! The snapshot files this crate writes, read by the real tools: `etcdctl snapshot status`
//! (bbolt's consistency check, revision, key count) and `etcdctl snapshot restore` followed
//! by a real etcd serving the restored data, whose data dir this crate's reader then reads
//! back. Skipped when /usr/bin/etcdctl or /usr/bin/etcd
//! is missing.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_bbolt::etcd::{read_snapshot, snapshot_db, with_hash, Lease, Member, Snapshot, Version};

fn tool(name: &str) -> Option<String> {
    let p = format!("/usr/bin/{name}");
    Path::new(&p).exists().then_some(p)
}

fn put(
    key: &str,
    value: &str,
    rev: i64,
    sub: i64,
    create: i64,
    version: i64,
    lease: i64,
) -> Version {
    Version {
        key: key.into(),
        value: value.into(),
        revision: rev,
        sub,
        create_revision: create,
        version,
        lease,
        tombstone: false,
    }
}

fn sample() -> Snapshot {
    let mut versions = vec![
        put("a", "1", 2, 0, 2, 1, 0),
        put("b", "1", 3, 0, 3, 1, 0),
        put("a", "2", 4, 0, 2, 2, 0),
        put("c", "x", 4, 1, 4, 1, 0),
        Version {
            key: b"b".to_vec(),
            revision: 5,
            tombstone: true,
            ..Default::default()
        },
        put("withlease", "v", 6, 0, 6, 1, 0x77),
    ];
    // Enough data for branch pages and an overflow value.
    for i in 0..400 {
        versions.push(put(
            &format!("many/{i:04}"),
            &"z".repeat(100),
            7,
            i,
            7,
            1,
            0,
        ));
    }
    versions.push(put("big", &"q".repeat(20_000), 8, 0, 8, 1, 0));
    Snapshot {
        versions,
        leases: vec![Lease { id: 0x77, ttl: 100 }],
        members: vec![Member {
            id: 0x8e9e05c52164694d,
            name: "default".into(),
            peer_urls: vec!["http://localhost:2380".into()],
            client_urls: vec!["http://localhost:2379".into()],
            is_learner: false,
        }],
        compact_revision: 0,
        consistent_index: 9,
        cluster_version: "3.5.0".into(),
        ..Default::default()
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn etcdctl_reads_and_restores_it() {
    let (Some(etcdctl), Some(etcd)) = (tool("etcdctl"), tool("etcd")) else {
        eprintln!("skipped: etcdctl/etcd not installed");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("snap.db");
    std::fs::write(&file, with_hash(snapshot_db(&sample()))).unwrap();

    let out = Command::new(&etcdctl)
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "status", "-w", "json"])
        .arg(&file)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("\"revision\":8"), "{text}");
    // 407 versions + meta (1) + lease (1) + members (1) + cluster (1).
    assert!(text.contains("\"totalKey\":411"), "{text}");

    let data = dir.path().join("restored");
    let (client, peer) = (free_port(), free_port());
    let out = Command::new(&etcdctl)
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "restore"])
        .arg(&file)
        .arg("--data-dir")
        .arg(&data)
        .args([
            "--name",
            "r",
            "--initial-cluster",
            &format!("r=http://127.0.0.1:{peer}"),
        ])
        .args([
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let server = Kill(
        Command::new(&etcd)
            .env("ETCD_UNSUPPORTED_ARCH", "amd64")
            .args(["--name", "r", "--data-dir"])
            .arg(&data)
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args(["--initial-cluster", &format!("r=http://127.0.0.1:{peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let ctl = |args: &[&str]| {
        Command::new(&etcdctl)
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &format!("127.0.0.1:{client}"),
                "--command-timeout",
                "2s",
            ])
            .args(args)
            .output()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = ctl(&["endpoint", "health"]);
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "restored etcd did not come up");
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = ctl(&["get", "a", "-w", "json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"revision\":8"), "{text}");
    assert!(
        text.contains("\"create_revision\":2,\"mod_revision\":4,\"version\":2"),
        "{text}"
    );
    let out = ctl(&["get", "b"]);
    assert!(out.stdout.is_empty(), "b was deleted");
    let out = ctl(&["get", "many/", "--prefix", "--keys-only", "-w", "json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"count\":400"), "{text}");
    let out = ctl(&["get", "big", "--print-value-only"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "q".repeat(20_000)
    );
    let out = ctl(&["lease", "list"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("77"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    drop(server);

    // The restored member's backend, rewritten by etcdctl's restore and then by etcd itself
    // (real bbolt: inline buckets, a freelist, etcd's own buckets), reads back as written.
    let db = std::fs::read(data.join("member/snap/db")).unwrap();
    let back = read_snapshot(&db).unwrap();
    assert_eq!(back.versions, sample().versions);
    assert_eq!(back.leases, sample().leases);
    let auth = back.auth.expect("etcd creates its auth buckets");
    assert!(!auth.enabled && auth.users.is_empty(), "{auth:?}");
}
