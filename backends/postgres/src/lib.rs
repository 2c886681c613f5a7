//! Cairn's PostgreSQL backend: etcd's MVCC key space, change feed and leases in one
//! PostgreSQL database that several Cairn processes can share as one consistent etcd.
//!
//! - Revisions: every write transaction locks the single `meta` row first, so revisions are
//!   assigned by one writer at a time across all processes: unique, gap-free, monotonic.
//!   Each process batches its concurrent writes into one database transaction
//!   ([`writer`]), one revision per client request.
//! - Reads run at a REPEATABLE READ snapshot (the counter and the rows agree); latest reads
//!   use `current` (live keys), past revisions `kv` (every version); both are index range
//!   scans on bytea keys.
//! - Watch: `pg_notify` in each write transaction wakes every process's tailer, which re-reads
//!   the log by revision ([`feed`]).
//! - Leases live in a table with database-clock deadlines; whichever process deletes a lease
//!   row (in the same transaction as its keys) is the one that expired or revoked it.
//! - Compaction moves the point in one short transaction and removes superseded versions in
//!   bounded batches ([`compact`]).
//!
//! See README.md for the schema and settings.

mod compact;
mod feed;
mod schema;
mod sql;
pub mod testing;
mod writer;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cairn_backend::quota;
use cairn_backend::range::{fetch_limit, finish_range};
use cairn_backend::*;
use futures::TryStreamExt;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};
use tokio::runtime::Handle;
use tokio::sync::{broadcast, mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;

use sql::{db_err, is_transient};
use writer::{WriteItem, WriteOp, WriteReply};

/// Settings of the PostgreSQL backend.
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    /// Connections (at least 3): the writer's own, and a pool of the rest (reads, feeds
    /// catching up, lease calls). The LISTEN connection comes on top.
    pub max_connections: u32,
    /// Connections kept open when idle.
    pub min_connections: u32,
    /// How long a request waits for a pooled connection before it fails `Unavailable`.
    pub acquire_timeout: Duration,
    /// Client writes per database transaction at most.
    pub max_batch: usize,
    /// The feed re-reads the log this often even without a notification.
    pub feed_poll_interval: Duration,
    /// How often each process looks for expired leases.
    pub lease_sweep_interval: Duration,
    /// Rows deleted per compaction statement.
    pub compaction_batch: i64,
    /// The `application_name` of this process's connections (shows in `pg_stat_activity`).
    pub application_name: String,
    /// etcd's `--quota-backend-bytes` (0: etcd's default, 2 GiB): a put, a txn with puts or a
    /// lease grant is refused with `NoSpace` when the bytes Cairn's data takes (its rows' keys
    /// and values plus a fixed per-row overhead: [`Backend::status`]'s `db_size_in_use`) plus
    /// the request's cost would reach it.
    pub quota_backend_bytes: u64,
    /// How long a measured size is trusted (plus the costs this process admitted since) before
    /// the quota check measures again. A request the estimate would refuse always measures.
    pub quota_measure_interval: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            max_connections: 10,
            min_connections: 1,
            acquire_timeout: Duration::from_secs(5),
            max_batch: 256,
            feed_poll_interval: Duration::from_millis(500),
            lease_sweep_interval: Duration::from_millis(250),
            compaction_batch: 10_000,
            application_name: "cairn".to_string(),
            quota_backend_bytes: 0,
            quota_measure_interval: Duration::from_secs(1),
        }
    }
}

/// What the tasks of one backend instance share.
pub(crate) struct Inner {
    pool: PgPool,
    opts: PostgresOptions,
    writer: mpsc::Sender<WriteItem>,
    /// Every committed revision, once, in order (see [`feed`]).
    feed: broadcast::Sender<Arc<ChangeBatch>>,
    /// Wakes the tailer (a local commit or a notification).
    wake: Notify,
    /// The newest revision this process knows to be committed: its writer's last commit or a
    /// notification's payload. The tailer skips a wake-up for what it has delivered already
    /// (each local commit also comes back as a notification).
    committed: AtomicI64,
    /// Set when notifications may have been missed (the LISTEN connection was down) or one
    /// could not be read: the tailer's next wake-up reads the database whatever `committed` says.
    recheck: AtomicBool,
    /// The tailer's reads of the change log so far.
    tail_reads: AtomicU64,
    /// When a statement last failed transiently (see the pool's `before_acquire`).
    trouble: Arc<Trouble>,
    shutdown: watch::Sender<bool>,
    /// The quota check's last measurement of the bytes Cairn's data takes.
    space: parking_lot::Mutex<Space>,
}

