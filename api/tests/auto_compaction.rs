//! etcd's --auto-compaction-mode and --auto-compaction-retention on the real binary, checked
//! with the real etcdctl.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::process::{self, ctl, try_ctl};

fn revision_of_put(s: &process::Cairn, key: &str) -> i64 {
    let out = ctl(s, &["put", key, "v", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("etcdctl printed JSON");
    v["header"]["revision"].as_i64().expect("a revision")
}

#[test]
fn periodic_auto_compaction_compacts_history_older_than_the_retention() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // --unsafe-no-fsync too: the native backend starts with it and serves as usual.
    let s = process::start(
        "autocompact",
        &["--data-dir", data.to_str().unwrap(), "--auto-compaction-retention=1s", "--unsafe-no-fsync"],
    );
    let first = revision_of_put(&s, "k");
    let deadline = Instant::now() + Duration::from_secs(30);
    let err = loop {
        revision_of_put(&s, "k");
        let (ok, _, err) = try_ctl(&s, &["get", "k", &format!("--rev={first}")]);
        if !ok {
            break err;
        }
        assert!(Instant::now() < deadline, "revision {first} was not compacted within 30 s of a 1 s retention");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(err.contains("required revision has been compacted"), "{err}");
    // What was written just now is still there to read at its revision.
    let recent = revision_of_put(&s, "k");
    let (ok, out, err) = try_ctl(&s, &["get", "k", &format!("--rev={recent}")]);
    assert!(ok && out == "k\nv\n", "reading revision {recent}: {out}{err}");
}

fn cairn_fails(args: &[&str]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["--data-dir", dir.path().join("d").to_str().unwrap()])
        .args(["--listen-client-urls", &format!("http://127.0.0.1:{}", process::free_port())])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{}", process::free_port())])
        .args(args)
        .output()
        .expect("run cairn");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_auto_compaction_flags_stop_the_server_with_etcds_messages() {
    let (code, err) = cairn_fails(&["--auto-compaction-mode=hourly"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err, "error verifying flags, unknown auto-compaction-mode \"hourly\". See 'etcd --help'.\n");
    let (code, err) = cairn_fails(&["--auto-compaction-retention=soon"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("error parsing CompactionRetention: time: invalid duration \"soon\""), "{err}");
}
