//! Test support: a throwaway PostgreSQL server for tests that need a real one.
//!
//! [`server`] gives the test binary's one server, started on first use. Which server, decided
//! by [`choose`] from the environment:
//!
//! - `CAIRN_TEST_POSTGRES_URL` set (an admin URL, e.g.
//!   `postgres://postgres@127.0.0.1:5432/postgres`): that server;
//! - otherwise `CAIRN_TEST_POSTGRES` = `docker`, `debian` or `auto` (the default):
//!   - `docker`: a `postgres:15-bookworm` container started with testcontainers (the crate's
//!     `testcontainers` feature; the image from `CAIRN_TEST_POSTGRES_IMAGE`). Needs a docker
//!     engine: `DOCKER_HOST` (`unix://` or `tcp://`), else `/var/run/docker.sock`, answering
//!     `GET /_ping`;
//!   - `debian`: a fresh cluster made with Debian's PostgreSQL binaries
//!     (`/usr/lib/postgresql/<version>/bin`, or `CAIRN_TEST_PG_BIN`) in a temp dir, listening
//!     on a unix socket in that dir and a free port on 127.0.0.1. `initdb` refuses to run as
//!     root, so as root the server runs as the `postgres` user;
//!   - `auto`: docker when the feature is built in and an engine answers, else Debian's.
//!
//! A watchdog process stops the server (removes the container) and its directory when the test
//! binary exits. When the chosen server cannot be started, forced or not, [`server`] panics
//! with the reason: a test that needs PostgreSQL fails, it never silently passes.
//!
//! [`TestServer::create_database`] makes a fresh database per test case.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sqlx::{Connection, PgConnection};

/// A running PostgreSQL server for tests.
pub struct TestServer {
    /// URL of the maintenance database, used to create test databases.
    admin_url: String,
    /// For a server this process started with Debian's binaries: the cluster dir and binaries,
    /// to stop it on drop.
    owned: Option<Owned>,
    /// For a container this process started: its port and its keeper thread.
    #[cfg(feature = "testcontainers")]
    container: Option<docker::Container>,
}

struct Owned {
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_postgres: bool,
    port: u16,
}

static SERVER: OnceLock<TestServer> = OnceLock::new();
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The test binary's server, started on first use. Panics with the reason when PostgreSQL
/// cannot be started.
pub fn server() -> &'static TestServer {
    SERVER.get_or_init(|| match TestServer::start() {
        Ok(s) => s,
        Err(e) => panic!(
            "PostgreSQL is needed by this test and could not be started: {e:#}\n\
             Install Debian's postgresql package (initdb and postgres under /usr/lib/postgresql/*/bin), \
             run a docker engine and build with --features cairn-postgres/testcontainers, \
             or point CAIRN_TEST_POSTGRES_URL at a server."
        ),
    })
}

/// Where the test server comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An existing server (`CAIRN_TEST_POSTGRES_URL`).
    Url(String),
    /// A container started with testcontainers.
    Docker,
    /// A cluster made with Debian's PostgreSQL binaries.
    Debian,
}

/// Whether this build can start containers (the `testcontainers` feature).
pub const DOCKER_SUPPORT: bool = cfg!(feature = "testcontainers");

