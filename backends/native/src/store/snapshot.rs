//! Whole-store snapshots for raft: what a new or lagging member installs.

use std::io::Cursor;

use cairn_backend::Result;
use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use super::codec::*;
use super::view::db_err;
use super::Store;
use crate::types::{LogId, StoredMembership};

/// Every table. The key index and the live records are not tables: an install rebuilds them
/// from VERSIONS.
#[derive(Serialize, Deserialize, Default)]
struct Dump {
    /// VERSIONS: (revision, sub-revision) -> row.
    versions: Vec<((u64, u32), Vec<u8>)>,
    leases: Vec<(i64, i64)>,
    lease_keys: Vec<(i64, Vec<u8>)>,
    meta: Vec<(String, Vec<u8>)>,
    docs: Vec<(String, Vec<u8>)>,
}

impl Store {
    /// Serialises every table as of the last applied entry, made durable first (raft may purge
    /// its log up to it); returns that entry's state with the data, both from one read txn.
    pub fn dump(&self) -> Result<(super::AppliedState, Vec<u8>)> {
        let mut w = self.writer.lock();
        self.sync_locked(&mut w)?;
        let db = self.db.read();
        let r = db.begin_read().map_err(db_err)?;
        drop(w);
        let state = super::applied_in(&r)?;
        let mut d = Dump::default();
        for item in r
            .open_table(VERSIONS)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = item.map_err(db_err)?;
            d.versions.push((k.value(), v.value().to_vec()));
        }
        for item in r
            .open_table(LEASES)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = item.map_err(db_err)?;
            d.leases.push((k.value(), v.value()));
        }
        for item in r
            .open_table(LEASE_KEYS)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, _) = item.map_err(db_err)?;
            let (id, key) = k.value();
            d.lease_keys.push((id, key.to_vec()));
        }
        for item in r.open_table(META).map_err(db_err)?.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            // A member installing this has the imported data; the mark is this member's.
            if k.value() == M_IMPORT_UNSNAPSHOTTED {
                continue;
            }
            d.meta.push((k.value().to_string(), v.value().to_vec()));
        }
        for item in r.open_table(DOCS).map_err(db_err)?.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            d.docs.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok((state, postcard::to_allocvec(&d).map_err(db_err)?))
    }

    /// Replaces the whole store with a snapshot taken at `applied`.
    pub fn install(
        &self,
        data: Cursor<Vec<u8>>,
        applied: Option<LogId>,
        membership: &StoredMembership,
    ) -> Result<()> {
        let d: Dump = postcard::from_bytes(data.get_ref()).map_err(db_err)?;
        let mut w = self.writer.lock();
        self.commit(&mut w, false)?;
        let db = self.db.read();
        let mut txn = db.begin_write().map_err(db_err)?;
        txn.set_durability(redb::Durability::Immediate);
        {
            fn clear<K: redb::Key + 'static, V: redb::Value + 'static>(
                txn: &redb::WriteTransaction,
                def: TableDefinition<K, V>,
            ) -> Result<()> {
                txn.delete_table(def).map_err(db_err)?;
                txn.open_table(def).map_err(db_err)?;
                Ok(())
            }
            clear(&txn, VERSIONS)?;
            clear(&txn, LEASES)?;
            clear(&txn, LEASE_KEYS)?;
            clear(&txn, META)?;
            clear(&txn, DOCS)?;
            let mut t = txn.open_table(DOCS).map_err(db_err)?;
            for (k, v) in &d.docs {
                t.insert(k.as_str(), v.as_slice()).map_err(db_err)?;
            }
            let mut t = txn.open_table(VERSIONS).map_err(db_err)?;
            for ((rev, sub), row) in &d.versions {
                let Some((key, rec)) = try_decode_version(row).filter(|(_, rec)| rec.len() >= 32)
                else {
                    return Err(db_err(format!(
                        "snapshot: bad version row at revision {rev}"
                    )));
                };
                super::insert_version(&mut t, key, *rev, *sub, rec)?;
            }
            let mut t = txn.open_table(LEASES).map_err(db_err)?;
            for (k, v) in &d.leases {
                t.insert(*k, *v).map_err(db_err)?;
            }
            let mut t = txn.open_table(LEASE_KEYS).map_err(db_err)?;
            for (id, k) in &d.lease_keys {
                t.insert((*id, k.as_slice()), ()).map_err(db_err)?;
            }
            let mut t = txn.open_table(META).map_err(db_err)?;
            for (k, v) in &d.meta {
                t.insert(k.as_str(), v.as_slice()).map_err(db_err)?;
            }
            let a = postcard::to_allocvec(&applied).map_err(db_err)?;
            t.insert(M_APPLIED, a.as_slice()).map_err(db_err)?;
            let m = postcard::to_allocvec(membership).map_err(db_err)?;
            t.insert(M_MEMBERSHIP, m.as_slice()).map_err(db_err)?;
        }
        let mut ov = self.overlay.write();
        txn.commit().map_err(db_err)?;
        let (rev, compact) = {
            let r = db.begin_read().map_err(db_err)?;
            let meta = r.open_table(META).map_err(db_err)?;
            (
                super::read_i64(&meta, M_REVISION)?,
                super::read_i64(&meta, M_COMPACT)?,
            )
        };
        self.reload_memory(&db, &mut ov, rev, compact)?;
        drop(ov);
        drop(db);
        self.load_lease_clock()
    }
}

