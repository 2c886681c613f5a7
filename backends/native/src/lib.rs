//! Cairn's native backend: etcd's MVCC store replicated through openraft.
//!
//! - The raft log and vote live in a write-ahead log ([`wal`]) that is fsynced, in batches,
//!   before an append is acknowledged.
//! - The state machine ([`store`]) keeps the MVCC key space, the change log and leases in
//!   redb, one redb txn per applied batch.
//! - A write is answered after it is applied, so a read of the state machine sees every
//!   acknowledged write (linearizable on a single voter).
//!
//! Today the group has one voter (this process); peer transport is future work.

mod leases;
mod log_store;
mod network;
mod proposer;
mod state_machine;
mod store;
pub mod types;
mod wal;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cairn_backend::{
    Backend, BackendError, BackendStatus, CompactResponse, FeedItem, FeedStream, HashKv,
    LeaseGrant, LeaseId, LeaseInfo, RangeRequest, RangeResponse, Result, Revision, TxnRequest,
    TxnResponse,
};
use openraft::{BasicNode, Config, SnapshotPolicy};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

use crate::log_store::LogStore;
use crate::network::NoPeers;
use crate::state_machine::StateMachine;
use crate::store::Store;
use crate::types::{Command, CommandResult, Raft};

/// Settings of the native backend, filled from etcd's flags by the frontend.
#[derive(Clone, Debug)]
pub struct NativeConfig {
    /// Where the write-ahead log and the state machine live (etcd's --data-dir).
    pub data_dir: PathBuf,
    /// Raft log entries between snapshots (etcd's --snapshot-count).
    pub snapshot_count: u64,
    /// Raft heartbeat interval in milliseconds (etcd's --heartbeat-interval).
    pub heartbeat_interval_ms: u64,
    /// Raft election timeout in milliseconds (etcd's --election-timeout).
    pub election_timeout_ms: u64,
    /// Space quota in bytes (etcd's --quota-backend-bytes); 0 = default 2 GiB.
    pub quota_backend_bytes: u64,
    /// This member's ID (etcd's derivation, computed by the frontend).
    pub member_id: u64,
}

impl Default for NativeConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("default.cairn"),
            snapshot_count: 100_000,
            heartbeat_interval_ms: 100,
            election_timeout_ms: 1000,
            quota_backend_bytes: 0,
            member_id: 1,
        }
    }
}

const DEFAULT_QUOTA: u64 = 2 << 30;
/// The state machine's page cache.
const CACHE_BYTES: usize = 64 << 20;
/// Log entries kept behind a snapshot (for followers that lag a little).
const LOG_KEEP: u64 = 1_000;
/// Upper bound on entries between snapshots, whatever --snapshot-count says: a snapshot here
/// is only a synced commit, and it bounds the memory the in-memory log index uses.
const MAX_SNAPSHOT_EVERY: u64 = 10_000;

/// The native backend. Implements [`cairn_backend::Backend`].
pub struct NativeBackend {
    raft: Raft,
    proposer: proposer::Proposer,
    store: Arc<Store>,
    node_id: u64,
    quota: u64,
    tasks: parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl NativeBackend {
    /// Opens (or creates) the store in `cfg.data_dir` and starts the single-node raft group.
    pub async fn open(cfg: NativeConfig) -> anyhow::Result<Arc<NativeBackend>> {
        std::fs::create_dir_all(&cfg.data_dir)?;
        let wal = wal::Wal::open(&cfg.data_dir.join("wal"))?;
        let store = Store::open(&cfg.data_dir.join("state.redb"), CACHE_BYTES)?;
        let node_id = cfg.member_id;
        // One voter: nobody to wait for, so short timers only shorten start-up.
        let config = Config {
            cluster_name: "cairn".into(),
            heartbeat_interval: cfg.heartbeat_interval_ms.clamp(10, 50),
            election_timeout_min: 150,
            election_timeout_max: 300,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(
                cfg.snapshot_count.clamp(1, MAX_SNAPSHOT_EVERY),
            ),
            max_in_snapshot_log_to_keep: LOG_KEEP,
            ..Default::default()
        }
        .validate()?;
        let sm = StateMachine {
            store: store.clone(),
        };
        let raft = Raft::new(node_id, Arc::new(config), NoPeers, LogStore::new(wal), sm).await?;
        if !raft.is_initialized().await? {
            let mut members = BTreeMap::new();
            members.insert(node_id, BasicNode::default());
            raft.initialize(members).await?;
        }
        raft.wait(Some(Duration::from_secs(30)))
            .current_leader(node_id, "single voter elects itself")
            .await?;
        let (proposer, proposer_task) = proposer::Proposer::start(raft.clone());
        let backend = Arc::new(NativeBackend {
            raft,
            proposer,
            store,
            node_id,
            quota: if cfg.quota_backend_bytes == 0 {
                DEFAULT_QUOTA
            } else {
                cfg.quota_backend_bytes
            },
            tasks: parking_lot::Mutex::new(Vec::new()),
        });
        let tasks = vec![
            proposer_task,
            tokio::spawn(expire_leases(Arc::downgrade(&backend))),
            tokio::spawn(compactor(backend.store.clone())),
        ];
        *backend.tasks.lock() = tasks;
        Ok(backend)
    }

    /// Stops raft and makes the state machine durable.
    pub async fn shutdown(&self) -> anyhow::Result<()> {
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
        self.raft
            .shutdown()
            .await
            .map_err(|e| anyhow::anyhow!("raft shutdown: {e}"))?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.sync()).await??;
        Ok(())
    }

