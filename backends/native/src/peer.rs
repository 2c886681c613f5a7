//! The peer protocol between members of a native cluster (`proto/peer.proto`).
//!
//! - [`Peers`]: one lazily connected gRPC channel per member, plain or TLS, shared by raft's
//!   network ([`crate::network`]) and by [`Peers::call`].
//! - [`PeerService`]: the server side, which the frontend serves on --listen-peer-urls.
//!
//! Frames carry postcard-encoded Rust values: openraft's RPC types, or [`PeerRequest`] /
//! [`PeerResponse`] for what a member asks of the leader on a client's behalf.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use cairn_backend::{BackendError, LeaseId, LeaseInfo, MemberChange};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::proposer::NOT_LEADER;
use crate::types::{Command, CommandResult, Raft};

pub mod proto {
    tonic::include_proto!("cairn.peer");
}

use proto::peer_client::PeerClient;
use proto::peer_server::{Peer, PeerServer};
use proto::Frame;

/// What a member asks of the leader.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum PeerRequest {
    /// Propose a command; the answer names the log index it was applied at, so the asking
    /// member can wait until it applied it too.
    Propose(Command),
    /// The leader's read index (openraft's read log id), after it confirmed its leadership.
    ReadIndex,
    KeepAlive(LeaseId),
    TimeToLive {
        id: LeaseId,
        keys: bool,
    },
    /// A membership change, made by the leader.
    Member(MemberChange),
    /// Which member has this peer URL, and which cluster is this (asked by a member that
    /// starts with --initial-cluster-state existing). Any member answers.
    Whois {
        peer_url: String,
    },
    /// Enable or disable this member's election timer (during a leadership transfer).
    SetElect(bool),
    /// Start an election now (the transferee of a leadership transfer).
    Campaign,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum PeerResponse {
    Proposed {
        result: CommandResult,
        index: u64,
    },
    ReadIndex(u64),
    KeepAlive(i64),
    TimeToLive(LeaseInfo),
    Done,
    Whois {
        member_id: Option<u64>,
        cluster_id: u64,
    },
    Err(BackendError),
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Result<Frame, Status> {
    postcard::to_allocvec(v)
        .map(|data| Frame { data })
        .map_err(|e| Status::internal(format!("encoding a peer frame: {e}")))
}

pub(crate) fn decode<T: DeserializeOwned>(f: &Frame) -> Result<T, Status> {
    postcard::from_bytes(&f.data)
        .map_err(|e| Status::invalid_argument(format!("decoding a peer frame: {e}")))
}

/// How long one peer RPC may take (an install-snapshot chunk included).
pub(crate) const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// Each member's peer URL and client.
type Clients = HashMap<u64, (String, PeerClient<Channel>)>;

/// Channels to the other members, by member ID.
#[derive(Clone)]
pub struct Peers {
    inner: Arc<parking_lot::Mutex<Clients>>,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Members this one does not talk to (fault injection: a partition is every member of one
    /// side blocking every member of the other).
    blocked: Arc<parking_lot::RwLock<std::collections::HashSet<u64>>>,
}

impl Peers {
    pub fn new(tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        Self {
            inner: Default::default(),
            tls,
            blocked: Default::default(),
        }
    }

    /// Fault injection for tests: stop (or resume) sending anything to member `id`, as if the
    /// network between the two were cut. Every call fails before it is sent.
    pub fn set_blocked(&self, id: u64, blocked: bool) {
        let mut b = self.blocked.write();
        if blocked {
            b.insert(id);
        } else {
            b.remove(&id);
        }
    }

    /// The client for member `id` at `addr` (its first peer URL); reconnects when the URL
    /// changed.
    pub fn client(&self, id: u64, addr: &str) -> Result<PeerClient<Channel>, BackendError> {
        if self.blocked.read().contains(&id) {
            return Err(BackendError::Unavailable(NOT_LEADER.into()));
        }
        let mut m = self.inner.lock();
        if let Some((a, c)) = m.get(&id) {
            if a == addr {
                return Ok(c.clone());
            }
        }
        let c = PeerClient::new(self.channel(addr)?)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        m.insert(id, (addr.to_string(), c.clone()));
        Ok(c)
    }

    fn channel(&self, url: &str) -> Result<Channel, BackendError> {
        let bad =
            |e: &dyn std::fmt::Display| BackendError::Internal(format!("peer URL {url}: {e}"));
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad(&"no scheme"))?;
        let tls = match scheme {
            "http" => None,
            "https" => Some(self.tls.clone().ok_or_else(|| {
                bad(&"https peer URL without peer TLS settings (--peer-auto-tls or --peer-cert-file)")
            })?),
            other => return Err(bad(&format!("unsupported scheme {other}"))),
        };
        let endpoint = Endpoint::from_shared(format!("http://{rest}"))
            .map_err(|e| bad(&e))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        Ok(match tls {
            None => endpoint.connect_lazy(),
            Some(cfg) => endpoint.connect_with_connector_lazy(tls_connector(cfg)),
        })
    }

    /// Sends `req` to member `id`.
    pub async fn call(
        &self,
        id: u64,
        addr: &str,
        req: &PeerRequest,
    ) -> Result<PeerResponse, BackendError> {
        let mut c = self.client(id, addr)?;
        let frame = encode(req).map_err(|s| BackendError::Internal(s.message().to_string()))?;
        let mut r = Request::new(frame);
        r.set_timeout(RPC_TIMEOUT);
        let resp = c.call(r).await.map_err(|s| {
            if never_sent(&s) {
                // Safe to send again, to whoever leads by then.
                tracing::debug!(peer = %format!("{id:x}"), error = %s, "peer unreachable");
                BackendError::Unavailable(NOT_LEADER.into())
            } else {
                BackendError::Unavailable(format!("peer {id:x}: {}", s.message()))
            }
        })?;
        decode(resp.get_ref()).map_err(|s| BackendError::Internal(s.message().to_string()))
    }
}

/// Whether a failed call certainly never reached the peer's handler (no connection could be
/// made), so that a write may be sent again without the risk of applying it twice.
fn never_sent(s: &Status) -> bool {
    let msg = s.message();
    (s.code() == tonic::Code::Unknown && msg.starts_with("Service was not ready"))
        || msg.contains("tcp connect error")
        || msg.contains("Connection refused")
}

/// Dials TCP and wraps it in TLS with `cfg`; the server name is the URL's host.
fn tls_connector(
    cfg: Arc<rustls::ClientConfig>,
) -> impl tower::Service<
    http::Uri,
    Response = hyper_util::rt::TokioIo<PeerTls>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
       + Send {
    tower::service_fn(move |uri: http::Uri| {
        let cfg = cfg.clone();
        async move {
            let host = uri
                .host()
                .unwrap_or("localhost")
                .trim_matches(['[', ']'])
                .to_string();
            let port = uri.port_u16().unwrap_or(2380);
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let addr = format!("{host}:{port}");
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .map_err(|e| {
                    let e = go_tls_error(e);
                    warn_throttled(&addr, &e);
                    e
                })?;
            Ok(hyper_util::rt::TokioIo::new(PeerTls { inner: tls, addr }))
        }
    })
}

/// A TLS connection to a peer. With TLS 1.3 the peer refuses a client certificate only after
/// the client finished its handshake, so the alert arrives on the first read: it is reported
/// (and logged) there, in Go's words.
pub struct PeerTls {
    inner: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    addr: String,
}

impl tokio::io::AsyncRead for PeerTls {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match std::pin::Pin::new(&mut self.inner).poll_read(cx, buf) {
            std::task::Poll::Ready(Err(e)) => {
                let e = go_tls_error(e);
                warn_throttled(&self.addr, &e);
                std::task::Poll::Ready(Err(e))
            }
            other => other,
        }
    }
}

