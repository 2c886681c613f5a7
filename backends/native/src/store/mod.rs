//! The state machine's storage: etcd's MVCC key space, leases and raft metadata in redb.
//!
//! Invariants:
//! - Applied entries accumulate in one open redb write txn, together with the `last_applied`
//!   log id, and are committed together every [`FLUSH_EVERY`] or [`FLUSH_ROWS`] rows (as etcd
//!   batches bbolt commits), so after a crash the store is exactly the state after some entry
//!   and raft replays the rest from the write-ahead log. The newest record of each live key
//!   is kept in memory (the [`overlay`]), rebuilt from VERSIONS at open, so commits write no
//!   rows at random keys. Readers see applied but uncommitted history rows through the
//!   overlay; whatever it does not cover is committed first ([`Store::flush`]).
//! - Commits are not synced one by one (the write-ahead log is the durable copy); a synced
//!   commit happens at least every [`SYNC_EVERY`] and before a snapshot lets raft purge its log.
//! - The change feed is published only after the change is visible to readers, so a watcher
//!   that subscribes, then reads history, misses nothing.

mod codec;
mod compact;
mod feed;
mod index;
mod migrate;
mod overlay;
mod snapshot;
mod view;

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_backend::exec::{self, TxnView};
use cairn_backend::{
    BackendError, ChangeBatch, CompactResponse, Event, EventKind, HashKv, KeyRange, LeaseGrant,
    LeaseId, LeaseInfo, RangeRequest, RangeResponse, Result, Revision, TxnRequest, TxnResponse,
};
use parking_lot::{Mutex, RwLock};
use redb::{Database, Durability, ReadableTable, WriteTransaction};
use tokio::sync::broadcast;

pub(crate) use codec::*;
use index::KeyIndex;
use overlay::{Overlay, Record};
pub(crate) use view::db_err;
use view::{View, ViewTables};

use crate::leases::LeaseClock;
use crate::types::{Command, CommandResult, LogId, StoredMembership};

/// Longest time between synced commits of the state machine.
const SYNC_EVERY: Duration = Duration::from_millis(1000);
/// Longest time applied rows wait in the open write txn before it is committed.
const FLUSH_EVERY: Duration = Duration::from_millis(1000);
/// Most history rows in the open write txn (and the overlay) before it is committed.
const FLUSH_ROWS: usize = 10_000;
/// Most VERSIONS rows an apply leaves for the raft thread's idle time (see
/// `OpenTables::rows`).
const DEFER_ROWS: usize = 64;
/// Longest time the quota check relies on an estimate of the in-use bytes.
const MEASURE_EVERY: Duration = Duration::from_millis(1000);
/// Measuring walks every tree with writers held off, so it takes at most one part in this many
/// of the time: a store of hundreds of MB is measured every few minutes, not every second.
const MEASURE_SHARE: u32 = 200;

pub(crate) struct Store {
    /// Behind a lock only so that [`Store::defragment`] can get `&mut Database`; everything
    /// else holds the read side for the whole of its redb transaction.
    db: RwLock<Database>,
    /// The write txn applies accumulate into. Lock order: `writer`, then `db`, then `overlay`.
    writer: Mutex<Pending>,
    /// The live records, and the history rows of `writer`'s txn, for readers. An apply
    /// changes it and publishes `revision` under its write lock, one txn at a time.
    overlay: RwLock<Overlay>,
    /// Every retained version by key (see index.rs). Taken last (after `writer`, `db` and
    /// `overlay`), and held only to list or change versions, never while their rows are read,
    /// except by physical compaction, which holds it while it removes them.
    index: RwLock<KeyIndex>,
    path: std::path::PathBuf,
    pub feed: broadcast::Sender<Arc<ChangeBatch>>,
    pub leases: LeaseClock,
    /// Current and compact revision, mirrored from META for cheap reads.
    pub revision: AtomicI64,
    /// Requests applied since the process started (a group-commit entry counts each of its
    /// requests): what `--snapshot-count` counts.
    pub applied_requests: std::sync::atomic::AtomicU64,
    pub compact: AtomicI64,
    last_sync: Mutex<Instant>,
    pub compactor: tokio::sync::Notify,
    /// The bytes redb's tables hold when last measured, and the bytes applied since (an estimate of
    /// the growth), so that the quota check costs nothing per write; see [`Store::in_use`].
    measured_in_use: AtomicI64,
    written_since: AtomicI64,
    /// When the last measurement was taken, and how long it took.
    measured_at: Mutex<(Instant, Duration)>,
    /// Held while deciding to measure and measuring, so that callers who all find the
    /// estimate due (every write at once, under load) measure once, not once each.
    measuring: Mutex<()>,
    /// Set while a caller that must not wait measures (see [`Store::claim_measurement`]).
    measure_claimed: std::sync::atomic::AtomicBool,
    /// Measurements taken since the store was opened.
    measurements: std::sync::atomic::AtomicU64,
}

impl Drop for Store {
    /// Ends the open write txn before the database closes (closing waits for it). It is
    /// committed, not synced: raft's log still has its entries if this is a crash.
    fn drop(&mut self) {
        if let Some(open) = self.writer.get_mut().txn.take() {
            if let Err(e) = open.finish().and_then(|txn| txn.commit().map_err(db_err)) {
                tracing::warn!(error = %e, "committing the state machine on close failed");
            }
        }
    }
}

/// The right to take a due measurement of the in-use bytes, given up when dropped.
pub(crate) struct MeasureClaim(Arc<Store>);

impl Drop for MeasureClaim {
    fn drop(&mut self) {
        self.0.measure_claimed.store(false, Ordering::Release);
    }
}

/// The open write txn and when it was begun.
struct Pending {
    txn: Option<OpenTxn>,
    opened: Instant,
}

self_cell::self_cell!(
    /// The open write txn with its tables, which stay open from the first apply to the commit:
    /// opening redb's five tables for each apply (each a lookup in redb's table tree and a
    /// decode of its definition) cost more allocations than the puts of a 16-client group.
    struct OpenTxn {
        owner: WriteTransaction,
        #[not_covariant]
        dependent: OpenTables,
    }
);

/// The tables an apply writes, open in the txn `'t`.
struct OpenTables<'t> {
    versions: redb::Table<'t, (u64, u32), &'static [u8]>,
    leases: redb::Table<'t, i64, i64>,
    lease_keys: redb::Table<'t, (i64, &'static [u8]), ()>,
    docs: redb::Table<'t, &'static str, &'static [u8]>,
    meta: redb::Table<'t, &'static str, &'static [u8]>,
    /// VERSIONS rows applied but not yet inserted, back to back, and each one's key and start
    /// in `rows`. An apply leaves them here and the raft thread inserts them when it has
    /// nothing else to run ([`Store::insert_deferred`]) or before the txn commits, so a lone
    /// write's reply does not wait for redb's insert; readers find them in the overlay
    /// meanwhile, which holds every row of the open txn. Both keep their allocations.
    rows: Vec<u8>,
    deferred: Vec<((u64, u32), usize)>,
    /// The revision, compacted revision and last applied log id as of the last apply. They
    /// go into META once, when the txn is committed ([`OpenTxn::finish`]), not with every
    /// apply (three META inserts and an encode each time). `applied` stays unset until an
    /// apply with entries.
    revision: Revision,
    compact: Revision,
    applied: Option<LogId>,
}

