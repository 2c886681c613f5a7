//! Cairn's native backend: etcd's MVCC store replicated through openraft.
//!
//! - The raft log and vote live in a write-ahead log ([`wal`]) that is fsynced, in batches,
//!   before an append is acknowledged.
//! - The state machine ([`store`]) keeps the MVCC key space, the change log and leases in
//!   redb, one redb txn per applied batch.
//! - A write is answered after it is applied, so a read of the state machine sees every
//!   acknowledged write (linearizable on a single voter).
//!
//! By default the group has one voter (this process). With more than one member in
//! `--initial-cluster` the members replicate over the peer protocol ([`peer`]): writes and
//! linearizable reads on a follower go through the leader, lease keep-alives and expiry are the
//! leader's, and every member applies the same log to its own store.

mod feed;
mod leases;
mod log_store;
mod network;
mod peer;
mod proposer;
mod raft_thread;
mod state_machine;
mod store;
pub mod types;
mod wal;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cairn_backend::{
    quota, Backend, BackendError, BackendStatus, CompactResponse, FeedStream, HashKv,
    LeaseGrant, LeaseId, LeaseInfo, MemberChange, RangeRequest, RangeResponse, Result, Revision,
    TxnRequest, TxnResponse,
};
use openraft::{BasicNode, Config, SnapshotPolicy};

use crate::log_store::LogStore;
use crate::network::PeerNetwork;
pub use crate::peer::proto as peer_proto;
pub use crate::peer::{go_remote_error, PeerService, Peers};
use crate::peer::{PeerRequest, PeerResponse};
use crate::proposer::NOT_LEADER;
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
    /// Log entries kept behind a snapshot for followers that lag a little (etcd's
    /// --experimental-snapshot-catchup-entries); a member further behind gets the snapshot.
    pub snapshot_catchup_entries: u64,
    /// Raft heartbeat interval in milliseconds (etcd's --heartbeat-interval).
    pub heartbeat_interval_ms: u64,
    /// Raft election timeout in milliseconds (etcd's --election-timeout).
    pub election_timeout_ms: u64,
    /// Space quota in bytes (etcd's --quota-backend-bytes); 0 = default 2 GiB.
    pub quota_backend_bytes: u64,
    /// This member's ID (etcd's derivation, computed by the frontend).
    pub member_id: u64,
    /// Every member of --initial-cluster (member ID -> first peer URL), this one included.
    /// Zero or one entry: a single-node group that needs no peers.
    pub initial_cluster: BTreeMap<u64, String>,
    /// --initial-cluster-state existing: join a running cluster (that added this member)
    /// instead of bootstrapping a new one.
    pub join_existing: bool,
    /// TLS for dialling https peer URLs (--peer-cert-file, --peer-auto-tls...).
    pub peer_tls: Option<Arc<rustls::ClientConfig>>,
    /// The cluster ID, told to members that join ([`NativeBackend::discover`]).
    pub cluster_id: u64,
    /// Fault injection for tests: every write-ahead-log fsync takes this much longer (a slow
    /// disk). Zero (the default) in production; no flag sets it.
    pub slow_disk: Duration,
    /// etcd's --unsafe-no-fsync: the write-ahead log is written but not fsynced before a
    /// write is acknowledged (a machine crash or power loss can lose acknowledged writes).
    pub unsafe_no_fsync: bool,
    /// etcd's backend to load into a fresh store (a data dir `etcdctl snapshot restore` made,
    /// or an etcd member's); ignored once the store holds data.
    pub import: Option<Arc<cairn_bbolt::etcd::Snapshot>>,
}

impl Default for NativeConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("default.cairn"),
            snapshot_count: 100_000,
            snapshot_catchup_entries: 5_000,
            heartbeat_interval_ms: 100,
            election_timeout_ms: 1000,
            quota_backend_bytes: 0,
            member_id: 1,
            initial_cluster: BTreeMap::new(),
            join_existing: false,
            peer_tls: None,
            cluster_id: 0,
            slow_disk: Duration::ZERO,
            unsafe_no_fsync: false,
            import: None,
        }
    }
}

/// The state machine's page cache. redb keeps a tenth for pages written in the open txn and
/// the rest for pages read or committed. Reads of current values are served from memory (the
/// live records), and the VERSIONS rows are appended in revision order, so a commit touches
/// few pages; a 16 MiB cache only filled with pages just committed. 4 MiB: peak RSS 38-39 MB
/// instead of 42-44 after 5 s of 1-client puts, with the same put throughput at 256 clients.
const CACHE_BYTES: usize = 4 << 20;
/// Upper bound on requests (and entries) between snapshots, whatever --snapshot-count says: a
/// snapshot here is only a synced commit, and it bounds the memory the in-memory log uses.
const MAX_SNAPSHOT_EVERY: u64 = 10_000;

