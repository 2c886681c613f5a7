//! https client URLs: certificates from files with verified client certificates, and
//! --auto-tls; checked with the real etcdctl.

mod common;

use std::path::Path;

use cairn_api::tls::ClientTls;
use cairn_api::ServerConfig;
use common::TestServer;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio::process::Command;

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files in `dir`.
fn write_pki(dir: &Path) {
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

async fn etcdctl(endpoint: &str, tls_args: &[String], args: &[&str]) -> (bool, String) {
    assert!(Path::new("/usr/bin/etcdctl").exists(), "install Debian's etcd-client for /usr/bin/etcdctl");
    let out = Command::new("/usr/bin/etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoint, "--dial-timeout", "2s", "--command-timeout", "3s"])
        .args(tls_args)
        .args(args)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn https_config(tls: ClientTls) -> ServerConfig {
    ServerConfig { listen_client_urls: vec!["https://127.0.0.1:0".into()], client_tls: tls, ..ServerConfig::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cert_auth_with_files() {
    let dir = tempfile::tempdir().unwrap();
    write_pki(dir.path());
    let p = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
    let tls = ClientTls {
        cert_file: p("server.pem"),
        key_file: p("server-key.pem"),
        trusted_ca_file: p("ca.pem"),
        client_cert_auth: true,
        ..Default::default()
    };
    let s = TestServer::start_with(https_config(tls)).await;
    let ep = format!("https://127.0.0.1:{}", s.addr.port());
    let full = vec![
        format!("--cacert={}", p("ca.pem")),
        format!("--cert={}", p("client.pem")),
        format!("--key={}", p("client-key.pem")),
    ];
    assert_eq!(etcdctl(&ep, &full, &["put", "k", "v"]).await, (true, "OK\n".into()));
    assert_eq!(etcdctl(&ep, &full, &["get", "k", "--print-value-only"]).await, (true, "v\n".into()));
    let (ok, _) = etcdctl(&ep, &full, &["endpoint", "status"]).await;
    assert!(ok, "per-endpoint maintenance over TLS");
    let no_client_cert = vec![format!("--cacert={}", p("ca.pem"))];
    let (ok, out) = etcdctl(&ep, &no_client_cert, &["get", "k"]).await;
    assert!(!ok, "a client without a certificate must be refused: {out}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_tls() {
    let s = TestServer::start_with(https_config(ClientTls { auto_tls: true, ..Default::default() })).await;
    let ep = format!("https://127.0.0.1:{}", s.addr.port());
    let insecure = vec!["--insecure-transport=false".to_string(), "--insecure-skip-tls-verify".to_string()];
    assert_eq!(etcdctl(&ep, &insecure, &["put", "k", "v"]).await, (true, "OK\n".into()));
    let (ok, _) = etcdctl(&ep, &[], &["get", "k"]).await;
    assert!(!ok, "an unverified self-signed certificate must not be trusted by default");
    s.stop().await;
}

/// As [`write_pki`], with distinct subject names (OpenSSL, so curl, takes a leaf whose subject
/// equals its issuer for self-signed); the client certificate's CN is `client`.
fn write_pki_named(dir: &Path) {
    let named = |sans: Vec<String>, cn: &str| {
        let mut p = CertificateParams::new(sans).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p
    };
    let mut ca_params = named(Vec::new(), "cairn test ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    for (name, sans) in
        [("server", vec!["127.0.0.1".to_string(), "localhost".into()]), ("client", vec!["client".into()])]
    {
        let key = KeyPair::generate().unwrap();
        let cert = named(sans, name).signed_by(&key, &ca).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem()).unwrap();
    }
}

/// curl -X POST with the client certificate; the HTTP status and body.
async fn curl_post(url: &str, dir: &Path, body: &str) -> (String, String) {
    let p = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let out = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}", "--cacert", &p("ca.pem"), "--cert", &p("client.pem")])
        .args(["--key", &p("client-key.pem"), "-X", "POST", "-d", body, url])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.to_string(), body.to_string() + &String::from_utf8_lossy(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_over_tls_and_a_client_cert_common_name() {
    let dir = tempfile::tempdir().unwrap();
    write_pki_named(dir.path());
    let p = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
    let tls = ClientTls {
        cert_file: p("server.pem"),
        key_file: p("server-key.pem"),
        trusted_ca_file: p("ca.pem"),
        client_cert_auth: true,
        ..Default::default()
    };
    let s = TestServer::start_with(https_config(tls)).await;
    let ep = format!("https://127.0.0.1:{}", s.addr.port());
    let (code, body) = curl_post(&format!("{ep}/v3/kv/put"), dir.path(), r#"{"key":"Zm9v","value":"YmFy"}"#).await;
    assert_eq!(code, "200", "{body}");
    let full = vec![
        format!("--cacert={}", p("ca.pem")),
        format!("--cert={}", p("client.pem")),
        format!("--key={}", p("client-key.pem")),
    ];
    for args in [
        &["user", "add", "root", "--new-user-password", "toor"][..],
        &["role", "add", "root"],
        &["user", "grant-role", "root", "root"],
    ] {
        let (ok, out) = etcdctl(&ep, &full, args).await;
        assert!(ok, "{args:?}: {out}");
    }
    let (ok, out) = etcdctl(&ep, &full, &["auth", "enable"]).await;
    assert!(ok, "{out}");
    // etcd's accessController: with auth on, a gateway request whose client certificate has a
    // common name is refused (the gateway would not act as that user).
    let (code, body) = curl_post(&format!("{ep}/v3/kv/range"), dir.path(), r#"{"key":"Zm9v"}"#).await;
    assert_eq!(
        (code.as_str(), body.as_str()),
        ("400", "CommonName of client sending a request against gateway will be ignored and not used as expected\n")
    );
    s.stop().await;
}
