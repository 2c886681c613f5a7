//! Write throughput through the Backend trait with concurrent writers, on one instance and on
//! two instances sharing the database. Prints puts/s; asserts only correctness (gap-free).

use std::sync::Arc;
use std::time::Instant;

use cairn_backend_tests::util::{put, rev};
use cairn_postgres::{testing, PostgresBackend, PostgresOptions};

async fn run(instances: &[Arc<PostgresBackend>], writers: usize, puts: usize) -> f64 {
    let start_rev = rev(&*instances[0]).await;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let be = instances[w % instances.len()].clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..puts {
                put(&*be, &format!("w{w}/{}", i % 16), "0123456789abcdef0123456789abcdef").await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = t0.elapsed().as_secs_f64();
    let total = (writers * puts) as i64;
    assert_eq!(rev(&*instances[0]).await, start_rev + total, "one revision per put");
    total as f64 / secs
}

#[test]
fn write_throughput() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
    rt.block_on(async {
        let url = testing::server().create_database().await.unwrap();
        let o = PostgresOptions { max_connections: 8, ..PostgresOptions::default() };
        let a = PostgresBackend::connect(&url, o.clone()).await.unwrap();
        let b = PostgresBackend::connect(&url, o).await.unwrap();
        let mut lines = Vec::new();
        for (writers, puts) in [(1, 300), (16, 60), (64, 30)] {
            let r = run(std::slice::from_ref(&a), writers, puts).await;
            lines.push(format!("1 instance, {writers:>2} writers: {r:>6.0} puts/s"));
        }
        for (writers, puts) in [(2, 150), (16, 60), (64, 30)] {
            let r = run(&[a.clone(), b.clone()], writers, puts).await;
            lines.push(format!("2 instances, {writers:>2} writers: {r:>6.0} puts/s"));
        }
        for l in &lines {
            println!("{l}");
        }
        a.shutdown().await;
        b.shutdown().await;
    });
}
