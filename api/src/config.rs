//! etcd's command line: the same flags, units and defaults, each also read from an
//! `ETCD_<FLAG_NAME>` environment variable, or all of them from `--config-file` (YAML keys as in
//! etcd.conf.yml.sample; as in etcd, a config file replaces flags and environment). Cairn's
//! own flags are `--backend` and `--cairn-version`. Only the binary uses this module.

use std::ffi::OsString;
use std::time::Duration;

use cairn_api::godur;
use clap::{parser::ValueSource, ArgMatches, CommandFactory, FromArgMatches, Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    Native,
    Postgres,
    Tikv,
    Memory,
}

fn dur(s: &str) -> Result<Duration, String> {
    godur::parse(s)
}

/// etcd's flags. Booleans follow Go's flag package: `--flag` or `--flag=false`.
#[derive(Parser, Debug, Clone)]
#[command(name = "etcd", about = "Cairn: an etcd v3 server", disable_version_flag = true, args_override_self = true)]
pub struct Flags {
    /// Path to the server configuration file (YAML); flags and environment are then ignored.
    #[arg(long)]
    pub config_file: Option<String>,
    /// Print the version and exit.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub version: bool,

    // --- member ---
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Path to the data directory [default: ${name}.cairn].
    #[arg(long)]
    pub data_dir: Option<String>,
    #[arg(long, default_value = "")]
    pub wal_dir: String,
    #[arg(long, default_value_t = 100_000)]
    pub snapshot_count: u64,
    /// Time (in milliseconds) of a heartbeat interval.
    #[arg(long, default_value_t = 100)]
    pub heartbeat_interval: u64,
    /// Time (in milliseconds) for an election to timeout.
    #[arg(long, default_value_t = 1000)]
    pub election_timeout: u64,
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "true")]
    pub initial_election_tick_advance: bool,
    #[arg(long, default_value = "http://localhost:2380")]
    pub listen_peer_urls: String,
    #[arg(long, default_value = "http://localhost:2379")]
    pub listen_client_urls: String,
    #[arg(long, default_value = "")]
    pub listen_client_http_urls: String,
    #[arg(long, default_value_t = 5)]
    pub max_snapshots: u64,
    #[arg(long, default_value_t = 5)]
    pub max_wals: u64,
    /// Raise alarms when backend size exceeds the given quota (0 defaults to low space quota).
    #[arg(long, default_value_t = 0)]
    pub quota_backend_bytes: u64,
    #[arg(long, default_value = "0s", value_parser = dur)]
    pub backend_batch_interval: Duration,
    #[arg(long, default_value_t = 0)]
    pub backend_batch_limit: u64,
    #[arg(long, default_value = "map")]
    pub backend_bbolt_freelist_type: String,
    #[arg(long, default_value_t = 128)]
    pub max_txn_ops: u64,
    #[arg(long, default_value_t = 1_572_864)]
    pub max_request_bytes: u64,
    #[arg(long, default_value_t = u32::MAX)]
    pub max_concurrent_streams: u32,
    #[arg(long, default_value = "5s", value_parser = dur)]
    pub grpc_keepalive_min_time: Duration,
    #[arg(long, default_value = "2h", value_parser = dur)]
    pub grpc_keepalive_interval: Duration,
    #[arg(long, default_value = "20s", value_parser = dur)]
    pub grpc_keepalive_timeout: Duration,
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub socket_reuse_port: bool,
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub socket_reuse_address: bool,
    /// Disables fsync, unsafe, will cause data loss.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub unsafe_no_fsync: bool,

    // --- clustering ---
    #[arg(long, default_value = "http://localhost:2380")]
    pub initial_advertise_peer_urls: String,
    /// Initial cluster configuration for bootstrapping [default: ${name}=<initial-advertise-peer-urls>].
    #[arg(long)]
    pub initial_cluster: Option<String>,
    #[arg(long, default_value = "new", value_parser = ["new", "existing"])]
    pub initial_cluster_state: String,
    #[arg(long, default_value = "etcd-cluster")]
    pub initial_cluster_token: String,
    #[arg(long, default_value = "http://localhost:2379")]
    pub advertise_client_urls: String,
    #[arg(long, default_value = "")]
    pub discovery: String,
    #[arg(long, default_value = "proxy")]
    pub discovery_fallback: String,
    #[arg(long, default_value = "")]
    pub discovery_proxy: String,
    #[arg(long, default_value = "")]
    pub discovery_srv: String,
    #[arg(long, default_value = "")]
    pub discovery_srv_name: String,
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "true")]
    pub strict_reconfig_check: bool,
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub pre_vote: bool,
    /// Auto compaction retention length. 0 means disable auto compaction.
    #[arg(long, default_value = "0")]
    pub auto_compaction_retention: String,
    /// Interpret 'auto-compaction-retention' one of: periodic|revision. 'periodic' for duration based retention, defaulting to hours if no time unit is provided (e.g. '5m'). 'revision' for revision number based retention.
    // Checked after parsing, for etcd's message (see `verify`).
    #[arg(long, default_value = "periodic")]
    pub auto_compaction_mode: String,
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub enable_v2: bool,
    #[arg(long, default_value = "not-yet")]
    pub v2_deprecation: String,

    // --- security ---
    #[arg(long, default_value = "")]
    pub cert_file: String,
    #[arg(long, default_value = "")]
    pub key_file: String,
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub client_cert_auth: bool,
    #[arg(long, default_value = "")]
    pub client_crl_file: String,
    #[arg(long, default_value = "")]
    pub client_cert_allowed_hostname: String,
    #[arg(long, default_value = "")]
    pub trusted_ca_file: String,
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub auto_tls: bool,
    #[arg(long, default_value = "")]
    pub peer_cert_file: String,
    #[arg(long, default_value = "")]
    pub peer_key_file: String,
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub peer_client_cert_auth: bool,
    #[arg(long, default_value = "")]
    pub peer_trusted_ca_file: String,
    #[arg(long, default_value = "")]
    pub peer_cert_allowed_cn: String,
    #[arg(long, default_value = "")]
    pub peer_cert_allowed_hostname: String,
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub peer_auto_tls: bool,
    #[arg(long, default_value_t = 1)]
    pub self_signed_cert_validity: u64,
    #[arg(long, default_value = "")]
    pub peer_crl_file: String,
    #[arg(long, default_value = "")]
    pub cipher_suites: String,
    #[arg(long, default_value = "*")]
    pub cors: String,
    #[arg(long, default_value = "*")]
    pub host_whitelist: String,
    #[arg(long, default_value = "")]
    pub tls_min_version: String,
    #[arg(long, default_value = "")]
    pub tls_max_version: String,

    // --- auth ---
    #[arg(long, default_value = "simple")]
    pub auth_token: String,
    #[arg(long, default_value_t = 10)]
    pub bcrypt_cost: u64,
    #[arg(long, default_value_t = 300)]
    pub auth_token_ttl: u64,

    // --- profiling, monitoring and logging ---
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub enable_pprof: bool,
    #[arg(long, default_value = "basic")]
    pub metrics: String,
    #[arg(long, default_value = "")]
    pub listen_metrics_urls: String,
    #[arg(long, default_value = "zap")]
    pub logger: String,
    #[arg(long, default_value = "default")]
    pub log_outputs: String,
    #[arg(long, default_value = "info", value_parser = ["debug", "info", "warn", "error", "panic", "fatal"])]
    pub log_level: String,
    #[arg(long, default_value = "")]
    pub log_package_levels: String,
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub enable_log_rotation: bool,
    #[arg(long, default_value = "")]
    pub log_rotation_config_json: String,

    // --- proxy (v2) ---
    #[arg(long, default_value = "off")]
    pub proxy: String,
    #[arg(long, default_value_t = 5000)]
    pub proxy_failure_wait: u64,
    #[arg(long, default_value_t = 30000)]
    pub proxy_refresh_interval: u64,
    #[arg(long, default_value_t = 1000)]
    pub proxy_dial_timeout: u64,
    #[arg(long, default_value_t = 5000)]
    pub proxy_write_timeout: u64,
    #[arg(long, default_value_t = 0)]
    pub proxy_read_timeout: u64,

    // --- experimental ---
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub experimental_initial_corrupt_check: bool,
    #[arg(long, default_value = "0s", value_parser = dur)]
    pub experimental_corrupt_check_time: Duration,
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub experimental_compact_hash_check_enabled: bool,
    #[arg(long, default_value = "1m", value_parser = dur)]
    pub experimental_compact_hash_check_time: Duration,
    #[arg(long, default_value = "")]
    pub experimental_enable_v2v3: String,
    #[arg(long, default_value = "array")]
    pub experimental_backend_bbolt_freelist_type: String,
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub experimental_enable_lease_checkpoint: bool,
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub experimental_enable_lease_checkpoint_persist: bool,
    #[arg(long, default_value_t = 1000)]
    pub experimental_compaction_batch_limit: u64,
    #[arg(long, default_value = "10ms", value_parser = dur)]
    pub experimental_compaction_sleep_interval: Duration,
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub experimental_peer_skip_client_san_verification: bool,
    #[arg(long, default_value = "10m", value_parser = dur)]
    pub experimental_watch_progress_notify_interval: Duration,
    #[arg(long, default_value = "100ms", value_parser = dur)]
    pub experimental_warning_apply_duration: Duration,
    #[arg(long, default_value = "300ms", value_parser = dur)]
    pub experimental_warning_unary_request_duration: Duration,
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub experimental_txn_mode_write_with_shared_buffer: bool,
    #[arg(long, default_value_t = 0)]
    pub experimental_bootstrap_defrag_threshold_megabytes: u64,
    #[arg(long, default_value = "5s", value_parser = dur)]
    pub experimental_downgrade_check_time: Duration,
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub experimental_memory_mlock: bool,
    #[arg(long, default_value_t = 5000)]
    pub experimental_snapshot_catchup_entries: u64,
    #[arg(long, default_value_t = 1)]
    pub experimental_max_learners: u64,
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub experimental_stop_grpc_service_on_defrag: bool,
    #[arg(long, default_value = "5s", value_parser = dur)]
    pub experimental_wait_cluster_ready_timeout: Duration,
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub experimental_enable_distributed_tracing: bool,
    #[arg(long, default_value = "localhost:4317")]
    pub experimental_distributed_tracing_address: String,
    #[arg(long, default_value = "etcd")]
    pub experimental_distributed_tracing_service_name: String,
    #[arg(long, default_value = "")]
    pub experimental_distributed_tracing_instance_id: String,
    #[arg(long, default_value_t = 0)]
    pub experimental_distributed_tracing_sampling_rate: u64,
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub force_new_cluster: bool,

    // --- unsafe / debug ---
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false")]
    pub debug: bool,

    // --- Cairn's own ---
    /// Storage backend (Cairn).
    #[arg(long, value_enum, default_value = "native")]
    pub backend: BackendKind,
    /// etcd version reported by Maintenance.Status (Cairn); Kubernetes needs >= 3.5.13.
    #[arg(long, default_value = "3.5.17")]
    pub cairn_version: String,
    /// PostgreSQL connection URL for `--backend postgres` (Cairn), e.g.
    /// postgres://user:pass@host:5432/db?sslmode=verify-full&sslrootcert=/path/ca.pem
    #[arg(long, default_value = "")]
    pub postgres_url: String,
    /// Connections in this process's PostgreSQL pool (Cairn).
    #[arg(long, default_value_t = 10)]
    pub postgres_max_connections: u32,
    /// PD endpoints for `--backend tikv` (Cairn): host:port[,host:port...].
    #[arg(long, default_value = "")]
    pub tikv_pd_endpoints: String,
    /// Prefix of every key Cairn writes in TiKV (Cairn); Cairn clusters sharing TiKV need their own.
    #[arg(long, default_value = "cairn/")]
    pub tikv_namespace: String,
    /// CA certificate (PEM) that PD's and TiKV's certificates are verified against; TLS to PD
    /// and TiKV needs it with --tikv-cert-file and --tikv-key-file (Cairn).
    #[arg(long, default_value = "")]
    pub tikv_ca_file: String,
    /// Client certificate (PEM) Cairn presents to PD and TiKV (Cairn).
    #[arg(long, default_value = "")]
    pub tikv_cert_file: String,
    /// Private key (PEM) of --tikv-cert-file (Cairn).
    #[arg(long, default_value = "")]
    pub tikv_key_file: String,
}

