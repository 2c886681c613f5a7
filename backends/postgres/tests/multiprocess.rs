//! Several Cairn processes on one database are one etcd. Each backend instance here has its own
//! pool, writer, LISTEN connection, tailer and lease sweeper, exactly as a separate process
//! would; `separate_os_process_writes_reach_this_one` also runs a real second OS process.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_backend::*;
use cairn_backend_tests::util::{collect_until, eventually, get, ops, put, put_lease, put_op, put_req, rev, single, WAIT};
use cairn_postgres::{testing, PostgresBackend, PostgresOptions};
use futures::StreamExt;

fn opts(name: &str) -> PostgresOptions {
    PostgresOptions { max_connections: 6, application_name: name.to_string(), ..PostgresOptions::default() }
}

async fn instance(url: &str, o: PostgresOptions) -> Arc<PostgresBackend> {
    PostgresBackend::connect(url, o).await.expect("connect an instance")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap()
}

/// Revisions of every write through two instances are unique and gap-free, and per-key
/// versions count every put.
#[test]
fn revisions_unique_and_gap_free_across_instances() {
    rt().block_on(async {
        let url = testing::server().create_database().await.unwrap();
        let a = instance(&url, opts("cairn-a")).await;
        let b = instance(&url, opts("cairn-b")).await;
        const TASKS: usize = 8;
        const PUTS: usize = 60;
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let be = if t % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                let mut revs = Vec::new();
                for i in 0..PUTS {
                    let key = if t % 4 < 2 { format!("shared/{}", i % 3) } else { format!("own/{t}/{i}") };
                    revs.push(put(&*be, &key, &format!("{t}-{i}")).await);
                }
                revs
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort_unstable();
        let want: Vec<Revision> = (2..2 + (TASKS * PUTS) as i64).collect();
        assert_eq!(all, want, "every write took its own revision, with no gaps, across both instances");
        assert_eq!(rev(&*a).await, 1 + (TASKS * PUTS) as i64);
        assert_eq!(rev(&*b).await, rev(&*a).await, "both instances agree on the revision");
        let total_shared: i64 = futures::future::join_all((0..3).map(|k| {
            let a = a.clone();
            async move { get(&*a, &format!("shared/{k}")).await.unwrap().version }
        }))
        .await
        .into_iter()
        .sum();
        assert_eq!(total_shared, (4 * PUTS) as i64, "versions of shared keys count every put from both instances");
        a.shutdown().await;
        b.shutdown().await;
    });
}

/// A write through one instance reaches a watcher on another within milliseconds, woken by
/// NOTIFY (the watcher's fallback poll is set to a minute, so only the notification can wake it).
#[test]
fn write_reaches_watcher_on_other_instance_within_milliseconds() {
    rt().block_on(async {
        let url = testing::server().create_database().await.unwrap();
        let a = instance(&url, opts("cairn-a")).await;
        let b = instance(&url, PostgresOptions { feed_poll_interval: Duration::from_secs(60), ..opts("cairn-b") }).await;
        let mut feed = b.watch(0).await.unwrap();
        // The first item of a feed from now is progress.
        assert!(matches!(tokio::time::timeout(WAIT, feed.next()).await.unwrap().unwrap().unwrap(), FeedItem::Progress(_)));
        let mut latencies = Vec::new();
        for i in 0..30 {
            let t0 = Instant::now();
            let r = put(&*a, "k", &i.to_string()).await;
            loop {
                match tokio::time::timeout(WAIT, feed.next()).await.expect("an event within the wait").unwrap().unwrap() {
                    FeedItem::Changes(c) => {
                        assert_eq!(c.revision, r, "the watcher gets the write's revision, in order");
                        break;
                    }
                    FeedItem::Progress(_) => {}
                }
            }
            latencies.push(t0.elapsed());
        }
        latencies.sort();
        let median = latencies[latencies.len() / 2];
        let max = *latencies.last().unwrap();
        println!("put on A -> event on B's watcher: median {median:?}, max {max:?} (includes the put itself)");
        assert!(median < Duration::from_millis(100), "median cross-instance watch latency {median:?}");
        assert!(max < Duration::from_millis(1000), "max cross-instance watch latency {max:?}");
        a.shutdown().await;
        b.shutdown().await;
    });
}