/// The native backend. Implements [`cairn_backend::Backend`].
pub struct NativeBackend {
    raft: Raft,
    proposer: proposer::Proposer,
    store: Arc<Store>,
    node_id: u64,
    quota: u64,
    /// More than one member: raft talks to peers, and requests may go through the leader.
    clustered: bool,
    /// This member's (first) peer URL.
    my_peer_url: String,
    peers: Peers,
    cluster_id: u64,
    /// How long a request may wait for a leader, a forwarded write or a read index (etcd's
    /// request timeout: 5 s plus two election timeouts).
    request_timeout: Duration,
    tasks: parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Multi-key reads running on the blocking pool at once: more than the cores can run only
    /// adds threads that take turns (256 concurrent lists made 256 threads).
    reads: tokio::sync::Semaphore,
    /// Last field: dropped after everything that talks to raft.
    _raft_thread: raft_thread::RaftThread,
}

impl NativeBackend {
    /// Opens (or creates) the store in `cfg.data_dir` and starts raft. A single-node group is
    /// ready (leading) when this returns; a member of a cluster must first be reachable by its
    /// peers (serve [`NativeBackend::peer_service`]) and then wait for a leader
    /// ([`NativeBackend::wait_ready`]).
    pub async fn open(cfg: NativeConfig) -> anyhow::Result<Arc<NativeBackend>> {
        std::fs::create_dir_all(&cfg.data_dir)?;
        let store = Store::open(&cfg.data_dir.join("state.redb"), CACHE_BYTES)?;
        if let Some(etcd) = &cfg.import {
            if store.import_etcd(etcd)? {
                tracing::info!(
                    revision = store.current().0,
                    compact_revision = store.current().1,
                    versions = etcd.versions.len(),
                    leases = etcd.leases.len(),
                    "imported etcd's backend"
                );
            }
        }
        let node_id = cfg.member_id;
        // A member of several: by its flags, or because a single node grew (MemberAdd).
        let grown = store
            .applied_state()?
            .membership
            .membership()
            .nodes()
            .count()
            > 1;
        let clustered = cfg.initial_cluster.len() > 1 || cfg.join_existing || grown;
        let wal = wal::Wal::open(&cfg.data_dir.join("wal"), cfg.slow_disk, cfg.unsafe_no_fsync, !clustered)?;
        let (heartbeat, election) = if clustered {
            // etcd's --heartbeat-interval and --election-timeout, in milliseconds.
            let hb = cfg.heartbeat_interval_ms.max(10);
            (hb, cfg.election_timeout_ms.max(hb * 3))
        } else {
            // One voter: nobody to wait for, so short timers only shorten start-up.
            (cfg.heartbeat_interval_ms.clamp(10, 50), 150)
        };
        let config = Config {
            cluster_name: "cairn".into(),
            heartbeat_interval: heartbeat,
            election_timeout_min: election,
            // The upper bound is also the leader lease a leadership transfer waits out.
            election_timeout_max: election + election / 2,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(
                cfg.snapshot_count.clamp(1, MAX_SNAPSHOT_EVERY),
            ),
            // Entries kept for members that lag a little; a single node has none and keeps
            // few (a group-commit entry can hold hundreds of requests, all in memory).
            max_in_snapshot_log_to_keep: if clustered {
                cfg.snapshot_catchup_entries
            } else {
                cfg.snapshot_catchup_entries.min(100)
            },
            ..Default::default()
        }
        .validate()?;
        let sm = StateMachine {
            store: store.clone(),
            started: false,
        };
        let peers = Peers::new(cfg.peer_tls.clone());
        let network = PeerNetwork {
            peers: peers.clone(),
        };
        let idle_store = store.clone();
        let raft_thread = raft_thread::RaftThread::start(move || idle_store.insert_deferred())?;
        let raft = raft_thread
            .run(Raft::new(
                node_id,
                Arc::new(config),
                network,
                LogStore::new(wal),
                sm,
            ))
            .await?;
        if !raft.is_initialized().await? && !cfg.join_existing {
            let mut members = BTreeMap::new();
            if clustered {
                for (id, addr) in &cfg.initial_cluster {
                    members.insert(*id, BasicNode { addr: addr.clone() });
                }
            } else {
                // Its peer URL, so that members added later can reach it.
                let addr = cfg
                    .initial_cluster
                    .get(&node_id)
                    .cloned()
                    .unwrap_or_default();
                members.insert(node_id, BasicNode { addr });
            }
            // Every member of a new cluster initializes with the same membership; whoever
            // hears from an elected leader first has a log already and is refused, harmlessly.
            match raft.initialize(members).await {
                Ok(()) => {}
                Err(openraft::error::RaftError::APIError(
                    openraft::error::InitializeError::NotAllowed(_),
                )) if clustered => {}
                Err(e) => return Err(e.into()),
            }
        }
        if !clustered {
            raft.wait(Some(Duration::from_secs(30)))
                .current_leader(node_id, "single voter elects itself")
                .await?;
        }
        let (proposer, proposer_task) = {
            let raft = raft.clone();
            let quiet = raft_thread.quiet();
            let replies_on = tokio::runtime::Handle::current();
            raft_thread
                .run(async move { proposer::Proposer::start(raft, quiet, replies_on) })
                .await
        };
        let backend = Arc::new(NativeBackend {
            raft,
            proposer,
            store,
            node_id,
            quota: quota::quota_bytes(cfg.quota_backend_bytes),
            clustered,
            my_peer_url: cfg
                .initial_cluster
                .get(&node_id)
                .cloned()
                .unwrap_or_default(),
            cluster_id: cfg.cluster_id,
            peers,
            request_timeout: Duration::from_millis(5_000 + 2 * election),
            tasks: parking_lot::Mutex::new(Vec::new()),
            reads: tokio::sync::Semaphore::new(
                2 * std::thread::available_parallelism().map_or(2, |n| n.get()),
            ),
            _raft_thread: raft_thread,
        });
        let tasks = vec![
            proposer_task,
            tokio::spawn(expire_leases(Arc::downgrade(&backend))),
            tokio::spawn(compactor(backend.store.clone())),
            tokio::spawn(snapshot_by_requests(
                Arc::downgrade(&backend),
                cfg.snapshot_count.clamp(1, MAX_SNAPSHOT_EVERY),
            )),
        ];
        *backend.tasks.lock() = tasks;
        if backend.store.import_unsnapshotted()? {
            if clustered {
                let weak = Arc::downgrade(&backend);
                backend.tasks.lock().push(tokio::spawn(async move {
                    if let Err(e) = snapshot_import(weak).await {
                        tracing::error!(error = %e, "snapshotting the imported etcd data failed");
                    }
                }));
            } else {
                snapshot_import(Arc::downgrade(&backend)).await?;
            }
        }
        Ok(backend)
    }