/// Set in META while an imported etcd key space is not yet in a raft snapshot: until it is,
/// a member joining would replay a log that never held that data.
pub const M_IMPORT_UNSNAPSHOTTED: &str = "import_unsnapshotted";

impl Store {
    /// Whether nothing was ever applied or written here: what an import needs.
    fn is_fresh(&self) -> Result<bool> {
        let db = self.db.read();
        let r = db.begin_read().map_err(db_err)?;
        let fresh = super::applied_in(&r)?.last_applied.is_none()
            && r.open_table(VERSIONS)
                .map_err(db_err)?
                .is_empty()
                .map_err(db_err)?
            && r.open_table(LEASES)
                .map_err(db_err)?
                .is_empty()
                .map_err(db_err)?;
        Ok(fresh)
    }

    /// Loads etcd's data (a data dir's `member/snap/db`, as `etcdctl snapshot restore` leaves
    /// it) into a fresh store, keeping every revision: each retained version with its create
    /// and mod revision, version and lease, the current and compact revisions, the leases
    /// (their TTLs start afresh, as when etcd restarts). Returns false, changing nothing, when
    /// the store already holds data.
    pub fn import_etcd(&self, snap: &cairn_bbolt::etcd::Snapshot) -> Result<bool> {
        if !self.is_fresh()? {
            return Ok(false);
        }
        let compact = snap.compact_revision.max(0);
        let mut versions: Vec<&cairn_bbolt::etcd::Version> = snap.versions.iter().collect();
        versions.sort_by_key(|v| (v.revision, v.sub));
        let revision = versions
            .last()
            .map_or(1, |v| v.revision)
            .max(compact)
            .max(1);
        let mut w = self.writer.lock();
        self.commit(&mut w, false)?;
        let db = self.db.read();
        let mut txn = db.begin_write().map_err(db_err)?;
        txn.set_durability(redb::Durability::Immediate);
        {
            let mut versions_t = txn.open_table(VERSIONS).map_err(db_err)?;
            let mut lease_keys = txn.open_table(LEASE_KEYS).map_err(db_err)?;
            // The newest version of each key decides what is live.
            let mut newest: std::collections::BTreeMap<&[u8], &cairn_bbolt::etcd::Version> =
                Default::default();
            for v in &versions {
                let rec = if v.tombstone {
                    encode_tombstone(v.revision)
                } else {
                    encode_kv(&cairn_backend::KeyValue {
                        key: v.key.clone(),
                        create_revision: v.create_revision,
                        mod_revision: v.revision,
                        version: v.version,
                        value: v.value.clone(),
                        lease: v.lease,
                    })
                };
                if !(0..1 << 31).contains(&v.sub) || v.revision < 0 {
                    return Err(db_err(format!(
                        "etcd data: revision {}_{} out of range",
                        v.revision, v.sub
                    )));
                }
                let (rev, sub) = (v.revision as u64, v.sub as u32);
                super::insert_version(&mut versions_t, &v.key, rev, sub, &rec)?;
                newest.insert(&v.key, v);
            }
            for (key, v) in newest {
                if !v.tombstone && v.lease != 0 {
                    lease_keys.insert((v.lease, key), ()).map_err(db_err)?;
                }
            }
            let mut leases = txn.open_table(LEASES).map_err(db_err)?;
            for l in &snap.leases {
                leases.insert(l.id, l.ttl).map_err(db_err)?;
            }
            let mut meta = txn.open_table(META).map_err(db_err)?;
            meta.insert(M_REVISION, enc_i64(revision).as_slice())
                .map_err(db_err)?;
            meta.insert(M_COMPACT, enc_i64(compact).as_slice())
                .map_err(db_err)?;
            meta.insert(M_PHYSICAL, enc_i64(compact).as_slice())
                .map_err(db_err)?;
            meta.insert(M_IMPORT_UNSNAPSHOTTED, [1u8].as_slice())
                .map_err(db_err)?;
        }
        let mut ov = self.overlay.write();
        txn.commit().map_err(db_err)?;
        self.reload_memory(&db, &mut ov, revision, compact)?;
        drop(ov);
        drop(db);
        drop(w);
        self.load_lease_clock()?;
        Ok(true)
    }

    /// Whether an imported key space still waits for its first raft snapshot.
    pub fn import_unsnapshotted(&self) -> Result<bool> {
        let db = self.db.read();
        let r = db.begin_read().map_err(db_err)?;
        let meta = r.open_table(META).map_err(db_err)?;
        Ok(meta.get(M_IMPORT_UNSNAPSHOTTED).map_err(db_err)?.is_some())
    }

    /// Clears [`M_IMPORT_UNSNAPSHOTTED`] once a snapshot holds the import.
    pub fn import_snapshotted(&self) -> Result<()> {
        let mut w = self.writer.lock();
        self.commit(&mut w, false)?;
        let db = self.db.read();
        let mut txn = db.begin_write().map_err(db_err)?;
        txn.set_durability(redb::Durability::Immediate);
        txn.open_table(META)
            .map_err(db_err)?
            .remove(M_IMPORT_UNSNAPSHOTTED)
            .map_err(db_err)?;
        txn.commit().map_err(db_err)
    }
}
