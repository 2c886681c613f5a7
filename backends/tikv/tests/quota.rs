//! etcd's space quota on TiKV, against the fake PD + TiKV: the bytes of Cairn's rows are
//! counted inside the write transactions (`P m s`, `P m f`), so two processes on one store
//! refuse puts at the same quota, deletes still pass, compaction gives the bytes back, and the
//! count survives reopening (and is rebuilt by a scan for data written without it). After
//! every step the count equals a scan of the rows.

use std::sync::Arc;
use std::time::Duration;

use cairn_backend::*;
use cairn_backend_tests::util::*;
use cairn_tikv::{TikvBackend, TikvOptions};
use cairn_tikv_fake::FakeTikv;

const QUOTA: u64 = 64 * 1024;

async fn backend(fake: &FakeTikv, quota: u64) -> Arc<TikvBackend> {
    let opts = TikvOptions {
        feed_poll_interval: Duration::from_millis(50),
        quota_backend_bytes: quota,
        ..TikvOptions::default()
    };
    TikvBackend::connect(vec![fake.endpoint()], opts).await.expect("connect")
}

/// The count, checked against a scan of every counted row, and what Status reports.
async fn size(b: &TikvBackend) -> u64 {
    let (counted, scanned) = b.size_counted_and_scanned().await.unwrap();
    assert_eq!(counted, scanned, "the count matches the rows in TiKV");
    let st = b.status().await.unwrap();
    assert_eq!((st.db_size, st.db_size_in_use), (counted as i64, counted as i64), "Status reports the count");
    counted
}

fn put_1k(key: &str) -> TxnRequest {
    TxnRequest::unconditional(vec![put_op(key, &"v".repeat(1024))])
}

