//! Leases: grant, revoke, keep-alive, time-to-live, listing and expiry.

use std::collections::BTreeSet;
use std::time::Duration;

use cairn_backend::*;

use crate::util::*;
use crate::Harness;

pub async fn grant_ids<H: Harness>(h: H) {
    let b = h.open().await;
    put(&*b, "a", "1").await; // 2
    let g1 = b.lease_grant(0, 60).await.unwrap();
    let g2 = b.lease_grant(0, 60).await.unwrap();
    assert!(g1.id > 0 && g2.id > 0, "backend-chosen IDs are positive: {g1:?} {g2:?}");
    assert_ne!(g1.id, g2.id, "backend-chosen IDs are unique");
    assert_eq!((g1.ttl, g1.revision), (60, 2), "the grant echoes the TTL and the current revision");
    let g3 = b.lease_grant(42, 30).await.unwrap();
    assert_eq!((g3.id, g3.ttl), (42, 30), "a chosen ID is kept");
    assert_eq!(rev(&*b).await, 2, "granting does not advance the revision");
    let ids: BTreeSet<_> = b.lease_leases().await.unwrap().into_iter().collect();
    assert_eq!(ids, BTreeSet::from([g1.id, g2.id, 42]));
}

pub async fn grant_existing_fails<H: Harness>(h: H) {
    let b = h.open().await;
    b.lease_grant(42, 60).await.unwrap();
    assert_err(b.lease_grant(42, 60).await, BackendError::LeaseExists, "granting a taken ID");
    let chosen = b.lease_grant(0, 60).await.unwrap().id;
    assert_err(b.lease_grant(chosen, 60).await, BackendError::LeaseExists, "granting a backend-chosen ID again");
    b.lease_revoke(42).await.unwrap();
    b.lease_grant(42, 60).await.expect("a revoked ID may be granted again");
}

pub async fn revoke_deletes_keys<H: Harness>(h: H) {
    let b = h.open().await;
    let lease = b.lease_grant(0, 600).await.unwrap().id;
    put_lease(&*b, "k1", "v", lease).await; // 2
    put_lease(&*b, "k2", "v", lease).await; // 3
    put(&*b, "other", "v").await; // 4
    assert_eq!(b.lease_revoke(lease).await.unwrap(), 5, "revoke deletes the keys at one new revision and returns it");
    assert_eq!(keys(&get_all(&*b).await), ["other"], "the attached keys are gone");
    assert_eq!(rev(&*b).await, 5);
    assert_err(b.lease_time_to_live(lease, false).await, BackendError::LeaseNotFound, "a revoked lease is forgotten");
    assert!(!b.lease_leases().await.unwrap().contains(&lease));
    assert_err(b.lease_revoke(lease).await, BackendError::LeaseNotFound, "revoking twice");
}

pub async fn revoke_without_keys<H: Harness>(h: H) {
    let b = h.open().await;
    put(&*b, "a", "1").await; // 2
    let lease = b.lease_grant(0, 600).await.unwrap().id;
    assert_eq!(b.lease_revoke(lease).await.unwrap(), 2, "revoking a lease without keys takes no revision");
    assert_eq!(rev(&*b).await, 2);
}

pub async fn missing_lease_fails<H: Harness>(h: H) {
    let b = h.open().await;
    assert_err(b.lease_revoke(999).await, BackendError::LeaseNotFound, "revoke");
    assert_err(b.lease_keep_alive(999).await, BackendError::LeaseNotFound, "keep-alive");
    assert_err(b.lease_time_to_live(999, true).await, BackendError::LeaseNotFound, "time-to-live");
}

pub async fn keep_alive<H: Harness>(h: H) {
    let b = h.open().await;
    let lease = b.lease_grant(0, 77).await.unwrap().id;
    assert_eq!(b.lease_keep_alive(lease).await.unwrap(), 77, "keep-alive returns the granted TTL");
    let info = b.lease_time_to_live(lease, false).await.unwrap();
    assert!((75..=77).contains(&info.ttl), "remaining after keep-alive: {info:?}");
}

pub async fn keep_alive_extends<H: Harness>(h: H) {
    let b = h.open().await;
    let lease = b.lease_grant(0, 3).await.unwrap().id;
    put_lease(&*b, "k", "v", lease).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    b.lease_keep_alive(lease).await.expect("keep-alive before expiry");
    tokio::time::sleep(Duration::from_secs(2)).await;
    // 4 s after the grant, 2 s after the keep-alive: alive.
    assert!(get(&*b, "k").await.is_some(), "a kept-alive lease's key survives past the original TTL");
    let info = b.lease_time_to_live(lease, false).await.expect("the kept-alive lease exists");
    assert!((0..=1).contains(&info.ttl), "about 1 s left: {info:?}");
}

