//! The write path: one writer per process runs queued writes in batches, each batch in one
//! database transaction that first locks the `meta` row.
//!
//! Holding that row lock, the transaction is the only writer of the whole store (every process
//! takes the same lock), so the revision it reads is the current one and the revisions it
//! assigns are unique, gap-free and monotonic across processes. Each queued request runs
//! through [`cairn_backend::exec::execute`] on a view that reads the database (through the
//! same connection, so it sees the batch's earlier writes once flushed) with the batch's and
//! the request's unflushed writes laid on top; a request that fails leaves no trace. All
//! writes of the batch, the new revision and a `pg_notify` commit together: one commit (one
//! WAL flush) for many client writes. A batch that fails before its COMMIT was sent is retried
//! from scratch when the failure is transient; after that, its requests get `Unavailable`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use cairn_backend::exec::{self, TxnView};
use cairn_backend::*;
use sqlx::postgres::PgConnectOptions;
use sqlx::{PgConnection, Row};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};

use crate::sql::{self, db_err, is_transient};
use crate::Inner;

/// The notification channel every write transaction notifies on commit (payload: revision).
pub(crate) const CHANNEL: &str = "cairn_feed";

/// Opens a write batch's transaction and takes the revision lock, in one round trip (two
/// statements in one simple query; the lock statement's row is not needed).
const BEGIN_LOCKED: &str = "BEGIN; SELECT 1 FROM meta WHERE id = 1 FOR UPDATE";

/// Writes rows to `kv` ($1-$9, one array per column), upserts live keys into `current`
/// ($10-$15) and deletes deleted ones from it ($16); `delta` is what that changed the space
/// count by: the bytes of the rows inserted minus those of the rows replaced or deleted (the
/// replaced ones read in the same statement, whose snapshot does not see its own changes).
/// Empty arrays write nothing. A macro so that both statements below are literals.
macro_rules! flush_ctes {
    () => {
        "WITH ins AS (
            INSERT INTO kv (key, mod_revision, sub, create_revision, version, lease, value, deleted, prev_revision)
            SELECT * FROM UNNEST($1::bytea[], $2::int8[], $3::int4[], $4::int8[], $5::int8[], $6::int8[], $7::bytea[], $8::bool[], $9::int8[])
            RETURNING cairn_kv_bytes(key, value) AS b),
          old AS (SELECT coalesce(sum(cairn_current_bytes(key, value)), 0) AS b FROM current WHERE key = ANY($10::bytea[])),
          up AS (
            INSERT INTO current (key, create_revision, mod_revision, version, lease, value)
            SELECT * FROM UNNEST($10::bytea[], $11::int8[], $12::int8[], $13::int8[], $14::int8[], $15::bytea[])
            ON CONFLICT (key) DO UPDATE SET create_revision = EXCLUDED.create_revision,
               mod_revision = EXCLUDED.mod_revision, version = EXCLUDED.version,
               lease = EXCLUDED.lease, value = EXCLUDED.value
            RETURNING cairn_current_bytes(key, value) AS b),
          gone AS (DELETE FROM current WHERE key = ANY($16::bytea[]) RETURNING cairn_current_bytes(key, value) AS b),
          delta AS (SELECT ((SELECT coalesce(sum(b), 0) FROM ins) + (SELECT coalesce(sum(b), 0) FROM up)
                            - (SELECT b FROM old) - (SELECT coalesce(sum(b), 0) FROM gone))::bigint AS b)"
    };
}

/// A flush in the middle of a batch (before a revoke, or a read at a past revision).
const FLUSH: &str = concat!(flush_ctes!(), " SELECT b FROM delta");

/// The flush that ends a batch that wrote: also the new revision ($17) and the batch's other
/// changes of the space count ($18, grants and revokes) into `meta`, and the notification on
/// channel $19.
const FLUSH_AND_CLOSE: &str = concat!(
    flush_ctes!(),
    ", u AS (UPDATE meta SET revision = $17, bytes = bytes + $18 + (SELECT b FROM delta) WHERE id = 1 RETURNING revision)
     SELECT pg_notify($19, revision::text) FROM u"
);

