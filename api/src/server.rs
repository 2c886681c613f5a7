//! Binds the client URLs and serves etcd's gRPC services on them.
//!
//! Use [`Server::bind`] to open the listeners (port 0 works; [`Server::local_addrs`] tells
//! the ports), then [`Server::serve`] until the shutdown future resolves. [`run`] does both.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use cairn_backend::Backend;
use cairn_proto::etcdserverpb::{
    auth_server::AuthServer, cluster_server::ClusterServer, kv_server::KvServer, lease_server::LeaseServer,
    maintenance_server::MaintenanceServer, watch_server::WatchServer,
};
use cairn_proto::v3electionpb::election_server::ElectionServer;
use cairn_proto::v3lockpb::lock_server::LockServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::Routes;
use tower_layer::{Identity, Stack};

use crate::alarms::Alarms;
use crate::auth::{AuthConfig, AuthService, AuthStore, Guard};
use crate::cluster::ClusterService;
use crate::compactor::AutoCompaction;
use crate::concurrency::{ElectionService, LockService};
use crate::conn;
use crate::gateway::Gateway;
use crate::header::HeaderSource;
use crate::http::{HttpEndpointsLayer, HttpState};
use crate::kv::{KvLimits, KvService};
use crate::lease::LeaseService;
use crate::maintenance::MaintenanceService;
use crate::members::{Member, Members};
use crate::metrics::Metrics;
use crate::tls::ClientTls;
use crate::urls;
use crate::watch::{WatchConfig, WatchService};

/// gRPC framing on top of --max-request-bytes, as etcd allows for its receive limit.
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// How long open streams (watches, keep-alives) may keep the server up after shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Everything the server needs, already derived from etcd's flags by the binary.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub name: String,
    pub listen_client_urls: Vec<String>,
    pub advertise_client_urls: Vec<String>,
    pub peer_urls: Vec<String>,
    pub member_id: u64,
    pub cluster_id: u64,
    /// The etcd version reported by Maintenance.Status.
    pub version: String,
    pub max_txn_ops: usize,
    pub max_request_bytes: usize,
    /// Lease TTLs below this are raised to it (seconds).
    pub min_lease_ttl: i64,
    pub progress_notify_interval: Duration,
    pub max_concurrent_streams: Option<u32>,
    pub grpc_keepalive_interval: Duration,
    pub grpc_keepalive_timeout: Duration,
    /// TLS for https client URLs.
    pub client_tls: ClientTls,
    /// --strict-reconfig-check: refuse membership changes that could break quorum.
    pub strict_reconfig_check: bool,
    /// --auth-token, --auth-token-ttl, --bcrypt-cost.
    pub auth: AuthConfig,
    /// The members of --initial-cluster (names, peer URLs); empty: this member alone.
    pub initial_members: Vec<Member>,
    /// Publish this member's name and client URLs to the cluster before serving, as etcd does
    /// (a member of a replicated cluster; the others list it with them).
    pub publish_member: bool,
    /// The backend replicates among members of its own (native): MemberAdd and friends change
    /// its raft group, and a single node can grow into a cluster.
    pub replicated_members: bool,
    /// --listen-metrics-urls: extra listeners serving only `/metrics` and `/health`.
    pub listen_metrics_urls: Vec<String>,
    /// --auto-compaction-mode and --auto-compaction-retention (`None`: off, etcd's default).
    pub auto_compaction: Option<AutoCompaction>,
}

impl Default for ServerConfig {
    /// etcd's defaults, listening on an ephemeral port of 127.0.0.1 (handy for tests).
    fn default() -> Self {
        Self {
            name: "default".into(),
            listen_client_urls: vec!["http://127.0.0.1:0".into()],
            advertise_client_urls: vec!["http://localhost:2379".into()],
            peer_urls: vec!["http://localhost:2380".into()],
            member_id: 0x8e9e05c52164694d,
            cluster_id: 0xcdf818194e3a8c32,
            version: "3.5.17".into(),
            max_txn_ops: 128,
            max_request_bytes: 1_572_864,
            min_lease_ttl: 2,
            progress_notify_interval: Duration::from_secs(600),
            max_concurrent_streams: None,
            grpc_keepalive_interval: Duration::from_secs(2 * 3600),
            grpc_keepalive_timeout: Duration::from_secs(20),
            client_tls: ClientTls::default(),
            strict_reconfig_check: true,
            auth: AuthConfig::default(),
            initial_members: Vec::new(),
            publish_member: false,
            replicated_members: false,
            listen_metrics_urls: Vec::new(),
            auto_compaction: None,
        }
    }
}

/// A server whose listeners are bound but not yet serving.
pub struct Server {
    cfg: ServerConfig,
    backend: Arc<dyn Backend>,
    /// Each listener with its TLS configuration (for https URLs).
    listeners: Vec<(TcpListener, Option<Arc<rustls::ServerConfig>>)>,
    /// The --listen-metrics-urls listeners, likewise.
    metrics_listeners: Vec<(TcpListener, Option<Arc<rustls::ServerConfig>>)>,
    auth: Arc<AuthStore>,
}