/// Flags that are parsed but have no effect yet; setting one logs a warning.
const NOT_IMPLEMENTED: &[&str] = &[
    "wal_dir",
    "initial_election_tick_advance",
    "listen_client_http_urls",
    "max_snapshots",
    "max_wals",
    "backend_batch_interval",
    "backend_batch_limit",
    "backend_bbolt_freelist_type",
    "grpc_keepalive_min_time",
    "socket_reuse_port",
    "socket_reuse_address",
    "discovery",
    "discovery_fallback",
    "discovery_proxy",
    "discovery_srv",
    "discovery_srv_name",
    "pre_vote",
    "enable_v2",
    "v2_deprecation",
    "client_crl_file",
    "client_cert_allowed_hostname",
    "self_signed_cert_validity",
    "cors",
    "host_whitelist",
    "enable_pprof",
    "metrics",
    "logger",
    "log_outputs",
    "log_package_levels",
    "enable_log_rotation",
    "log_rotation_config_json",
    "proxy",
    "proxy_failure_wait",
    "proxy_refresh_interval",
    "proxy_dial_timeout",
    "proxy_write_timeout",
    "proxy_read_timeout",
    "experimental_initial_corrupt_check",
    "experimental_corrupt_check_time",
    "experimental_compact_hash_check_enabled",
    "experimental_compact_hash_check_time",
    "experimental_enable_v2v3",
    "experimental_backend_bbolt_freelist_type",
    "experimental_enable_lease_checkpoint",
    "experimental_enable_lease_checkpoint_persist",
    "experimental_compaction_batch_limit",
    "experimental_compaction_sleep_interval",
    "experimental_peer_skip_client_san_verification",
    "experimental_warning_apply_duration",
    "experimental_warning_unary_request_duration",
    "experimental_txn_mode_write_with_shared_buffer",
    "experimental_bootstrap_defrag_threshold_megabytes",
    "experimental_downgrade_check_time",
    "experimental_memory_mlock",
    "experimental_max_learners",
    "experimental_stop_grpc_service_on_defrag",
    "experimental_wait_cluster_ready_timeout",
    "experimental_enable_distributed_tracing",
    "experimental_distributed_tracing_address",
    "experimental_distributed_tracing_service_name",
    "experimental_distributed_tracing_instance_id",
    "experimental_distributed_tracing_sampling_rate",
    "force_new_cluster",
];