/// The single keys the batch's txns name (compares, puts, which read the previous version,
/// single-key gets and deletes, nested txns included), at most [`PREFETCH_KEYS`].
fn batch_keys(ops: &[WriteOp]) -> Vec<Vec<u8>> {
    let mut keys = Vec::new();
    for op in ops {
        if let WriteOp::Txn(req) = op {
            exec::single_keys(req, &mut keys);
        }
    }
    keys.sort_unstable();
    keys.dedup();
    keys.truncate(PREFETCH_KEYS);
    keys.into_iter().map(<[u8]>::to_vec).collect()
}

/// With the revision lock held: the revision, the compaction point and the live row (or
/// `None`) of each of `keys`, in one statement.
async fn read_locked(
    conn: &mut PgConnection,
    keys: Vec<Vec<u8>>,
) -> Result<(Revision, Revision, HashMap<Vec<u8>, Option<KeyValue>>), sqlx::Error> {
    let rows = sqlx::query(
        "SELECT m.revision, m.compact_revision, c.key, c.create_revision, c.mod_revision, c.version, c.lease, c.value
         FROM meta m LEFT JOIN current c ON c.key = ANY($1::bytea[]) WHERE m.id = 1",
    )
    .bind(&keys)
    .fetch_all(&mut *conn)
    .await?;
    let first = rows.first().ok_or(sqlx::Error::RowNotFound)?;
    let (rev, compact) = (first.try_get(0)?, first.try_get(1)?);
    let mut known: HashMap<Vec<u8>, Option<KeyValue>> = keys.into_iter().map(|k| (k, None)).collect();
    for row in &rows {
        if row.try_get::<Option<Vec<u8>>, _>(2)?.is_some() {
            let kv = sql::decode_kv_at(row, 2)?;
            known.insert(kv.key.clone(), Some(kv));
        }
    }
    Ok((rev, compact, known))
}

/// A queued write.
pub(crate) enum WriteOp {
    Txn(TxnRequest),
    /// Grant a lease (id 0: a free id picked at random).
    Grant { id: LeaseId, ttl: i64 },
    /// Revoke a lease: delete its keys at one revision and forget it.
    Revoke(LeaseId),
    /// Revoke every lease whose deadline has passed (by the database clock).
    Expire,
}

pub(crate) enum WriteReply {
    Txn(TxnResponse),
    Grant(LeaseGrant),
    /// The revision after the revoke.
    Revoke(Revision),
    /// How many leases expired.
    Expire(usize),
}

pub(crate) struct WriteItem {
    pub op: WriteOp,
    pub reply: oneshot::Sender<Result<WriteReply>>,
}

/// A batch's failure: the database error and whether COMMIT had been sent (then the outcome
/// is unknown and the batch must not be retried).
struct BatchError {
    error: sqlx::Error,
    commit_sent: bool,
}

impl From<sqlx::Error> for BatchError {
    fn from(error: sqlx::Error) -> Self {
        BatchError { error, commit_sent: false }
    }
}

/// A batch's answer to each request and the revision it committed (`None`: no new one), or
/// its failure.
type Outcome = std::result::Result<(Vec<Result<WriteReply>>, Option<Revision>), BatchError>;

/// Retries of a batch that failed transiently before its commit.
const BATCH_RETRIES: u32 = 5;

/// Runs a future to the end on the calling thread: the writer thread's own runtime, or (for a
/// read-only txn on a blocking thread of the server's runtime) that runtime's handle.
#[derive(Clone, Copy)]
pub(crate) enum Block<'a> {
    Runtime(&'a tokio::runtime::Runtime),
    Handle(&'a Handle),
}

impl Block<'_> {
    pub(crate) fn block_on<F: std::future::Future>(self, f: F) -> F::Output {
        match self {
            Block::Runtime(rt) => rt.block_on(f),
            Block::Handle(h) => h.block_on(f),
        }
    }
}

/// The writer's own connection, opened on the writer thread's runtime, so that waiting for
/// PostgreSQL's answers wakes no other thread (a pooled connection's socket is driven by the
/// server's runtime, which then has to wake the thread blocked on it, on every round trip).
pub(crate) struct WriterConn {
    opts: PgConnectOptions,
    conn: Option<PgConnection>,
    used: std::time::Instant,
}

impl WriterConn {
    pub(crate) fn new(opts: PgConnectOptions) -> WriterConn {
        WriterConn { opts, conn: None, used: std::time::Instant::now() }
    }

