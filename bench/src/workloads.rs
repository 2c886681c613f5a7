//! The workloads. Each runs closed-loop clients (or paced writers and watchers) for a bounded
//! time and a bounded number of operations, then returns one [`Outcome`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use cairn_api::coalesce::Coalesce;
use cairn_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use cairn_proto::etcdserverpb::kv_client::KvClient;
use cairn_proto::etcdserverpb::lease_client::LeaseClient;
use cairn_proto::etcdserverpb::request_op::Request;
use cairn_proto::etcdserverpb::response_op::Response as OpResponse;
use cairn_proto::etcdserverpb::watch_client::WatchClient;
use cairn_proto::etcdserverpb::watch_request::RequestUnion;
use cairn_proto::etcdserverpb::{
    Compare, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseKeepAliveResponse, PutRequest, RangeRequest, RequestOp,
    TxnRequest, WatchCreateRequest, WatchRequest, WatchResponse,
};
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::keys::{self, NS_KV, NS_LIST, NS_OTHER, NS_WATCH};
use crate::report::{self, Outcome};

/// One request may take at most this long before it counts as an error.
const OP_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed request, so a dead server does not turn clients into busy loops.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);
/// The list workload's data set.
pub const LIST_PREFIX_KEYS: u64 = 10_000;
pub const LIST_TOTAL_KEYS: u64 = 100_000;
pub const LIST_LIMIT: i64 = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Put,
    RangeL,
    RangeS,
    Txn,
    Watch1,
    Watch1000,
    Lease,
    LeaseKeepAlive,
    List,
    Count,
}

impl Workload {
    pub const ALL: [Workload; 10] = [
        Workload::Put,
        Workload::RangeL,
        Workload::RangeS,
        Workload::Txn,
        Workload::Watch1,
        Workload::Watch1000,
        Workload::Lease,
        Workload::LeaseKeepAlive,
        Workload::List,
        Workload::Count,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Put => "put",
            Workload::RangeL => "range-l",
            Workload::RangeS => "range-s",
            Workload::Txn => "txn",
            Workload::Watch1 => "watch-1",
            Workload::Watch1000 => "watch-1000",
            Workload::Lease => "lease",
            Workload::LeaseKeepAlive => "lease-keepalive",
            Workload::List => "list",
            Workload::Count => "count",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Workload::Put => "put of 8-byte keys with 256-byte values, random over the keyspace",
            Workload::RangeL => "linearizable single-key get over a preloaded keyspace",
            Workload::RangeS => "serializable single-key get over a preloaded keyspace",
            Workload::Txn => "Kubernetes GuaranteedUpdate: txn if mod_revision == cached then put else get",
            Workload::Watch1 => {
                "1 watcher on a prefix, N closed-loop writers; ops/s = events/s delivered, p50/p99 = lag from the \
                 put's response to the event's arrival (0 when the event came first)"
            }
            Workload::Watch1000 => {
                "1000 watchers on one prefix over 4 streams, N writers sharing 100 puts/s; ops/s = events/s \
                 delivered, p50/p99 = delivery lag"
            }
            Workload::Lease => "lease grant (TTL 60 s) then one keep-alive of it; latency of the pair",
            Workload::LeaseKeepAlive => "one lease per client, keep-alive round trips on its stream",
            Workload::List => "list 500 of a 10k-key prefix among 100k keys (limit=500, linearizable)",
            Workload::Count => "count_only over all 100k keys of the list data set (linearizable)",
        }
    }

    pub fn parse(s: &str) -> Result<Workload, String> {
        Workload::ALL.into_iter().find(|w| w.name() == s).ok_or_else(|| {
            format!(
                "unknown workload {s:?}; known: {}",
                Workload::ALL.map(|w| w.name()).join(", ")
            )
        })
    }
}

/// Everything one run needs.
#[derive(Debug, Clone)]
pub struct Params {
    /// `http://127.0.0.1:PORT` forms (already checked to be loopback).
    pub endpoints: Vec<String>,
    pub clients: usize,
    pub conns: usize,
    pub duration: Duration,
    /// Keys `k0000000 ..` used by put, range and txn (preloaded for range and txn).
    pub keyspace: u64,
    pub server_pid: Option<u32>,
    /// Roots of the process trees of the storage the server uses (a PostgreSQL postmaster, a
    /// TiKV test server), whose CPU is reported apart from the server's.
    pub store_pids: Vec<u32>,
    pub watchers: usize,
    pub watch_streams: usize,
    /// Total puts per second in watch-1000.
    pub watch_rate: u64,
    /// How long watchers may take after the writers stop to deliver the remaining events.
    pub drain_timeout: Duration,
    pub max_ops_per_client: u64,
    pub seed: u64,
}

