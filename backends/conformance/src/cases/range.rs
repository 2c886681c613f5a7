//! Range reads: key intervals, revisions, limit/count, sort, filters.

use cairn_backend::*;

use crate::util::*;
use crate::Harness;

fn req(range: KeyRange) -> RangeRequest {
    RangeRequest { range, ..RangeRequest::default() }
}

/// Puts a, b, c, d with values 1..4 at revisions 2..5.
async fn abcd(b: &dyn Backend) {
    for (i, k) in ["a", "b", "c", "d"].iter().enumerate() {
        assert_eq!(put(b, k, &(i + 1).to_string()).await, i as i64 + 2);
    }
}

pub async fn single_key<H: Harness>(h: H) {
    let b = h.open().await;
    put(&*b, "a", "1").await;
    put(&*b, "b", "2").await;
    let resp = range(&*b, req(single("a"))).await;
    assert_eq!(resp.kvs, vec![kv("a", "1", 2, 2, 1, 0)], "single key");
    assert_eq!((resp.count, resp.more, resp.revision), (1, false, 3), "count, more, header revision");
    let resp = range(&*b, req(single("ab"))).await;
    assert!(resp.kvs.is_empty(), "a missing key returns nothing (not a prefix match)");
    assert_eq!(resp.count, 0);
}

pub async fn interval<H: Harness>(h: H) {
    let b = h.open().await;
    abcd(&*b).await;
    let resp = range(&*b, req(span("b", "d"))).await;
    assert_eq!(keys(&resp.kvs), ["b", "c"], "[b, d) is half-open");
    assert_eq!(resp.count, 2);
    let resp = range(&*b, req(span("bb", "cc"))).await;
    assert_eq!(keys(&resp.kvs), ["c"], "bounds need not be keys");
    let resp = range(&*b, req(span("x", "z"))).await;
    assert!(resp.kvs.is_empty() && resp.count == 0, "an empty interval");
}

pub async fn inverted_interval_is_empty<H: Harness>(h: H) {
    let b = h.open().await;
    abcd(&*b).await;
    // etcd 3.4.23: `get d b` returns no kvs and no error.
    let resp = range(&*b, req(span("d", "b"))).await;
    assert!(resp.kvs.is_empty() && resp.count == 0, "range_end < key selects nothing: {resp:?}");
    let resp = range(&*b, req(span("b", "b"))).await;
    assert!(resp.kvs.is_empty() && resp.count == 0, "range_end == key selects nothing: {resp:?}");
}

pub async fn prefix<H: Harness>(h: H) {
    let b = h.open().await;
    for k in ["p", "p/1", "p/2", "p0", "q"] {
        put(&*b, k, "v").await;
    }
    let resp = range(&*b, req(KeyRange::prefix(bytes("p/")))).await;
    assert_eq!(keys(&resp.kvs), ["p/1", "p/2"], "prefix p/");
    assert_eq!(resp.count, 2);
    let resp = range(&*b, req(KeyRange::prefix(bytes("p")))).await;
    assert_eq!(keys(&resp.kvs), ["p", "p/1", "p/2", "p0"], "prefix p");
}

pub async fn from_key<H: Harness>(h: H) {
    let b = h.open().await;
    abcd(&*b).await;
    let resp = range(&*b, req(KeyRange::new(bytes("b"), vec![0]))).await;
    assert_eq!(keys(&resp.kvs), ["b", "c", "d"], "range_end [0] means every key >= key");
    assert_eq!(resp.count, 3);
    let resp = range(&*b, req(KeyRange::new(bytes("bb"), vec![0]))).await;
    assert_eq!(keys(&resp.kvs), ["c", "d"]);
}

pub async fn all_keys<H: Harness>(h: H) {
    let b = h.open().await;
    abcd(&*b).await;
    put(&*b, "\u{0}x", "zero").await;
    put(&*b, "\u{7f}", "high").await;
    let resp = range(&*b, req(all())).await;
    assert_eq!(keys(&resp.kvs), ["\u{0}x", "a", "b", "c", "d", "\u{7f}"], "key [0] with range_end [0] is every key");
    assert_eq!(resp.count, 6);
}