    async fn propose(&self, cmd: Command) -> Result<CommandResult> {
        self.proposer.propose(cmd).await
    }

    /// etcd's backend quota: a request that adds `cost` bytes is refused unless the size in
    /// use plus the cost stays below the quota; requests that add nothing always pass.
    async fn check_quota(&self, cost: u64) -> Result<()> {
        if cost == 0 {
            return Ok(());
        }
        let store = self.store.clone();
        let in_use = blocking(move || store.in_use()).await?;
        if in_use as u64 + cost >= self.quota {
            return Err(BackendError::NoSpace);
        }
        Ok(())
    }
}

/// etcd's quota costs: a put's key and value plus a fixed overhead, a lease grant's overhead.
const KV_OVERHEAD: u64 = 256;
const LEASE_OVERHEAD: u64 = 64;

/// etcd's cost of a txn: the larger of its branches' top-level puts.
fn txn_cost(req: &TxnRequest) -> u64 {
    let branch = |ops: &[cairn_backend::RequestOp]| -> u64 {
        ops.iter()
            .map(|op| match op {
                cairn_backend::RequestOp::Put(p) => {
                    KV_OVERHEAD + (p.key.len() + p.value.len()) as u64
                }
                _ => 0,
            })
            .sum()
    };
    branch(&req.success).max(branch(&req.failure))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(BackendError::internal)?
}

fn unexpected(r: CommandResult) -> BackendError {
    BackendError::Internal(format!("unexpected state machine result {r:?}"))
}

