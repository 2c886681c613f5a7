//! Test support: a throwaway PostgreSQL server for tests that need a real one.
//!
//! [`server`] gives the test binary's one server, started on first use: the server named by
//! `CAIRN_TEST_POSTGRES_URL` (an admin URL, e.g. `postgres://postgres@127.0.0.1:5432/postgres`)
//! when set, otherwise a fresh cluster made with Debian's PostgreSQL binaries
//! (`/usr/lib/postgresql/<version>/bin`, or `CAIRN_TEST_PG_BIN`) in a temp dir, listening on
//! a unix socket in that dir and a free port on 127.0.0.1. `initdb` refuses to run as root, so
//! as root the server runs as the `postgres` user. A watchdog process stops the server and
//! removes its directory when the test binary exits. When no server can be started, [`server`]
//! panics with the reason: a test that needs PostgreSQL fails, it never silently passes.
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
    /// For a server this process started: the cluster dir and binaries, to stop it on drop.
    owned: Option<Owned>,
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
             or point CAIRN_TEST_POSTGRES_URL at a server."
        ),
    })
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
    /// Starts a server (or adopts `CAIRN_TEST_POSTGRES_URL`) and waits until it accepts
    /// connections.
    pub fn start() -> anyhow::Result<TestServer> {
        if let Ok(url) = std::env::var("CAIRN_TEST_POSTGRES_URL") {
            return Ok(TestServer { admin_url: url, owned: None });
        }
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
        Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning the server watchdog")?;
        Ok(())
    }

    /// The URL of the maintenance database.
    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }

    /// The TCP port of a server this process started.
    pub fn port(&self) -> Option<u16> {
        self.owned.as_ref().map(|o| o.port)
    }

    /// Restarts a server this process started (`pg_ctl restart -m fast`): every connection is
    /// dropped, as in a real PostgreSQL restart. Blocks until it accepts connections again.
    pub fn restart(&self) -> anyhow::Result<()> {
        let Some(o) = &self.owned else { bail!("only a server this process started can be restarted") };
        let data = o.dir.path().join("data").display().to_string();
        let log = o.dir.path().join("log").display().to_string();
        run(o.as_postgres, &o.bin.join("pg_ctl"), &["-D", &data, "-l", &log, "-m", "fast", "-w", "-t", "60", "restart"])
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
