//! Model types shared by the frontend and every backend.
//!
//! These mirror etcd's mvcc and etcdserver messages but are plain Rust: protobuf types stop at
//! the `api` crate. Byte strings are `Vec<u8>`; revisions, versions and lease IDs are `i64` as
//! on the wire. Byte strings serialize as bytes (`serde_bytes`): in postcard (the write-ahead
//! log, TiKV's rows) that is the encoding of a sequence of `u8`, written and read in one copy
//! instead of byte by byte.

use serde::{Deserialize, Serialize};

/// A store revision. Revision 1 is the empty store; the first write creates revision 2.
pub type Revision = i64;

/// A lease ID. 0 means "no lease".
pub type LeaseId = i64;

/// The ID a lease grant tries: the one requested, or for 0 ("the backend chooses") a random
/// positive one, as etcd's lessor picks. A backend whose chosen ID turns out to be taken calls
/// it again for another.
pub fn lease_id_to_try(requested: LeaseId) -> LeaseId {
    if requested != 0 {
        return requested;
    }
    loop {
        let id = (rand::random::<u64>() >> 1) as LeaseId;
        if id != 0 {
            return id;
        }
    }
}

/// One key at one revision, as etcd's `mvccpb.KeyValue`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
    pub version: i64,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    pub lease: LeaseId,
}

/// The key interval of a request, with etcd's `range_end` conventions:
/// an empty `end` selects the single key `key`; `end == [0]` selects every key `>= key`
/// (and with `key == [0]` as well, every key); otherwise the half-open interval `[key, end)`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRange {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
}

impl KeyRange {
    pub fn new(key: impl Into<Vec<u8>>, range_end: impl Into<Vec<u8>>) -> Self {
        Self { key: key.into(), range_end: range_end.into() }
    }

    /// A range that selects exactly one key.
    pub fn single(key: impl Into<Vec<u8>>) -> Self {
        Self { key: key.into(), range_end: Vec::new() }
    }

    /// Every key that starts with `prefix` (etcd's `clientv3.GetPrefixRangeEnd`).
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> Self {
        let key = prefix.into();
        let range_end = prefix_end(&key);
        Self { key, range_end }
    }

    pub fn is_single(&self) -> bool {
        self.range_end.is_empty()
    }

    /// The exclusive upper bound, or `None` when the range is unbounded above.
    /// For a single-key range this is `None` as well; check [`KeyRange::is_single`] first.
    pub fn upper(&self) -> Option<&[u8]> {
        if self.range_end.is_empty() || self.range_end == [0] {
            None
        } else {
            Some(&self.range_end)
        }
    }

    /// Whether `k` falls inside this range.
    pub fn contains(&self, k: &[u8]) -> bool {
        if self.is_single() {
            return k == self.key.as_slice();
        }
        if k < self.key.as_slice() {
            return false;
        }
        match self.upper() {
            None => true,
            Some(end) => k < end,
        }
    }

    /// Whether two ranges share at least one key.
    pub fn overlaps(&self, other: &KeyRange) -> bool {
        let (a_lo, a_hi) = self.bounds();
        let (b_lo, b_hi) = other.bounds();
        let a_below_b_hi = match &b_hi {
            Bound::Unbounded => true,
            Bound::Excl(e) => a_lo < e.as_slice(),
            Bound::Incl(e) => a_lo <= e.as_slice(),
        };
        let b_below_a_hi = match &a_hi {
            Bound::Unbounded => true,
            Bound::Excl(e) => b_lo < e.as_slice(),
            Bound::Incl(e) => b_lo <= e.as_slice(),
        };
        a_below_b_hi && b_below_a_hi
    }

    fn bounds(&self) -> (&[u8], Bound) {
        if self.is_single() {
            (&self.key, Bound::Incl(self.key.clone()))
        } else {
            match self.upper() {
                None => (&self.key, Bound::Unbounded),
                Some(e) => (&self.key, Bound::Excl(e.to_vec())),
            }
        }
    }
}

