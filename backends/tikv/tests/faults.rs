//! Faults injected through the fake PD + TiKV: write conflicts between two Cairn processes
//! (two clients), region errors, lost commit responses and PD unavailability. Each must end as
//! a retry or an etcd error (`Unavailable`), never a wrong answer or a lost acknowledged
//! write; the change log must still hold every revision exactly once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cairn_backend::*;
use cairn_backend_tests::util::*;
use cairn_tikv::{TikvBackend, TikvOptions};
use cairn_tikv_fake::{CommitFault, FakeTikv, RegionFault};
use futures::StreamExt;

fn opts(retry: Duration) -> TikvOptions {
    TikvOptions { retry_timeout: retry, feed_poll_interval: Duration::from_millis(50), ..TikvOptions::default() }
}

async fn backend(fake: &FakeTikv, retry: Duration) -> Arc<TikvBackend> {
    TikvBackend::connect(vec![fake.endpoint()], opts(retry)).await.expect("connect")
}

/// Every revision from 2 to the current one, read from a watch from revision 1: each once,
/// in order. Returns the last value put for each key.
async fn check_log(b: &dyn Backend) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let current = rev(b).await;
    let mut feed = b.watch(1).await.unwrap();
    let batches = collect_until(&mut feed, current).await;
    let want: Vec<Revision> = (2..=current).collect();
    assert_eq!(revs(&batches), want, "the change log holds every revision once, in order");
    let mut last = BTreeMap::new();
    for b in &batches {
        for e in &b.events {
            match e.kind {
                EventKind::Put => last.insert(e.kv.key.clone(), e.kv.value.clone()),
                EventKind::Delete => last.remove(&e.kv.key),
            };
        }
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_conflicts_between_two_processes_retry() {
    let fake = FakeTikv::start().await.unwrap();
    let a = backend(&fake, Duration::from_secs(30)).await;
    let b = backend(&fake, Duration::from_secs(30)).await;
    // A watch on each process, opened before the writes: each sees every revision, including
    // the other process's (through the change log in TiKV).
    let mut watch_a = a.watch(0).await.unwrap();
    let mut watch_b = b.watch(0).await.unwrap();
    // Plain puts from both processes, and compare-and-swap increments of one counter key.
    let mut tasks = Vec::new();
    for (p, be) in [a.clone(), b.clone()].into_iter().enumerate() {
        for t in 0..3 {
            let be = be.clone();
            tasks.push(tokio::spawn(async move {
                let mut revs = Vec::new();
                for i in 0..15 {
                    revs.push(put(&*be, &format!("k/{p}/{t}/{i}"), &format!("{i}")).await);
                    // Increment "counter" by CAS on its mod revision.
                    loop {
                        let cur = get(&*be, "counter").await;
                        let (n, modr) = cur.map_or((0, 0), |kv| {
                            (String::from_utf8(kv.value).unwrap().parse::<i64>().unwrap(), kv.mod_revision)
                        });
                        let r = txn(
                            &*be,
                            TxnRequest {
                                compare: vec![cmp("counter", CompareResult::Equal, CompareTarget::Mod(modr))],
                                success: vec![put_op("counter", &(n + 1).to_string())],
                                failure: vec![],
                            },
                        )
                        .await;
                        if r.succeeded {
                            revs.push(r.revision);
                            break;
                        }
                    }
                }
                revs
            }));
        }
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    let n = all.len() as i64;
    assert_eq!(n, 2 * 3 * 15 * 2);
    assert_eq!(all, (2..2 + n).collect::<Vec<_>>(), "acknowledged writes took unique, gap-free revisions");
    assert_eq!(rev(&*a).await, 1 + n);
    assert_eq!(rev(&*b).await, 1 + n);
    assert_eq!(
        get(&*a, "counter").await.unwrap().value,
        bytes(&(n / 2).to_string()),
        "no CAS increment lost or doubled"
    );
    assert!(
        fake.write_conflicts() > 0,
        "the two processes did conflict in TiKV ({} conflicts)",
        fake.write_conflicts()
    );
    for w in [&mut watch_a, &mut watch_b] {
        let seen = collect_until(w, 1 + n).await;
        assert_eq!(revs(&seen), (2..2 + n).collect::<Vec<_>>(), "a live watch saw both processes' revisions once");
    }
    let last = check_log(&*b).await;
    assert_eq!(last.len() as i64, n / 2 + 1, "every acknowledged key is in the log");
    assert_eq!(get_all(&*a).await.len() as i64, n / 2 + 1, "and in the store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn region_errors_become_retries() {
    let fake = FakeTikv::start().await.unwrap();
    let b = backend(&fake, Duration::from_secs(10)).await;
    put(&*b, "a", "0").await;
    let faults =
        [RegionFault::NotLeader, RegionFault::RegionNotFound, RegionFault::EpochNotMatch, RegionFault::ServerIsBusy];
    for i in 1..=12 {
        fake.inject_region_errors(&[faults[i % 4], faults[(i + 1) % 4]]);
        assert_eq!(put(&*b, "a", &i.to_string()).await, 2 + i as i64, "put {i} under region errors");
        fake.inject_region_errors(&[faults[(i + 2) % 4]]);
        let kv = get(&*b, "a").await.unwrap();
        assert_eq!((kv.value, kv.version), (bytes(&i.to_string()), 1 + i as i64), "read {i} under region errors");
    }
    assert_eq!(fake.pending_region_errors(), 0, "every injected region error was answered");
    fake.inject_region_errors(&[RegionFault::NotLeader, RegionFault::ServerIsBusy]);
    let g = b.lease_grant(0, 60).await.unwrap();
    fake.inject_region_errors(&[RegionFault::EpochNotMatch, RegionFault::ServerIsBusy]);
    assert_eq!(b.lease_keep_alive(g.id).await.unwrap(), 60);
    assert_eq!(rev(&*b).await, 14);
    check_log(&*b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_commit_responses_are_settled_exactly_once() {
    let fake = FakeTikv::start().await.unwrap();
    let b = backend(&fake, Duration::from_secs(20)).await;
    put(&*b, "x", "0").await; // 2
                              // The commit happened but its response was lost, and so were the answers to the client's
                              // own retries (tikv-client gives up after about 20 tries): the backend must find out that
                              // it did commit (rollback refuses, the log entry carries its nonce), not apply it twice.
    fake.inject_commit_faults(&[CommitFault::ApplyThenFail; 40]);
    let r = ops(&*b, vec![put_op("x", "1"), put_op("y", "1")]).await;
    assert_eq!(r.revision, 3, "the lost-response commit is acknowledged at its revision");
    assert!(
        fake.pending_commit_faults() > 0,
        "the client gave up before the faults ran out, so the backend settled it"
    );
    fake.clear_commit_faults();
    // A commit that fails before applying, more often than the client retries: rolled back and
    // retried by the backend.
    fake.inject_commit_faults(&[CommitFault::FailBeforeApply; 30]);
    assert_eq!(put(&*b, "x", "2").await, 4);
    fake.clear_commit_faults();
    let x = get(&*b, "x").await.unwrap();
    assert_eq!((x.value, x.version, x.mod_revision), (bytes("2"), 3, 4), "each write applied exactly once");
    // "y" was a secondary key left locked by the lost response: a read resolves it.
    let y = get(&*b, "y").await.unwrap();
    assert_eq!((y.value, y.mod_revision), (bytes("1"), 3));
    assert_eq!(rev(&*b).await, 4);
    check_log(&*b).await;
    assert_eq!(fake.lock_count(), 0, "no lock is left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pd_unavailable_fails_unavailable_then_recovers() {
    let fake = FakeTikv::start().await.unwrap();
    let b = backend(&fake, Duration::from_millis(1500)).await;
    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    for i in 0..5 {
        put(&*b, &format!("before/{i}"), "v").await;
        acked.insert(format!("before/{i}"), "v".into());
    }
    let mut watch = b.watch(0).await.unwrap();
    fake.set_pd_available(false);
    let mut failed = 0;
    for i in 0..3 {
        let key = format!("during/{i}");
        match b.txn(TxnRequest::unconditional(vec![put_op(&key, "v")])).await {
            Ok(_) => {
                acked.insert(key, "v".into());
            }
            Err(BackendError::Unavailable(_)) | Err(BackendError::Timeout) => failed += 1,
            Err(e) => panic!("PD down must look like etcd's unavailability, got {e:?}"),
        }
        match b.range(RangeRequest { range: single("before/0"), ..RangeRequest::default() }).await {
            Ok(r) => assert_eq!(r.kvs.len(), 1, "a read that succeeds is right"),
            Err(BackendError::Unavailable(_)) | Err(BackendError::Timeout) => {}
            Err(e) => panic!("read while PD is down: {e:?}"),
        }
    }
    assert!(failed > 0, "writes need PD's timestamps, so some must fail while it is down");
    fake.set_pd_available(true);
    // The client reconnects by itself; writes succeed again.
    let mut after = None;
    for _ in 0..100 {
        match b.txn(TxnRequest::unconditional(vec![put_op("after", "v")])).await {
            Ok(r) => {
                after = Some(r.revision);
                break;
            }
            Err(BackendError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => panic!("after PD is back: {e:?}"),
        }
    }
    let after = after.expect("writes succeed once PD is back");
    acked.insert("after".into(), "v".into());
    assert_eq!(after, rev(&*b).await);
    // Nothing acknowledged is lost, nothing unacknowledged appeared twice.
    let now: BTreeMap<String, String> = get_all(&*b)
        .await
        .into_iter()
        .map(|kv| (String::from_utf8(kv.key).unwrap(), String::from_utf8(kv.value).unwrap()))
        .collect();
    for (k, v) in &acked {
        assert_eq!(now.get(k), Some(v), "acknowledged write {k} survives");
    }
    check_log(&*b).await;
    // The watch opened before the outage delivers the later revisions too.
    let mut seen = Vec::new();
    while seen.last().copied().unwrap_or(0) < after {
        match tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("watch delivers after PD is back")
        {
            Some(Ok(FeedItem::Changes(c))) => seen.push(c.revision),
            Some(Ok(FeedItem::Progress(_))) => {}
            Some(Err(e)) => panic!("watch failed: {e:?}"),
            None => panic!("watch ended"),
        }
    }
    assert_eq!(seen, (7..=after).collect::<Vec<_>>(), "the watch saw every revision after the outage, once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batched_writes_keep_each_txn_apart() {
    let fake = FakeTikv::start().await.unwrap();
    let b = backend(&fake, Duration::from_secs(30)).await;
    let lease = b.lease_grant(0, 600).await.unwrap().id;
    let before = fake.prewrites();
    // Many concurrent writes from one process share TiKV transactions; a txn that fails
    // (unknown lease) must have no effect on the others, and each gets its own revision.
    let mut tasks = Vec::new();
    for i in 0..60 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            let key = format!("k{i:02}");
            let lease = match i % 6 {
                0 => 999_999,
                1 => lease,
                _ => 0,
            };
            let r = b
                .txn(TxnRequest::unconditional(vec![
                    RequestOp::Put(PutRequest {
                        key: key.clone().into_bytes(),
                        value: b"v".to_vec(),
                        lease,
                        ..PutRequest::default()
                    }),
                    get_op(KeyRange::single(key.into_bytes())),
                ]))
                .await;
            (i, r)
        }));
    }
    let mut revs = Vec::new();
    for t in tasks {
        let (i, r) = t.await.unwrap();
        match r {
            Ok(resp) => {
                assert_ne!(i % 6, 0, "a put with an unknown lease must fail");
                let ResponseOp::Range(got) = &resp.responses[1] else { panic!("range response") };
                assert_eq!(got.kvs.len(), 1, "a txn reads its own write");
                assert_eq!(got.kvs[0].mod_revision, resp.revision, "at its own revision");
                revs.push(resp.revision);
            }
            Err(BackendError::LeaseNotFound) => assert_eq!(i % 6, 0),
            Err(e) => panic!("txn {i}: {e:?}"),
        }
    }
    revs.sort();
    assert_eq!(revs, (2..52).collect::<Vec<_>>(), "50 successful txns, 50 unique gap-free revisions");
    assert!(fake.prewrites() - before < 50, "writes were batched ({} TiKV transactions)", fake.prewrites() - before);
    let all = get_all(&*b).await;
    assert_eq!(all.len(), 50, "failed txns left nothing behind");
    // Revoking the lease deletes exactly its 10 keys, at one revision.
    assert_eq!(b.lease_revoke(lease).await.unwrap(), 52);
    assert_eq!(get_all(&*b).await.len(), 40);
    check_log(&*b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gc_safe_point_prunes_old_versions() {
    let fake = FakeTikv::start().await.unwrap();
    let opts = TikvOptions {
        gc_interval: Some(Duration::from_millis(200)),
        gc_life_time: Duration::from_millis(100),
        ..opts(Duration::from_secs(10))
    };
    let b = TikvBackend::connect(vec![fake.endpoint()], opts).await.unwrap();
    for i in 0..20 {
        put(&*b, "hot", &i.to_string()).await;
    }
    let before = fake.mvcc_versions();
    eventually(Duration::from_secs(10), "the GC safe point passes the writes", || async {
        fake.gc_safe_point() > 0 && fake.mvcc_versions() < before
    })
    .await;
    // TiKV's versions are gone; Cairn's own history (its keys) is untouched by TiKV GC.
    let kv = get(&*b, "hot").await.unwrap();
    assert_eq!((kv.value, kv.version, kv.mod_revision), (bytes("19"), 20, 21));
    assert_eq!(get_all_at(&*b, 5).await.unwrap()[0].value, bytes("3"), "Cairn's history is Cairn keys, kept");
    check_log(&*b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_expiry_happens_once_across_processes() {
    let fake = FakeTikv::start().await.unwrap();
    let a = backend(&fake, Duration::from_secs(10)).await;
    let b = backend(&fake, Duration::from_secs(10)).await;
    let lease = a.lease_grant(0, 1).await.unwrap().id;
    put_lease(&*a, "k1", "v", lease).await; // 2
    put_lease(&*b, "k2", "v", lease).await; // 3
    let bb: &dyn Backend = &*b;
    eventually(Duration::from_secs(10), "the 1 s lease expires", || async move { get(bb, "k1").await.is_none() }).await;
    tokio::time::sleep(Duration::from_millis(600)).await; // both sweepers had their chance
    assert_eq!(rev(&*a).await, 4, "both processes sweep, one expiry: one revision");
    let batches = collect_until(&mut a.watch(4).await.unwrap(), 4).await;
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].events.len(), 2, "both keys deleted in that revision");
    assert_err(b.lease_keep_alive(lease).await, BackendError::LeaseNotFound, "expired for the other process too");
}
