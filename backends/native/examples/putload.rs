//! In-process put load through the Backend trait (no gRPC), for profiling the native engine:
//! `cargo run --release -p cairn-native --example putload -- <clients> <seconds>`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_backend::{Backend, PutRequest, RequestOp, TxnRequest};
use cairn_native::{NativeBackend, NativeConfig};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let clients: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(16);
    let secs: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(5);
    let dir = tempfile::tempdir().unwrap();
    let b = NativeBackend::open(NativeConfig {
        data_dir: dir.path().join("d"),
        ..Default::default()
    })
    .await
    .unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (b, done) = (b.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                let key = format!("{c:04}{n:04}").into_bytes();
                let req = TxnRequest::unconditional(vec![RequestOp::Put(PutRequest {
                    key,
                    value: vec![1; 256],
                    ..Default::default()
                })]);
                b.txn(req).await.unwrap();
                n = (n + 1) % 10_000;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n = done.load(Ordering::Relaxed);
    println!(
        "clients={clients} puts={n} ops/s={:.0}",
        n as f64 / secs as f64
    );
    b.shutdown().await.unwrap();
}
