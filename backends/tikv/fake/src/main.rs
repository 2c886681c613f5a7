//! `cairn-tikv-fake [ADDR]`: serves the fake PD + TiKV on `ADDR` (default `127.0.0.1:2379`)
//! until interrupted, for running the `cairn` binary (and etcd's e2e suite) on the TiKV
//! backend without a real cluster: `cairn --backend tikv --tikv-pd-endpoints ADDR`.

#[tokio::main]
async fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:2379".to_string());
    let fake = match cairn_tikv_fake::FakeTikv::start_on(&addr).await {
        Ok(f) => f,
        Err(e) => {
            eprintln!("cairn-tikv-fake: cannot listen on {addr}: {e}");
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