/// Connections = min(clients, 16) unless given, as in PERF-BASELINE.md.
pub fn default_conns(clients: usize) -> usize {
    clients.clamp(1, 16)
}

pub async fn run(w: Workload, p: &Params) -> Result<Outcome> {
    if p.keyspace == 0 || p.keyspace > keys::MAX_INDEX + 1 {
        bail!("keyspace must be 1..={}", keys::MAX_INDEX + 1);
    }
    let channels = connect(&p.endpoints, p.conns.max(1)).await?;
    let mut out = match w {
        Workload::Put => {
            let ops = build_ops(p.clients, |i| {
                let kv = channels[i % channels.len()].kv();
                let seed = p.seed.wrapping_add(i as u64);
                let keyspace = p.keyspace;
                async move {
                    Ok(PutOp {
                        kv,
                        rng: SmallRng::seed_from_u64(seed),
                        keyspace,
                        value: keys::value(seed),
                    })
                }
            })
            .await?;
            closed_loop(ops, p).await
        }
        Workload::RangeL | Workload::RangeS => {
            preload_namespace(&channels, NS_KV, p.keyspace).await?;
            let serializable = w == Workload::RangeS;
            let ops = build_ops(p.clients, |i| {
                let kv = channels[i % channels.len()].kv();
                let seed = p.seed.wrapping_add(i as u64);
                let keyspace = p.keyspace;
                async move {
                    Ok(RangeOp {
                        kv,
                        rng: SmallRng::seed_from_u64(seed),
                        keyspace,
                        serializable,
                    })
                }
            })
            .await?;
            closed_loop(ops, p).await
        }
        Workload::Txn => {
            preload_namespace(&channels, NS_KV, p.keyspace).await?;
            let revs: Arc<Vec<AtomicI64>> = Arc::new(
                mod_revisions(&channels[0], NS_KV, p.keyspace)
                    .await?
                    .into_iter()
                    .map(AtomicI64::new)
                    .collect(),
            );
            let ops = build_ops(p.clients, |i| {
                let kv = channels[i % channels.len()].kv();
                let seed = p.seed.wrapping_add(i as u64);
                let keyspace = p.keyspace;
                let cache = revs.clone();
                async move {
                    Ok(TxnOp {
                        kv,
                        rng: SmallRng::seed_from_u64(seed),
                        keyspace,
                        value: keys::value(seed),
                        cache,
                        conflicts: 0,
                        reads: 0,
                    })
                }
            })
            .await?;
            closed_loop(ops, p).await
        }
        Workload::Lease | Workload::LeaseKeepAlive => {
            let keep_first = w == Workload::LeaseKeepAlive;
            let ops = build_ops(p.clients, |i| {
                let lease = channels[i % channels.len()].lease();
                async move { LeaseOp::open(lease, keep_first).await }
            })
            .await?;
            closed_loop(ops, p).await
        }
        Workload::List | Workload::Count => {
            preload_list_data(&channels).await?;
            let count = w == Workload::Count;
            let ops = build_ops(p.clients, |i| {
                let kv = channels[i % channels.len()].kv();
                async move { Ok(ListOp { kv, count }) }
            })
            .await?;
            closed_loop(ops, p).await
        }
        Workload::Watch1 => watch_run(p, &channels, 1, 1, None).await?,
        Workload::Watch1000 => {
            watch_run(
                p,
                &channels,
                p.watchers.max(1),
                p.watch_streams.clamp(1, p.watchers.max(1)),
                Some(p.watch_rate.max(1)),
            )
            .await?
        }
    };
    out.workload = w.name().to_string();
    out.clients = p.clients;
    out.conns = channels.len();
    out.peak_rss_kb = p.server_pid.and_then(peak_rss_kb);
    Ok(out)
}

/// The CPU time (user + system, all threads) a process has used so far, from /proc/PID/stat
/// (clock ticks of 10 ms: Linux's USER_HZ is 100).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let (_, ticks, _) = parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    Some(Duration::from_millis(ticks * 10))
}

fn cpu_since(pid: Option<u32>, before: Option<Duration>) -> Option<Duration> {
    Some(cpu_time(pid?)?.saturating_sub(before?))
}