impl<'t> OpenTables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self> {
        let meta = txn.open_table(META).map_err(db_err)?;
        let revision = read_i64(&meta, M_REVISION)?;
        let compact = read_i64(&meta, M_COMPACT)?;
        Ok(OpenTables {
            versions: txn.open_table(VERSIONS).map_err(db_err)?,
            leases: txn.open_table(LEASES).map_err(db_err)?,
            lease_keys: txn.open_table(LEASE_KEYS).map_err(db_err)?,
            docs: txn.open_table(DOCS).map_err(db_err)?,
            meta,
            rows: Vec::new(),
            deferred: Vec::new(),
            revision,
            compact,
            applied: None,
        })
    }

    /// Inserts the deferred VERSIONS rows. On an error they all stay deferred (inserting one
    /// again writes the same row), and the commit that must insert them fails with it.
    fn insert_deferred(&mut self) -> Result<()> {
        for (i, &(at, start)) in self.deferred.iter().enumerate() {
            let end = self.deferred.get(i + 1).map_or(self.rows.len(), |d| d.1);
            self.versions
                .insert(at, &self.rows[start..end])
                .map_err(db_err)?;
        }
        self.deferred.clear();
        self.rows.clear();
        Ok(())
    }

    /// Writes where the applies since the txn was opened left them into META.
    fn write_meta(&mut self) -> Result<()> {
        self.meta
            .insert(M_REVISION, enc_i64(self.revision).as_slice())
            .map_err(db_err)?;
        self.meta
            .insert(M_COMPACT, enc_i64(self.compact).as_slice())
            .map_err(db_err)?;
        if self.applied.is_some() {
            let applied = postcard::to_allocvec(&self.applied).map_err(db_err)?;
            self.meta
                .insert(M_APPLIED, applied.as_slice())
                .map_err(db_err)?;
        }
        Ok(())
    }
}

impl OpenTxn {
    /// The txn with everything its applies did written into it, ready to commit.
    fn finish(mut self) -> Result<WriteTransaction> {
        self.with_dependent_mut(|_, tables| {
            tables.insert_deferred()?;
            tables.write_meta()
        })?;
        Ok(self.into_owner())
    }
}

/// What `applied_state` needs.
#[derive(Clone, Debug, Default)]
pub(crate) struct AppliedState {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
}

impl Store {
    pub fn open(path: &Path, cache_bytes: usize) -> anyhow::Result<Arc<Store>> {
        let db = open_db(path, cache_bytes)?;
        let txn = db.begin_write()?;
        {
            txn.open_table(VERSIONS)?;
            // The on-disk key index and live records of Cairn before the in-memory ones:
            // rebuilt in memory now.
            txn.delete_table(OLD_KEY_REVS)?;
            txn.delete_table(OLD_CURRENT)?;
            txn.open_table(LEASES)?;
            txn.open_table(LEASE_KEYS)?;
            txn.open_table(DOCS)?;
            let mut meta = txn.open_table(META)?;
            if meta.get(M_REVISION)?.is_none() {
                meta.insert(M_REVISION, enc_i64(1).as_slice())?;
                meta.insert(M_COMPACT, enc_i64(0).as_slice())?;
                meta.insert(M_PHYSICAL, enc_i64(0).as_slice())?;
            }
        }
        txn.commit()?;
        migrate::from_history_table(&db)?;
        let (rev, compact) = {
            let r = db.begin_read()?;
            let meta = r.open_table(META)?;
            (read_i64(&meta, M_REVISION)?, read_i64(&meta, M_COMPACT)?)
        };
        let (index, live) = KeyIndex::load(&db, compact)?;
        tracing::debug!(
            versions = index.len(),
            live = live.len(),
            "key index loaded"
        );
        let (feed, _) = broadcast::channel(4096);
        let store = Arc::new(Store {
            db: RwLock::new(db),
            writer: Mutex::new(Pending {
                txn: None,
                opened: Instant::now(),
            }),
            overlay: RwLock::new(Overlay::new(live)),
            index: RwLock::new(index),
            path: path.to_path_buf(),
            feed,
            leases: LeaseClock::default(),
            revision: AtomicI64::new(rev),
            applied_requests: Default::default(),
            compact: AtomicI64::new(compact),
            last_sync: Mutex::new(Instant::now()),
            compactor: tokio::sync::Notify::new(),
            measured_in_use: AtomicI64::new(0),
            written_since: AtomicI64::new(0),
            measured_at: Mutex::new((Instant::now(), Duration::ZERO)),
            measuring: Mutex::new(()),
            measure_claimed: Default::default(),
            measurements: Default::default(),
        });
        store.sizes()?;
        store.load_lease_clock()?;
        Ok(store)
    }

    /// Rebuilds the key index and the live records from the committed tables, and publishes
    /// their revisions (after a snapshot install or an import replaced the tables). The caller
    /// holds `ov` since before that commit, so no reader sees new tables with old memory.
    fn reload_memory(
        &self,
        db: &Database,
        ov: &mut Overlay,
        rev: Revision,
        compact: Revision,
    ) -> Result<()> {
        let (index, live) = KeyIndex::load(db, compact)?;
        ov.reset_live(live);
        *self.index.write() = index;
        self.revision.store(rev, Ordering::Release);
        self.compact.store(compact, Ordering::Release);
        Ok(())
    }

    /// Gives every stored lease a full TTL from now (as etcd does when a leader takes over).
    pub fn reset_lease_clock(&self) -> Result<()> {
        // Grants and revokes are applied without a commit (the clock answers for them), so
        // commit before reading the table.
        self.flush()?;
        self.load_lease_clock()
    }