/// Chooses the test server from `CAIRN_TEST_POSTGRES` (`force`: `docker`, `debian`, `auto` or
/// unset), `CAIRN_TEST_POSTGRES_URL` (`url`), whether this build has docker support and
/// `engine`, which probes the docker engine (`Err` says why there is none; it is only asked
/// when the answer matters). Forcing docker without support or without an engine is an error,
/// never a quiet fallback.
pub fn choose(
    force: Option<&str>,
    url: Option<&str>,
    docker_support: bool,
    engine: impl FnOnce() -> Result<String, String>,
) -> anyhow::Result<Source> {
    let url = url.filter(|u| !u.is_empty());
    match force.unwrap_or("").trim() {
        "" | "auto" => Ok(match url {
            Some(u) => Source::Url(u.to_string()),
            None if docker_support && engine().is_ok() => Source::Docker,
            None => Source::Debian,
        }),
        forced @ ("docker" | "debian") if url.is_some() => {
            bail!("CAIRN_TEST_POSTGRES={forced} and CAIRN_TEST_POSTGRES_URL are both set; unset one")
        }
        "debian" => Ok(Source::Debian),
        "docker" => {
            if !docker_support {
                bail!(
                    "CAIRN_TEST_POSTGRES=docker, but this build has no docker support \
                     (build with --features cairn-postgres/testcontainers)"
                );
            }
            match engine() {
                Ok(_) => Ok(Source::Docker),
                Err(why) => bail!("CAIRN_TEST_POSTGRES=docker, but no docker engine answers: {why}"),
            }
        }
        other => bail!("CAIRN_TEST_POSTGRES={other:?}: expected docker, debian or auto"),
    }
}

/// The docker engine testcontainers would use, if it answers `GET /_ping`: `DOCKER_HOST`
/// (`unix://PATH` or `tcp://HOST:PORT`; other schemes are not probed and count as present),
/// else `/var/run/docker.sock`. `Ok` names the engine, `Err` says why there is none.
pub fn docker_engine() -> Result<String, String> {
    match std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty()) {
        Some(host) => probe_docker_host(&host),
        None => ping_unix(Path::new("/var/run/docker.sock")).map(|()| "/var/run/docker.sock".to_string()),
    }
}

fn probe_docker_host(host: &str) -> Result<String, String> {
    if let Some(path) = host.strip_prefix("unix://") {
        ping_unix(Path::new(path)).map(|()| host.to_string())
    } else if let Some(addr) = host.strip_prefix("tcp://") {
        let addr = addr.trim_end_matches('/');
        let sock = std::net::ToSocketAddrs::to_socket_addrs(addr)
            .map_err(|e| format!("DOCKER_HOST={host}: {e}"))?
            .next()
            .ok_or_else(|| format!("DOCKER_HOST={host}: no address"))?;
        let stream = std::net::TcpStream::connect_timeout(&sock, PING_TIMEOUT)
            .map_err(|e| format!("DOCKER_HOST={host}: {e}"))?;
        if std::env::var_os("DOCKER_TLS_VERIFY").is_some_and(|v| !v.is_empty()) {
            // a TLS endpoint: the connection is as far as a probe without the certificates goes
            return Ok(host.to_string());
        }
        ping(stream).map(|()| host.to_string()).map_err(|e| format!("DOCKER_HOST={host}: {e}"))
    } else {
        Ok(host.to_string())
    }
}

const PING_TIMEOUT: Duration = Duration::from_secs(2);

fn ping_unix(path: &Path) -> Result<(), String> {
    let stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| format!("{}: {e}", path.display()))?;
    ping(stream).map_err(|e| format!("{}: {e}", path.display()))
}

/// The engine API's `GET /_ping`: answered `200 OK` by a live engine.
fn ping<S: std::io::Read + std::io::Write + SetTimeouts>(mut s: S) -> Result<(), String> {
    s.set_timeouts(PING_TIMEOUT).map_err(|e| e.to_string())?;
    s.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n").map_err(|e| e.to_string())?;
    // the status line only: a server may keep the connection open after answering
    let mut head = Vec::new();
    let mut buf = [0u8; 64];
    while !head.contains(&b'\n') && head.len() < 256 {
        match s.read(&mut buf).map_err(|e| e.to_string())? {
            0 => break,
            n => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head);
    let status = head.lines().next().unwrap_or("");
    if status.starts_with("HTTP/1.") && status.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        Err(format!("GET /_ping answered {status:?}"))
    }
}

trait SetTimeouts {
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()>;
}

