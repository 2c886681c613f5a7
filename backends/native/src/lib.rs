//! Cairn's native backend (work in progress).

use std::path::PathBuf;
use std::sync::Arc;

/// Settings of the native backend, filled from etcd's flags by the frontend.
#[derive(Clone, Debug)]
pub struct NativeConfig {
    /// Where the write-ahead log and the state machine live (etcd's --data-dir).
    pub data_dir: PathBuf,
    /// Raft log entries between snapshots (etcd's --snapshot-count).
    pub snapshot_count: u64,
    /// Raft heartbeat interval in milliseconds (etcd's --heartbeat-interval).
    pub heartbeat_interval_ms: u64,
    /// Raft election timeout in milliseconds (etcd's --election-timeout).
    pub election_timeout_ms: u64,
    /// Space quota in bytes (etcd's --quota-backend-bytes); 0 = default 2 GiB.
    pub quota_backend_bytes: u64,
    /// This member's ID (etcd's derivation, computed by the frontend).
    pub member_id: u64,
}

impl Default for NativeConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("default.cairn"),
            snapshot_count: 100_000,
            heartbeat_interval_ms: 100,
            election_timeout_ms: 1000,
            quota_backend_bytes: 0,
            member_id: 1,
        }
    }
}

/// The native backend. Implements [`cairn_backend::Backend`].
pub struct NativeBackend {
    _private: (),
}

impl NativeBackend {
    /// Opens (or creates) the store in `cfg.data_dir` and starts the single-node raft group.
    pub async fn open(_cfg: NativeConfig) -> anyhow::Result<Arc<NativeBackend>> {
        anyhow::bail!("native backend not built yet")
    }

    /// Stops raft and flushes the state machine.
    pub async fn shutdown(&self) -> anyhow::Result<()> {
        Ok(())
    }
}