/// A measured size and what this process admitted since.
#[derive(Default)]
struct Space {
    measured: u64,
    at: Option<std::time::Instant>,
    added: u64,
}

/// The bytes Cairn's data takes, as the space quota counts them (and [`Backend::status`]
/// reports them as `db_size_in_use`): `meta.bytes`, the count of the rows of `kv` (every
/// version kept), `current` (the live keys) and `leases`, each row its key and value plus a
/// fixed per-row overhead (`cairn_kv_bytes`, `cairn_current_bytes`, `cairn_lease_bytes` in
/// schema migration 3), kept exact by every statement that adds or removes such rows; plus the
/// few `docs` rows (auth store, alarms, members), summed when measured. Like the bytes etcd's
/// bbolt file holds, it grows with every version written and shrinks when compaction removes
/// versions; unlike a file size it does not count free pages, and counts values uncompressed.
const SPACE_SQL: &str = "(SELECT bytes FROM meta WHERE id = 1)
     + (SELECT coalesce(sum(octet_length(name)::bigint + octet_length(value) + 64), 0) FROM docs)";

/// Recomputes `meta.bytes` from the tables (what migration 3 computed for an existing
/// database). Run under the `meta` row lock, in a statement after taking it: every writer,
/// compaction statement and lease grant updates the count under that lock, so what they have
/// not committed yet they add or subtract after this, and the count stays exact.
const RECOUNT_SQL: &str = "UPDATE meta SET bytes =
          (SELECT coalesce(sum(cairn_kv_bytes(key, value)), 0) FROM kv)
        + (SELECT coalesce(sum(cairn_current_bytes(key, value)), 0) FROM current)
        + (SELECT count(*) * cairn_lease_bytes() FROM leases)
     WHERE id = 1 RETURNING bytes";

impl Inner {
    async fn submit(&self, op: WriteOp) -> Result<WriteReply> {
        let (reply, rx) = oneshot::channel();
        self.writer.send(WriteItem { op, reply }).await.map_err(|_| BackendError::Stopped)?;
        rx.await.map_err(|_| BackendError::Stopped)?
    }

    /// etcd's quota check for a request that adds `cost` bytes (see [`cairn_backend::quota`]).
    /// Measuring costs a round trip, so a measurement is reused for `quota_measure_interval`
    /// while the costs this process admitted since stay below an eighth of the room it left
    /// (a write can count about twice its etcd cost: its version in `kv` and its live row in
    /// `current`; other processes write too): far from the quota that is almost never, close
    /// to it every request measures.
    /// Refuses only on a fresh measurement, so a NOSPACE is never raised from an estimate.
    async fn check_quota(&self, cost: u64) -> Result<()> {
        if cost == 0 {
            return Ok(());
        }
        let quota = quota::quota_bytes(self.opts.quota_backend_bytes);
        {
            let mut s = self.space.lock();
            let recent = s.at.is_some_and(|at| at.elapsed() < self.opts.quota_measure_interval);
            let room = quota.saturating_sub(s.measured);
            if recent && s.added + cost < room / 8 {
                s.added += cost;
                return Ok(());
            }
        }
        let size = self.measure_space().await?;
        if quota::exceeds(size, cost, quota) {
            return Err(BackendError::NoSpace);
        }
        self.space.lock().added += cost;
        Ok(())
    }

    async fn measure_space(&self) -> Result<u64> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT ({SPACE_SQL})::bigint")))
            .fetch_one(&self.pool)
            .await
            .map_err(db_err)?;
        let size = row.try_get::<i64, _>(0).map_err(db_err)?.max(0) as u64;
        *self.space.lock() = Space { measured: size, at: Some(std::time::Instant::now()), added: 0 };
        Ok(size)
    }
}

/// Batches a slow feed may fall behind before it re-reads the log.
const FEED_CAPACITY: usize = 1024;