/// The CPU time used so far by the process trees rooted at `roots`: every live process in
/// them, plus what each root has collected from children it reaped (PostgreSQL forks a process
/// per connection). `None` without roots or when a root is gone.
pub fn tree_cpu_time(roots: &[u32]) -> Option<Duration> {
    if roots.is_empty() {
        return None;
    }
    let mut procs: Vec<(u32, u32, u64)> = Vec::new(); // (pid, parent, utime + stime)
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            if let Some((ppid, ticks, _)) = parse_stat(&stat) {
                procs.push((pid, ppid, ticks));
            }
        }
    }
    let mut ticks = 0;
    for &root in roots {
        let stat = std::fs::read_to_string(format!("/proc/{root}/stat")).ok()?;
        ticks += parse_stat(&stat)?.2;
    }
    let mut tree: Vec<u32> = roots.to_vec();
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        for &(pid, ppid, t) in &procs {
            if ppid == parent && !tree.contains(&pid) {
                tree.push(pid);
                ticks += t;
            }
        }
        i += 1;
    }
    Some(Duration::from_millis(ticks * 10))
}

fn tree_cpu_since(roots: &[u32], before: Option<Duration>) -> Option<Duration> {
    Some(tree_cpu_time(roots)?.saturating_sub(before?))
}

/// From /proc/PID/stat: the parent pid, utime + stime, and utime + stime + cutime + cstime
/// (with the reaped children's), the times in clock ticks. The fields after the command name
/// (which may contain spaces) start at field 3 (state): ppid is field 4, utime to cstime 14-17.
fn parse_stat(stat: &str) -> Option<(u32, u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    let own = n(11)? + n(12)?;
    Some((f.get(1)?.parse().ok()?, own, own + n(13)? + n(14)?))
}

/// The server's peak resident set (VmHWM) in kB.
pub fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_hwm(&status)
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// One HTTP/2 connection to a server, used as it is: each request goes straight to hyper's
/// connection handle. tonic's `Channel` adds a buffer task in front of it (a channel send
/// and a reply per request, to share one connection between callers), reconnection and
/// header layers; in the load generator's profile at 256 clients that stack was about a
/// fifth of its CPU, CPU the servers it measures share.
///
/// It writes through Cairn's [`Coalesce`]: requests that many clients send at once go out in
/// one write, and a request's HEADERS and DATA frames in one, as Go's gRPC (etcd's clients,
/// Kubernetes) buffers its writes until it has nothing more to send. With tonic's plain
/// connection the load generator made two `writev`s per request, which cost it as much CPU as
/// the server it measures on the same two cores.
#[derive(Clone)]
pub struct Conn {
    send: hyper::client::conn::http2::SendRequest<tonic::body::Body>,
    /// `http://host:port`: the scheme and authority of every request.
    origin: http::Uri,
}

impl Conn {
    pub fn kv(&self) -> KvClient<Conn> {
        KvClient::with_origin(self.clone(), self.origin.clone())
    }

    pub fn lease(&self) -> LeaseClient<Conn> {
        LeaseClient::with_origin(self.clone(), self.origin.clone())
    }

    pub fn watch(&self) -> WatchClient<Conn> {
        WatchClient::with_origin(self.clone(), self.origin.clone())
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Conn {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, hyper::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), hyper::Error>> {
        self.send.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.send.send_request(req))
    }
}

/// `n` connections, spread over `endpoints` (`http://host:port`).
pub async fn connect(endpoints: &[String], n: usize) -> Result<Vec<Conn>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let ep = &endpoints[i % endpoints.len()];
        let conn = tokio::time::timeout(Duration::from_secs(5), dial(ep))
            .await
            .map_err(|_| anyhow::anyhow!("timed out"))
            .and_then(|r| r)
            .with_context(|| format!("connecting to {ep}"))?;
        out.push(conn);
    }
    Ok(out)
}

async fn dial(endpoint: &str) -> Result<Conn> {
    let origin: http::Uri = endpoint.parse()?;
    let host = origin.host().unwrap_or("127.0.0.1").trim_matches(['[', ']']).to_string();
    let port = origin.port_u16().unwrap_or(2379);
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    tcp.set_nodelay(true)?;
    let io = hyper_util::rt::TokioIo::new(Coalesce::new(tcp));
    let (send, connection) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .handshake(io)
        .await?;
    tokio::spawn(connection);
    Ok(Conn { send, origin })
}

/// One client's operation in a closed loop.
trait Op: Send + 'static {
    /// Performs one operation. `Err` counts as an error.
    fn call(&mut self) -> impl Future<Output = Result<(), String>> + Send;
    /// Workload-specific counters, reported as notes.
    fn extras(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// Builds one op per client concurrently (e.g. 256 lease grants).
async fn build_ops<O, F, Fut>(n: usize, f: F) -> Result<Vec<O>>
where
    O: Op,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<O>> + Send + 'static,
{
    let mut set = JoinSet::new();
    for i in 0..n {
        let fut = f(i);
        set.spawn(async move { (i, tokio::time::timeout(OP_TIMEOUT, fut).await) });
    }
    let mut ops: Vec<Option<O>> = (0..n).map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        let (i, r) = r?;
        ops[i] = Some(r.map_err(|_| anyhow!("client setup timed out"))??);
    }
    Ok(ops.into_iter().map(|o| o.expect("every client set up")).collect())
}