impl Server {
    pub async fn bind(cfg: ServerConfig, backend: Arc<dyn Backend>) -> anyhow::Result<Self> {
        let tls = Self::tls_config(&cfg)?;
        let mut listeners = Vec::new();
        for url in &cfg.listen_client_urls {
            let addr = urls::bind_addr(url).map_err(anyhow::Error::msg)?;
            let l = TcpListener::bind(addr).await.with_context(|| format!("listen tcp {addr}"))?;
            let url_tls = if urls::is_tls(url) { tls.clone() } else { None };
            if url_tls.is_none() && cfg.client_tls.is_configured() {
                tracing::warn!(
                    "scheme is HTTP while key and cert files are present; ignoring key and cert files for {url}"
                );
            }
            listeners.push((l, url_tls));
        }
        anyhow::ensure!(!listeners.is_empty(), "no client URL to listen on");
        let mut metrics_listeners = Vec::new();
        for url in &cfg.listen_metrics_urls {
            let addr = urls::bind_addr(url).map_err(anyhow::Error::msg)?;
            let l = TcpListener::bind(addr).await.with_context(|| format!("listen tcp {addr}"))?;
            let url_tls = match urls::is_tls(url) {
                true => Some(cfg.client_tls.server_config(&urls::host(url).into_iter().collect::<Vec<_>>())?),
                false => None,
            };
            metrics_listeners.push((l, url_tls));
        }
        let auth_cfg = AuthConfig { client_cert_auth: cfg.client_tls.client_cert_auth, ..cfg.auth.clone() };
        let auth = AuthStore::open(backend.clone(), &auth_cfg).await?;
        Ok(Self { cfg, backend, listeners, metrics_listeners, auth })
    }