    /// Loads the lease clock from the committed LEASES table; the caller knows nothing is
    /// applied but uncommitted (after opening, installing a snapshot or importing).
    fn load_lease_clock(&self) -> Result<()> {
        let db = self.db.read();
        let r = db.begin_read().map_err(db_err)?;
        let t = r.open_table(LEASES).map_err(db_err)?;
        let mut all = Vec::new();
        for item in t.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            all.push((k.value(), v.value()));
        }
        self.leases.reset(all);
        Ok(())
    }

    pub fn current(&self) -> (Revision, Revision) {
        (
            self.revision.load(Ordering::Acquire),
            self.compact.load(Ordering::Acquire),
        )
    }

    pub fn applied_state(&self) -> Result<AppliedState> {
        self.flush()?;
        self.committed_state()
    }

    /// Makes everything applied so far durable and returns the applied state it reached: no
    /// apply can slip in between, so raft may purge its log up to that point.
    pub fn synced_state(&self) -> Result<AppliedState> {
        let mut w = self.writer.lock();
        self.sync_locked(&mut w)?;
        self.committed_state()
    }

    fn committed_state(&self) -> Result<AppliedState> {
        let db = self.db.read();
        let r = db.begin_read().map_err(db_err)?;
        applied_in(&r)
    }

    /// Applies a batch of committed raft entries in one redb txn; returns one result per entry.
    pub fn apply(&self, entries: Vec<crate::types::Entry>) -> Result<Vec<CommandResult>> {
        let mut w = self.writer.lock();
        let db = self.db.read();
        if w.txn.is_none() {
            let txn = db.begin_write().map_err(db_err)?;
            w.txn = Some(OpenTxn::try_new(txn, |txn| OpenTables::open(txn))?);
            w.opened = Instant::now();
        }
        let r = self.apply_in(&mut w, entries);
        if r.is_err() {
            // The txn may hold half an entry: drop it (raft stops on this error). The overlay
            // and the index may hold the txns before the failed one (each is published whole),
            // so readers still see a prefix of committed entries; a restart rebuilds them
            // from what redb kept and replays the rest from the WAL.
            w.txn = None;
        }
        r
    }

    fn apply_in(
        &self,
        w: &mut Pending,
        entries: Vec<crate::types::Entry>,
    ) -> Result<Vec<CommandResult>> {
        let open = w.txn.as_mut().expect("an open write txn");
        // Only puts and deletes of txns are covered by the overlay; anything else is committed
        // before the apply returns.
        let mut flush = false;
        let mut results = Vec::with_capacity(entries.len());
        let mut batches = Vec::new();
        let mut lease_changes = Vec::new();
        let mut compacted = false;
        let new_revs = open.with_dependent_mut(|_, tables| -> Result<(Revision, Revision)> {
            let mut t = Tables::new(tables, self);
            let mut rev = t.tables.revision;
            let mut compact = t.tables.compact;
            let mut last = None;
            let mut membership = None;
            for entry in entries {
                last = Some(entry.log_id);
                let result = match entry.payload {
                    openraft::EntryPayload::Blank => CommandResult::None,
                    openraft::EntryPayload::Membership(m) => {
                        flush = true;
                        membership = Some(StoredMembership::new(Some(entry.log_id), m));
                        CommandResult::None
                    }
                    openraft::EntryPayload::Normal(cmd) => {
                        flush |= !cmd.visible_uncommitted();
                        self.applied_requests
                            .fetch_add(cmd.count(), Ordering::Relaxed);
                        let (res, batch) =
                            t.run(cmd, &mut rev, &mut compact, &mut lease_changes)?;
                        compacted |= res.compacted();
                        batches.extend(batch.into_iter().map(Arc::new));
                        res
                    }
                };
                results.push(result);
            }
            // Under load the thread seldom idles: many rows go in at once, not held back.
            if t.tables.deferred.len() >= DEFER_ROWS {
                t.tables.insert_deferred()?;
            }
            t.tables.revision = rev;
            t.tables.compact = compact;
            if last.is_some() {
                t.tables.applied = last;
            }
            if let Some(m) = membership {
                let m = postcard::to_allocvec(&m).map_err(db_err)?;
                t.tables.meta.insert(M_MEMBERSHIP, m.as_slice()).map_err(db_err)?;
            }
            Ok((rev, compact))
        })?;
        {
            // Each txn published its revision with its rows (see write_events).
            let ov = self.overlay.write();
            flush |= ov.rows() >= FLUSH_ROWS;
            self.revision.store(new_revs.0, Ordering::Release);
            self.compact.store(new_revs.1, Ordering::Release);
        }
        if flush || w.opened.elapsed() >= FLUSH_EVERY {
            self.commit(w, false)?;
        }
        for change in lease_changes {
            match change {
                LeaseChange::Granted(id, ttl) => self.leases.grant(id, ttl),
                LeaseChange::Revoked(id) => self.leases.forget(id),
            }
        }
        let written: usize = batches
            .iter()
            .flat_map(|b| b.events.iter())
            .map(|e| 64 + 2 * (e.kv.key.len() + e.kv.value.len()))
            .sum();
        self.written_since
            .fetch_add(written as i64, Ordering::Relaxed);
        for b in batches {
            let _ = self.feed.send(b);
        }
        if compacted {
            self.compactor.notify_one();
        }
        Ok(results)
    }

    /// Commits the open write txn (synced when `sync` or when the last synced commit is older
    /// than [`SYNC_EVERY`]) and empties the overlay. A failed commit loses the txn: raft stops
    /// on the error, as the store can no longer be trusted.
    fn commit(&self, w: &mut Pending, sync: bool) -> Result<()> {
        let Some(open) = w.txn.take() else {
            return Ok(());
        };
        let mut txn = open.finish()?;
        let sync = sync || self.last_sync.lock().elapsed() >= SYNC_EVERY;
        txn.set_durability(if sync {
            Durability::Immediate
        } else {
            Durability::None
        });
        txn.commit().map_err(db_err)?;
        // After the commit: a reader in between sees the rows twice, identical, the overlay's
        // copy winning (see overlay.rs).
        self.overlay.write().clear();
        if sync {
            *self.last_sync.lock() = Instant::now();
        }
        Ok(())
    }

    /// Inserts the VERSIONS rows applies left for later, unless the write txn is busy (an
    /// apply, a commit). Called by the raft thread before it parks; an error is left for the
    /// commit to report.
    pub fn insert_deferred(&self) {
        let Some(mut w) = self.writer.try_lock() else {
            return;
        };
        if let Some(open) = w.txn.as_mut() {
            if let Err(e) = open.with_dependent_mut(|_, t| t.insert_deferred()) {
                tracing::warn!(error = %e, "inserting applied rows failed; retried at the commit");
            }
        }
    }

    /// Commits everything applied so far (not synced), for readers of what the overlay does not
    /// cover.
    pub fn flush(&self) -> Result<()> {
        let mut w = self.writer.lock();
        self.commit(&mut w, false)
    }

    /// Makes everything applied so far durable.
    pub fn sync(&self) -> Result<()> {
        let mut w = self.writer.lock();
        self.sync_locked(&mut w)
    }

    fn sync_locked(&self, w: &mut Pending) -> Result<()> {
        if w.txn.is_some() {
            return self.commit(w, true);
        }
        let db = self.db.read();
        let mut txn = db.begin_write().map_err(db_err)?;
        txn.set_durability(Durability::Immediate);
        txn.commit().map_err(db_err)?;
        *self.last_sync.lock() = Instant::now();
        Ok(())
    }

    /// A range (or a read-only txn) served from the latest committed state.
    pub fn read_txn(&self, req: &TxnRequest) -> Result<TxnResponse> {
        let (resp, _) = self.read(|view| exec::execute(view, req))?;
        Ok(resp)
    }

    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse> {
        self.read(|view| exec::range(view, req))
    }

    /// Runs `f` on a view of the latest applied state: a redb read txn plus the overlay.
    fn read<T>(&self, f: impl FnOnce(&mut ReadView<'_>) -> Result<T>) -> Result<T> {
        let db = self.db.read();
        let ov = self.overlay.read();
        let r = db.begin_read().map_err(db_err)?;
        let tables = ViewTables {
            overlay: &ov,
            index: &self.index,
            versions: &r.open_table(VERSIONS).map_err(db_err)?,
            leases: &r.open_table(LEASES).map_err(db_err)?,
        };
        // Under the overlay's read lock: the revision its live records are at.
        let (base, compact) = self.current();
        let mut view = View::new(tables, base, compact);
        f(&mut view)
    }

    /// A lease's TTLs from the lease clock (which mirrors every applied grant and revoke, so a
    /// grant need not be committed to be seen), and its keys from the committed LEASE_KEYS.
    pub fn lease_info(&self, id: LeaseId, keys: bool) -> Result<LeaseInfo> {
        let Some((granted, ttl)) = self.leases.get(id) else {
            return Err(BackendError::LeaseNotFound);
        };
        let mut out = Vec::new();
        if keys {
            self.flush()?;
            let db = self.db.read();
            let r = db.begin_read().map_err(db_err)?;
            let lk = r.open_table(LEASE_KEYS).map_err(db_err)?;
            for item in lk.range::<(i64, &[u8])>((id, &[][..])..).map_err(db_err)? {
                let (k, _) = item.map_err(db_err)?;
                let (lid, key) = k.value();
                if lid != id {
                    break;
                }
                out.push(key.to_vec());
            }
        }
        Ok(LeaseInfo {
            id,
            ttl,
            granted_ttl: granted,
            keys: out,
            revision: self.current().0,
        })
    }

    /// Every lease, in id order, from the lease clock.
    pub fn lease_ids(&self) -> Result<Vec<LeaseId>> {
        Ok(self.leases.ids())
    }

    pub fn doc(&self, name: &str) -> Result<Option<cairn_backend::Doc>> {
        let db = self.db.read();
        let r = db.begin_read().map_err(db_err)?;
        let docs = r.open_table(DOCS).map_err(db_err)?;
        Ok(docs.get(name).map_err(db_err)?.map(|v| cairn_backend::Doc {
            version: doc_version(v.value()),
            value: v.value()[8..].to_vec(),
        }))
    }

    /// Hash of every version in (compact, rev], in (key, revision) order.
    pub fn hash_kv(&self, rev: Revision) -> Result<HashKv> {
        let (cur, compact) = self.current();
        let rev = if rev <= 0 { cur } else { rev };
        if rev > cur {
            return Err(BackendError::FutureRevision);
        }
        if rev < compact {
            return Err(BackendError::Compacted {
                compact_revision: compact,
            });
        }
        self.flush()?;
        let db = self.db.read();
        let r = db.begin_read().map_err(db_err)?;
        let versions = r.open_table(VERSIONS).map_err(db_err)?;
        let all = self
            .index
            .read()
            .all_between(compact.max(0) as u64, rev as u64);
        let mut h = crc32fast::Hasher::new();
        for (key, (r, entry)) in all {
            let row = view::version_record(&versions, r, entry)?;
            h.update(&key);
            h.update(&r.to_be_bytes());
            h.update(decode_version(row.value()).1);
        }
        Ok(HashKv {
            hash: h.finalize(),
            compact_revision: compact,
            hash_revision: rev,
            revision: cur,
        })
    }

    /// File size and bytes in use (redb's allocated pages). Reading redb's statistics needs a
    /// write txn, which is aborted.
    pub fn sizes(&self) -> Result<(i64, i64)> {
        let started = Instant::now();
        let mut w = self.writer.lock();
        self.commit(&mut w, false)?;
        let db = self.db.read();
        let txn = db.begin_write().map_err(db_err)?;
        let stats = txn.stats().map_err(db_err)?;
        txn.abort().map_err(db_err)?;
        // What the tables hold (keys, values and tree metadata), not the pages around it:
        // redb rounds a large value's leaf up to a power-of-two run of pages, keeps pages of
        // unsynced commits until a synced one, and preallocates its region, all of which
        // would make the in-use figure jump by pages where etcd's bbolt grows by bytes.
        let in_use = (stats.stored_bytes() + stats.metadata_bytes()) as i64;
        self.measured_in_use.store(in_use, Ordering::Relaxed);
        self.written_since.store(0, Ordering::Relaxed);
        *self.measured_at.lock() = (Instant::now(), started.elapsed());
        self.measurements.fetch_add(1, Ordering::Relaxed);
        Ok((self.file_size(), in_use))
    }

    /// Bytes in use for the space quota: the last measurement plus what was applied since (an
    /// over-estimate: deletes and compaction are not subtracted until the next measurement),
    /// measured afresh when that is due (measuring walks the trees; see [`MEASURE_SHARE`]).
    pub fn in_use(&self) -> Result<i64> {
        if let Some(v) = self.in_use_estimate() {
            return Ok(v);
        }
        let _one = self.measuring.lock();
        // Another caller may have measured while this one waited.
        match self.in_use_estimate() {
            Some(v) => Ok(v),
            None => Ok(self.sizes()?.1),
        }
    }

    /// [`Store::in_use`] while the last measurement is recent enough to build on (cheap: no
    /// I/O, callable from async code); `None` when it is due to be measured again.
    pub fn in_use_estimate(&self) -> Option<i64> {
        let (at, cost) = *self.measured_at.lock();
        if at.elapsed() >= MEASURE_EVERY.max(cost * MEASURE_SHARE) {
            return None;
        }
        Some(self.estimate())
    }

    /// For a writer that finds the measurement due: `Some` for the one caller that is to take
    /// it (on a blocking thread, holding the claim), `None` while another caller has it; the
    /// others go on with [`Store::estimate`]. When every writer under load waited for it, 256
    /// clients put 256 tasks on the blocking pool each time (a thread started for each).
    pub fn claim_measurement(self: &Arc<Self>) -> Option<MeasureClaim> {
        self.measure_claimed
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| MeasureClaim(self.clone()))
    }

    /// The last measurement plus what was applied since: an over-estimate, as deletes and
    /// compaction are not subtracted until the next measurement.
    pub fn estimate(&self) -> i64 {
        self.measured_in_use.load(Ordering::Relaxed) + self.written_since.load(Ordering::Relaxed)
    }

    /// The in-use bytes to refuse a write on: the estimate only grows between measurements,
    /// so it is measured again first unless that was done very recently.
    pub fn in_use_before_refusing(&self) -> Result<i64> {
        let _one = self.measuring.lock();
        let (at, cost) = *self.measured_at.lock();
        if at.elapsed() >= MEASURE_EVERY.max(cost * 10) {
            return Ok(self.sizes()?.1);
        }
        Ok(self.estimate())
    }

    /// Gives free space back to the filesystem (redb's compaction). Applies, reads and feeds
    /// wait on the lock meanwhile, so none of them sees a half-compacted file; redb refuses
    /// while a read txn is open, which the lock rules out, so that is only retried briefly.
    pub fn defragment(&self) -> Result<()> {
        let mut w = self.writer.lock();
        self.commit(&mut w, false)?;
        let mut db = self.db.write();
        // Unsynced commits pin the last synced state like a reader would; a synced commit
        // releases them.
        let mut txn = db.begin_write().map_err(db_err)?;
        txn.set_durability(Durability::Immediate);
        txn.commit().map_err(db_err)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match db.compact() {
                Ok(_) => break,
                Err(redb::CompactionError::TransactionInProgress) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(db_err(e)),
            }
        }
        *self.last_sync.lock() = Instant::now();
        drop(db);
        drop(w);
        self.sizes().map(|_| ())
    }

    pub fn file_size(&self) -> i64 {
        std::fs::metadata(&self.path)
            .map(|m| m.len() as i64)
            .unwrap_or(0)
    }
}

