//! A small PD + TiKV test server for Cairn's TiKV backend.
//!
//! It speaks the real `pdpb.PD` and `tikvpb.Tikv` gRPC protocols (generated from the kvproto
//! files that ship inside the `tikv-client` crate) on one port, well enough for
//! `tikv_client::TransactionClient` with optimistic transactions: TSO, member/region/store
//! lookup (one region covering every key, one store), Percolator prewrite/commit/rollback,
//! get/batch-get/scan at a snapshot, lock resolution (CheckTxnStatus, ResolveLock,
//! TxnHeartBeat) and write conflicts. Data lives in memory as long as the [`FakeTikv`] does, so a
//! new client on the same server sees everything committed before.
//!
//! Fault injection for tests: [`FakeTikv::inject_region_errors`] makes the next requests
//! answer a region error, [`FakeTikv::set_pd_available`] takes PD down (every PD call and TSO
//! stream fails with `Unavailable`) and back up.
//!
//! Not modelled (see README.md): raft, replication and durability across the fake's own
//! restart, region splits and several stores, pessimistic transactions, async commit and 1PC,
//! pushing a lock's `min_commit_ts` from readers, GC, the raw API and coprocessor.

#![allow(clippy::all)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{Stream, StreamExt};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

#[allow(clippy::all, missing_docs, non_camel_case_types, unused_qualifications)]
pub mod proto {
    pub mod coprocessor {
        tonic::include_proto!("coprocessor");
    }
    pub mod deadlock {
        tonic::include_proto!("deadlock");
    }
    pub mod disaggregated {
        tonic::include_proto!("disaggregated");
    }
    pub mod disk_usage {
        tonic::include_proto!("disk_usage");
    }
    pub mod encryptionpb {
        tonic::include_proto!("encryptionpb");
    }
    pub mod errorpb {
        tonic::include_proto!("errorpb");
    }
    pub mod kvrpcpb {
        tonic::include_proto!("kvrpcpb");
    }
    pub mod metapb {
        tonic::include_proto!("metapb");
    }
    pub mod mpp {
        tonic::include_proto!("mpp");
    }
    pub mod pdpb {
        tonic::include_proto!("pdpb");
    }
    pub mod raft_serverpb {
        tonic::include_proto!("raft_serverpb");
    }
    pub mod replication_modepb {
        tonic::include_proto!("replication_modepb");
    }
    pub mod resource_manager {
        tonic::include_proto!("resource_manager");
    }
    pub mod tikvpb {
        tonic::include_proto!("tikvpb");
    }
    pub mod tracepb {
        tonic::include_proto!("tracepb");
    }
    pub mod eraftpb {
        tonic::include_proto!("eraftpb");
    }
}

use proto::{errorpb, kvrpcpb, metapb, pdpb, tikvpb};

const CLUSTER_ID: u64 = 0xCA12_4E;
const STORE_ID: u64 = 1;
const PEER_ID: u64 = 1;
const REGION_ID: u64 = 1;

/// A region error the fake can be told to answer with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionFault {
    /// `NotLeader` naming the (only) leader: the client updates its cache and retries.
    NotLeader,
    /// `RegionNotFound`: the client drops its cached region and asks PD again.
    RegionNotFound,
    /// `EpochNotMatch` without current regions: the client reloads the region.
    EpochNotMatch,
    /// `ServerIsBusy`: tikv-client gives this one back to the caller.
    ServerIsBusy,
}

/// A fault of the next `KvCommit` request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitFault {
    /// Answer `Unavailable` without committing anything.
    FailBeforeApply,
    /// Commit, then answer `Unavailable` (the response was "lost"): the client cannot know.
    ApplyThenFail,
}

#[derive(Clone, Debug)]
enum WriteKind {
    Put(Vec<u8>),
    Delete,
    Rollback,
    /// A committed `Op::Lock` mutation: no data change.
    Lock,
}

#[derive(Clone, Debug)]
struct Write {
    start_ts: u64,
    kind: WriteKind,
}

#[derive(Clone, Debug)]
struct Lock {
    primary: Vec<u8>,
    start_ts: u64,
    ttl: u64,
    op: i32,
    value: Vec<u8>,
    txn_size: u64,
}

#[derive(Default)]
struct Mvcc {
    /// key -> commit_ts (rollbacks: start_ts) -> write record.
    writes: BTreeMap<Vec<u8>, BTreeMap<u64, Write>>,
    locks: BTreeMap<Vec<u8>, Lock>,
}

fn physical_of(ts: u64) -> u64 {
    ts >> 18
}

impl Mvcc {
    fn lock_info(key: &[u8], l: &Lock) -> kvrpcpb::LockInfo {
        kvrpcpb::LockInfo {
            primary_lock: l.primary.clone(),
            lock_version: l.start_ts,
            key: key.to_vec(),
            lock_ttl: l.ttl,
            txn_size: l.txn_size,
            lock_type: l.op,
            ..Default::default()
        }
    }