    /// The connection, opened if there is none, and pinged first (replaced if that fails)
    /// when it has been idle or connections have been failing, as the pool does.
    fn get(&mut self, rt: Block<'_>, inner: &Inner) -> Result<&mut PgConnection, sqlx::Error> {
        if self.conn.is_some() && (self.used.elapsed() >= crate::PING_IDLE || inner.trouble.recent()) {
            let conn = self.conn.as_mut().expect("checked");
            if rt.block_on(sqlx::Connection::ping(conn)).is_err() {
                self.conn = None;
            }
        }
        if self.conn.is_none() {
            self.conn = Some(rt.block_on(<PgConnection as sqlx::Connection>::connect_with(&self.opts))?);
        }
        self.used = std::time::Instant::now();
        Ok(self.conn.as_mut().expect("just set"))
    }

    /// After a failed batch: a connection error leaves the connection unusable.
    fn failed(&mut self, e: &sqlx::Error) {
        if !matches!(e, sqlx::Error::Database(_)) {
            self.conn = None;
        }
    }
}

/// The writer thread: takes what is queued (up to `max_batch`), runs it as one batch, replies,
/// and goes on until shutdown.
pub(crate) fn writer_thread(inner: Arc<Inner>, mut rx: mpsc::Receiver<WriteItem>, mut conn: WriterConn) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "postgres: cannot start the writer's runtime");
            return;
        }
    };
    let mut shutdown = inner.shutdown.subscribe();
    loop {
        let first = rt.block_on(async {
            tokio::select! {
                item = rx.recv() => item,
                _ = shutdown.wait_for(|s| *s) => None,
            }
        });
        let Some(first) = first else { return };
        let mut items = vec![first];
        while items.len() < inner.opts.max_batch.max(1) {
            match rx.try_recv() {
                Ok(i) => items.push(i),
                Err(_) => break,
            }
        }
        let (ops, replies): (Vec<WriteOp>, Vec<_>) = items.into_iter().map(|i| (i.op, i.reply)).unzip();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_with_retry(&inner, &mut conn, Block::Runtime(&rt), &ops)
        }));
        let results: Vec<Result<WriteReply>> = match outcome {
            Ok(Ok((results, wrote))) => {
                if let Some(rev) = wrote {
                    inner.committed.fetch_max(rev, Ordering::AcqRel);
                    inner.wake.notify_one();
                }
                results
            }
            Ok(Err(e)) => {
                let err = if e.commit_sent {
                    tracing::warn!(error = %e.error, "postgres: commit outcome unknown");
                    BackendError::Unavailable(format!("postgres: commit outcome unknown: {}", e.error))
                } else {
                    db_err(e.error)
                };
                replies.iter().map(|_| Err(err.clone())).collect()
            }
            Err(_) => {
                // The connection may be mid-transaction: start over with a new one.
                conn.conn = None;
                replies.iter().map(|_| Err(BackendError::internal("writer panicked"))).collect()
            }
        };
        for (reply, result) in replies.into_iter().zip(results) {
            let _ = reply.send(result);
        }
    }
}

fn run_with_retry(
    inner: &Inner,
    conn: &mut WriterConn,
    rt: Block<'_>,
    ops: &[WriteOp],
) -> Outcome {
    let mut attempt = 0;
    loop {
        let r = run_batch(inner, conn, rt, ops);
        if let Err(e) = &r {
            inner.trouble.note(&e.error);
            conn.failed(&e.error);
        }
        match r {
            Err(e) if !e.commit_sent && is_transient(&e.error) && attempt < BATCH_RETRIES => {
                attempt += 1;
                tracing::warn!(error = %e.error, attempt, "postgres: write batch failed transiently, retrying");
                std::thread::sleep(Duration::from_millis(20 << attempt));
            }
            other => return other,
        }
    }
}

