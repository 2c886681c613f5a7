//! etcd's checks on incoming KV requests (etcd's `v3rpc/key.go`), run before anything reaches
//! a backend: empty keys, ignore_value/ignore_lease misuse, sort options, the txn op limit,
//! and the rule that one txn may not write a key twice (puts against puts and deletes,
//! nested txns included).

use std::collections::HashSet;

use cairn_proto::etcdserverpb::{
    range_request, request_op::Request, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};

use crate::errors::ApiError;

pub fn check_range(r: &RangeRequest) -> Result<(), ApiError> {
    if r.key.is_empty() {
        return Err(ApiError::KeyNotProvided);
    }
    let order_ok = range_request::SortOrder::try_from(r.sort_order).is_ok();
    let target_ok = range_request::SortTarget::try_from(r.sort_target).is_ok();
    if !order_ok || !target_ok {
        return Err(ApiError::InvalidSortOption);
    }
    Ok(())
}

pub fn check_put(r: &PutRequest) -> Result<(), ApiError> {
    if r.key.is_empty() {
        return Err(ApiError::KeyNotProvided);
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(ApiError::ValueProvided);
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(ApiError::LeaseProvided);
    }
    Ok(())
}

pub fn check_delete(r: &DeleteRangeRequest) -> Result<(), ApiError> {
    if r.key.is_empty() {
        return Err(ApiError::KeyNotProvided);
    }
    Ok(())
}

/// The full check of a Txn request: shape (op counts, keys, nested ops), then the
/// duplicate-write rule on each branch.
pub fn check_txn(r: &TxnRequest, max_txn_ops: usize) -> Result<(), ApiError> {
    check_txn_shape(r, max_txn_ops as i64)?;
    check_intervals(&r.success)?;
    check_intervals(&r.failure)?;
    Ok(())
}

/// etcd counts the larger of compares, success ops and failure ops against the limit; a
/// nested txn gets what the outer one left over.
fn check_txn_shape(r: &TxnRequest, max_txn_ops: i64) -> Result<(), ApiError> {
    let opc = r.compare.len().max(r.success.len()).max(r.failure.len()) as i64;
    if opc > max_txn_ops {
        return Err(ApiError::TooManyOps);
    }
    if r.compare.iter().any(|c| c.key.is_empty()) {
        return Err(ApiError::KeyNotProvided);
    }
    for op in r.success.iter().chain(&r.failure) {
        check_request_op(op, max_txn_ops - opc)?;
    }
    Ok(())
}

fn check_request_op(op: &RequestOp, max_txn_ops: i64) -> Result<(), ApiError> {
    match &op.request {
        Some(Request::RequestRange(r)) => check_range(r),
        Some(Request::RequestPut(r)) => check_put(r),
        Some(Request::RequestDeleteRange(r)) => check_delete(r),
        Some(Request::RequestTxn(t)) => check_txn_shape(t, max_txn_ops),
        None => Err(ApiError::KeyNotFound),
    }
}

/// A deleted interval as etcd's interval tree sees it: a point when `end` is empty,
/// otherwise `[key, end)` compared bytewise (so an `end` of `"\0"` covers nothing, as in etcd).
struct DelInterval {
    key: Vec<u8>,
    end: Vec<u8>,
}

impl DelInterval {
    fn covers(&self, k: &[u8]) -> bool {
        if self.end.is_empty() {
            self.key == k
        } else {
            self.key.as_slice() <= k && k < self.end.as_slice()
        }
    }
}

fn deleted(dels: &[DelInterval], k: &[u8]) -> bool {
    dels.iter().any(|d| d.covers(k))
}

