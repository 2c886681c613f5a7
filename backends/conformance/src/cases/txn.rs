//! Txns: compares, branches, nesting, revisions and versions of writes, lease and ignore_*
//! rules.

use cairn_backend::*;

use crate::util::*;
use crate::Harness;

use CompareResult::{Equal, Greater, Less, NotEqual};

/// Whether a read-only txn with `compare` takes its success branch.
async fn holds(b: &dyn Backend, compare: Vec<Compare>) -> bool {
    txn(b, TxnRequest { compare, success: vec![], failure: vec![] }).await.succeeded
}

fn put_resp(r: &ResponseOp) -> &PutResponse {
    match r {
        ResponseOp::Put(p) => p,
        other => panic!("expected a put response, got {other:?}"),
    }
}

fn range_resp(r: &ResponseOp) -> &RangeResponse {
    match r {
        ResponseOp::Range(p) => p,
        other => panic!("expected a range response, got {other:?}"),
    }
}

fn del_resp(r: &ResponseOp) -> &DeleteRangeResponse {
    match r {
        ResponseOp::DeleteRange(p) => p,
        other => panic!("expected a delete response, got {other:?}"),
    }
}

fn txn_resp(r: &ResponseOp) -> &TxnResponse {
    match r {
        ResponseOp::Txn(p) => p,
        other => panic!("expected a txn response, got {other:?}"),
    }
}

pub async fn compare_every_target_and_result<H: Harness>(h: H) {
    let b = h.open().await;
    let lease = b.lease_grant(0, 600).await.unwrap().id;
    put(&*b, "other", "x").await; // 2
    put(&*b, "k", "m").await; // 3
    put(&*b, "other", "y").await; // 4
    put_lease(&*b, "k", "m", lease).await; // 5: k version 2, create 3, mod 5, value "m", lease
    let k = get(&*b, "k").await.unwrap();
    assert_eq!(k, kv("k", "m", 3, 5, 2, lease));
    // For each target: an operand below, equal to and above the key's field.
    let targets: Vec<(&str, [CompareTarget; 3])> = vec![
        ("version", [CompareTarget::Version(1), CompareTarget::Version(2), CompareTarget::Version(3)]),
        ("create", [CompareTarget::Create(2), CompareTarget::Create(3), CompareTarget::Create(4)]),
        ("mod", [CompareTarget::Mod(4), CompareTarget::Mod(5), CompareTarget::Mod(6)]),
        ("value", [CompareTarget::Value(bytes("l")), CompareTarget::Value(bytes("m")), CompareTarget::Value(bytes("ma"))]),
        ("lease", [CompareTarget::Lease(lease - 1), CompareTarget::Lease(lease), CompareTarget::Lease(lease + 1)]),
    ];
    for (name, [below, equal, above]) in targets {
        // The key's field compared to the operand: greater than `below`, equal to `equal`, less
        // than `above`.
        let table = [
            (&below, [false, true, false, true]),
            (&equal, [true, false, false, false]),
            (&above, [false, false, true, true]),
        ];
        for (operand, want) in table {
            for (result, want) in [Equal, Greater, Less, NotEqual].into_iter().zip(want) {
                let c = cmp("k", result, operand.clone());
                assert_eq!(holds(&*b, vec![c.clone()]).await, want, "{name}: {c:?}");
            }
        }
    }
    assert!(holds(&*b, vec![cmp("k", Equal, CompareTarget::Version(2)), cmp("k", Equal, CompareTarget::Value(bytes("m")))]).await, "all compares hold");
    assert!(!holds(&*b, vec![cmp("k", Equal, CompareTarget::Version(2)), cmp("k", Equal, CompareTarget::Value(bytes("n")))]).await, "one compare fails");
    assert_eq!(rev(&*b).await, 5, "read-only txns do not advance the revision");
}

