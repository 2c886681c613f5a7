//! What readers need of the changes that are applied but not yet committed to redb.
//!
//! Applies accumulate in one open redb write txn, committed every [`super::FLUSH_EVERY`] or
//! [`super::FLUSH_ROWS`] rows (etcd's backend batches its bbolt commits the same way, and
//! serves reads through a buffer of the uncommitted writes). A redb read txn sees only committed
//! data, so readers merge it with this overlay: the CURRENT and history rows of every event
//! applied since the last commit. Everything else a reader may look at (the change log, leases,
//! documents, scalars) is committed before it is read: see `Store::flush`.
//!
//! The same lock guards the set of every live key (committed or not), which answers a range's
//! count without walking redb (etcd answers it from its in-memory key index the same way):
//! a list with a limit reads only `limit` rows, a count_only reads none.
//!
//! Consistency: rows enter the overlay (under its write lock) after they are in the open txn;
//! the overlay is cleared (under its write lock) only after the txn committed. A reader holds the
//! read lock from before it opens its redb read txn until it is done, so it sees committed
//! state plus overlay = exactly the applied state. Between commit and clear a reader may see a
//! row in both; the overlay's copy is identical and wins, so nothing is counted twice.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use cairn_backend::{ChangeBatch, EventKind, KeyRange, Result};

use super::codec::{encode_kv, encode_tombstone};
use super::view::{current_rows, db_err, CurrentTable};

#[derive(Default)]
pub(crate) struct Overlay {
    /// key -> its live record, or None when deleted since the last commit.
    current: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// (key, mod revision) -> record (a tombstone for a delete).
    history: BTreeMap<(Vec<u8>, u64), Vec<u8>>,
    /// Every live key, committed or not (not emptied by [`Overlay::clear`]).
    live: BTreeSet<Vec<u8>>,
}

impl Overlay {
    /// An empty overlay over a store whose live keys are `live`.
    pub fn new(live: BTreeSet<Vec<u8>>) -> Self {
        Overlay {
            live,
            ..Default::default()
        }
    }

    /// Replaces the live key set (after a snapshot was installed).
    pub fn reset_live(&mut self, live: BTreeSet<Vec<u8>>) {
        self.live = live;
    }

    /// Number of live keys in a multi-key `range`.
    pub fn count_live(&self, range: &KeyRange) -> i64 {
        match super::index::bounds(range) {
            Some(b) => self.live.range::<[u8], _>(b).count() as i64,
            None => 0,
        }
    }

    /// Empties the rows (after they were committed); the live key set stays.
    pub fn clear(&mut self) {
        self.current.clear();
        self.history.clear();
    }

    pub fn rows(&self) -> usize {
        self.history.len()
    }

    /// Adds the rows one applied revision wrote.
    pub fn record(&mut self, batch: &ChangeBatch) {
        let rev = batch.revision;
        for ev in &batch.events {
            let key = &ev.kv.key;
            match ev.kind {
                EventKind::Put => {
                    if !self.live.contains(key) {
                        self.live.insert(key.clone());
                    }
                    let rec = encode_kv(&ev.kv);
                    self.current.insert(key.clone(), Some(rec.clone()));
                    self.history.insert((key.clone(), rev as u64), rec);
                }
                EventKind::Delete => {
                    self.live.remove(key);
                    self.current.insert(key.clone(), None);
                    self.history
                        .insert((key.clone(), rev as u64), encode_tombstone(rev));
                }
            }
        }
    }

    fn current_in<'a>(
        &'a self,
        range: &KeyRange,
    ) -> impl Iterator<Item = (&'a Vec<u8>, &'a Option<Vec<u8>>)> + 'a {
        let lo = Bound::Included(range.key.as_slice());
        let hi = if range.is_single() {
            Bound::Included(range.key.as_slice())
        } else {
            match range.upper() {
                Some(end) if end <= range.key.as_slice() => Bound::Excluded(range.key.as_slice()),
                Some(end) => Bound::Excluded(end),
                None => Bound::Unbounded,
            }
        };
        self.current.range::<[u8], _>((lo, hi))
    }

    /// The record of the version (key, revision) `at`, when it is applied but not committed.
    pub fn history_record(&self, at: &(Vec<u8>, u64)) -> Option<&[u8]> {
        self.history.get(at).map(|v| v.as_slice())
    }

    /// The newest record of one key: `Some(None)` when it was deleted since the last commit,
    /// `None` when the overlay does not know it.
    pub fn get_current(&self, key: &[u8]) -> Option<Option<&[u8]>> {
        self.current.get(key).map(|r| r.as_deref())
    }
}

/// Visits the live records of a (multi-key) `range` in key order: the overlay's where it has
/// the key, the table's elsewhere; stops when `visit` returns false.
pub(crate) fn merge_current<C: CurrentTable>(
    t: &C,
    ov: &Overlay,
    range: &KeyRange,
    mut visit: impl FnMut(&[u8], &[u8]) -> bool,
) -> Result<()> {
    let mut over = ov.current_in(range).peekable();
    for item in current_rows(t, range)? {
        let (k, v) = item.map_err(db_err)?;
        let k = k.value();
        let mut shadowed = false;
        while let Some((ok, rec)) = over.peek() {
            if ok.as_slice() > k {
                break;
            }
            shadowed = ok.as_slice() == k;
            if let Some(rec) = rec {
                if !visit(ok, rec) {
                    return Ok(());
                }
            }
            over.next();
        }
        if !shadowed && !visit(k, v.value()) {
            return Ok(());
        }
    }
    for (ok, rec) in over {
        if let Some(rec) = rec {
            if !visit(ok, rec) {
                return Ok(());
            }
        }
    }
    Ok(())
}
