//! The in-memory index of every retained version by key, as etcd's treeIndex.
//!
//! VERSIONS is keyed by revision, so an apply appends to its last leaf. Reads at an older
//! revision, the previous version of a watched event, compaction and the hash need the versions
//! of a key, which this index lists: key -> (revision, [`index_entry`]) in revision order. It
//! is rebuilt from VERSIONS when the store opens and after a snapshot is installed, and never
//! written to disk, so a commit writes only the appended VERSIONS pages.
//!
//! Consistency with readers (see `Store::read`): an apply inserts a version before it
//! publishes the revision, so a reader filters by the revision it reads at and never picks a
//! version whose row it cannot see. Physical compaction removes versions here before it
//! commits their removal from VERSIONS, and raises [`KeyIndex::compacted`] first: a reader
//! that finds versions gone also finds that its revision is compacted.

use std::collections::BTreeMap;
use std::ops::Bound;

use cairn_backend::{BackendError, KeyRange, Result, Revision};
use redb::{Database, ReadableTable};

use super::codec::{decode_version, index_entry, index_tombstone, is_tombstone, VERSIONS};
use super::overlay::Live;
use super::view::db_err;

/// One version: its revision and its [`index_entry`] (sub-revision, tombstone mark).
pub(crate) type Ver = (u64, u32);

/// A key's versions: the newest kept in the map's node, so that counting live keys reads no
/// other memory (and a key written once allocates nothing more).
struct Vers {
    newest: Ver,
    /// Older versions, oldest first.
    older: Vec<Ver>,
}

impl Vers {
    /// The newest version at or below `rev`.
    fn at(&self, rev: u64) -> Option<Ver> {
        if self.newest.0 <= rev {
            return Some(self.newest);
        }
        let n = self.older.partition_point(|v| v.0 <= rev);
        n.checked_sub(1).map(|i| self.older[i])
    }

    fn iter(&self) -> impl Iterator<Item = Ver> + '_ {
        self.older
            .iter()
            .copied()
            .chain(std::iter::once(self.newest))
    }
}

#[derive(Default)]
pub(crate) struct KeyIndex {
    keys: BTreeMap<Vec<u8>, Vers>,
    /// Reads below this revision are refused: versions they need may be gone.
    compacted: Revision,
    /// Versions held, for tests and the log line at start-up.
    versions: usize,
}

/// Versions found, each with its key.
pub(crate) type Found = Vec<(Vec<u8>, Ver)>;

type KeyBounds<'a> = (Bound<&'a [u8]>, Bound<&'a [u8]>);

/// The bounds of a multi-key `range` in the key order, or `None` when it is empty.
pub(super) fn bounds(range: &KeyRange) -> Option<KeyBounds<'_>> {
    let lo = Bound::Included(range.key.as_slice());
    let hi = match range.upper() {
        Some(end) if end <= range.key.as_slice() => return None,
        Some(end) => Bound::Excluded(end),
        None => Bound::Unbounded,
    };
    Some((lo, hi))
}