pub async fn compare_missing_key<H: Harness>(h: H) {
    let b = h.open().await;
    put(&*b, "present", "v").await;
    // A missing key compares as a zero KeyValue...
    for target in [CompareTarget::Version(0), CompareTarget::Create(0), CompareTarget::Mod(0), CompareTarget::Lease(0)] {
        assert!(holds(&*b, vec![cmp("missing", Equal, target.clone())]).await, "missing key: {target:?} == 0");
        assert!(!holds(&*b, vec![cmp("missing", Greater, target.clone())]).await, "missing key: {target:?} > 0 is false");
    }
    assert!(holds(&*b, vec![cmp("missing", Less, CompareTarget::Version(1))]).await, "missing key: version < 1");
    assert!(holds(&*b, vec![cmp("missing", NotEqual, CompareTarget::Mod(5))]).await, "missing key: mod != 5");
    // ...except that a value compare on a missing key is always false (etcd 3.4.23).
    for result in [Equal, Greater, Less, NotEqual] {
        for value in ["", "x"] {
            let c = cmp("missing", result, CompareTarget::Value(bytes(value)));
            assert!(!holds(&*b, vec![c.clone()]).await, "a value compare on a missing key is false: {c:?}");
        }
    }
}

pub async fn compare_range<H: Harness>(h: H) {
    let b = h.open().await;
    put(&*b, "r/a", "1").await; // 2
    put(&*b, "r/b", "1").await; // 3
    put(&*b, "r/b", "2").await; // 4: r/b version 2
    put(&*b, "s", "1").await; // 5
    let rc = |result, target| Compare { result, target, range: KeyRange::prefix(bytes("r/")) };
    assert!(holds(&*b, vec![rc(Greater, CompareTarget::Version(0))]).await, "every key in the range has version > 0");
    assert!(!holds(&*b, vec![rc(Equal, CompareTarget::Version(1))]).await, "one key in the range has version 2");
    assert!(holds(&*b, vec![rc(Less, CompareTarget::Mod(5))]).await, "every key modified before 5");
    assert!(!holds(&*b, vec![rc(Less, CompareTarget::Mod(4))]).await, "r/b was modified at 4");
    assert!(holds(&*b, vec![rc(NotEqual, CompareTarget::Value(bytes("3")))]).await, "no key has value 3");
    assert!(!holds(&*b, vec![rc(Equal, CompareTarget::Value(bytes("1")))]).await, "r/b has value 2");
    let from_key = Compare { result: Less, target: CompareTarget::Create(6), range: KeyRange::new(bytes("r/b"), vec![0]) };
    assert!(holds(&*b, vec![from_key]).await, "a from-key range compare");
    // A range with no keys compares as one zero KeyValue (and value compares fail).
    let empty = |result, target| Compare { result, target, range: KeyRange::prefix(bytes("t/")) };
    assert!(holds(&*b, vec![empty(Equal, CompareTarget::Version(0))]).await, "an empty range: version == 0");
    assert!(!holds(&*b, vec![empty(NotEqual, CompareTarget::Value(bytes("x")))]).await, "an empty range: value compares fail");
}

pub async fn success_and_failure_branches<H: Harness>(h: H) {
    let b = h.open().await;
    put(&*b, "k", "1").await; // 2
    let branchy = |expect: &str| TxnRequest {
        compare: vec![cmp("k", Equal, CompareTarget::Value(bytes(expect)))],
        success: vec![put_op("k", "ok"), get_op(single("k"))],
        failure: vec![put_op("failed", "yes"), get_op(single("k")), get_op(single("failed"))],
    };
    let resp = txn(&*b, branchy("2")).await;
    assert!(!resp.succeeded, "the compare fails");
    assert_eq!(resp.responses.len(), 3, "the failure branch's responses");
    assert_eq!(put_resp(&resp.responses[0]).revision, 3);
    assert_eq!(range_resp(&resp.responses[1]).kvs, vec![kv("k", "1", 2, 2, 1, 0)]);
    assert_eq!(range_resp(&resp.responses[2]).kvs, vec![kv("failed", "yes", 3, 3, 1, 0)]);
    assert_eq!(resp.revision, 3);
    let resp = txn(&*b, branchy("1")).await;
    assert!(resp.succeeded, "the compare holds");
    assert_eq!(resp.responses.len(), 2, "the success branch's responses");
    assert_eq!(range_resp(&resp.responses[1]).kvs, vec![kv("k", "ok", 2, 4, 2, 0)]);
    assert_eq!(resp.revision, 4);
    let resp = txn(&*b, TxnRequest { compare: vec![cmp("k", Equal, CompareTarget::Version(9))], success: vec![put_op("x", "1")], failure: vec![] }).await;
    assert!(!resp.succeeded && resp.responses.is_empty(), "an empty failure branch");
    assert_eq!((resp.revision, rev(&*b).await), (4, 4), "an empty branch writes nothing");
    assert_eq!(get(&*b, "x").await, None);
}

