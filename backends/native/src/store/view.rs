//! A read view of the store with an in-memory overlay of one txn's writes, so that a txn that
//! fails half-way leaves the tables untouched (etcd's "all or nothing").

use std::collections::BTreeMap;

use cairn_backend::exec::TxnView;
use cairn_backend::{
    BackendError, Event, EventKind, KeyRange, KeyValue, LeaseId, Result, Revision,
};
use redb::ReadableTable;

use super::codec::{decode_kv, decode_version, index_sub, index_tombstone, is_tombstone};
use super::overlay::{merge_current, merge_history, Overlay, Src};

pub(crate) trait CurrentTable: ReadableTable<&'static [u8], &'static [u8]> {}
impl<T: ReadableTable<&'static [u8], &'static [u8]>> CurrentTable for T {}
pub(crate) trait IndexTable: ReadableTable<(&'static [u8], u64), u32> {}
impl<T: ReadableTable<(&'static [u8], u64), u32>> IndexTable for T {}
pub(crate) trait VersionsTable: ReadableTable<(u64, u32), &'static [u8]> {}
impl<T: ReadableTable<(u64, u32), &'static [u8]>> VersionsTable for T {}
pub(crate) trait LeaseTable: ReadableTable<i64, i64> {}
impl<T: ReadableTable<i64, i64>> LeaseTable for T {}

pub(crate) fn db_err(e: impl std::fmt::Display) -> BackendError {
    BackendError::Internal(format!("storage: {e}"))
}

/// The tables a [`View`] reads: CURRENT, KEY_REVS, VERSIONS and LEASES.
pub(crate) struct ViewTables<'a, C, I, V, L> {
    pub current: &'a C,
    pub index: &'a I,
    pub versions: &'a V,
    pub leases: &'a L,
}

pub(crate) struct View<'a, C, I, V, L> {
    pub current: &'a C,
    pub index: &'a I,
    pub versions: &'a V,
    pub leases: &'a L,
    /// Applied rows not yet committed to the tables (readers only; an apply reads its own
    /// open write txn, which has them).
    pub overlay: Option<&'a Overlay>,
    pub base: Revision,
    pub compact: Revision,
    /// Newest state of each key this txn wrote (None: deleted).
    pub pending: BTreeMap<Vec<u8>, Option<KeyValue>>,
    pub events: Vec<Event>,
}

impl<'a, C: CurrentTable, I: IndexTable, V: VersionsTable, L: LeaseTable> View<'a, C, I, V, L> {
    pub fn new(t: ViewTables<'a, C, I, V, L>, base: Revision, compact: Revision) -> Self {
        Self {
            current: t.current,
            index: t.index,
            versions: t.versions,
            leases: t.leases,
            overlay: None,
            base,
            compact,
            pending: BTreeMap::new(),
            events: Vec::new(),
        }
    }

    /// Reads through `overlay` as well.
    pub fn with_overlay(mut self, overlay: &'a Overlay) -> Self {
        self.overlay = Some(overlay);
        self
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

/// Scans live keys of `range` from the CURRENT table.
pub(crate) fn scan_current<C: CurrentTable>(
    t: &C,
    ov: Option<&Overlay>,
    range: &KeyRange,
    limit: Option<usize>,
    count_only: bool,
    mut visit: impl FnMut(KeyValue),
) -> Result<i64> {
    let want = |n: usize| !count_only && limit.is_none_or(|l| n < l);
    if range.is_single() {
        if let Some(known) = ov.and_then(|o| o.get_current(&range.key)) {
            return Ok(match known {
                Some(rec) => {
                    if want(0) {
                        visit(decode_kv(&range.key, rec, true));
                    }
                    1
                }
                None => 0,
            });
        }
        return match t.get(range.key.as_slice()).map_err(db_err)? {
            Some(v) => {
                if want(0) {
                    visit(decode_kv(&range.key, v.value(), true));
                }
                Ok(1)
            }
            None => Ok(0),
        };
    }
    if let Some(ov) = ov {
        // A reader: the live key set has the count, so rows are read only up to the limit.
        let count = ov.count_live(range);
        if count_only {
            return Ok(count);
        }
        let mut n = 0usize;
        let take = |k: &[u8], v: &[u8]| {
            if !want(n) {
                return false;
            }
            visit(decode_kv(k, v, true));
            n += 1;
            true
        };
        merge_current(t, ov, range, take)?;
        return Ok(count);
    }
    let mut n = 0usize;
    for item in current_rows(t, range)? {
        let (k, v) = item.map_err(db_err)?;
        if want(n) {
            visit(decode_kv(k.value(), v.value(), true));
        }
        n += 1;
    }
    Ok(n as i64)
}

/// The CURRENT rows of a multi-key `range`.
pub(crate) fn current_rows<'t, C: CurrentTable>(
    t: &'t C,
    range: &KeyRange,
) -> Result<redb::Range<'t, &'static [u8], &'static [u8]>> {
    let key = range.key.as_slice();
    match range.upper() {
        Some(end) => t.range::<&[u8]>(key..end),
        None => t.range::<&[u8]>(key..),
    }
    .map_err(db_err)
}

