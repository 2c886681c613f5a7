//! PostgreSQL itself restarts (every connection dropped) while two instances write and watch.
//! This binary starts its own server, so the restart disturbs no other test.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cairn_backend::*;
use cairn_backend_tests::util::{collect_until, put, put_req, rev};
use cairn_postgres::{testing, PostgresBackend, PostgresOptions};

#[test]
fn postgres_restart_gives_errors_or_retries_never_wrong_answers() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
    rt.block_on(async {
        let server = testing::server();
        let url = server.create_database().await.unwrap();
        let o = |n: &str| PostgresOptions { application_name: n.to_string(), acquire_timeout: Duration::from_secs(2), ..PostgresOptions::default() };
        let a = PostgresBackend::connect(&url, o("cairn-a")).await.unwrap();
        let b = PostgresBackend::connect(&url, o("cairn-b")).await.unwrap();
        put(&*a, "start", "1").await; // 2
        let mut watcher = b.watch(2).await.unwrap();
        let mut writers = Vec::new();
        for (w, be) in [a.clone(), b.clone(), a.clone(), b.clone()].into_iter().enumerate() {
            writers.push(tokio::spawn(async move {
                let (mut acked, mut failed) = (Vec::new(), 0);
                for i in 0..150 {
                    let key = format!("w{w}/{i}");
                    match put_req(&*be, PutRequest { key: key.clone().into_bytes(), value: b"v".to_vec(), ..PutRequest::default() }).await {
                        Ok(p) => acked.push((key, p.revision)),
                        Err(BackendError::Unavailable(_) | BackendError::Timeout) => {
                            failed += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => panic!("a write during a PostgreSQL restart failed with {e:?}"),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (acked, failed)
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        tokio::task::spawn_blocking(|| testing::server().restart().expect("restart PostgreSQL")).await.unwrap();
        assert!(writers.iter().all(|w| !w.is_finished()), "the restart happened while the writers were writing");
        let (mut acked, mut failed) = (Vec::new(), 0);
        for w in writers {
            let (a, f) = w.await.unwrap();
            acked.extend(a);
            failed += f;
        }
        let last = rev(&*a).await;
        let live = collect_until(&mut watcher, last).await;
        let mut replay = a.watch(2).await.unwrap();
        let history = collect_until(&mut replay, last).await;
        let revs: Vec<Revision> = history.iter().map(|b| b.revision).collect();
        assert_eq!(revs, (2..=last).collect::<Vec<_>>(), "revisions stay gap-free across the restart");
        let unwrap = |v: &[Arc<ChangeBatch>]| v.iter().map(|b| (**b).clone()).collect::<Vec<_>>();
        assert_eq!(unwrap(&live), unwrap(&history), "a watcher open across the restart delivered every revision once");
        let at: BTreeMap<Vec<u8>, Revision> =
            history.iter().flat_map(|b| b.events.iter().map(move |e| (e.kv.key.clone(), b.revision))).collect();
        for (key, r) in &acked {
            assert_eq!(at.get(key.as_bytes()), Some(r), "acknowledged write {key} at {r} survived the restart");
        }
        println!("across a PostgreSQL restart: {} writes acknowledged, {failed} failed with Unavailable, history gap-free to {last}", acked.len());
        // Both instances work normally afterwards.
        let r = put(&*b, "after", "1").await;
        assert_eq!(r, last + 1);
        a.shutdown().await;
        b.shutdown().await;
    });
}
