//! etcd's transaction semantics over any store that can read and write one txn's view.
//!
//! A backend implements [`TxnView`] for its own transaction handle (a redb write txn, a SQL
//! transaction already holding the revision lock, ...) and calls [`execute`]; the rules of
//! compares, nested txns, revisions, versions, prev_kv and leases then live in one place.

use crate::error::{BackendError, Result};
use crate::model::*;
use crate::range::{fetch_limit, finish_range};

/// One open read-write transaction of a backend, positioned at the current revision.
pub trait TxnView {
    /// The revision before this txn.
    fn base_revision(&self) -> Revision;
    /// The compaction point.
    fn compact_revision(&self) -> Revision;
    /// Live kvs in `range` in key order, including writes already made through this view.
    /// Stops after `limit` kvs when given; also returns the total live count in the range.
    fn range_latest(&mut self, range: &KeyRange, limit: Option<usize>, count_only: bool) -> Result<(Vec<KeyValue>, i64)>;
    /// Live kvs in `range` as of revision `rev <= base_revision()` (at or above compaction),
    /// never including writes made through this view.
    fn range_at(&mut self, range: &KeyRange, rev: Revision, limit: Option<usize>, count_only: bool) -> Result<(Vec<KeyValue>, i64)>;
    fn lease_exists(&mut self, id: LeaseId) -> Result<bool>;
    /// Stores `kv` as the key's newest version and records a put event.
    fn put(&mut self, kv: KeyValue, prev: Option<KeyValue>) -> Result<()>;
    /// Deletes the live key `prev.key` at `rev` and records a delete event.
    fn delete(&mut self, prev: KeyValue, rev: Revision) -> Result<()>;
}

/// The single keys `req` may read at the latest revision through a view: its compares', its
/// puts' (a put reads the key's previous version), its single-key gets' and deletes', nested
/// txns' included. A backend whose reads are round trips can read them all ahead at once.
pub fn single_keys<'r>(req: &'r TxnRequest, out: &mut Vec<&'r [u8]>) {
    for c in &req.compare {
        if c.range.is_single() {
            out.push(&c.range.key);
        }
    }
    for op in req.success.iter().chain(&req.failure) {
        match op {
            RequestOp::Range(r) if r.range.is_single() && r.revision <= 0 => out.push(&r.range.key),
            RequestOp::Put(p) => out.push(&p.key),
            RequestOp::DeleteRange(d) if d.range.is_single() => out.push(&d.range.key),
            RequestOp::Txn(t) => single_keys(t, out),
            _ => {}
        }
    }
}

/// Runs `req` through `view`. Returns the response and whether anything was written (then the
/// caller commits at `view.base_revision() + 1`; otherwise it should discard the view).
pub fn execute(view: &mut impl TxnView, req: &TxnRequest) -> Result<(TxnResponse, bool)> {
    // As etcd (`compareToPath`), every compare on the taken path, nested txns included, is
    // evaluated against the state before the txn, before any op runs.
    let mut path = Vec::new();
    compare_path(view, req, &mut path)?;
    let mut st = ExecState { wrote: false, path: path.into_iter() };
    let resp = st.txn(view, req)?;
    Ok((resp, st.wrote))
}

/// The compare outcome of `req` and of every nested txn on the branch it takes, in the order
/// [`ExecState::txn`] visits them.
fn compare_path(view: &mut impl TxnView, req: &TxnRequest, out: &mut Vec<bool>) -> Result<()> {
    let mut succeeded = true;
    for cmp in &req.compare {
        if !compare(view, cmp)? {
            succeeded = false;
            break;
        }
    }
    out.push(succeeded);
    for op in if succeeded { &req.success } else { &req.failure } {
        if let RequestOp::Txn(t) = op {
            compare_path(view, t, out)?;
        }
    }
    Ok(())
}

/// Runs a standalone range on a view (used by backends that read through the same code).
pub fn range(view: &mut impl TxnView, req: &RangeRequest) -> Result<RangeResponse> {
    let mut st = ExecState { wrote: false, path: Vec::new().into_iter() };
    st.range(view, req)
}

struct ExecState {
    wrote: bool,
    /// Compare outcomes computed up front by [`compare_path`].
    path: std::vec::IntoIter<bool>,
}

impl ExecState {
    fn read_rev(&self, view: &impl TxnView) -> Revision {
        view.base_revision() + i64::from(self.wrote)
    }

    fn write_rev(&self, view: &impl TxnView) -> Revision {
        view.base_revision() + 1
    }