struct ClientStats {
    hist: Histogram<u64>,
    ops: u64,
    errors: u64,
    first_error: Option<String>,
}

impl ClientStats {
    fn new() -> Self {
        ClientStats {
            hist: report::new_histogram(),
            ops: 0,
            errors: 0,
            first_error: None,
        }
    }
    fn error(&mut self, e: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }
    fn merge(&mut self, o: ClientStats) {
        self.hist.add(&o.hist).expect("same histogram bounds");
        self.ops += o.ops;
        self.errors += o.errors;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
    }
}

/// Runs every op in its own task until the deadline or the per-client op bound.
async fn closed_loop<O: Op>(ops: Vec<O>, p: &Params) -> Outcome {
    let cpu0 = p.server_pid.and_then(cpu_time);
    let store0 = tree_cpu_time(&p.store_pids);
    let start = Instant::now();
    let deadline = start + p.duration;
    let max_ops = p.max_ops_per_client;
    let mut set = JoinSet::new();
    for mut op in ops {
        set.spawn(async move {
            let mut st = ClientStats::new();
            while Instant::now() < deadline && st.ops + st.errors < max_ops {
                let t = Instant::now();
                match tokio::time::timeout(OP_TIMEOUT, op.call()).await {
                    Ok(Ok(())) => {
                        report::record(&mut st.hist, t.elapsed());
                        st.ops += 1;
                    }
                    Ok(Err(e)) => {
                        st.error(e);
                        tokio::time::sleep(ERROR_BACKOFF).await;
                    }
                    Err(_) => st.error(format!("timed out after {OP_TIMEOUT:?}")),
                }
            }
            (st, op.extras())
        });
    }
    let mut total = ClientStats::new();
    let mut extras: Vec<(&'static str, u64)> = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok((st, ex)) => {
                total.merge(st);
                for (k, v) in ex {
                    match extras.iter_mut().find(|(k2, _)| *k2 == k) {
                        Some(e) => e.1 += v,
                        None => extras.push((k, v)),
                    }
                }
            }
            Err(e) => total.error(format!("client task failed: {e}")),
        }
    }
    let elapsed = start.elapsed();
    let server_cpu = cpu_since(p.server_pid, cpu0);
    let store_cpu = tree_cpu_since(&p.store_pids, store0);
    Outcome {
        workload: String::new(),
        clients: 0,
        conns: 0,
        ops: total.ops,
        elapsed,
        hist: total.hist,
        errors: total.errors,
        peak_rss_kb: None,
        server_cpu,
        store_cpu,
        note: extras
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
        first_error: total.first_error,
    }
}