#[async_trait]
impl Backend for NativeBackend {
    async fn range(&self, req: RangeRequest) -> Result<RangeResponse> {
        let store = self.store.clone();
        blocking(move || store.range(&req)).await
    }

    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse> {
        if !req.has_writes() {
            let store = self.store.clone();
            return blocking(move || store.read_txn(&req)).await;
        }
        self.check_quota(txn_cost(&req)).await?;
        match self.propose(Command::Txn(req)).await? {
            CommandResult::Txn(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn compact(&self, rev: Revision, physical: bool) -> Result<CompactResponse> {
        let resp = match self.propose(Command::Compact { revision: rev }).await? {
            CommandResult::Compact(r) => r,
            other => return Err(unexpected(other)),
        };
        if physical {
            let store = self.store.clone();
            blocking(move || store.compact_all()).await?;
        }
        Ok(resp)
    }

    async fn watch(&self, from: Revision) -> Result<FeedStream> {
        let rx = self.store.feed.subscribe();
        let (cur, compact) = self.store.current();
        if from > 0 && from < compact {
            return Err(BackendError::Compacted {
                compact_revision: compact,
            });
        }
        let next = if from <= 0 { cur + 1 } else { from };
        let (tx, out) = mpsc::channel(64);
        tokio::spawn(feed(self.store.clone(), rx, next, tx));
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(out)))
    }

    async fn current_revision(&self) -> Result<(Revision, Revision)> {
        Ok(self.store.current())
    }

    async fn lease_grant(&self, id: LeaseId, ttl: i64) -> Result<LeaseGrant> {
        self.check_quota(LEASE_OVERHEAD).await?;
        let chosen = id != 0;
        loop {
            let id = if chosen {
                id
            } else {
                rand::random::<i64>() & i64::MAX
            };
            if id == 0 {
                continue;
            }
            match self.propose(Command::LeaseGrant { id, ttl }).await {
                Ok(CommandResult::LeaseGrant(g)) => return Ok(g),
                Ok(other) => return Err(unexpected(other)),
                Err(BackendError::LeaseExists) if !chosen => continue,
                Err(e) => return Err(e),
            }
        }
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<Revision> {
        match self.propose(Command::LeaseRevoke { id }).await? {
            CommandResult::LeaseRevoke(rev) => Ok(rev),
            other => Err(unexpected(other)),
        }
    }

    async fn lease_keep_alive(&self, id: LeaseId) -> Result<i64> {
        self.store
            .leases
            .refresh(id)
            .ok_or(BackendError::LeaseNotFound)
    }

    async fn lease_time_to_live(&self, id: LeaseId, keys: bool) -> Result<LeaseInfo> {
        let store = self.store.clone();
        blocking(move || store.lease_info(id, keys)).await
    }

    async fn lease_leases(&self) -> Result<Vec<LeaseId>> {
        let store = self.store.clone();
        blocking(move || store.lease_ids()).await
    }

    async fn status(&self) -> Result<BackendStatus> {
        let m = self.raft.metrics().borrow().clone();
        let (revision, compact_revision) = self.store.current();
        let (db_size, db_size_in_use) = self.store.sizes()?;
        Ok(BackendStatus {
            revision,
            compact_revision,
            db_size,
            db_size_in_use,
            raft_index: m.last_log_index.unwrap_or(0),
            raft_term: m.current_term,
            raft_applied_index: m.last_applied.map_or(0, |l| l.index),
            is_leader: m.current_leader == Some(self.node_id),
        })
    }

    async fn hash_kv(&self, rev: Revision) -> Result<HashKv> {
        let store = self.store.clone();
        blocking(move || store.hash_kv(rev)).await
    }

    async fn defragment(&self) -> Result<()> {
        let store = self.store.clone();
        blocking(move || store.defragment()).await
    }

    async fn doc_get(&self, name: &str) -> Result<Option<cairn_backend::Doc>> {
        let (store, name) = (self.store.clone(), name.to_string());
        blocking(move || store.doc(&name)).await
    }

    async fn doc_put(&self, name: &str, expected: u64, value: Vec<u8>) -> Result<Option<u64>> {
        match self
            .propose(Command::DocPut {
                name: name.to_string(),
                expected,
                value,
            })
            .await?
        {
            CommandResult::DocPut(v) => Ok(v),
            other => Err(unexpected(other)),
        }
    }
}

/// How long a feed stays quiet before it reports progress.
const IDLE_PROGRESS: Duration = Duration::from_millis(500);

/// One watcher's feed: history from the store up to the present, then live batches, never
/// skipping or repeating a revision (see `Backend::watch`).
async fn feed(
    store: Arc<Store>,
    mut rx: tokio::sync::broadcast::Receiver<Arc<cairn_backend::ChangeBatch>>,
    mut next: Revision,
    tx: mpsc::Sender<Result<FeedItem>>,
) {
    async fn catch_up(
        store: &Arc<Store>,
        next: &mut Revision,
        upto: Revision,
        tx: &mpsc::Sender<Result<FeedItem>>,
    ) -> bool {
        while *next <= upto {
            let (_, compact) = store.current();
            if *next < compact {
                let _ = tx
                    .send(Err(BackendError::Compacted {
                        compact_revision: compact,
                    }))
                    .await;
                return false;
            }
            let (s, from) = (store.clone(), *next);
            let batches = match blocking(move || s.read_events(from, upto, 256)).await {
                Ok(b) => b,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return false;
                }
            };
            if batches.is_empty() {
                *next = upto + 1;
                break;
            }
            for b in batches {
                *next = b.revision + 1;
                if tx.send(Ok(FeedItem::Changes(Arc::new(b)))).await.is_err() {
                    return false;
                }
            }
        }
        true
    }

    let (cur, _) = store.current();
    if !catch_up(&store, &mut next, cur, &tx).await {
        return;
    }
    if tx.send(Ok(FeedItem::Progress(next - 1))).await.is_err() {
        return;
    }
    loop {
        let item = tokio::select! {
            item = rx.recv() => item,
            _ = tx.closed() => return,
            _ = tokio::time::sleep(IDLE_PROGRESS) => {
                // Idle: tell the watcher how far it is synced, if nothing is in flight.
                if store.current().0 == next - 1 && tx.send(Ok(FeedItem::Progress(next - 1))).await.is_err() {
                    return;
                }
                continue;
            }
        };
        match item {
            Ok(b) if b.revision < next => {}
            Ok(b) => {
                if b.revision > next && !catch_up(&store, &mut next, b.revision - 1, &tx).await {
                    return;
                }
                next = b.revision + 1;
                if tx.send(Ok(FeedItem::Changes(b))).await.is_err() {
                    return;
                }
            }
            Err(RecvError::Lagged(_)) => {
                let (cur, _) = store.current();
                if !catch_up(&store, &mut next, cur, &tx).await {
                    return;
                }
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Revokes leases whose deadline passed, through raft, so expiry happens once.
async fn expire_leases(backend: std::sync::Weak<NativeBackend>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let Some(b) = backend.upgrade() else { return };
        for id in b.store.leases.take_expired() {
            match b.propose(Command::LeaseRevoke { id }).await {
                Ok(_) | Err(BackendError::LeaseNotFound) => b.store.leases.forget(id),
                Err(e) => {
                    tracing::warn!(lease = id, error = %e, "lease expiry failed; will retry");
                    b.store.leases.retry(id);
                }
            }
        }
    }
}

/// Removes compacted history in the background, in bounded batches.
async fn compactor(store: Arc<Store>) {
    loop {
        store.compactor.notified().await;
        loop {
            let s = store.clone();
            match blocking(move || s.compact_step()).await {
                Ok(true) => tokio::task::yield_now().await,
                Ok(false) => break,
                Err(e) => {
                    tracing::error!(error = %e, "physical compaction failed");
                    break;
                }
            }
        }
    }
}
