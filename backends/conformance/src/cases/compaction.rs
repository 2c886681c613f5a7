//! Compaction and the revision bounds it sets; HashKV.

use cairn_backend::*;

use crate::util::*;
use crate::Harness;

/// a=1 (2), b=1 (3), a=2 (4), delete b (5), a=3 (6), c=1 (7).
async fn history(b: &dyn Backend) {
    put(b, "a", "1").await;
    put(b, "b", "1").await;
    put(b, "a", "2").await;
    delete(b, single("b")).await;
    put(b, "a", "3").await;
    put(b, "c", "1").await;
    assert_eq!(rev(b).await, 7);
}

pub async fn reads_below_compaction_fail<H: Harness>(h: H) {
    let b = h.open().await;
    history(&*b).await;
    b.compact(4, true).await.unwrap();
    for r in [1, 2, 3] {
        assert_err(get_all_at(&*b, r).await, BackendError::Compacted { compact_revision: 4 }, &format!("read at {r} after compacting at 4"));
    }
    assert_err(
        b.range(RangeRequest { range: single("a"), revision: 3, count_only: true, ..RangeRequest::default() }).await,
        BackendError::Compacted { compact_revision: 4 },
        "a count_only read below the compaction point",
    );
    assert_eq!(keys(&get_all_at(&*b, 0).await.unwrap()), ["a", "c"], "the latest read still works");
}

pub async fn read_at_compaction_point<H: Harness>(h: H) {
    let b = h.open().await;
    history(&*b).await;
    b.compact(4, true).await.unwrap();
    assert_eq!(
        get_all_at(&*b, 4).await.unwrap(),
        vec![kv("a", "2", 2, 4, 2, 0), kv("b", "1", 3, 3, 1, 0)],
        "reads at the compact revision itself work, as in etcd"
    );
    assert_eq!(get_all_at(&*b, 5).await.unwrap(), vec![kv("a", "2", 2, 4, 2, 0)], "reads above it work");
    assert_eq!(get_all_at(&*b, 6).await.unwrap(), vec![kv("a", "3", 2, 6, 3, 0)]);
}

pub async fn compact_twice_fails<H: Harness>(h: H) {
    let b = h.open().await;
    history(&*b).await;
    b.compact(4, true).await.unwrap();
    assert_err(b.compact(4, true).await, BackendError::Compacted { compact_revision: 4 }, "compacting at the same revision again");
    assert_err(b.compact(3, true).await, BackendError::Compacted { compact_revision: 4 }, "compacting below the compaction point");
    b.compact(6, false).await.unwrap();
    assert_eq!(b.current_revision().await.unwrap(), (7, 6), "a later compaction moves the point");
    assert_err(get_all_at(&*b, 5).await, BackendError::Compacted { compact_revision: 6 }, "reads below the new point");
}

pub async fn compact_future_fails<H: Harness>(h: H) {
    let b = h.open().await;
    history(&*b).await;
    assert_err(b.compact(8, true).await, BackendError::FutureRevision, "compacting above the current revision");
    assert_eq!(b.current_revision().await.unwrap(), (7, 0), "the failed compaction changed nothing");
    b.compact(7, true).await.unwrap();
    assert_eq!(b.current_revision().await.unwrap(), (7, 7), "compacting at the current revision");
}

pub async fn compact_keeps_revision<H: Harness>(h: H) {
    let b = h.open().await;
    history(&*b).await;
    let resp = b.compact(5, true).await.unwrap();
    assert_eq!(resp.revision, 7, "the compact response carries the current revision");
    assert_eq!(b.current_revision().await.unwrap(), (7, 5), "compaction does not advance the revision");
    let st = b.status().await.unwrap();
    assert_eq!((st.revision, st.compact_revision), (7, 5));
    assert_eq!(put(&*b, "d", "1").await, 8, "the next write takes the next revision");
}

pub async fn compact_keeps_latest_versions<H: Harness>(h: H) {
    let b = h.open().await;
    history(&*b).await;
    let before = get_all(&*b).await;
    b.compact(7, true).await.unwrap();
    assert_eq!(get_all(&*b).await, before, "compaction keeps every live key with its create_revision and version");
    assert_eq!(get(&*b, "b").await, None, "a key deleted before the compaction stays deleted");
    put(&*b, "a", "4").await; // 8
    put(&*b, "b", "2").await; // 9
    assert_eq!(get(&*b, "a").await, Some(kv("a", "4", 2, 8, 4, 0)), "versions go on after compaction");
    assert_eq!(get(&*b, "b").await, Some(kv("b", "2", 9, 9, 1, 0)), "a key deleted before compaction is recreated afresh");
}

pub async fn txn_range_below_compaction_fails<H: Harness>(h: H) {
    let b = h.open().await;
    history(&*b).await;
    b.compact(5, true).await.unwrap();
    let r = b.txn(TxnRequest::unconditional(vec![put_op("x", "1"), RequestOp::Range(RangeRequest { range: all(), revision: 4, ..RangeRequest::default() })])).await;
    assert_err(r, BackendError::Compacted { compact_revision: 5 }, "a txn's range below the compaction point");
    assert_eq!(get(&*b, "x").await, None, "the failed txn has no effect");
    assert_eq!(rev(&*b).await, 7);
}

pub async fn hash_kv<H: Harness>(h: H) {
    let b = h.open().await;
    history(&*b).await;
    let h7 = b.hash_kv(0).await.unwrap();
    assert_eq!((h7.hash_revision, h7.revision, h7.compact_revision), (7, 7, 0), "hash of the current revision");
    assert_eq!(b.hash_kv(7).await.unwrap(), h7, "the same revision hashes the same");
    let h5 = b.hash_kv(5).await.unwrap();
    assert_ne!(h5.hash, h7.hash, "different revisions hash differently");
    put(&*b, "d", "1").await;
    let later = b.hash_kv(7).await.unwrap();
    assert_eq!((later.hash, later.revision), (h7.hash, 8), "later writes do not change the hash of an older revision");
    assert_ne!(b.hash_kv(0).await.unwrap().hash, h7.hash, "a write changes the current hash");
    assert_err(b.hash_kv(9).await, BackendError::FutureRevision, "hash of a future revision");
    b.compact(5, true).await.unwrap();
    assert_err(b.hash_kv(4).await, BackendError::Compacted { compact_revision: 5 }, "hash below the compaction point");
    let after = b.hash_kv(8).await.unwrap();
    assert_eq!(after.compact_revision, 5);
    assert_eq!(b.hash_kv(8).await.unwrap(), after, "hashing is deterministic after compaction");
}

pub async fn status_and_defragment<H: Harness>(h: H) {
    let b = h.open().await;
    history(&*b).await;
    b.compact(5, true).await.unwrap();
    let st = b.status().await.unwrap();
    assert_eq!((st.revision, st.compact_revision), (7, 5));
    assert!(st.db_size >= 0 && st.db_size_in_use >= 0, "sizes: {st:?}");
    let before = get_all(&*b).await;
    b.defragment().await.expect("defragment");
    assert_eq!(get_all(&*b).await, before, "defragmenting keeps the data");
    assert_eq!(b.current_revision().await.unwrap(), (7, 5), "and the revisions");
    assert_eq!(get_all_at(&*b, 5).await.unwrap(), vec![kv("a", "2", 2, 4, 2, 0)], "and the history above the compaction point");
}