pub async fn time_to_live<H: Harness>(h: H) {
    let b = h.open().await;
    let lease = b.lease_grant(0, 100).await.unwrap().id;
    put_lease(&*b, "k2", "v", lease).await;
    put_lease(&*b, "k1", "v", lease).await;
    put(&*b, "other", "v").await;
    let info = b.lease_time_to_live(lease, true).await.unwrap();
    assert_eq!((info.id, info.granted_ttl), (lease, 100));
    // etcd reports whole seconds, truncated: 99 right after a 100 s grant.
    assert!((98..=100).contains(&info.ttl), "remaining TTL: {info:?}");
    let ks: BTreeSet<_> = info.keys.iter().cloned().collect();
    assert_eq!(ks, BTreeSet::from([bytes("k1"), bytes("k2")]), "the attached keys");
    assert_eq!(info.keys.len(), 2, "each key once");
    let info = b.lease_time_to_live(lease, false).await.unwrap();
    assert!(info.keys.is_empty(), "keys only when asked");
    delete(&*b, single("k1")).await;
    assert_eq!(b.lease_time_to_live(lease, true).await.unwrap().keys, vec![bytes("k2")], "a deleted key is no longer attached");
}

pub async fn leases_list<H: Harness>(h: H) {
    let b = h.open().await;
    let ids: Vec<_> = [0, 0, 0].iter().map(|_| ()).collect();
    let mut granted = BTreeSet::new();
    for _ in ids {
        granted.insert(b.lease_grant(0, 600).await.unwrap().id);
    }
    let first = *granted.iter().next().unwrap();
    b.lease_revoke(first).await.unwrap();
    granted.remove(&first);
    let listed: BTreeSet<_> = b.lease_leases().await.unwrap().into_iter().collect();
    assert_eq!(listed, granted, "every live lease, and no revoked one");
}

pub async fn expiry_deletes_keys<H: Harness>(h: H) {
    let b = h.open().await;
    let lease = b.lease_grant(0, 1).await.unwrap().id;
    put_lease(&*b, "k1", "v", lease).await; // 2
    put_lease(&*b, "k2", "v", lease).await; // 3
    put(&*b, "other", "v").await; // 4
    let mut feed = b.watch(0).await.unwrap();
    let bb: &dyn Backend = &*b;
    eventually(Duration::from_secs(5), "keys of an expired 1 s lease are deleted", || async move {
        get(bb, "k1").await.is_none()
    })
    .await;
    assert_eq!(keys(&get_all(&*b).await), ["other"], "both attached keys are gone");
    assert_eq!(rev(&*b).await, 5, "expiry deletes the keys at one revision");
    let got = loop {
        match next_item(&mut feed).await.unwrap() {
            FeedItem::Changes(c) => break c,
            FeedItem::Progress(_) => {}
        }
    };
    assert_eq!(got.revision, 5);
    let mut deleted: Vec<_> = got.events.iter().map(|e| (e.kind == EventKind::Delete, e.kv.key.clone(), e.prev_kv.as_ref().map(|p| p.lease))).collect();
    deleted.sort();
    assert_eq!(
        deleted,
        vec![(true, bytes("k1"), Some(lease)), (true, bytes("k2"), Some(lease))],
        "expiry sends delete events"
    );
    assert_err(b.lease_time_to_live(lease, false).await, BackendError::LeaseNotFound, "an expired lease is forgotten");
    assert_err(b.lease_keep_alive(lease).await, BackendError::LeaseNotFound, "keep-alive of an expired lease");
    assert!(!b.lease_leases().await.unwrap().contains(&lease));
}

pub async fn put_with_revoked_lease_fails<H: Harness>(h: H) {
    let b = h.open().await;
    let lease = b.lease_grant(0, 600).await.unwrap().id;
    b.lease_revoke(lease).await.unwrap();
    assert_err(
        put_req(&*b, PutRequest { key: bytes("k"), value: bytes("v"), lease, ..PutRequest::default() }).await,
        BackendError::LeaseNotFound,
        "a put with a revoked lease",
    );
    assert_eq!(rev(&*b).await, 1);
}

pub async fn reattach_moves_key<H: Harness>(h: H) {
    let b = h.open().await;
    let la = b.lease_grant(0, 600).await.unwrap().id;
    let lb = b.lease_grant(0, 600).await.unwrap().id;
    put_lease(&*b, "k", "1", la).await;
    put_lease(&*b, "k", "2", lb).await;
    assert!(b.lease_time_to_live(la, true).await.unwrap().keys.is_empty(), "the old lease lost the key");
    assert_eq!(b.lease_time_to_live(lb, true).await.unwrap().keys, vec![bytes("k")], "the new lease has it");
    b.lease_revoke(la).await.unwrap();
    assert_eq!(get(&*b, "k").await.map(|kv| kv.lease), Some(lb), "revoking the old lease leaves the key");
    b.lease_revoke(lb).await.unwrap();
    assert_eq!(get(&*b, "k").await, None, "revoking the new lease deletes it");
}