/// The raft term [`Backend::status`] reports, and so the one in every response header: a
/// constant, since the database, not an election, orders the writes.
pub const RAFT_TERM: u64 = 1;
/// Attempts of a read that fails transiently.
const READ_ATTEMPTS: u32 = 3;
/// A pooled connection idle this long is pinged before it is used.
pub(crate) const PING_IDLE: Duration = Duration::from_secs(1);
/// After a statement failed transiently, every pooled connection is pinged before it is used
/// for this long.
const TROUBLE_FOR: Duration = Duration::from_secs(5);

/// When a statement last failed transiently.
pub(crate) struct Trouble {
    base: std::time::Instant,
    /// Milliseconds since `base`, plus 1 (0: never).
    at: AtomicU64,
}

impl Trouble {
    fn new() -> Trouble {
        Trouble { base: std::time::Instant::now(), at: AtomicU64::new(0) }
    }

    /// Notes a transient failure of `e`'s kind, if it is one.
    pub(crate) fn note(&self, e: &sqlx::Error) {
        if is_transient(e) {
            self.at.store(self.base.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
        }
    }

    pub(crate) fn recent(&self) -> bool {
        match self.at.load(Ordering::Relaxed) {
            0 => false,
            t => (self.base.elapsed().as_millis() as u64 + 1).saturating_sub(t) < TROUBLE_FOR.as_millis() as u64,
        }
    }
}

/// The PostgreSQL backend. See the crate docs.
pub struct PostgresBackend {
    inner: Arc<Inner>,
    tasks: parking_lot::Mutex<Vec<JoinHandle<()>>>,
}

impl PostgresBackend {
    /// Connects to `url` (a libpq-style URL: `postgres://user:pass@host:port/db?sslmode=...`),
    /// applies schema migrations, and starts the writer, the change-feed tailer, the LISTEN
    /// task and the lease sweeper. Must be called inside a tokio runtime.
    pub async fn connect(url: &str, opts: PostgresOptions) -> anyhow::Result<Arc<PostgresBackend>> {
        let connect: PgConnectOptions = url.parse()?;
        let trouble = Arc::new(Trouble::new());
        let connect = connect.application_name(&opts.application_name);
        // The writer's own connection is one of `max_connections`.
        let pool = PgPoolOptions::new()
            .max_connections(opts.max_connections.max(3) - 1)
            .min_connections(opts.min_connections)
            .acquire_timeout(opts.acquire_timeout)
            // sqlx pings every connection it hands out, a round trip before each read and
            // write batch. Only one idle for a while is pinged (and replaced if that fails),
            // or any while connections have been failing (a restarted server, killed
            // backends): a recently used one that broke fails its statement, which is retried,
            // and the retry should not find another broken one.
            .test_before_acquire(false)
            .before_acquire({
                let trouble = trouble.clone();
                move |conn, meta| {
                    let check = meta.idle_for >= PING_IDLE || trouble.recent();
                    Box::pin(async move {
                        if check {
                            sqlx::Connection::ping(conn).await?;
                        }
                        Ok(true)
                    })
                }
            })
            .connect_with(connect.clone())
            .await?;
        let mut conn = pool.acquire().await?;
        schema::migrate(&mut conn).await?;
        let row = sqlx::query("SELECT revision, compact_revision, compacted_through FROM meta WHERE id = 1").fetch_one(&mut *conn).await?;
        let (rev, compact, through): (i64, i64, i64) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        drop(conn);

        let (writer_tx, writer_rx) = mpsc::channel(4096);
        let (feed, _) = broadcast::channel(FEED_CAPACITY);
        let (shutdown, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            pool,
            opts,
            writer: writer_tx,
            feed,
            wake: Notify::new(),
            committed: AtomicI64::new(rev),
            recheck: AtomicBool::new(false),
            tail_reads: AtomicU64::new(0),
            trouble,
            shutdown,
            space: parking_lot::Mutex::new(Space::default()),
        });
        // The writer thread drops `done` when it ends (it stops at shutdown).
        let (done, writer_done) = oneshot::channel::<()>();
        {
            let (inner, conn) = (inner.clone(), writer::WriterConn::new(connect));
            std::thread::Builder::new().name("cairn-pg-writer".into()).spawn(move || {
                let _done = done;
                writer::writer_thread(inner, writer_rx, conn)
            })?;
        }
        let tasks = vec![
            tokio::spawn(async move {
                let _ = writer_done.await;
            }),
            tokio::spawn(feed::tailer(inner.clone(), rev)),
            tokio::spawn(feed::listener(inner.clone())),
            tokio::spawn(sweeper(inner.clone())),
        ];
        if through < compact {
            tracing::info!(compact_revision = compact, compacted_through = through, "postgres: resuming an unfinished compaction");
            let pool = inner.pool.clone();
            let batch = inner.opts.compaction_batch;
            tokio::spawn(async move {
                if let Err(e) = compact::physical(&pool, compact, batch).await {
                    tracing::warn!(error = %e, "postgres: resumed compaction failed");
                }
            });
        }
        Ok(Arc::new(PostgresBackend { inner, tasks: parking_lot::Mutex::new(tasks) }))
    }