/// Runs one batch in one transaction. Returns each request's result and the new revision, if
/// the batch committed one.
fn run_batch(
    inner: &Inner,
    conn: &mut WriterConn,
    rt: Block<'_>,
    ops: &[WriteOp],
) -> Outcome {
    let conn = conn.get(rt, inner)?;
    if let [WriteOp::Grant { id, ttl }] = ops {
        return Ok((vec![grant_alone(conn, rt, *id, *ttl)?.map(WriteReply::Grant)], None));
    }
    // The lock is taken in BEGIN's round trip, so the next statement, which reads the counter
    // and the keys, starts after it (a READ COMMITTED statement's snapshot is taken when the
    // statement starts): it sees every batch committed before this one.
    let mut tx = rt.block_on(sqlx::Connection::begin_with(conn, BEGIN_LOCKED))?;
    let keys = batch_keys(ops);
    let (base, compact, known) = rt.block_on(read_locked(&mut tx, keys))?;
    let mut batch = Batch::new(rt, &mut tx, base, compact);
    batch.known = known;
    let mut results = Vec::with_capacity(ops.len());
    for op in ops {
        results.push(match op {
            WriteOp::Txn(req) => batch.run_txn(req)?.map(WriteReply::Txn),
            WriteOp::Grant { id, ttl } => batch.grant(*id, *ttl)?.map(WriteReply::Grant),
            WriteOp::Revoke(id) => batch.revoke(*id)?.map(WriteReply::Revoke),
            WriteOp::Expire => batch.expire()?.map(WriteReply::Expire),
        });
    }
    let (rev, bytes) = (batch.rev, batch.bytes);
    let wrote = rev > base;
    if wrote {
        // The rows, the counter and the notification in one statement.
        batch.flush_and_close()?;
    }
    drop(batch);
    if !wrote && bytes != 0 {
        // Grants, or revokes of leases without keys: no new revision, lease rows more or fewer.
        rt.block_on(sqlx::query("UPDATE meta SET bytes = bytes + $1 WHERE id = 1").bind(bytes).execute(&mut *tx))?;
    }
    rt.block_on(tx.commit()).map_err(|error| {
        // A database error answering COMMIT means it did not commit; anything else (the
        // connection died) leaves the outcome unknown.
        let commit_sent = !matches!(error, sqlx::Error::Database(_));
        BatchError { error, commit_sent }
    })?;
    Ok((results, wrote.then_some(rev)))
}

/// A grant with nothing else to batch it with: one statement (one round trip) instead of a
/// transaction. The lease row and its bytes in the space count go in together.
fn grant_alone(conn: &mut PgConnection, rt: Block<'_>, id: LeaseId, ttl: i64) -> Result<Result<LeaseGrant>, BatchError> {
    loop {
        let chosen = cairn_backend::lease_id_to_try(id);
        let row: Option<i64> = rt
            .block_on(
                sqlx::query_scalar(
                    "WITH i AS (INSERT INTO leases (id, ttl, expires_at) VALUES ($1, $2, now() + make_interval(secs => $2::float8))
                                ON CONFLICT (id) DO NOTHING RETURNING cairn_lease_bytes() AS b),
                          u AS (UPDATE meta SET bytes = bytes + (SELECT b FROM i)
                                WHERE id = 1 AND EXISTS (SELECT 1 FROM i) RETURNING revision)
                     SELECT revision FROM u",
                )
                .bind(chosen)
                .bind(ttl)
                .fetch_optional(&mut *conn),
            )
            .map_err(|error| {
                // It commits on its own: unless the database refused it, it may have.
                let commit_sent = !matches!(error, sqlx::Error::Database(_));
                BatchError { error, commit_sent }
            })?;
        match row {
            Some(revision) => return Ok(Ok(LeaseGrant { id: chosen, ttl, revision })),
            None if id == 0 => continue,
            None => return Ok(Err(BackendError::LeaseExists)),
        }
    }
}