pub async fn nested_txn<H: Harness>(h: H) {
    let b = h.open().await;
    put(&*b, "k", "1").await; // 2
    let inner = |value: &str, key: &str| {
        RequestOp::Txn(TxnRequest {
            compare: vec![cmp("k", Equal, CompareTarget::Value(bytes(value)))],
            success: vec![put_op(key, "success")],
            failure: vec![put_op(key, "failure"), get_op(single("outer"))],
        })
    };
    let resp = txn(&*b, TxnRequest { compare: vec![], success: vec![put_op("outer", "1"), inner("1", "i1"), inner("2", "i2")], failure: vec![] }).await;
    assert!(resp.succeeded);
    assert_eq!(resp.revision, 3, "nested writes share the outer txn's revision");
    let first = txn_resp(&resp.responses[1]);
    assert!(first.succeeded, "the first nested compare holds");
    assert_eq!(put_resp(&first.responses[0]).revision, 3);
    let second = txn_resp(&resp.responses[2]);
    assert!(!second.succeeded, "the second nested compare fails");
    assert_eq!(range_resp(&second.responses[1]).kvs, vec![kv("outer", "1", 3, 3, 1, 0)], "a nested read sees the outer txn's earlier write");
    assert_eq!(get(&*b, "i1").await, Some(kv("i1", "success", 3, 3, 1, 0)));
    assert_eq!(get(&*b, "i2").await, Some(kv("i2", "failure", 3, 3, 1, 0)));
    assert_eq!(rev(&*b).await, 3);
    let resp = txn(
        &*b,
        TxnRequest {
            compare: vec![cmp("k", Equal, CompareTarget::Version(5))],
            success: vec![],
            failure: vec![RequestOp::Txn(TxnRequest { compare: vec![], success: vec![get_op(single("k"))], failure: vec![] })],
        },
    )
    .await;
    assert!(!resp.succeeded);
    assert_eq!(range_resp(&txn_resp(&resp.responses[0]).responses[0]).kvs.len(), 1, "a nested txn in the failure branch");
    assert_eq!(rev(&*b).await, 3, "a nested read-only txn writes nothing");
}

pub async fn nested_compare_sees_state_before_txn<H: Harness>(h: H) {
    let b = h.open().await;
    // etcd evaluates every compare on the path, nested ones included, before running any op
    // (compareToPath); checked on etcd 3.4.23 through the JSON gateway.
    let resp = txn(
        &*b,
        TxnRequest {
            compare: vec![],
            success: vec![
                put_op("a", "1"),
                RequestOp::Txn(TxnRequest {
                    compare: vec![cmp("a", Equal, CompareTarget::Value(bytes("1")))],
                    success: vec![put_op("b", "yes")],
                    failure: vec![put_op("b", "no")],
                }),
            ],
            failure: vec![],
        },
    )
    .await;
    assert!(!txn_resp(&resp.responses[1]).succeeded, "the nested compare must not see the outer put");
    assert_eq!(get(&*b, "b").await.map(|kv| kv.value), Some(bytes("no")));
}

