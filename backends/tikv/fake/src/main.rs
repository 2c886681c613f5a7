//! `cairn-tikv-fake [ADDR] [--cert-file F --key-file F [--client-ca-file F]]`: serves the fake
//! PD + TiKV on `ADDR` (default `127.0.0.1:2379`) until interrupted, for running the `cairn`
//! binary (and etcd's e2e suite) on the TiKV backend without a real cluster:
//! `cairn --backend tikv --tikv-pd-endpoints ADDR`. With `--cert-file` and `--key-file` (PEM)
//! it serves TLS only; with `--client-ca-file` it also requires a client certificate signed by
//! that CA (Cairn's `--tikv-ca-file`, `--tikv-cert-file`, `--tikv-key-file`).

fn usage(msg: &str) -> ! {
    eprintln!("cairn-tikv-fake: {msg}\nusage: cairn-tikv-fake [ADDR] [--cert-file F --key-file F [--client-ca-file F]]");
    std::process::exit(2);
}

#[tokio::main]
async fn main() {
    let mut addr = "127.0.0.1:2379".to_string();
    let (mut cert, mut key, mut client_ca) = (None, None, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let slot = match a.as_str() {
            "--cert-file" => &mut cert,
            "--key-file" => &mut key,
            "--client-ca-file" => &mut client_ca,
            s if !s.starts_with("--") => {
                addr = a;
                continue;
            }
            _ => usage(&format!("unknown flag {a}")),
        };
        let Some(path) = args.next() else { usage(&format!("{a} needs a file")) };
        match std::fs::read(&path) {
            Ok(pem) => *slot = Some(pem),
            Err(e) => usage(&format!("{a} {path}: {e}")),
        }
    }
    let started = match (cert, key) {
        (None, None) if client_ca.is_none() => cairn_tikv_fake::FakeTikv::start_on(&addr).await,
        (Some(cert_pem), Some(key_pem)) => {
            let tls = cairn_tikv_fake::FakeTls { cert_pem, key_pem, client_ca_pem: client_ca };
            cairn_tikv_fake::FakeTikv::start_tls(&addr, tls).await
        }
        _ => usage("TLS needs --cert-file and --key-file"),
    };
    let fake = match started {
        Ok(f) => f,
        Err(e) => {
            eprintln!("cairn-tikv-fake: cannot serve on {addr}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("cairn-tikv-fake: serving PD and TiKV on {}", fake.endpoint());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    drop(fake);
}
