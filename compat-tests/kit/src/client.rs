//! Connections, request builders and small helpers shared by `check` and `diff`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use cairn_proto::etcdserverpb::auth_client::AuthClient;
use cairn_proto::etcdserverpb::cluster_client::ClusterClient;
use cairn_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use cairn_proto::etcdserverpb::kv_client::KvClient;
use cairn_proto::etcdserverpb::lease_client::LeaseClient;
use cairn_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use cairn_proto::etcdserverpb::request_op::Request as Op;
use cairn_proto::etcdserverpb::watch_client::WatchClient;
use cairn_proto::etcdserverpb::*;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Adds etcd's `token` metadata (from Authenticate) to every request when set.
#[derive(Clone, Default)]
pub struct Token(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            r.metadata_mut().insert("token", t.clone());
        }
        Ok(r)
    }
}

/// The channel every client of [`Clients`] uses: one HTTP/2 connection plus the caller's token.
pub type Ch = InterceptedService<Channel, Token>;

/// TLS settings of the kit's connections, as etcdctl's `--cacert`, `--cert`, `--key`.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    /// CA bundle that signs the server certificate (PEM).
    pub cacert: Option<PathBuf>,
    /// Client certificate (PEM), sent when the server asks for one.
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    pub fn is_empty(&self) -> bool {
        self.cacert.is_none() && self.cert.is_none() && self.key.is_none()
    }

    /// A rustls client config offering ALPN `h2` (grpc-go servers require it), trusting only
    /// `cacert`, with the client certificate when given.
    pub fn client_config(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let mut roots = rustls::RootCertStore::empty();
        if let Some(ca) = &self.cacert {
            for c in CertificateDer::pem_file_iter(ca).with_context(|| format!("reading --cacert {}", ca.display()))? {
                roots.add(c.with_context(|| format!("a certificate in {}", ca.display()))?)?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let b = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let mut cfg = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .with_context(|| format!("reading --cert {}", cert.display()))?
                    .collect::<Result<Vec<_>, _>>()?;
                let key =
                    PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading --key {}", key.display()))?;
                b.with_client_auth_cert(chain, key)?
            }
            (None, None) => b.with_no_client_auth(),
            _ => anyhow::bail!("--cert and --key go together"),
        };
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// How to reach an endpoint: its address and, for https, the TLS client settings.
#[derive(Clone)]
pub struct Target {
    pub endpoint: String,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The TLS files the config was made from (for cases that connect differently).
    pub files: TlsFiles,
    /// ALPN protocol the last TLS handshake negotiated.
    pub alpn: Arc<Mutex<Option<Vec<u8>>>>,
}

impl Target {
    /// Plain text for `host:port` and `http://`; TLS for `https://` or when TLS files are
    /// given (then `host:port` means https).
    pub fn new(endpoint: &str, files: &TlsFiles) -> anyhow::Result<Self> {
        let https = endpoint.starts_with("https://") || (!endpoint.contains("://") && !files.is_empty());
        let tls = if https { Some(files.client_config()?) } else { None };
        Ok(Self { endpoint: endpoint.to_string(), tls, files: files.clone(), alpn: Arc::default() })
    }

    pub fn plain(endpoint: &str) -> Self {
        Self { endpoint: endpoint.to_string(), tls: None, files: TlsFiles::default(), alpn: Arc::default() }
    }

    /// `host:port` of the endpoint.
    pub fn authority(&self) -> &str {
        let s = self.endpoint.split_once("://").map_or(self.endpoint.as_str(), |(_, r)| r);
        s.trim_end_matches('/')
    }
}

/// gRPC clients of one endpoint (cheap to clone: they share one HTTP/2 connection).
#[derive(Clone)]
pub struct Clients {
    pub endpoint: String,
    pub target: Target,
    channel: Channel,
    pub kv: KvClient<Ch>,
    pub watch: WatchClient<Ch>,
    pub lease: LeaseClient<Ch>,
    pub maint: MaintenanceClient<Ch>,
    pub cluster: ClusterClient<Ch>,
    pub auth: AuthClient<Ch>,
}

impl Clients {
    fn over(target: Target, channel: Channel, token: Token) -> Self {
        let ch = InterceptedService::new(channel.clone(), token);
        Clients {
            endpoint: target.endpoint.clone(),
            target,
            channel,
            kv: KvClient::new(ch.clone()),
            watch: WatchClient::new(ch.clone()),
            lease: LeaseClient::new(ch.clone()),
            maint: MaintenanceClient::new(ch.clone()),
            cluster: ClusterClient::new(ch.clone()),
            auth: AuthClient::new(ch),
        }
    }

    /// The same connection, every request carrying `token` (etcd's gRPC metadata `token`).
    pub fn with_token(&self, token: &str) -> anyhow::Result<Self> {
        let t = MetadataValue::try_from(token).context("token is not valid metadata")?;
        Ok(Self::over(self.target.clone(), self.channel.clone(), Token(Some(t))))
    }

    /// The same connection without a token.
    pub fn without_token(&self) -> Self {
        Self::over(self.target.clone(), self.channel.clone(), Token(None))
    }
}

/// Plain-text gRPC to `endpoint` (`host:port` or `http://host:port`).
pub async fn connect(endpoint: &str) -> anyhow::Result<Clients> {
    connect_to(&Target::plain(endpoint)).await
}

/// A connection to `t`, over TLS when it has a TLS config.
pub async fn connect_to(t: &Target) -> anyhow::Result<Clients> {
    let ep = Endpoint::from_shared(format!("http://{}", t.authority()))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    let ch = match &t.tls {
        None => ep.connect().await,
        Some(cfg) => ep.connect_with_connector(tls_connector(cfg.clone(), t.alpn.clone())).await,
    }
    .with_context(|| format!("connecting to {}", t.endpoint))?;
    Ok(Clients::over(t.clone(), ch, Token(None)))
}

/// Dials TCP and wraps it in TLS; the server name is the URL's host (an IP address is checked
/// against the certificate's IP SANs); records the negotiated ALPN protocol in `alpn`.
fn tls_connector(
    cfg: Arc<rustls::ClientConfig>,
    alpn: Arc<Mutex<Option<Vec<u8>>>>,
) -> impl tower::Service<
    http::Uri,
    Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
       + Send {
    tower::service_fn(move |uri: http::Uri| {
        let (cfg, alpn) = (cfg.clone(), alpn.clone());
        async move {
            let host = uri.host().unwrap_or("localhost").trim_matches(['[', ']']).to_string();
            let port = uri.port_u16().unwrap_or(2379);
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name =
                ServerName::try_from(host).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await?;
            *alpn.lock().unwrap() = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            Ok(hyper_util::rt::TokioIo::new(tls))
        }
    })
}

/// A fresh key prefix nobody else uses: `/cairn-compat/<16 hex digits>/`.
pub fn random_prefix() -> String {
    format!("/cairn-compat/{:016x}/", rand::random::<u64>())
}

/// The range end that covers every key starting with `prefix` (etcd's `GetPrefixRangeEnd`).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

pub fn put(k: impl Into<Vec<u8>>, v: impl Into<Vec<u8>>) -> PutRequest {
    PutRequest { key: k.into(), value: v.into(), ..Default::default() }
}

pub fn get(k: impl Into<Vec<u8>>) -> RangeRequest {
    RangeRequest { key: k.into(), ..Default::default() }
}

pub fn get_prefix(p: &str) -> RangeRequest {
    RangeRequest { key: p.into(), range_end: prefix_end(p.as_bytes()), ..Default::default() }
}

pub fn del(k: impl Into<Vec<u8>>) -> DeleteRangeRequest {
    DeleteRangeRequest { key: k.into(), ..Default::default() }
}

pub fn del_prefix(p: &str) -> DeleteRangeRequest {
    DeleteRangeRequest { key: p.into(), range_end: prefix_end(p.as_bytes()), ..Default::default() }
}

pub fn op_put(r: PutRequest) -> RequestOp {
    RequestOp { request: Some(Op::RequestPut(r)) }
}
pub fn op_get(r: RangeRequest) -> RequestOp {
    RequestOp { request: Some(Op::RequestRange(r)) }
}
pub fn op_del(r: DeleteRangeRequest) -> RequestOp {
    RequestOp { request: Some(Op::RequestDeleteRange(r)) }
}
pub fn op_txn(r: TxnRequest) -> RequestOp {
    RequestOp { request: Some(Op::RequestTxn(r)) }
}

/// A compare of `target` on `key` with `result`; the value goes into the target's union member.
pub fn cmp(key: impl Into<Vec<u8>>, target: CompareTarget, result: CompareResult, v: CmpVal) -> Compare {
    let union = match (target, v) {
        (CompareTarget::Value, CmpVal::Bytes(b)) => TargetUnion::Value(b),
        (CompareTarget::Version, CmpVal::Int(n)) => TargetUnion::Version(n),
        (CompareTarget::Create, CmpVal::Int(n)) => TargetUnion::CreateRevision(n),
        (CompareTarget::Mod, CmpVal::Int(n)) => TargetUnion::ModRevision(n),
        (CompareTarget::Lease, CmpVal::Int(n)) => TargetUnion::Lease(n),
        (t, v) => panic!("compare target {t:?} with {v:?}"),
    };
    Compare {
        result: result as i32,
        target: target as i32,
        key: key.into(),
        range_end: vec![],
        target_union: Some(union),
    }
}

#[derive(Debug, Clone)]
pub enum CmpVal {
    Int(i64),
    Bytes(Vec<u8>),
}

/// The revision in a response header (0 when absent).
pub fn rev(h: &Option<ResponseHeader>) -> i64 {
    h.as_ref().map_or(0, |h| h.revision)
}

/// The current revision of the endpoint, read with a one-key Range (a read takes no revision).
pub async fn current_rev(c: &mut Clients) -> anyhow::Result<i64> {
    let r = c.kv.range(get("/cairn-compat/rev-probe")).await?.into_inner();
    Ok(rev(&r.header))
}

pub fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A bidirectional stream whose response headers may only come with the first response: etcd
/// (grpc-go) sends nothing until it has something to say, so the call runs in a task and the
/// first read waits for it.
struct Bidi<Resp> {
    pending: Option<tokio::task::JoinHandle<Result<tonic::Response<tonic::Streaming<Resp>>, tonic::Status>>>,
    rx: Option<tonic::Streaming<Resp>>,
}

impl<Resp: Send + 'static> Bidi<Resp> {
    /// The next message, `None` when nothing arrives within `wait`.
    async fn next(&mut self, wait: Duration) -> anyhow::Result<Option<Resp>> {
        let fut = async {
            if let Some(h) = self.pending.as_mut() {
                let r = h.await?;
                self.pending = None;
                self.rx = Some(r?.into_inner());
            }
            let rx = self.rx.as_mut().ok_or_else(|| anyhow::anyhow!("stream failed to open"))?;
            rx.message().await?.ok_or_else(|| anyhow::anyhow!("stream ended"))
        };
        match tokio::time::timeout(wait, fut).await {
            Err(_) => Ok(None),
            Ok(r) => Ok(Some(r?)),
        }
    }
}

