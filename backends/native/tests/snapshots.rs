//! `--snapshot-count` counts requests, as etcd's does, not raft entries: a group-commit entry
//! holds many requests, and the log stays in memory until a snapshot lets raft purge it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_backend::{Backend, PutRequest, RequestOp, TxnRequest};
use cairn_native::{NativeBackend, NativeConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_follow_requests_not_entries() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = NativeConfig {
        data_dir: dir.path().join("data"),
        snapshot_count: 500,
        ..Default::default()
    };
    let b: Arc<NativeBackend> = NativeBackend::open(cfg).await.unwrap();
    let start = b.raft_metrics().last_log_index.unwrap_or(0);
    // 64 writers: requests arrive together and are proposed as group-commit entries.
    let mut tasks = Vec::new();
    for w in 0..64 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..80 {
                let put = RequestOp::Put(PutRequest {
                    key: format!("w{w}/{i}").into_bytes(),
                    value: vec![b'x'; 256],
                    ..Default::default()
                });
                b.txn(TxnRequest::unconditional(vec![put])).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let m = b.raft_metrics();
    let entries = m.last_log_index.unwrap() - start;
    eprintln!("5120 puts in {entries} entries");
    assert!(
        entries < 2_500,
        "puts were not grouped ({entries} entries), so this test shows nothing"
    );
    // 5120 requests at --snapshot-count 500: snapshots follow, and the log behind the last
    // one is purged down to the few entries a single node keeps.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = b.raft_metrics();
        let snap = m.snapshot.map_or(0, |l| l.index);
        let purged = m.purged.map_or(0, |l| l.index);
        let last = m.last_log_index.unwrap();
        if snap > start && last - purged <= 100 + entries.min(500) {
            eprintln!("snapshot at {snap}, purged to {purged}, last {last}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no snapshot/purge after 5120 requests: snapshot {snap}, purged {purged}, last {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
