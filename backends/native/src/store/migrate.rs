//! Upgrading a store written by an older Cairn to the current table layout.
//!
//! Before VERSIONS, versions lived in `history`, keyed by (key, revision), with a
//! change log `events` of (revision, sub-revision) -> key above the physical compaction point.
//! [`from_history_table`] rewrites them in one synced write txn, so a crash leaves either the
//! old layout (migrated again at the next start) or the new one.

use std::collections::{BTreeMap, HashMap};

use redb::{Database, Durability, ReadableTable, TableHandle};

use super::codec::*;

/// Sub-revisions given to versions the old change log no longer listed (it dropped rows below
/// the physical compaction point): above any real sub-revision, so they cannot collide.
const UNLISTED_SUB: u32 = 1 << 30;

/// Moves `history` and `events` into VERSIONS, if the store has them; returns
/// the number of versions moved.
pub fn from_history_table(db: &Database) -> anyhow::Result<usize> {
    let txn = db.begin_write()?;
    let old = txn.list_tables()?.any(|t| t.name() == OLD_HISTORY.name());
    if !old {
        txn.abort()?;
        return Ok(0);
    }
    let mut moved = 0;
    {
        let history = txn.open_table(OLD_HISTORY)?;
        let events = txn.open_table(OLD_EVENTS)?;
        let mut subs: HashMap<(Vec<u8>, u64), u32> = HashMap::new();
        for item in events.iter()? {
            let (k, key) = item?;
            let (rev, sub) = k.value();
            anyhow::ensure!(
                sub < UNLISTED_SUB,
                "change log: sub-revision {sub} at {rev} too large"
            );
            subs.insert((key.value().to_vec(), rev), sub);
        }
        let mut unlisted: BTreeMap<u64, u32> = BTreeMap::new();
        let mut versions = txn.open_table(VERSIONS)?;
        for item in history.iter()? {
            let (k, rec) = item?;
            let (key, rev) = k.value();
            let rec = rec.value();
            anyhow::ensure!(rec.len() >= 32, "history: short record at revision {rev}");
            let sub = match subs.get(&(key.to_vec(), rev)) {
                Some(&sub) => sub,
                None => {
                    let n = unlisted.entry(rev).or_insert(UNLISTED_SUB);
                    *n += 1;
                    *n - 1
                }
            };
            super::insert_version(&mut versions, key, rev, sub, rec)?;
            moved += 1;
        }
    }
    txn.delete_table(OLD_HISTORY)?;
    txn.delete_table(OLD_EVENTS)?;
    let mut txn = txn;
    txn.set_durability(Durability::Immediate);
    txn.commit()?;
    tracing::info!(
        versions = moved,
        "moved the state machine to the revision-keyed layout"
    );
    Ok(moved)
}