/// Runs a txn that cannot write (no put or delete on any branch) at one snapshot, without the
/// revision lock, on the calling blocking thread.
pub(crate) fn run_read_txn(inner: &Inner, rt: Block<'_>, req: &TxnRequest) -> Result<TxnResponse> {
    let mut tx = rt.block_on(inner.pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")).map_err(db_err)?;
    let (base, compact) = rt.block_on(sql::read_meta(&mut tx, false)).map_err(db_err)?;
    let mut batch = Batch::new(rt, &mut tx, base, compact);
    let result = batch.run_txn(req).map_err(|e| db_err(e.error))?;
    drop(batch);
    let _ = rt.block_on(tx.rollback());
    result
}

/// One version row to insert into `kv`.
struct KvRow {
    key: Vec<u8>,
    mod_revision: Revision,
    sub: i32,
    create_revision: Revision,
    version: i64,
    lease: LeaseId,
    value: Vec<u8>,
    deleted: bool,
    prev_revision: Revision,
}

/// The state of one batch transaction.
struct Batch<'a> {
    rt: Block<'a>,
    conn: &'a mut PgConnection,
    /// The revision before the next request (the batch's writes so far included).
    rev: Revision,
    compact: Revision,
    /// Revisions up to here are in the database (visible to this transaction's queries).
    flushed_rev: Revision,
    /// The batch's writes not yet flushed: the key's newest kv, or `None` for deleted.
    pending: BTreeMap<Vec<u8>, Option<KeyValue>>,
    rows: Vec<KvRow>,
    /// What the batch's statements so far changed the space count (`meta.bytes`) by: the
    /// bytes of the rows they inserted minus those of the rows they replaced or deleted, as
    /// the database computed them (`cairn_*_bytes`). Added to the count when the batch commits.
    bytes: i64,
    /// The live row (or `None`: no live key) in `current` of keys the batch's requests name,
    /// read with the revision lock before they run (`read_locked`) and kept up to date by `flush`, so a
    /// request reading one of them needs no round trip. Only this batch writes `current` while
    /// it holds the meta row lock.
    known: HashMap<Vec<u8>, Option<KeyValue>>,
}

/// Most keys a batch reads ahead.
const PREFETCH_KEYS: usize = 4096;

impl<'a> Batch<'a> {
    fn new(rt: Block<'a>, conn: &'a mut PgConnection, base: Revision, compact: Revision) -> Self {
        Batch {
            rt,
            conn,
            rev: base,
            compact,
            flushed_rev: base,
            pending: BTreeMap::new(),
            rows: Vec::new(),
            bytes: 0,
            known: HashMap::new(),
        }
    }