    /// For a member joining a running cluster (--initial-cluster-state existing): asks the
    /// members at `peer_urls` which member ID the cluster gave `my_peer_url` (through
    /// MemberAdd) and the cluster's ID. Retries until one answers, for up to `patience`.
    pub async fn discover(
        peer_urls: &[String],
        my_peer_url: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
        patience: Duration,
    ) -> anyhow::Result<(u64, u64)> {
        let peers = Peers::new(tls);
        let deadline = Instant::now() + patience;
        let req = PeerRequest::Whois {
            peer_url: my_peer_url.to_string(),
        };
        loop {
            let mut last = String::from("no other member listed in --initial-cluster");
            for (i, url) in peer_urls.iter().filter(|u| *u != my_peer_url).enumerate() {
                match peers.call(u64::MAX - i as u64, url, &req).await {
                    Ok(PeerResponse::Whois {
                        member_id: Some(id),
                        cluster_id,
                    }) => return Ok((id, cluster_id)),
                    Ok(PeerResponse::Whois {
                        member_id: None, ..
                    }) => {
                        anyhow::bail!(
                            "member with peer URL {my_peer_url} has not been added to the cluster (etcdctl member add)"
                        )
                    }
                    Ok(other) => last = format!("{url}: unexpected answer {other:?}"),
                    Err(e) => last = format!("{url}: {e}"),
                }
            }
            if Instant::now() >= deadline {
                anyhow::bail!("could not reach the existing cluster: {last}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The channels to the other members (for fault injection: [`Peers::set_blocked`]).
    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    /// openraft's metrics of this member (diagnostics and tests).
    pub fn raft_metrics(&self) -> openraft::RaftMetrics<u64, BasicNode> {
        self.raft.metrics().borrow().clone()
    }

    /// Whether this member is part of a multi-member cluster.
    pub fn is_clustered(&self) -> bool {
        self.clustered
    }

    /// The gRPC service other members call; serve it on --listen-peer-urls.
    pub fn peer_service(self: &Arc<Self>) -> peer::proto::peer_server::PeerServer<PeerService> {
        let me: Arc<dyn peer::Leader> = self.clone();
        PeerService::new(self.raft.clone(), Arc::downgrade(&me))
    }

    /// Waits until the cluster has a leader and this member applied everything committed
    /// when it learned of it, logging while it waits.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let waited = self
                .raft
                .wait(Some(Duration::from_secs(5)))
                .metrics(|m| m.current_leader.is_some(), "a leader")
                .await;
            match waited {
                Ok(_) => break,
                Err(openraft::metrics::WaitError::Timeout(..)) => tracing::warn!(
                    waited_secs = started.elapsed().as_secs(),
                    "no leader yet; waiting for the other members of the cluster"
                ),
                Err(e) => return Err(e.into()),
            }
        }
        self.read_barrier().await?;
        Ok(())
    }

    /// The current leader and its peer URL, if one is known.
    fn leader_node(&self) -> Option<(u64, String)> {
        let m = self.raft.metrics();
        let m = m.borrow();
        let id = m.current_leader?;
        let addr = m
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())?;
        Some((id, addr))
    }

    /// Waits (until `deadline`) for a leader to be known.
    async fn wait_leader(&self, deadline: Instant) -> Result<(u64, String)> {
        loop {
            if let Some(l) = self.leader_node() {
                return Ok(l);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(BackendError::Unavailable("no leader".into()));
            }
            let _ = self
                .raft
                .wait(Some(left.min(Duration::from_millis(100))))
                .metrics(|m| m.current_leader.is_some(), "a leader")
                .await;
        }
    }

    /// Waits (until `deadline`) until this member applied log index `index`.
    async fn wait_applied(&self, index: u64, deadline: Instant) -> Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self
            .raft
            .wait(Some(left))
            .applied_index_at_least(Some(index), "catch up with the leader")
            .await
        {
            Ok(_) => Ok(()),
            Err(openraft::metrics::WaitError::Timeout(..)) => Err(BackendError::Timeout),
            Err(openraft::metrics::WaitError::ShuttingDown) => Err(BackendError::Stopped),
        }
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

    /// Proposes `cmd` and returns its result once this member applied it; state machine
    /// rejections come back as errors.
    async fn propose(&self, cmd: Command) -> Result<CommandResult> {
        match self.propose_indexed(cmd).await?.0 {
            CommandResult::Err(e) => Err(e),
            other => Ok(other),
        }
    }

    /// Proposes `cmd` here when this member leads, else through the leader, and waits until
    /// this member applied it (so a client reads its own write on the member it wrote to).
    async fn propose_indexed(&self, cmd: Command) -> Result<(CommandResult, u64)> {
        if !self.replicated() {
            return self.proposer.propose(cmd).await;
        }
        // Boxed: the peer call and the timers make this future large, and every request's
        // future that awaits this one would carry that size on a single node too.
        Box::pin(self.propose_replicated(cmd)).await
    }

    async fn propose_replicated(&self, cmd: Command) -> Result<(CommandResult, u64)> {
        let deadline = Instant::now() + self.request_timeout;
        loop {
            let (leader, addr) = self.wait_leader(deadline).await?;
            let outcome = if leader == self.node_id {
                match tokio::time::timeout_at(deadline.into(), self.proposer.propose(cmd.clone()))
                    .await
                {
                    Ok(r) => r,
                    Err(_) => return Err(BackendError::Timeout),
                }
            } else {
                match self
                    .peers
                    .call(leader, &addr, &PeerRequest::Propose(cmd.clone()))
                    .await
                {
                    Ok(PeerResponse::Proposed { result, index }) => self
                        .wait_applied(index, deadline)
                        .await
                        .map(|()| (result, index)),
                    Ok(PeerResponse::Err(e)) | Err(e) => Err(e),
                    Ok(other) => Err(unexpected_peer(other)),
                }
            };
            match outcome {
                // Nothing was appended: the leader moved; try the new one.
                Err(BackendError::Unavailable(m)) if m == NOT_LEADER => {
                    if Instant::now() >= deadline {
                        return Err(BackendError::Unavailable("leader changed".into()));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => return other,
            }
        }
    }

    /// Before a linearizable read: confirms the leader's read index and waits until this
    /// member applied up to it. A single voter applied every acknowledged write already.
    async fn read_barrier(&self) -> Result<()> {
        if !self.replicated() {
            return Ok(());
        }
        // Boxed for the reason given in `propose_indexed`.
        Box::pin(self.read_barrier_replicated()).await
    }

    async fn read_barrier_replicated(&self) -> Result<()> {
        let deadline = Instant::now() + self.request_timeout;
        loop {
            let (leader, addr) = self.wait_leader(deadline).await?;
            let outcome = if leader == self.node_id {
                self.read_index().await
            } else {
                match self
                    .peers
                    .call(leader, &addr, &PeerRequest::ReadIndex)
                    .await
                {
                    Ok(PeerResponse::ReadIndex(i)) => Ok(i),
                    Ok(PeerResponse::Err(e)) | Err(e) => Err(e),
                    Ok(other) => Err(unexpected_peer(other)),
                }
            };
            match outcome {
                Ok(index) => return self.wait_applied(index, deadline).await,
                Err(BackendError::Unavailable(m)) if m == NOT_LEADER => {
                    if Instant::now() >= deadline {
                        return Err(BackendError::Timeout);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The leader's read index: the log index a linearizable read must wait for.
    async fn read_index(&self) -> Result<u64> {
        use openraft::error::{CheckIsLeaderError, RaftError};
        match self.raft.get_read_log_id().await {
            Ok((read, _)) => Ok(read.map_or(0, |l| l.index)),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_))) => {
                Err(BackendError::Unavailable(NOT_LEADER.into()))
            }
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_))) => {
                Err(BackendError::Timeout)
            }
            Err(RaftError::Fatal(_)) => Err(BackendError::Stopped),
        }
    }

    /// The body of a leadership transfer (see `move_leader`): waits for the transferee to catch
    /// up and for the leader lease to lapse, then has it campaign until it leads.
    async fn transfer_to(&self, target: u64, addr: &str) -> Result<()> {
        let deadline = Instant::now() + self.request_timeout;
        let too_long = || BackendError::Unavailable("leader transfer took too long".into());
        loop {
            let (_, _, matched, last) = replication_of(&self.raft, target);
            if matched == Some(last) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(too_long());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let lease = Duration::from_millis(self.raft.config().election_timeout_max);
        tokio::time::sleep(lease + Duration::from_millis(50)).await;
        while Instant::now() < deadline {
            let _ = self.peers.call(target, addr, &PeerRequest::Campaign).await;
            let left = deadline.saturating_duration_since(Instant::now());
            let won = self
                .raft
                .wait(Some(left.min(lease * 2)))
                .metrics(|m| m.current_leader == Some(target), "transferee leads")
                .await;
            if won.is_ok() {
                return Ok(());
            }
        }
        Err(too_long())
    }

    /// Whether the raft group has other members (it may have grown from a single node since
    /// start): then writes and linearizable reads involve the leader and the quorum.
    fn replicated(&self) -> bool {
        self.clustered
            || self
                .raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .nodes()
                .count()
                > 1
    }

    fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.node_id)
    }

    /// etcd's backend quota: a request that adds `cost` bytes is refused unless the size in
    /// use plus the cost stays below the quota; requests that add nothing always pass.
    async fn check_quota(&self, cost: u64) -> Result<()> {
        if cost == 0 {
            return Ok(());
        }
        // Measuring walks redb's trees: off the async threads, and rarely (Store::in_use).
        let in_use = match self.store.in_use_estimate() {
            Some(v) => v,
            None => match self.store.claim_measurement() {
                Some(claim) => {
                    let store = self.store.clone();
                    blocking(move || {
                        let _claim = claim;
                        store.in_use()
                    })
                    .await?
                }
                // Another writer is measuring: the estimate only over-counts, and a write
                // it would refuse is measured again first.
                None => self.store.estimate(),
            },
        };
        if quota::exceeds(in_use.max(0) as u64, cost, self.quota) {
            let store = self.store.clone();
            let in_use = blocking(move || store.in_use_before_refusing()).await?;
            if quota::exceeds(in_use.max(0) as u64, cost, self.quota) {
                return Err(BackendError::NoSpace);
            }
        }
        Ok(())
    }

    /// Runs a read of the store: a point read (microseconds) in place on the runtime worker,
    /// anything else on the blocking pool, at most [`NativeBackend::reads`] such reads at once.
    async fn read<T: Send + 'static>(
        &self,
        point: bool,
        f: impl FnOnce(&Store) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        if point {
            return f(&self.store);
        }
        let _slot = self.reads.acquire().await.map_err(BackendError::internal)?;
        let store = self.store.clone();
        blocking(move || f(&store)).await
    }
}

