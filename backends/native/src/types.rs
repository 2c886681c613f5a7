//! The raft type configuration and the commands that travel through the log.

use std::io::Cursor;

use cairn_backend::{
    BackendError, CompactResponse, LeaseGrant, LeaseId, Revision, TxnRequest, TxnResponse,
};
use serde::{Deserialize, Serialize};

openraft::declare_raft_types!(
    /// Raft types of the native backend.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type Raft = openraft::Raft<TypeConfig>;

/// A state machine command: everything that changes the store goes through the raft log as
/// one of these, and applying it is deterministic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// An etcd txn (a put or delete is a txn of one op).
    Txn(TxnRequest),
    /// Logical compaction at a revision.
    Compact { revision: Revision },
    /// Grant a lease whose ID was chosen by the proposer.
    LeaseGrant { id: LeaseId, ttl: i64 },
    /// Revoke (or expire) a lease, deleting its keys.
    LeaseRevoke { id: LeaseId },
    /// Replace a document if its version is `expected`.
    DocPut {
        name: String,
        expected: u64,
        value: Vec<u8>,
    },
    /// Several commands proposed together as one raft entry (group commit); each is applied
    /// in order with its own revision and result.
    Batch(Vec<Command>),
}

impl Command {
    /// Requests in this command (a batch counts its commands).
    pub fn count(&self) -> u64 {
        match self {
            Command::Batch(cmds) => cmds.iter().map(Command::count).sum(),
            _ => 1,
        }
    }

    /// Whether readers see this command's effects before the state machine commits them:
    /// a txn's puts and deletes through the overlay, a lease grant or revoke through the lease
    /// clock (which answers lease lookups and listings).
    pub fn visible_uncommitted(&self) -> bool {
        match self {
            Command::Txn(_) | Command::LeaseGrant { .. } | Command::LeaseRevoke { .. } => true,
            Command::Batch(cmds) => cmds.iter().all(Command::visible_uncommitted),
            _ => false,
        }
    }
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Txn(t) => write!(f, "txn({} compares)", t.compare.len()),
            Command::Compact { revision } => write!(f, "compact({revision})"),
            Command::LeaseGrant { id, ttl } => write!(f, "lease-grant({id:x}, {ttl})"),
            Command::LeaseRevoke { id } => write!(f, "lease-revoke({id:x})"),
            Command::Batch(cmds) => write!(f, "batch({})", cmds.len()),
            Command::DocPut { name, expected, .. } => write!(f, "doc-put({name}, {expected})"),
        }
    }
}

/// The result of applying one log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    /// Blank and membership entries.
    None,
    Txn(TxnResponse),
    Compact(CompactResponse),
    LeaseGrant(LeaseGrant),
    LeaseRevoke(Revision),
    Batch(Vec<CommandResult>),
    /// The new version, or `None` when the expected version did not match.
    DocPut(Option<u64>),
    /// The command was rejected by the state machine (deterministically) and changed nothing.
    Err(BackendError),
}

impl CommandResult {
    /// Whether this result (or one in a batch) is a successful compaction.
    pub fn compacted(&self) -> bool {
        match self {
            CommandResult::Compact(_) => true,
            CommandResult::Batch(rs) => rs.iter().any(CommandResult::compacted),
            _ => false,
        }
    }
}
