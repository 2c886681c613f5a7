//! The `cairn` binary: etcd's command line in front of a Cairn backend.

mod config;
mod config_file;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use cairn_api::tls::ClientTls;
use cairn_api::members::Member;
use cairn_api::peer::PeerListeners;
use cairn_api::{ids, lease, urls, ServerConfig};
use cairn_backend::Backend;
use cairn_memory::MemoryBackend;
use cairn_native::{NativeBackend, NativeConfig};
use cairn_postgres::{PostgresBackend, PostgresOptions};
use cairn_tikv::{TikvBackend, TikvOptions, TikvTls};
use config::{split_urls, BackendKind, Flags, ParseExit};

fn main() -> ExitCode {
    let loaded = match config::parse(std::env::args_os().collect()) {
        Ok(l) => l,
        Err(ParseExit::Message { text, code }) => {
            if code == 0 {
                print!("{text}");
            } else {
                eprint!("{text}");
            }
            return ExitCode::from(code as u8);
        }
    };
    let flags = loaded.flags;
    if flags.version {
        print_version(&flags);
        return ExitCode::SUCCESS;
    }
    init_tracing(flags.log_level());
    for name in &loaded.not_implemented {
        tracing::warn!("flag --{name} is accepted but not implemented yet");
    }
    warn_unknown_env();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = runtime.block_on(serve(flags));
    // Connection tasks of clients that never hung up must not hold the process.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_version(flags: &Flags) {
    println!("etcd Version: {}", flags.cairn_version);
    println!("Git SHA: cairn-{}", env!("CARGO_PKG_VERSION"));
    println!("Go Version: none (Cairn is written in Rust)");
    println!("Go OS/Arch: {}/{}", std::env::consts::OS, go_arch());
}

fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn init_tracing(level: &str) {
    let level = match level {
        "panic" | "fatal" => "error",
        l => l,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{level},h2=warn,hyper=warn,tower=warn,openraft=off"))
    });
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false).init();
}

/// etcd warns about `ETCD_*` variables that name no flag.
fn warn_unknown_env() {
    let known: Vec<String> = <Flags as clap::CommandFactory>::command()
        .get_arguments()
        .map(|a| config::env_name(a.get_id().as_str()))
        .collect();
    for (k, v) in std::env::vars() {
        if k.starts_with("ETCD_") && k != "ETCD_UNSUPPORTED_ARCH" && !known.contains(&k) {
            tracing::warn!("unrecognized environment variable {k}={v}");
        }
    }
}

/// The members of --initial-cluster with etcd's IDs.
fn initial_members(flags: &Flags) -> anyhow::Result<Vec<Member>> {
    let parsed = ids::parse_initial_cluster(&flags.initial_cluster()).map_err(anyhow::Error::msg)?;
    Ok(parsed
        .into_iter()
        .map(|m| Member {
            id: ids::member_id(&m.peer_urls, &flags.initial_cluster_token),
            name: m.name,
            peer_urls: m.peer_urls,
            client_urls: Vec::new(),
            is_learner: false,
        })
        .collect())
}

/// A native member of a replicated cluster: more than one initial member, or joining one.
fn clustered(flags: &Flags) -> anyhow::Result<bool> {
    Ok(flags.backend == BackendKind::Native
        && (initial_members(flags)?.len() > 1 || flags.initial_cluster_state == "existing"))
}