impl SetTimeouts for std::net::TcpStream {
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

impl SetTimeouts for std::os::unix::net::UnixStream {
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

fn find_bin() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("CAIRN_TEST_PG_BIN") {
        return Ok(PathBuf::from(p));
    }
    let mut found: Vec<(u32, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir("/usr/lib/postgresql").context("no /usr/lib/postgresql")? {
        let entry = entry?;
        let bin = entry.path().join("bin");
        if let Ok(v) = entry.file_name().to_string_lossy().parse::<u32>() {
            if bin.join("initdb").exists() && bin.join("postgres").exists() {
                found.push((v, bin));
            }
        }
    }
    found.sort();
    found.pop().map(|(_, b)| b).context("no initdb/postgres under /usr/lib/postgresql/*/bin")
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Runs `bin` (as `postgres` when we are root) and fails with its output when it fails.
fn run(as_postgres: bool, bin: &Path, args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    let out = cmd.args(args).stdin(Stdio::null()).output().with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} {:?} failed ({}): {}{}",
            bin.display(),
            args,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl TestServer {
    /// Starts the server [`choose`] picks from the environment (or adopts
    /// `CAIRN_TEST_POSTGRES_URL`) and waits until it accepts connections.
    pub fn start() -> anyhow::Result<TestServer> {
        let force = std::env::var("CAIRN_TEST_POSTGRES").ok();
        let url = std::env::var("CAIRN_TEST_POSTGRES_URL").ok();
        match choose(force.as_deref(), url.as_deref(), DOCKER_SUPPORT, docker_engine)? {
            Source::Url(url) => Ok(TestServer::external(url)),
            Source::Debian => TestServer::start_debian(),
            #[cfg(feature = "testcontainers")]
            Source::Docker => {
                let (container, admin_url) = docker::Container::start()?;
                Ok(TestServer { admin_url, owned: None, container: Some(container) })
            }
            #[cfg(not(feature = "testcontainers"))]
            Source::Docker => unreachable!("choose() picks docker only with docker support"),
        }
    }

    fn external(admin_url: String) -> TestServer {
        TestServer {
            admin_url,
            owned: None,
            #[cfg(feature = "testcontainers")]
            container: None,
        }
    }

    /// A fresh cluster from Debian's PostgreSQL binaries.
    fn start_debian() -> anyhow::Result<TestServer> {
        let bin = find_bin()?;
        let as_postgres = is_root();
        let dir = tempfile::Builder::new().prefix("cairn-pg-").tempdir()?;
        let path = dir.path().to_str().context("temp dir path is not UTF-8")?.to_string();
        if as_postgres {
            let st = Command::new("chown").args(["-R", "postgres:postgres", &path]).status()?;
            if !st.success() {
                bail!("chown postgres {path} failed (is there a postgres user?)");
            }
        }
        let data = format!("{path}/data");
        run(as_postgres, &bin.join("initdb"), &["-D", &data, "--auth=trust", "--no-sync", "-U", "postgres", "-E", "UTF8", "--locale=C"])?;
        let port = free_port()?;
        let opts = format!(
            "-p {port} -k {path} -c listen_addresses=127.0.0.1 -c max_connections=500 -c shared_buffers=64MB \
             -c log_min_messages=warning"
        );
        run(as_postgres, &bin.join("pg_ctl"), &["-D", &data, "-l", &format!("{path}/log"), "-o", &opts, "-w", "-t", "60", "start"])
            .with_context(|| format!("log: {}", std::fs::read_to_string(format!("{path}/log")).unwrap_or_default()))?;
        let server = TestServer {
            admin_url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            owned: Some(Owned { dir, bin, as_postgres, port }),
            #[cfg(feature = "testcontainers")]
            container: None,
        };
        server.spawn_watchdog()?;
        Ok(server)
    }

    /// Stops the server and removes its directory once this process has exited: the server
    /// kept in a static is never dropped.
    fn spawn_watchdog(&self) -> anyhow::Result<()> {
        let Some(o) = &self.owned else { return Ok(()) };
        let dir = o.dir.path().display().to_string();
        let pg_ctl = o.bin.join("pg_ctl").display().to_string();
        let runas = if o.as_postgres { "runuser -u postgres -- " } else { "" };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; \
             {runas}{pg_ctl} -D {dir}/data stop -m immediate >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id()
        );
        spawn_detached_sh(&script).context("spawning the server watchdog")
    }

    /// The URL of the maintenance database.
    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }

    /// The TCP port of a server this process started.
    pub fn port(&self) -> Option<u16> {
        #[cfg(feature = "testcontainers")]
        if let Some(c) = &self.container {
            return Some(c.port);
        }
        self.owned.as_ref().map(|o| o.port)
    }

    /// Restarts a server this process started (`pg_ctl restart -m fast`, or stopping and
    /// starting the container): every connection is dropped, as in a real PostgreSQL restart.
    /// Blocks until it accepts connections again.
    pub fn restart(&self) -> anyhow::Result<()> {
        #[cfg(feature = "testcontainers")]
        if let Some(c) = &self.container {
            return c.restart();
        }
        let Some(o) = &self.owned else { bail!("only a server this process started can be restarted") };
        let data = o.dir.path().join("data").display().to_string();
        let log = o.dir.path().join("log").display().to_string();
        run(o.as_postgres, &o.bin.join("pg_ctl"), &["-D", &data, "-l", &log, "-m", "fast", "-w", "-t", "60", "restart"])
    }

    /// The postmaster's pid, for a server this process started with Debian's binaries (the
    /// first line of its `postmaster.pid`).
    pub fn pid(&self) -> Option<u32> {
        let o = self.owned.as_ref()?;
        let text = std::fs::read_to_string(o.dir.path().join("data/postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// The URL of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        match self.admin_url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => format!("{}/{name}", self.admin_url),
        }
    }

    /// Creates a fresh, empty database and returns its URL.
    pub async fn create_database(&self) -> anyhow::Result<String> {
        let name = format!("cairn_test_{}_{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = async {
                let mut conn = PgConnection::connect(&self.admin_url).await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await?;
                conn.close().await?;
                Ok::<_, sqlx::Error>(())
            }
            .await;
            match r {
                Ok(()) => return Ok(self.url(&name)),
                // CREATE DATABASE fails while another one copies template1 at the same time.
                Err(e) if Instant::now() < deadline && e.to_string().contains("being accessed by other users") => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e).with_context(|| format!("creating database {name}")),
            }
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(o) = &self.owned {
            let data = o.dir.path().join("data");
            let _ = run(o.as_postgres, &o.bin.join("pg_ctl"), &["-D", &data.display().to_string(), "stop", "-m", "immediate"]);
        }
    }
}

/// Waits until `url` accepts connections (a started server's first seconds, or a restart).
#[cfg(feature = "testcontainers")]
async fn wait_accepting(url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match PgConnection::connect(url).await {
            Ok(c) => {
                let _ = c.close().await;
                return Ok(());
            }
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "waiting for the test PostgreSQL");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("{url} does not accept connections")),
        }
    }
}

/// The test server as a docker container (testcontainers).
#[cfg(feature = "testcontainers")]
mod docker {
    use std::sync::mpsc;

    use testcontainers::core::{IntoContainerPort, WaitFor};
    use testcontainers::runners::AsyncRunner;
    use testcontainers::{GenericImage, ImageExt};

    use super::*;

    const DEFAULT_IMAGE: &str = "postgres:15-bookworm";

    type Reply = mpsc::Sender<anyhow::Result<()>>;

    /// A running container, owned by a keeper thread with its own runtime (the server lives in
    /// a static and is used from many tests' runtimes).
    pub(super) struct Container {
        pub(super) port: u16,
        restarts: mpsc::Sender<Reply>,
    }