/// Compare-and-swap increments from two instances never lose an update: the counter's history
/// is 1, 2, 3, ... with no value twice.
#[test]
fn compare_and_swap_is_atomic_across_instances() {
    rt().block_on(async {
        let url = testing::server().create_database().await.unwrap();
        let a = instance(&url, opts("cairn-a")).await;
        let b = instance(&url, opts("cairn-b")).await;
        let start = put(&*a, "n", "0").await;
        const TASKS: usize = 6;
        const INCS: usize = 20;
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let be = if t % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                let mut retries = 0;
                for _ in 0..INCS {
                    loop {
                        let cur = get(&*be, "n").await.unwrap();
                        let v: i64 = String::from_utf8(cur.value).unwrap().parse().unwrap();
                        let resp = be
                            .txn(TxnRequest {
                                compare: vec![Compare { result: CompareResult::Equal, target: CompareTarget::Mod(cur.mod_revision), range: single("n") }],
                                success: vec![put_op("n", &(v + 1).to_string())],
                                failure: vec![],
                            })
                            .await
                            .unwrap();
                        if resp.succeeded {
                            break;
                        }
                        retries += 1;
                    }
                }
                retries
            }));
        }
        let mut retries = 0;
        for t in tasks {
            retries += t.await.unwrap();
        }
        let total = (TASKS * INCS) as i64;
        let n = get(&*b, "n").await.unwrap();
        assert_eq!(String::from_utf8(n.value).unwrap(), total.to_string(), "no increment lost ({retries} CAS retries)");
        assert_eq!(n.version, total + 1);
        let last = rev(&*a).await;
        let mut feed = a.watch(start).await.unwrap();
        let values: Vec<i64> = collect_until(&mut feed, last)
            .await
            .iter()
            .flat_map(|b| b.events.iter().map(|e| String::from_utf8(e.kv.value.clone()).unwrap().parse::<i64>().unwrap()))
            .collect();
        assert_eq!(values, (0..=total).collect::<Vec<_>>(), "the counter's history has each value once, in order");
        a.shutdown().await;
        b.shutdown().await;
    });
}