pub async fn reads_see_own_writes<H: Harness>(h: H) {
    let b = h.open().await;
    put(&*b, "a", "old").await; // 2
    put(&*b, "gone", "x").await; // 3
    let resp = ops(
        &*b,
        vec![
            get_op(single("a")),
            put_op("a", "new"),
            get_op(single("a")),
            del_op(single("gone")),
            get_op(all()),
            RequestOp::Range(RangeRequest { range: all(), count_only: true, ..RangeRequest::default() }),
            RequestOp::Range(RangeRequest { range: all(), revision: 3, ..RangeRequest::default() }),
        ],
    )
    .await;
    assert_eq!(resp.revision, 4);
    assert_eq!(range_resp(&resp.responses[0]).kvs, vec![kv("a", "old", 2, 2, 1, 0)], "a read before the put");
    let after = range_resp(&resp.responses[2]);
    assert_eq!(after.kvs, vec![kv("a", "new", 2, 4, 2, 0)], "a read after the put sees it");
    assert_eq!(after.revision, 4, "a read after a write in the txn reports the txn's revision");
    assert_eq!(range_resp(&resp.responses[0]).revision, 3, "a read before any write reports the previous revision");
    assert_eq!(keys(&range_resp(&resp.responses[4]).kvs), ["a"], "a read after the delete misses the deleted key");
    assert_eq!(range_resp(&resp.responses[5]).count, 1, "count sees the txn's writes");
    let old = range_resp(&resp.responses[6]);
    assert_eq!(old.kvs, vec![kv("a", "old", 2, 2, 1, 0), kv("gone", "x", 3, 3, 1, 0)], "a read at the revision before the txn ignores its writes");
}

pub async fn read_only_txn_keeps_revision<H: Harness>(h: H) {
    let b = h.open().await;
    put(&*b, "a", "1").await;
    let resp = ops(&*b, vec![get_op(single("a")), get_op(all())]).await;
    assert_eq!(resp.revision, 2);
    let resp = txn(&*b, TxnRequest::default()).await;
    assert!(resp.succeeded && resp.responses.is_empty(), "an empty txn succeeds");
    assert_eq!(resp.revision, 2);
    assert_eq!(rev(&*b).await, 2, "txns without writes keep the revision");
    assert_eq!(put(&*b, "b", "1").await, 3, "the next write takes the next revision");
}

pub async fn delete_missing_keeps_revision<H: Harness>(h: H) {
    let b = h.open().await;
    put(&*b, "a", "1").await; // 2
    let d = delete(&*b, single("missing")).await;
    assert_eq!((d.deleted, d.revision), (0, 2), "deleting a missing key deletes nothing");
    let d = delete(&*b, KeyRange::prefix(bytes("zz"))).await;
    assert_eq!((d.deleted, d.revision), (0, 2), "deleting an empty range deletes nothing");
    assert_eq!(rev(&*b).await, 2, "no revision for deletes that deleted nothing");
    assert_eq!(put(&*b, "b", "1").await, 3);
}

pub async fn puts_share_revision<H: Harness>(h: H) {
    let b = h.open().await;
    put(&*b, "x", "1").await; // 2
    let resp = ops(&*b, vec![put_op("a", "1"), put_op("b", "2"), del_op(single("x")), del_op(single("missing"))]).await;
    assert_eq!(resp.revision, 3, "one txn, one revision");
    assert_eq!(put_resp(&resp.responses[0]).revision, 3);
    assert_eq!(put_resp(&resp.responses[1]).revision, 3);
    assert_eq!(get_all(&*b).await, vec![kv("a", "1", 3, 3, 1, 0), kv("b", "2", 3, 3, 1, 0)]);
    assert_eq!(put(&*b, "c", "1").await, 4, "the next txn takes the next revision");
}

pub async fn same_value_put_bumps_version<H: Harness>(h: H) {
    let b = h.open().await;
    put(&*b, "a", "same").await;
    assert_eq!(put(&*b, "a", "same").await, 3, "putting the same value still writes");
    assert_eq!(get(&*b, "a").await, Some(kv("a", "same", 2, 3, 2, 0)));
}

pub async fn delete_then_recreate_resets<H: Harness>(h: H) {
    let b = h.open().await;
    put(&*b, "a", "1").await; // 2
    put(&*b, "a", "2").await; // 3
    assert_eq!(delete(&*b, single("a")).await.deleted, 1); // 4
    assert_eq!(get(&*b, "a").await, None);
    put(&*b, "a", "3").await; // 5
    assert_eq!(get(&*b, "a").await, Some(kv("a", "3", 5, 5, 1, 0)), "a recreated key starts over");
}

