//! Cairn's TiKV backend: etcd's MVCC key space, change feed and leases on TiKV's
//! transactional API (`tikv-client`, optimistic Percolator transactions), for any number of
//! Cairn processes sharing one TiKV cluster.
//!
//! - Key layout: see [`keys`]. Live versions under `c`, every version under `h` (an
//!   order-preserving escaped key plus the big-endian revision), the change log under `e`.
//! - Revisions: every writing attempt reads the counter key in its transaction and writes
//!   `counter + 1`. All writers write that key, so two concurrent writers always conflict and
//!   one retries: revisions are unique, gap-free and monotonic across processes, and snapshot
//!   isolation becomes serializable for writes. Each process batches its concurrent writes
//!   into one TiKV transaction, one revision per client write.
//! - Ambiguous commits: when a commit fails, the attempt is rolled back; if that succeeds the
//!   attempt is retried; otherwise the change-log entry of its revision is read back (it carries
//!   the attempt's nonce) to learn whether it committed.
//! - Watch: the change log is durable in TiKV; one tailer per process polls it (and is woken by
//!   local commits) and broadcasts each revision once to the process's feeds ([`feed`]).
//! - Leases live in TiKV with deadlines on PD's clock (the physical part of TSO timestamps);
//!   whichever process's transaction deletes the lease key expires it, with its keys, once.
//! - Compaction moves the compact revision, then deletes superseded versions and old log
//!   entries in bounded batches ([`compact`]).
//! - Space quota: the bytes of Cairn's rows are counted in the transactions that write them,
//!   beside the revision counter ([`size`]); puts, txns and lease grants that would reach
//!   `quota_backend_bytes` fail `NoSpace`.

mod compact;
mod feed;
pub mod keys;
mod size;
mod view;

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cairn_backend::exec::{self, TxnView};
use cairn_backend::*;
use tikv_client::transaction::HeartbeatOption;
use tikv_client::{CheckLevel, Config, TransactionClient, TransactionOptions};
use tokio::runtime::Handle;
use tokio::sync::{broadcast, mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;

use keys::Keys;
use view::{be_i64, dec, enc, LeaseRec, LogRecord, Reader, View};

/// Settings of the TiKV backend.
#[derive(Clone, Debug)]
pub struct TikvOptions {
    /// Every key Cairn writes starts with this (several Cairn clusters can share one TiKV).
    pub namespace: Vec<u8>,
    /// How long an operation keeps retrying conflicts, region errors and an unreachable PD
    /// or TiKV before it fails `Unavailable`.
    pub retry_timeout: Duration,
    /// The tailer reads the change log this often even without a local commit (other
    /// processes' writes are seen within this).
    pub feed_poll_interval: Duration,
    /// How often each process looks for expired leases.
    pub lease_sweep_interval: Duration,
    /// Versions examined per compaction transaction.
    pub compaction_batch: usize,
    /// tikv-client's per-RPC timeout.
    pub rpc_timeout: Duration,
    /// When set, this process advances TiKV's GC safe point this often (resolving every lock
    /// older than it, in the whole cluster), so TiKV drops old MVCC versions. Only for a TiKV
    /// cluster that Cairn has to itself: with TiDB (or anything else with a GC worker) on it,
    /// leave this `None` and let that worker do GC.
    pub gc_interval: Option<Duration>,
    /// How far behind PD's clock the safe point stays (reads older than this fail in TiKV).
    pub gc_life_time: Duration,
    /// etcd's `--quota-backend-bytes` (0: etcd's default, 2 GiB), on the bytes of Cairn's rows
    /// (see the `size` module): a put, a txn with puts or a lease grant that would reach it
    /// fails `NoSpace`.
    pub quota_backend_bytes: u64,
    /// TLS toward PD and TiKV (`None`: plain text).
    pub tls: Option<TikvTls>,
}

/// The files of TLS toward PD and TiKV (PEM): the CA that signed their certificates, and the
/// certificate and key Cairn presents to them (tikv-client needs all three).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TikvTls {
    /// CA certificate(s) the PD and TiKV server certificates are verified against.
    pub ca_file: std::path::PathBuf,
    /// Cairn's client certificate.
    pub cert_file: std::path::PathBuf,
    /// Its private key.
    pub key_file: std::path::PathBuf,
}

