//! Physical compaction: removing versions that no read or watch can ask for any more.
//!
//! Logical compaction (the raft command) only moves the compact revision; this removes, in
//! bounded batches, what etcd's compaction removes: for every key written below the compact
//! revision, each version superseded by a newer one at or below it, and a tombstone below it.
//! The newest version of a key at or below the compact revision stays (reads at that revision
//! need it), and so does a tombstone at exactly that revision (a watch starting there sees the
//! delete). VERSIONS below [`M_PHYSICAL`] is not walked again; a version kept there is removed
//! by a later compaction, when the key's next write is walked.

use std::collections::BTreeSet;

use cairn_backend::Result;
use redb::{Durability, ReadableTable};

use super::codec::*;
use super::view::db_err;
use super::Store;

/// VERSIONS rows walked per write txn (a revision is never split between two).
pub(super) const BATCH: usize = 5_000;

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
            let mut versions = txn.open_table(VERSIONS).map_err(db_err)?;
            let compact = super::read_i64(&meta, M_COMPACT)?;
            let done = super::read_i64(&meta, M_PHYSICAL)?;
            if done >= compact {
                return Ok(false);
            }
            // The keys written in the revisions walked (up to the compact revision itself: a
            // key written there may have versions below it to drop), and the first revision
            // not walked.
            let mut keys = BTreeSet::new();
            let mut last_rev = None;
            let mut next = None;
            for (rows, item) in versions
                .range::<(u64, u32)>((done.max(0) as u64, 0)..=(compact as u64, u32::MAX))
                .map_err(db_err)?
                .enumerate()
            {
                let (k, v) = item.map_err(db_err)?;
                let (rev, _) = k.value();
                if rows >= BATCH && last_rev != Some(rev) {
                    next = Some(rev as i64);
                    break;
                }
                last_rev = Some(rev);
                keys.insert(decode_version(v.value()).0.to_vec());
            }
            more = next.is_some();
            let upto = next.unwrap_or(compact);
            // Readers below the compact revision are refused from here on, before the
            // versions they would need leave the index (see index.rs).
            let mut index = self.index.write();
            index.set_compacted(compact);
            for key in keys {
                let found = index.versions_upto(&key, compact as u64);
                let Some(&(newest, entry)) = found.last() else {
                    continue;
                };
                let keep_newest = !index_tombstone(entry) || newest as i64 == compact;
                let drop = if keep_newest {
                    &found[..found.len() - 1]
                } else {
                    &found[..]
                };
                for &(rev, entry) in drop {
                    versions.remove((rev, index_sub(entry))).map_err(db_err)?;
                    index.remove(&key, rev);
                }
            }
            drop(index);
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