    impl Container {
        /// Starts the container on a free host port and waits until it accepts connections;
        /// returns it and the maintenance database's URL.
        pub(super) fn start() -> anyhow::Result<(Container, String)> {
            let image = std::env::var("CAIRN_TEST_POSTGRES_IMAGE").unwrap_or_else(|_| DEFAULT_IMAGE.to_string());
            let (name, tag) = match image.rsplit_once(':') {
                Some((n, t)) if !t.contains('/') => (n.to_string(), t.to_string()),
                _ => (image.clone(), "latest".to_string()),
            };
            // A fixed host port, so that a restarted container is at the same URL.
            let port = free_port()?;
            let (ready_tx, ready_rx) = mpsc::channel::<anyhow::Result<(String, String)>>();
            let (restart_tx, restart_rx) = mpsc::channel::<Reply>();
            std::thread::Builder::new().name("cairn-test-postgres".into()).spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                let started = rt.block_on(async {
                    let c = GenericImage::new(name, tag)
                        // printed once by the image's init phase and once by the real server
                        .with_wait_for(WaitFor::message_on_stderr("database system is ready to accept connections"))
                        .with_mapped_port(port, 5432.tcp())
                        .with_env_var("POSTGRES_HOST_AUTH_METHOD", "trust")
                        .with_cmd(["postgres", "-c", "max_connections=500", "-c", "shared_buffers=64MB"])
                        .start()
                        .await
                        .with_context(|| format!("starting a {image} container"))?;
                    let host = c.get_host().await.context("the container's host")?;
                    let url = format!("postgres://postgres@{host}:{port}/postgres");
                    wait_accepting(&url).await?;
                    Ok::<_, anyhow::Error>((c, url))
                });
                let (c, url) = match started {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok((url.clone(), c.id().to_string())));
                while let Ok(reply) = restart_rx.recv() {
                    let r = rt.block_on(async {
                        c.stop().await.context("stopping the container")?;
                        c.start().await.context("starting the container")?;
                        wait_accepting(&url).await
                    });
                    let _ = reply.send(r);
                }
                let _ = rt.block_on(c.rm());
            })?;
            let (url, id) = ready_rx.recv().context("the container's keeper thread ended")??;
            spawn_watchdog(&id)?;
            Ok((Container { port, restarts: restart_tx }, url))
        }

        /// Stops and starts the container; blocks until it accepts connections again.
        pub(super) fn restart(&self) -> anyhow::Result<()> {
            let (tx, rx) = mpsc::channel();
            self.restarts.send(tx).ok().context("the container's keeper thread ended")?;
            rx.recv().context("the container's keeper thread ended")?
        }
    }

    /// Removes the container once this process has exited (the server kept in a static is
    /// never dropped): with the docker CLI when there is one, else through the engine's socket.
    fn spawn_watchdog(id: &str) -> anyhow::Result<()> {
        let sock = match std::env::var("DOCKER_HOST") {
            Ok(h) if h.starts_with("unix://") => h.trim_start_matches("unix://").to_string(),
            _ => "/var/run/docker.sock".to_string(),
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; \
             docker rm -f -v {id} >/dev/null 2>&1 || \
             curl -s -X DELETE --unix-socket {sock} 'http://docker/containers/{id}?force=true&v=true' >/dev/null 2>&1",
            pid = std::process::id()
        );
        super::spawn_detached_sh(&script).context("spawning the container watchdog")
    }
}

