//! Whole-store snapshots for raft: what a new or lagging member installs.

use std::io::Cursor;

use cairn_backend::Result;
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::codec::*;
use super::view::db_err;
use super::Store;
use crate::types::{LogId, StoredMembership};

#[derive(Serialize, Deserialize, Default)]
struct Dump {
    current: Vec<(Vec<u8>, Vec<u8>)>,
    history: Vec<((Vec<u8>, u64), Vec<u8>)>,
    events: Vec<((u64, u32), Vec<u8>)>,
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
            .open_table(CURRENT)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = item.map_err(db_err)?;
            d.current.push((k.value().to_vec(), v.value().to_vec()));
        }
        for item in r
            .open_table(HISTORY)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = item.map_err(db_err)?;
            let (key, rev) = k.value();
            d.history.push(((key.to_vec(), rev), v.value().to_vec()));
        }
        for item in r
            .open_table(EVENTS)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = item.map_err(db_err)?;
            d.events.push((k.value(), v.value().to_vec()));
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
            clear(&txn, CURRENT)?;
            clear(&txn, HISTORY)?;
            clear(&txn, EVENTS)?;
            clear(&txn, LEASES)?;
            clear(&txn, LEASE_KEYS)?;
            clear(&txn, META)?;
            clear(&txn, DOCS)?;
            let mut t = txn.open_table(DOCS).map_err(db_err)?;
            for (k, v) in &d.docs {
                t.insert(k.as_str(), v.as_slice()).map_err(db_err)?;
            }
            let mut t = txn.open_table(CURRENT).map_err(db_err)?;
            for (k, v) in &d.current {
                t.insert(k.as_slice(), v.as_slice()).map_err(db_err)?;
            }
            let mut t = txn.open_table(HISTORY).map_err(db_err)?;
            for ((k, r), v) in &d.history {
                t.insert((k.as_slice(), *r), v.as_slice()).map_err(db_err)?;
            }
            let mut t = txn.open_table(EVENTS).map_err(db_err)?;
            for (k, v) in &d.events {
                t.insert(*k, v.as_slice()).map_err(db_err)?;
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
        txn.commit().map_err(db_err)?;
        let (rev, compact) = {
            let r = db.begin_read().map_err(db_err)?;
            let meta = r.open_table(META).map_err(db_err)?;
            (
                super::read_i64(&meta, M_REVISION)?,
                super::read_i64(&meta, M_COMPACT)?,
            )
        };
        self.overlay.write().reset_live(super::live_keys(&db)?);
        self.revision
            .store(rev, std::sync::atomic::Ordering::Release);
        self.compact
            .store(compact, std::sync::atomic::Ordering::Release);
        drop(db);
        self.reset_lease_clock()
    }
}