/// The applied state as of a read txn.
fn applied_in(r: &redb::ReadTransaction) -> Result<AppliedState> {
    let meta = r.open_table(META).map_err(db_err)?;
    let get = |name| -> Result<Option<Vec<u8>>> {
        Ok(meta.get(name).map_err(db_err)?.map(|v| v.value().to_vec()))
    };
    let last_applied = match get(M_APPLIED)? {
        Some(b) => postcard::from_bytes(&b).map_err(db_err)?,
        None => None,
    };
    let membership = match get(M_MEMBERSHIP)? {
        Some(b) => postcard::from_bytes(&b).map_err(db_err)?,
        None => StoredMembership::default(),
    };
    Ok(AppliedState {
        last_applied,
        membership,
    })
}

/// Opens the database file. A previous instance in this process may still be shutting down
/// (its last tasks hold the file for a moment), so "already open" is retried for a while.
fn open_db(path: &Path, cache_bytes: usize) -> anyhow::Result<Database> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Database::builder().set_cache_size(cache_bytes).create(path) {
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return Ok(other?),
        }
    }
}

/// Writes one version's VERSIONS row, for the writers that rebuild the key index from the
/// table afterwards (migration, snapshot install, import). An apply encodes its rows into
/// `OpenTables::rows` instead, inserts them later, and updates the index itself.
pub(crate) fn insert_version(
    versions: &mut redb::Table<'_, (u64, u32), &'static [u8]>,
    key: &[u8],
    rev: u64,
    sub: u32,
    rec: &[u8],
) -> Result<()> {
    versions
        .insert((rev, sub), encode_version(key, rec).as_slice())
        .map_err(db_err)?;
    Ok(())
}

/// A [`View`] of a redb read txn.
type ReadView<'a> =
    View<'a, redb::ReadOnlyTable<(u64, u32), &'static [u8]>, redb::ReadOnlyTable<i64, i64>>;

/// A lease change to mirror in the lease clock once the txn has committed.
enum LeaseChange {
    Granted(LeaseId, i64),
    Revoked(LeaseId),
}

fn doc_version(rec: &[u8]) -> u64 {
    u64::from_le_bytes(rec[..8].try_into().expect("document record has a version"))
}

fn read_i64(t: &impl ReadableTable<&'static str, &'static [u8]>, name: &str) -> Result<i64> {
    Ok(t.get(name)
        .map_err(db_err)?
        .map(|v| dec_i64(v.value()))
        .unwrap_or(0))
}

/// The tables of the open write txn `'t`, and what an apply changes in memory.
struct Tables<'a, 't> {
    overlay: &'a RwLock<Overlay>,
    index: &'a RwLock<KeyIndex>,
    revision: &'a AtomicI64,
    tables: &'a mut OpenTables<'t>,
}