enum Bound {
    Unbounded,
    Excl(Vec<u8>),
    Incl(Vec<u8>),
}

/// The smallest key greater than every key with this prefix; `[0]` ("no upper bound") when the
/// prefix is empty or all 0xff.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SortOrder {
    #[default]
    None,
    Ascend,
    Descend,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SortTarget {
    #[default]
    Key,
    Version,
    Create,
    Mod,
    Value,
}

/// etcd's `RangeRequest`, already validated by the frontend.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRequest {
    pub range: KeyRange,
    /// Read at this revision; `<= 0` means the latest.
    pub revision: Revision,
    /// At most this many kvs; `0` means no limit.
    pub limit: i64,
    pub sort_order: SortOrder,
    pub sort_target: SortTarget,
    pub serializable: bool,
    pub keys_only: bool,
    pub count_only: bool,
    pub min_mod_revision: Revision,
    pub max_mod_revision: Revision,
    pub min_create_revision: Revision,
    pub max_create_revision: Revision,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeResponse {
    /// The store's current revision when the read was served (the header revision).
    pub revision: Revision,
    pub kvs: Vec<KeyValue>,
    /// More keys matched than `limit` allowed.
    pub more: bool,
    /// Number of keys in the range at the read revision (before limit and filters).
    pub count: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutRequest {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    pub lease: LeaseId,
    pub prev_kv: bool,
    pub ignore_value: bool,
    pub ignore_lease: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutResponse {
    pub revision: Revision,
    pub prev_kv: Option<KeyValue>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRangeRequest {
    pub range: KeyRange,
    pub prev_kv: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRangeResponse {
    pub revision: Revision,
    pub deleted: i64,
    pub prev_kvs: Vec<KeyValue>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareResult {
    Equal,
    Greater,
    Less,
    NotEqual,
}

/// What a compare looks at, with the operand to compare against.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    Version(i64),
    Create(Revision),
    Mod(Revision),
    Value(#[serde(with = "serde_bytes")] Vec<u8>),
    Lease(LeaseId),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    pub result: CompareResult,
    pub target: CompareTarget,
    /// One key, or with a non-empty `range_end` every key in the range must satisfy it.
    pub range: KeyRange,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestOp {
    Range(RangeRequest),
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseOp {
    Range(RangeResponse),
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnRequest {
    pub compare: Vec<Compare>,
    pub success: Vec<RequestOp>,
    pub failure: Vec<RequestOp>,
}

impl TxnRequest {
    /// A txn with no compares that runs `ops`.
    pub fn unconditional(ops: Vec<RequestOp>) -> Self {
        Self { compare: Vec::new(), success: ops, failure: Vec::new() }
    }

    /// Whether any branch of this txn (nested txns included) contains a write.
    pub fn has_writes(&self) -> bool {
        fn ops_write(ops: &[RequestOp]) -> bool {
            ops.iter().any(|op| match op {
                RequestOp::Range(_) => false,
                RequestOp::Put(_) | RequestOp::DeleteRange(_) => true,
                RequestOp::Txn(t) => t.has_writes(),
            })
        }
        ops_write(&self.success) || ops_write(&self.failure)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnResponse {
    /// The header revision: the txn's own revision when it wrote, else the current revision.
    pub revision: Revision,
    pub succeeded: bool,
    pub responses: Vec<ResponseOp>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change. For a delete, `kv` holds the key and `mod_revision` (the delete's revision) and
/// zero in the other fields, as etcd sends it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
    /// The key's previous live version, if it had one. Always filled in by the feed; the
    /// frontend strips it for watchers that did not ask for it.
    pub prev_kv: Option<KeyValue>,
}

/// All events of one revision, in the order the txn produced them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeBatch {
    pub revision: Revision,
    pub events: Vec<Event>,
}

/// An item of the change feed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FeedItem {
    /// The events of one revision.
    Changes(std::sync::Arc<ChangeBatch>),
    /// Every revision `<= rev` has been delivered on this feed: nothing older will follow.
    Progress(Revision),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGrant {
    pub id: LeaseId,
    pub ttl: i64,
    pub revision: Revision,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub id: LeaseId,
    /// Remaining seconds (rounded as etcd does), `-1` once expired.
    pub ttl: i64,
    pub granted_ttl: i64,
    pub keys: Vec<Vec<u8>>,
    pub revision: Revision,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactResponse {
    pub revision: Revision,
}

/// What Maintenance.Status needs from the store.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub revision: Revision,
    pub compact_revision: Revision,
    pub db_size: i64,
    pub db_size_in_use: i64,
    pub raft_index: u64,
    pub raft_term: u64,
    pub raft_applied_index: u64,
    /// Whether this process currently leads (always true for a single node and for backends
    /// without a leader of their own).
    pub is_leader: bool,
    /// The leader's member ID when the backend elects one among several members (`None`: no
    /// leader known, or a backend without members, where `is_leader` says it all).
    pub leader: Option<u64>,
    /// Whether this member is a non-voting learner.
    pub is_learner: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HashKv {
    pub hash: u32,
    pub compact_revision: Revision,
    pub hash_revision: Revision,
    pub revision: Revision,
}

/// A membership change (see `Backend::member_change`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberChange {
    /// A new member at `peer_url`; a voter once it caught up with the leader, unless `learner`.
    Add { id: u64, peer_url: String, learner: bool },
    /// The learner becomes a voter; refused with `BackendError::Unavailable("learner not
    /// ready")` until it caught up with the leader.
    Promote { id: u64 },
    /// The member leaves the group for good.
    Remove { id: u64 },
    /// The member moved to `peer_url`.
    Update { id: u64, peer_url: String },
}

/// A named document and its version (see `Backend::doc_get`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Doc {
    pub version: u64,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The write-ahead log and TiKV's rows hold model types in postcard: byte strings as bytes
    /// must read and write exactly what the same fields as plain sequences did.
    #[test]
    fn byte_strings_keep_their_postcard_encoding() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Plain {
            key: Vec<u8>,
            create_revision: Revision,
            mod_revision: Revision,
            version: i64,
            value: Vec<u8>,
            lease: LeaseId,
        }
        let kv = KeyValue {
            key: b"key".to_vec(),
            create_revision: 2,
            mod_revision: 300,
            version: 4,
            value: vec![7; 300],
            lease: -5,
        };
        let plain = Plain {
            key: kv.key.clone(),
            create_revision: 2,
            mod_revision: 300,
            version: 4,
            value: kv.value.clone(),
            lease: -5,
        };
        let bytes = postcard::to_allocvec(&kv).unwrap();
        assert_eq!(bytes, postcard::to_allocvec(&plain).unwrap());
        assert_eq!(postcard::from_bytes::<KeyValue>(&bytes).unwrap(), kv);
        assert_eq!(postcard::from_bytes::<Plain>(&bytes).unwrap(), plain);
        let cmp = CompareTarget::Value(vec![1, 2, 3]);
        assert_eq!(postcard::to_allocvec(&cmp).unwrap(), [3, 3, 1, 2, 3]);
    }

    #[test]
    fn a_lease_grant_tries_the_requested_id_or_a_positive_random_one() {
        assert_eq!(lease_id_to_try(7), 7);
        assert_eq!(lease_id_to_try(-3), -3, "a requested ID is passed on as it is");
        let chosen: Vec<LeaseId> = (0..1000).map(|_| lease_id_to_try(0)).collect();
        assert!(chosen.iter().all(|&id| id > 0), "{chosen:?}");
        let mut distinct = chosen.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(distinct.len() > 990, "random, not fixed: {} distinct", distinct.len());
    }
}
