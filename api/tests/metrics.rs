//! `/metrics` of a real `cairn` process on the client port and on `--listen-metrics-urls`,
//! doing what etcd's e2e metricsTest (metrics_test.go) does, on a single node.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Stdio};

use common::process::{self, ctl, Cairn, ETCDCTL};

fn get(url: &str) -> String {
    let out = Command::new("curl").args(["-s", url]).output().expect("run curl");
    assert!(out.status.success(), "curl {url} failed");
    String::from_utf8(out.stdout).unwrap()
}

/// etcdctl watch k --rev 1 until it prints the put of k, then kill it (the client cancels
/// the watch, as etcd's ctlV3Watch does).
fn watch_k_then_cancel(s: &Cairn) {
    let mut child = Command::new(ETCDCTL)
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &s.endpoint, "watch", "k", "--rev", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run etcdctl watch");
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let seen: Vec<String> = lines.map_while(Result::ok).take(3).collect();
    assert_eq!(seen, ["PUT", "k", "v"]);
    let _ = child.kill();
    let _ = child.wait();
}

fn has_line(metrics: &str, line: &str) -> bool {
    metrics.lines().any(|l| l == line)
}

#[test]
fn etcds_metrics_test_on_one_node() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let metrics_url = format!("http://127.0.0.1:{port}");
    let s = process::start("metrics", &["--backend", "memory", "--listen-metrics-urls", &metrics_url]);
    ctl(&s, &["put", "k", "v"]);
    for i in 1..=6 {
        ctl(&s, &["put", &i.to_string(), "v"]);
        ctl(&s, &["del", &i.to_string()]);
        watch_k_then_cancel(&s);
        let m = get(&format!("{metrics_url}/metrics"));
        match i {
            1 => assert!(has_line(&m, "etcd_mvcc_put_total 2"), "{m}"),
            2 => assert!(has_line(&m, "etcd_debugging_mvcc_keys_total 1"), "{m}"),
            3 => assert!(has_line(&m, "etcd_mvcc_delete_total 3"), "{m}"),
            _ => {}
        }
    }
    for base in [metrics_url.clone(), format!("http://{}", s.endpoint)] {
        let m = get(&format!("{base}/metrics"));
        assert!(has_line(&m, r#"etcd_server_version{server_version="3.5.17"} 1"#), "{m}");
        assert!(has_line(&m, r#"etcd_cluster_version{cluster_version="3.5"} 1"#), "{m}");
        assert!(has_line(&m, "etcd_server_has_leader 1"), "{m}");
        assert!(has_line(&m, "etcd_server_is_leader 1"), "{m}");
        assert!(has_line(&m, "etcd_server_leader_changes_seen_total 1"), "{m}");
        assert!(has_line(&m, "# TYPE etcd_mvcc_put_total counter"), "{m}");
        assert!(
            has_line(
                &m,
                r#"grpc_server_handled_total{grpc_code="OK",grpc_method="Put",grpc_service="etcdserverpb.KV",grpc_type="unary"} 7"#
            ),
            "{m}"
        );
        assert!(has_line(&m, "etcd_mvcc_delete_total 6"), "{m}");
    }
    // The server sees the last cancellation when the connection closes; wait for it to be counted.
    let canceled = r#"grpc_server_handled_total{grpc_code="Canceled",grpc_method="Watch",grpc_service="etcdserverpb.Watch",grpc_type="bidi_stream"} 6"#;
    while !has_line(&get(&format!("{metrics_url}/metrics")), canceled) {
        std::thread::yield_now();
    }
    assert_eq!(get(&format!("{metrics_url}/health")), r#"{"health":"true","reason":""}"#);
    assert_eq!(get(&format!("{metrics_url}/v3/kv/range")), "404 page not found\n");
}

#[test]
fn txn_and_range_counts_are_etcds() {
    let s = process::start("metrics-txn", &["--backend", "memory"]);
    ctl(&s, &["put", "a", "1"]);
    ctl(&s, &["get", "a"]);
    // etcd 3.4 evaluates the compare in a read txn and puts in a write txn: no multi-op txn.
    let out = Command::new(ETCDCTL)
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &s.endpoint, "txn"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write as _;
            c.stdin.take().unwrap().write_all(b"value(\"a\") = \"1\"\n\nput a 2\n\n\n")?;
            c.wait_with_output()
        })
        .expect("etcdctl txn");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("SUCCESS"));
    let m = get(&format!("http://{}/metrics", s.endpoint));
    assert!(has_line(&m, "etcd_mvcc_put_total 2"), "{m}");
    assert!(has_line(&m, "etcd_mvcc_range_total 2"), "{m}");
    assert!(has_line(&m, "etcd_mvcc_txn_total 0"), "{m}");
    // A put with --prev-kv reads and writes in one mvcc txn.
    ctl(&s, &["put", "a", "3", "--prev-kv"]);
    let m = get(&format!("http://{}/metrics", s.endpoint));
    assert!(has_line(&m, "etcd_mvcc_txn_total 1"), "{m}");
    assert!(has_line(&m, "etcd_mvcc_range_total 3"), "{m}");
}

#[test]
fn gateway_calls_count_as_grpc_calls() {
    let s = process::start("metrics-gw", &["--backend", "memory"]);
    let post = |path: &str, body: &str| {
        let out = Command::new("curl")
            .args(["-s", "-X", "POST", "-d", body, &format!("http://{}{path}", s.endpoint)])
            .output()
            .expect("run curl");
        assert!(out.status.success());
    };
    post("/v3/kv/put", r#"{"key":"Zm9v","value":"YmFy"}"#);
    post("/v3/kv/range", r#"{"key":""}"#);
    let m = get(&format!("http://{}/metrics", s.endpoint));
    for line in [
        r#"grpc_server_started_total{grpc_method="Put",grpc_service="etcdserverpb.KV",grpc_type="unary"} 1"#,
        r#"grpc_server_handled_total{grpc_code="OK",grpc_method="Put",grpc_service="etcdserverpb.KV",grpc_type="unary"} 1"#,
        r#"grpc_server_handled_total{grpc_code="InvalidArgument",grpc_method="Range",grpc_service="etcdserverpb.KV",grpc_type="unary"} 1"#,
        "etcd_mvcc_put_total 1",
    ] {
        assert!(has_line(&m, line), "{line} missing in:\n{m}");
    }
}