    /// A lock that blocks a read of `key` at `ts`.
    fn blocking_lock(&self, key: &[u8], ts: u64) -> Option<kvrpcpb::LockInfo> {
        let l = self.locks.get(key)?;
        if l.start_ts <= ts && l.op != kvrpcpb::Op::Lock as i32 {
            Some(Self::lock_info(key, l))
        } else {
            None
        }
    }

    /// The value of `key` at `ts`, ignoring locks.
    fn read(&self, key: &[u8], ts: u64) -> Option<Vec<u8>> {
        let versions = self.writes.get(key)?;
        for (_, w) in versions.range(..=ts).rev() {
            match &w.kind {
                WriteKind::Put(v) => return Some(v.clone()),
                WriteKind::Delete => return None,
                WriteKind::Rollback | WriteKind::Lock => continue,
            }
        }
        None
    }

    /// The commit record of the txn that started at `start_ts` on `key`, if any.
    fn find_by_start(&self, key: &[u8], start_ts: u64) -> Option<(u64, &Write)> {
        let versions = self.writes.get(key)?;
        versions.range(start_ts..).find(|(_, w)| w.start_ts == start_ts).map(|(c, w)| (*c, w))
    }

    fn commit_key(&mut self, key: &[u8], start_ts: u64, commit_ts: u64) -> Result<(), kvrpcpb::KeyError> {
        match self.locks.get(key) {
            Some(l) if l.start_ts == start_ts => {
                let l = self.locks.remove(key).unwrap();
                let kind = match kvrpcpb::Op::try_from(l.op) {
                    Ok(kvrpcpb::Op::Put) | Ok(kvrpcpb::Op::Insert) => WriteKind::Put(l.value),
                    Ok(kvrpcpb::Op::Del) => WriteKind::Delete,
                    _ => WriteKind::Lock,
                };
                self.writes.entry(key.to_vec()).or_default().insert(commit_ts, Write { start_ts, kind });
                Ok(())
            }
            _ => match self.find_by_start(key, start_ts) {
                Some((_, w)) if !matches!(w.kind, WriteKind::Rollback) => Ok(()),
                _ => Err(kvrpcpb::KeyError {
                    abort: format!("txn {start_ts} lock not found on commit (rolled back or never prewritten)"),
                    ..Default::default()
                }),
            },
        }
    }

    fn rollback_key(&mut self, key: &[u8], start_ts: u64) -> Result<(), kvrpcpb::KeyError> {
        if let Some(l) = self.locks.get(key) {
            if l.start_ts == start_ts {
                self.locks.remove(key);
            }
        }
        match self.find_by_start(key, start_ts) {
            Some((commit_ts, w)) if !matches!(w.kind, WriteKind::Rollback) => Err(kvrpcpb::KeyError {
                abort: format!("txn {start_ts} already committed at {commit_ts}"),
                ..Default::default()
            }),
            Some(_) => Ok(()),
            None => {
                self.writes
                    .entry(key.to_vec())
                    .or_default()
                    .insert(start_ts, Write { start_ts, kind: WriteKind::Rollback });
                Ok(())
            }
        }
    }
}

impl Mvcc {
    /// TiKV's GC, done at once when PD's safe point moves: below `safe_point` only each key's
    /// newest version stays (and not even that if it is a deletion); rollback and lock records
    /// below it go.
    fn gc(&mut self, safe_point: u64) {
        self.writes.retain(|_, versions| {
            let newest_below = versions
                .range(..=safe_point)
                .rev()
                .find(|(_, w)| matches!(w.kind, WriteKind::Put(_) | WriteKind::Delete))
                .map(|(c, w)| (*c, matches!(w.kind, WriteKind::Delete)));
            versions.retain(|c, _| *c > safe_point || matches!(newest_below, Some((n, false)) if n == *c));
            !versions.is_empty()
        });
    }
}

struct Tso {
    physical: u64,
    logical: u64,
}

struct State {
    mvcc: Mutex<Mvcc>,
    tso: Mutex<Tso>,
    pd_up: AtomicBool,
    faults: Mutex<Vec<RegionFault>>,
    commit_faults: Mutex<Vec<CommitFault>>,
    kv_requests: AtomicU32,
    conflicts: AtomicU32,
    prewrites: AtomicU32,
    safe_point: Mutex<u64>,
    addr: SocketAddr,
    /// `http` or `https`, in the member URLs PD reports.
    scheme: &'static str,
}