fn server_config(flags: &Flags) -> anyhow::Result<ServerConfig> {
    let initial_cluster = flags.initial_cluster();
    let (member_id, cluster_id) =
        ids::derive_ids(&flags.name, &initial_cluster, &flags.initial_cluster_token).map_err(anyhow::Error::msg)?;
    let clustered = clustered(flags)?;
    Ok(ServerConfig {
        initial_members: if clustered { initial_members(flags)? } else { Vec::new() },
        publish_member: clustered,
        replicated_members: flags.backend == BackendKind::Native,
        name: flags.name.clone(),
        listen_client_urls: split_urls(&flags.listen_client_urls),
        advertise_client_urls: split_urls(&flags.advertise_client_urls),
        listen_metrics_urls: split_urls(&flags.listen_metrics_urls),
        auto_compaction: cairn_api::compactor::AutoCompaction::parse(
            &flags.auto_compaction_mode,
            &flags.auto_compaction_retention,
        )
        .map_err(anyhow::Error::msg)?,
        peer_urls: split_urls(&flags.initial_advertise_peer_urls),
        member_id,
        cluster_id,
        version: flags.cairn_version.clone(),
        max_txn_ops: flags.max_txn_ops as usize,
        max_request_bytes: flags.max_request_bytes as usize,
        min_lease_ttl: lease::min_lease_ttl(flags.heartbeat_interval, flags.election_timeout),
        progress_notify_interval: flags.experimental_watch_progress_notify_interval,
        max_concurrent_streams: (flags.max_concurrent_streams != u32::MAX).then_some(flags.max_concurrent_streams),
        grpc_keepalive_interval: flags.grpc_keepalive_interval,
        grpc_keepalive_timeout: flags.grpc_keepalive_timeout,
        client_tls: client_tls(flags),
        strict_reconfig_check: flags.strict_reconfig_check,
        auth: cairn_api::auth::AuthConfig {
            token: flags.auth_token.clone(),
            token_ttl: std::time::Duration::from_secs(flags.auth_token_ttl),
            bcrypt_cost: flags.bcrypt_cost.min(u32::MAX as u64) as u32,
            client_cert_auth: flags.client_cert_auth,
        },
    })
}

/// etcd's --peer-* transport security flags (cipher suites and TLS versions are shared with
/// the client side, as in etcd).
fn peer_tls(flags: &Flags) -> ClientTls {
    ClientTls {
        cert_file: flags.peer_cert_file.clone(),
        key_file: flags.peer_key_file.clone(),
        trusted_ca_file: flags.peer_trusted_ca_file.clone(),
        client_cert_auth: flags.peer_client_cert_auth,
        crl_file: flags.peer_crl_file.clone(),
        auto_tls: flags.peer_auto_tls,
        allowed_cn: flags.peer_cert_allowed_cn.clone(),
        allowed_hostname: flags.peer_cert_allowed_hostname.clone(),
        ..client_tls(flags)
    }
}

fn client_tls(flags: &Flags) -> ClientTls {
    ClientTls {
        cert_file: flags.cert_file.clone(),
        key_file: flags.key_file.clone(),
        trusted_ca_file: flags.trusted_ca_file.clone(),
        client_cert_auth: flags.client_cert_auth,
        crl_file: flags.client_crl_file.clone(),
        auto_tls: flags.auto_tls,
        cipher_suites: split_urls(&flags.cipher_suites),
        min_version: flags.tls_min_version.clone(),
        max_version: flags.tls_max_version.clone(),
        allowed_cn: String::new(),
        allowed_hostname: String::new(),
    }
}