    fn txn(&mut self, view: &mut impl TxnView, req: &TxnRequest) -> Result<TxnResponse> {
        let succeeded = self.path.next().ok_or_else(|| BackendError::internal("txn compare path exhausted"))?;
        let ops = if succeeded { &req.success } else { &req.failure };
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            responses.push(match op {
                RequestOp::Range(r) => ResponseOp::Range(self.range(view, r)?),
                RequestOp::Put(p) => ResponseOp::Put(self.put(view, p)?),
                RequestOp::DeleteRange(d) => ResponseOp::DeleteRange(self.delete(view, d)?),
                RequestOp::Txn(t) => ResponseOp::Txn(self.txn(view, t)?),
            });
        }
        Ok(TxnResponse { revision: self.read_rev(view), succeeded, responses })
    }

    fn range(&mut self, view: &mut impl TxnView, req: &RangeRequest) -> Result<RangeResponse> {
        let current = self.read_rev(view);
        let limit = fetch_limit(req);
        // etcd checks a txn's ranges against the revision before the txn (`checkRange`), so
        // even a txn that has written cannot name its own new revision.
        if req.revision > view.base_revision() {
            return Err(BackendError::FutureRevision);
        }
        let (kvs, count) = if req.revision <= 0 || req.revision >= current {
            view.range_latest(&req.range, limit, req.count_only)?
        } else {
            let compacted = view.compact_revision();
            if req.revision < compacted {
                return Err(BackendError::Compacted { compact_revision: compacted });
            }
            view.range_at(&req.range, req.revision, limit, req.count_only)?
        };
        if req.count_only {
            return Ok(RangeResponse { revision: current, kvs: Vec::new(), more: false, count });
        }
        let (kvs, more) = finish_range(req, kvs);
        Ok(RangeResponse { revision: current, kvs, more, count })
    }

    fn put(&mut self, view: &mut impl TxnView, req: &PutRequest) -> Result<PutResponse> {
        let (mut found, _) = view.range_latest(&KeyRange::single(req.key.clone()), Some(1), false)?;
        let prev = found.pop();
        if (req.ignore_value || req.ignore_lease) && prev.is_none() {
            return Err(BackendError::KeyNotFound);
        }
        let value = match (&prev, req.ignore_value) {
            (Some(p), true) => p.value.clone(),
            _ => req.value.clone(),
        };
        let lease = match (&prev, req.ignore_lease) {
            (Some(p), true) => p.lease,
            _ => req.lease,
        };
        if lease != 0 && !view.lease_exists(lease)? {
            return Err(BackendError::LeaseNotFound);
        }
        let rev = self.write_rev(view);
        let kv = KeyValue {
            key: req.key.clone(),
            create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
            mod_revision: rev,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            value,
            lease,
        };
        let prev_kv = if req.prev_kv { prev.clone() } else { None };
        view.put(kv, prev)?;
        self.wrote = true;
        Ok(PutResponse { revision: rev, prev_kv })
    }

    fn delete(&mut self, view: &mut impl TxnView, req: &DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        let (existing, _) = view.range_latest(&req.range, None, false)?;
        let rev = self.write_rev(view);
        let deleted = existing.len() as i64;
        let mut prev_kvs = Vec::new();
        for kv in existing {
            if req.prev_kv {
                prev_kvs.push(kv.clone());
            }
            view.delete(kv, rev)?;
        }
        if deleted > 0 {
            self.wrote = true;
        }
        Ok(DeleteRangeResponse { revision: self.read_rev(view), deleted, prev_kvs })
    }
}

/// Evaluates one compare as etcd does: every key in the range must satisfy it; an empty range
/// compares as a zero KeyValue, except that a value compare on no key is false.
fn compare(view: &mut impl TxnView, cmp: &Compare) -> Result<bool> {
    let (kvs, _) = view.range_latest(&cmp.range, None, false)?;
    if kvs.is_empty() {
        if matches!(cmp.target, CompareTarget::Value(_)) {
            return Ok(false);
        }
        return Ok(compare_kv(cmp, &KeyValue::default()));
    }
    Ok(kvs.iter().all(|kv| compare_kv(cmp, kv)))
}

/// Whether `kv` satisfies `cmp`.
pub fn compare_kv(cmp: &Compare, kv: &KeyValue) -> bool {
    use std::cmp::Ordering;
    let ord: Ordering = match &cmp.target {
        CompareTarget::Version(v) => kv.version.cmp(v),
        CompareTarget::Create(v) => kv.create_revision.cmp(v),
        CompareTarget::Mod(v) => kv.mod_revision.cmp(v),
        CompareTarget::Lease(v) => kv.lease.cmp(v),
        CompareTarget::Value(v) => kv.value.as_slice().cmp(v.as_slice()),
    };
    match cmp.result {
        CompareResult::Equal => ord == Ordering::Equal,
        CompareResult::NotEqual => ord != Ordering::Equal,
        CompareResult::Greater => ord == Ordering::Greater,
        CompareResult::Less => ord == Ordering::Less,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_keys_are_those_a_txn_may_read_at_the_latest_revision() {
        let get = |k: &str, rev| RequestOp::Range(RangeRequest { range: KeyRange::single(k), revision: rev, ..Default::default() });
        let req = TxnRequest {
            compare: vec![
                Compare { result: CompareResult::Equal, target: CompareTarget::Version(1), range: KeyRange::single("c") },
                Compare { result: CompareResult::Equal, target: CompareTarget::Version(1), range: KeyRange::prefix("p/") },
            ],
            success: vec![
                RequestOp::Put(PutRequest { key: b"put".to_vec(), ..Default::default() }),
                get("get", 0),
                get("old", 5),
                RequestOp::DeleteRange(DeleteRangeRequest { range: KeyRange::single("del"), prev_kv: false }),
                RequestOp::DeleteRange(DeleteRangeRequest { range: KeyRange::prefix("d/"), prev_kv: false }),
            ],
            failure: vec![RequestOp::Txn(TxnRequest::unconditional(vec![get("nested", 0)]))],
        };
        let mut keys = Vec::new();
        single_keys(&req, &mut keys);
        let keys: Vec<&str> = keys.iter().map(|k| std::str::from_utf8(k).unwrap()).collect();
        assert_eq!(keys, ["c", "put", "get", "del", "nested"]);
    }
}