/// Where the newest version at or below a read's revision was found.
enum Found {
    /// An overlay record (copied).
    Record(Vec<u8>),
    /// A KEY_REVS value: the record is in VERSIONS.
    Indexed(u32),
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

/// Scans `range` as of revision `rev` through the KEY_REVS index; a version's record is read
/// from VERSIONS only when it is the one visited.
pub(crate) fn scan_history<I: IndexTable, V: VersionsTable>(
    index: &I,
    versions: &V,
    ov: Option<&Overlay>,
    range: &KeyRange,
    rev: Revision,
    limit: Option<usize>,
    count_only: bool,
    mut visit: impl FnMut(KeyValue),
) -> Result<i64> {
    let rev = rev as u64;
    let mut n = 0usize;
    // The key being walked and its newest version at or below `rev` so far.
    let mut last: Option<(Vec<u8>, u64, Found)> = None;
    let mut emit = |last: Option<(Vec<u8>, u64, Found)>, n: &mut usize| -> Result<()> {
        let Some((k, r, found)) = last else {
            return Ok(());
        };
        let tombstone = match &found {
            Found::Record(rec) => is_tombstone(rec),
            Found::Indexed(entry) => index_tombstone(*entry),
        };
        if tombstone {
            return Ok(());
        }
        if !count_only && limit.is_none_or(|l| *n < l) {
            let kv = match found {
                Found::Record(rec) => decode_kv(&k, &rec, true),
                Found::Indexed(entry) => {
                    let row = version_record(versions, r, entry)?;
                    decode_kv(&k, decode_version(row.value()).1, true)
                }
            };
            visit(kv);
        }
        *n += 1;
        Ok(())
    };
    let mut step = |key: &[u8], r: u64, src: Src<'_>| -> Result<()> {
        if last.as_ref().is_some_and(|(lk, _, _)| lk.as_slice() != key) {
            emit(last.take(), &mut n)?;
        }
        if r <= rev {
            let found = match src {
                Src::Overlay(rec) => Found::Record(rec.to_vec()),
                Src::Table(entry) => Found::Indexed(entry),
            };
            match &mut last {
                Some((_, lr, lf)) => {
                    *lr = r;
                    *lf = found;
                }
                None => last = Some((key.to_vec(), r, found)),
            }
        }
        Ok(())
    };
    let empty = Overlay::default();
    merge_history(index, ov.unwrap_or(&empty), range, rev, &mut step)?;
    emit(last.take(), &mut n)?;
    Ok(n as i64)
}

impl<C: CurrentTable, I: IndexTable, V: VersionsTable, L: LeaseTable> TxnView
    for View<'_, C, I, V, L>
{
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
        if !self.pending_in(range) {
            let mut kvs = Vec::new();
            let count = scan_current(self.current, self.overlay, range, limit, count_only, |kv| {
                kvs.push(kv)
            })?;
            return Ok((kvs, count));
        }
        let mut merged: BTreeMap<Vec<u8>, KeyValue> = BTreeMap::new();
        scan_current(self.current, self.overlay, range, None, false, |kv| {
            merged.insert(kv.key.clone(), kv);
        })?;
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
        self.pending.insert(kv.key.clone(), Some(kv.clone()));
        self.events.push(Event {
            kind: EventKind::Put,
            kv,
            prev_kv: prev,
        });
        Ok(())
    }

    fn delete(&mut self, prev: KeyValue, rev: Revision) -> Result<()> {
        self.pending.insert(prev.key.clone(), None);
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