/// The parsed configuration and the flags that were set but are not acted on yet.
#[derive(Debug)]
pub struct Loaded {
    pub flags: Flags,
    pub not_implemented: Vec<String>,
}

/// Where a parse ended when it did not produce a configuration.
#[derive(Debug)]
pub enum ParseExit {
    /// Print this and exit with the code (help, bad flags).
    Message { text: String, code: i32 },
}

/// The environment variable etcd reads for a flag: `data-dir` -> `ETCD_DATA_DIR`.
pub fn env_name(flag_id: &str) -> String {
    format!("ETCD_{}", flag_id.to_uppercase().replace('-', "_"))
}

fn command(with_env: bool) -> clap::Command {
    Flags::command().mut_args(|a| {
        if with_env && a.get_long().is_some() && !["version", "help"].contains(&a.get_id().as_str()) {
            let name = env_name(a.get_id().as_str());
            a.env(name)
        } else {
            a
        }
    })
}

/// Go's flag package also accepts `-flag`: rewrite such arguments to `--flag`.
fn normalize_dashes(cmd: &clap::Command, args: Vec<OsString>) -> Vec<OsString> {
    let longs: Vec<&str> = cmd.get_arguments().filter_map(|a| a.get_long()).chain(["help"]).collect();
    args.into_iter()
        .map(|a| {
            let Some(s) = a.to_str() else { return a };
            let Some(rest) = s.strip_prefix('-').filter(|r| !r.starts_with('-')) else { return a };
            let name = rest.split('=').next().unwrap_or_default();
            if longs.contains(&name) {
                OsString::from(format!("-{s}"))
            } else {
                a
            }
        })
        .collect()
}