impl TikvTls {
    /// From the `--tikv-ca-file`, `--tikv-cert-file` and `--tikv-key-file` flags: all three
    /// empty is plain text; all three set is TLS; anything else is an error naming the missing
    /// flags (tikv-client has no TLS without a client certificate).
    pub fn from_flags(ca_file: &str, cert_file: &str, key_file: &str) -> std::result::Result<Option<TikvTls>, String> {
        let flags = [("--tikv-ca-file", ca_file), ("--tikv-cert-file", cert_file), ("--tikv-key-file", key_file)];
        let missing: Vec<&str> = flags.iter().filter(|(_, v)| v.is_empty()).map(|(f, _)| *f).collect();
        match missing.len() {
            3 => Ok(None),
            0 => Ok(Some(TikvTls { ca_file: ca_file.into(), cert_file: cert_file.into(), key_file: key_file.into() })),
            _ => Err(format!(
                "TLS to PD and TiKV needs --tikv-ca-file, --tikv-cert-file and --tikv-key-file together; missing {}",
                missing.join(", ")
            )),
        }
    }
}

impl Default for TikvOptions {
    fn default() -> Self {
        TikvOptions {
            namespace: b"cairn/".to_vec(),
            retry_timeout: Duration::from_secs(10),
            feed_poll_interval: Duration::from_millis(100),
            lease_sweep_interval: Duration::from_millis(250),
            compaction_batch: 1000,
            rpc_timeout: Duration::from_secs(2),
            gc_interval: None,
            gc_life_time: Duration::from_secs(600),
            quota_backend_bytes: 0,
            tls: None,
        }
    }
}

pub(crate) struct Inner {
    client: TransactionClient,
    keys: Keys,
    opts: TikvOptions,
    /// Every committed revision, once, in order (see [`feed`]).
    feed: broadcast::Sender<Arc<ChangeBatch>>,
    wake: Notify,
    shutdown: watch::Sender<bool>,
    /// Writes that take revisions, and lease grants, keep-alives and revokes, go through this
    /// process's batching writer: every writing transaction also writes the space counts
    /// (`size.rs`), so writers in transactions of their own would all conflict on them.
    writer: mpsc::Sender<WriteItem>,
    /// The space quota in bytes (`quota_backend_bytes`, 0 made etcd's default).
    quota: u64,
    /// Attempts on blocking threads at once ([`ATTEMPTS`]).
    attempts: tokio::sync::Semaphore,
}

/// Most attempts running at once. Each holds a blocking thread while it waits on TiKV, so 256
/// clients' reads made 263 threads, each with an allocator cache of its own (peak RSS 118 MB
/// at 256 clients' ranges, 58 MB with glibc's malloc; BENCHMARKS.md, stop 23). Attempts wait
/// on the network more than they compute: a few dozen keep two cores busy.
const ATTEMPTS: usize = 32;

/// The outcome of one attempt.
enum Attempt<T> {
    Done(T),
    /// Failed in a way that did not change anything: try again.
    Retry(String),
    /// A final answer for every job (an outcome that cannot be known).
    Fail(BackendError),
}

fn txn_options() -> TransactionOptions {
    TransactionOptions::new_optimistic().drop_check(CheckLevel::Warn).heartbeat_option(HeartbeatOption::NoHeartbeat)
}

/// What an attempt's closure does with the view: returns the answer, or an etcd error (then
/// the job has no effect). It may run several times (retries), so it must not have side
/// effects outside the view.
type Job<T> = Arc<dyn Fn(&mut View) -> Result<T> + Send + Sync>;
type AnyAnswer = Box<dyn Any + Send>;
type AnyJob = Job<AnyAnswer>;

/// A write waiting for the batching writer.
struct WriteItem {
    job: AnyJob,
    /// TiKV keys the job will read (read ahead with the batch's in one BatchGet).
    keys: Vec<Vec<u8>>,
    reply: oneshot::Sender<Result<AnyAnswer>>,
}

/// Client writes per TiKV transaction at most.
const MAX_BATCH: usize = 128;

fn erase<T: Send + 'static>(job: Job<T>) -> AnyJob {
    Arc::new(move |v: &mut View| job(v).map(|t| Box::new(t) as AnyAnswer))
}

fn unerase<T: 'static>(a: AnyAnswer) -> Result<T> {
    a.downcast::<T>().map(|b| *b).map_err(|_| BackendError::internal("tikv: answer of the wrong type"))
}

impl Inner {
    async fn timestamp(&self) -> tikv_client::Result<tikv_client::Timestamp> {
        self.client.current_timestamp().await
    }

