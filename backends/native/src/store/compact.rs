//! Physical compaction: removing versions that no read or watch can ask for any more.
//!
//! Logical compaction (the raft command) only moves the compact revision; this removes, in
//! bounded batches, every history version below it that is superseded by a newer version at
//! or below it, every tombstone below it, and the change-log rows below it. Versions at the
//! compact revision itself stay, so reads and watches at that revision still work.

use cairn_backend::Result;
use redb::{Durability, ReadableTable};

use super::codec::*;
use super::view::db_err;
use super::Store;

/// Change-log rows handled per write txn.
const BATCH: usize = 5_000;

impl Store {
    /// Runs one batch; returns true when there is more to do.
    pub fn compact_step(&self) -> Result<bool> {
        // The open write txn first (redb has one writer at a time); applies wait meanwhile.
        let mut w = self.writer.lock();
        self.commit(&mut w, false)?;
        let db = self.db.read();
        let mut txn = db.begin_write().map_err(db_err)?;
        txn.set_durability(Durability::None);
        let more;
        {
            let mut meta = txn.open_table(META).map_err(db_err)?;
            let mut events = txn.open_table(EVENTS).map_err(db_err)?;
            let mut history = txn.open_table(HISTORY).map_err(db_err)?;
            let compact = super::read_i64(&meta, M_COMPACT)?;
            let done = super::read_i64(&meta, M_PHYSICAL)?;
            if done >= compact {
                return Ok(false);
            }
            let mut rows = Vec::with_capacity(BATCH);
            for item in events
                .range::<(u64, u32)>((done.max(0) as u64, 0)..(compact as u64, 0))
                .map_err(db_err)?
            {
                let (k, v) = item.map_err(db_err)?;
                rows.push((k.value(), v.value().to_vec()));
                if rows.len() == BATCH {
                    break;
                }
            }
            more = rows.len() == BATCH;
            // Rows handled here are deleted, so restarting at the last revision seen (which may
            // have rows left) revisits nothing.
            let upto = if more {
                rows.last().map(|((r, _), _)| *r as i64).unwrap_or(compact)
            } else {
                compact
            };
            for ((rev, sub), key) in &rows {
                let superseded = history
                    .range::<(&[u8], u64)>(
                        (key.as_slice(), rev + 1)..=(key.as_slice(), compact as u64),
                    )
                    .map_err(db_err)?
                    .next()
                    .is_some();
                let tombstone = history
                    .get((key.as_slice(), *rev))
                    .map_err(db_err)?
                    .is_some_and(|v| is_tombstone(v.value()));
                if superseded || tombstone {
                    history.remove((key.as_slice(), *rev)).map_err(db_err)?;
                }
                events.remove((*rev, *sub)).map_err(db_err)?;
            }
            meta.insert(M_PHYSICAL, enc_i64(upto).as_slice())
                .map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(more)
    }

    /// Runs physical compaction to the end.
    pub fn compact_all(&self) -> Result<()> {
        while self.compact_step()? {}
        Ok(())
    }
}