fn clap_exit(e: clap::Error) -> ParseExit {
    use clap::error::{ContextKind, ErrorKind};
    match e.kind() {
        ErrorKind::UnknownArgument => {
            let arg = e.get(ContextKind::InvalidArg).map(|v| v.to_string()).unwrap_or_default();
            if !arg.starts_with('-') {
                let text = format!("error verifying flags, '{arg}' is not a valid flag. See 'etcd --help'.\n");
                return ParseExit::Message { text, code: 1 };
            }
            let name = arg.trim_start_matches('-').split('=').next().unwrap_or_default().to_string();
            ParseExit::Message { text: format!("flag provided but not defined: -{name}\n"), code: 2 }
        }
        _ => ParseExit::Message { text: e.render().to_string(), code: e.exit_code() },
    }
}

/// Parses the command line (`args[0]` is the program) and the `ETCD_*` environment.
pub fn parse(args: Vec<OsString>) -> Result<Loaded, ParseExit> {
    let cmd = command(true);
    let args = normalize_dashes(&cmd, args);
    let matches = cmd.clone().try_get_matches_from(args).map_err(clap_exit)?;
    check_env_conflicts(&cmd, &matches)?;
    let flags = Flags::from_arg_matches(&matches).map_err(clap_exit)?;
    if let Some(path) = flags.config_file.clone() {
        return from_file(&path).and_then(verify);
    }
    verify(Loaded { not_implemented: not_implemented(&matches), flags })
}

