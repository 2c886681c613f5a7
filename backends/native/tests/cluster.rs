//! Three native members in one process, talking the peer protocol over loopback TCP: writes
//! through any member, linearizable reads on every member, watches on followers, leases kept
//! alive through a follower, and a leader that stops and comes back.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cairn_backend::{Backend, FeedItem, KeyRange, PutRequest, RangeRequest, RequestOp, TxnRequest};
use cairn_native::{NativeBackend, NativeConfig};
use futures::StreamExt;
use tokio::net::TcpListener;

struct Member {
    id: u64,
    addr: SocketAddr,
    dir: PathBuf,
    backend: Option<Arc<NativeBackend>>,
    server: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
}

struct Cluster {
    _tmp: tempfile::TempDir,
    members: Vec<Member>,
    initial: BTreeMap<u64, String>,
    /// --snapshot-count and --experimental-snapshot-catchup-entries of every member.
    snapshots: (u64, u64),
    /// A member whose WAL fsyncs take this much longer (fault injection).
    slow: Option<(usize, Duration)>,
}

impl Cluster {
    async fn start(n: u64) -> Cluster {
        Self::start_with(n, (100_000, 5_000)).await
    }

    async fn start_with(n: u64, snapshots: (u64, u64)) -> Cluster {
        Self::build(n, snapshots, None).await
    }

    async fn start_slow(n: u64, slow: Option<(usize, Duration)>) -> Cluster {
        Self::build(n, (100_000, 5_000), slow).await
    }