pub async fn put_without_lease_detaches<H: Harness>(h: H) {
    let b = h.open().await;
    let lease = b.lease_grant(0, 600).await.unwrap().id;
    put_lease(&*b, "a", "1", lease).await;
    assert_eq!(get(&*b, "a").await.unwrap().lease, lease);
    put(&*b, "a", "2").await;
    assert_eq!(get(&*b, "a").await.unwrap().lease, 0, "a put without a lease detaches the key");
    let info = b.lease_time_to_live(lease, true).await.unwrap();
    assert!(info.keys.is_empty(), "the lease no longer lists the key: {info:?}");
    b.lease_revoke(lease).await.unwrap();
    assert!(get(&*b, "a").await.is_some(), "revoking the old lease leaves the detached key");
}

pub async fn ignore_value_and_lease<H: Harness>(h: H) {
    let b = h.open().await;
    let lease = b.lease_grant(0, 600).await.unwrap().id;
    put_lease(&*b, "a", "keep", lease).await; // 2
    let r = put_req(&*b, PutRequest { key: bytes("a"), ignore_value: true, lease, ..PutRequest::default() }).await.unwrap();
    assert_eq!(r.revision, 3);
    assert_eq!(get(&*b, "a").await, Some(kv("a", "keep", 2, 3, 2, lease)), "ignore_value keeps the value");
    put_req(&*b, PutRequest { key: bytes("a"), value: bytes("new"), ignore_lease: true, ..PutRequest::default() }).await.unwrap();
    assert_eq!(get(&*b, "a").await, Some(kv("a", "new", 2, 4, 3, lease)), "ignore_lease keeps the lease");
    put_req(&*b, PutRequest { key: bytes("a"), ignore_value: true, ignore_lease: true, ..PutRequest::default() }).await.unwrap();
    assert_eq!(get(&*b, "a").await, Some(kv("a", "new", 2, 5, 4, lease)), "both kept, still a new version");
    put_req(&*b, PutRequest { key: bytes("a"), ignore_value: true, ..PutRequest::default() }).await.unwrap();
    assert_eq!(get(&*b, "a").await, Some(kv("a", "new", 2, 6, 5, 0)), "ignore_value alone still detaches the lease");
}

pub async fn ignore_on_missing_key_fails<H: Harness>(h: H) {
    let b = h.open().await;
    put(&*b, "a", "1").await; // 2
    let lease = b.lease_grant(0, 600).await.unwrap().id;
    for (what, req) in [
        ("ignore_value", PutRequest { key: bytes("missing"), ignore_value: true, ..PutRequest::default() }),
        ("ignore_lease", PutRequest { key: bytes("missing"), value: bytes("v"), ignore_lease: true, ..PutRequest::default() }),
        ("ignore_value with a lease", PutRequest { key: bytes("missing"), lease, ignore_value: true, ..PutRequest::default() }),
    ] {
        assert_err(put_req(&*b, req).await, BackendError::KeyNotFound, what);
    }
    let r = b
        .txn(TxnRequest::unconditional(vec![
            put_op("b", "1"),
            RequestOp::Put(PutRequest { key: bytes("missing"), ignore_value: true, ..PutRequest::default() }),
        ]))
        .await;
    assert_err(r, BackendError::KeyNotFound, "ignore_value on a missing key inside a txn");
    assert_eq!(rev(&*b).await, 2, "the failed txn has no effect");
    assert_eq!(get(&*b, "b").await, None, "the failed txn's earlier put is not applied");
    assert_eq!(get(&*b, "missing").await, None);
}

pub async fn unknown_lease_fails_without_effect<H: Harness>(h: H) {
    let b = h.open().await;
    put(&*b, "a", "1").await; // 2
    assert_err(
        put_req(&*b, PutRequest { key: bytes("x"), value: bytes("v"), lease: 12345, ..PutRequest::default() }).await,
        BackendError::LeaseNotFound,
        "a put with an unknown lease",
    );
    let r = b.txn(TxnRequest::unconditional(vec![put_op("b", "1"), del_op(single("a")), put_lease_op("c", "1", 777)])).await;
    assert_err(r, BackendError::LeaseNotFound, "an unknown lease inside a txn");
    assert_eq!(rev(&*b).await, 2, "no revision for the failed txns");
    assert_eq!(get_all(&*b).await, vec![kv("a", "1", 2, 2, 1, 0)], "the failed txns changed nothing");
    // The failure branch is the one that is checked.
    let resp = txn(&*b, TxnRequest { compare: vec![cmp("a", Equal, CompareTarget::Version(1))], success: vec![], failure: vec![put_lease_op("c", "1", 777)] }).await;
    assert!(resp.succeeded, "a bad op in the branch not taken is not run");
    assert_eq!(rev(&*b).await, 2);
}