/// One bidirectional Watch stream.
pub struct WatchStream {
    tx: tokio::sync::mpsc::Sender<WatchRequest>,
    rx: Bidi<WatchResponse>,
}

impl WatchStream {
    pub async fn open(c: &mut Clients) -> anyhow::Result<Self> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let mut client = c.watch.clone();
        let h = tokio::spawn(async move { client.watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
        Ok(Self { tx, rx: Bidi { pending: Some(h), rx: None } })
    }

    pub async fn send(&self, r: watch_request::RequestUnion) -> anyhow::Result<()> {
        self.tx.send(WatchRequest { request_union: Some(r) }).await.map_err(|_| anyhow::anyhow!("watch stream closed"))
    }

    pub async fn create(&self, r: WatchCreateRequest) -> anyhow::Result<()> {
        self.send(watch_request::RequestUnion::CreateRequest(r)).await
    }

    /// The next response, `None` when nothing arrives within `wait`.
    pub async fn next(&mut self, wait: Duration) -> anyhow::Result<Option<WatchResponse>> {
        self.rx.next(wait).await
    }

    /// Responses until `n` events were seen in total (or `wait` passed without a response).
    pub async fn events(&mut self, n: usize, wait: Duration) -> anyhow::Result<Vec<cairn_proto::mvccpb::Event>> {
        let mut out = Vec::new();
        while out.len() < n {
            match self.next(wait).await? {
                Some(r) => out.extend(r.events),
                None => break,
            }
        }
        Ok(out)
    }
}

/// One bidirectional LeaseKeepAlive stream.
pub struct KeepAlive {
    tx: tokio::sync::mpsc::Sender<LeaseKeepAliveRequest>,
    rx: Bidi<LeaseKeepAliveResponse>,
}

impl KeepAlive {
    pub async fn open(c: &mut Clients) -> anyhow::Result<Self> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let mut client = c.lease.clone();
        let h =
            tokio::spawn(async move { client.lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
        Ok(Self { tx, rx: Bidi { pending: Some(h), rx: None } })
    }

    pub async fn ping(&mut self, id: i64) -> anyhow::Result<LeaseKeepAliveResponse> {
        self.tx.send(LeaseKeepAliveRequest { id }).await.map_err(|_| anyhow::anyhow!("keep-alive stream closed"))?;
        self.rx.next(Duration::from_secs(5)).await?.ok_or_else(|| anyhow::anyhow!("no keep-alive response within 5 s"))
    }
}
