//! The storage contract of Cairn.
//!
//! A backend keeps etcd's MVCC key space, its change feed and its leases. The frontend (`api`)
//! owns the wire protocol, request validation and limits; a backend owns storage semantics.
//! Every backend runs the same conformance suite (`cairn-backend-tests`).
//!
//! The contract is written so that a shared database behind several Cairn processes can
//! implement it: nothing here assumes that one process sees every write in memory. Revision
//! allocation and the change feed must be correct across processes.

pub mod error;
pub mod exec;
pub mod model;
pub mod quota;
pub mod range;

use async_trait::async_trait;
use futures::stream::BoxStream;

pub use error::{BackendError, Result};
pub use model::*;

/// A stream of the change feed, see [`Backend::watch`].
pub type FeedStream = BoxStream<'static, Result<FeedItem>>;

/// The operations every Cairn backend provides.
///
/// Global invariants, for every method and across every process sharing the backend:
/// - **Revisions** form one sequence per store. The empty store is at revision 1; each txn that
///   writes at least one key (a put, or a delete that deleted something) takes exactly the next
///   revision, so revisions are unique, gap-free and monotonic. A txn that writes nothing, a
///   read, a failed request and a compaction do not advance the revision. All writes of one txn
///   share its revision and are ordered within it (etcd's sub-revisions).
/// - **Per key** a put sets `mod_revision` to the txn's revision, increments `version`, and keeps
///   `create_revision` unless the key did not exist (then `create_revision = mod_revision`,
///   `version = 1`). A delete removes the key (a tombstone in history); recreating it starts
///   over at `version = 1`.
/// - **Acknowledged writes are durable**: when a write method returns `Ok`, the write survives a
///   crash of the process or machine.
/// - **Errors** are [`BackendError`] variants; a returned error means the request did not
///   happen, except [`BackendError::Timeout`] and [`BackendError::Unavailable`] after a write
///   was submitted, where it may have happened (as in etcd).
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Reads keys in `req.range` as of `req.revision` (`<= 0`: the current revision).
    ///
    /// Contract: `Compacted` when `0 < revision < compact_revision`, `FutureRevision` when
    /// `revision > current`. `count` is the number of live keys in the range at that revision;
    /// `kvs` are sorted and filtered as in etcd (see [`range::finish_range`]), at most `limit`
    /// of them, with `more` set when more matched. `keys_only` leaves values empty,
    /// `count_only` returns no kvs. The response revision is the current revision. A
    /// non-serializable read reflects every write acknowledged before it was called
    /// (linearizable); a serializable read may be served from a local, possibly stale, state.
    async fn range(&self, req: RangeRequest) -> Result<RangeResponse>;

    /// Runs an etcd transaction atomically: evaluates `compare` against the current state, then
    /// runs `success` or `failure` (nested txns included) as one unit at one new revision.
    ///
    /// Contract: compares see the state before the txn; reads inside the txn see the txn's own
    /// earlier writes. A put with a lease that does not exist fails with `LeaseNotFound`;
    /// `ignore_value`/`ignore_lease` on a missing key fail with `KeyNotFound`; the whole txn
    /// then has no effect. Range ops inside may name a past revision (errors as in
    /// [`Backend::range`]). Against concurrent txns from any process, the compares and the
    /// writes are atomic (serializable). Validation of shape (op count, duplicate keys, empty
    /// keys) is the frontend's job and is not repeated here.
    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse>;

    /// Compacts history: afterwards no read or watch may ask for a revision `< rev`
    /// (reads at `rev` itself still work, as in etcd). `Compacted` when `rev <= compact
    /// revision`, `FutureRevision` when `rev > current`. When `physical` is true the call
    /// returns only after superseded versions are removed from storage; otherwise removal may
    /// continue in the background. Does not change the revision.
    async fn compact(&self, rev: Revision, physical: bool) -> Result<CompactResponse>;

    /// The change feed from revision `from` (`<= 0`: from the next revision written).
    ///
    /// Contract: yields every revision `>= from` that has events, each exactly once, in
    /// increasing order, with its events in txn order and `prev_kv` filled in; no revision is
    /// skipped even while writes race the call. After it has caught up with the revisions
    /// that existed when it was called, and whenever it is idle, it yields `Progress(rev)`
    /// meaning everything `<= rev` has been delivered. Fails with `Compacted` (carrying the
    /// compact revision) when `0 < from < compact_revision` (a watch from the compact revision
    /// itself still sees that revision's events, as in etcd); a feed that falls behind a
    /// compaction ends with that error. The stream lives until dropped.
    async fn watch(&self, from: Revision) -> Result<FeedStream>;

    /// The current revision and compact revision.
    async fn current_revision(&self) -> Result<(Revision, Revision)>;

    /// Grants a lease. `id == 0` lets the backend choose a unique non-zero positive ID.
    /// `ttl` is in seconds and already clamped by the frontend.
    ///
    /// Contract: `LeaseExists` when the ID is taken. The lease expires `ttl` seconds after the
    /// grant or the last keep-alive; on expiry the backend (exactly once across processes)
    /// deletes every attached key in one revision with delete events, then forgets the lease.
    async fn lease_grant(&self, id: LeaseId, ttl: i64) -> Result<LeaseGrant>;

    /// Revokes a lease: deletes its keys in one revision (no revision if it has no keys) and
    /// forgets it. `LeaseNotFound` if it does not exist. Returns the current revision after.
    async fn lease_revoke(&self, id: LeaseId) -> Result<Revision>;

    /// Renews a lease to its full granted TTL; returns that TTL. `LeaseNotFound` if it does not
    /// exist (or has expired).
    async fn lease_keep_alive(&self, id: LeaseId) -> Result<i64>;

    /// The remaining and granted TTL of a lease, and with `keys` its attached keys.
    /// `LeaseNotFound` if it does not exist.
    async fn lease_time_to_live(&self, id: LeaseId, keys: bool) -> Result<LeaseInfo>;

    /// Every live lease ID.
    async fn lease_leases(&self) -> Result<Vec<LeaseId>>;

    /// Sizes, raft position and revisions for Maintenance.Status.
    async fn status(&self) -> Result<BackendStatus>;

    /// A hash of every key version in (compact revision, `rev`] (`rev <= 0`: current), as
    /// Maintenance.HashKV; equal stores give equal hashes. Errors as [`Backend::range`].
    async fn hash_kv(&self, rev: Revision) -> Result<HashKv>;

    /// Gives unused space back to the filesystem where the storage supports it.
    async fn defragment(&self) -> Result<()>;

    /// Reads a named document: small metadata the frontend keeps beside the key space (the
    /// auth store, alarms, cluster membership). `None` if it was never written.
    ///
    /// Contract: documents are outside the key space (no revision, no events, untouched by
    /// compaction), durable like any acknowledged write, and a read reflects every `doc_put`
    /// acknowledged before it, from any process.
    async fn doc_get(&self, name: &str) -> Result<Option<Doc>>;

    /// Replaces document `name` if its current version is `expected` (0: it does not exist yet)
    /// and returns the new version (`expected + 1`); returns `None` and changes nothing when the
    /// version differs (another writer got there first). Atomic across processes.
    async fn doc_put(&self, name: &str, expected: u64, value: Vec<u8>) -> Result<Option<u64>>;

    /// Applies a cluster membership change (MemberAdd, MemberRemove, MemberUpdate) to the
    /// backend's own replication, for backends whose members replicate among themselves (the
    /// native backend's raft group). The frontend records the membership itself (in a
    /// document) and calls this after it did. Backends without members of their own do
    /// nothing (the default).
    async fn member_change(&self, change: MemberChange) -> Result<()> {
        let _ = change;
        Ok(())
    }

    /// Hands leadership of the backend's own replication to member `target` (Maintenance.
    /// MoveLeader), returning once it leads. Errors: `Unavailable("bad leader transferee")`
    /// when `target` is not a voting member, `Unavailable("leader transfer took too long")`.
    /// Backends without members of their own have no leader to move (the default refuses).
    async fn move_leader(&self, target: u64) -> Result<()> {
        let _ = target;
        Err(BackendError::Unavailable("bad leader transferee".into()))
    }
}