impl KeyIndex {
    /// The index of every row in VERSIONS, and the newest record of every live key (see
    /// overlay.rs), from one walk in revision order.
    pub fn load(db: &Database, compacted: Revision) -> Result<(KeyIndex, Live)> {
        let r = db.begin_read().map_err(db_err)?;
        let versions = r.open_table(VERSIONS).map_err(db_err)?;
        let mut out = KeyIndex {
            compacted,
            ..Default::default()
        };
        let mut live = Live::new();
        for item in versions.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            let (rev, sub) = k.value();
            let (key, rec) = decode_version(v.value());
            let tombstone = is_tombstone(rec);
            out.insert(key, rev, index_entry(sub, tombstone));
            if tombstone {
                live.remove(key);
            } else if let Some(newest) = live.get_mut(key) {
                *newest = rec.into();
            } else {
                live.insert(key.to_vec(), rec.into());
            }
        }
        Ok((out, live))
    }

    pub fn len(&self) -> usize {
        self.versions
    }

    /// Adds a version; versions of a key normally come in revision order.
    pub fn insert(&mut self, key: &[u8], rev: u64, entry: u32) {
        let Some(vers) = self.keys.get_mut(key) else {
            self.keys.insert(
                key.to_vec(),
                Vers {
                    newest: (rev, entry),
                    older: Vec::new(),
                },
            );
            self.versions += 1;
            return;
        };
        if rev > vers.newest.0 {
            vers.older.push(vers.newest);
            vers.newest = (rev, entry);
        } else if rev == vers.newest.0 {
            vers.newest.1 = entry;
            return;
        } else {
            let at = vers.older.partition_point(|v| v.0 < rev);
            if vers.older.get(at).is_some_and(|v| v.0 == rev) {
                vers.older[at].1 = entry;
                return;
            }
            vers.older.insert(at, (rev, entry));
        }
        self.versions += 1;
    }

    /// Removes a version (compaction).
    pub fn remove(&mut self, key: &[u8], rev: u64) {
        let Some(vers) = self.keys.get_mut(key) else {
            return;
        };
        if vers.newest.0 == rev {
            self.versions -= 1;
            match vers.older.pop() {
                Some(v) => vers.newest = v,
                None => {
                    self.keys.remove(key);
                }
            }
        } else if let Ok(at) = vers.older.binary_search_by_key(&rev, |v| v.0) {
            vers.older.remove(at);
            self.versions -= 1;
        }
    }

    /// Refuses reads below `rev` from now on (before versions they need are removed).
    pub fn set_compacted(&mut self, rev: Revision) {
        self.compacted = self.compacted.max(rev);
    }

    fn check(&self, rev: Revision) -> Result<()> {
        if rev < self.compacted {
            return Err(BackendError::Compacted {
                compact_revision: self.compacted,
            });
        }
        Ok(())
    }

    /// The live versions of `range` as of `rev` in key order, the first `limit` of them (none
    /// when `count_only`), and how many there are.
    pub fn live_at(
        &self,
        range: &KeyRange,
        rev: Revision,
        limit: Option<usize>,
        count_only: bool,
    ) -> Result<(Found, i64)> {
        self.check(rev)?;
        let at = rev.max(0) as u64;
        let mut out = Vec::new();
        let mut count = 0usize;
        let mut visit = |key: &Vec<u8>, vers: &Vers| {
            if let Some(v) = vers.at(at).filter(|v| !index_tombstone(v.1)) {
                if !count_only && limit.is_none_or(|l| count < l) {
                    out.push((key.clone(), v));
                }
                count += 1;
            }
        };
        if range.is_single() {
            if let Some((k, vers)) = self.keys.get_key_value(range.key.as_slice()) {
                visit(k, vers);
            }
        } else if let Some(b) = bounds(range) {
            for (k, vers) in self.keys.range::<[u8], _>(b) {
                visit(k, vers);
            }
        }
        Ok((out, count as i64))
    }

    /// The newest version of `key` below `rev`.
    pub fn newest_below(&self, key: &[u8], rev: u64) -> Option<Ver> {
        self.keys.get(key)?.at(rev.checked_sub(1)?)
    }

    /// The versions of `key` at or below `rev`, oldest first.
    pub fn versions_upto(&self, key: &[u8], rev: u64) -> Vec<Ver> {
        let Some(vers) = self.keys.get(key) else {
            return Vec::new();
        };
        vers.iter().take_while(|v| v.0 <= rev).collect()
    }

    /// Every version in (`above`, `upto`] in (key, revision) order.
    pub fn all_between(&self, above: u64, upto: u64) -> Found {
        let mut out = Vec::new();
        for (k, vers) in &self.keys {
            for v in vers.iter() {
                if v.0 > above && v.0 <= upto {
                    out.push((k.clone(), v));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_at_a_revision_skips_newer_and_tombstones() {
        let mut ix = KeyIndex::default();
        ix.insert(b"a", 2, index_entry(0, false));
        ix.insert(b"a", 5, index_entry(0, true));
        ix.insert(b"b", 3, index_entry(1, false));
        ix.insert(b"b", 7, index_entry(0, false));
        let all = KeyRange::new(b"a".to_vec(), b"z".to_vec());
        let (found, n) = ix.live_at(&all, 4, None, false).unwrap();
        assert_eq!(n, 2);
        assert_eq!(found[0], (b"a".to_vec(), (2, 0)));
        assert_eq!(found[1], (b"b".to_vec(), (3, 1)));
        let (found, n) = ix.live_at(&all, 6, Some(1), false).unwrap();
        assert_eq!((n, found), (1, vec![(b"b".to_vec(), (3, 1))]));
        assert_eq!(ix.live_at(&all, 1, None, false).unwrap().1, 0);
        assert_eq!(ix.newest_below(b"b", 7), Some((3, 1)));
        assert_eq!(ix.newest_below(b"b", 3), None);
        // Out of order (a snapshot of another layout) lands in order; a repeat replaces.
        ix.insert(b"b", 5, index_entry(2, false));
        ix.insert(b"b", 5, index_entry(3, false));
        assert_eq!(ix.versions_upto(b"b", 6), vec![(3, 1), (5, 3)]);
        assert_eq!(ix.len(), 5);
        ix.remove(b"a", 2);
        ix.remove(b"a", 5);
        assert_eq!(ix.len(), 3);
        assert!(!ix.keys.contains_key(b"a".as_slice()));
        ix.set_compacted(5);
        assert!(matches!(
            ix.live_at(&all, 4, None, false),
            Err(BackendError::Compacted {
                compact_revision: 5
            })
        ));
    }
}
