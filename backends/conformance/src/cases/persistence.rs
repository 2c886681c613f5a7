//! Durability: what must survive closing and reopening the store. Generated only for
//! harnesses with [`Harness::reopen`].

use std::sync::Arc;

use cairn_backend::*;

use crate::util::*;
use crate::Harness;

async fn reopen<H: Harness>(h: &H, b: Arc<H::B>) -> Arc<H::B> {
    h.reopen(b).await.expect("the persistence cases need Harness::reopen; use backend_suite!(.., no_persistence) otherwise")
}

pub async fn data_survives_reopen<H: Harness>(h: H) {
    let b = h.open().await;
    put(&*b, "a", "1").await; // 2
    ops(&*b, vec![put_op("b", "1"), put_op("c", "1")]).await; // 3
    put(&*b, "a", "2").await; // 4
    delete(&*b, single("c")).await; // 5
    let before = get_all(&*b).await;
    let b = reopen(&h, b).await;
    assert_eq!(b.current_revision().await.unwrap(), (5, 0), "the revision survives");
    assert_eq!(get_all(&*b).await, before, "the data survives");
    assert_eq!(get(&*b, "c").await, None, "a delete survives");
    assert_eq!(put(&*b, "d", "1").await, 6, "writes go on at the next revision");
    assert_eq!(put(&*b, "a", "3").await, 7);
    assert_eq!(get(&*b, "a").await, Some(kv("a", "3", 2, 7, 3, 0)), "versions go on");
}

pub async fn compaction_survives_reopen<H: Harness>(h: H) {
    let b = h.open().await;
    for i in 0..5 {
        put(&*b, "a", &i.to_string()).await; // 2..6
    }
    b.compact(4, true).await.unwrap();
    let b = reopen(&h, b).await;
    assert_eq!(b.current_revision().await.unwrap(), (6, 4), "the compaction point survives");
    assert_err(get_all_at(&*b, 3).await, BackendError::Compacted { compact_revision: 4 }, "reads below it still fail");
    assert_eq!(get_all_at(&*b, 4).await.unwrap(), vec![kv("a", "2", 2, 4, 3, 0)], "the version at the compact revision survives");
    assert_err(b.compact(4, true).await, BackendError::Compacted { compact_revision: 4 }, "compacting at it again");
}

pub async fn leases_survive_reopen<H: Harness>(h: H) {
    let b = h.open().await;
    let lease = b.lease_grant(0, 600).await.unwrap().id;
    b.lease_grant(42, 300).await.unwrap();
    put_lease(&*b, "k", "v", lease).await; // 2
    let b = reopen(&h, b).await;
    let mut ids = b.lease_leases().await.unwrap();
    ids.sort();
    let mut want = vec![lease, 42];
    want.sort();
    assert_eq!(ids, want, "leases survive");
    let info = b.lease_time_to_live(lease, true).await.unwrap();
    assert_eq!((info.granted_ttl, info.keys.clone()), (600, vec![bytes("k")]), "granted TTL and attached keys survive");
    assert!(info.ttl > 0 && info.ttl <= 600, "a surviving lease has time left: {info:?}");
    assert_err(b.lease_grant(lease, 60).await, BackendError::LeaseExists, "a surviving ID is still taken");
    assert_eq!(b.lease_revoke(lease).await.unwrap(), 3, "revoking after reopen deletes the attached key");
    assert_eq!(get(&*b, "k").await, None);
}

pub async fn history_survives_reopen<H: Harness>(h: H) {
    let b = h.open().await;
    put(&*b, "a", "1").await; // 2
    put(&*b, "a", "2").await; // 3
    delete(&*b, single("a")).await; // 4
    let mut feed = b.watch(2).await.unwrap();
    let before = collect_until(&mut feed, 4).await;
    drop(feed);
    let b = reopen(&h, b).await;
    assert_eq!(get_all_at(&*b, 2).await.unwrap(), vec![kv("a", "1", 2, 2, 1, 0)], "old revisions stay readable");
    let mut feed = b.watch(2).await.unwrap();
    let after = collect_until(&mut feed, 4).await;
    let unwrap = |v: Vec<Arc<ChangeBatch>>| v.into_iter().map(|b| (*b).clone()).collect::<Vec<_>>();
    assert_eq!(unwrap(after), unwrap(before), "the change feed's history survives, prev_kv included");
}

pub async fn docs_survive_reopen<H: Harness>(h: H) {
    let b = h.open().await;
    b.doc_put("auth", 0, b"state".to_vec()).await.unwrap();
    b.doc_put("auth", 1, b"state2".to_vec()).await.unwrap();
    let b = reopen(&h, b).await;
    assert_eq!(b.doc_get("auth").await.unwrap(), Some(Doc { version: 2, value: b"state2".to_vec() }), "a document survives");
    assert_eq!(b.doc_put("auth", 2, b"state3".to_vec()).await.unwrap(), Some(3), "its version goes on");
}
