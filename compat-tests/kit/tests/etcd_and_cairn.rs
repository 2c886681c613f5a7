//! The kit against real etcd (/usr/bin/etcd) and against the `cairn` binary of this workspace:
//! `check` passes on both, and `diff` finds no difference between them, for every backend
//! (native, memory, and postgres on a throwaway PostgreSQL from `cairn_postgres::testing`,
//! which fails the test with the reason when no PostgreSQL can be started), and `check` over
//! TLS (with and without client certificates) on both.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cairn_compat::spawn::Server;

const ETCD: &str = "/usr/bin/etcd";

fn etcd() -> PathBuf {
    let p = PathBuf::from(ETCD);
    assert!(p.exists(), "{ETCD} is missing: install Debian's etcd-server (scripts/test does when run as root)");
    p
}

/// target/<profile>/cairn, next to the directory of this test binary (target/<profile>/deps).
fn cairn() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join("cairn");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build --workspace` in the same profile \
         (scripts/test runs `cargo build --release --workspace --all-targets`)",
        bin.display()
    );
    bin
}

fn compat(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cairn-compat")).args(args).output().expect("run cairn-compat");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn last_line(s: &str) -> &str {
    s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("")
}

async fn start(bin: PathBuf, name: &str, extra: &[&str]) -> Server {
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    Server::start(&bin, name, &extra, Duration::from_secs(60)).await.unwrap_or_else(|e| panic!("{e:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_etcd_and_cairn() {
    let e = start(etcd(), "etcd", &[]).await;
    let c = start(cairn(), "cairn", &[]).await;
    for (what, s) in [("etcd", &e), ("cairn", &c)] {
        let (ok, out) = tokio::task::spawn_blocking({
            let ep = s.endpoint.clone();
            move || compat(&["check", "--endpoints", &ep, "--allow-compact", "--allow-auth"])
        })
        .await
        .unwrap();
        println!("{out}");
        assert!(ok, "check failed against {what}:\n{out}\n--- server log ---\n{}", s.log_tail());
        assert!(last_line(&out).ends_with(" passed, 0 failed"), "closing line: {out}");
        // Only the TLS cases are skipped on a plain-text endpoint.
        assert_eq!(skipped(&out), ["tls/handshake-alpn", "tls/plaintext-refused", "tls/client-cert-required"]);
        for case in ["auth/users-roles", "auth/enable-permissions", "auth/root-role", "maintenance/snapshot"] {
            assert!(row(&out, case).contains(" pass "), "{case} did not pass against {what}:\n{out}");
        }
        assert_left_as_found(&s.endpoint).await;
        // Run again on the now non-empty server: the cases are self-contained.
        let rows = cairn_compat::check::run(&s.endpoint, false, "").await.unwrap();
        let failed: Vec<_> = rows.iter().filter(|r| r.outcome == cairn_compat::check::Outcome::Fail).collect();
        assert!(failed.is_empty(), "second run against {what}: {failed:?}");
    }
}

/// The names of the skipped cases in a `check` table, but `error/invalid-sort` (skipped on
/// etcd 3.4, which accepts out-of-range sort options).
fn skipped(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("skip"))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "error/invalid-sort")
        .collect()
}

/// The names of the failed cases in a `check` table.
fn failed(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("FAIL"))
        .filter_map(|l| l.split_whitespace().next())
        .collect()
}

/// The table row of `case`.
fn row<'a>(out: &'a str, case: &str) -> &'a str {
    out.lines().find(|l| l.split_whitespace().next() == Some(case)).unwrap_or_else(|| panic!("no row {case}:\n{out}"))
}

/// After the auth cases: auth disabled, no user or role left behind, no key of the kit left.
async fn assert_left_as_found(endpoint: &str) {
    use cairn_proto::etcdserverpb::*;
    let mut c = cairn_compat::client::connect(endpoint).await.unwrap();
    let users = c.auth.user_list(AuthUserListRequest {}).await.expect("UserList without a token").into_inner().users;
    assert!(users.is_empty(), "users left behind: {users:?}");
    let roles = c.auth.role_list(AuthRoleListRequest {}).await.unwrap().into_inner().roles;
    assert!(roles.is_empty(), "roles left behind: {roles:?}");
    let keys = c.kv.range(cairn_compat::client::get_prefix("/cairn-compat/")).await.unwrap().into_inner();
    assert_eq!(keys.count, 0, "keys left behind: {:?}", keys.kvs);
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files in `dir`
/// (rcgen, as api/tests/tls.rs).
fn write_pki(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    for (name, sans) in
        [("server", vec!["127.0.0.1".to_string(), "localhost".into()]), ("client", vec!["client".into()])]
    {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(sans).unwrap().signed_by(&key, &ca).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem()).unwrap();
    }
}

/// `check` over https against etcd and Cairn: server TLS only (with the auth cases), then with
/// `--client-cert-auth` (the kit presents a client certificate and checks that a client
/// without one is refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_over_tls_on_etcd_and_cairn() {
    let dir = tempfile::tempdir().unwrap();
    write_pki(dir.path());
    let p = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
    for client_cert_auth in [false, true] {
        let mut server_args =
            vec!["--cert-file".to_string(), p("server.pem"), "--key-file".into(), p("server-key.pem")];
        let mut files = cairn_compat::client::TlsFiles { cacert: Some(p("ca.pem").into()), ..Default::default() };
        let mut kit_args = vec!["--cacert".to_string(), p("ca.pem")];
        if client_cert_auth {
            server_args.extend(["--trusted-ca-file".to_string(), p("ca.pem"), "--client-cert-auth".into()]);
            files.cert = Some(p("client.pem").into());
            files.key = Some(p("client-key.pem").into());
            kit_args.extend(["--cert".to_string(), p("client.pem"), "--key".into(), p("client-key.pem")]);
            kit_args.push("--client-cert-auth".into());
        } else {
            kit_args.push("--allow-auth".into());
        }
        for (what, bin) in [("etcd", etcd()), ("cairn", cairn())] {
            let s = Server::start_tls(&bin, what, &server_args, Duration::from_secs(60), Some(&files))
                .await
                .unwrap_or_else(|e| panic!("{e:#}"));
            assert!(s.endpoint.starts_with("https://"), "{}", s.endpoint);
            let mut args =
                vec!["check".to_string(), "--endpoints".into(), s.endpoint.clone(), "--allow-compact".into()];
            args.extend(kit_args.iter().cloned());
            let (ok, out) =
                tokio::task::spawn_blocking(move || compat(&args.iter().map(String::as_str).collect::<Vec<_>>()))
                    .await
                    .unwrap();
            println!("{out}");
            let mode = if client_cert_auth { "with client certificates" } else { "server TLS" };
            assert!(ok, "check over TLS ({mode}) failed against {what}:\n{out}\n--- server log ---\n{}", s.log_tail());
            assert!(last_line(&out).ends_with(" passed, 0 failed"), "closing line: {out}");
            let want_skipped: &[&str] = if client_cert_auth {
                &["auth/users-roles", "auth/enable-permissions", "auth/root-role"]
            } else {
                &["tls/client-cert-required"]
            };
            assert_eq!(skipped(&out), want_skipped, "skipped cases over TLS ({mode}) against {what}");
        }
    }
}

fn assert_no_differences(what: &str, ok: bool, out: &str, log: &str) {
    println!("{out}");
    assert!(ok && last_line(out).ends_with(" 0 differences"), "diff etcd vs {what}:\n{out}\n{log}");
}

#[test]
fn diff_etcd_against_cairn_native_spawned() {
    let (etcd, cairn) = (etcd(), cairn());
    let (ok, out) = compat(&[
        "diff",
        "--spawn-etcd",
        etcd.to_str().unwrap(),
        "--spawn-cairn",
        cairn.to_str().unwrap(),
        "--cairn-args",
        "--backend native",
    ]);
    assert_no_differences("cairn (native)", ok, &out, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_etcd_against_cairn_memory_postgres_and_tikv() {
    let e = start(etcd(), "etcd", &[]).await;
    // Something already on the servers: revisions are compared relative to each script's start.
    let mut c = cairn_compat::client::connect(&e.endpoint).await.unwrap();
    c.kv.put(cairn_compat::client::put("unrelated", "x")).await.unwrap();
    let pg = cairn_postgres::testing::server().create_database().await.expect("create a database");
    // TiKV: the PD + TiKV test server (no real TiKV can be installed here).
    let tikv = cairn_tikv_fake::FakeTikv::start().await.expect("start the fake PD + TiKV");
    let pd = tikv.endpoint();
    // Known differences from etcd, per backend: the check cases expected to fail. A case that
    // starts passing fails the test too, so the list stays true.
    let backends: [(&str, Vec<&str>, &[&str]); 3] = [
        // The memory backend reports raft term 0 and raft index 0 (etcd: term >= 1, the index
        // grows with every write).
        ("memory", vec!["--backend", "memory"], &["maintenance/status"]),
        ("postgres", vec!["--backend", "postgres", "--postgres-url", pg.as_str()], &[]),
        ("tikv", vec!["--backend", "tikv", "--tikv-pd-endpoints", pd.as_str()], &[]),
    ];
    for (what, args, known) in backends {
        let s = start(cairn(), "cairn", &args).await;
        let (a, b) = (e.endpoint.clone(), s.endpoint.clone());
        let (ok, out) = tokio::task::spawn_blocking(move || compat(&["diff", "--a", &a, "--b", &b])).await.unwrap();
        assert_no_differences(what, ok, &out, &format!("--- server log ---\n{}", s.log_tail()));
        // And every check case on this backend, the global ones included.
        let ep = s.endpoint.clone();
        let (ok, out) = tokio::task::spawn_blocking(move || {
            compat(&["check", "--endpoints", &ep, "--allow-compact", "--allow-auth"])
        })
        .await
        .unwrap();
        println!("{out}");
        assert_eq!(ok, known.is_empty(), "exit status of check against cairn ({what}):\n{out}");
        assert_eq!(
            failed(&out),
            known,
            "failed cases against cairn ({what}):\n{out}\n--- server log ---\n{}",
            s.log_tail()
        );
        assert_eq!(skipped(&out), ["tls/handshake-alpn", "tls/plaintext-refused", "tls/client-cert-required"]);
        assert_left_as_found(&s.endpoint).await;
    }
}