impl<'a, 't> Tables<'a, 't> {
    fn new(tables: &'a mut OpenTables<'t>, store: &'a Store) -> Self {
        Tables {
            overlay: &store.overlay,
            index: &store.index,
            revision: &store.revision,
            tables,
        }
    }

    /// Runs one command. Rejections become `CommandResult::Err` and change nothing; storage
    /// failures are returned as errors (raft then stops: the store is no longer trusted).
    fn run(
        &mut self,
        cmd: Command,
        rev: &mut Revision,
        compact: &mut Revision,
        lease_changes: &mut Vec<LeaseChange>,
    ) -> Result<(CommandResult, Vec<ChangeBatch>)> {
        match cmd {
            Command::Batch(cmds) => {
                let mut results = Vec::with_capacity(cmds.len());
                let mut batches = Vec::new();
                for c in cmds {
                    let (r, b) = self.run(c, rev, compact, lease_changes)?;
                    results.push(r);
                    batches.extend(b);
                }
                Ok((CommandResult::Batch(results), batches))
            }
            Command::Txn(req) => {
                let (outcome, events) = {
                    let ov = self.overlay.read();
                    let mut view = View::new(self.view_tables(&ov), *rev, *compact);
                    let outcome = exec::execute(&mut view, &req);
                    (outcome, std::mem::take(&mut view.events))
                };
                match outcome {
                    Ok((resp, wrote)) => {
                        let batch = if wrote {
                            vec![self.write_events(*rev + 1, events)?]
                        } else {
                            Vec::new()
                        };
                        if wrote {
                            *rev += 1;
                        }
                        Ok((CommandResult::Txn(resp), batch))
                    }
                    Err(e @ BackendError::Internal(_)) => Err(e),
                    Err(e) => Ok((CommandResult::Err(e), Vec::new())),
                }
            }
            Command::DocPut {
                name,
                expected,
                value,
            } => {
                let current = self
                    .tables
                    .docs
                    .get(name.as_str())
                    .map_err(db_err)?
                    .map_or(0, |v| doc_version(v.value()));
                if current != expected {
                    return Ok((CommandResult::DocPut(None), Vec::new()));
                }
                let mut rec = (expected + 1).to_le_bytes().to_vec();
                rec.extend_from_slice(&value);
                self.tables.docs
                    .insert(name.as_str(), rec.as_slice())
                    .map_err(db_err)?;
                Ok((CommandResult::DocPut(Some(expected + 1)), Vec::new()))
            }
            Command::Compact { revision } => {
                if revision <= *compact {
                    return Ok((
                        CommandResult::Err(BackendError::Compacted {
                            compact_revision: *compact,
                        }),
                        Vec::new(),
                    ));
                }
                if revision > *rev {
                    return Ok((CommandResult::Err(BackendError::FutureRevision), Vec::new()));
                }
                *compact = revision;
                Ok((
                    CommandResult::Compact(CompactResponse { revision: *rev }),
                    Vec::new(),
                ))
            }
            Command::LeaseGrant { id, ttl } => {
                if self.tables.leases.get(id).map_err(db_err)?.is_some() {
                    return Ok((CommandResult::Err(BackendError::LeaseExists), Vec::new()));
                }
                self.tables.leases.insert(id, ttl).map_err(db_err)?;
                lease_changes.push(LeaseChange::Granted(id, ttl));
                Ok((
                    CommandResult::LeaseGrant(LeaseGrant {
                        id,
                        ttl,
                        revision: *rev,
                    }),
                    Vec::new(),
                ))
            }
            Command::LeaseRevoke { id } => {
                if self.tables.leases.get(id).map_err(db_err)?.is_none() {
                    return Ok((CommandResult::Err(BackendError::LeaseNotFound), Vec::new()));
                }
                let mut keys = Vec::new();
                for item in self
                    .tables
                    .lease_keys
                    .range::<(i64, &[u8])>((id, &[][..])..)
                    .map_err(db_err)?
                {
                    let (k, _) = item.map_err(db_err)?;
                    let (lid, key) = k.value();
                    if lid != id {
                        break;
                    }
                    keys.push(key.to_vec());
                }
                let events = {
                    let ov = self.overlay.read();
                    let mut view = View::new(self.view_tables(&ov), *rev, *compact);
                    for key in keys {
                        let (mut found, _) =
                            view.range_latest(&KeyRange::single(key), Some(1), false)?;
                        if let Some(prev) = found.pop() {
                            view.delete(prev, *rev + 1)?;
                        }
                    }
                    std::mem::take(&mut view.events)
                };
                let batch = if events.is_empty() {
                    Vec::new()
                } else {
                    *rev += 1;
                    vec![self.write_events(*rev, events)?]
                };
                self.tables.leases.remove(id).map_err(db_err)?;
                lease_changes.push(LeaseChange::Revoked(id));
                Ok((CommandResult::LeaseRevoke(*rev), batch))
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn view_tables<'v>(
        &'v self,
        overlay: &'v Overlay,
    ) -> ViewTables<'v, redb::Table<'t, (u64, u32), &'static [u8]>, redb::Table<'t, i64, i64>> {
        ViewTables {
            overlay,
            index: self.index,
            versions: &self.tables.versions,
            leases: &self.tables.leases,
        }
    }

    /// Writes one txn's events at `rev` into VERSIONS, LEASE_KEYS, the key index and the
    /// overlay, and publishes `rev` to readers.
    fn write_events(&mut self, rev: Revision, events: Vec<Event>) -> Result<ChangeBatch> {
        let mut records = Vec::with_capacity(events.len());
        for (sub, ev) in events.iter().enumerate() {
            let key = ev.kv.key.as_slice();
            if let Some(prev) = &ev.prev_kv {
                if prev.lease != 0 {
                    self.tables.lease_keys.remove((prev.lease, key)).map_err(db_err)?;
                }
            }
            let put = ev.kind == EventKind::Put;
            if put && ev.kv.lease != 0 {
                self.tables.lease_keys
                    .insert((ev.kv.lease, key), ())
                    .map_err(db_err)?;
            }
            let t = &mut *self.tables;
            let start = t.rows.len();
            let at = append_version(&mut t.rows, key, put.then_some(&ev.kv), rev);
            t.deferred.push(((rev as u64, sub as u32), start));
            records.push(Record::from(&t.rows[at..]));
        }
        // Readers see the live records, the rows and the revision change together; index
        // readers skip versions above the revision they read at.
        let mut ov = self.overlay.write();
        ov.record(rev, &events, records);
        let mut index = self.index.write();
        for (sub, ev) in events.iter().enumerate() {
            let entry = index_entry(sub as u32, ev.kind == EventKind::Delete);
            index.insert(&ev.kv.key, rev as u64, entry);
        }
        drop(index);
        self.revision.store(rev, Ordering::Release);
        drop(ov);
        Ok(ChangeBatch {
            revision: rev,
            events,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_backend::{DeleteRangeRequest, KeyValue, PutRequest, RequestOp};
    use openraft::{CommittedLeaderId, EntryPayload};
    use redb::ReadableTableMetadata;

    fn entry(index: u64, cmd: Command) -> crate::types::Entry {
        crate::types::Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(cmd),
        }
    }

    fn range(
        store: &Store,
        range: KeyRange,
        revision: Revision,
        limit: i64,
        count_only: bool,
    ) -> RangeResponse {
        store
            .range(&RangeRequest {
                range,
                revision,
                limit,
                count_only,
                ..Default::default()
            })
            .expect("range")
    }

    /// A seeded pseudo-random source: each call returns a number below its argument.
    fn xorshift(mut seed: u64) -> impl FnMut(u64) -> u64 {
        move |n| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        }
    }

    /// Reads through the overlay (applied, uncommitted rows) answer exactly what the same
    /// reads answer once everything is committed: one store commits after every entry, the
    /// other keeps its rows in the open write txn; random puts and deletes over a few keys.
    #[test]
    fn overlay_reads_equal_committed_reads() {
        let dir = tempfile::tempdir().unwrap();
        let committed = Store::open(&dir.path().join("a.redb"), 1 << 20).unwrap();
        let pending = Store::open(&dir.path().join("b.redb"), 1 << 20).unwrap();
        let mut next = xorshift(0x9e3779b97f4a7c15);
        let key = |i: u64| format!("k{i}").into_bytes();
        // What is live, as a plain map: the counts (answered from the store's live records)
        // and the rows at the latest revision must agree with it.
        let mut model: std::collections::BTreeMap<Vec<u8>, Vec<u8>> = Default::default();
        let mut saw_overlay = 0;
        for index in 1..=400u64 {
            let op = match next(10) {
                0 => RequestOp::DeleteRange(DeleteRangeRequest {
                    range: KeyRange::single(key(next(12))),
                    prev_kv: true,
                }),
                1 => {
                    let (a, b) = (next(12), next(12));
                    RequestOp::DeleteRange(DeleteRangeRequest {
                        range: KeyRange::new(key(a.min(b)), key(a.max(b))),
                        prev_kv: false,
                    })
                }
                _ => RequestOp::Put(PutRequest {
                    key: key(next(12)),
                    value: format!("v{index}").into_bytes(),
                    ..Default::default()
                }),
            };
            match &op {
                RequestOp::Put(p) => {
                    model.insert(p.key.clone(), p.value.clone());
                }
                RequestOp::DeleteRange(d) => model.retain(|k, _| !d.range.contains(k)),
                _ => unreachable!(),
            }
            let cmd = || Command::Txn(TxnRequest::unconditional(vec![op.clone()]));
            let a = committed.apply(vec![entry(index, cmd())]).unwrap();
            committed.flush().unwrap();
            let b = pending.apply(vec![entry(index, cmd())]).unwrap();
            assert_eq!(
                format!("{a:?}"),
                format!("{b:?}"),
                "apply results differ at {index}"
            );
            if pending.overlay.read().rows() > 0 {
                saw_overlay += 1;
            }
            assert_eq!(committed.current(), pending.current());
            let (rev, _) = pending.current();
            let ranges = [
                KeyRange::single(key(next(12))),
                KeyRange::prefix(b"k1".to_vec()),
                KeyRange::new(b"k".to_vec(), vec![0]),
                KeyRange::new(key(next(12)), key(next(12) + 5)),
            ];
            for r in ranges {
                let want: Vec<_> = model.iter().filter(|(k, _)| r.contains(k)).collect();
                let got = range(&pending, r.clone(), 0, 2, false);
                assert_eq!(
                    got.count,
                    want.len() as i64,
                    "count of {r:?} after entry {index}"
                );
                let got: Vec<_> = got.kvs.iter().map(|kv| (&kv.key, &kv.value)).collect();
                assert_eq!(
                    got,
                    want.into_iter().take(2).collect::<Vec<_>>(),
                    "{r:?} after entry {index}"
                );
                for at in [0, rev, (rev - 1).max(1), 1 + next(rev as u64) as i64] {
                    for (limit, count_only) in [(0, false), (2, false), (0, true)] {
                        assert_eq!(
                            range(&committed, r.clone(), at, limit, count_only),
                            range(&pending, r.clone(), at, limit, count_only),
                            "range {r:?} at {at} limit {limit} count_only {count_only}, after entry {index}"
                        );
                    }
                }
            }
        }
        // The comparison is only worth something if reads did go through the overlay.
        assert!(
            saw_overlay > 300,
            "overlay held rows after only {saw_overlay} of 400 entries"
        );
        pending.flush().unwrap();
        assert_eq!(pending.overlay.read().rows(), 0);
        assert_eq!(committed.hash_kv(0).unwrap(), pending.hash_kv(0).unwrap());
        // A reopened store rebuilds its live records from VERSIONS.
        let all = KeyRange::new(vec![0], vec![0]);
        drop(pending);
        let reopened = Store::open(&dir.path().join("b.redb"), 1 << 20).unwrap();
        let got = range(&reopened, all, 0, 0, true);
        assert_eq!(got.count, model.len() as i64);
    }

    /// The revision and the last applied log id reach META when the open write txn is
    /// committed (by a flush, or when the store closes), and a reopened store starts from them.
    #[test]
    fn revision_and_applied_id_outlive_a_reopen() {
        for flush in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("s.redb");
            let store = Store::open(&path, 1 << 20).unwrap();
            let (start, _) = store.current();
            for index in 1..=3u64 {
                let op = RequestOp::Put(PutRequest {
                    key: format!("k{index}").into_bytes(),
                    value: b"v".to_vec(),
                    ..Default::default()
                });
                let cmd = Command::Txn(TxnRequest::unconditional(vec![op]));
                store.apply(vec![entry(index, cmd)]).unwrap();
            }
            assert_eq!(store.current().0, start + 3);
            if flush {
                store.flush().unwrap();
            }
            drop(store);
            let reopened = Store::open(&path, 1 << 20).unwrap();
            assert_eq!(reopened.current().0, start + 3, "flush: {flush}");
            let applied = reopened.applied_state().unwrap().last_applied;
            assert_eq!(applied.map(|l| l.index), Some(3), "flush: {flush}");
        }
    }

    /// An etcd key space loads with its revisions into a fresh store only.
    #[test]
    fn imports_etcd_into_a_fresh_store_only() {
        use cairn_bbolt::etcd::{Lease, Snapshot, Version};
        let v = |key: &str, rev: i64, version: i64, value: &str| Version {
            key: key.into(),
            revision: rev,
            create_revision: rev - version + 1,
            version,
            value: value.into(),
            ..Default::default()
        };
        let snap = Snapshot {
            versions: vec![
                v("a", 4, 1, "1"),
                v("b", 5, 1, "x"),
                v("a", 6, 3, "3"),
                Version {
                    key: b"b".to_vec(),
                    revision: 7,
                    tombstone: true,
                    ..Default::default()
                },
                Version {
                    lease: 9,
                    ..v("l", 8, 1, "on lease")
                },
            ],
            leases: vec![Lease { id: 9, ttl: 60 }],
            compact_revision: 4,
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb"), 1 << 20).unwrap();
        assert!(store.import_etcd(&snap).unwrap());
        assert!(store.import_unsnapshotted().unwrap());
        assert_eq!(store.current(), (8, 4));
        let all = KeyRange::new(vec![0], vec![0]);
        let now = range(&store, all.clone(), 0, 0, false);
        let got: Vec<_> = now
            .kvs
            .iter()
            .map(|kv| (kv.key.clone(), kv.mod_revision, kv.version, kv.lease))
            .collect();
        assert_eq!(
            got,
            vec![(b"a".to_vec(), 6, 3, 0), (b"l".to_vec(), 8, 1, 9)]
        );
        let at5 = range(&store, all.clone(), 5, 0, false);
        assert_eq!(at5.kvs.len(), 2, "a@4 and b@5 live at revision 5");
        assert!(store
            .range(&RangeRequest {
                range: all.clone(),
                revision: 3,
                ..Default::default()
            })
            .is_err());
        assert_eq!(store.lease_info(9, true).unwrap().keys, vec![b"l".to_vec()]);
        store.import_snapshotted().unwrap();
        assert!(!store.import_unsnapshotted().unwrap());
        // A store that holds data is left alone.
        assert!(!store
            .import_etcd(&Snapshot {
                versions: vec![v("z", 20, 1, "z")],
                ..Default::default()
            })
            .unwrap());
        assert_eq!(store.current(), (8, 4));
    }

    fn put(key: &str, value: &str) -> Command {
        Command::Txn(TxnRequest::unconditional(vec![RequestOp::Put(
            PutRequest {
                key: key.into(),
                value: value.into(),
                ..Default::default()
            },
        )]))
    }

    fn delete(key: &str) -> Command {
        Command::Txn(TxnRequest::unconditional(vec![RequestOp::DeleteRange(
            DeleteRangeRequest {
                range: KeyRange::single(key.as_bytes().to_vec()),
                prev_kv: false,
            },
        )]))
    }

    /// Every version in the key index, and the number of VERSIONS rows (which must match it
    /// one to one).
    fn index_rows(store: &Store) -> Vec<(String, u64)> {
        store.flush().unwrap();
        let db = store.db.read();
        let r = db.begin_read().unwrap();
        let versions = r.open_table(VERSIONS).unwrap();
        let mut out = Vec::new();
        for (key, (rev, entry)) in store.index.read().all_between(0, u64::MAX) {
            let key = key.as_slice();
            let row = versions.get((rev, index_sub(entry))).unwrap().unwrap();
            assert_eq!(
                decode_version(row.value()).0,
                key,
                "index and version disagree"
            );
            out.push((String::from_utf8(key.to_vec()).unwrap(), rev));
        }
        assert_eq!(
            versions.len().unwrap() as usize,
            out.len(),
            "a version without index row"
        );
        out
    }

    /// Physical compaction keeps each key's newest version at or below the compact revision
    /// (and a tombstone exactly at it), drops the rest, and a later compaction drops a version
    /// an earlier one had to keep; reads at the compact revision are unchanged by it.
    #[test]
    fn physical_compaction_keeps_what_reads_need() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb"), 1 << 20).unwrap();
        // Revisions: a@2 a@3 b@4 a@5 del b@6 c@7 del c@8.
        let cmds = [
            put("a", "1"),
            put("a", "2"),
            put("b", "1"),
            put("a", "3"),
            delete("b"),
            put("c", "1"),
            delete("c"),
        ];
        for (i, cmd) in cmds.into_iter().enumerate() {
            store.apply(vec![entry(i as u64 + 1, cmd)]).unwrap();
        }
        let all = KeyRange::new(vec![0], vec![0]);
        let before_at = |rev| range(&store, all.clone(), rev, 0, false);
        let at6 = before_at(6);
        let at8 = before_at(8);
        store
            .apply(vec![entry(8, Command::Compact { revision: 6 })])
            .unwrap();
        store.compact_all().unwrap();
        let rows = |v: &[(&str, u64)]| -> Vec<(String, u64)> {
            v.iter().map(|(k, r)| (k.to_string(), *r)).collect()
        };
        // a@5 stays (newest at 6); b's tombstone at 6 stays (at the compact revision); c's
        // versions are above 6.
        assert_eq!(
            index_rows(&store),
            rows(&[("a", 5), ("b", 6), ("c", 7), ("c", 8)])
        );
        assert_eq!(range(&store, all.clone(), 6, 0, false), at6);
        assert_eq!(range(&store, all.clone(), 8, 0, false), at8);
        // a@9, then compaction at 9: a@5 (kept last time) goes now, and so does the tombstone
        // of b (below 9) and all of c (deleted at 8).
        store.apply(vec![entry(9, put("a", "4"))]).unwrap();
        store
            .apply(vec![entry(10, Command::Compact { revision: 9 })])
            .unwrap();
        store.compact_all().unwrap();
        assert_eq!(index_rows(&store), rows(&[("a", 9)]));
        let now = range(&store, all.clone(), 9, 0, false);
        assert_eq!(now.kvs.len(), 1);
        assert_eq!(now.kvs[0].value, b"4");
        assert_eq!(now.kvs[0].version, 4);
    }

    /// A compaction batch never splits a revision, so a txn with more ops than a batch holds
    /// is compacted rather than walked again and again.
    #[test]
    fn physical_compaction_walks_a_large_revision_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb"), 4 << 20).unwrap();
        let n = compact::BATCH + 10;
        let ops: Vec<_> = (0..n)
            .map(|i| {
                RequestOp::Put(PutRequest {
                    key: format!("k{i:05}").into_bytes(),
                    value: b"v".to_vec(),
                    ..Default::default()
                })
            })
            .collect();
        store
            .apply(vec![entry(
                1,
                Command::Txn(TxnRequest::unconditional(ops.clone())),
            )])
            .unwrap();
        store
            .apply(vec![entry(2, Command::Txn(TxnRequest::unconditional(ops)))])
            .unwrap();
        store
            .apply(vec![entry(3, Command::Compact { revision: 3 })])
            .unwrap();
        let mut steps = 0;
        while store.compact_step().unwrap() {
            steps += 1;
            assert!(steps < 10, "compaction does not advance");
        }
        assert_eq!(index_rows(&store).len(), n, "one version per key is left");
    }

    /// A store written with the old layout (`history` keyed by key then revision, `events`
    /// only above the physical compaction point) opens with every version, the change log
    /// and the hash it had.
    #[test]
    fn migrates_the_history_layout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.redb");
        let kv = |key: &str, create, rev, version, value: &str| KeyValue {
            key: key.into(),
            create_revision: create,
            mod_revision: rev,
            version,
            value: value.into(),
            lease: 0,
        };
        // a@2 (compacted away, but a@3 stays as the newest at 3), a@3, b@4 and c@4 in one
        // txn, del a@5. Compacted at 3: the change log starts at 3.
        let history = vec![
            (kv("a", 2, 3, 2, "a2"), 3u64),
            (kv("b", 4, 4, 1, "b1"), 4),
            (kv("c", 4, 4, 1, "c1"), 4),
        ];
        let old_hash = {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut h = txn.open_table(OLD_HISTORY).unwrap();
                let mut e = txn.open_table(OLD_EVENTS).unwrap();
                let mut c = txn.open_table(OLD_CURRENT).unwrap();
                let mut m = txn.open_table(META).unwrap();
                for (kv, rev) in &history {
                    h.insert((kv.key.as_slice(), *rev), encode_kv(kv).as_slice())
                        .unwrap();
                }
                h.insert((b"a".as_slice(), 5), encode_tombstone(5).as_slice())
                    .unwrap();
                e.insert((4, 0), b"b".as_slice()).unwrap();
                e.insert((4, 1), b"c".as_slice()).unwrap();
                e.insert((5, 0), b"a".as_slice()).unwrap();
                c.insert(b"b".as_slice(), encode_kv(&history[1].0).as_slice())
                    .unwrap();
                c.insert(b"c".as_slice(), encode_kv(&history[2].0).as_slice())
                    .unwrap();
                m.insert(M_REVISION, enc_i64(5).as_slice()).unwrap();
                m.insert(M_COMPACT, enc_i64(3).as_slice()).unwrap();
                m.insert(M_PHYSICAL, enc_i64(3).as_slice()).unwrap();
            }
            txn.commit().unwrap();
            // The hash as the old layout computed it: (key, revision) order above compact.
            let mut h = crc32fast::Hasher::new();
            for (key, rev, rec) in [
                ("a", 5u64, encode_tombstone(5)),
                ("b", 4, encode_kv(&history[1].0)),
                ("c", 4, encode_kv(&history[2].0)),
            ] {
                h.update(key.as_bytes());
                h.update(&rev.to_be_bytes());
                h.update(&rec);
            }
            h.finalize()
        };
        let store = Store::open(&path, 1 << 20).unwrap();
        assert_eq!(store.current(), (5, 3));
        assert_eq!(store.hash_kv(0).unwrap().hash, old_hash);
        assert_eq!(
            index_rows(&store),
            vec![
                ("a".to_string(), 3),
                ("a".to_string(), 5),
                ("b".to_string(), 4),
                ("c".to_string(), 4)
            ]
        );
        let all = KeyRange::new(vec![0], vec![0]);
        let keys = |r: RangeResponse| -> Vec<(Vec<u8>, i64)> {
            r.kvs
                .into_iter()
                .map(|kv| (kv.key, kv.mod_revision))
                .collect()
        };
        assert_eq!(
            keys(range(&store, all.clone(), 3, 0, false)),
            vec![(b"a".to_vec(), 3)]
        );
        assert_eq!(
            keys(range(&store, all.clone(), 4, 0, false)),
            vec![(b"a".to_vec(), 3), (b"b".to_vec(), 4), (b"c".to_vec(), 4)]
        );
        assert_eq!(
            keys(range(&store, all.clone(), 0, 0, false)),
            vec![(b"b".to_vec(), 4), (b"c".to_vec(), 4)]
        );
        let events = store.read_events(4, 5, 10).unwrap();
        let got: Vec<_> = events
            .iter()
            .flat_map(|b| {
                b.events.iter().map(move |e| {
                    (
                        b.revision,
                        e.kind,
                        e.kv.key.clone(),
                        e.prev_kv.as_ref().map(|p| p.value.clone()),
                    )
                })
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (4, EventKind::Put, b"b".to_vec(), None),
                (4, EventKind::Put, b"c".to_vec(), None),
                (5, EventKind::Delete, b"a".to_vec(), Some(b"a2".to_vec())),
            ]
        );
        // The old tables are gone, so a second open has nothing to migrate.
        drop(store);
        let db = Database::create(&path).unwrap();
        assert_eq!(migrate::from_history_table(&db).unwrap(), 0);
    }

    /// Writers that all find the in-use estimate due at once (256 clients under load) cause
    /// one measurement, not one each: each walks every tree with applies held off.
    #[test]
    fn a_due_measurement_is_taken_once_for_concurrent_callers() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb"), 1 << 20).unwrap();
        for i in 0..50 {
            store
                .apply(vec![entry(i + 1, put(&format!("k{i}"), "v"))])
                .unwrap();
        }
        let before = store.measurements.load(Ordering::Relaxed);
        // Due: the last measurement is older than any period.
        *store.measured_at.lock() = (Instant::now() - MEASURE_EVERY * 2, Duration::from_micros(1));
        assert!(store.in_use_estimate().is_none());
        // Applies are held off (as by a long apply) while the callers arrive, so all of them
        // find the measurement due before any measurement can finish.
        let writer = store.writer.lock();
        let results: Vec<i64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16)
                .map(|_| s.spawn(|| store.in_use().unwrap()))
                .collect();
            std::thread::sleep(Duration::from_millis(300));
            drop(writer);
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(store.measurements.load(Ordering::Relaxed) - before, 1);
        assert!(
            results.iter().all(|&v| v > 0 && v == results[0]),
            "{results:?}"
        );
    }

    /// Writers that must not wait for a due measurement: one of them claims it, the others
    /// go on with the estimate until the claim is given up.
    #[test]
    fn one_writer_at_a_time_claims_a_due_measurement() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb"), 1 << 20).unwrap();
        store.apply(vec![entry(1, put("k", "v"))]).unwrap();
        let claim = store.claim_measurement().expect("nobody measures yet");
        assert!(store.claim_measurement().is_none(), "claimed already");
        assert!(store.estimate() > 0, "the write is counted before any measurement");
        drop(claim);
        assert!(store.claim_measurement().is_some(), "given up when dropped");
    }

    /// A lease grant or revoke is applied without a commit (its txn stays open), yet lease
    /// lookups, listings and a leader's reset of the lease clock all see it at once.
    #[test]
    fn lease_changes_are_seen_before_they_are_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb"), 1 << 20).unwrap();
        let grant = |id| Command::LeaseGrant { id, ttl: 60 };
        store
            .apply(vec![entry(1, grant(7)), entry(2, grant(9))])
            .unwrap();
        assert!(
            store.writer.lock().txn.is_some(),
            "a grant committed the txn"
        );
        assert_eq!(store.lease_ids().unwrap(), vec![7, 9]);
        let info = store.lease_info(9, false).unwrap();
        assert_eq!(info.granted_ttl, 60);
        assert!((1..=60).contains(&info.ttl), "ttl {}", info.ttl);
        store
            .apply(vec![entry(3, Command::LeaseRevoke { id: 7 })])
            .unwrap();
        assert!(
            store.writer.lock().txn.is_some(),
            "a revoke committed the txn"
        );
        assert!(matches!(
            store.lease_info(7, false),
            Err(BackendError::LeaseNotFound)
        ));
        // A new leader reloads the clock from the table: the uncommitted changes are there.
        store.reset_lease_clock().unwrap();
        assert_eq!(store.lease_ids().unwrap(), vec![9]);
        // And they are durable once committed: a reopened store has the same leases.
        store.sync().unwrap();
        drop(store);
        let store = Store::open(&dir.path().join("s.redb"), 1 << 20).unwrap();
        assert_eq!(store.lease_ids().unwrap(), vec![9]);
    }

    /// The live records kept in memory are rebuilt from VERSIONS alone, after physical
    /// compaction too: a reopened store and a store that installed a snapshot of it answer
    /// every read at the latest revision as the original does, and as a plain model says.
    #[test]
    fn live_records_are_rebuilt_from_versions() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb"), 1 << 20).unwrap();
        let mut next = xorshift(0x2545f4914f6cdd1d);
        let key = |i: u64| format!("k{i}").into_bytes();
        let mut model: std::collections::BTreeMap<Vec<u8>, Vec<u8>> = Default::default();
        let mut index = 0u64;
        for round in 0..60u64 {
            // Several txns in one apply, some with more than one op.
            let mut entries = Vec::new();
            for t in 0..1 + next(4) {
                let mut ops = Vec::new();
                let mut keys = std::collections::BTreeSet::new();
                for _ in 0..1 + next(3) {
                    let k = key(next(10));
                    if !keys.insert(k.clone()) {
                        continue;
                    }
                    if next(4) == 0 {
                        model.remove(&k);
                        ops.push(RequestOp::DeleteRange(DeleteRangeRequest {
                            range: KeyRange::single(k),
                            prev_kv: false,
                        }));
                    } else {
                        let v = format!("v{round}.{t}").into_bytes();
                        model.insert(k.clone(), v.clone());
                        ops.push(RequestOp::Put(PutRequest {
                            key: k,
                            value: v,
                            ..Default::default()
                        }));
                    }
                }
                index += 1;
                entries.push(entry(index, Command::Txn(TxnRequest::unconditional(ops))));
            }
            store.apply(entries).unwrap();
            if round % 15 == 14 {
                let (rev, _) = store.current();
                index += 1;
                store
                    .apply(vec![entry(index, Command::Compact { revision: rev - 3 })])
                    .unwrap();
                store.compact_all().unwrap();
            }
        }
        let all = KeyRange::new(vec![0], vec![0]);
        let latest = |s: &Store| range(s, all.clone(), 0, 0, false);
        let want = latest(&store);
        let got: Vec<_> = want
            .kvs
            .iter()
            .map(|kv| (kv.key.clone(), kv.value.clone()))
            .collect();
        assert_eq!(got, model.into_iter().collect::<Vec<_>>());
        assert!(want.kvs.len() >= 3, "only {} keys live", want.kvs.len());
        let (_, snapshot) = store.dump().unwrap();
        let hash = store.hash_kv(0).unwrap();
        drop(store);
        let reopened = Store::open(&dir.path().join("s.redb"), 1 << 20).unwrap();
        assert_eq!(latest(&reopened), want);
        assert_eq!(reopened.hash_kv(0).unwrap(), hash);
        let other = Store::open(&dir.path().join("o.redb"), 1 << 20).unwrap();
        other.apply(vec![entry(1, put("stale", "x"))]).unwrap();
        other
            .install(
                std::io::Cursor::new(snapshot),
                None,
                &StoredMembership::default(),
            )
            .unwrap();
        assert_eq!(latest(&other), want);
        assert_eq!(other.hash_kv(0).unwrap(), hash);
    }
}
