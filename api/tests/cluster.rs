//! Three real `cairn` processes started with etcd's cluster flags form one replicated etcd:
//! etcdctl sees every member, reads every write through any member, and the cluster carries
//! on when its leader is killed with SIGKILL and converges when it comes back.

mod common;

use common::process::{ctl, free_port, spawn, Cairn};

struct Spec {
    name: String,
    args: Vec<String>,
}

fn specs(dir: &std::path::Path) -> Vec<Spec> {
    let peers: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let initial: Vec<String> = peers
        .iter()
        .enumerate()
        .map(|(i, p)| format!("n{i}=http://127.0.0.1:{p}"))
        .collect();
    let initial = initial.join(",");
    (0..3)
        .map(|i| {
            let peer = format!("http://127.0.0.1:{}", peers[i]);
            Spec {
                name: format!("n{i}"),
                args: vec![
                    "--data-dir".into(),
                    dir.join(format!("n{i}")).display().to_string(),
                    "--listen-peer-urls".into(),
                    peer.clone(),
                    "--initial-advertise-peer-urls".into(),
                    peer,
                    "--initial-cluster".into(),
                    initial.clone(),
                    "--initial-cluster-token".into(),
                    "cluster-test".into(),
                    "--heartbeat-interval".into(),
                    "50".into(),
                    "--election-timeout".into(),
                    "500".into(),
                ],
            }
        })
        .collect()
}