/// Whether every op is a single-key range: cheap enough to run on a runtime worker.
fn point_reads(ops: &[cairn_backend::RequestOp]) -> bool {
    ops.iter()
        .all(|op| matches!(op, cairn_backend::RequestOp::Range(r) if r.range.is_single()))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(BackendError::internal)?
}

fn raft_write_err(
    e: openraft::error::RaftError<u64, openraft::error::ClientWriteError<u64, BasicNode>>,
) -> BackendError {
    use openraft::error::{ClientWriteError, RaftError};
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
            BackendError::Unavailable(NOT_LEADER.into())
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            BackendError::Unavailable(format!("membership change refused: {e}"))
        }
        RaftError::Fatal(_) => BackendError::Stopped,
    }
}

/// A learner is ready to vote once it holds this share of the leader's log (etcd's 90%).
fn caught_up(matched: u64, last: u64) -> bool {
    matched * 10 >= last * 9
}

/// What the leader knows of member `id`: whether this member leads, whether `id` is a learner,
/// the log index replicated to it, and the leader's last log index.
fn replication_of(raft: &Raft, id: u64) -> (bool, bool, Option<u64>, u64) {
    let m = raft.metrics();
    let m = m.borrow();
    let membership = m.membership_config.membership();
    let is_learner = membership.get_node(&id).is_some() && !membership.voter_ids().any(|v| v == id);
    let matched = m
        .replication
        .as_ref()
        .and_then(|r| r.get(&id).copied().flatten())
        .map(|l| l.index);
    (
        m.current_leader == Some(m.id),
        is_learner,
        matched,
        m.last_log_index.unwrap_or(0),
    )
}