    /// Stops the background tasks (a write batch in flight finishes first) and closes the
    /// pool. Requests made afterwards fail with `Stopped`.
    pub async fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        let tasks = std::mem::take(&mut *self.tasks.lock());
        for t in tasks {
            let _ = t.await;
        }
        self.inner.pool.close().await;
    }

    /// The connection pool (for tools and tests).
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The plan PostgreSQL chooses for a range read of `range`, latest (`revision == None`)
    /// or at a past revision, as `EXPLAIN` text: to check that ranges are index range scans.
    pub async fn explain_range(&self, range: &KeyRange, revision: Option<Revision>, limit: Option<usize>) -> Result<String> {
        let sql = format!("EXPLAIN {}", sql::range_sql(range, revision.is_some(), false));
        let mut q = sql::bind_range(sqlx::query(sqlx::AssertSqlSafe(sql)), range);
        if let Some(rev) = revision {
            q = q.bind(rev);
        }
        let rows = q.bind(limit.map(|l| l as i64)).fetch_all(&self.inner.pool).await.map_err(db_err)?;
        let lines: Vec<String> = rows.iter().map(|r| r.try_get::<String, _>(0)).collect::<Result<_, _>>().map_err(db_err)?;
        Ok(lines.join("\n"))
    }

    /// Runs `f` with a read-only REPEATABLE READ transaction, retrying transient failures.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        F: for<'c> Fn(&'c mut sqlx::PgConnection) -> futures::future::BoxFuture<'c, Result<Result<T>, sqlx::Error>>,
    {
        self.read_with(true, f).await
    }

    /// As [`Self::read`], for `f` that runs one statement, which is its own snapshot: no
    /// transaction around it (three round trips fewer).
    async fn read_once<T, F>(&self, f: F) -> Result<T>
    where
        F: for<'c> Fn(&'c mut sqlx::PgConnection) -> futures::future::BoxFuture<'c, Result<Result<T>, sqlx::Error>>,
    {
        self.read_with(false, f).await
    }

    async fn read_with<T, F>(&self, txn: bool, f: F) -> Result<T>
    where
        F: for<'c> Fn(&'c mut sqlx::PgConnection) -> futures::future::BoxFuture<'c, Result<Result<T>, sqlx::Error>>,
    {
        let mut attempt = 0;
        loop {
            let r = async {
                if !txn {
                    let mut conn = self.inner.pool.acquire().await?;
                    return f(&mut conn).await;
                }
                let mut tx = self.inner.pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
                let out = f(&mut tx).await?;
                tx.rollback().await?;
                Ok::<_, sqlx::Error>(out)
            }
            .await;
            if let Err(e) = &r {
                self.inner.trouble.note(e);
            }
            match r {
                Ok(out) => return out,
                Err(e) if is_transient(&e) && attempt + 1 < READ_ATTEMPTS => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
                }
                Err(e) => return Err(db_err(e)),
            }
        }
    }
}

impl Drop for PostgresBackend {
    fn drop(&mut self) {
        self.inner.shutdown.send_replace(true);
    }
}

/// Looks for expired leases and, when there are any, has the writer revoke them. Every
/// process sweeps; the lease row's deletion decides which one does each lease.
async fn sweeper(inner: Arc<Inner>) {
    let mut shutdown = inner.shutdown.subscribe();
    let mut tick = tokio::time::interval(inner.opts.lease_sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let due = sqlx::query("SELECT EXISTS (SELECT 1 FROM leases WHERE expires_at <= now())").fetch_one(&inner.pool).await;
        match due.and_then(|r| r.try_get::<bool, _>(0)) {
            Ok(true) => {
                match inner.submit(WriteOp::Expire).await {
                    Ok(WriteReply::Expire(n)) => tracing::debug!(expired = n, "postgres: lease sweep"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "postgres: lease expiry failed; retrying"),
                }
            }
            Ok(false) => {}
            Err(e) => tracing::debug!(error = %e, "postgres: lease sweep query failed"),
        }
    }
}