fn status_text(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

struct PutOp {
    kv: KvClient<Conn>,
    rng: SmallRng,
    keyspace: u64,
    value: Vec<u8>,
}

impl Op for PutOp {
    async fn call(&mut self) -> Result<(), String> {
        let key = keys::key(NS_KV, self.rng.gen_range(0..self.keyspace));
        self.kv
            .put(PutRequest {
                key,
                value: self.value.clone(),
                ..Default::default()
            })
            .await
            .map_err(status_text)?;
        Ok(())
    }
}

struct RangeOp {
    kv: KvClient<Conn>,
    rng: SmallRng,
    keyspace: u64,
    serializable: bool,
}

impl Op for RangeOp {
    async fn call(&mut self) -> Result<(), String> {
        let key = keys::key(NS_KV, self.rng.gen_range(0..self.keyspace));
        let r = self
            .kv
            .range(RangeRequest {
                key,
                serializable: self.serializable,
                ..Default::default()
            })
            .await
            .map_err(status_text)?
            .into_inner();
        if r.kvs.len() != 1 {
            return Err(format!("get returned {} keys, expected 1", r.kvs.len()));
        }
        Ok(())
    }
}

/// Kubernetes' GuaranteedUpdate: the apiserver holds the object with its mod_revision (in its
/// watch cache; here a cache shared by all clients, seeded from a read of the preloaded keys),
/// and writes with `txn(if mod_revision(key) == cached then put else get)`. On a conflict (two
/// clients raced on one key) the else-branch's get refreshes the cache, as the apiserver does
/// before it retries.
struct TxnOp {
    kv: KvClient<Conn>,
    rng: SmallRng,
    keyspace: u64,
    value: Vec<u8>,
    cache: Arc<Vec<AtomicI64>>,
    conflicts: u64,
    reads: u64,
}

impl Op for TxnOp {
    async fn call(&mut self) -> Result<(), String> {
        let idx = self.rng.gen_range(0..self.keyspace) as usize;
        let key = keys::key(NS_KV, idx as u64);
        let mut cached = self.cache[idx].load(Ordering::Relaxed);
        if cached == 0 {
            // Not known yet: read the key's mod_revision first.
            let r = self
                .kv
                .range(RangeRequest {
                    key: key.clone(),
                    ..Default::default()
                })
                .await
                .map_err(status_text)?;
            self.reads += 1;
            cached = r.into_inner().kvs.first().map(|kv| kv.mod_revision).unwrap_or(0);
            self.cache[idx].fetch_max(cached, Ordering::Relaxed);
        }
        let txn = TxnRequest {
            compare: vec![Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Mod as i32,
                key: key.clone(),
                range_end: Vec::new(),
                target_union: Some(TargetUnion::ModRevision(cached)),
            }],
            success: vec![RequestOp {
                request: Some(Request::RequestPut(PutRequest {
                    key: key.clone(),
                    value: self.value.clone(),
                    ..Default::default()
                })),
            }],
            failure: vec![RequestOp {
                request: Some(Request::RequestRange(RangeRequest {
                    key,
                    ..Default::default()
                })),
            }],
        };
        let r = self.kv.txn(txn).await.map_err(status_text)?.into_inner();
        if r.succeeded {
            self.cache[idx].fetch_max(r.header.map(|h| h.revision).unwrap_or(0), Ordering::Relaxed);
        } else {
            self.conflicts += 1;
            let rev = match r.responses.into_iter().next().and_then(|x| x.response) {
                Some(OpResponse::ResponseRange(rr)) => rr.kvs.first().map(|kv| kv.mod_revision).unwrap_or(0),
                _ => 0,
            };
            self.cache[idx].fetch_max(rev, Ordering::Relaxed);
        }
        Ok(())
    }
    fn extras(&self) -> Vec<(&'static str, u64)> {
        vec![("conflicts", self.conflicts), ("reads", self.reads)]
    }
}

struct LeaseOp {
    lease: LeaseClient<Conn>,
    tx: mpsc::Sender<LeaseKeepAliveRequest>,
    rx: Streaming<LeaseKeepAliveResponse>,
    /// `Some(id)`: keep this one lease alive (lease-keepalive); `None`: grant a new lease per op.
    fixed: Option<i64>,
}

impl LeaseOp {
    /// Grants a first lease and opens the keep-alive stream with it: gRPC servers may send the
    /// stream's headers only with the first response, so the stream opens with a request.
    async fn open(mut lease: LeaseClient<Conn>, keep_first: bool) -> Result<LeaseOp> {
        let g = lease
            .lease_grant(LeaseGrantRequest { ttl: 60, id: 0 })
            .await?
            .into_inner();
        if !g.error.is_empty() {
            bail!("lease grant: {}", g.error);
        }
        let (tx, rx_req) = mpsc::channel(4);
        tx.send(LeaseKeepAliveRequest { id: g.id })
            .await
            .map_err(|_| anyhow!("keep-alive channel closed"))?;
        let mut rx = lease.lease_keep_alive(ReceiverStream::new(rx_req)).await?.into_inner();
        let first = rx
            .message()
            .await?
            .ok_or_else(|| anyhow!("keep-alive stream ended before its first answer"))?;
        if first.id != g.id || first.ttl <= 0 {
            bail!(
                "first keep-alive answered id {} ttl {} for lease {}",
                first.id,
                first.ttl,
                g.id
            );
        }
        Ok(LeaseOp {
            lease,
            tx,
            rx,
            fixed: keep_first.then_some(g.id),
        })
    }
}

impl Op for LeaseOp {
    async fn call(&mut self) -> Result<(), String> {
        let id = match self.fixed {
            Some(id) => id,
            None => {
                let g = self
                    .lease
                    .lease_grant(LeaseGrantRequest { ttl: 60, id: 0 })
                    .await
                    .map_err(status_text)?
                    .into_inner();
                if !g.error.is_empty() {
                    return Err(format!("lease grant: {}", g.error));
                }
                g.id
            }
        };
        self.tx
            .send(LeaseKeepAliveRequest { id })
            .await
            .map_err(|_| "keep-alive stream closed".to_string())?;
        match self.rx.message().await {
            Ok(Some(r)) if r.id == id && r.ttl > 0 => Ok(()),
            Ok(Some(r)) => Err(format!("keep-alive answered id {} ttl {} for lease {id}", r.id, r.ttl)),
            Ok(None) => Err("keep-alive stream ended".into()),
            Err(s) => Err(status_text(s)),
        }
    }
}