async fn serve(flags: Flags) -> anyhow::Result<()> {
    let mut cfg = server_config(&flags)?;
    tracing::info!(
        name = %cfg.name, data_dir = %flags.data_dir(), backend = ?flags.backend,
        member_id = %format!("{:x}", cfg.member_id), cluster_id = %format!("{:x}", cfg.cluster_id),
        "starting cairn"
    );
    let mut native = None;
    let mut peer_server = None;
    let mut postgres = None;
    let mut tikv = None;
    if flags.unsafe_no_fsync && flags.backend != BackendKind::Native {
        tracing::warn!("--unsafe-no-fsync has no effect on the {:?} backend", flags.backend);
    }
    let backend: Arc<dyn Backend> = match flags.backend {
        BackendKind::Memory => MemoryBackend::new(),
        BackendKind::Native => {
            let mut ncfg = native_config(&flags, cfg.member_id, cfg.cluster_id)?;
            let identity_file = std::path::Path::new(&flags.data_dir()).join(IDENTITY_FILE);
            let stored = read_identity(&identity_file)?;
            let ids = if let Some(ids) = stored {
                // Like etcd (which keeps them in its WAL): the IDs of a data dir are fixed by
                // its first start; --initial-cluster* only matter for an empty data dir.
                Some((ids, "using the member and cluster IDs recorded in the data dir"))
            } else if clustered(&flags)? && flags.initial_cluster_state == "existing" {
                // Joining: the cluster chose this member's ID when it was added.
                let urls: Vec<String> = ncfg.initial_cluster.values().cloned().collect();
                let mine = cfg.peer_urls.first().cloned().unwrap_or_default();
                let ids =
                    NativeBackend::discover(&urls, &mine, ncfg.peer_tls.clone(), std::time::Duration::from_secs(60))
                        .await
                        .context("joining an existing cluster")?;
                Some((ids, "joining an existing cluster"))
            } else {
                None
            };
            if let Some(((member_id, cluster_id), why)) = ids {
                if (member_id, cluster_id) != (cfg.member_id, cfg.cluster_id) {
                    tracing::info!(
                        member_id = %format!("{member_id:x}"), cluster_id = %format!("{cluster_id:x}"), "{why}"
                    );
                }
                (cfg.member_id, cfg.cluster_id) = (member_id, cluster_id);
                (ncfg.member_id, ncfg.cluster_id) = (member_id, cluster_id);
            }
            // A data dir etcd left (or `etcdctl snapshot restore` made) and Cairn never used:
            // start from etcd's data, revisions and all.
            let etcd = if stored.is_none() {
                cairn_api::snapshot::read_etcd_data_dir(std::path::Path::new(&flags.data_dir()))?
            } else {
                None
            };
            let etcd_auth = etcd.as_ref().and_then(|e| e.auth.clone());
            ncfg.import = etcd.map(Arc::new);
            let b = NativeBackend::open(ncfg)
                .await
                .context("opening the native backend")?;
            if let Some(auth) = &etcd_auth {
                if cairn_api::snapshot::import_auth(b.as_ref(), auth).await? {
                    tracing::info!(users = auth.users.len(), roles = auth.roles.len(), enabled = auth.enabled, "imported etcd's auth store");
                }
            }
            // The other members must reach this one before any of them can lead. A single
            // node serves its peer port too (as etcd does), so that members can be added
            // later; if the port is taken it runs without (and cannot grow).
            match PeerListeners::bind(&split_urls(&flags.listen_peer_urls), &peer_tls(&flags)).await {
                Ok(listeners) => peer_server = Some(listeners.serve(b.peer_service())),
                Err(e) if !b.is_clustered() => tracing::warn!(
                    error = %format!("{e:#}"),
                    "cannot serve the peer port; this single node cannot be joined by new members"
                ),
                Err(e) => return Err(e),
            }
            if b.is_clustered() {
                b.wait_ready().await.context("joining the cluster")?;
            }
            if stored.is_none() {
                write_identity(&identity_file, cfg.member_id, cfg.cluster_id)
                    .with_context(|| format!("recording the member ID in {}", identity_file.display()))?;
            }
            native = Some(b.clone());
            b
        }
        BackendKind::Postgres => {
            if flags.postgres_url.is_empty() {
                anyhow::bail!("--backend postgres needs --postgres-url");
            }
            let opts = PostgresOptions {
                max_connections: flags.postgres_max_connections,
                application_name: format!("cairn-{}", cfg.name),
                quota_backend_bytes: flags.quota_backend_bytes,
                ..Default::default()
            };
            let b = PostgresBackend::connect(&flags.postgres_url, opts)
                .await
                .context("connecting to PostgreSQL")?;
            postgres = Some(b.clone());
            b
        }
        BackendKind::Tikv => {
            let pd: Vec<String> =
                flags.tikv_pd_endpoints.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
            if pd.is_empty() {
                anyhow::bail!("--backend tikv needs --tikv-pd-endpoints");
            }
            let tls = TikvTls::from_flags(&flags.tikv_ca_file, &flags.tikv_cert_file, &flags.tikv_key_file)
                .map_err(anyhow::Error::msg)?;
            let opts = TikvOptions {
                namespace: flags.tikv_namespace.clone().into_bytes(),
                quota_backend_bytes: flags.quota_backend_bytes,
                tls,
                ..Default::default()
            };
            let b = TikvBackend::connect(pd, opts).await.context("connecting to TiKV")?;
            tikv = Some(b.clone());
            b
        }
    };
    let result = cairn_api::run(cfg, backend, shutdown_signal()).await;
    if let Some(native) = native {
        native.shutdown().await.context("stopping the native backend")?;
    }
    if let Some(p) = peer_server {
        p.abort();
    }
    if let Some(pg) = postgres {
        pg.shutdown().await;
    }
    if let Some(t) = tikv {
        t.shutdown().await;
    }
    tracing::info!("stopped serving");
    result
}