/// Starts `sh -c script` detached from the test's stdio: a watchdog that outlives the test
/// process and removes the server it started.
fn spawn_detached_sh(script: &str) -> std::io::Result<()> {
    Command::new("sh")
        .args(["-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(drop)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    use super::*;

    fn no_engine() -> Result<String, String> {
        Err("no engine".into())
    }

    fn engine() -> Result<String, String> {
        Ok("/var/run/docker.sock".into())
    }

    fn engine_not_asked() -> Result<String, String> {
        panic!("the engine must not be probed here")
    }

    #[test]
    fn auto_takes_the_url_then_docker_then_debian() {
        let url = "postgres://postgres@db/postgres";
        for force in [None, Some(""), Some("auto")] {
            assert_eq!(choose(force, Some(url), true, engine_not_asked).unwrap(), Source::Url(url.into()));
            assert_eq!(choose(force, None, true, engine).unwrap(), Source::Docker);
            assert_eq!(choose(force, None, true, no_engine).unwrap(), Source::Debian);
            assert_eq!(choose(force, None, false, engine_not_asked).unwrap(), Source::Debian, "no docker support");
            assert_eq!(choose(force, Some(""), true, no_engine).unwrap(), Source::Debian, "an empty URL is unset");
        }
    }

    #[test]
    fn forcing_docker_without_an_engine_or_support_fails() {
        assert_eq!(choose(Some("docker"), None, true, engine).unwrap(), Source::Docker);
        let e = choose(Some("docker"), None, true, no_engine).unwrap_err().to_string();
        assert!(e.contains("no docker engine answers: no engine"), "{e}");
        let e = choose(Some("docker"), None, false, engine_not_asked).unwrap_err().to_string();
        assert!(e.contains("no docker support"), "{e}");
        assert!(choose(Some("docker"), Some("postgres://x/y"), true, engine).is_err(), "docker and a URL conflict");
    }

    #[test]
    fn forcing_debian_never_probes_docker() {
        assert_eq!(choose(Some("debian"), None, true, engine_not_asked).unwrap(), Source::Debian);
        assert!(choose(Some("debian"), Some("postgres://x/y"), true, engine_not_asked).is_err());
        let e = choose(Some("podman"), None, true, engine_not_asked).unwrap_err().to_string();
        assert!(e.contains("expected docker, debian or auto"), "{e}");
    }

    /// A unix socket server that answers one request with `answer`, then keeps the connection
    /// open for `hold` before closing it.
    fn serve_once(path: &Path, answer: &'static [u8], hold: Duration) -> std::thread::JoinHandle<String> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = [0u8; 256];
            let n = s.read(&mut req).unwrap();
            s.write_all(answer).unwrap();
            std::thread::sleep(hold);
            String::from_utf8_lossy(&req[..n]).into_owned()
        })
    }

    #[test]
    fn the_engine_probe_wants_a_200_to_ping() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("ok.sock");
        let h = serve_once(&ok, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK", Duration::ZERO);
        let host = format!("unix://{}", ok.display());
        assert_eq!(probe_docker_host(&host), Ok(host.clone()));
        assert!(h.join().unwrap().starts_with("GET /_ping HTTP/1.0\r\n"));

        // an engine (or proxy) that keeps the connection open: the status line is enough
        let kept = dir.path().join("kept.sock");
        let h = serve_once(&kept, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK", Duration::from_secs(5));
        let started = Instant::now();
        assert!(probe_docker_host(&format!("unix://{}", kept.display())).is_ok());
        assert!(started.elapsed() < Duration::from_secs(1), "answered without waiting for the close");
        h.join().unwrap();

        let bad = dir.path().join("bad.sock");
        let h = serve_once(&bad, b"HTTP/1.1 500 Internal Server Error\r\n\r\n", Duration::ZERO);
        let e = probe_docker_host(&format!("unix://{}", bad.display())).unwrap_err();
        assert!(e.contains("500"), "{e}");
        h.join().unwrap();

        let e = ping_unix(&dir.path().join("absent.sock")).unwrap_err();
        assert!(e.contains("absent.sock"), "{e}");

        // a TCP endpoint that is not listening
        let port = free_port().unwrap();
        assert!(probe_docker_host(&format!("tcp://127.0.0.1:{port}")).is_err());
    }
}
