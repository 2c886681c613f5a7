//! TLS toward PD and TiKV (`--tikv-ca-file`, `--tikv-cert-file`, `--tikv-key-file`), against
//! the fake served with TLS only and client-certificate verification: with the right CA and a
//! client certificate Cairn connects and serves a put and a get; with another CA, or in plain
//! text, connecting fails with an error within the retry timeout (no hang).

use std::path::Path;
use std::time::{Duration, Instant};

use cairn_backend_tests::util::*;
use cairn_tikv::{TikvBackend, TikvOptions, TikvTls};
use cairn_tikv_fake::{FakeTikv, FakeTls};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

const RETRY: Duration = Duration::from_secs(5);

/// A CA and, signed by it, a certificate for each `(name, SANs)`: `<name>.pem`, `<name>-key.pem`.
fn write_ca(dir: &Path, ca_name: &str, leaves: &[(&str, Vec<String>)]) {
    let mut params = CertificateParams::new(Vec::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, ca_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join(format!("{ca_name}.pem")), ca.pem()).unwrap();
    for (name, sans) in leaves {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(sans.clone()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, *name);
        let cert = p.signed_by(&key, &ca).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem()).unwrap();
    }
}

/// `ca.pem` signing `server` (127.0.0.1, localhost) and `client`; `other-ca.pem` signing
/// `stranger` (a client certificate the fake must refuse).
fn pki() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_ca(
        dir.path(),
        "ca",
        &[("server", vec!["127.0.0.1".into(), "localhost".into()]), ("client", vec!["client".into()])],
    );
    write_ca(dir.path(), "other-ca", &[("stranger", vec!["stranger".into()])]);
    dir
}

async fn tls_fake(dir: &Path) -> FakeTikv {
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    let tls = FakeTls { cert_pem: read("server.pem"), key_pem: read("server-key.pem"), client_ca_pem: Some(read("ca.pem")) };
    FakeTikv::start_tls("127.0.0.1:0", tls).await.unwrap()
}

fn opts(tls: Option<TikvTls>) -> TikvOptions {
    TikvOptions { retry_timeout: RETRY, feed_poll_interval: Duration::from_millis(50), tls, ..TikvOptions::default() }
}

fn files(dir: &Path, ca: &str, client: &str) -> TikvTls {
    let p = |f: String| dir.join(f).to_string_lossy().into_owned();
    TikvTls::from_flags(&p(format!("{ca}.pem")), &p(format!("{client}.pem")), &p(format!("{client}-key.pem")))
        .unwrap()
        .unwrap()
}

/// Connecting fails, with an error, well within the retry timeout plus a margin.
async fn connect_fails(fake: &FakeTikv, tls: Option<TikvTls>) -> String {
    let start = Instant::now();
    let r = tokio::time::timeout(RETRY * 3, TikvBackend::connect(vec![fake.endpoint()], opts(tls)))
        .await
        .expect("connect must fail within its retry timeout, not hang");
    let Err(e) = r else { panic!("connect must fail") };
    assert!(start.elapsed() < RETRY * 2, "failed after {:?}", start.elapsed());
    eprintln!("connect failed as expected after {:?}: {e}", start.elapsed());
    e.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_and_get_over_tls_with_a_client_certificate() {
    let dir = pki();
    let fake = tls_fake(dir.path()).await;
    let b = TikvBackend::connect(vec![fake.endpoint()], opts(Some(files(dir.path(), "ca", "client"))))
        .await
        .expect("connect over TLS");
    put(&*b, "k", "over tls").await;
    let kv = get(&*b, "k").await.expect("the key");
    assert_eq!(kv.value, b"over tls");
    assert!(fake.kv_requests() > 0, "the writes went to the fake's TiKV");
    b.shutdown().await;
    // A second process sees the value, over its own TLS connections.
    let b2 = TikvBackend::connect(vec![fake.endpoint()], opts(Some(files(dir.path(), "ca", "client"))))
        .await
        .expect("second connect over TLS");
    assert_eq!(get(&*b2, "k").await.expect("the key").value, b"over tls");
    b2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_fails_with_an_error() {
    let dir = pki();
    let fake = tls_fake(dir.path()).await;
    // The server's certificate is not signed by other-ca.
    let e = connect_fails(&fake, Some(files(dir.path(), "other-ca", "client"))).await;
    assert!(e.contains("connect (TLS)") && e.contains("--tikv-ca-file"), "{e}");
    // A client certificate from another CA is refused by the server.
    let e = connect_fails(&fake, Some(files(dir.path(), "ca", "stranger"))).await;
    assert!(e.contains("connect (TLS)") && e.contains("--tikv-cert-file"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_text_against_a_tls_only_server_fails_with_an_error() {
    let dir = pki();
    let fake = tls_fake(dir.path()).await;
    let e = connect_fails(&fake, None).await;
    assert!(e.contains("connect (plain text)") && e.contains("set --tikv-ca-file"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_file_fails_before_connecting() {
    let dir = pki();
    let fake = tls_fake(dir.path()).await;
    let mut tls = files(dir.path(), "ca", "client");
    tls.key_file = dir.path().join("nope-key.pem");
    let e = connect_fails(&fake, Some(tls)).await;
    assert!(e.contains("nope-key.pem"), "{e}");
}

#[test]
fn the_three_flags_go_together() {
    assert_eq!(TikvTls::from_flags("", "", ""), Ok(None));
    let e = TikvTls::from_flags("ca.pem", "", "key.pem").unwrap_err();
    assert!(e.contains("missing --tikv-cert-file") && !e.contains("missing --tikv-ca-file"), "{e}");
    let e = TikvTls::from_flags("", "c.pem", "").unwrap_err();
    assert!(e.contains("--tikv-ca-file, --tikv-key-file"), "{e}");
    assert!(TikvTls::from_flags("a", "b", "c").unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_tls_fake_closes_its_port() {
    let dir = pki();
    let fake = tls_fake(dir.path()).await;
    let addr = fake.endpoint();
    drop(fake);
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(&addr).await.is_ok() {
        assert!(Instant::now() < deadline, "{addr} still accepts connections after the fake was dropped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