    async fn build(n: u64, snapshots: (u64, u64), slow: Option<(usize, Duration)>) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let mut listeners = Vec::new();
        let mut initial = BTreeMap::new();
        for id in 1..=n {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            initial.insert(id, format!("http://{}", l.local_addr().unwrap()));
            listeners.push((id, l));
        }
        let mut c = Cluster {
            members: Vec::new(),
            initial,
            snapshots,
            slow,
            _tmp: tmp,
        };
        for (id, l) in listeners {
            let dir = c._tmp.path().join(format!("m{id}"));
            c.members.push(Member {
                id,
                addr: l.local_addr().unwrap(),
                dir,
                backend: None,
                server: None,
            });
            c.open(id as usize - 1, Some(l)).await;
        }
        for m in &c.members {
            tokio::time::timeout(
                Duration::from_secs(30),
                m.backend.as_ref().unwrap().wait_ready(),
            )
            .await
            .expect("a leader within 30 s")
            .unwrap();
        }
        c
    }

    /// Opens member `i` and serves its peer service (on `l`, or on its old address).
    async fn open(&mut self, i: usize, l: Option<TcpListener>) {
        let m = &self.members[i];
        let cfg = NativeConfig {
            data_dir: m.dir.clone(),
            member_id: m.id,
            initial_cluster: self.initial.clone(),
            heartbeat_interval_ms: 50,
            election_timeout_ms: 500,
            snapshot_count: self.snapshots.0,
            snapshot_catchup_entries: self.snapshots.1,
            slow_disk: match self.slow {
                Some((j, d)) if j == i => d,
                _ => Duration::ZERO,
            },
            ..Default::default()
        };
        let b = NativeBackend::open(cfg).await.unwrap();
        self.members[i].backend = Some(b);
        self.serve(i, l).await;
    }

    /// Serves member `i`'s peer service (on `l`, or on its old address).
    async fn serve(&mut self, i: usize, l: Option<TcpListener>) {
        let m = &self.members[i];
        let l = match l {
            Some(l) => l,
            None => TcpListener::bind(m.addr).await.unwrap(),
        };
        let svc = m.backend.as_ref().unwrap().peer_service();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(l),
                    async move {
                        let _ = stopped.await;
                    },
                )
                .await;
        });
        self.members[i].server = Some((stop, server));
    }

    /// Stops serving member `i`'s peer port (it can still call the others).
    async fn stop_server(&mut self, i: usize) {
        // Like a process that exits: no connection to the old member survives.
        if let Some((stop, s)) = self.members[i].server.take() {
            let _ = stop.send(());
            let _ = tokio::time::timeout(Duration::from_secs(5), s).await;
        }
    }

    /// Stops member `i` (its peer server too).
    async fn stop(&mut self, i: usize) {
        self.stop_server(i).await;
        if let Some(b) = self.members[i].backend.take() {
            b.shutdown().await.unwrap();
        }
    }

    fn b(&self, i: usize) -> &Arc<NativeBackend> {
        self.members[i].backend.as_ref().unwrap()
    }

    async fn leader(&self) -> usize {
        for _ in 0..200 {
            for (i, m) in self.members.iter().enumerate() {
                if let Some(b) = &m.backend {
                    let st = b.status().await.unwrap();
                    if st.is_leader {
                        return i;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no leader");
    }
}

fn put(key: &str, value: &str) -> TxnRequest {
    TxnRequest::unconditional(vec![RequestOp::Put(PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    })])
}

async fn get(b: &NativeBackend, key: &str, serializable: bool) -> Option<(Vec<u8>, i64)> {
    let r = b
        .range(RangeRequest {
            range: KeyRange::single(key),
            serializable,
            ..Default::default()
        })
        .await
        .unwrap();
    r.kvs.first().map(|kv| (kv.value.clone(), kv.mod_revision))
}

/// The tests here start whole clusters with tight timers: one at a time, so that they do not
/// starve each other's elections of CPU.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_members_replicate_and_survive_a_leader_stop() {
    let _serial = serial().await;
    let mut c = Cluster::start(3).await;
    let leader = c.leader().await;
    let follower = (leader + 1) % 3;

    // Writes through every member get unique, consecutive revisions, and each member reads
    // every write linearizably right after it was acknowledged anywhere.
    let mut revs = Vec::new();
    for round in 0..5 {
        for i in 0..3 {
            let key = format!("k{round}-{i}");
            let r = c.b(i).txn(put(&key, "v")).await.unwrap();
            revs.push(r.revision);
            for j in 0..3 {
                let got = get(c.b(j), &key, false).await;
                assert_eq!(
                    got,
                    Some((b"v".to_vec(), r.revision)),
                    "member {j} reads {key}"
                );
            }
        }
    }
    let first = revs[0];
    assert_eq!(revs, (first..first + 15).collect::<Vec<_>>());

    // A watch on a follower sees a write made through the leader.
    let mut feed = c.b(follower).watch(0).await.unwrap();
    let w = c.b(leader).txn(put("watched", "x")).await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(item) = feed.next().await {
            if let FeedItem::Changes(b) = item.unwrap() {
                return b.revision;
            }
        }
        panic!("feed ended");
    })
    .await
    .expect("watch event on the follower");
    assert_eq!(seen, w.revision);
    drop(feed);

    // A lease granted through a follower lives while kept alive through that follower.
    let lease = c.b(follower).lease_grant(0, 2).await.unwrap();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(c.b(follower).lease_keep_alive(lease.id).await.unwrap(), 2);
    }
    let ttl = c
        .b(follower)
        .lease_time_to_live(lease.id, false)
        .await
        .unwrap();
    assert!(ttl.ttl >= 1, "remaining TTL {}", ttl.ttl);
    // ...and expires once nobody keeps it alive: revoked everywhere.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    for i in 0..3 {
        assert!(
            c.b(i).lease_leases().await.unwrap().is_empty(),
            "member {i} still has the lease"
        );
    }

    // Stop the leader: the other two elect a new one and keep serving writes and reads.
    let before = c.b(follower).current_revision().await.unwrap().0;
    c.stop(leader).await;
    let r = tokio::time::timeout(
        Duration::from_secs(15),
        c.b(follower).txn(put("after", "1")),
    )
    .await
    .expect("write after leader loss")
    .unwrap();
    assert_eq!(r.revision, before + 1);
    let new_leader = c.leader().await;
    assert_ne!(new_leader, leader);
    let other = 3 - leader - follower;
    assert_eq!(
        get(c.b(other), "after", false).await,
        Some((b"1".to_vec(), r.revision))
    );

    // The old leader comes back and catches up.
    c.open(leader, None).await;
    c.b(leader).wait_ready().await.unwrap();
    assert_eq!(
        get(c.b(leader), "after", false).await,
        Some((b"1".to_vec(), r.revision))
    );
    let h: Vec<_> = {
        let mut v = Vec::new();
        for i in 0..3 {
            v.push(c.b(i).hash_kv(r.revision).await.unwrap().hash);
        }
        v
    };
    assert!(h.iter().all(|x| *x == h[0]), "HashKV differs: {h:?}");

    for i in 0..3 {
        c.stop(i).await;
    }
}