fn start(s: &Spec) -> common::process::Starting {
    let args: Vec<&str> = s.args.iter().map(String::as_str).collect();
    spawn(&s.name, &args)
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn m(members: &[Option<Cairn>], i: usize) -> &Cairn {
    members[i].as_ref().unwrap()
}

fn leader_index(members: &[Option<Cairn>]) -> usize {
    for (i, m) in members.iter().enumerate() {
        if let Some(m) = m {
            let st = json(&ctl(m, &["endpoint", "status", "-w", "json"]));
            let st = &st[0]["Status"];
            if st["leader"] == st["header"]["member_id"] {
                return i;
            }
        }
    }
    panic!("no member says it leads");
}

#[test]
fn three_processes_are_one_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let specs = specs(dir.path());
    let starting: Vec<_> = specs.iter().map(start).collect();
    let mut members: Vec<Option<Cairn>> = starting.into_iter().map(|s| Some(s.ready())).collect();

    // Every member lists all three, with the names and client URLs they published.
    let list = json(&ctl(m(&members, 2), &["member", "list", "-w", "json"]));
    let mut names: Vec<String> = list["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["n0", "n1", "n2"]);
    for x in list["members"].as_array().unwrap() {
        assert_eq!(x["clientURLs"].as_array().map(Vec::len), Some(1), "{x}");
    }

    // A write through one member is read (linearizably) through the others.
    assert_eq!(ctl(m(&members, 0), &["put", "k", "v1"]).trim(), "OK");
    for i in 1..3 {
        assert_eq!(
            ctl(m(&members, i), &["get", "k", "--print-value-only"]).trim(),
            "v1"
        );
    }

    // SIGKILL the leader: the two others elect a new one and keep serving writes.
    let leader = leader_index(&members);
    members[leader] = None;
    let survivor = (leader + 1) % 3;
    assert_eq!(ctl(m(&members, survivor), &["put", "k", "v2"]).trim(), "OK");
    let other = 3 - leader - survivor;
    assert_eq!(
        ctl(m(&members, other), &["get", "k", "--print-value-only"]).trim(),
        "v2"
    );
    assert_ne!(leader_index(&members), leader);

    // The killed member restarts on its data dir, catches up, and every member has the same
    // key-value hash.
    members[leader] = Some(start(&specs[leader]).ready());
    assert_eq!(
        ctl(m(&members, leader), &["get", "k", "--print-value-only"]).trim(),
        "v2"
    );
    let rev = json(&ctl(m(&members, leader), &["get", "k", "-w", "json"]))["header"]["revision"]
        .as_i64()
        .unwrap();
    let hashes: Vec<u64> = (0..3)
        .map(|i| {
            let h = json(&ctl(
                m(&members, i),
                &[
                    "endpoint",
                    "hashkv",
                    "--rev",
                    &rev.to_string(),
                    "-w",
                    "json",
                ],
            ));
            h[0]["HashKV"]["hash"].as_u64().unwrap()
        })
        .collect();
    assert!(
        hashes.iter().all(|h| *h == hashes[0]),
        "HashKV differs: {hashes:?}"
    );

    // etcd's way to grow (or replace a member): `member add`, then start the new member with
    // --initial-cluster-state existing. It learns its ID from the cluster, catches up and
    // serves; `member remove` takes it out again.
    let url = format!("http://127.0.0.1:{}", free_port());
    let added = json(&ctl(
        m(&members, 0),
        &["member", "add", "n3", "--peer-urls", &url, "-w", "json"],
    ));
    let new_id = added["member"]["ID"].as_u64().unwrap();
    let initial = format!("{},n3={url}", specs[0].args[7]);
    let args: Vec<String> = [
        "--data-dir",
        &dir.path().join("n3").display().to_string(),
        "--listen-peer-urls",
        &url,
        "--initial-advertise-peer-urls",
        &url,
        "--initial-cluster",
        &initial,
        "--initial-cluster-state",
        "existing",
        "--initial-cluster-token",
        "cluster-test",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let joined = start(&Spec {
        name: "n3".into(),
        args: args.clone(),
    })
    .ready();
    assert_eq!(
        ctl(&joined, &["get", "k", "--print-value-only"]).trim(),
        "v2"
    );
    let st = json(&ctl(&joined, &["endpoint", "status", "-w", "json"]));
    assert_eq!(
        st[0]["Status"]["header"]["member_id"].as_u64(),
        Some(new_id)
    );
    let list = json(&ctl(m(&members, 1), &["member", "list", "-w", "json"]));
    let n3 = list["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["ID"].as_u64() == Some(new_id))
        .cloned();
    assert_eq!(
        n3.as_ref().and_then(|x| x["name"].as_str()),
        Some("n3"),
        "{list}"
    );
    // Restarted, it keeps the ID the cluster gave it (recorded in its data dir).
    drop(joined);
    let joined = start(&Spec {
        name: "n3".into(),
        args: args.clone(),
    })
    .ready();
    let st = json(&ctl(&joined, &["endpoint", "status", "-w", "json"]));
    assert_eq!(
        st[0]["Status"]["header"]["member_id"].as_u64(),
        Some(new_id)
    );
    // A write through the new member reaches the others.
    assert_eq!(ctl(&joined, &["put", "k", "v3"]).trim(), "OK");
    assert_eq!(
        ctl(m(&members, 2), &["get", "k", "--print-value-only"]).trim(),
        "v3"
    );
    ctl(
        m(&members, 0),
        &["member", "remove", &format!("{new_id:x}")],
    );
    let list = json(&ctl(m(&members, 1), &["member", "list", "-w", "json"]));
    assert_eq!(list["members"].as_array().unwrap().len(), 3, "{list}");
    assert_eq!(ctl(m(&members, 1), &["put", "k", "v4"]).trim(), "OK");

    // MoveLeader hands leadership to a follower; a non-member is refused with etcd's error.
    let leader = leader_index(&members);
    let to = (leader + 1) % 3;
    let to_id = json(&ctl(m(&members, to), &["endpoint", "status", "-w", "json"]))[0]["Status"]
        ["header"]["member_id"]
        .as_u64()
        .unwrap();
    let out = ctl(m(&members, leader), &["move-leader", &format!("{to_id:x}")]);
    assert!(out.contains("Leadership transferred"), "{out}");
    assert_eq!(leader_index(&members), to);
    let new_leader = m(&members, to);
    let refused = std::process::Command::new(common::process::ETCDCTL)
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &new_leader.endpoint, "move-leader", "1234"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("etcdserver: bad leader transferee"), "{err}");
    assert_eq!(ctl(m(&members, leader), &["put", "k", "v5"]).trim(), "OK");
}

/// Writers on every member put unique keys through the gRPC API while the leader is killed
/// with SIGKILL; after it restarts, every acknowledged put is on every member with the revision
/// it was acknowledged at, and no two acknowledged puts share a revision.
#[test]
fn kill_9_of_the_leader_under_load_loses_no_acknowledged_write() {
    use cairn_proto::etcdserverpb::kv_client::KvClient;
    use cairn_proto::etcdserverpb::{PutRequest, RangeRequest};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let dir = tempfile::tempdir().unwrap();
    let specs = specs(dir.path());
    let starting: Vec<_> = specs.iter().map(start).collect();
    let mut members: Vec<Option<Cairn>> = starting.into_iter().map(|s| Some(s.ready())).collect();
    let endpoints: Vec<String> = members
        .iter()
        .map(|m| m.as_ref().unwrap().endpoint.clone())
        .collect();
    let leader = leader_index(&members);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<(String, i64)>::new()));
    let mut writers = Vec::new();
    for w in 0..6usize {
        let ep = format!("http://{}", endpoints[w % 3]);
        let (stop, acked) = (stop.clone(), acked.clone());
        writers.push(rt.spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut kv) = KvClient::connect(ep.clone()).await else {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                };
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let key = format!("w{w}/{n:06}");
                    let put = PutRequest {
                        key: key.clone().into_bytes(),
                        value: b"v".to_vec(),
                        ..Default::default()
                    };
                    match tokio::time::timeout(std::time::Duration::from_secs(10), kv.put(put))
                        .await
                    {
                        Ok(Ok(r)) => acked
                            .lock()
                            .unwrap()
                            .push((key, r.into_inner().header.unwrap().revision)),
                        // Unknown outcome; a dead member's connection: reconnect.
                        Ok(Err(_)) | Err(_) => break,
                    }
                }
            }
        }));
    }
    std::thread::sleep(std::time::Duration::from_secs(2));
    members[leader] = None; // SIGKILL
    std::thread::sleep(std::time::Duration::from_secs(3));
    members[leader] = Some(start(&specs[leader]).ready());
    std::thread::sleep(std::time::Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        rt.block_on(w).unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 100, "only {} puts acknowledged", acked.len());
    let mut revs: Vec<i64> = acked.iter().map(|(_, r)| *r).collect();
    revs.sort_unstable();
    revs.dedup();
    assert_eq!(
        revs.len(),
        acked.len(),
        "two acknowledged puts share a revision"
    );
    // (the restarted member listens on a new client port)
    let endpoints: Vec<String> = members
        .iter()
        .map(|m| m.as_ref().unwrap().endpoint.clone())
        .collect();
    rt.block_on(async {
        for ep in &endpoints {
            let mut kv = KvClient::connect(format!("http://{ep}")).await.unwrap();
            let all = kv
                .range(RangeRequest {
                    key: b"w".to_vec(),
                    range_end: b"x".to_vec(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let stored: std::collections::HashMap<Vec<u8>, i64> = all
                .kvs
                .into_iter()
                .map(|kv| (kv.key, kv.mod_revision))
                .collect();
            for (key, rev) in &acked {
                assert_eq!(
                    stored.get(key.as_bytes()),
                    Some(rev),
                    "{ep} lost {key} acknowledged at {rev}"
                );
            }
        }
    });
    eprintln!(
        "{} acknowledged puts survived the leader's SIGKILL on every member",
        acked.len()
    );
}

/// kubeadm's way: one member starts alone, the next joins with `member add` and
/// --initial-cluster-state existing, catches up, becomes a voter and serves.
#[test]
fn a_single_node_grows_into_a_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb) = (free_port(), free_port());
    let (ua, ub) = (
        format!("http://127.0.0.1:{pa}"),
        format!("http://127.0.0.1:{pb}"),
    );
    let da = dir.path().join("a").display().to_string();
    let a = start(&Spec {
        name: "a".into(),
        args: [
            "--data-dir",
            &da,
            "--listen-peer-urls",
            &ua,
            "--initial-advertise-peer-urls",
            &ua,
            "--initial-cluster",
            &format!("a={ua}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    })
    .ready();
    assert_eq!(ctl(&a, &["put", "k", "v1"]).trim(), "OK");
    let added = json(&ctl(
        &a,
        &["member", "add", "b", "--peer-urls", &ub, "-w", "json"],
    ));
    let b_id = added["member"]["ID"].as_u64().unwrap();
    let db = dir.path().join("b").display().to_string();
    let b = start(&Spec {
        name: "b".into(),
        args: [
            "--data-dir",
            &db,
            "--listen-peer-urls",
            &ub,
            "--initial-advertise-peer-urls",
            &ub,
            "--initial-cluster",
            &format!("a={ua},b={ub}"),
            "--initial-cluster-state",
            "existing",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    })
    .ready();
    assert_eq!(ctl(&b, &["get", "k", "--print-value-only"]).trim(), "v1");
    assert_eq!(ctl(&b, &["put", "k", "v2"]).trim(), "OK");
    assert_eq!(ctl(&a, &["get", "k", "--print-value-only"]).trim(), "v2");
    // b becomes a voter once it caught up.
    let mut voter = false;
    for _ in 0..50 {
        let list = json(&ctl(&a, &["member", "list", "-w", "json"]));
        let members = list["members"].as_array().unwrap().clone();
        assert_eq!(members.len(), 2, "{list}");
        let st = json(&ctl(&b, &["endpoint", "status", "-w", "json"]));
        assert_eq!(st[0]["Status"]["header"]["member_id"].as_u64(), Some(b_id));
        if st[0]["Status"]["isLearner"].as_bool() != Some(true) {
            voter = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(voter, "the added member never became a voter");
}