/// CRC-32C (Castagnoli), as etcd's HashKV; chainable.
fn crc32c(crc: u32, data: &[u8]) -> u32 {
    let mut crc = !crc;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

#[async_trait]
impl Backend for PostgresBackend {
    async fn range(&self, req: RangeRequest) -> Result<RangeResponse> {
        let req = Arc::new(req);
        if req.revision <= 0 {
            // The latest revision: one statement, no transaction.
            return self
                .read_once(move |conn| {
                    let req = req.clone();
                    Box::pin(async move {
                        let req = &*req;
                        let (rev, _, kvs, count) = sql::read_latest(conn, &req.range, fetch_limit(req), req.count_only).await?;
                        let (kvs, more) = if req.count_only { (kvs, false) } else { finish_range(req, kvs) };
                        Ok(Ok(RangeResponse { revision: rev, kvs, more, count }))
                    })
                })
                .await;
        }
        self.read(move |conn| {
            let req = req.clone();
            Box::pin(async move {
                let req = &*req;
                let (rev, compact) = sql::read_meta(conn, false).await?;
                if req.revision > rev {
                    return Ok(Err(BackendError::FutureRevision));
                }
                let at = if req.revision <= 0 || req.revision >= rev {
                    None
                } else if req.revision < compact {
                    return Ok(Err(BackendError::Compacted { compact_revision: compact }));
                } else {
                    Some(req.revision)
                };
                let (kvs, count) = sql::range_with_count(conn, &req.range, at, fetch_limit(req), req.count_only).await?;
                if req.count_only {
                    return Ok(Ok(RangeResponse { revision: rev, kvs: Vec::new(), more: false, count }));
                }
                let (kvs, more) = finish_range(req, kvs);
                Ok(Ok(RangeResponse { revision: rev, kvs, more, count }))
            })
        })
        .await
    }

    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse> {
        if req.has_writes() {
            self.inner.check_quota(quota::txn_cost(&req)).await?;
            return match self.inner.submit(WriteOp::Txn(req)).await? {
                WriteReply::Txn(resp) => Ok(resp),
                _ => Err(BackendError::internal("writer answered a txn with something else")),
            };
        }
        // No branch writes: run at a snapshot, without the revision lock.
        let inner = self.inner.clone();
        let rt = Handle::current();
        let req = Arc::new(req);
        let mut attempt = 0;
        loop {
            let (inner, rt, req2) = (inner.clone(), rt.clone(), req.clone());
            let r = tokio::task::spawn_blocking(move || writer::run_read_txn(&inner, writer::Block::Handle(&rt), &req2))
                .await
                .map_err(|e| BackendError::internal(format!("read txn panicked: {e}")))?;
            match r {
                Err(BackendError::Unavailable(_)) if attempt + 1 < READ_ATTEMPTS => attempt += 1,
                other => return other,
            }
        }
    }

    async fn compact(&self, rev: Revision, physical: bool) -> Result<CompactResponse> {
        let pool = &self.inner.pool;
        let current = async {
            let mut tx = pool.begin().await?;
            let (current, compact) = sql::read_meta(&mut tx, true).await?;
            if rev <= compact {
                return Ok(Err(BackendError::Compacted { compact_revision: compact }));
            }
            if rev > current {
                return Ok(Err(BackendError::FutureRevision));
            }
            sqlx::query("UPDATE meta SET compact_revision = $1 WHERE id = 1").bind(rev).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(Ok(current))
        }
        .await
        .map_err(db_err)??;
        let batch = self.inner.opts.compaction_batch;
        if physical {
            compact::physical(pool, rev, batch).await.map_err(db_err)?;
        } else {
            let pool = pool.clone();
            tokio::spawn(async move {
                if let Err(e) = compact::physical(&pool, rev, batch).await {
                    tracing::warn!(error = %e, compact_revision = rev, "postgres: background compaction failed; the next start or compaction resumes it");
                }
            });
        }
        Ok(CompactResponse { revision: current })
    }

    async fn watch(&self, from: Revision) -> Result<FeedStream> {
        feed::open(self.inner.clone(), from).await
    }

    async fn current_revision(&self) -> Result<(Revision, Revision)> {
        self.read(|conn| Box::pin(async move { Ok(Ok(sql::read_meta(conn, false).await?)) })).await
    }

    async fn lease_grant(&self, id: LeaseId, ttl: i64) -> Result<LeaseGrant> {
        self.inner.check_quota(quota::LEASE_OVERHEAD).await?;
        // Through the writer: concurrent grants join its batches (one commit for many), and the
        // space count in the meta row, which every grant changes, is locked once per batch. A
        // lone grant is one statement (`writer::grant_alone`).
        match self.inner.submit(WriteOp::Grant { id, ttl }).await? {
            WriteReply::Grant(g) => Ok(g),
            _ => Err(BackendError::internal("writer answered a grant with something else")),
        }
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<Revision> {
        match self.inner.submit(WriteOp::Revoke(id)).await? {
            WriteReply::Revoke(rev) => Ok(rev),
            _ => Err(BackendError::internal("writer answered a revoke with something else")),
        }
    }

    async fn lease_keep_alive(&self, id: LeaseId) -> Result<i64> {
        let row = sqlx::query(
            "UPDATE leases SET expires_at = now() + make_interval(secs => ttl::float8)
             WHERE id = $1 AND expires_at > now() RETURNING ttl",
        )
        .bind(id)
        .fetch_optional(&self.inner.pool)
        .await
        .map_err(db_err)?;
        match row {
            Some(row) => row.try_get(0).map_err(db_err),
            None => Err(BackendError::LeaseNotFound),
        }
    }

    async fn lease_time_to_live(&self, id: LeaseId, keys: bool) -> Result<LeaseInfo> {
        self.read(move |conn| {
            Box::pin(async move {
                let (rev, _) = sql::read_meta(conn, false).await?;
                let row = sqlx::query(
                    "SELECT ttl, CASE WHEN expires_at > now()
                                 THEN trunc(extract(epoch FROM expires_at - now()))::bigint ELSE -1 END
                     FROM leases WHERE id = $1",
                )
                .bind(id)
                .fetch_optional(&mut *conn)
                .await?;
                let Some(row) = row else { return Ok(Err(BackendError::LeaseNotFound)) };
                let keys = if keys {
                    let rows = sqlx::query("SELECT key FROM current WHERE lease = $1 ORDER BY key").bind(id).fetch_all(&mut *conn).await?;
                    rows.iter().map(|r| r.try_get::<Vec<u8>, _>(0)).collect::<Result<Vec<_>, _>>()?
                } else {
                    Vec::new()
                };
                Ok(Ok(LeaseInfo { id, ttl: row.try_get(1)?, granted_ttl: row.try_get(0)?, keys, revision: rev }))
            })
        })
        .await
    }

    async fn lease_leases(&self) -> Result<Vec<LeaseId>> {
        let rows = sqlx::query("SELECT id FROM leases ORDER BY id").fetch_all(&self.inner.pool).await.map_err(db_err)?;
        rows.iter().map(|r| r.try_get(0).map_err(db_err)).collect()
    }

    async fn status(&self) -> Result<BackendStatus> {
        self.read(|conn| {
            Box::pin(async move {
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT m.revision, m.compact_revision, pg_database_size(current_database()), ({SPACE_SQL})::bigint
                     FROM meta m WHERE m.id = 1"
                )))
                .fetch_one(&mut *conn)
                .await?;
                let revision: i64 = row.try_get(0)?;
                // No raft here, but etcd never reports term 0 once it serves (clients and
                // etcdctl's protobuf output see it in every response header), so this backend
                // is one leader term that never changes: term 1, every process leading, and the
                // index (which is also the snapshot's consistent index) following the revision.
                Ok(Ok(BackendStatus {
                    revision,
                    compact_revision: row.try_get(1)?,
                    db_size: row.try_get(2)?,
                    db_size_in_use: row.try_get(3)?,
                    raft_term: RAFT_TERM,
                    raft_index: revision.max(0) as u64,
                    raft_applied_index: revision.max(0) as u64,
                    is_leader: true,
                    ..BackendStatus::default()
                }))
            })
        })
        .await
    }

    async fn hash_kv(&self, rev: Revision) -> Result<HashKv> {
        self.read(move |conn| {
            Box::pin(async move {
                let (current, compact) = sql::read_meta(conn, false).await?;
                let hash_revision = if rev <= 0 { current } else { rev };
                if hash_revision > current {
                    return Ok(Err(BackendError::FutureRevision));
                }
                if hash_revision < compact {
                    return Ok(Err(BackendError::Compacted { compact_revision: compact }));
                }
                let mut rows = sqlx::query(
                    "SELECT mod_revision, deleted, key, value FROM kv
                     WHERE mod_revision > $1 AND mod_revision <= $2 ORDER BY mod_revision, sub",
                )
                .bind(compact)
                .bind(hash_revision)
                .fetch(&mut *conn);
                let mut crc = 0;
                while let Some(row) = rows.try_next().await? {
                    let r: i64 = row.try_get(0)?;
                    let deleted: bool = row.try_get(1)?;
                    let key: Vec<u8> = row.try_get(2)?;
                    let value: Vec<u8> = row.try_get(3)?;
                    crc = crc32c(crc, &r.to_be_bytes());
                    crc = crc32c(crc, &[u8::from(deleted)]);
                    for bytes in [&key, &value] {
                        crc = crc32c(crc, &(bytes.len() as u64).to_be_bytes());
                        crc = crc32c(crc, bytes);
                    }
                }
                Ok(Ok(HashKv { hash: crc, compact_revision: compact, hash_revision, revision: current }))
            })
        })
        .await
    }

    async fn defragment(&self) -> Result<()> {
        // Rewrites the tables, giving the space of removed versions back to the filesystem.
        // Like etcd's defragment it blocks writes (of every process) while it runs.
        sqlx::raw_sql("VACUUM (FULL, ANALYZE) kv, current, leases").execute(&self.inner.pool).await.map_err(db_err)?;
        // The space count needs no defragment (compaction already subtracted what it removed),
        // but a defragment recounts it from the tables, so that rows changed outside Cairn's
        // statements (by hand, or by a process of a build older than migration 3 still running
        // after the upgrade) cannot leave it wrong for good. Writers wait for it, as they just
        // waited for VACUUM FULL.
        let counted = async {
            let mut tx = self.inner.pool.begin().await?;
            let kept: i64 = sqlx::query("SELECT bytes FROM meta WHERE id = 1 FOR UPDATE").fetch_one(&mut *tx).await?.try_get(0)?;
            let counted: i64 = sqlx::query(RECOUNT_SQL).fetch_one(&mut *tx).await?.try_get(0)?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>((kept, counted))
        }
        .await
        .map_err(db_err)?;
        if counted.0 != counted.1 {
            tracing::warn!(kept = counted.0, recounted = counted.1, "postgres: the space count was off; defragment recounted it");
        }
        Ok(())
    }

    async fn doc_get(&self, name: &str) -> Result<Option<Doc>> {
        let row = sqlx::query("SELECT version, value FROM docs WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(db_err)?;
        match row {
            None => Ok(None),
            Some(r) => {
                let version: i64 = r.try_get(0).map_err(db_err)?;
                Ok(Some(Doc { version: version as u64, value: r.try_get(1).map_err(db_err)? }))
            }
        }
    }

    async fn doc_put(&self, name: &str, expected: u64, value: Vec<u8>) -> Result<Option<u64>> {
        // One statement either way, so the compare and the write are atomic across processes.
        let q = if expected == 0 {
            sqlx::query("INSERT INTO docs (name, version, value) VALUES ($1, $2::bigint + 1, $3) ON CONFLICT (name) DO NOTHING")
        } else {
            sqlx::query("UPDATE docs SET version = version + 1, value = $3 WHERE name = $1 AND version = $2")
        };
        let done = q.bind(name).bind(expected as i64).bind(value).execute(&self.inner.pool).await.map_err(db_err)?;
        Ok((done.rows_affected() == 1).then_some(expected + 1))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn crc32c_check_value() {
        assert_eq!(super::crc32c(0, b"123456789"), 0xE306_9283);
    }
}