impl NativeBackend {
    /// Makes a membership change on the leader. A voter added through MemberAdd joins as a
    /// raft learner and is promoted by a task once it caught up, so that a member that was
    /// added but not started yet never counts against the quorum.
    async fn change_members(&self, change: MemberChange) -> Result<()> {
        use openraft::ChangeMembers;
        use std::collections::BTreeSet;
        match change {
            MemberChange::Add {
                id,
                peer_url,
                learner,
            } => {
                self.record_my_address().await?;
                self.raft
                    .add_learner(id, BasicNode { addr: peer_url }, false)
                    .await
                    .map_err(raft_write_err)?;
                if !learner {
                    tokio::spawn(promote_when_caught_up(self.raft.clone(), id));
                }
            }
            MemberChange::Promote { id } => {
                let (_, _, matched, last) = replication_of(&self.raft, id);
                if !caught_up(matched.unwrap_or(0), last) {
                    return Err(BackendError::Unavailable("learner not ready".into()));
                }
                self.raft
                    .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                    .await
                    .map_err(raft_write_err)?;
            }
            MemberChange::Remove { id } => {
                let (_, is_learner, _, _) = replication_of(&self.raft, id);
                let change = if is_learner {
                    ChangeMembers::RemoveNodes(BTreeSet::from([id]))
                } else {
                    ChangeMembers::RemoveVoters(BTreeSet::from([id]))
                };
                self.raft
                    .change_membership(change, false)
                    .await
                    .map_err(raft_write_err)?;
            }
            MemberChange::Update { id, peer_url } => {
                let nodes = BTreeMap::from([(id, BasicNode { addr: peer_url })]);
                self.raft
                    .change_membership(ChangeMembers::SetNodes(nodes), true)
                    .await
                    .map_err(raft_write_err)?;
            }
        }
        Ok(())
    }
}