/// etcd's checks of flag values that parsing alone does not make.
fn verify(loaded: Loaded) -> Result<Loaded, ParseExit> {
    cairn_api::compactor::AutoCompaction::check_mode(&loaded.flags.auto_compaction_mode).map_err(|e| {
        ParseExit::Message { text: format!("error verifying flags, {e}. See 'etcd --help'.\n"), code: 1 }
    })?;
    Ok(loaded)
}

/// etcd refuses a flag given both on the command line and in the environment.
fn check_env_conflicts(cmd: &clap::Command, m: &ArgMatches) -> Result<(), ParseExit> {
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        let Some(var) = arg.get_env().and_then(|v| v.to_str()) else { continue };
        let on_cli = m.value_source(id) == Some(ValueSource::CommandLine);
        if on_cli && std::env::var_os(var).is_some() {
            let text = format!(
                "conflicting environment variable {var:?} is shadowed by corresponding command-line flag (either unset environment variable or disable flag)\n"
            );
            return Err(ParseExit::Message { text, code: 1 });
        }
    }
    Ok(())
}

fn not_implemented(m: &ArgMatches) -> Vec<String> {
    NOT_IMPLEMENTED
        .iter()
        .filter(|id| matches!(m.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable)))
        .map(|id| id.replace('_', "-"))
        .collect()
}