pub async fn at_revision<H: Harness>(h: H) {
    let b = h.open().await;
    put(&*b, "a", "1").await; // 2
    put(&*b, "a", "2").await; // 3
    put(&*b, "b", "1").await; // 4
    delete(&*b, single("a")).await; // 5
    put(&*b, "c", "1").await; // 6
    let at = |rev| RangeRequest { range: all(), revision: rev, ..RangeRequest::default() };
    let expect: [(Revision, Vec<KeyValue>); 6] = [
        (1, vec![]),
        (2, vec![kv("a", "1", 2, 2, 1, 0)]),
        (3, vec![kv("a", "2", 2, 3, 2, 0)]),
        (4, vec![kv("a", "2", 2, 3, 2, 0), kv("b", "1", 4, 4, 1, 0)]),
        (5, vec![kv("b", "1", 4, 4, 1, 0)]),
        (6, vec![kv("b", "1", 4, 4, 1, 0), kv("c", "1", 6, 6, 1, 0)]),
    ];
    for (rev, kvs) in expect {
        let resp = range(&*b, at(rev)).await;
        assert_eq!(resp.kvs, kvs, "all keys at revision {rev}");
        assert_eq!(resp.count, kvs.len() as i64, "count at revision {rev}");
        assert_eq!(resp.revision, 6, "the header revision is the current one, not the read revision");
    }
    let resp = range(&*b, RangeRequest { range: single("a"), revision: 3, ..RangeRequest::default() }).await;
    assert_eq!(resp.kvs, vec![kv("a", "2", 2, 3, 2, 0)], "a deleted key is visible at an older revision");
    let resp = range(&*b, RangeRequest { range: all(), revision: 0, ..RangeRequest::default() }).await;
    assert_eq!(keys(&resp.kvs), ["b", "c"], "revision 0 reads the latest");
}

pub async fn limit_and_more<H: Harness>(h: H) {
    let b = h.open().await;
    abcd(&*b).await;
    let lim = |limit| RangeRequest { range: all(), limit, ..RangeRequest::default() };
    let resp = range(&*b, lim(2)).await;
    assert_eq!(keys(&resp.kvs), ["a", "b"], "limit 2");
    assert!(resp.more, "more is set when keys were left out");
    assert_eq!(resp.count, 4, "count ignores the limit");
    for limit in [4, 10, 0] {
        let resp = range(&*b, lim(limit)).await;
        assert_eq!(keys(&resp.kvs), ["a", "b", "c", "d"], "limit {limit}");
        assert!(!resp.more, "more is clear at limit {limit}");
        assert_eq!(resp.count, 4);
    }
    let resp = range(&*b, RangeRequest { range: all(), limit: 1, revision: 3, ..RangeRequest::default() }).await;
    assert_eq!((keys(&resp.kvs), resp.more, resp.count), (vec!["a".to_string()], true, 2), "limit at an old revision");
}

pub async fn count_only<H: Harness>(h: H) {
    let b = h.open().await;
    abcd(&*b).await;
    let resp = range(&*b, RangeRequest { range: all(), count_only: true, ..RangeRequest::default() }).await;
    assert!(resp.kvs.is_empty(), "count_only returns no kvs");
    assert_eq!((resp.count, resp.more), (4, false));
    let resp = range(&*b, RangeRequest { range: all(), count_only: true, limit: 1, ..RangeRequest::default() }).await;
    assert_eq!((resp.kvs.len(), resp.count, resp.more), (0, 4, false), "count_only with a limit");
    let resp = range(&*b, RangeRequest { range: all(), count_only: true, revision: 3, ..RangeRequest::default() }).await;
    assert_eq!(resp.count, 2, "count_only at an old revision");
}

pub async fn keys_only<H: Harness>(h: H) {
    let b = h.open().await;
    abcd(&*b).await;
    let resp = range(&*b, RangeRequest { range: span("a", "c"), keys_only: true, ..RangeRequest::default() }).await;
    assert_eq!(resp.kvs, vec![kv("a", "", 2, 2, 1, 0), kv("b", "", 3, 3, 1, 0)], "keys_only empties values only");
    assert_eq!(resp.count, 2);
}

/// Keys a, b, c with every sort target giving a different order:
/// create a(2) c(3) bytes(5); mod bytes(5) a(6) c(7); version bytes(1) c(2) a(3); value c("1") a("2") bytes("3").
async fn sort_fixture(b: &dyn Backend) {
    for (k, v) in [("a", "x"), ("c", "x"), ("a", "x"), ("b", "3"), ("a", "2"), ("c", "1")] {
        put(b, k, v).await;
    }
    let all = get_all(b).await;
    assert_eq!(
        all,
        vec![kv("a", "2", 2, 6, 3, 0), kv("b", "3", 5, 5, 1, 0), kv("c", "1", 3, 7, 2, 0)],
        "sort fixture"
    );
}

