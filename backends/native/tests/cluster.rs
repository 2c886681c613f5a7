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
}

impl Cluster {
    async fn start(n: u64) -> Cluster {
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
        let l = match l {
            Some(l) => l,
            None => TcpListener::bind(m.addr).await.unwrap(),
        };
        let cfg = NativeConfig {
            data_dir: m.dir.clone(),
            member_id: m.id,
            initial_cluster: self.initial.clone(),
            heartbeat_interval_ms: 50,
            election_timeout_ms: 300,
            ..Default::default()
        };
        let b = NativeBackend::open(cfg).await.unwrap();
        let svc = b.peer_service();
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
        let m = &mut self.members[i];
        m.backend = Some(b);
        m.server = Some((stop, server));
    }

    /// Stops member `i` (its peer server too).
    async fn stop(&mut self, i: usize) {
        let m = &mut self.members[i];
        // Like a process that exits: no connection to the old member survives.
        if let Some((stop, s)) = m.server.take() {
            let _ = stop.send(());
            let _ = tokio::time::timeout(Duration::from_secs(5), s).await;
        }
        if let Some(b) = m.backend.take() {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_members_replicate_and_survive_a_leader_stop() {
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
