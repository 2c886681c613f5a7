//! etcd's space quota (`--quota-backend-bytes`, etcdserver/quota.go): what a request costs and
//! when it is refused. A backend with a quota refuses a request with
//! [`BackendError::NoSpace`](crate::BackendError::NoSpace) when its size plus the request's
//! cost would reach the quota; the frontend then raises the NOSPACE alarm.

use crate::{RequestOp, TxnRequest};

/// etcd's estimate of a key's metadata (`kvOverhead`).
pub const KV_OVERHEAD: u64 = 256;
/// etcd's estimate of a lease (`leaseOverhead`), the cost of a lease grant.
pub const LEASE_OVERHEAD: u64 = 64;
/// The quota when `--quota-backend-bytes` is 0 (etcd's `DefaultQuotaBytes`, 2 GiB).
pub const DEFAULT_QUOTA_BYTES: u64 = 2 << 30;

/// The quota in effect for the flag's value.
pub fn quota_bytes(flag: u64) -> u64 {
    if flag == 0 {
        DEFAULT_QUOTA_BYTES
    } else {
        flag
    }
}

/// etcd's cost of a txn: the larger of its branches' top-level puts (key, value and
/// [`KV_OVERHEAD`] each); deletes, ranges and nested txns cost nothing, as in etcd.
pub fn txn_cost(req: &TxnRequest) -> u64 {
    let branch = |ops: &[RequestOp]| -> u64 {
        ops.iter()
            .map(|op| match op {
                RequestOp::Put(p) => KV_OVERHEAD + (p.key.len() + p.value.len()) as u64,
                _ => 0,
            })
            .sum()
    };
    branch(&req.success).max(branch(&req.failure))
}

/// Whether a request costing `cost` is refused at `size` bytes: etcd admits it only while
/// `size + cost < quota`. Requests that add nothing (cost 0) are never refused here.
pub fn exceeds(size: u64, cost: u64, quota: u64) -> bool {
    cost > 0 && size.saturating_add(cost) >= quota
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DeleteRangeRequest, PutRequest};

    fn put(k: &str, v: &str) -> RequestOp {
        RequestOp::Put(PutRequest { key: k.into(), value: v.into(), ..PutRequest::default() })
    }

    #[test]
    fn costs_are_etcds() {
        assert_eq!(txn_cost(&TxnRequest::unconditional(vec![put("k", "vv")])), 256 + 3);
        let t = TxnRequest {
            compare: vec![],
            success: vec![put("a", "1"), put("b", "2")],
            failure: vec![put("c", "12345678")],
        };
        assert_eq!(txn_cost(&t), 2 * 258, "the larger branch");
        let del = RequestOp::DeleteRange(DeleteRangeRequest::default());
        assert_eq!(txn_cost(&TxnRequest::unconditional(vec![del])), 0);
        assert_eq!(quota_bytes(0), 2 * 1024 * 1024 * 1024);
        assert_eq!(quota_bytes(53248), 53248);
    }

    #[test]
    fn admitted_only_below_the_quota() {
        assert!(!exceeds(999, 0, 1000), "free requests pass");
        assert!(!exceeds(900, 99, 1000));
        assert!(exceeds(900, 100, 1000), "reaching the quota is refused, as etcd's `<`");
        assert!(exceeds(u64::MAX, 1, 1000));
    }
}