    async fn snapshot(&self) -> tikv_client::Result<(Reader, i64)> {
        let ts = self.timestamp().await?;
        let now = ts.physical;
        Ok((Reader::Snap(self.client.snapshot(ts, txn_options().read_only())), now))
    }

    /// Runs `job` on its own until it is done, retrying what can be retried until the retry
    /// timeout. `write`: in a transaction that commits what the job wrote; otherwise at a
    /// snapshot.
    async fn run<T: Send + 'static>(self: &Arc<Self>, write: bool, job: Job<T>) -> Result<T> {
        self.run_reading(write, job, Vec::new()).await
    }

    /// [`Inner::run`] for a job that will read `keys` (TiKV keys), read with the counter in
    /// the attempt's first batch get.
    async fn run_reading<T: Send + 'static>(self: &Arc<Self>, write: bool, job: Job<T>, keys: Vec<Vec<u8>>) -> Result<T> {
        let mut answers = self.run_jobs(write, vec![erase(job)], keys).await?;
        unerase(answers.pop().ok_or_else(|| BackendError::internal("tikv: no answer"))??)
    }

    /// Runs `job` through the batching writer: it shares a TiKV transaction (and the retries)
    /// with other writes of this process, each taking its own revision.
    async fn write<T: Send + 'static>(self: &Arc<Self>, job: Job<T>) -> Result<T> {
        self.write_reading(job, Vec::new()).await
    }

    /// [`Inner::write`] for a job that will read `keys` (TiKV keys: a txn's live versions, a
    /// lease's record): the attempt reads every job's keys ahead in one batch get.
    async fn write_reading<T: Send + 'static>(self: &Arc<Self>, job: Job<T>, keys: Vec<Vec<u8>>) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        self.writer.send(WriteItem { job: erase(job), keys, reply }).await.map_err(|_| BackendError::Stopped)?;
        unerase(rx.await.map_err(|_| BackendError::Stopped)??)
    }

    /// Runs `jobs` in order in one transaction (or snapshot) per attempt, retrying the whole
    /// attempt until the retry timeout. Returns each job's answer.
    async fn run_jobs(self: &Arc<Self>, write: bool, jobs: Vec<AnyJob>, keys: Vec<Vec<u8>>) -> Result<Vec<Result<AnyAnswer>>> {
        let deadline = Instant::now() + self.opts.retry_timeout;
        let mut backoff = Duration::from_millis(2);
        let jobs = Arc::new(jobs);
        let keys = Arc::new(keys);
        loop {
            if *self.shutdown.borrow() {
                return Err(BackendError::Stopped);
            }
            let (inner, jobs2, keys2, rt) = (self.clone(), jobs.clone(), keys.clone(), Handle::current());
            let permit = self.attempts.acquire().await.map_err(|_| BackendError::Stopped)?;
            let r = tokio::task::spawn_blocking(move || inner.attempt(&rt, write, &jobs2, &keys2, deadline))
                .await
                .map_err(|e| BackendError::internal(format!("tikv attempt panicked: {e}")))?;
            drop(permit);
            match r {
                Attempt::Done(t) => return Ok(t),
                Attempt::Fail(e) => return Err(e),
                Attempt::Retry(msg) => {
                    if Instant::now() >= deadline {
                        return Err(BackendError::Unavailable(msg));
                    }
                    tracing::debug!(error = %msg, "tikv: retrying");
                    let jitter = Duration::from_micros(rand::random::<u64>() % 2000);
                    tokio::time::sleep(backoff + jitter).await;
                    backoff = (backoff * 2).min(Duration::from_millis(200));
                }
            }
        }
    }

    /// One attempt, on a blocking thread.
    fn attempt(
        &self,
        rt: &Handle,
        write: bool,
        jobs: &[AnyJob],
        keys: &[Vec<u8>],
        deadline: Instant,
    ) -> Attempt<Vec<Result<AnyAnswer>>> {
        let opened = rt.block_on(async {
            if write {
                let txn = self.client.begin_with_options(txn_options()).await?;
                let now = txn.start_timestamp().physical;
                Ok((Reader::Txn(txn), now))
            } else {
                self.snapshot().await
            }
        });
        let (reader, now) = match opened {
            Ok(x) => x,
            Err(e) => return Attempt::Retry(format!("tikv: begin: {e}")),
        };
        let mut view = match View::open(rt.clone(), reader, self.keys.clone(), now, keys) {
            Ok(v) => v,
            Err(e) => return Attempt::Retry(format!("tikv: read meta: {e}")),
        };
        let mut answers = Vec::with_capacity(jobs.len());
        let mut failed = None;
        for job in jobs {
            let cp = view.checkpoint();
            let out = job(&mut view);
            if let Some(e) = view.failed.take() {
                failed = Some(e);
                break;
            }
            match out {
                Ok(t) => {
                    view.seal();
                    answers.push(Ok(t));
                }
                Err(e) => {
                    view.restore(cp);
                    answers.push(Err(e));
                }
            }
        }
        if write && failed.is_none() {
            if let Err(e) = view.stage_sizes() {
                failed = Some(view.failed.take().unwrap_or_else(|| tikv_client::Error::StringError(e.to_string())));
            }
        }
        let Reader::Txn(mut txn) = std::mem::replace(&mut view.reader, Reader::Gone) else {
            // A snapshot: nothing to commit.
            return match failed {
                Some(e) => Attempt::Retry(format!("tikv: {e}")),
                None => Attempt::Done(answers),
            };
        };
        let abandon = |txn: &mut tikv_client::Transaction| {
            let _ = rt.block_on(txn.rollback());
        };
        if let Some(e) = failed {
            abandon(&mut txn);
            return Attempt::Retry(format!("tikv: {e}"));
        }
        if view.sealed.is_empty() && view.staged.is_empty() && !view.touch_counter {
            abandon(&mut txn);
            return Attempt::Done(answers);
        }
        let nonce = view.nonce;
        let first_rev = view.sealed.first().copied();
        let staged = rt.block_on(async {
            if !view.sealed.is_empty() || view.touch_counter {
                // The counter first: it is the primary key, the commit point of the attempt.
                txn.put(self.keys.revision(), view.base_revision().to_be_bytes().to_vec()).await?;
            }
            // The log entries (with `nonce`) are among the staged rows.
            for (k, v) in std::mem::take(&mut view.staged) {
                match v {
                    Some(v) => txn.put(k, v).await?,
                    None => txn.delete(k).await?,
                }
            }
            Ok::<_, tikv_client::Error>(())
        });
        if let Err(e) = staged {
            abandon(&mut txn);
            return Attempt::Retry(format!("tikv: {e}"));
        }
        match rt.block_on(txn.commit()) {
            Ok(_) => {
                self.wake.notify_one();
                Attempt::Done(answers)
            }
            Err(e) => {
                // Rolled back: certainly not committed (a committed primary refuses rollback).
                match rt.block_on(txn.rollback()) {
                    Ok(()) => Attempt::Retry(format!("tikv: commit: {e}")),
                    Err(rb) => {
                        tracing::warn!(error = %e, rollback = %rb, "tikv: commit outcome unknown; reading it back");
                        let Some(rev) = first_rev else {
                            return Attempt::Fail(BackendError::Unavailable(format!(
                                "tikv: commit outcome unknown: {e}"
                            )));
                        };
                        match rt.block_on(self.settle(rev, nonce, deadline)) {
                            Some(true) => {
                                self.wake.notify_one();
                                Attempt::Done(answers)
                            }
                            Some(false) => Attempt::Retry(format!("tikv: commit: {e}")),
                            None => {
                                Attempt::Fail(BackendError::Unavailable(format!("tikv: commit outcome unknown: {e}")))
                            }
                        }
                    }
                }
            }
        }
    }

    /// After an ambiguous commit of revision `rev`: whether the log entry at `rev` is ours.
    /// A read at a fresh timestamp resolves any lock the attempt left (waiting out its TTL),
    /// and the attempt's commit timestamp, if it committed, is older than that read.
    async fn settle(&self, rev: Revision, nonce: u64, deadline: Instant) -> Option<bool> {
        loop {
            let r = async {
                let (mut reader, _) = self.snapshot().await?;
                reader.get(self.keys.log(rev)).await
            }
            .await;
            match r {
                Ok(Some(v)) => return Some(dec::<LogRecord>(&v).map(|l| l.nonce == nonce).unwrap_or(false)),
                Ok(None) => return Some(false),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "tikv: settle read failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(_) => return None,
            }
        }
    }

    /// Revision and compact revision at a fresh snapshot.
    async fn meta(self: &Arc<Self>) -> Result<(Revision, Revision)> {
        self.run(false, Arc::new(|v: &mut View| Ok((v.base_revision(), v.compact_revision())))).await
    }
}