impl NativeBackend {
    /// A single node created before it knew its peer URL is listed without an address; the
    /// members it adds must be able to reach it, so it records its URL first.
    async fn record_my_address(&self) -> Result<()> {
        let known = {
            let m = self.raft.metrics();
            let m = m.borrow();
            m.membership_config
                .membership()
                .get_node(&self.node_id)
                .map(|n| n.addr.clone())
        };
        if self.my_peer_url.is_empty() || known.as_deref() == Some(self.my_peer_url.as_str()) {
            return Ok(());
        }
        let nodes = BTreeMap::from([(
            self.node_id,
            BasicNode {
                addr: self.my_peer_url.clone(),
            },
        )]);
        self.raft
            .change_membership(openraft::ChangeMembers::SetNodes(nodes), true)
            .await
            .map_err(raft_write_err)?;
        Ok(())
    }
}

/// Promotes learner `id` to voter once it caught up, while this member leads.
async fn promote_when_caught_up(raft: Raft, id: u64) {
    use openraft::ChangeMembers;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (leads, is_learner, matched, last) = replication_of(&raft, id);
        if !leads || !is_learner {
            return;
        }
        if !matched.is_some_and(|m| caught_up(m, last)) {
            continue;
        }
        let voters = std::collections::BTreeSet::from([id]);
        match raft
            .change_membership(ChangeMembers::AddVoterIds(voters), false)
            .await
        {
            Ok(_) => {
                tracing::info!(member = %format!("{id:x}"), "added member caught up: now a voter");
                return;
            }
            Err(e) => tracing::warn!(
                member = %format!("{id:x}"), error = %e,
                "promoting an added member failed; retrying"
            ),
        }
    }
}

fn unexpected_peer(r: PeerResponse) -> BackendError {
    BackendError::Internal(format!("unexpected answer from the leader: {r:?}"))
}

