//! A read view of the store with an in-memory overlay of one txn's writes, so that a txn that
//! fails half-way leaves the tables untouched (etcd's "all or nothing").

use std::collections::BTreeMap;

use cairn_backend::exec::TxnView;
use cairn_backend::{
    BackendError, Event, EventKind, KeyRange, KeyValue, LeaseId, Result, Revision,
};
use redb::ReadableTable;

use parking_lot::RwLock;

use super::codec::{decode_kv, decode_version, index_sub};
use super::index::KeyIndex;
use super::overlay::Overlay;

pub(crate) trait VersionsTable: ReadableTable<(u64, u32), &'static [u8]> {}
impl<T: ReadableTable<(u64, u32), &'static [u8]>> VersionsTable for T {}
pub(crate) trait LeaseTable: ReadableTable<i64, i64> {}
impl<T: ReadableTable<i64, i64>> LeaseTable for T {}

pub(crate) fn db_err(e: impl std::fmt::Display) -> BackendError {
    BackendError::Internal(format!("storage: {e}"))
}

/// What a [`View`] reads: the live records and uncommitted rows, the key index, VERSIONS and
/// LEASES.
pub(crate) struct ViewTables<'a, V, L> {
    pub overlay: &'a Overlay,
    pub index: &'a RwLock<KeyIndex>,
    pub versions: &'a V,
    pub leases: &'a L,
}

pub(crate) struct View<'a, V, L> {
    /// The live records, and the history rows not yet committed to VERSIONS (an apply reads
    /// its own open write txn, which has them too).
    pub overlay: &'a Overlay,
    pub index: &'a RwLock<KeyIndex>,
    pub versions: &'a V,
    pub leases: &'a L,
    pub base: Revision,
    pub compact: Revision,
    /// Newest state of each key this txn wrote (None: deleted), as of `events[..folded]`: built
    /// only when the txn reads after it wrote, so a txn of puts alone copies nothing into it.
    pending: BTreeMap<Vec<u8>, Option<KeyValue>>,
    folded: usize,
    pub events: Vec<Event>,
}

impl<'a, V: VersionsTable, L: LeaseTable> View<'a, V, L> {
    pub fn new(t: ViewTables<'a, V, L>, base: Revision, compact: Revision) -> Self {
        Self {
            overlay: t.overlay,
            index: t.index,
            versions: t.versions,
            leases: t.leases,
            base,
            compact,
            pending: BTreeMap::new(),
            folded: 0,
            events: Vec::new(),
        }
    }

    /// Brings `pending` up to date with the events recorded since it was last.
    fn fold_pending(&mut self) {
        for ev in &self.events[self.folded..] {
            let state = match ev.kind {
                EventKind::Put => Some(ev.kv.clone()),
                EventKind::Delete => None,
            };
            self.pending.insert(ev.kv.key.clone(), state);
        }
        self.folded = self.events.len();
    }

    fn pending_in(&self, range: &KeyRange) -> bool {
        if self.pending.is_empty() {
            return false;
        }
        if range.is_single() {
            return self.pending.contains_key(&range.key);
        }
        self.pending.keys().any(|k| range.contains(k))
    }
}

/// Scans the live records of `range`.
pub(crate) fn scan_current(
    ov: &Overlay,
    range: &KeyRange,
    limit: Option<usize>,
    count_only: bool,
    mut visit: impl FnMut(KeyValue),
) -> i64 {
    let want = |n: usize| !count_only && limit.is_none_or(|l| n < l);
    if range.is_single() {
        return match ov.get(&range.key) {
            Some(rec) => {
                if want(0) {
                    visit(decode_kv(&range.key, rec, true));
                }
                1
            }
            None => 0,
        };
    }
    // The count is a walk of the keys only; records are decoded up to the limit.
    let count = ov.count_live(range);
    if !count_only {
        for (k, rec) in ov.live_in(range).take(limit.unwrap_or(usize::MAX)) {
            visit(decode_kv(k, rec, true));
        }
    }
    count
}