impl tokio::io::AsyncWrite for PeerTls {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A TLS alert from the peer, worded as Go reports it ("remote error: tls: bad certificate"),
/// so operators (and etcd's tests) see etcd's message.
fn go_tls_error(e: std::io::Error) -> std::io::Error {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::AlertReceived(alert)) => {
            std::io::Error::new(e.kind(), go_remote_error(alert))
        }
        _ => e,
    }
}

/// A TLS alert received from the other side, in Go's words ("remote error: tls: bad
/// certificate"), which etcd's users (and tests) look for in logs.
pub fn go_remote_error(alert: &rustls::AlertDescription) -> String {
    use rustls::AlertDescription as A;
    let what = match alert {
        A::BadCertificate => "bad certificate".to_string(),
        A::UnknownCA => "unknown certificate authority".to_string(),
        A::CertificateExpired => "expired certificate".to_string(),
        A::CertificateRevoked => "revoked certificate".to_string(),
        A::HandshakeFailure => "handshake failure".to_string(),
        A::AccessDenied => "access denied".to_string(),
        A::CertificateRequired => "certificate required".to_string(),
        other => format!("{other:?}").to_lowercase(),
    };
    format!("remote error: tls: {what}")
}

/// Logs a failed peer connection at most once a second per peer address.
pub(crate) fn warn_throttled(addr: &str, e: &dyn std::fmt::Display) {
    static LAST: parking_lot::Mutex<Option<HashMap<String, std::time::Instant>>> =
        parking_lot::Mutex::new(None);
    let mut last = LAST.lock();
    let m = last.get_or_insert_with(HashMap::new);
    let now = std::time::Instant::now();
    if m.get(addr)
        .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(1))
    {
        return;
    }
    m.insert(addr.to_string(), now);
    tracing::warn!(peer = %addr, error = %e, "peer connection failed");
}