    /// Writes the batch's unflushed changes to `kv` and `current`, in one statement.
    fn flush(&mut self) -> Result<(), sqlx::Error> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let q = self.flush_query(FLUSH);
        let delta: i64 = self.rt.block_on(q.fetch_one(&mut *self.conn))?.try_get(0)?;
        self.bytes += delta;
        Ok(())
    }

    /// The batch's last statement: its unflushed changes, the new revision and space count in
    /// `meta`, and the notification, which PostgreSQL sends when the transaction commits.
    fn flush_and_close(&mut self) -> Result<(), sqlx::Error> {
        let (rev, bytes) = (self.rev, self.bytes);
        let q = self.flush_query(FLUSH_AND_CLOSE).bind(rev).bind(bytes).bind(CHANNEL);
        self.rt.block_on(q.execute(&mut *self.conn))?;
        Ok(())
    }

    /// `sql` (one of [`FLUSH`] and [`FLUSH_AND_CLOSE`]) with the unflushed changes bound as
    /// its first 16 parameters; takes them out of the batch and updates what it knows.
    fn flush_query(&mut self, sql: &'static str) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
        let rows = std::mem::take(&mut self.rows);
        let pending = std::mem::take(&mut self.pending);
        for (key, kv) in &pending {
            if let Some(known) = self.known.get_mut(key) {
                *known = kv.clone();
            }
        }
        let mut cols = KvColumns::default();
        for r in rows {
            cols.push(r);
        }
        let (mut live, mut dead) = (KvColumns::default(), Vec::new());
        for (key, kv) in pending {
            match kv {
                Some(kv) => live.push(KvRow {
                    key,
                    mod_revision: kv.mod_revision,
                    sub: 0,
                    create_revision: kv.create_revision,
                    version: kv.version,
                    lease: kv.lease,
                    value: kv.value,
                    deleted: false,
                    prev_revision: 0,
                }),
                None => dead.push(key),
            }
        }
        self.flushed_rev = self.rev;
        sqlx::query(sql)
            .bind(cols.key)
            .bind(cols.mod_revision)
            .bind(cols.sub)
            .bind(cols.create_revision)
            .bind(cols.version)
            .bind(cols.lease)
            .bind(cols.value)
            .bind(cols.deleted)
            .bind(cols.prev_revision)
            .bind(live.key)
            .bind(live.create_revision)
            .bind(live.mod_revision)
            .bind(live.version)
            .bind(live.lease)
            .bind(live.value)
            .bind(dead)
    }

    /// Runs one txn request. The outer error aborts the batch (a database failure); the inner
    /// one is the request's own outcome.
    fn run_txn(&mut self, req: &TxnRequest) -> Result<Result<TxnResponse>, BatchError> {
        let mut view = ReqView { batch: self, pending: BTreeMap::new(), events: Vec::new(), db_error: None };
        let result = exec::execute(&mut view, req);
        if let Some(e) = view.db_error.take() {
            return Err(e.into());
        }
        Ok(match result {
            Ok((resp, wrote)) => {
                if wrote {
                    view.commit();
                }
                Ok(resp)
            }
            Err(e) => Err(e),
        })
    }

    /// Deletes every key attached to `id` at one revision (none if it has no keys); the lease
    /// row is deleted in the same transaction, which is what makes revocation and expiry
    /// happen once across processes.
    /// Inserts the lease row; its bytes join the space count with the batch's. Its deadline is
    /// counted from now (the statement's time, not the batch's start).
    fn grant(&mut self, id: LeaseId, ttl: i64) -> Result<Result<LeaseGrant>, BatchError> {
        loop {
            let chosen = cairn_backend::lease_id_to_try(id);
            let bytes: Option<i64> = self.rt.block_on(
                sqlx::query_scalar(
                    "INSERT INTO leases (id, ttl, expires_at) VALUES ($1, $2, clock_timestamp() + make_interval(secs => $2::float8))
                     ON CONFLICT (id) DO NOTHING RETURNING cairn_lease_bytes()",
                )
                .bind(chosen)
                .bind(ttl)
                .fetch_optional(&mut *self.conn),
            )?;
            match bytes {
                Some(b) => {
                    self.bytes += b;
                    return Ok(Ok(LeaseGrant { id: chosen, ttl, revision: self.rev }));
                }
                None if id == 0 => continue,
                None => return Ok(Err(BackendError::LeaseExists)),
            }
        }
    }

    fn revoke(&mut self, id: LeaseId) -> Result<Result<Revision>, BatchError> {
        // The lease's keys may have been put earlier in this batch.
        self.flush()?;
        let conn = &mut *self.conn;
        let gone = self.rt.block_on(async {
            let gone = sqlx::query("DELETE FROM leases WHERE id = $1 RETURNING cairn_lease_bytes()").bind(id).fetch_optional(&mut *conn).await?;
            let Some(gone) = gone else { return Ok(None) };
            let bytes: i64 = gone.try_get(0)?;
            let rows = sqlx::query("SELECT key FROM current WHERE lease = $1 ORDER BY key").bind(id).fetch_all(&mut *conn).await?;
            let keys = rows.iter().map(|r| r.try_get::<Vec<u8>, _>(0)).collect::<Result<Vec<_>, _>>()?;
            Ok::<_, sqlx::Error>(Some((bytes, keys)))
        })?;
        let Some((bytes, keys)) = gone else { return Ok(Err(BackendError::LeaseNotFound)) };
        self.bytes -= bytes;
        if keys.is_empty() {
            return Ok(Ok(self.rev));
        }
        let ops = keys
            .into_iter()
            .map(|key| RequestOp::DeleteRange(DeleteRangeRequest { range: KeyRange::single(key), prev_kv: false }))
            .collect();
        Ok(self.run_txn(&TxnRequest::unconditional(ops))?.map(|_| self.rev))
    }

    /// Revokes every lease whose deadline has passed, each at its own revision.
    fn expire(&mut self) -> Result<Result<usize>, BatchError> {
        let conn = &mut *self.conn;
        let due: Vec<i64> = self.rt.block_on(async {
            let rows = sqlx::query("SELECT id FROM leases WHERE expires_at <= now() ORDER BY id LIMIT 1000 FOR UPDATE SKIP LOCKED")
                .fetch_all(&mut *conn)
                .await?;
            rows.iter().map(|r| r.try_get::<i64, _>(0)).collect::<Result<Vec<_>, sqlx::Error>>()
        })?;
        let mut n = 0;
        for id in due {
            if let Ok(rev) = self.revoke(id)? {
                n += 1;
                tracing::debug!(lease = id, revision = rev, "postgres: lease expired");
            }
        }
        Ok(Ok(n))
    }
}

#[derive(Default)]
struct KvColumns {
    key: Vec<Vec<u8>>,
    mod_revision: Vec<i64>,
    sub: Vec<i32>,
    create_revision: Vec<i64>,
    version: Vec<i64>,
    lease: Vec<i64>,
    value: Vec<Vec<u8>>,
    deleted: Vec<bool>,
    prev_revision: Vec<i64>,
}