pub async fn prev_kv<H: Harness>(h: H) {
    let b = h.open().await;
    let r = put_req(&*b, PutRequest { key: bytes("a"), value: bytes("1"), prev_kv: true, ..PutRequest::default() }).await.unwrap();
    assert_eq!(r.prev_kv, None, "no prev_kv for a new key");
    let r = put_req(&*b, PutRequest { key: bytes("a"), value: bytes("2"), prev_kv: true, ..PutRequest::default() }).await.unwrap();
    assert_eq!(r.prev_kv, Some(kv("a", "1", 2, 2, 1, 0)), "prev_kv of a put");
    let r = put_req(&*b, PutRequest { key: bytes("a"), value: bytes("3"), ..PutRequest::default() }).await.unwrap();
    assert_eq!(r.prev_kv, None, "prev_kv only when asked");
    let d = delete(&*b, single("a")).await;
    assert_eq!(d.prev_kvs, vec![kv("a", "3", 2, 4, 3, 0)], "prev_kvs of a delete");
    let resp = ops(&*b, vec![RequestOp::DeleteRange(DeleteRangeRequest { range: single("a"), prev_kv: true })]).await;
    assert!(del_resp(&resp.responses[0]).prev_kvs.is_empty(), "no prev_kvs for a missing key");
}

pub async fn delete_range<H: Harness>(h: H) {
    let b = h.open().await;
    for k in ["a", "b", "c", "d"] {
        put(&*b, k, k).await; // 2..5
    }
    let d = delete(&*b, span("b", "d")).await;
    assert_eq!((d.deleted, d.revision), (2, 6), "deletes [b, d) at one revision");
    assert_eq!(keys(&d.prev_kvs), ["b", "c"], "prev_kvs in key order");
    assert_eq!(keys(&get_all(&*b).await), ["a", "d"]);
    let d = delete(&*b, all()).await;
    assert_eq!((d.deleted, d.revision), (2, 7), "deletes every key");
    assert!(get_all(&*b).await.is_empty());
}

pub async fn range_at_past_revision<H: Harness>(h: H) {
    let b = h.open().await;
    put(&*b, "a", "1").await; // 2
    put(&*b, "a", "2").await; // 3
    let resp = ops(&*b, vec![put_op("a", "3"), RequestOp::Range(RangeRequest { range: single("a"), revision: 2, ..RangeRequest::default() })]).await;
    assert_eq!(range_resp(&resp.responses[1]).kvs, vec![kv("a", "1", 2, 2, 1, 0)], "a txn's range at a past revision");
    let resp = ops(&*b, vec![put_op("a", "4"), RequestOp::Range(RangeRequest { range: single("a"), revision: 4, ..RangeRequest::default() })]).await;
    assert_eq!(range_resp(&resp.responses[1]).kvs, vec![kv("a", "3", 2, 4, 3, 0)], "a range at the revision before the txn ignores its writes");
}

pub async fn range_at_future_revision_fails<H: Harness>(h: H) {
    let b = h.open().await;
    put(&*b, "a", "1").await; // 2
    let r = b.txn(TxnRequest::unconditional(vec![put_op("b", "1"), RequestOp::Range(RangeRequest { range: all(), revision: 4, ..RangeRequest::default() })])).await;
    assert_err(r, BackendError::FutureRevision, "a range above the current revision in a txn");
    // etcd 3.4.23 checks a txn's ranges against the revision before the txn, so even the
    // txn's own new revision is a future one.
    let r = b.txn(TxnRequest::unconditional(vec![put_op("b", "1"), RequestOp::Range(RangeRequest { range: all(), revision: 3, ..RangeRequest::default() })])).await;
    assert_err(r, BackendError::FutureRevision, "a range at the txn's own revision");
    assert_eq!(rev(&*b).await, 2, "the failed txns have no effect");
    assert_eq!(get(&*b, "b").await, None);
}