/// The TiKV backend. See the crate docs.
pub struct TikvBackend {
    inner: Arc<Inner>,
    tasks: parking_lot::Mutex<Vec<JoinHandle<()>>>,
}

impl TikvBackend {
    /// Connects to the PD endpoints (`host:port`) and starts the change-feed tailer and the
    /// lease sweeper. Must be called inside a tokio runtime.
    pub async fn connect(pd_endpoints: Vec<String>, opts: TikvOptions) -> Result<Arc<TikvBackend>> {
        let mut config = Config::default().with_timeout(opts.rpc_timeout);
        if let Some(tls) = &opts.tls {
            for (what, path) in [("CA", &tls.ca_file), ("certificate", &tls.cert_file), ("key", &tls.key_file)] {
                std::fs::metadata(path).map_err(|e| {
                    BackendError::Unavailable(format!("tikv: TLS {what} file {}: {e}", path.display()))
                })?;
            }
            config = config.with_security(&tls.ca_file, &tls.cert_file, &tls.key_file);
        }
        let mode = if opts.tls.is_some() { "TLS" } else { "plain text" };
        // A PD that never answers (or a TLS handshake that stalls) must not hang the start.
        let client =
            tokio::time::timeout(opts.retry_timeout, TransactionClient::new_with_config(pd_endpoints.clone(), config))
                .await
                .map_err(|_| {
                    BackendError::Unavailable(format!(
                        "tikv: connect ({mode}) to PD {pd_endpoints:?}: no answer within {:?}",
                        opts.retry_timeout
                    ))
                })?
                .map_err(|e| {
                    // tikv-client reports a failed TLS handshake only as PD not responding.
                    let hint = if opts.tls.is_some() {
                        "; with TLS: check that --tikv-ca-file signed PD's and TiKV's certificates and that they accept --tikv-cert-file"
                    } else {
                        "; if PD and TiKV serve TLS, set --tikv-ca-file, --tikv-cert-file and --tikv-key-file"
                    };
                    BackendError::Unavailable(format!("tikv: connect ({mode}) to PD {pd_endpoints:?}: {e}{hint}"))
                })?;
        let (feed, _) = broadcast::channel(feed::FEED_CAPACITY);
        let (shutdown, _) = watch::channel(false);
        let (writer, writer_rx) = mpsc::channel(4096);
        let inner = Arc::new(Inner {
            client,
            keys: Keys::new(&opts.namespace),
            quota: quota::quota_bytes(opts.quota_backend_bytes),
            opts,
            feed,
            wake: Notify::new(),
            shutdown,
            writer,
            attempts: tokio::sync::Semaphore::new(ATTEMPTS),
        });
        // Data written before the space count has none: count it now (a scan of every counted
        // row, once; the transaction stores it). With the count stored this writes nothing.
        inner
            .run(
                true,
                Arc::new(|v: &mut View| {
                    v.size()?;
                    Ok(())
                }),
            )
            .await?;
        let (rev, compact) = inner.meta().await?;
        let through = inner
            .run(
                false,
                Arc::new(|v: &mut View| {
                    let k = v.keys.compacted_through();
                    be_i64(v.get_raw(k)?, 0)
                }),
            )
            .await?;
        let mut tasks = vec![
            tokio::spawn(writer_loop(inner.clone(), writer_rx)),
            tokio::spawn(feed::tailer(inner.clone(), rev)),
            tokio::spawn(sweeper(inner.clone())),
        ];
        if inner.opts.gc_interval.is_some() {
            tasks.push(tokio::spawn(gc_loop(inner.clone())));
        }
        if through < compact {
            tracing::info!(
                compact_revision = compact,
                compacted_through = through,
                "tikv: resuming an unfinished compaction"
            );
            tasks.push(tokio::spawn(compact::background(inner.clone(), compact)));
        }
        Ok(Arc::new(TikvBackend { inner, tasks: parking_lot::Mutex::new(tasks) }))
    }

