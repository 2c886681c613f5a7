//! What readers need in memory: the newest record of every live key, and the history rows
//! applied but not yet committed to redb.
//!
//! Live records: etcd serves reads at the latest revision from its key index and bbolt's
//! pages in memory; Cairn keeps the newest record of each live key here instead of in a redb
//! table, so an apply's commit writes no rows at random keys (only VERSIONS' last leaves). A
//! range's count is a walk of this map, and a list reads only `limit` records. The map is
//! rebuilt from VERSIONS when the store opens, after a snapshot install and after an import
//! (see `index::load`): the newest version of every live key is always retained there.
//!
//! Uncommitted history: applies accumulate in one open redb write txn, committed every
//! [`super::FLUSH_EVERY`] or [`super::FLUSH_ROWS`] rows (etcd's backend batches its bbolt
//! commits the same way, and serves reads through a buffer of the uncommitted writes). A redb
//! read txn sees only committed rows, so readers of older revisions look here first. Everything
//! else a reader may look at (leases, documents, scalars) is committed before it is read: see
//! `Store::flush`.
//!
//! Consistency: an apply changes this map and publishes the txn's revision under the write
//! lock, after the txn's rows are in the open redb txn; rows are cleared (under the write lock)
//! only after that txn committed. A reader holds the read lock from before it reads the
//! revision and opens its redb read txn until it is done, so it sees exactly the state at that
//! revision. Between commit and clear a reader may see a history row in both places; the
//! copies are identical.

use std::collections::BTreeMap;
use std::sync::Arc;

use cairn_backend::{Event, EventKind, KeyRange};

use super::codec::encode_tombstone;
use super::index::bounds;

/// A version's record (see codec.rs), shared by the live map and the history rows.
pub(crate) type Record = Arc<[u8]>;

/// The newest record of each live key.
pub(crate) type Live = BTreeMap<Vec<u8>, Record>;

#[derive(Default)]
pub(crate) struct Overlay {
    live: Live,
    /// (revision, sub-revision) -> record (a tombstone for a delete), applied since the last
    /// commit: VERSIONS' own key, so a lookup compares two integers, not key bytes.
    history: BTreeMap<(u64, u32), Record>,
}

impl Overlay {
    /// An empty overlay over a store whose live records are `live`.
    pub fn new(live: Live) -> Self {
        Overlay {
            live,
            ..Default::default()
        }
    }

    /// Replaces the live records (after a snapshot was installed or data imported).
    pub fn reset_live(&mut self, live: Live) {
        self.live = live;
    }

    /// Number of live keys in a multi-key `range`.
    pub fn count_live(&self, range: &KeyRange) -> i64 {
        match bounds(range) {
            Some(b) => self.live.range::<[u8], _>(b).count() as i64,
            None => 0,
        }
    }

    /// The live records of a multi-key `range`, in key order.
    pub fn live_in<'a>(
        &'a self,
        range: &'a KeyRange,
    ) -> impl Iterator<Item = (&'a Vec<u8>, &'a Record)> + 'a {
        bounds(range)
            .into_iter()
            .flat_map(|b| self.live.range::<[u8], _>(b))
    }

    /// The newest record of `key`, when it is live.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.live.get(key).map(|r| &r[..])
    }

    /// Empties the history rows (after they were committed); the live records stay.
    pub fn clear(&mut self) {
        self.history.clear();
    }

    pub fn rows(&self) -> usize {
        self.history.len()
    }

    /// Adds what one applied revision wrote: `records` holds each event's record (a put's
    /// encoded key-value, a delete's tombstone), in the order of `events` (their sub-revisions).
    pub fn record(&mut self, rev: i64, events: &[Event], records: Vec<Record>) {
        for (sub, (ev, rec)) in events.iter().zip(records).enumerate() {
            let key = &ev.kv.key;
            let at = (rev as u64, sub as u32);
            match ev.kind {
                EventKind::Put => {
                    self.history.insert(at, rec.clone());
                    match self.live.get_mut(key.as_slice()) {
                        Some(r) => *r = rec,
                        None => {
                            self.live.insert(key.clone(), rec);
                        }
                    }
                }
                EventKind::Delete => {
                    self.live.remove(key.as_slice());
                    debug_assert_eq!(&rec[..], &encode_tombstone(rev)[..]);
                    self.history.insert(at, rec);
                }
            }
        }
    }

    /// The record of the version at (revision, sub-revision) `at`, when it is applied but not
    /// committed.
    pub fn history_record(&self, at: (u64, u32)) -> Option<&[u8]> {
        self.history.get(&at).map(|v| &v[..])
    }
}
