//! openraft's log storage over the write-ahead log.
//!
//! Contract kept (see openraft's `RaftLogStorage`): the vote is durable before `save_vote`
//! returns; the append callback runs only after fsync; truncate and purge never leave a hole.

use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{OptionalSend, StorageIOError};

use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};
use crate::wal::{Done, Record, Wal};

#[derive(Clone)]
pub struct LogStore {
    wal: Wal,
}

impl LogStore {
    pub(crate) fn new(wal: Wal) -> Self {
        Self { wal }
    }
}

fn write_err(e: io::Error) -> StorageError {
    StorageIOError::write_logs(&e).into()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let mut st = self.wal.state.lock();
        st.entries
            .range_mut(range)
            .map(|(_, e)| e.read())
            .collect::<Result<_, _>>()
            .map_err(|e| StorageIOError::read_logs(&e).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let st = self.wal.state.lock();
        Ok(LogState {
            last_purged_log_id: st.purged,
            last_log_id: st.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.wal.state.lock().vote = Some(*vote);
        self.wal
            .write_sync(&[Record::Vote(*vote)])
            .await
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.wal.state.lock().vote)
    }

    /// Written with the next append, not on its own (see [`Wal::set_committed`]).
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.wal.set_committed(committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.wal.state.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // The in-memory log keeps the entries as encoded for the WAL.
        let mut job = self.wal.encode_entries(entries).map_err(write_err)?;
        {
            let mut st = self.wal.state.lock();
            for e in std::mem::take(&mut job.entries) {
                st.entries.insert(e.log_id.index, e);
            }
        }
        self.wal
            .submit_encoded(job, Done::Flushed(callback))
            .map_err(write_err)
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.wal.state.lock().entries.split_off(&log_id.index);
        self.wal
            .write_sync(&[Record::Truncate(log_id.index)])
            .await
            .map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        {
            let mut st = self.wal.state.lock();
            let keep = st.entries.split_off(&(log_id.index + 1));
            st.entries = keep;
            st.purged = Some(log_id);
        }
        self.wal
            .submit(&[Record::Purge(log_id)], Done::Nothing)
            .map_err(write_err)
    }
}