/// What the peer service needs from the member it runs in.
#[async_trait::async_trait]
pub(crate) trait Leader: Send + Sync + 'static {
    /// Answers a request from another member (this member is expected to lead).
    async fn serve(&self, req: PeerRequest) -> PeerResponse;
}

/// The server side of the peer protocol.
pub struct PeerService {
    raft: Raft,
    leader: Weak<dyn Leader>,
}

impl PeerService {
    pub(crate) fn new(raft: Raft, leader: Weak<dyn Leader>) -> PeerServer<PeerService> {
        PeerServer::new(PeerService { raft, leader })
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }
}

fn raft_status(e: impl std::fmt::Display) -> Status {
    Status::unavailable(e.to_string())
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn append_entries(&self, r: Request<Frame>) -> Result<Response<Frame>, Status> {
        let req = decode(r.get_ref())?;
        let resp = self.raft.append_entries(req).await.map_err(raft_status)?;
        Ok(Response::new(encode(&resp)?))
    }

    async fn vote(&self, r: Request<Frame>) -> Result<Response<Frame>, Status> {
        let req = decode(r.get_ref())?;
        let resp = self.raft.vote(req).await.map_err(raft_status)?;
        Ok(Response::new(encode(&resp)?))
    }

    async fn install_snapshot(&self, r: Request<Frame>) -> Result<Response<Frame>, Status> {
        let req = decode(r.get_ref())?;
        let resp = self.raft.install_snapshot(req).await.map_err(raft_status)?;
        Ok(Response::new(encode(&resp)?))
    }

    async fn call(&self, r: Request<Frame>) -> Result<Response<Frame>, Status> {
        let req: PeerRequest = decode(r.get_ref())?;
        let resp = match self.leader.upgrade() {
            Some(leader) => leader.serve(req).await,
            // Stopping: it leads nothing any more, and did nothing with the request.
            None => PeerResponse::Err(BackendError::Unavailable(NOT_LEADER.into())),
        };
        Ok(Response::new(encode(&resp)?))
    }
}