/// The record of version (`rev`, sub-revision of `entry`) from VERSIONS.
pub(crate) fn version_record<V: VersionsTable>(
    versions: &V,
    rev: u64,
    entry: u32,
) -> Result<redb::AccessGuard<'_, &'static [u8]>> {
    versions
        .get((rev, index_sub(entry)))
        .map_err(db_err)?
        .ok_or_else(|| {
            db_err(format!(
                "the index names a version missing at revision {rev}"
            ))
        })
}

/// Scans `range` as of revision `rev` through the key index; a version's record is read
/// (from the overlay, else VERSIONS) only when it is one visited.
#[allow(clippy::too_many_arguments)]
pub(crate) fn scan_history<V: VersionsTable>(
    index: &RwLock<KeyIndex>,
    versions: &V,
    ov: &Overlay,
    range: &KeyRange,
    rev: Revision,
    limit: Option<usize>,
    count_only: bool,
    mut visit: impl FnMut(KeyValue),
) -> Result<i64> {
    // The index lock is held only to list the versions, not while reading their rows.
    let (found, count) = index.read().live_at(range, rev, limit, count_only)?;
    for (key, (r, entry)) in found {
        if let Some(rec) = ov.history_record((r, index_sub(entry))) {
            visit(decode_kv(&key, rec, true));
            continue;
        }
        let row = version_record(versions, r, entry)?;
        visit(decode_kv(&key, decode_version(row.value()).1, true));
    }
    Ok(count)
}

impl<V: VersionsTable, L: LeaseTable> TxnView for View<'_, V, L> {
    fn base_revision(&self) -> Revision {
        self.base
    }

    fn compact_revision(&self) -> Revision {
        self.compact
    }

    fn range_latest(
        &mut self,
        range: &KeyRange,
        limit: Option<usize>,
        count_only: bool,
    ) -> Result<(Vec<KeyValue>, i64)> {
        self.fold_pending();
        if !self.pending_in(range) {
            let mut kvs = Vec::new();
            let count = scan_current(self.overlay, range, limit, count_only, |kv| kvs.push(kv));
            return Ok((kvs, count));
        }
        let mut merged: BTreeMap<Vec<u8>, KeyValue> = BTreeMap::new();
        scan_current(self.overlay, range, None, false, |kv| {
            merged.insert(kv.key.clone(), kv);
        });
        for (k, v) in &self.pending {
            if range.contains(k) {
                match v {
                    Some(kv) => merged.insert(k.clone(), kv.clone()),
                    None => merged.remove(k),
                };
            }
        }
        let count = merged.len() as i64;
        if count_only {
            return Ok((Vec::new(), count));
        }
        let take = limit.unwrap_or(usize::MAX);
        Ok((merged.into_values().take(take).collect(), count))
    }

    fn range_at(
        &mut self,
        range: &KeyRange,
        rev: Revision,
        limit: Option<usize>,
        count_only: bool,
    ) -> Result<(Vec<KeyValue>, i64)> {
        let mut kvs = Vec::new();
        let count = scan_history(
            self.index,
            self.versions,
            self.overlay,
            range,
            rev,
            limit,
            count_only,
            |kv| kvs.push(kv),
        )?;
        Ok((kvs, count))
    }

    fn lease_exists(&mut self, id: LeaseId) -> Result<bool> {
        Ok(self.leases.get(id).map_err(db_err)?.is_some())
    }

    fn put(&mut self, kv: KeyValue, prev: Option<KeyValue>) -> Result<()> {
        self.events.push(Event {
            kind: EventKind::Put,
            kv,
            prev_kv: prev,
        });
        Ok(())
    }

    fn delete(&mut self, prev: KeyValue, rev: Revision) -> Result<()> {
        let kv = KeyValue {
            key: prev.key.clone(),
            mod_revision: rev,
            ..Default::default()
        };
        self.events.push(Event {
            kind: EventKind::Delete,
            kv,
            prev_kv: Some(prev),
        });
        Ok(())
    }
}