/// The same with txns that name several keys, so that each writer's batch reads its keys ahead
/// in one statement: a CAS must still see the writes of the batch's earlier txns (flushed or
/// not) and of the other instance. Each task increments its counter (three counters, several
/// tasks each) and records its last increment under a key of its own, in the same txn.
#[test]
fn compare_and_swap_stays_atomic_when_batches_read_ahead() {
    rt().block_on(async {
        let url = testing::server().create_database().await.unwrap();
        let a = instance(&url, opts("cairn-a")).await;
        let b = instance(&url, opts("cairn-b")).await;
        for c in 0..3 {
            put(&*a, &format!("n{c}"), "0").await;
        }
        const TASKS: usize = 12;
        const INCS: usize = 15;
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let be = if t % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                let counter = format!("n{}", t % 3);
                for i in 0..INCS {
                    loop {
                        let cur = get(&*be, &counter).await.unwrap();
                        let v: i64 = String::from_utf8(cur.value).unwrap().parse().unwrap();
                        let resp = be
                            .txn(TxnRequest {
                                compare: vec![Compare { result: CompareResult::Equal, target: CompareTarget::Mod(cur.mod_revision), range: single(&counter) }],
                                success: vec![put_op(&counter, &(v + 1).to_string()), put_op(&format!("last/{t}"), &i.to_string())],
                                failure: vec![RequestOp::Range(RangeRequest { range: single(&counter), ..Default::default() })],
                            })
                            .await
                            .unwrap();
                        if resp.succeeded {
                            break;
                        }
                        // The failure branch read the counter the compare saw: newer than ours.
                        let Some(ResponseOp::Range(r)) = resp.responses.first() else { panic!("no range response") };
                        assert!(r.kvs[0].mod_revision > cur.mod_revision, "a CAS failed against the revision it read");
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        for c in 0..3 {
            let n = get(&*b, &format!("n{c}")).await.unwrap();
            let total = (TASKS / 3 * INCS) as i64;
            assert_eq!(String::from_utf8(n.value).unwrap(), total.to_string(), "counter {c}: no increment lost");
            assert_eq!(n.version, total + 1, "counter {c}: one version per increment");
        }
        for t in 0..TASKS {
            let last = get(&*a, &format!("last/{t}")).await.unwrap();
            assert_eq!(String::from_utf8(last.value).unwrap(), (INCS - 1).to_string());
            assert_eq!(last.version, INCS as i64, "task {t}: one version per increment");
        }
        a.shutdown().await;
        b.shutdown().await;
    });
}

/// Leases expire once: three instances sweep every 20 ms, yet each lease's keys are deleted in
/// exactly one revision, and the revisions stay gap-free.
#[test]
fn lease_expiry_happens_once_across_instances() {
    rt().block_on(async {
        let url = testing::server().create_database().await.unwrap();
        let fast = |n: &str| PostgresOptions { lease_sweep_interval: Duration::from_millis(20), ..opts(n) };
        let a = instance(&url, fast("cairn-a")).await;
        let b = instance(&url, fast("cairn-b")).await;
        let c = instance(&url, fast("cairn-c")).await;
        const LEASES: usize = 20;
        let mut leases = Vec::new();
        for i in 0..LEASES {
            let id = a.lease_grant(0, 1).await.unwrap().id;
            put_lease(&*b, &format!("l{i}/x"), "v", id).await;
            put_lease(&*c, &format!("l{i}/y"), "v", id).await;
            leases.push(id);
        }
        let after_puts = rev(&*a).await;
        assert_eq!(after_puts, 1 + 2 * LEASES as i64);
        let bb: &dyn Backend = &*b;
        eventually(Duration::from_secs(10), "every lease expired", || async move { bb.lease_leases().await.unwrap().is_empty() }).await;
        let last = rev(&*a).await;
        assert_eq!(last, after_puts + LEASES as i64, "one revision per expired lease, no more");
        let mut feed = c.watch(after_puts + 1).await.unwrap();
        let batches = collect_until(&mut feed, last).await;
        let mut deleted: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
        for batch in &batches {
            let lease_ids: BTreeSet<_> = batch.events.iter().map(|e| e.prev_kv.as_ref().unwrap().lease).collect();
            assert_eq!(lease_ids.len(), 1, "one lease per expiry revision");
            assert_eq!(batch.events.len(), 2, "both keys of a lease go at one revision");
            for e in &batch.events {
                assert_eq!(e.kind, EventKind::Delete);
                *deleted.entry(e.kv.key.clone()).or_default() += 1;
            }
        }
        assert_eq!(deleted.len(), 2 * LEASES, "every attached key was deleted");
        assert!(deleted.values().all(|&n| n == 1), "each key deleted exactly once: {deleted:?}");
        for be in [&a, &b, &c] {
            assert_err_not_found(be.lease_keep_alive(leases[0]).await);
            be.shutdown().await;
        }
    });
}

fn assert_err_not_found<T: std::fmt::Debug>(r: Result<T>) {
    assert!(matches!(r, Err(BackendError::LeaseNotFound)), "expected LeaseNotFound, got {r:?}");
}

/// Connections of one instance are killed over and over (pg_terminate_backend) while both
/// instances write: its watcher still delivers every revision exactly once, its writes either
/// fail with an etcd error or are in the history (no acknowledged write lost).
#[test]
fn connection_loss_loses_no_event_and_no_acknowledged_write() {
    rt().block_on(async {
        let url = testing::server().create_database().await.unwrap();
        let a = instance(&url, opts("cairn-a")).await;
        let b = instance(&url, opts("cairn-victim")).await;
        let mut watcher = b.watch(2).await.unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let killer = {
            let (url, stop) = (url.clone(), stop.clone());
            tokio::spawn(async move {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
                let mut killed = 0i64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let n: i64 = sqlx::query_scalar(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'cairn-victim'",
                    )
                    .fetch_one(&mut conn)
                    .await
                    .unwrap();
                    killed += n;
                    tokio::time::sleep(Duration::from_millis(40)).await;
                }
                killed
            })
        };
        let writer_a = {
            let a = a.clone();
            tokio::spawn(async move {
                for i in 0..150 {
                    put(&*a, &format!("a/{i}"), "v").await;
                }
            })
        };
        let mut acked = Vec::new();
        let mut failed = 0;
        for i in 0..100 {
            let key = format!("b/{i}");
            match put_req(&*b, PutRequest { key: key.clone().into_bytes(), value: b"v".to_vec(), ..PutRequest::default() }).await {
                Ok(p) => acked.push((key, p.revision)),
                Err(BackendError::Unavailable(_)) => failed += 1,
                Err(e) => panic!("a write during connection loss failed with {e:?}, not an etcd-style Unavailable"),
            }
        }
        writer_a.await.unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let killed = killer.await.unwrap();
        let last = rev(&*a).await;
        let live = collect_until(&mut watcher, last).await;
        let mut replay = a.watch(2).await.unwrap();
        let history = collect_until(&mut replay, last).await;
        let revs: Vec<Revision> = history.iter().map(|b| b.revision).collect();
        assert_eq!(revs, (2..=last).collect::<Vec<_>>(), "the history is gap-free");
        let unwrap = |v: &[Arc<ChangeBatch>]| v.iter().map(|b| (**b).clone()).collect::<Vec<_>>();
        assert_eq!(unwrap(&live), unwrap(&history), "the victim's watcher delivered every revision exactly once");
        let at: BTreeMap<Vec<u8>, Revision> =
            history.iter().flat_map(|b| b.events.iter().map(move |e| (e.kv.key.clone(), b.revision))).collect();
        for (key, r) in &acked {
            assert_eq!(at.get(key.as_bytes()), Some(r), "acknowledged write {key} at {r} is in the history");
        }
        println!("killed {killed} connections; victim writes: {} acknowledged, {failed} failed with Unavailable", acked.len());
        assert!(killed > 0, "the test killed connections");
        a.shutdown().await;
        b.shutdown().await;
    });
}

/// An instance that starts, stops and starts again while another writes: a watcher on the
/// restarted one, started from where the first left off, continues without loss or repeat.
#[test]
fn instance_restart_resumes_feed_without_loss() {
    rt().block_on(async {
        let url = testing::server().create_database().await.unwrap();
        let a = instance(&url, opts("cairn-a")).await;
        let b = instance(&url, opts("cairn-b")).await;
        for i in 0..20 {
            put(&*a, &format!("k{i}"), "1").await;
        }
        let mut feed = b.watch(2).await.unwrap();
        let first = collect_until(&mut feed, 21).await;
        drop(feed);
        b.shutdown().await;
        drop(b);
        for i in 0..20 {
            ops(&*a, vec![put_op(&format!("k{i}"), "2"), put_op(&format!("j{i}"), "2")]).await;
        }
        let b = instance(&url, opts("cairn-b")).await;
        let mut feed = b.watch(first.last().unwrap().revision + 1).await.unwrap();
        let second = collect_until(&mut feed, 41).await;
        let revs: Vec<Revision> = first.iter().chain(second.iter()).map(|b| b.revision).collect();
        assert_eq!(revs, (2..=41).collect::<Vec<_>>(), "nothing lost or repeated across the restart");
        a.shutdown().await;
        b.shutdown().await;
    });
}

/// A real second OS process (this test binary re-run with CAIRN_PG_CHILD_URL set) writes while
/// this one writes and watches.
#[test]
fn separate_os_process_writes_reach_this_one() {
    rt().block_on(async {
        let url = testing::server().create_database().await.unwrap();
        let a = instance(&url, opts("cairn-parent")).await;
        let mut feed = a.watch(2).await.unwrap();
        let exe = std::env::current_exe().unwrap();
        let mut child = tokio::process::Command::new(exe)
            .args(["--exact", "child_process_writer", "--nocapture", "--test-threads=1"])
            .env("CAIRN_PG_CHILD_URL", &url)
            // Its own "test result" line would confuse readers of this binary's output.
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn the child process");
        let mut mine = Vec::new();
        for i in 0..100 {
            mine.push(put(&*a, &format!("parent/{i}"), "v").await);
        }
        let status = child.wait().await.unwrap();
        assert!(status.success(), "the child process failed: {status}");
        let last = rev(&*a).await;
        assert_eq!(last, 201, "100 writes from each process, revisions 2..=201");
        let batches = collect_until(&mut feed, last).await;
        let revs: Vec<Revision> = batches.iter().map(|b| b.revision).collect();
        assert_eq!(revs, (2..=201).collect::<Vec<_>>(), "the watcher saw every revision of both processes once");
        let child_keys = batches.iter().filter(|b| b.events[0].kv.key.starts_with(b"child/")).count();
        assert_eq!(child_keys, 100, "the child's writes reached this process's watcher");
        a.shutdown().await;
    });
}

/// The child side of `separate_os_process_writes_reach_this_one`; does nothing on its own.
#[test]
fn child_process_writer() {
    let Ok(url) = std::env::var("CAIRN_PG_CHILD_URL") else { return };
    rt().block_on(async {
        let b = instance(&url, opts("cairn-child")).await;
        for i in 0..100 {
            put(&*b, &format!("child/{i}"), "v").await;
        }
        b.shutdown().await;
    });
}