/// A running fake PD + TiKV. Dropping it stops the server.
pub struct FakeTikv {
    state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl FakeTikv {
    /// Starts the fake on `127.0.0.1:0` inside the current tokio runtime.
    pub async fn start() -> std::io::Result<FakeTikv> {
        Self::start_on("127.0.0.1:0").await
    }

    /// Starts the fake on `addr` (`host:port`) inside the current tokio runtime.
    pub async fn start_on(addr: &str) -> std::io::Result<FakeTikv> {
        Self::start_with(addr, None).await
    }

    /// As [`FakeTikv::start_on`], serving only TLS: PD and TiKV present `tls.cert_pem`, and
    /// with `tls.client_ca_pem` refuse a client without a certificate signed by that CA.
    /// A connection whose handshake fails is closed (the client sees a TLS error, or, when it
    /// speaks plain text, a closed connection).
    pub async fn start_tls(addr: &str, tls: FakeTls) -> std::io::Result<FakeTikv> {
        let config = tls.server_config()?;
        Self::start_with(addr, Some(tokio_rustls::TlsAcceptor::from(config))).await
    }

    async fn start_with(addr: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> std::io::Result<FakeTikv> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            mvcc: Mutex::new(Mvcc::default()),
            tso: Mutex::new(Tso { physical: 0, logical: 0 }),
            pd_up: AtomicBool::new(true),
            faults: Mutex::new(Vec::new()),
            commit_faults: Mutex::new(Vec::new()),
            kv_requests: AtomicU32::new(0),
            conflicts: AtomicU32::new(0),
            prewrites: AtomicU32::new(0),
            safe_point: Mutex::new(0),
            addr,
            scheme: if tls.is_some() { "https" } else { "http" },
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let pd = pdpb::pd_server::PdServer::new(Pd(state.clone()));
        let kv = tikvpb::tikv_server::TikvServer::new(Kv(state.clone()));
        let server = tonic::transport::Server::builder().add_service(pd).add_service(kv);
        let shutdown = async {
            let _ = stopped.await;
        };
        // Without TCP_NODELAY, small gRPC frames wait for delayed ACKs (tens of ms each).
        let incoming = TcpListenerStream::new(listener).map(|s| {
            s.inspect(|s| {
                let _ = s.set_nodelay(true);
            })
        });
        match tls {
            None => {
                tokio::spawn(async move {
                    if let Err(e) = server.serve_with_incoming_shutdown(incoming, shutdown).await {
                        tracing::warn!(error = %e, "fake tikv server stopped");
                    }
                });
            }
            Some(acceptor) => {
                // Each handshake runs in its own task so a slow or failing client does not hold
                // up the others; only completed handshakes reach the gRPC server.
                let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<TlsConn>>(16);
                // The listener closes when the gRPC server stops (it drops `rx`); a handshake
                // gets 10 s.
                tokio::spawn(async move {
                    let mut incoming = incoming;
                    loop {
                        let conn = tokio::select! {
                            c = incoming.next() => c,
                            _ = tx.closed() => break,
                        };
                        let Some(conn) = conn else { break };
                        let Ok(tcp) = conn else { continue };
                        let (acceptor, tx) = (acceptor.clone(), tx.clone());
                        tokio::spawn(async move {
                            match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                                Ok(Ok(s)) => {
                                    let _ = tx.send(Ok(TlsConn(s))).await;
                                }
                                Ok(Err(e)) => tracing::debug!(error = %e, "fake tikv: TLS handshake failed"),
                                Err(_) => tracing::debug!("fake tikv: TLS handshake timed out"),
                            }
                        });
                    }
                });
                let incoming = tokio_stream::wrappers::ReceiverStream::new(rx);
                tokio::spawn(async move {
                    if let Err(e) = server.serve_with_incoming_shutdown(incoming, shutdown).await {
                        tracing::warn!(error = %e, "fake tikv server stopped");
                    }
                });
            }
        }
        Ok(FakeTikv { state, stop: Some(stop) })
    }

    /// `host:port` of both PD and TiKV.
    pub fn endpoint(&self) -> String {
        self.state.addr.to_string()
    }

    /// The next `faults.len()` KV requests answer these region errors, in order.
    pub fn inject_region_errors(&self, faults: &[RegionFault]) {
        let mut f = self.state.faults.lock();
        for fault in faults.iter().rev() {
            f.insert(0, *fault);
        }
    }

    /// The next `faults.len()` commit requests fail this way, in order.
    pub fn inject_commit_faults(&self, faults: &[CommitFault]) {
        self.state.commit_faults.lock().extend_from_slice(faults);
    }

    /// Drops the commit faults not used yet.
    pub fn clear_commit_faults(&self) {
        self.state.commit_faults.lock().clear();
    }

    /// Commit faults injected but not yet used.
    pub fn pending_commit_faults(&self) -> usize {
        self.state.commit_faults.lock().len()
    }

    /// Prewrite requests answered so far (one per transaction in a one-region cluster).
    pub fn prewrites(&self) -> u32 {
        self.state.prewrites.load(Ordering::Relaxed)
    }

    /// Write records (versions, tombstones, rollback records) stored, over every key.
    pub fn mvcc_versions(&self) -> usize {
        self.state.mvcc.lock().writes.values().map(|v| v.len()).sum()
    }

    /// PD's GC safe point (0 until a client sets one).
    pub fn gc_safe_point(&self) -> u64 {
        *self.state.safe_point.lock()
    }

    /// Write conflicts answered to prewrites so far.
    pub fn write_conflicts(&self) -> u32 {
        self.state.conflicts.load(Ordering::Relaxed)
    }

    /// Region errors injected but not yet answered.
    pub fn pending_region_errors(&self) -> usize {
        self.state.faults.lock().len()
    }