    /// The TLS configuration when any client URL is https.
    fn tls_config(cfg: &ServerConfig) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
        if !cfg.listen_client_urls.iter().any(|u| urls::is_tls(u)) {
            return Ok(None);
        }
        let hosts: Vec<String> = cfg.listen_client_urls.iter().filter_map(|u| urls::host(u)).collect();
        Ok(Some(cfg.client_tls.server_config(&hosts)?))
    }

    /// The bound addresses, in the order of --listen-client-urls.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().filter_map(|(l, _)| l.local_addr().ok()).collect()
    }

    /// Serves until `shutdown` resolves, then stops accepting and gives open streams a short
    /// grace period.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let header = HeaderSource::new(self.cfg.cluster_id, self.cfg.member_id);
        let refresher = header.start_refresh(self.backend.clone()).await;
        let auth_reloader = self.auth.spawn_reload();
        let alarms = Alarms::load(self.backend.clone()).await.context("loading alarms")?;
        let alarm_refresher = alarms.spawn_refresh(std::time::Duration::from_secs(1));
        let compactor = self.cfg.auto_compaction.map(|a| a.spawn(self.backend.clone()));
        let metrics =
            Metrics::new(self.backend.clone(), self.cfg.member_id, &self.cfg.version, major_minor(&self.cfg.version));
        let (router, http_state) = self.router(&header, alarms, metrics);
        let metrics_servers: Vec<_> = self
            .metrics_listeners
            .into_iter()
            .map(|(l, tls)| crate::http::spawn_metrics_listener(l, tls, http_state.clone()))
            .collect();
        let (conn_tx, conn_rx) = tokio::sync::mpsc::channel(64);
        let acceptors: Vec<_> =
            self.listeners.into_iter().map(|(l, tls)| conn::spawn_accept_loop(l, tls, conn_tx.clone())).collect();
        drop(conn_tx);
        let incoming = ReceiverStream::new(conn_rx);
        if self.cfg.publish_member {
            members(&self.cfg, &self.backend).publish().await.context("publishing this member to the cluster")?;
        }
        log_ready(&self.cfg, &header);
        let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
        let serving = router.serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            let _ = stopped_tx.send(());
        });
        let result = tokio::select! {
            r = serving => r.context("serving gRPC"),
            _ = async { let _ = stopped_rx.await; tokio::time::sleep(SHUTDOWN_GRACE).await } => Ok(()),
        };
        refresher.abort();
        if let Some(t) = compactor {
            t.abort();
        }
        if let Some(t) = alarm_refresher {
            t.abort();
        }
        metrics_servers.iter().for_each(|m| m.abort());
        auth_reloader.abort();
        acceptors.iter().for_each(|a| a.abort());
        result
    }

    fn router(
        &self,
        header: &HeaderSource,
        alarms: Alarms,
        metrics: Metrics,
    ) -> (tonic::transport::server::Router<Stack<HttpEndpointsLayer, Identity>>, Arc<HttpState>) {
        let cfg = &self.cfg;
        let max_decode = cfg.max_request_bytes + GRPC_OVERHEAD_BYTES;
        let backend = &self.backend;
        let limits = KvLimits { max_txn_ops: cfg.max_txn_ops, max_request_bytes: cfg.max_request_bytes };
        let guard = Guard::new(self.auth.clone(), backend.clone());
        let kv = KvService::new(backend.clone(), header.clone(), limits, alarms.clone())
            .with_auth(guard.clone())
            .with_metrics(metrics.clone());
        let lease =
            LeaseService::new(backend.clone(), header.clone(), cfg.min_lease_ttl, alarms.clone()).with_auth(guard.clone());
        let maintenance = MaintenanceService::new(backend.clone(), header.clone(), cfg.version.clone(), alarms.clone())
            .with_auth(guard.clone());
        let auth = AuthService::new(guard.clone(), backend.clone(), header.clone());
        let members = members(cfg, backend);
        let maintenance = maintenance.with_members(members.clone());
        let cluster = ClusterService::new(header.clone(), members).with_auth(guard.clone());
        let watch_cfg = WatchConfig {
            max_request_bytes: cfg.max_request_bytes,
            progress_notify_interval: cfg.progress_notify_interval,
        };
        let watch = WatchService::new(backend.clone(), header.clone(), watch_cfg).with_auth(guard.clone());
        // One set of service instances behind gRPC, the JSON gateway and Lock/Election (which
        // call KV, Lease and Watch in-process, as etcd's v3lock/v3election do).
        let kv = KvServer::new(kv).max_decoding_message_size(max_decode);
        let core = Routes::new(kv.clone())
            .add_service(WatchServer::new(watch).max_decoding_message_size(max_decode))
            .add_service(LeaseServer::new(lease).max_decoding_message_size(max_decode));
        let routes = core
            .clone()
            .add_service(MaintenanceServer::new(maintenance).max_decoding_message_size(max_decode))
            .add_service(ClusterServer::new(cluster).max_decoding_message_size(max_decode))
            .add_service(AuthServer::new(auth).max_decoding_message_size(max_decode))
            .add_service(LockServer::new(LockService::new(core.clone())).max_decoding_message_size(max_decode))
            .add_service(ElectionServer::new(ElectionService::new(core)).max_decoding_message_size(max_decode));
        let http_state = Arc::new(HttpState {
            backend: backend.clone(),
            alarms,
            version: cfg.version.clone(),
            gateway: Gateway::new(routes.clone())
                .with_stream_limit(cfg.max_concurrent_streams)
                .with_metrics(metrics.clone()),
            metrics,
            auth: self.auth.clone(),
            client_cert_auth: cfg.client_tls.client_cert_auth,
            kv,
        });
        let http = HttpEndpointsLayer::shared(http_state.clone());
        let router = tonic::transport::Server::builder()
            .max_concurrent_streams(cfg.max_concurrent_streams)
            .http2_keepalive_interval(Some(cfg.grpc_keepalive_interval))
            .http2_keepalive_timeout(Some(cfg.grpc_keepalive_timeout))
            .trace_fn(|req| tracing::debug_span!("grpc", method = %req.uri().path()))
            .accept_http1(true)
            .layer(http)
            .add_routes(routes);
        (router, http_state)
    }
}

/// The membership store, seeded with --initial-cluster.
fn members(cfg: &ServerConfig, backend: &Arc<dyn Backend>) -> Members {
    let me = Member {
        id: cfg.member_id,
        name: cfg.name.clone(),
        peer_urls: cfg.peer_urls.clone(),
        client_urls: cfg.advertise_client_urls.clone(),
        is_learner: false,
    };
    Members::new(backend.clone(), me, cfg.initial_members.clone(), cfg.strict_reconfig_check)
        .replicated(cfg.replicated_members)
}

/// etcd's two readiness lines; etcd's e2e suite waits for them before it starts a test.
fn log_ready(cfg: &ServerConfig, header: &HeaderSource) {
    tracing::info!(
        "published {{Name:{} ClientURLs:[{}]}} to cluster {:x}",
        cfg.name,
        cfg.advertise_client_urls.join(" "),
        header.cluster_id()
    );
    tracing::info!("enabled capabilities for version {}", major_minor(&cfg.version));
}

fn major_minor(version: &str) -> &str {
    match version.match_indices('.').nth(1) {
        Some((i, _)) => &version[..i],
        None => version,
    }
}

/// Binds and serves until `shutdown` resolves.
pub async fn run(
    cfg: ServerConfig,
    backend: Arc<dyn Backend>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    Server::bind(cfg, backend).await?.serve(shutdown).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn capability_version_is_major_minor() {
        assert_eq!(super::major_minor("3.5.17"), "3.5");
        assert_eq!(super::major_minor("3.6"), "3.6");
    }
}