/// Puts 1 KiB values under `prefix` until the first `NoSpace`; returns how many passed.
async fn fill(b: Arc<TikvBackend>, prefix: String) -> usize {
    for i in 0.. {
        match b.txn(put_1k(&format!("{prefix}/{i}"))).await {
            Ok(_) => {}
            Err(BackendError::NoSpace) => return i,
            Err(e) => panic!("put {prefix}/{i}: {e}"),
        }
        assert!(i < 1000, "{i} KiB written under a {QUOTA} B quota without NoSpace");
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_refuse_at_the_quota_and_compaction_gives_it_back() {
    let fake = FakeTikv::start().await.unwrap();
    let a = backend(&fake, QUOTA).await;
    let b = backend(&fake, QUOTA).await;
    assert_eq!(size(&a).await, 0, "an empty store counts nothing");

    // What one 1 KiB put adds (live version, history version, log entry).
    put(&*a, "first", &"v".repeat(1024)).await;
    let one = size(&b).await;
    assert!(one > 3 * 1024, "a put counts its live row, its history and its log entry ({one} B)");

    // Both processes write at once (they conflict on the counter and retry) until refused.
    let mut tasks = Vec::new();
    for (p, be) in [a.clone(), b.clone()].into_iter().enumerate() {
        for t in 0..2 {
            tasks.push(tokio::spawn(fill(be.clone(), format!("p{p}/t{t}"))));
        }
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.unwrap();
    }
    let full = size(&a).await;
    let cost = quota::txn_cost(&put_1k("p0/t0/0"));
    println!(
        "{admitted} puts admitted after the first; refused at {full} B of {QUOTA} B; {} write conflicts",
        fake.write_conflicts()
    );
    assert!(fake.write_conflicts() > 0, "the two processes raced in TiKV");
    assert!(admitted >= 5, "the quota held more than {admitted} puts of 1 KiB");
    // etcd's rule, in each write's own transaction: admitted only while size + cost < quota,
    // so the store ends at most one put beyond the last admitted size.
    assert!(full + cost >= QUOTA, "refused only once size + cost reaches the quota ({full} B)");
    assert!(full < QUOTA + one, "no process admitted a put past the quota ({full} B)");
    for be in [&a, &b] {
        assert_eq!(be.txn(put_1k("more")).await.unwrap_err(), BackendError::NoSpace);
    }

    // Deletes cost nothing: they pass at the quota (and a txn without puts too).
    let r = ops(&*b, vec![del_op(span("p", "q"))]).await;
    assert!(r.succeeded);
    let cmp_only = TxnRequest {
        compare: vec![cmp("first", CompareResult::Greater, CompareTarget::Version(0))],
        success: vec![del_op(single("first"))],
        failure: vec![get_op(single("x"))],
    };
    assert!(a.txn(cmp_only).await.unwrap().succeeded, "a txn without puts is not refused");
    let after_deletes = size(&a).await;

    // Compaction at the current revision frees the old versions and log entries: a 64-byte
    // put passes again on both processes.
    let current = rev(&*a).await;
    a.compact(current, true).await.unwrap();
    let compacted = size(&b).await;
    println!("after deletes {after_deletes} B, after compaction {compacted} B");
    assert!(compacted * 2 < after_deletes, "compaction gave the bytes back ({after_deletes} -> {compacted})");
    put(&*a, "after/a", &"s".repeat(64)).await;
    put(&*b, "after/b", &"s".repeat(64)).await;
    size(&a).await;

    // A second (background) compaction from the other process frees what the deletes left.
    let current = rev(&*b).await;
    b.compact(current, false).await.unwrap();
    eventually(WAIT, "the background compaction frees bytes", || async {
        a.size_counted_and_scanned().await.unwrap().0 < compacted
    })
    .await;
    size(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_count_and_a_grant_is_refused_at_the_quota() {
    let fake = FakeTikv::start().await.unwrap();
    let a = backend(&fake, 0).await;
    let lease = a.lease_grant(0, 60).await.unwrap().id;
    put_lease(&*a, "leased", "v", lease).await;
    put(&*a, "plain", "v").await;
    let with_lease = size(&a).await;
    a.lease_keep_alive(lease).await.unwrap();
    assert_eq!(size(&a).await, with_lease, "a keep-alive changes nothing");

    // 64 bytes of room: a grant (cost 64) reaches the quota, a put costs more still.
    let tight = backend(&fake, with_lease + 64).await;
    assert_eq!(tight.lease_grant(0, 60).await.unwrap_err(), BackendError::NoSpace);
    assert_eq!(tight.txn(TxnRequest::unconditional(vec![put_op("k", "v")])).await.unwrap_err(), BackendError::NoSpace);
    let roomy = backend(&fake, with_lease + 65).await;
    let second = roomy.lease_grant(0, 60).await.unwrap().id;
    assert!(size(&a).await > with_lease, "a lease counts");

    // Revoking deletes the lease, its attachment and its key (a tombstone and a log entry
    // come in); the count follows exactly.
    a.lease_revoke(lease).await.unwrap();
    a.lease_revoke(second).await.unwrap();
    size(&a).await;
    for b in [a, tight, roomy] {
        b.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_count_survives_reopening_and_is_rebuilt_for_old_data() {
    let fake = FakeTikv::start().await.unwrap();
    let a = backend(&fake, QUOTA).await;
    for i in 0..20 {
        put(&*a, &format!("k{}", i % 7), &"v".repeat(100 + i)).await;
    }
    ops(&*a, vec![del_op(single("k3"))]).await;
    let current = rev(&*a).await;
    a.compact(current - 5, true).await.unwrap();
    let before = size(&a).await;
    a.shutdown().await;
    drop(a);

    let a = backend(&fake, QUOTA).await;
    assert_eq!(size(&a).await, before, "the count is stored with the data");
    a.shutdown().await;
    drop(a);

    // Data from before the count: no `P m s` (the freed count from the compaction stays).
    // Opening counts the rows once and stores it.
    let client = tikv_client::TransactionClient::new(vec![fake.endpoint()]).await.unwrap();
    let mut t = client.begin_optimistic().await.unwrap();
    assert!(t.get(b"cairn/mf".to_vec()).await.unwrap().is_some(), "compaction counted what it freed");
    t.delete(b"cairn/ms".to_vec()).await.unwrap();
    t.commit().await.unwrap();
    let a = backend(&fake, QUOTA).await;
    assert_eq!(size(&a).await, before, "the count is rebuilt from the rows");
    let mut t = client.begin_optimistic().await.unwrap();
    assert!(t.get(b"cairn/ms".to_vec()).await.unwrap().is_some(), "and stored");
    t.rollback().await.unwrap();
    // It goes on from there, compaction included. Compacting at the revision of k0's last
    // put keeps only that version of k0 (the one visible there), as etcd does.
    put(&*a, "k0", "new").await;
    let current = rev(&*a).await;
    a.compact(current, true).await.unwrap();
    assert!(size(&a).await < before);
    let read = tikv_client::TransactionOptions::new_optimistic().drop_check(tikv_client::CheckLevel::None);
    let mut snap = client.snapshot(client.current_timestamp().await.unwrap(), read);
    let k0_versions = snap.scan(b"cairn/hk0\x00\x01".to_vec()..b"cairn/hk0\x00\x02".to_vec(), 100).await.unwrap();
    assert_eq!(k0_versions.count(), 1, "one version of k0 left");
    a.shutdown().await;
}