impl NativeBackend {
    /// Lease keep-alives and time-to-live are the leader's (its clock decides expiry): served
    /// here when this member leads, else asked of the leader.
    async fn leader_call(&self, req: PeerRequest) -> Result<PeerResponse> {
        if !self.replicated() {
            return match self.serve_leader(req).await {
                PeerResponse::Err(e) => Err(e),
                r => Ok(r),
            };
        }
        let deadline = Instant::now() + self.request_timeout;
        loop {
            let (leader, addr) = self.wait_leader(deadline).await?;
            let r = if leader == self.node_id {
                self.serve_leader(req.clone()).await
            } else {
                self.peers
                    .call(leader, &addr, &req)
                    .await
                    .unwrap_or_else(PeerResponse::Err)
            };
            match r {
                PeerResponse::Err(BackendError::Unavailable(m)) if m == NOT_LEADER => {
                    if Instant::now() >= deadline {
                        return Err(BackendError::Unavailable("leader changed".into()));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                PeerResponse::Err(e) => return Err(e),
                r => return Ok(r),
            }
        }
    }

    /// Answers a request as the leader; `NOT_LEADER` when this member does not lead.
    async fn serve_leader(&self, req: PeerRequest) -> PeerResponse {
        if let PeerRequest::Whois { peer_url } = &req {
            let m = self.raft.metrics();
            let m = m.borrow();
            let member_id = m
                .membership_config
                .membership()
                .nodes()
                .find(|(_, n)| &n.addr == peer_url)
                .map(|(id, _)| *id);
            return PeerResponse::Whois {
                member_id,
                cluster_id: self.cluster_id,
            };
        }
        match &req {
            PeerRequest::SetElect(on) => {
                self.raft.runtime_config().elect(*on);
                return PeerResponse::Done;
            }
            PeerRequest::Campaign => {
                return match self.raft.trigger().elect().await {
                    Ok(()) => PeerResponse::Done,
                    Err(_) => PeerResponse::Err(BackendError::Stopped),
                };
            }
            _ => {}
        }
        if self.replicated() && !self.is_leader() {
            return PeerResponse::Err(BackendError::Unavailable(NOT_LEADER.into()));
        }
        let r = match req {
            PeerRequest::Propose(cmd) => self
                .proposer
                .propose(cmd)
                .await
                .map(|(result, index)| PeerResponse::Proposed { result, index }),
            PeerRequest::ReadIndex => self.read_index().await.map(PeerResponse::ReadIndex),
            PeerRequest::KeepAlive(id) => self
                .store
                .leases
                .refresh(id)
                .map(PeerResponse::KeepAlive)
                .ok_or(BackendError::LeaseNotFound),
            PeerRequest::Whois { .. } | PeerRequest::SetElect(_) | PeerRequest::Campaign => {
                unreachable!("answered above")
            }
            PeerRequest::Member(change) => self
                .change_members(change)
                .await
                .map(|()| PeerResponse::Done),
            // Without keys the lease clock answers; with them the store is read.
            PeerRequest::TimeToLive { id, keys } => self
                .read(!keys, move |store| store.lease_info(id, keys))
                .await
                .map(PeerResponse::TimeToLive),
        };
        r.unwrap_or_else(PeerResponse::Err)
    }
}

#[async_trait]
impl peer::Leader for NativeBackend {
    async fn serve(&self, req: PeerRequest) -> PeerResponse {
        self.serve_leader(req).await
    }
}

fn unexpected(r: CommandResult) -> BackendError {
    BackendError::Internal(format!("unexpected state machine result {r:?}"))
}

#[async_trait]
impl Backend for NativeBackend {
    async fn range(&self, req: RangeRequest) -> Result<RangeResponse> {
        if !req.serializable {
            self.read_barrier().await?;
        }
        self.read(req.range.is_single(), move |store| store.range(&req))
            .await
    }

    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse> {
        if !req.has_writes() {
            self.read_barrier().await?;
            let point = point_reads(&req.success) && point_reads(&req.failure);
            return self.read(point, move |store| store.read_txn(&req)).await;
        }
        self.check_quota(quota::txn_cost(&req)).await?;
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
        Ok(feed::stream(self.store.clone(), rx, next))
    }

    async fn current_revision(&self) -> Result<(Revision, Revision)> {
        Ok(self.store.current())
    }

    async fn lease_grant(&self, id: LeaseId, ttl: i64) -> Result<LeaseGrant> {
        self.check_quota(quota::LEASE_OVERHEAD).await?;
        let chosen = id != 0;
        loop {
            let id = cairn_backend::lease_id_to_try(id);
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
        match self.leader_call(PeerRequest::KeepAlive(id)).await? {
            PeerResponse::KeepAlive(ttl) => Ok(ttl),
            other => Err(unexpected_peer(other)),
        }
    }

    async fn lease_time_to_live(&self, id: LeaseId, keys: bool) -> Result<LeaseInfo> {
        match self
            .leader_call(PeerRequest::TimeToLive { id, keys })
            .await?
        {
            PeerResponse::TimeToLive(info) => Ok(info),
            other => Err(unexpected_peer(other)),
        }
    }

    async fn lease_leases(&self) -> Result<Vec<LeaseId>> {
        // The lease clock answers: no storage read.
        self.store.lease_ids()
    }

    async fn status(&self) -> Result<BackendStatus> {
        let m = self.raft.metrics().borrow().clone();
        let (revision, compact_revision) = self.store.current();
        // The in-use bytes as the quota sees them: measuring walks every tree, so it is done
        // only as often as the quota does it (the header's term refresh calls this each second).
        let store = self.store.clone();
        let db_size_in_use = blocking(move || store.in_use()).await?;
        let db_size = self.store.file_size();
        Ok(BackendStatus {
            revision,
            compact_revision,
            db_size,
            db_size_in_use,
            raft_index: m.last_log_index.unwrap_or(0),
            raft_term: m.current_term,
            raft_applied_index: m.last_applied.map_or(0, |l| l.index),
            is_leader: m.current_leader == Some(self.node_id),
            leader: m.current_leader,
            is_learner: !m
                .membership_config
                .membership()
                .voter_ids()
                .any(|v| v == self.node_id)
                && m.membership_config
                    .membership()
                    .get_node(&self.node_id)
                    .is_some(),
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

    async fn member_change(&self, change: MemberChange) -> Result<()> {
        match self.leader_call(PeerRequest::Member(change)).await? {
            PeerResponse::Done => Ok(()),
            other => Err(unexpected_peer(other)),
        }
    }

    async fn move_leader(&self, target: u64) -> Result<()> {
        let bad = || BackendError::Unavailable("bad leader transferee".into());
        if !self.replicated() {
            return Err(bad());
        }
        let (voters, target_addr) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            let voters: Vec<(u64, String)> = membership
                .voter_ids()
                .filter_map(|id| Some((id, membership.get_node(&id)?.addr.clone())))
                .collect();
            let addr = voters
                .iter()
                .find(|(id, _)| *id == target)
                .map(|(_, a)| a.clone());
            (voters, addr)
        };
        let Some(target_addr) = target_addr else {
            return Err(bad());
        };
        if !self.is_leader() {
            return Err(BackendError::Unavailable("leader changed".into()));
        }
        // Followers stop their own election timers, the leader stops its heartbeats; once the
        // followers' leader lease ran out the transferee campaigns and wins (its log is
        // complete). Whatever happens, timers and heartbeats come back on.
        let others: Vec<(u64, String)> = voters
            .into_iter()
            .filter(|(id, _)| *id != self.node_id)
            .collect();
        for (id, addr) in &others {
            let _ = self
                .peers
                .call(*id, addr, &PeerRequest::SetElect(false))
                .await;
        }
        // No new entries meanwhile (they would renew the followers' leases and keep the
        // transferee behind); requests wait and then go to the new leader.
        let paused = self.proposer.pause().await;
        self.raft.runtime_config().heartbeat(false);
        let outcome = self.transfer_to(target, &target_addr).await;
        self.raft.runtime_config().heartbeat(true);
        drop(paused);
        for (id, addr) in &others {
            let _ = self
                .peers
                .call(*id, addr, &PeerRequest::SetElect(true))
                .await;
        }
        outcome
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

/// Puts an imported etcd key space into a raft snapshot and purges the log before it, so that
/// a member joining later installs the snapshot instead of replaying a log that never held
/// that data; then clears the store's import mark (a crash before that redoes this).
async fn snapshot_import(backend: std::sync::Weak<NativeBackend>) -> anyhow::Result<()> {
    let Some(b) = backend.upgrade() else {
        return Ok(());
    };
    let raft = b.raft.clone();
    drop(b);
    let m = raft
        .wait(None)
        .metrics(|m| m.last_applied.is_some(), "an applied entry")
        .await?;
    let applied = m.last_applied.expect("waited for it");
    raft.trigger().snapshot().await?;
    raft.wait(Some(Duration::from_secs(60)))
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= applied.index),
            "snapshot of the imported data",
        )
        .await?;
    raft.trigger().purge_log(applied.index).await?;
    raft.wait(Some(Duration::from_secs(60)))
        .metrics(
            |m| m.purged.is_some_and(|p| p.index >= applied.index),
            "log purged up to the snapshot",
        )
        .await?;
    let Some(b) = backend.upgrade() else {
        return Ok(());
    };
    let store = b.store.clone();
    blocking(move || store.import_snapshotted()).await?;
    tracing::info!(
        index = applied.index,
        "imported etcd data is in a raft snapshot"
    );
    Ok(())
}

/// Takes a snapshot (and so lets raft purge its log) every `every` applied requests. raft's own
/// policy counts entries, and a group-commit entry holds many requests, all kept in memory
/// until purged; etcd's --snapshot-count counts requests too.
async fn snapshot_by_requests(backend: std::sync::Weak<NativeBackend>, every: u64) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut last = 0;
    loop {
        tick.tick().await;
        let Some(b) = backend.upgrade() else { return };
        let applied = b
            .store
            .applied_requests
            .load(std::sync::atomic::Ordering::Relaxed);
        if applied - last >= every {
            last = applied;
            if let Err(e) = b.raft.trigger().snapshot().await {
                tracing::warn!(error = %e, "triggering a snapshot failed");
            }
        }
    }
}

/// Revokes leases whose deadline passed, through raft, so expiry happens once. Only the
/// leader does; a member that becomes leader first gives every lease a full TTL (as etcd's
/// lessor does on promotion), since keep-alives went to the old leader.
async fn expire_leases(backend: std::sync::Weak<NativeBackend>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut was_leader = false;
    loop {
        tick.tick().await;
        let Some(b) = backend.upgrade() else { return };
        if b.replicated() {
            let leads = b.is_leader();
            if leads && !was_leader {
                let s = b.store.clone();
                if let Err(e) = blocking(move || s.reset_lease_clock()).await {
                    tracing::warn!(error = %e, "resetting lease deadlines failed");
                }
            }
            was_leader = leads;
            if !leads {
                continue;
            }
        }
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