/// Six clients (two per member) putting and getting (linearizable) four keys, recording a
/// history for [`cairn_backend_tests::history::check`]. Each client calls its member through
/// a slot, emptied while the member is down.
struct Workload {
    slots: Vec<Arc<parking_lot::RwLock<Option<Arc<NativeBackend>>>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    log: Arc<parking_lot::Mutex<Vec<cairn_backend_tests::history::Entry>>>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Workload {
    fn start(c: &Cluster) -> Workload {
        use cairn_backend_tests::history::{Entry, Op, Outcome};
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::Instant;
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(parking_lot::Mutex::new(Vec::<Entry>::new()));
        let slots: Vec<_> = (0..3)
            .map(|i| Arc::new(parking_lot::RwLock::new(Some(c.b(i).clone()))))
            .collect();
        let mut clients = Vec::new();
        for client in 0..6usize {
            let slot = slots[client % 3].clone();
            let (stop, log) = (stop.clone(), log.clone());
            clients.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let Some(b) = slot.read().clone() else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    n += 1;
                    let key = format!("k{}", (n as usize * 7 + client) % 4);
                    let start = Instant::now();
                    let (op, outcome) = if n % 5 < 3 {
                        let value = format!("c{client}-{n}");
                        let r =
                            tokio::time::timeout(Duration::from_secs(10), b.txn(put(&key, &value)))
                                .await;
                        let outcome = match r {
                            Ok(Ok(resp)) => Outcome::Put {
                                revision: resp.revision,
                            },
                            _ => Outcome::Unknown,
                        };
                        (Op::Put { key, value }, outcome)
                    } else {
                        let r = tokio::time::timeout(
                            Duration::from_secs(10),
                            b.range(RangeRequest {
                                range: KeyRange::single(key.clone()),
                                ..Default::default()
                            }),
                        )
                        .await;
                        let outcome = match r {
                            Ok(Ok(resp)) => Outcome::Get {
                                revision: resp.revision,
                                kv: resp.kvs.first().map(|kv| {
                                    (
                                        String::from_utf8(kv.value.clone()).unwrap(),
                                        kv.mod_revision,
                                    )
                                }),
                            },
                            _ => Outcome::Unknown,
                        };
                        (Op::Get { key }, outcome)
                    };
                    let failed = matches!(outcome, Outcome::Unknown);
                    log.lock().push(Entry {
                        start,
                        end: Instant::now(),
                        op,
                        outcome,
                    });
                    if failed {
                        // A stopped member answers at once: do not spin.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }));
        }

        Workload {
            slots,
            stop,
            log,
            clients,
        }
    }

    /// Stops the clients and returns the history, after logging its size.
    async fn finish(self) -> Vec<cairn_backend_tests::history::Entry> {
        use cairn_backend_tests::history::Outcome;
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.clients {
            t.await.unwrap();
        }
        let history = self.log.lock().clone();
        let acked = history
            .iter()
            .filter(|e| matches!(e.outcome, Outcome::Put { .. }))
            .count();
        let reads = history
            .iter()
            .filter(|e| matches!(e.outcome, Outcome::Get { .. }))
            .count();
        eprintln!(
            "history: {} operations, {acked} acknowledged puts, {reads} gets, {} unknown outcomes",
            history.len(),
            history.len() - acked - reads
        );
        assert!(
            acked > 50 && reads > 20,
            "too little happened: {acked} puts, {reads} gets"
        );
        history
    }
}

/// Concurrent clients on every member put and get (linearizable) a few keys while the leader
/// stops and comes back, a follower's peer port goes away and returns, and the leader is
/// partitioned from the majority and the partition heals; the whole history
/// must check as linearizable (cairn_backend_tests::history), acknowledged revisions unique,
/// and the members must end with the same HashKV.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_stays_linearizable_through_faults() {
    let _serial = serial().await;
    use cairn_backend_tests::history::check;
    use std::time::Instant;

    let mut c = Cluster::start(3).await;
    let w = Workload::start(&c);
    let slots = &w.slots;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The leader stops (its clients' requests fail meanwhile) and comes back.
    // Its clients' requests in flight fail (unknown outcomes); then they wait for it.
    let leader = c.leader().await;
    let old = Arc::downgrade(c.b(leader));
    *slots[leader].write() = None;
    c.stop(leader).await;
    while old.upgrade().is_some() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.open(leader, None).await;
    c.b(leader).wait_ready().await.unwrap();
    *slots[leader].write() = Some(c.b(leader).clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A follower's peer port goes away for two seconds (it can still call out).
    let leader = c.leader().await;
    let follower = (leader + 1) % 3;
    c.stop_server(follower).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.serve(follower, None).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A full partition: the leader and the two followers stop talking to each other for three
    // seconds. The majority elects a leader of its own and carries on; the old leader can
    // neither commit nor answer a linearizable read (its clients see errors), and after the
    // partition heals it follows the new leader.
    let old = c.leader().await;
    let ids: Vec<u64> = c.members.iter().map(|m| m.id).collect();
    let cut = |c: &Cluster, on: bool| {
        for j in (0..3).filter(|j| *j != old) {
            c.b(old).peers().set_blocked(ids[j], on);
            c.b(j).peers().set_blocked(ids[old], on);
        }
    };
    cut(&c, true);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let majority_leads = || {
        (0..3)
            .filter(|j| *j != old)
            .any(|j| c.b(j).raft_metrics().current_leader == Some(ids[j]))
    };
    let waited = Instant::now();
    while !majority_leads() && waited.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        majority_leads(),
        "the majority side elected no leader in 17 s"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    cut(&c, false);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let history = w.finish().await;
    check(&history).unwrap_or_else(|e| panic!("not linearizable: {e}"));
    c.converged_and_stop().await;
}

impl Cluster {
    /// Every member converges to the same key-value hash; then all stop.
    async fn converged_and_stop(mut self) {
        let rev = self.b(0).current_revision().await.unwrap().0;
        for i in 0..3 {
            self.b(i).wait_ready().await.unwrap();
            let _ = get(self.b(i), "k0", false).await;
        }
        let mut hashes = Vec::new();
        for i in 0..3 {
            hashes.push(self.b(i).hash_kv(rev).await.unwrap().hash);
            // Revisions are gap-free: every one from 2 (the first write) to `rev` is in the
            // member's change log exactly once.
            let mut feed = self.b(i).watch(2).await.unwrap();
            let mut seen = Vec::new();
            while seen.last().copied().unwrap_or(1) < rev {
                match tokio::time::timeout(Duration::from_secs(10), feed.next())
                    .await
                    .expect("change log read")
                {
                    Some(Ok(FeedItem::Changes(b))) => seen.push(b.revision),
                    Some(Ok(FeedItem::Progress(_))) => {}
                    other => panic!("change log of member {i} ended: {other:?}"),
                }
            }
            assert_eq!(
                seen,
                (2..=rev).collect::<Vec<_>>(),
                "member {i}'s revisions"
            );
        }
        assert!(
            hashes.iter().all(|h| *h == hashes[0]),
            "HashKV differs: {hashes:?}"
        );
        for i in 0..3 {
            self.stop(i).await;
        }
    }
}

/// One member's disk is slow (every WAL fsync takes 100 ms longer): as a follower it lags
/// without slowing the others down, as the leader (after MoveLeader) it slows every write;
/// either way the history stays linearizable and the members converge.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_disk_keeps_the_history_linearizable() {
    let _serial = serial().await;
    let c = Cluster::start_slow(3, Some((2, Duration::from_millis(100)))).await;
    let w = Workload::start(&c);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let slow_id = c.members[2].id;
    let leader = c.leader().await;
    if leader != 2 {
        c.b(leader).move_leader(slow_id).await.unwrap();
    }
    assert_eq!(c.leader().await, 2);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let history = w.finish().await;
    cairn_backend_tests::history::check(&history)
        .unwrap_or_else(|e| panic!("not linearizable: {e}"));
    c.converged_and_stop().await;
}

/// A member that was down while the others wrote far more than the log keeps behind a
/// snapshot catches up from a snapshot sent by the leader (restarted meanwhile), and ends with
/// the same data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lagging_member_catches_up_from_a_snapshot() {
    let _serial = serial().await;
    // A snapshot every 20 entries, 10 entries kept behind it.
    let mut c = Cluster::start_with(3, (20, 10)).await;
    let leader = c.leader().await;
    let lagging = (leader + 1) % 3;
    let behind = c.b(lagging).raft_metrics().last_log_index.unwrap_or(0);
    c.stop(lagging).await;
    let mut last = 0;
    for i in 0..300 {
        last = c
            .b(leader)
            .txn(put(&format!("key{}", i % 50), &format!("v{i}")))
            .await
            .unwrap()
            .revision;
    }
    // The leader purges the entries the member is missing (snapshots are built and the log
    // purged in the background): then only a snapshot can bring it up.
    let mut purged = 0;
    for _ in 0..200 {
        purged = c.b(leader).raft_metrics().purged.map_or(0, |l| l.index);
        if purged > behind + 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        purged > behind + 1,
        "log purged up to {purged}, member at {behind}"
    );
    // The other two restart first, so the snapshot comes from a member that has just started
    // (openraft's start-up reads only a snapshot's meta; what it sends must have the data).
    let others: Vec<usize> = (0..3).filter(|&i| i != lagging).collect();
    for &i in &others {
        c.stop(i).await;
    }
    for &i in &others {
        c.open(i, None).await;
    }
    let leader = c.leader().await;
    c.open(lagging, None).await;
    c.b(lagging).wait_ready().await.unwrap();
    assert_eq!(
        get(c.b(lagging), "key49", false).await,
        Some((b"v299".to_vec(), last))
    );
    // Serializable reads are local: the member holds the data itself.
    assert_eq!(
        get(c.b(lagging), "key0", true).await.map(|(v, _)| v),
        Some(b"v250".to_vec())
    );
    let mut hashes = Vec::new();
    for i in 0..3 {
        hashes.push(c.b(i).hash_kv(last).await.unwrap().hash);
    }
    assert!(
        hashes.iter().all(|h| *h == hashes[0]),
        "HashKV differs: {hashes:?}"
    );
    // And it keeps replicating afterwards.
    let r = c.b(leader).txn(put("after", "x")).await.unwrap();
    assert_eq!(
        get(c.b(lagging), "after", false).await,
        Some((b"x".to_vec(), r.revision))
    );
    for i in 0..3 {
        c.stop(i).await;
    }
}
