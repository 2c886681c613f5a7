//! The `cairn` binary on the TiKV backend, against the in-process fake PD + TiKV
//! (`cairn-tikv-fake`): two server processes on one TiKV behave as one etcd to the real
//! etcdctl (revisions are one sequence, a write through one is read and watched through the
//! other, a lease granted through one is seen and revoked through the other).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::process::{ctl, start, ETCDCTL};

use cairn_tikv_fake::FakeTikv;

#[test]
fn two_processes_on_one_tikv() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let fake = rt.block_on(FakeTikv::start()).expect("start the fake PD + TiKV");
    let pd = fake.endpoint();
    let a = start("a", &["--backend", "tikv", "--tikv-pd-endpoints", &pd]);
    let b = start("b", &["--backend", "tikv", "--tikv-pd-endpoints", &pd]);

    let mut watch = Command::new(ETCDCTL)
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &b.endpoint, "watch", "--prefix", "k"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn etcdctl watch");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ctl(&a, &["put", "k1", "v1"]), "OK\n");
    assert_eq!(ctl(&b, &["get", "k1"]), "k1\nv1\n", "a write through one process is read through the other");
    assert_eq!(ctl(&b, &["put", "k2", "v2"]), "OK\n");
    let got: serde_json::Value = serde_json::from_str(&ctl(&a, &["get", "k2", "-w", "json"])).unwrap();
    assert_eq!(got["kvs"][0]["mod_revision"], 3, "revisions are one sequence across processes");

    let lease = ctl(&a, &["lease", "grant", "60"]);
    let id = lease.split_whitespace().nth(1).expect("lease id").to_string();
    assert_eq!(ctl(&a, &["put", "k3", "v3", "--lease", &id]), "OK\n");
    assert!(ctl(&b, &["lease", "list"]).contains(&id), "a lease granted through one process is listed by the other");
    ctl(&b, &["lease", "revoke", &id]);
    assert_eq!(ctl(&a, &["get", "k3"]), "", "revoking through the other process deleted the lease's key");

    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while seen.len() < 11 && Instant::now() < deadline {
        match lines.next() {
            Some(Ok(l)) => seen.push(l),
            _ => break,
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    assert_eq!(
        seen,
        ["PUT", "k1", "v1", "PUT", "k2", "v2", "PUT", "k3", "v3", "DELETE", "k3"],
        "the watcher on b saw every write in order"
    );
    drop((a, b));
    drop(fake);
}

/// `ca.pem` signing `server.pem` (127.0.0.1) and `client.pem`, with their `-key.pem`s.
fn write_pki(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut params = CertificateParams::new(Vec::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    for (name, san) in [("server", "127.0.0.1"), ("client", "client")] {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![san.to_string()]).unwrap().signed_by(&key, &ca).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem()).unwrap();
    }
}

/// `--tikv-ca-file`, `--tikv-cert-file`, `--tikv-key-file`: the binary talks TLS to a PD +
/// TiKV that serves only TLS and requires a client certificate; one of the three alone (here
/// from the environment, `ETCD_TIKV_CA_FILE`) is refused at start with an error.
#[test]
fn tls_to_pd_and_tikv() {
    let dir = tempfile::tempdir().unwrap();
    write_pki(dir.path());
    let p = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
    let read = |f: &str| std::fs::read(dir.path().join(f)).unwrap();
    let tls = cairn_tikv_fake::FakeTls {
        cert_pem: read("server.pem"),
        key_pem: read("server-key.pem"),
        client_ca_pem: Some(read("ca.pem")),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let fake = rt.block_on(FakeTikv::start_tls("127.0.0.1:0", tls)).expect("start the fake over TLS");
    let pd = fake.endpoint();
    let (ca, cert, key) = (p("ca.pem"), p("client.pem"), p("client-key.pem"));
    let tls_flags = ["--tikv-ca-file", &ca, "--tikv-cert-file", &cert, "--tikv-key-file", &key];
    let a = start("a", &[&["--backend", "tikv", "--tikv-pd-endpoints", &pd][..], &tls_flags[..]].concat());
    assert_eq!(ctl(&a, &["put", "k", "over tls"]), "OK\n");
    assert_eq!(ctl(&a, &["get", "k", "--print-value-only"]), "over tls\n");
    drop(a);

    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["--name", "b", "--backend", "tikv", "--tikv-pd-endpoints", &pd])
        .args(["--listen-client-urls", "http://127.0.0.1:0", "--advertise-client-urls", "http://127.0.0.1:0"])
        .env("ETCD_TIKV_CA_FILE", &ca)
        .output()
        .expect("run cairn");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("missing --tikv-cert-file, --tikv-key-file"), "{err}");
    drop(fake);
}
