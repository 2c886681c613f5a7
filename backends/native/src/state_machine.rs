//! openraft's state machine over the redb store.

use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{OptionalSend, StorageIOError};

use crate::store::Store;
use crate::types::{CommandResult, Entry, LogId, StorageError, StoredMembership, TypeConfig};

#[derive(Clone)]
pub struct StateMachine {
    pub(crate) store: Arc<Store>,
    /// Whether openraft has had its start-up call of `get_current_snapshot`, which reads only
    /// the snapshot's meta (openraft 0.9's `StorageHelper::get_initial_state`, run once in
    /// `Raft::new` before anything else asks this state machine for a snapshot).
    pub(crate) started: bool,
}

fn sm_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_state_machine(&std::io::Error::other(e.to_string())).into()
}

/// Snapshots and installs may take long: they go to the blocking pool, not the raft thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f).await.map_err(sm_err)
}

impl StateMachine {
    async fn snapshot(&self, with_data: bool) -> Result<Snapshot<TypeConfig>, StorageError> {
        let store = self.store.clone();
        let (state, data) = blocking(move || -> cairn_backend::Result<_> {
            if with_data {
                store.dump()
            } else {
                Ok((store.synced_state()?, Vec::new()))
            }
        })
        .await?
        .map_err(sm_err)?;
        let id = state.last_applied.map_or("0-0".to_string(), |l| {
            format!("{}-{}", l.leader_id, l.index)
        });
        Ok(Snapshot {
            meta: SnapshotMeta {
                last_log_id: state.last_applied,
                last_membership: state.membership,
                snapshot_id: id,
            },
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    /// Makes the applied state durable so raft may purge the log up to it. The data itself is
    /// produced only when a snapshot must be sent ([`RaftStateMachine::get_current_snapshot`]).
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        self.snapshot(false).await
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let s = self.store.applied_state().map_err(sm_err)?;
        Ok((s.last_applied, s.membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        // Called in place on the raft thread: an apply is short (rows go into the open redb
        // txn), and handing it to another thread for each entry cost a thread wake-up per
        // entry (put at 16 clients: ~125-144 -> 107-118 us of server CPU per op).
        self.store.apply(entries).map_err(sm_err)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let store = self.store.clone();
        let applied = meta.last_log_id;
        let membership = meta.last_membership.clone();
        blocking(move || store.install(*snapshot, applied, &membership))
            .await?
            .map_err(sm_err)
    }

    /// The snapshot with its data, to send to a member. The first call, at start-up, gets the
    /// meta only: serialising the store there would hold a copy of all of it in memory at every
    /// start (a 190 MB store peaked at 297 MB of RSS while opening).
    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let with_data = std::mem::replace(&mut self.started, true);
        Ok(Some(self.snapshot(with_data).await?))
    }
}
