//! The backend error type. Variants are etcd-meaningful so the frontend can map each one to
//! etcd's exact gRPC status in a single table (`api/src/errors.rs`).

use crate::model::Revision;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum BackendError {
    /// The requested revision is at or below the compaction point.
    #[error("mvcc: required revision has been compacted (compact revision {compact_revision})")]
    Compacted { compact_revision: Revision },
    /// The requested revision is above the current revision.
    #[error("mvcc: required revision is a future revision")]
    FutureRevision,
    #[error("requested lease not found")]
    LeaseNotFound,
    #[error("lease already exists")]
    LeaseExists,
    /// Put with ignore_value / ignore_lease on a key that does not exist.
    #[error("key not found")]
    KeyNotFound,
    /// The backend's space quota is exhausted.
    #[error("mvcc: database space exceeded")]
    NoSpace,
    /// The request may succeed if retried later (leader election, lost connection).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The request did not finish in time; it may or may not have been applied.
    #[error("request timed out")]
    Timeout,
    /// The backend is shutting down.
    #[error("server stopped")]
    Stopped,
    /// Anything else: a bug or corrupted storage. Never retried.
    #[error("internal: {0}")]
    Internal(String),
}

impl BackendError {
    pub fn internal(e: impl std::fmt::Display) -> Self {
        Self::Internal(e.to_string())
    }
}

pub type Result<T, E = BackendError> = std::result::Result<T, E>;