struct ListOp {
    kv: KvClient<Conn>,
    count: bool,
}

impl Op for ListOp {
    async fn call(&mut self) -> Result<(), String> {
        if self.count {
            let r = self
                .kv
                .range(RangeRequest {
                    key: vec![0],
                    range_end: vec![0],
                    count_only: true,
                    ..Default::default()
                })
                .await
                .map_err(status_text)?
                .into_inner();
            if (r.count as u64) < LIST_TOTAL_KEYS {
                return Err(format!(
                    "count_only returned {}, expected at least {LIST_TOTAL_KEYS}",
                    r.count
                ));
            }
        } else {
            let (key, range_end) = keys::namespace_range(NS_LIST);
            let r = self
                .kv
                .range(RangeRequest {
                    key,
                    range_end,
                    limit: LIST_LIMIT,
                    ..Default::default()
                })
                .await
                .map_err(status_text)?
                .into_inner();
            if r.kvs.len() as i64 != LIST_LIMIT || !r.more {
                return Err(format!(
                    "list returned {} keys (more={}), expected {LIST_LIMIT}",
                    r.kvs.len(),
                    r.more
                ));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Preloading

async fn count_namespace(ch: &Conn, ns: u8) -> Result<u64> {
    let (key, range_end) = keys::namespace_range(ns);
    let r = ch.kv()
        .range(RangeRequest {
            key,
            range_end,
            count_only: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(r.count as u64)
}

/// Writes keys `0..n` of namespace `ns` (unless all are there already) in txns of 100 puts,
/// 8 txns in flight.
async fn preload_namespace(channels: &[Conn], ns: u8, n: u64) -> Result<()> {
    if count_namespace(&channels[0], ns).await? >= n {
        return Ok(());
    }
    const BATCH: u64 = 100;
    const IN_FLIGHT: usize = 8;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut set: JoinSet<Result<()>> = JoinSet::new();
    let mut next = 0u64;
    let mut i = 0usize;
    while next < n || !set.is_empty() {
        while next < n && set.len() < IN_FLIGHT {
            let end = (next + BATCH).min(n);
            let mut kv = channels[i % channels.len()].kv();
            i += 1;
            let range = next..end;
            set.spawn(async move {
                let success = range
                    .map(|j| RequestOp {
                        request: Some(Request::RequestPut(PutRequest {
                            key: keys::key(ns, j),
                            value: keys::value(j),
                            ..Default::default()
                        })),
                    })
                    .collect();
                kv.txn(TxnRequest {
                    compare: vec![],
                    success,
                    failure: vec![],
                })
                .await?;
                Ok(())
            });
            next = end;
        }
        if Instant::now() > deadline {
            bail!("preload of {n} keys took more than 300 s");
        }
        if let Some(r) = set.join_next().await {
            r?.context("preload txn")?;
        }
    }
    let have = count_namespace(&channels[0], ns).await?;
    if have < n {
        bail!("preload: {have} of {n} keys present afterwards");
    }
    Ok(())
}

/// The list data set: 10k keys under the listed prefix and 90k others.
async fn preload_list_data(channels: &[Conn]) -> Result<()> {
    preload_namespace(channels, NS_LIST, LIST_PREFIX_KEYS).await?;
    preload_namespace(channels, NS_OTHER, LIST_TOTAL_KEYS - LIST_PREFIX_KEYS).await
}

/// Each key's current mod_revision, by index (keys-only range over the namespace).
async fn mod_revisions(ch: &Conn, ns: u8, n: u64) -> Result<Vec<i64>> {
    let (key, range_end) = keys::namespace_range(ns);
    let r = ch.kv()
        .max_decoding_message_size(256 << 20)
        .range(RangeRequest {
            key,
            range_end,
            keys_only: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut out = vec![0i64; n as usize];
    for kv in r.kvs {
        if let Some(idx) = std::str::from_utf8(&kv.key[1..])
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        {
            if idx < n {
                out[idx as usize] = kv.mod_revision;
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Watch workloads

/// Arrival times of events: (mod_revision, nanoseconds since the run's start).
type Arrivals = Vec<(i64, u64)>;

struct WatchStream {
    /// Kept so the request side stays open (etcd ends the watch when it closes).
    tx: mpsc::Sender<WatchRequest>,
    rx: Streaming<WatchResponse>,
}

async fn open_watch_stream(ch: Conn, watchers: usize) -> Result<WatchStream> {
    let (tx, rx_req) = mpsc::channel(watchers + 4);
    let (key, range_end) = keys::namespace_range(NS_WATCH);
    for _ in 0..watchers {
        tx.send(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: key.clone(),
                range_end: range_end.clone(),
                ..Default::default()
            })),
        })
        .await
        .map_err(|_| anyhow!("watch request channel closed"))?;
    }
    let mut rx = ch.watch()
        .watch(ReceiverStream::new(rx_req))
        .await?
        .into_inner();
    let mut created = 0;
    while created < watchers {
        let m = tokio::time::timeout(Duration::from_secs(30), rx.message())
            .await
            .map_err(|_| anyhow!("watch creation timed out ({created} of {watchers} created)"))??
            .ok_or_else(|| anyhow!("watch stream ended during creation"))?;
        if m.canceled {
            bail!("watch canceled: {}", m.cancel_reason);
        }
        if m.created {
            created += 1;
        }
    }
    Ok(WatchStream { tx, rx })
}

/// Watchers on the watch namespace over `streams` streams (one connection each), writers putting
/// into it closed-loop (`rate == None`) or paced at `rate` puts/s in total. Reports events/s
/// delivered and the lag from each put's response to each event's arrival.
async fn watch_run(
    p: &Params,
    channels: &[Conn],
    watchers: usize,
    streams: usize,
    rate: Option<u64>,
) -> Result<Outcome> {
    let watch_channels = connect(&p.endpoints, streams).await?;
    let mut opened = Vec::with_capacity(streams);
    for (s, ch) in watch_channels.into_iter().enumerate() {
        let n = watchers / streams + usize::from(s < watchers % streams);
        opened.push(open_watch_stream(ch, n).await?);
    }

    let cpu0 = p.server_pid.and_then(cpu_time);
    let store0 = tree_cpu_time(&p.store_pids);
    let start = Instant::now();
    let received = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut readers = JoinSet::new();
    for ws in opened {
        let received = received.clone();
        let mut stop_rx = stop_rx.clone();
        readers.spawn(async move {
            let WatchStream { tx, mut rx } = ws;
            let mut arrivals: Arrivals = Vec::new();
            let mut error: Option<String> = None;
            loop {
                tokio::select! {
                    _ = stop_rx.changed() => break,
                    m = rx.message() => match m {
                        Ok(Some(r)) => {
                            let now = start.elapsed().as_nanos() as u64;
                            if r.canceled {
                                error = Some(format!("watch canceled: {}", r.cancel_reason));
                                break;
                            }
                            let n = r.events.len() as u64;
                            arrivals.extend(r.events.iter().filter_map(|e| e.kv.as_ref()).map(|kv| (kv.mod_revision, now)));
                            received.fetch_add(n, Ordering::Relaxed);
                        }
                        Ok(None) => { error = Some("watch stream ended".into()); break; }
                        Err(s) => { error = Some(status_text(s)); break; }
                    }
                }
            }
            drop(tx);
            (arrivals, error)
        });
    }

    // Writers.
    let deadline = start + p.duration;
    let period = rate.map(|r| Duration::from_secs_f64(p.clients as f64 / r as f64));
    let mut writers = JoinSet::new();
    for i in 0..p.clients {
        let mut kv = channels[i % channels.len()].kv();
        let seed = p.seed.wrapping_add(i as u64);
        let keyspace = p.keyspace;
        let max_ops = p.max_ops_per_client;
        let offset = period.map(|per| per.mul_f64(i as f64 / p.clients as f64));
        writers.spawn(async move {
            let mut rng = SmallRng::seed_from_u64(seed);
            let value = keys::value(seed);
            let mut st = ClientStats::new();
            let mut done: Arrivals = Vec::new();
            let mut next = offset.map(|o| start + o);
            while Instant::now() < deadline && st.ops + st.errors < max_ops {
                if let (Some(at), Some(per)) = (next.as_mut(), period) {
                    if *at >= deadline {
                        break;
                    }
                    tokio::time::sleep_until((*at).into()).await;
                    *at += per;
                }
                let key = keys::key(NS_WATCH, rng.gen_range(0..keyspace));
                let t = Instant::now();
                match tokio::time::timeout(
                    OP_TIMEOUT,
                    kv.put(PutRequest {
                        key,
                        value: value.clone(),
                        ..Default::default()
                    }),
                )
                .await
                {
                    Ok(Ok(r)) => {
                        report::record(&mut st.hist, t.elapsed());
                        st.ops += 1;
                        let rev = r.into_inner().header.map(|h| h.revision).unwrap_or(0);
                        done.push((rev, start.elapsed().as_nanos() as u64));
                    }
                    Ok(Err(s)) => {
                        st.error(status_text(s));
                        tokio::time::sleep(ERROR_BACKOFF).await;
                    }
                    Err(_) => st.error(format!("put timed out after {OP_TIMEOUT:?}")),
                }
            }
            (st, done)
        });
    }
    let mut puts = ClientStats::new();
    let mut put_times: HashMap<i64, u64> = HashMap::new();
    while let Some(r) = writers.join_next().await {
        let (st, done) = r?;
        puts.merge(st);
        put_times.extend(done);
    }
    let write_secs = start.elapsed().as_secs_f64();
    let expected = puts.ops * watchers as u64;

    // Let the watchers catch up, bounded.
    let drain_deadline = Instant::now() + p.drain_timeout;
    while received.load(Ordering::Relaxed) < expected && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop_tx.send(true);
    let server_cpu = cpu_since(p.server_pid, cpu0);
    let store_cpu = tree_cpu_since(&p.store_pids, store0);

    let mut lag = report::new_histogram();
    let mut events = 0u64;
    let mut last_arrival = 0u64;
    let mut errors = puts.errors;
    let mut first_error = puts.first_error.clone();
    while let Some(r) = readers.join_next().await {
        let (arrivals, error) = r?;
        if let Some(e) = error {
            errors += 1;
            first_error.get_or_insert(e);
        }
        for (rev, at) in arrivals {
            if let Some(&sent) = put_times.get(&rev) {
                events += 1;
                last_arrival = last_arrival.max(at);
                report::record(&mut lag, Duration::from_nanos(at.saturating_sub(sent)));
            }
        }
    }
    let undelivered = expected.saturating_sub(events);
    let note = format!(
        "watchers={watchers} streams={streams} puts={} puts/s={:.0} put_p50_ms={} put_p99_ms={} undelivered={undelivered}",
        puts.ops,
        puts.ops as f64 / write_secs,
        report::fmt_ms(report::quantile_ms(&puts.hist, 0.5)),
        report::fmt_ms(report::quantile_ms(&puts.hist, 0.99)),
    );
    Ok(Outcome {
        workload: String::new(),
        clients: 0,
        conns: 0,
        ops: events,
        elapsed: Duration::from_nanos(last_arrival.max(1)),
        hist: lag,
        errors,
        peak_rss_kb: None,
        server_cpu,
        store_cpu,
        note,
        first_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_names_round_trip() {
        for w in Workload::ALL {
            assert_eq!(Workload::parse(w.name()), Ok(w));
        }
        assert!(Workload::parse("nope").is_err());
    }

    #[test]
    fn vm_hwm_parses() {
        let status = "Name:\tetcd\nVmPeak:\t  900000 kB\nVmHWM:\t   56320 kB\nVmRSS:\t   50000 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(56320));
        assert_eq!(parse_vm_hwm("Name: x\n"), None);
        // Our own process has one.
        assert!(peak_rss_kb(std::process::id()).unwrap() > 0);
    }

    #[test]
    fn cpu_ticks_parse() {
        let stat = "1234 (etcd (x) y) S 1 2 3 4 5 6 7 8 9 10 250 30 7 5 20 0 12 0 99";
        assert_eq!(parse_stat(stat), Some((1, 280, 292)));
        assert!(cpu_time(std::process::id()).is_some());
    }

    #[test]
    fn a_process_tree_counts_its_children() {
        assert_eq!(tree_cpu_time(&[]), None);
        // This test process as the root: a busy child's CPU shows up in the tree's time and
        // not in the root's own.
        let me = std::process::id();
        let before = tree_cpu_time(&[me]).unwrap();
        let own_before = cpu_time(me).unwrap();
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        // The child spins until killed; wait (bounded) until its CPU shows in the tree.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let (tree, own) = loop {
            std::thread::sleep(Duration::from_millis(100));
            let tree = tree_cpu_time(&[me]).unwrap() - before;
            let own = cpu_time(me).unwrap() - own_before;
            if tree >= own + Duration::from_millis(200) || std::time::Instant::now() > deadline {
                break (tree, own);
            }
        };
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(tree >= own + Duration::from_millis(200), "tree {tree:?} own {own:?}");
        // Once reaped, the child's time stays in the tree (the root's cutime/cstime).
        assert!(tree_cpu_time(&[me]).unwrap() - before >= tree);
    }

    #[test]
    fn conns_default_to_min_clients_16() {
        assert_eq!(default_conns(1), 1);
        assert_eq!(default_conns(16), 16);
        assert_eq!(default_conns(256), 16);
    }
}