/// The keys put and the intervals deleted by one branch; errors when a key is written twice.
fn check_intervals(ops: &[RequestOp]) -> Result<(HashSet<Vec<u8>>, Vec<DelInterval>), ApiError> {
    let mut dels: Vec<DelInterval> = ops
        .iter()
        .filter_map(|op| match &op.request {
            Some(Request::RequestDeleteRange(d)) => Some(DelInterval { key: d.key.clone(), end: d.range_end.clone() }),
            _ => None,
        })
        .collect();
    let mut puts: HashSet<Vec<u8>> = HashSet::new();
    for op in ops {
        let Some(Request::RequestTxn(t)) = &op.request else { continue };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || deleted(&dels, k) {
                return Err(ApiError::DuplicateKey);
            }
        }
        puts.extend(puts_then.iter().cloned());
        // The two branches of a nested txn never both run, so they may write the same key.
        for k in puts_else {
            if (puts.contains(&k) && !puts_then.contains(&k)) || deleted(&dels, &k) {
                return Err(ApiError::DuplicateKey);
            }
            puts.insert(k);
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in ops {
        let Some(Request::RequestPut(p)) = &op.request else { continue };
        if puts.contains(&p.key) || deleted(&dels, &p.key) {
            return Err(ApiError::DuplicateKey);
        }
        puts.insert(p.key.clone());
    }
    Ok((puts, dels))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str) -> RequestOp {
        RequestOp { request: Some(Request::RequestPut(PutRequest { key: k.into(), ..Default::default() })) }
    }

    fn del(k: &str, end: &str) -> RequestOp {
        let d = DeleteRangeRequest { key: k.into(), range_end: end.into(), ..Default::default() };
        RequestOp { request: Some(Request::RequestDeleteRange(d)) }
    }

    fn get(k: &str) -> RequestOp {
        RequestOp { request: Some(Request::RequestRange(RangeRequest { key: k.into(), ..Default::default() })) }
    }

    fn nested(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> RequestOp {
        RequestOp { request: Some(Request::RequestTxn(TxnRequest { compare: vec![], success, failure })) }
    }

    fn txn(success: Vec<RequestOp>) -> TxnRequest {
        TxnRequest { compare: vec![], success, failure: vec![] }
    }

    #[test]
    fn empty_keys_and_flags() {
        assert_eq!(check_range(&RangeRequest::default()), Err(ApiError::KeyNotProvided));
        assert_eq!(check_delete(&DeleteRangeRequest::default()), Err(ApiError::KeyNotProvided));
        let p = PutRequest { key: b"k".to_vec(), value: b"v".to_vec(), ignore_value: true, ..Default::default() };
        assert_eq!(check_put(&p), Err(ApiError::ValueProvided));
        let p = PutRequest { key: b"k".to_vec(), lease: 5, ignore_lease: true, ..Default::default() };
        assert_eq!(check_put(&p), Err(ApiError::LeaseProvided));
    }

    #[test]
    fn sort_options_out_of_range() {
        let r = RangeRequest { key: b"k".to_vec(), sort_order: 3, ..Default::default() };
        assert_eq!(check_range(&r), Err(ApiError::InvalidSortOption));
        let r = RangeRequest { key: b"k".to_vec(), sort_target: 5, ..Default::default() };
        assert_eq!(check_range(&r), Err(ApiError::InvalidSortOption));
    }

    #[test]
    fn too_many_ops_counts_the_largest_list() {
        let ops: Vec<RequestOp> = (0..3).map(|i| put(&format!("k{i}"))).collect();
        assert_eq!(check_txn(&txn(ops.clone()), 3), Ok(()));
        assert_eq!(check_txn(&txn(ops), 2), Err(ApiError::TooManyOps));
    }

    #[test]
    fn nested_txn_gets_the_remaining_budget() {
        let inner = nested(vec![put("a"), put("b")], vec![]);
        assert_eq!(check_txn(&txn(vec![inner.clone()]), 3), Ok(()));
        assert_eq!(check_txn(&txn(vec![inner]), 2), Err(ApiError::TooManyOps));
    }

    #[test]
    fn missing_request_in_op_is_key_not_found() {
        let t = txn(vec![RequestOp { request: None }]);
        assert_eq!(check_txn(&t, 128), Err(ApiError::KeyNotFound));
    }

    #[test]
    fn duplicate_puts_and_put_over_delete() {
        assert_eq!(check_txn(&txn(vec![put("a"), put("a")]), 128), Err(ApiError::DuplicateKey));
        assert_eq!(check_txn(&txn(vec![del("a", "c"), put("b")]), 128), Err(ApiError::DuplicateKey));
        assert_eq!(check_txn(&txn(vec![del("a", ""), put("a")]), 128), Err(ApiError::DuplicateKey));
        assert_eq!(check_txn(&txn(vec![del("a", "b"), put("b")]), 128), Ok(()));
        assert_eq!(check_txn(&txn(vec![get("a"), put("a"), del("x", "")]), 128), Ok(()));
    }

    #[test]
    fn from_key_delete_is_not_checked_like_etcd() {
        assert_eq!(check_txn(&txn(vec![del("a", "\0"), put("b")]), 128), Ok(()));
    }

    #[test]
    fn nested_branches_may_share_keys_but_not_with_outer_writes() {
        let both = nested(vec![put("a")], vec![put("a")]);
        assert_eq!(check_txn(&txn(vec![both]), 128), Ok(()));
        let t = txn(vec![nested(vec![put("a")], vec![]), put("a")]);
        assert_eq!(check_txn(&t, 128), Err(ApiError::DuplicateKey));
        let t = txn(vec![nested(vec![del("a", "z")], vec![]), put("b")]);
        assert_eq!(check_txn(&t, 128), Err(ApiError::DuplicateKey));
        let t = txn(vec![del("a", "z"), nested(vec![], vec![put("b")])]);
        assert_eq!(check_txn(&t, 128), Err(ApiError::DuplicateKey));
    }

    #[test]
    fn empty_compare_key() {
        let mut t = txn(vec![]);
        t.compare.push(Default::default());
        assert_eq!(check_txn(&t, 128), Err(ApiError::KeyNotProvided));
    }
}