impl KvColumns {
    fn push(&mut self, r: KvRow) {
        self.key.push(r.key);
        self.mod_revision.push(r.mod_revision);
        self.sub.push(r.sub);
        self.create_revision.push(r.create_revision);
        self.version.push(r.version);
        self.lease.push(r.lease);
        self.value.push(r.value);
        self.deleted.push(r.deleted);
        self.prev_revision.push(r.prev_revision);
    }
}

/// One request's view: the database as of the batch so far, plus this request's writes.
struct ReqView<'b, 'a> {
    batch: &'b mut Batch<'a>,
    pending: BTreeMap<Vec<u8>, Option<KeyValue>>,
    /// (deleted, kv, prev) in txn order.
    events: Vec<(bool, KeyValue, Option<KeyValue>)>,
    /// A database error seen through the view: the batch must be aborted.
    db_error: Option<sqlx::Error>,
}

impl ReqView<'_, '_> {
    fn db<T>(&mut self, r: Result<T, sqlx::Error>) -> Result<T> {
        r.map_err(|e| {
            let be = db_err_ref(&e);
            self.db_error.get_or_insert(e);
            be
        })
    }

    /// Unflushed writes (the batch's, then this request's on top) to keys in `range`.
    fn overlay(&self, range: &KeyRange) -> BTreeMap<Vec<u8>, Option<KeyValue>> {
        let mut out = BTreeMap::new();
        for map in [&self.batch.pending, &self.pending] {
            for (k, v) in map.iter().filter(|(k, _)| range.contains(k)) {
                out.insert(k.clone(), v.clone());
            }
        }
        out
    }

    /// Records this request's writes in the batch at the next revision.
    fn commit(self) {
        let rev = self.batch.rev + 1;
        // One row per key and revision: a key written twice in one txn (which the frontend
        // rejects, as etcd) keeps its last write.
        let mut last: BTreeMap<&[u8], usize> = BTreeMap::new();
        for (i, (_, kv, _)) in self.events.iter().enumerate() {
            last.insert(kv.key.as_slice(), i);
        }
        let keep: std::collections::BTreeSet<usize> = last.into_values().collect();
        for (i, (deleted, kv, prev)) in self.events.into_iter().enumerate() {
            if !keep.contains(&i) {
                continue;
            }
            let prev_revision = prev.as_ref().map_or(0, |p| p.mod_revision);
            self.batch.rows.push(if deleted {
                KvRow {
                    key: kv.key,
                    mod_revision: rev,
                    sub: i as i32,
                    create_revision: 0,
                    version: 0,
                    lease: 0,
                    value: Vec::new(),
                    deleted: true,
                    prev_revision,
                }
            } else {
                KvRow {
                    key: kv.key,
                    mod_revision: rev,
                    sub: i as i32,
                    create_revision: kv.create_revision,
                    version: kv.version,
                    lease: kv.lease,
                    value: kv.value,
                    deleted: false,
                    prev_revision,
                }
            });
        }
        self.batch.pending.extend(self.pending);
        self.batch.rev = rev;
    }
}

fn db_err_ref(e: &sqlx::Error) -> BackendError {
    if is_transient(e) {
        BackendError::Unavailable(format!("postgres: {e}"))
    } else {
        BackendError::Internal(format!("postgres: {e}"))
    }
}

impl TxnView for ReqView<'_, '_> {
    fn base_revision(&self) -> Revision {
        self.batch.rev
    }

    fn compact_revision(&self) -> Revision {
        self.batch.compact
    }

    fn range_latest(&mut self, range: &KeyRange, limit: Option<usize>, count_only: bool) -> Result<(Vec<KeyValue>, i64)> {
        if range.is_single() {
            // This request's writes, the batch's unflushed ones, then what the batch read ahead.
            let hit = match self.pending.get(&range.key).or_else(|| self.batch.pending.get(&range.key)) {
                Some(kv) => Some(kv.clone()),
                None => self.batch.known.get(&range.key).cloned(),
            };
            if let Some(kv) = hit {
                let count = i64::from(kv.is_some());
                if count_only {
                    return Ok((Vec::new(), count));
                }
                return Ok((kv.into_iter().take(limit.unwrap_or(usize::MAX)).collect(), count));
            }
        }
        let overlay = self.overlay(range);
        let rt = self.batch.rt;
        if overlay.is_empty() {
            let r = rt.block_on(sql::range_with_count(self.batch.conn, range, None, limit, count_only));
            return self.db(r);
        }
        let r = rt.block_on(sql::fetch_range(self.batch.conn, range, None, None));
        let rows = self.db(r)?;
        let mut live: BTreeMap<Vec<u8>, KeyValue> = rows.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
        for (k, v) in overlay {
            match v {
                Some(kv) => live.insert(k, kv),
                None => live.remove(&k),
            };
        }
        let count = live.len() as i64;
        if count_only {
            return Ok((Vec::new(), count));
        }
        Ok((live.into_values().take(limit.unwrap_or(usize::MAX)).collect(), count))
    }