    /// The space quota's count (Status `dbSize`) and the same bytes measured by a scan of
    /// every counted row, at one snapshot: equal unless the count went wrong. Reads every
    /// row; for tests and checks.
    pub async fn size_counted_and_scanned(&self) -> Result<(u64, u64)> {
        self.inner
            .run(false, Arc::new(|v: &mut View| Ok((v.size()?, v.scan_row_bytes()?.max(0) as u64))))
            .await
    }

    /// Stops the background tasks. Requests made afterwards fail with `Stopped`.
    pub async fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        let tasks = std::mem::take(&mut *self.tasks.lock());
        for t in tasks {
            let _ = t.await;
        }
    }
}

impl Drop for TikvBackend {
    fn drop(&mut self) {
        self.inner.shutdown.send_replace(true);
    }
}

/// Deletes a lease's keys (one revision, if any) and the lease; `expire_only`: only if it is
/// past its deadline at the attempt's timestamp. Returns whether it did.
fn revoke_in(v: &mut View, id: LeaseId, expire_only: bool) -> Result<bool> {
    let Some(rec) = v.lease(id)? else { return Ok(false) };
    if expire_only && rec.expires_ms > v.now_ms {
        return Ok(false);
    }
    let keys = v.attached(id)?;
    let ops = keys
        .into_iter()
        .map(|k| RequestOp::DeleteRange(DeleteRangeRequest { range: KeyRange::single(k), prev_kv: false }))
        .collect();
    exec::execute(v, &TxnRequest::unconditional(ops))?;
    for k in v.attached(id)? {
        let ak = v.keys.attach(id, &k);
        v.delete_row(ak, Some(0));
    }
    v.set_lease(id, Some(&rec), None);
    // Conflict with every writer, so that no txn attaches a key to the lease meanwhile.
    v.touch_counter = true;
    Ok(true)
}