/// Reads `--config-file`: its keys become flags; environment and other flags are ignored.
fn from_file(path: &str) -> Result<Loaded, ParseExit> {
    let fail = |text: String| ParseExit::Message { text: format!("{text}\n"), code: 1 };
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read config file {path:?}: {e}")))?;
    let args =
        crate::config_file::to_args(&text).map_err(|e| fail(format!("error parsing config file {path:?}: {e}")))?;
    let cmd = command(false);
    let known: Vec<&str> = cmd.get_arguments().filter_map(|a| a.get_long()).collect();
    let (args, unknown): (Vec<_>, Vec<_>) = args.into_iter().partition(|(k, _)| known.contains(&k.as_str()));
    let mut argv = vec![OsString::from("etcd")];
    argv.extend(args.iter().map(|(k, v)| OsString::from(format!("--{k}={v}"))));
    let matches = cmd.try_get_matches_from(argv).map_err(clap_exit)?;
    let flags = Flags::from_arg_matches(&matches).map_err(clap_exit)?;
    let mut not_impl = not_implemented(&matches);
    not_impl.extend(unknown.into_iter().map(|(k, _)| format!("{k} (unknown config file key)")));
    Ok(Loaded { flags, not_implemented: not_impl })
}

impl Flags {
    pub fn data_dir(&self) -> String {
        self.data_dir.clone().filter(|d| !d.is_empty()).unwrap_or_else(|| format!("{}.cairn", self.name))
    }