    fn range_at(&mut self, range: &KeyRange, rev: Revision, limit: Option<usize>, count_only: bool) -> Result<(Vec<KeyValue>, i64)> {
        if rev > self.batch.flushed_rev {
            let r = self.batch.flush();
            self.db(r)?;
        }
        let rt = self.batch.rt;
        let r = rt.block_on(sql::range_with_count(self.batch.conn, range, Some(rev), limit, count_only));
        self.db(r)
    }

    fn lease_exists(&mut self, id: LeaseId) -> Result<bool> {
        let rt = self.batch.rt;
        let r = rt.block_on(async {
            let row = sqlx::query("SELECT EXISTS (SELECT 1 FROM leases WHERE id = $1)").bind(id).fetch_one(&mut *self.batch.conn).await?;
            row.try_get::<bool, _>(0)
        });
        self.db(r)
    }

    fn put(&mut self, kv: KeyValue, prev: Option<KeyValue>) -> Result<()> {
        self.pending.insert(kv.key.clone(), Some(kv.clone()));
        self.events.push((false, kv, prev));
        Ok(())
    }

    fn delete(&mut self, prev: KeyValue, rev: Revision) -> Result<()> {
        self.pending.insert(prev.key.clone(), None);
        let kv = KeyValue { key: prev.key.clone(), mod_revision: rev, ..KeyValue::default() };
        self.events.push((true, kv, Some(prev)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{testing, PostgresBackend, PostgresOptions};

    fn put(key: &str, value: &str) -> RequestOp {
        RequestOp::Put(PutRequest { key: key.into(), value: value.into(), ..Default::default() })
    }

    /// One batch reads its txns' keys ahead. A revoke in its middle flushes the batch's earlier
    /// writes to the database; a later txn of the batch must still see them.
    #[test]
    fn a_batch_sees_its_own_writes_across_a_flush() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let url = testing::server().create_database().await.unwrap();
            let b = PostgresBackend::connect(&url, PostgresOptions::default()).await.unwrap();
            let lease = b.lease_grant(0, 60).await.unwrap().id;
            let ops = vec![
                WriteOp::Txn(TxnRequest::unconditional(vec![put("k", "1"), put("other", "-")])),
                WriteOp::Revoke(lease),
                WriteOp::Txn(TxnRequest {
                    compare: vec![Compare {
                        result: CompareResult::Equal,
                        target: CompareTarget::Value(b"1".to_vec()),
                        range: KeyRange::single("k"),
                    }],
                    success: vec![put("other", "saw k")],
                    failure: vec![put("other", "missed k")],
                }),
            ];
            let inner = b.inner.clone();
            let handle = Handle::current();
            let mut conn = WriterConn::new(url.parse().unwrap());
            let (results, wrote) = tokio::task::spawn_blocking(move || {
                run_with_retry(&inner, &mut conn, Block::Handle(&handle), &ops).map_err(|e| e.error.to_string())
            })
            .await
            .unwrap()
            .unwrap();
            assert!(wrote.is_some());
            assert_eq!(results.len(), 3);
            match &results[2] {
                Ok(WriteReply::Txn(t)) => assert!(t.succeeded, "the last txn saw k=1 written earlier in its batch"),
                other => panic!("the last txn: {:?}", other.as_ref().err()),
            }
            let (kvs, _) = b
                .range(RangeRequest { range: KeyRange::single("other"), ..Default::default() })
                .await
                .map(|r| (r.kvs, r.count))
                .unwrap();
            assert_eq!(kvs[0].value, b"saw k");
            b.shutdown().await;
        });
    }
}