fn native_config(flags: &Flags, member_id: u64, cluster_id: u64) -> anyhow::Result<NativeConfig> {
    let members = initial_members(flags)?;
    let initial_cluster = members.iter().filter_map(|m| Some((m.id, m.peer_urls.first()?.clone()))).collect();
    let https = members.iter().flat_map(|m| &m.peer_urls).any(|u| u.starts_with("https://"));
    let peer_tls = if https {
        let hosts: Vec<String> = split_urls(&flags.listen_peer_urls).iter().filter_map(|u| urls::host(u)).collect();
        Some(peer_tls(flags).peer_client_config(&hosts).context("peer TLS")?)
    } else {
        None
    };
    Ok(NativeConfig {
        initial_cluster,
        join_existing: flags.initial_cluster_state == "existing",
        cluster_id,
        slow_disk: std::time::Duration::ZERO,
        unsafe_no_fsync: flags.unsafe_no_fsync,
        peer_tls,
        data_dir: flags.data_dir().into(),
        snapshot_count: flags.snapshot_count,
        snapshot_catchup_entries: flags.experimental_snapshot_catchup_entries,
        heartbeat_interval_ms: flags.heartbeat_interval,
        election_timeout_ms: flags.election_timeout,
        quota_backend_bytes: flags.quota_backend_bytes,
        member_id,
        import: None,
    })
}

/// The native data dir's record of its member and cluster IDs.
const IDENTITY_FILE: &str = "member.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct Identity {
    member_id: String,
    cluster_id: String,
}

fn read_identity(path: &std::path::Path) -> anyhow::Result<Option<(u64, u64)>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let id: Identity = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let hex = |s: &str| u64::from_str_radix(s, 16).with_context(|| format!("bad ID {s:?} in {}", path.display()));
    Ok(Some((hex(&id.member_id)?, hex(&id.cluster_id)?)))
}

/// Writes the IDs durably (temp file, fsync, rename, fsync of the directory).
fn write_identity(path: &std::path::Path, member_id: u64, cluster_id: u64) -> anyhow::Result<()> {
    use std::io::Write as _;
    let id = Identity { member_id: format!("{member_id:x}"), cluster_id: format!("{cluster_id:x}") };
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(serde_json::to_string(&id)?.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("received interrupt signal, shutting down"),
        _ = term.recv() => tracing::info!("received terminated signal, shutting down"),
    }
}

/// The allocator: jemalloc, through tikv-jemallocator (TiKV's maintained fork of the
/// jemallocator crate). Under 256 clients' puts glibc's malloc and free were about a tenth of the
/// runtime workers' and the raft thread's CPU (requests are built on one thread and freed on
/// another, and tonic's and hyper's per-request futures are over a kilobyte); jemalloc's thread
/// caches took puts at 256 clients from 33.6-36.9k to 37.7-42.0k per second (BENCHMARKS.md,
/// stop 23). mimalloc gave a similar gain but 8-30 MB more peak RSS (stop 19).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main` (the `_RJEM_MALLOC_CONF` environment variable still
/// overrides them). One arena: jemalloc's default of four per core cost 8 MB of peak RSS on a
/// lone client's puts, more than etcd's; with one, a lone client's puts peak at or below
/// glibc's. Freed pages go back to the system 100 ms after they are last used, and at once
/// once they are purged lazily ("muzzy"), so a burst does not keep its peak.
#[allow(non_upper_case_globals, unsafe_code)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8; 46] = b"narenas:1,dirty_decay_ms:100,muzzy_decay_ms:0\0";