    pub fn initial_cluster(&self) -> String {
        match &self.initial_cluster {
            Some(c) if !c.is_empty() => c.clone(),
            _ => split_urls(&self.initial_advertise_peer_urls)
                .iter()
                .map(|u| format!("{}={u}", self.name))
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    pub fn log_level(&self) -> &str {
        if self.debug {
            "debug"
        } else {
            &self.log_level
        }
    }
}

pub fn split_urls(s: &str) -> Vec<String> {
    s.split(',').map(str::trim).filter(|u| !u.is_empty()).map(String::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_args(args: &[&str]) -> Result<Loaded, ParseExit> {
        let mut v = vec![OsString::from("etcd")];
        v.extend(args.iter().map(OsString::from));
        parse(v)
    }

    #[test]
    fn defaults_are_etcds() {
        let f = parse_args(&[]).unwrap().flags;
        assert_eq!(f.name, "default");
        assert_eq!(f.data_dir(), "default.cairn");
        assert_eq!(f.initial_cluster(), "default=http://localhost:2380");
        assert_eq!(f.initial_cluster_token, "etcd-cluster");
        assert_eq!(f.snapshot_count, 100_000);
        assert_eq!((f.heartbeat_interval, f.election_timeout), (100, 1000));
        assert_eq!((f.max_txn_ops, f.max_request_bytes), (128, 1_572_864));
        assert_eq!(f.experimental_watch_progress_notify_interval, Duration::from_secs(600));
        assert_eq!(f.backend, BackendKind::Native);
        assert_eq!(f.cairn_version, "3.5.17");
        assert!(f.strict_reconfig_check && !f.enable_v2);
    }

    #[test]
    fn name_drives_data_dir_and_initial_cluster() {
        let f = parse_args(&["--name", "n1", "--initial-advertise-peer-urls", "http://10.0.0.1:2380"]).unwrap().flags;
        assert_eq!(f.data_dir(), "n1.cairn");
        assert_eq!(f.initial_cluster(), "n1=http://10.0.0.1:2380");
    }

    #[test]
    fn go_style_booleans_and_single_dash() {
        let l =
            parse_args(&["--strict-reconfig-check=false", "--enable-v2", "-name=x", "-snapshot-count", "5"]).unwrap();
        assert!(!l.flags.strict_reconfig_check);
        assert!(l.flags.enable_v2);
        assert_eq!(l.flags.name, "x");
        assert_eq!(l.flags.snapshot_count, 5);
        assert!(l.not_implemented.contains(&"enable-v2".to_string()));
        assert!(!l.not_implemented.contains(&"strict-reconfig-check".to_string()));
    }

    #[test]
    fn repeated_flags_take_the_last_value_as_in_go() {
        let f = parse_args(&["--client-cert-auth", "--snapshot-count", "1", "--client-cert-auth", "--snapshot-count=2"])
            .unwrap()
            .flags;
        assert!(f.client_cert_auth);
        assert_eq!(f.snapshot_count, 2);
    }

    #[test]
    fn durations_use_go_syntax() {
        let f = parse_args(&["--experimental-watch-progress-notify-interval", "5s", "--grpc-keepalive-timeout=1m30s"])
            .unwrap()
            .flags;
        assert_eq!(f.experimental_watch_progress_notify_interval, Duration::from_secs(5));
        assert_eq!(f.grpc_keepalive_timeout, Duration::from_secs(90));
    }

    /// The message and exit code of a command line that must be refused.
    fn refused(args: &[&str]) -> (String, i32) {
        match parse_args(args) {
            Err(ParseExit::Message { text, code }) => (text, code),
            Ok(_) => panic!("accepted {args:?}"),
        }
    }

    #[test]
    fn unknown_flag_is_etcds_message() {
        assert_eq!(refused(&["--no-such-flag"]), ("flag provided but not defined: -no-such-flag\n".into(), 2));
    }

    #[test]
    fn an_unknown_auto_compaction_mode_is_etcds_message() {
        assert_eq!(
            refused(&["--auto-compaction-mode=hourly"]),
            ("error verifying flags, unknown auto-compaction-mode \"hourly\". See 'etcd --help'.\n".into(), 1)
        );
        let l = parse_args(&["--auto-compaction-mode", "revision", "--auto-compaction-retention=1000"]).unwrap();
        assert_eq!((l.flags.auto_compaction_mode.as_str(), l.flags.auto_compaction_retention.as_str()), ("revision", "1000"));
        assert!(l.not_implemented.is_empty(), "{:?}", l.not_implemented);
    }

    #[test]
    fn positional_argument_is_etcds_message() {
        assert_eq!(
            refused(&["extra-arg"]),
            ("error verifying flags, 'extra-arg' is not a valid flag. See 'etcd --help'.\n".into(), 1)
        );
    }

    #[test]
    fn env_names() {
        assert_eq!(env_name("data_dir"), "ETCD_DATA_DIR");
        let cmd = command(true);
        let arg = cmd.get_arguments().find(|a| a.get_id() == "experimental_watch_progress_notify_interval").unwrap();
        assert_eq!(arg.get_env().unwrap(), "ETCD_EXPERIMENTAL_WATCH_PROGRESS_NOTIFY_INTERVAL");
    }

    #[test]
    fn every_flag_is_long_kebab() {
        for a in Flags::command().get_arguments() {
            let long = a.get_long().unwrap_or_default();
            assert_eq!(long, a.get_id().as_str().replace('_', "-"));
        }
    }

    #[test]
    fn config_file_replaces_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etcd.conf.yml");
        let yaml = "name: 'fromfile'\nsnapshot-count: 7\nenable-v2: true\nlog-outputs: [stderr]\n\
                    client-transport-security:\n  cert-file: /tmp/c.pem\n  auto-tls: false\n\
                    peer-transport-security:\n  auto-tls: true\ndata-dir:\nbogus-key: 1\n";
        std::fs::write(&path, yaml).unwrap();
        let l = parse_args(&["--name", "ignored", "--config-file", path.to_str().unwrap()]).unwrap();
        assert_eq!(l.flags.name, "fromfile");
        assert_eq!(l.flags.snapshot_count, 7);
        assert!(l.flags.enable_v2 && l.flags.peer_auto_tls);
        assert_eq!(l.flags.cert_file, "/tmp/c.pem");
        assert_eq!(l.flags.log_outputs, "stderr");
        assert_eq!(l.flags.data_dir(), "fromfile.cairn");
        assert!(l.not_implemented.iter().any(|n| n.starts_with("bogus-key")));
    }
}