pub async fn sort_orders<H: Harness>(h: H) {
    use SortOrder::*;
    use SortTarget::*;
    let b = h.open().await;
    sort_fixture(&*b).await;
    let cases = [
        (None, Key, "abc"),
        (Ascend, Key, "abc"),
        (Descend, Key, "cba"),
        // etcd: a target other than KEY with order NONE sorts ascending.
        (None, Version, "bca"),
        (Ascend, Version, "bca"),
        (Descend, Version, "acb"),
        (None, Create, "acb"),
        (Ascend, Create, "acb"),
        (Descend, Create, "bca"),
        (None, Mod, "bac"),
        (Ascend, Mod, "bac"),
        (Descend, Mod, "cab"),
        (None, Value, "cab"),
        (Ascend, Value, "cab"),
        (Descend, Value, "bac"),
    ];
    for (order, target, want) in cases {
        let resp = range(&*b, RangeRequest { range: all(), sort_order: order, sort_target: target, ..RangeRequest::default() }).await;
        assert_eq!(keys(&resp.kvs).concat(), want, "sort {order:?} by {target:?}");
        assert_eq!(resp.count, 3);
    }
}

pub async fn sort_then_limit<H: Harness>(h: H) {
    use SortOrder::*;
    use SortTarget::*;
    let b = h.open().await;
    sort_fixture(&*b).await;
    for (order, target, want) in [(Descend, Key, "cb"), (Ascend, Mod, "ba"), (None, Version, "bc"), (Descend, Value, "ba")] {
        let resp = range(
            &*b,
            RangeRequest { range: all(), sort_order: order, sort_target: target, limit: 2, ..RangeRequest::default() },
        )
        .await;
        assert_eq!(keys(&resp.kvs).concat(), want, "limit applies after sorting {order:?} by {target:?}");
        assert!(resp.more);
        assert_eq!(resp.count, 3);
    }
}

pub async fn revision_filters<H: Harness>(h: H) {
    let b = h.open().await;
    sort_fixture(&*b).await; // create a2 c3 b5; mod b5 a6 c7
    let filt = |f: fn(&mut RangeRequest)| {
        let mut r = RangeRequest { range: all(), ..RangeRequest::default() };
        f(&mut r);
        r
    };
    let cases: [(&str, RangeRequest, &str); 6] = [
        ("min_mod 6", filt(|r| r.min_mod_revision = 6), "ac"),
        ("max_mod 6", filt(|r| r.max_mod_revision = 6), "ab"),
        ("min_create 3", filt(|r| r.min_create_revision = 3), "bc"),
        ("max_create 3", filt(|r| r.max_create_revision = 3), "ac"),
        ("mod in [6, 6]", filt(|r| (r.min_mod_revision, r.max_mod_revision) = (6, 6)), "a"),
        ("min_create 3, max_mod 5, limit 1", filt(|r| (r.min_create_revision, r.max_mod_revision, r.limit) = (3, 5, 1)), "b"),
    ];
    for (what, req, want) in cases {
        let resp = range(&*b, req).await;
        assert_eq!(keys(&resp.kvs).concat(), want, "filter {what}");
        assert_eq!(resp.count, 3, "count is taken before the filters ({what})");
    }
    let resp = range(&*b, filt(|r| (r.min_mod_revision, r.limit) = (5, 1))).await;
    assert_eq!((keys(&resp.kvs).concat(), resp.more), ("a".to_string(), true), "filter, then limit and more");
}

pub async fn future_revision<H: Harness>(h: H) {
    let b = h.open().await;
    put(&*b, "a", "1").await;
    let at = |revision| RangeRequest { range: all(), revision, ..RangeRequest::default() };
    assert_eq!(range(&*b, at(2)).await.kvs.len(), 1, "the current revision is readable");
    assert_err(b.range(at(3)).await, BackendError::FutureRevision, "a read above the current revision");
    assert_err(b.range(at(100)).await, BackendError::FutureRevision, "a read far above the current revision");
}