    /// Takes PD down (`false`: every PD RPC and TSO stream fails `Unavailable`) or back up.
    pub fn set_pd_available(&self, up: bool) {
        self.state.pd_up.store(up, Ordering::SeqCst);
    }

    /// KV requests served so far (for tests).
    pub fn kv_requests(&self) -> u32 {
        self.state.kv_requests.load(Ordering::Relaxed)
    }

    /// Number of locks currently held (for tests).
    pub fn lock_count(&self) -> usize {
        self.state.mvcc.lock().locks.len()
    }
}

impl Drop for FakeTikv {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// TLS settings of a fake served with [`FakeTikv::start_tls`] (PEM text).
#[derive(Clone, Debug, Default)]
pub struct FakeTls {
    /// The server certificate (chain), PEM.
    pub cert_pem: Vec<u8>,
    /// Its private key, PEM.
    pub key_pem: Vec<u8>,
    /// When set, clients must present a certificate signed by this CA (PEM).
    pub client_ca_pem: Option<Vec<u8>>,
}

impl FakeTls {
    fn server_config(&self) -> std::io::Result<Arc<rustls::ServerConfig>> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |what: &str, e: &dyn std::fmt::Display| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("fake tikv TLS: {what}: {e}"))
        };
        let certs = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("server certificate", &e))?;
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| bad("server key", &e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("protocol versions", &e))?;
        let builder = match &self.client_ca_pem {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(ca) {
                    roots.add(cert.map_err(|e| bad("client CA", &e))?).map_err(|e| bad("client CA", &e))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| bad("client verifier", &e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| bad("certificate and key", &e))?;
        // tikv-client (tonic) insists on HTTP/2 by ALPN.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// A served TLS connection (tonic needs [`tonic::transport::server::Connected`]).
struct TlsConn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl tokio::io::AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

fn region() -> metapb::Region {
    metapb::Region {
        id: REGION_ID,
        start_key: Vec::new(),
        end_key: Vec::new(),
        region_epoch: Some(metapb::RegionEpoch { conf_ver: 1, version: 1 }),
        peers: vec![peer()],
        ..Default::default()
    }
}

fn peer() -> metapb::Peer {
    metapb::Peer { id: PEER_ID, store_id: STORE_ID, ..Default::default() }
}

fn header() -> Option<pdpb::ResponseHeader> {
    Some(pdpb::ResponseHeader { cluster_id: CLUSTER_ID, error: None })
}

struct Pd(Arc<State>);

impl Pd {
    fn check(&self) -> Result<(), Status> {
        if self.0.pd_up.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(Status::unavailable("fake PD is down"))
        }
    }

    fn member(&self) -> pdpb::Member {
        pdpb::Member {
            name: "fake-pd".into(),
            member_id: 1,
            client_urls: vec![format!("{}://{}", self.0.scheme, self.0.addr)],
            peer_urls: vec![format!("{}://{}", self.0.scheme, self.0.addr)],
            ..Default::default()
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Allocates `count` timestamps; returns the last one (physical, logical).
fn allocate(state: &State, count: u64) -> (u64, u64) {
    let mut t = state.tso.lock();
    let now = now_ms();
    if now > t.physical {
        t.physical = now;
        t.logical = 0;
    }
    if t.logical + count >= 1 << 18 {
        t.physical += 1;
        t.logical = 0;
    }
    t.logical += count;
    (t.physical, t.logical)
}

type TsoStream = Pin<Box<dyn Stream<Item = Result<pdpb::TsoResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pdpb::pd_server::Pd for Pd {
    async fn get_members(
        &self,
        _r: Request<pdpb::GetMembersRequest>,
    ) -> Result<Response<pdpb::GetMembersResponse>, Status> {
        self.check()?;
        let m = self.member();
        Ok(Response::new(pdpb::GetMembersResponse {
            header: header(),
            members: vec![m.clone()],
            leader: Some(m.clone()),
            etcd_leader: Some(m),
            ..Default::default()
        }))
    }

    async fn tso(&self, r: Request<tonic::Streaming<pdpb::TsoRequest>>) -> Result<Response<TsoStream>, Status> {
        self.check()?;
        let state = self.0.clone();
        let mut incoming = r.into_inner();
        let out = async_stream_like(move |tx| async move {
            while let Some(req) = incoming.next().await {
                let req = match req {
                    Ok(r) => r,
                    Err(_) => return,
                };
                if !state.pd_up.load(Ordering::SeqCst) {
                    let _ = tx.send(Err(Status::unavailable("fake PD is down"))).await;
                    return;
                }
                let count = u64::from(req.count.max(1));
                let (physical, logical) = allocate(&state, count);
                let resp = pdpb::TsoResponse {
                    header: header(),
                    count: req.count,
                    timestamp: Some(pdpb::Timestamp {
                        physical: physical as i64,
                        logical: logical as i64,
                        suffix_bits: 0,
                    }),
                };
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(out))
    }

    async fn get_region(
        &self,
        _r: Request<pdpb::GetRegionRequest>,
    ) -> Result<Response<pdpb::GetRegionResponse>, Status> {
        self.check()?;
        Ok(Response::new(pdpb::GetRegionResponse {
            header: header(),
            region: Some(region()),
            leader: Some(peer()),
            ..Default::default()
        }))
    }

    async fn get_prev_region(
        &self,
        _r: Request<pdpb::GetRegionRequest>,
    ) -> Result<Response<pdpb::GetRegionResponse>, Status> {
        self.check()?;
        Ok(Response::new(pdpb::GetRegionResponse {
            header: header(),
            region: Some(region()),
            leader: Some(peer()),
            ..Default::default()
        }))
    }

    async fn get_region_by_id(
        &self,
        r: Request<pdpb::GetRegionByIdRequest>,
    ) -> Result<Response<pdpb::GetRegionResponse>, Status> {
        self.check()?;
        if r.get_ref().region_id != REGION_ID {
            return Ok(Response::new(pdpb::GetRegionResponse { header: header(), ..Default::default() }));
        }
        Ok(Response::new(pdpb::GetRegionResponse {
            header: header(),
            region: Some(region()),
            leader: Some(peer()),
            ..Default::default()
        }))
    }

    async fn get_store(&self, _r: Request<pdpb::GetStoreRequest>) -> Result<Response<pdpb::GetStoreResponse>, Status> {
        self.check()?;
        Ok(Response::new(pdpb::GetStoreResponse { header: header(), store: Some(self.store()), ..Default::default() }))
    }

    async fn update_gc_safe_point(
        &self,
        r: Request<pdpb::UpdateGcSafePointRequest>,
    ) -> Result<Response<pdpb::UpdateGcSafePointResponse>, Status> {
        self.check()?;
        let asked = r.get_ref().safe_point;
        let new = {
            let mut sp = self.0.safe_point.lock();
            *sp = (*sp).max(asked);
            *sp
        };
        self.0.mvcc.lock().gc(new);
        Ok(Response::new(pdpb::UpdateGcSafePointResponse { header: header(), new_safe_point: new }))
    }

    async fn get_all_stores(
        &self,
        _r: Request<pdpb::GetAllStoresRequest>,
    ) -> Result<Response<pdpb::GetAllStoresResponse>, Status> {
        self.check()?;
        Ok(Response::new(pdpb::GetAllStoresResponse { header: header(), stores: vec![self.store()] }))
    }
}

impl Pd {
    fn store(&self) -> metapb::Store {
        metapb::Store {
            id: STORE_ID,
            address: self.0.addr.to_string(),
            state: metapb::StoreState::Up as i32,
            ..Default::default()
        }
    }
}

/// A response stream fed by a task (avoids a dependency on async-stream).
fn async_stream_like<F, Fut>(f: F) -> TsoStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pdpb::TsoResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

struct Kv(Arc<State>);

impl Kv {
    /// Counts the request and takes an injected region error, if any.
    fn region_error(&self) -> Option<errorpb::Error> {
        self.0.kv_requests.fetch_add(1, Ordering::Relaxed);
        let mut faults = self.0.faults.lock();
        if faults.is_empty() {
            return None;
        }
        let fault = faults.remove(0);
        let mut e = errorpb::Error { message: format!("injected {fault:?}"), ..Default::default() };
        match fault {
            RegionFault::NotLeader => {
                e.not_leader =
                    Some(errorpb::NotLeader { region_id: REGION_ID, leader: Some(peer()), ..Default::default() })
            }
            RegionFault::RegionNotFound => e.region_not_found = Some(errorpb::RegionNotFound { region_id: REGION_ID }),
            RegionFault::EpochNotMatch => e.epoch_not_match = Some(errorpb::EpochNotMatch::default()),
            RegionFault::ServerIsBusy => {
                e.server_is_busy = Some(errorpb::ServerIsBusy { reason: "injected".into(), ..Default::default() })
            }
        }
        Some(e)
    }
}

/// The entries of `map` whose keys are in `[start, end)` (an empty `end`: no upper bound), in
/// key order, found through the tree rather than by walking every key.
fn key_range<'a, V>(
    map: &'a BTreeMap<Vec<u8>, V>,
    start: &[u8],
    end: &[u8],
) -> std::collections::btree_map::Range<'a, Vec<u8>, V> {
    use std::ops::Bound::{Excluded, Included, Unbounded};
    if end.is_empty() {
        map.range::<[u8], _>((Included(start), Unbounded))
    } else if start < end {
        map.range::<[u8], _>((Included(start), Excluded(end)))
    } else {
        map.range::<[u8], _>((Included(start), Excluded(start)))
    }
}

#[tonic::async_trait]
impl tikvpb::tikv_server::Tikv for Kv {
    async fn kv_get(&self, r: Request<kvrpcpb::GetRequest>) -> Result<Response<kvrpcpb::GetResponse>, Status> {
        let mut resp = kvrpcpb::GetResponse::default();
        if let Some(e) = self.region_error() {
            resp.region_error = Some(e);
            return Ok(Response::new(resp));
        }
        let req = r.into_inner();
        let m = self.0.mvcc.lock();
        if let Some(l) = m.blocking_lock(&req.key, req.version) {
            resp.error = Some(kvrpcpb::KeyError { locked: Some(l), ..Default::default() });
        } else {
            match m.read(&req.key, req.version) {
                Some(v) => resp.value = v,
                None => resp.not_found = true,
            }
        }
        Ok(Response::new(resp))
    }

    async fn kv_batch_get(
        &self,
        r: Request<kvrpcpb::BatchGetRequest>,
    ) -> Result<Response<kvrpcpb::BatchGetResponse>, Status> {
        let mut resp = kvrpcpb::BatchGetResponse::default();
        if let Some(e) = self.region_error() {
            resp.region_error = Some(e);
            return Ok(Response::new(resp));
        }
        let req = r.into_inner();
        let m = self.0.mvcc.lock();
        for key in req.keys {
            if let Some(l) = m.blocking_lock(&key, req.version) {
                resp.pairs.push(kvrpcpb::KvPair {
                    key,
                    error: Some(kvrpcpb::KeyError { locked: Some(l), ..Default::default() }),
                    ..Default::default()
                });
            } else if let Some(v) = m.read(&key, req.version) {
                resp.pairs.push(kvrpcpb::KvPair { key, value: v, ..Default::default() });
            }
        }
        Ok(Response::new(resp))
    }

    async fn kv_scan(&self, r: Request<kvrpcpb::ScanRequest>) -> Result<Response<kvrpcpb::ScanResponse>, Status> {
        let mut resp = kvrpcpb::ScanResponse::default();
        if let Some(e) = self.region_error() {
            resp.region_error = Some(e);
            return Ok(Response::new(resp));
        }
        let req = r.into_inner();
        let (start, end) = if req.reverse {
            (req.end_key.clone(), req.start_key.clone())
        } else {
            (req.start_key.clone(), req.end_key.clone())
        };
        let m = self.0.mvcc.lock();
        // Locks in the range that this read must wait for: report them (only them) so the
        // client resolves them and scans again.
        let locked: Vec<_> = key_range(&m.locks, &start, &end)
            .filter_map(|(k, _)| m.blocking_lock(k, req.version))
            .collect();
        if !locked.is_empty() {
            for l in locked {
                resp.pairs.push(kvrpcpb::KvPair {
                    key: l.key.clone(),
                    error: Some(kvrpcpb::KeyError { locked: Some(l), ..Default::default() }),
                    ..Default::default()
                });
            }
            return Ok(Response::new(resp));
        }
        let limit = if req.limit == 0 { usize::MAX } else { req.limit as usize };
        let in_range = key_range(&m.writes, &start, &end);
        let keys: Box<dyn Iterator<Item = (&Vec<u8>, &BTreeMap<u64, Write>)>> =
            if req.reverse { Box::new(in_range.rev()) } else { Box::new(in_range) };
        for (k, _) in keys {
            if resp.pairs.len() >= limit {
                break;
            }
            if let Some(v) = m.read(k, req.version) {
                resp.pairs.push(kvrpcpb::KvPair {
                    key: k.clone(),
                    value: if req.key_only { Vec::new() } else { v },
                    ..Default::default()
                });
            }
        }
        Ok(Response::new(resp))
    }

    async fn kv_prewrite(
        &self,
        r: Request<kvrpcpb::PrewriteRequest>,
    ) -> Result<Response<kvrpcpb::PrewriteResponse>, Status> {
        let mut resp = kvrpcpb::PrewriteResponse::default();
        if let Some(e) = self.region_error() {
            resp.region_error = Some(e);
            return Ok(Response::new(resp));
        }
        let req = r.into_inner();
        self.0.prewrites.fetch_add(1, Ordering::Relaxed);
        if req.try_one_pc || req.use_async_commit || !req.pessimistic_actions.is_empty() {
            return Err(Status::unimplemented("fake tikv: only optimistic 2PC prewrite"));
        }
        let mut m = self.0.mvcc.lock();
        // Check every mutation first; write nothing if any fails (one atomic command).
        for mu in &req.mutations {
            if let Some(l) = m.locks.get(&mu.key) {
                if l.start_ts != req.start_version {
                    resp.errors
                        .push(kvrpcpb::KeyError { locked: Some(Mvcc::lock_info(&mu.key, l)), ..Default::default() });
                }
                continue;
            }
            if let Some(versions) = m.writes.get(&mu.key) {
                if let Some((commit_ts, w)) = versions
                    .range(req.start_version..)
                    .rev()
                    .find(|(_, w)| !matches!(w.kind, WriteKind::Rollback) || w.start_ts == req.start_version)
                {
                    let self_rolled_back = w.start_ts == req.start_version;
                    self.0.conflicts.fetch_add(1, Ordering::Relaxed);
                    resp.errors.push(kvrpcpb::KeyError {
                        conflict: Some(kvrpcpb::WriteConflict {
                            start_ts: req.start_version,
                            conflict_ts: w.start_ts,
                            conflict_commit_ts: *commit_ts,
                            key: mu.key.clone(),
                            primary: req.primary_lock.clone(),
                            reason: if self_rolled_back {
                                kvrpcpb::write_conflict::Reason::SelfRolledBack as i32
                            } else {
                                kvrpcpb::write_conflict::Reason::Optimistic as i32
                            },
                        }),
                        ..Default::default()
                    });
                    continue;
                }
            }
            if mu.op == kvrpcpb::Op::Insert as i32 && m.read(&mu.key, u64::MAX).is_some() {
                resp.errors.push(kvrpcpb::KeyError {
                    already_exist: Some(kvrpcpb::AlreadyExist { key: mu.key.clone() }),
                    ..Default::default()
                });
            }
        }
        if !resp.errors.is_empty() {
            return Ok(Response::new(resp));
        }
        for mu in req.mutations {
            if matches!(kvrpcpb::Op::try_from(mu.op), Ok(kvrpcpb::Op::CheckNotExists)) {
                continue;
            }
            m.locks.insert(
                mu.key.clone(),
                Lock {
                    primary: req.primary_lock.clone(),
                    start_ts: req.start_version,
                    ttl: req.lock_ttl,
                    op: mu.op,
                    value: mu.value,
                    txn_size: req.txn_size,
                },
            );
        }
        Ok(Response::new(resp))
    }

    async fn kv_commit(&self, r: Request<kvrpcpb::CommitRequest>) -> Result<Response<kvrpcpb::CommitResponse>, Status> {
        let mut resp = kvrpcpb::CommitResponse::default();
        if let Some(e) = self.region_error() {
            resp.region_error = Some(e);
            return Ok(Response::new(resp));
        }
        let req = r.into_inner();
        let fault = {
            let mut f = self.0.commit_faults.lock();
            if f.is_empty() {
                None
            } else {
                Some(f.remove(0))
            }
        };
        if fault == Some(CommitFault::FailBeforeApply) {
            return Err(Status::unavailable("injected: commit failed before applying"));
        }
        let mut m = self.0.mvcc.lock();
        // All keys must be committable, or none is touched.
        for key in &req.keys {
            let ok = matches!(m.locks.get(key), Some(l) if l.start_ts == req.start_version)
                || matches!(m.find_by_start(key, req.start_version), Some((_, w)) if !matches!(w.kind, WriteKind::Rollback));
            if !ok {
                resp.error = Some(kvrpcpb::KeyError {
                    abort: format!(
                        "txn {} lock not found on commit (rolled back or never prewritten)",
                        req.start_version
                    ),
                    ..Default::default()
                });
                return Ok(Response::new(resp));
            }
        }
        for key in &req.keys {
            if let Err(e) = m.commit_key(key, req.start_version, req.commit_version) {
                resp.error = Some(e);
                break;
            }
        }
        if fault == Some(CommitFault::ApplyThenFail) {
            return Err(Status::unavailable("injected: commit applied, response lost"));
        }
        Ok(Response::new(resp))
    }

    async fn kv_batch_rollback(
        &self,
        r: Request<kvrpcpb::BatchRollbackRequest>,
    ) -> Result<Response<kvrpcpb::BatchRollbackResponse>, Status> {
        let mut resp = kvrpcpb::BatchRollbackResponse::default();
        if let Some(e) = self.region_error() {
            resp.region_error = Some(e);
            return Ok(Response::new(resp));
        }
        let req = r.into_inner();
        let mut m = self.0.mvcc.lock();
        for key in &req.keys {
            if let Err(e) = m.rollback_key(key, req.start_version) {
                resp.error = Some(e);
                break;
            }
        }
        Ok(Response::new(resp))
    }

    async fn kv_check_txn_status(
        &self,
        r: Request<kvrpcpb::CheckTxnStatusRequest>,
    ) -> Result<Response<kvrpcpb::CheckTxnStatusResponse>, Status> {
        let mut resp = kvrpcpb::CheckTxnStatusResponse::default();
        if let Some(e) = self.region_error() {
            resp.region_error = Some(e);
            return Ok(Response::new(resp));
        }
        let req = r.into_inner();
        let mut m = self.0.mvcc.lock();
        let key = req.primary_key.clone();
        if let Some(l) = m.locks.get(&key).filter(|l| l.start_ts == req.lock_ts).cloned() {
            if l.primary != key {
                resp.error = Some(kvrpcpb::KeyError {
                    primary_mismatch: Some(kvrpcpb::PrimaryMismatch { lock_info: Some(Mvcc::lock_info(&key, &l)) }),
                    ..Default::default()
                });
                return Ok(Response::new(resp));
            }
            if physical_of(req.current_ts) >= physical_of(l.start_ts) + l.ttl {
                let _ = m.rollback_key(&key, l.start_ts);
                resp.action = kvrpcpb::Action::TtlExpireRollback as i32;
            } else {
                resp.lock_ttl = l.ttl;
                resp.lock_info = Some(Mvcc::lock_info(&key, &l));
                resp.action = kvrpcpb::Action::NoAction as i32;
            }
            return Ok(Response::new(resp));
        }
        match m.find_by_start(&key, req.lock_ts).map(|(c, w)| (c, w.kind.clone())) {
            Some((_, WriteKind::Rollback)) => {}
            Some((commit_ts, _)) => resp.commit_version = commit_ts,
            None if req.rollback_if_not_exist => {
                let _ = m.rollback_key(&key, req.lock_ts);
                resp.action = kvrpcpb::Action::LockNotExistRollback as i32;
            }
            None => {
                resp.error = Some(kvrpcpb::KeyError {
                    txn_not_found: Some(kvrpcpb::TxnNotFound { start_ts: req.lock_ts, primary_key: key }),
                    ..Default::default()
                });
            }
        }
        Ok(Response::new(resp))
    }

    async fn kv_resolve_lock(
        &self,
        r: Request<kvrpcpb::ResolveLockRequest>,
    ) -> Result<Response<kvrpcpb::ResolveLockResponse>, Status> {
        let mut resp = kvrpcpb::ResolveLockResponse::default();
        if let Some(e) = self.region_error() {
            resp.region_error = Some(e);
            return Ok(Response::new(resp));
        }
        let req = r.into_inner();
        let mut txns: Vec<(u64, u64)> = req.txn_infos.iter().map(|t| (t.txn, t.status)).collect();
        if txns.is_empty() {
            txns.push((req.start_version, req.commit_version));
        }
        let mut m = self.0.mvcc.lock();
        for (start, commit) in txns {
            let keys: Vec<Vec<u8>> = m
                .locks
                .iter()
                .filter(|(k, l)| l.start_ts == start && (req.keys.is_empty() || req.keys.contains(k)))
                .map(|(k, _)| k.clone())
                .collect();
            for key in keys {
                let r = if commit > 0 { m.commit_key(&key, start, commit) } else { m.rollback_key(&key, start) };
                if let Err(e) = r {
                    resp.error = Some(e);
                    return Ok(Response::new(resp));
                }
            }
        }
        Ok(Response::new(resp))
    }

    async fn kv_scan_lock(
        &self,
        r: Request<kvrpcpb::ScanLockRequest>,
    ) -> Result<Response<kvrpcpb::ScanLockResponse>, Status> {
        let mut resp = kvrpcpb::ScanLockResponse::default();
        if let Some(e) = self.region_error() {
            resp.region_error = Some(e);
            return Ok(Response::new(resp));
        }
        let req = r.into_inner();
        let limit = if req.limit == 0 { usize::MAX } else { req.limit as usize };
        let m = self.0.mvcc.lock();
        resp.locks = key_range(&m.locks, &req.start_key, &req.end_key)
            .filter(|(_, l)| l.start_ts <= req.max_version)
            .take(limit)
            .map(|(k, l)| Mvcc::lock_info(k, l))
            .collect();
        Ok(Response::new(resp))
    }

    async fn kv_txn_heart_beat(
        &self,
        r: Request<kvrpcpb::TxnHeartBeatRequest>,
    ) -> Result<Response<kvrpcpb::TxnHeartBeatResponse>, Status> {
        let mut resp = kvrpcpb::TxnHeartBeatResponse::default();
        if let Some(e) = self.region_error() {
            resp.region_error = Some(e);
            return Ok(Response::new(resp));
        }
        let req = r.into_inner();
        let mut m = self.0.mvcc.lock();
        match m.locks.get_mut(&req.primary_lock) {
            Some(l) if l.start_ts == req.start_version => {
                l.ttl = l.ttl.max(req.advise_lock_ttl);
                resp.lock_ttl = l.ttl;
            }
            _ => {
                resp.error = Some(kvrpcpb::KeyError {
                    txn_not_found: Some(kvrpcpb::TxnNotFound {
                        start_ts: req.start_version,
                        primary_key: req.primary_lock,
                    }),
                    ..Default::default()
                })
            }
        }
        Ok(Response::new(resp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_range_is_start_inclusive_end_exclusive_and_empty_end_is_open() {
        let map: BTreeMap<Vec<u8>, u8> =
            [b"a".to_vec(), b"b".to_vec(), b"ba".to_vec(), b"c".to_vec()].into_iter().map(|k| (k, 0)).collect();
        let keys = |start: &[u8], end: &[u8]| -> Vec<Vec<u8>> { key_range(&map, start, end).map(|(k, _)| k.clone()).collect() };
        assert_eq!(keys(b"b", b"c"), [b"b".to_vec(), b"ba".to_vec()]);
        assert_eq!(keys(b"b", b""), [b"b".to_vec(), b"ba".to_vec(), b"c".to_vec()]);
        assert_eq!(keys(b"", b""), map.keys().cloned().collect::<Vec<_>>());
        assert_eq!(keys(b"", b"b"), [b"a".to_vec()]);
        // An empty or inverted range holds nothing (and does not panic).
        assert!(keys(b"b", b"b").is_empty());
        assert!(keys(b"c", b"a").is_empty());
        assert_eq!(key_range(&map, b"", b"c").rev().next().map(|(k, _)| k.clone()), Some(b"ba".to_vec()));
    }
}