/// The batching writer: takes every write waiting (up to [`MAX_BATCH`]) and runs them in one
/// TiKV transaction, each at its own revision, then answers each.
async fn writer_loop(inner: Arc<Inner>, mut rx: mpsc::Receiver<WriteItem>) {
    let mut shutdown = inner.shutdown.subscribe();
    loop {
        let first = tokio::select! {
            item = rx.recv() => match item {
                Some(i) => i,
                None => return,
            },
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let mut items = vec![first];
        while items.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(i) => items.push(i),
                Err(_) => break,
            }
        }
        let jobs = items.iter().map(|i| i.job.clone()).collect();
        let mut keys: Vec<Vec<u8>> = items.iter_mut().flat_map(|i| std::mem::take(&mut i.keys)).collect();
        keys.sort_unstable();
        keys.dedup();
        match inner.run_jobs(true, jobs, keys).await {
            Ok(answers) => {
                for (item, answer) in items.into_iter().zip(answers) {
                    let _ = item.reply.send(answer);
                }
            }
            Err(e) => {
                for item in items {
                    let _ = item.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Advances TiKV's GC safe point to `gc_life_time` behind PD's clock, every `gc_interval`.
async fn gc_loop(inner: Arc<Inner>) {
    let Some(every) = inner.opts.gc_interval else { return };
    let mut shutdown = inner.shutdown.subscribe();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let r = async {
            let now = inner.timestamp().await?;
            let physical = now.physical - inner.opts.gc_life_time.as_millis() as i64;
            if physical <= 0 {
                return Ok(false);
            }
            let safe_point = tikv_client::Timestamp { physical, logical: 0, suffix_bits: 0 };
            inner.client.gc(safe_point).await
        }
        .await;
        match r {
            Ok(_) => tracing::debug!("tikv: GC safe point advanced"),
            Err(e) => tracing::warn!(error = %e, "tikv: advancing the GC safe point failed; retrying later"),
        }
    }
}

async fn sweeper(inner: Arc<Inner>) {
    let mut shutdown = inner.shutdown.subscribe();
    let mut tick = tokio::time::interval(inner.opts.lease_sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let due = inner
            .run(
                false,
                Arc::new(|v: &mut View| {
                    let (s, e) = v.keys.tag_range(keys::TAG_LEASE);
                    let mut due = Vec::new();
                    for (k, val) in v.scan_raw(s, e)? {
                        let rec: LeaseRec = dec(&val)?;
                        if rec.expires_ms <= v.now_ms {
                            due.extend(v.keys.parse_lease(&k));
                        }
                    }
                    Ok(due)
                }),
            )
            .await;
        match due {
            Ok(ids) => {
                for id in ids {
                    match inner.write(Arc::new(move |v: &mut View| revoke_in(v, id, true))).await {
                        Ok(true) => tracing::debug!(lease = id, "tikv: lease expired"),
                        Ok(false) => {}
                        Err(e) => tracing::warn!(error = %e, lease = id, "tikv: lease expiry failed; retrying"),
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "tikv: lease sweep failed"),
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
impl Backend for TikvBackend {
    async fn range(&self, req: RangeRequest) -> Result<RangeResponse> {
        // A single key at the latest revision: read with the counter.
        let keys = if req.range.is_single() && req.revision <= 0 {
            vec![self.inner.keys.current(&req.range.key)]
        } else {
            Vec::new()
        };
        let req = Arc::new(req);
        self.inner.run_reading(false, Arc::new(move |v: &mut View| exec::range(v, &req)), keys).await
    }

    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse> {
        let writes = req.has_writes();
        let (cost, quota) = (quota::txn_cost(&req), self.inner.quota);
        let req = Arc::new(req);
        let req_keys = req.clone();
        let job: Job<TxnResponse> = Arc::new(move |v: &mut View| {
            // In the write's own transaction, so the size is exact across processes.
            v.check_quota(cost, quota)?;
            exec::execute(v, &req).map(|(resp, _)| resp)
        });
        let mut keys = Vec::new();
        exec::single_keys(&req_keys, &mut keys);
        let keys = keys.into_iter().map(|k| self.inner.keys.current(k)).collect();
        if writes {
            self.inner.write_reading(job, keys).await
        } else {
            self.inner.run_reading(false, job, keys).await
        }
    }

    async fn compact(&self, rev: Revision, physical: bool) -> Result<CompactResponse> {
        let current = self
            .inner
            .run(
                true,
                Arc::new(move |v: &mut View| {
                    let (current, compact) = (v.base_revision(), v.compact_revision());
                    if rev <= compact {
                        return Err(BackendError::Compacted { compact_revision: compact });
                    }
                    if rev > current {
                        return Err(BackendError::FutureRevision);
                    }
                    let k = v.keys.compact();
                    v.put_raw(k, rev.to_be_bytes().to_vec());
                    Ok(current)
                }),
            )
            .await?;
        if physical {
            compact::physical(&self.inner, rev).await?;
        } else {
            let t = tokio::spawn(compact::background(self.inner.clone(), rev));
            self.tasks.lock().push(t);
        }
        Ok(CompactResponse { revision: current })
    }

    async fn watch(&self, from: Revision) -> Result<FeedStream> {
        feed::open(self.inner.clone(), from).await
    }

    async fn current_revision(&self) -> Result<(Revision, Revision)> {
        self.inner.meta().await
    }

    async fn lease_grant(&self, id: LeaseId, ttl: i64) -> Result<LeaseGrant> {
        let quota = self.inner.quota;
        loop {
            let chosen = cairn_backend::lease_id_to_try(id);
            let r = self
                .inner
                .write_reading(
                    Arc::new(move |v: &mut View| {
                        v.check_quota(quota::LEASE_OVERHEAD, quota)?;
                        if v.lease(chosen)?.is_some() {
                            return Err(BackendError::LeaseExists);
                        }
                        v.set_lease(chosen, None, Some(LeaseRec { ttl, expires_ms: v.now_ms + ttl * 1000 }));
                        Ok(v.base_revision())
                    }),
                    vec![self.inner.keys.lease(chosen)],
                )
                .await;
            match r {
                Ok(revision) => return Ok(LeaseGrant { id: chosen, ttl, revision }),
                Err(BackendError::LeaseExists) if id == 0 => continue,
                Err(e) => return Err(e),
            }
        }
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<Revision> {
        self.inner
            .write(
                Arc::new(move |v: &mut View| {
                    if !revoke_in(v, id, false)? {
                        return Err(BackendError::LeaseNotFound);
                    }
                    Ok(v.base_revision() + i64::from(!v.events.is_empty()))
                }),
            )
            .await
    }

    async fn lease_keep_alive(&self, id: LeaseId) -> Result<i64> {
        self.inner
            .write_reading(
                Arc::new(move |v: &mut View| match v.lease(id)? {
                    Some(rec) if rec.expires_ms > v.now_ms => {
                        let renewed = LeaseRec { ttl: rec.ttl, expires_ms: v.now_ms + rec.ttl * 1000 };
                        v.set_lease(id, Some(&rec), Some(renewed));
                        Ok(rec.ttl)
                    }
                    _ => Err(BackendError::LeaseNotFound),
                }),
                vec![self.inner.keys.lease(id)],
            )
            .await
    }

    async fn lease_time_to_live(&self, id: LeaseId, keys: bool) -> Result<LeaseInfo> {
        self.inner
            .run(
                false,
                Arc::new(move |v: &mut View| {
                    let Some(rec) = v.lease(id)? else {
                        return Err(BackendError::LeaseNotFound);
                    };
                    let left = rec.expires_ms - v.now_ms;
                    let ttl = if left > 0 { left / 1000 } else { -1 };
                    let keys = if keys { v.attached(id)? } else { Vec::new() };
                    Ok(LeaseInfo { id, ttl, granted_ttl: rec.ttl, keys, revision: v.base_revision() })
                }),
            )
            .await
    }

    async fn lease_leases(&self) -> Result<Vec<LeaseId>> {
        self.inner
            .run(
                false,
                Arc::new(|v: &mut View| {
                    let (s, e) = v.keys.tag_range(keys::TAG_LEASE);
                    Ok(v.scan_raw(s, e)?.iter().filter_map(|(k, _)| v.keys.parse_lease(k)).collect())
                }),
            )
            .await
    }

    async fn status(&self) -> Result<BackendStatus> {
        const RAFT_TERM: u64 = 1;
        let (revision, compact_revision, size) = self
            .inner
            .run(false, Arc::new(|v: &mut View| Ok((v.base_revision(), v.compact_revision(), v.size()?))))
            .await?;
        // The sizes are the space quota's count of Cairn's rows (TiKV's own size is not
        // observable per key prefix). As with PostgreSQL, the store (not an election) orders
        // the writes: one constant term, every process leading, the index following the
        // revision (etcd's clients and the header bytes expect a non-zero term).
        let index = revision.max(0) as u64;
        let size = i64::try_from(size).unwrap_or(i64::MAX);
        Ok(BackendStatus {
            revision,
            compact_revision,
            db_size: size,
            db_size_in_use: size,
            is_leader: true,
            raft_term: RAFT_TERM,
            raft_index: index,
            raft_applied_index: index,
            ..BackendStatus::default()
        })
    }

    async fn hash_kv(&self, rev: Revision) -> Result<HashKv> {
        self.inner
            .run(
                false,
                Arc::new(move |v: &mut View| {
                    let (current, compact) = (v.base_revision(), v.compact_revision());
                    let hash_revision = if rev <= 0 { current } else { rev };
                    if hash_revision > current {
                        return Err(BackendError::FutureRevision);
                    }
                    if hash_revision < compact {
                        return Err(BackendError::Compacted { compact_revision: compact });
                    }
                    let (s, e) = (v.keys.log(compact + 1), v.keys.log(hash_revision + 1));
                    let mut crc = 0;
                    for (_, val) in v.scan_raw(s, e)? {
                        let rec: LogRecord = dec(&val)?;
                        for ev in &rec.batch.events {
                            crc = crc32c(crc, &rec.batch.revision.to_be_bytes());
                            crc = crc32c(crc, &[u8::from(ev.kind == EventKind::Delete)]);
                            for bytes in [&ev.kv.key, &ev.kv.value] {
                                crc = crc32c(crc, &(bytes.len() as u64).to_be_bytes());
                                crc = crc32c(crc, bytes);
                            }
                        }
                    }
                    Ok(HashKv { hash: crc, compact_revision: compact, hash_revision, revision: current })
                }),
            )
            .await
    }

    async fn defragment(&self) -> Result<()> {
        // TiKV compacts its own storage (RocksDB / Titan); nothing to do from here.
        Ok(())
    }

    async fn doc_get(&self, name: &str) -> Result<Option<Doc>> {
        let name = name.to_string();
        self.inner
            .run(
                false,
                Arc::new(move |v: &mut View| {
                    let k = v.keys.doc(&name);
                    match v.get_raw(k)? {
                        Some(b) => Ok(Some(dec::<Doc>(&b)?)),
                        None => Ok(None),
                    }
                }),
            )
            .await
    }

    async fn doc_put(&self, name: &str, expected: u64, value: Vec<u8>) -> Result<Option<u64>> {
        let name = name.to_string();
        let value = Arc::new(value);
        self.inner
            .run(
                true,
                Arc::new(move |v: &mut View| {
                    let k = v.keys.doc(&name);
                    let version = match v.get_raw(k.clone())? {
                        Some(b) => dec::<Doc>(&b)?.version,
                        None => 0,
                    };
                    if version != expected {
                        return Ok(None);
                    }
                    v.put_raw(k, enc(&Doc { version: expected + 1, value: (*value).clone() }));
                    Ok(Some(expected + 1))
                }),
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn crc32c_check_value() {
        assert_eq!(super::crc32c(0, b"123456789"), 0xE306_9283);
    }
}
