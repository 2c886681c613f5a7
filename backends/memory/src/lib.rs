//! Cairn's in-memory reference backend.
//!
//! Small and obviously correct rather than fast: every version of every key lives in a
//! `BTreeMap`, every revision's events in a log, and one mutex (never held across an await)
//! serialises everything. Txn semantics come from [`cairn_backend::exec`]. Nothing is durable.

mod feed;
mod store;

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cairn_backend::*;
use parking_lot::Mutex;
use tokio::sync::broadcast;

use store::{Lease, Store};

/// How often the expiry task looks for expired leases.
const EXPIRY_TICK: Duration = Duration::from_millis(100);
/// Batches a slow feed may fall behind before it re-reads the log.
const FEED_CAPACITY: usize = 1024;

/// The state a feed shares with the backend.
pub(crate) struct Shared {
    store: Mutex<Store>,
    docs: Mutex<std::collections::HashMap<String, Doc>>,
    /// Every committed batch, sent while holding `store`, so in revision order.
    feed: broadcast::Sender<Arc<ChangeBatch>>,
}

impl Shared {
    fn publish(&self, batch: Option<Arc<ChangeBatch>>) {
        if let Some(batch) = batch {
            // No receivers is fine: the log keeps the batch for later feeds.
            let _ = self.feed.send(batch);
        }
    }

    /// Revokes every lease whose deadline has passed, each at its own revision.
    fn expire_locked(&self, store: &mut Store, now: Instant) -> Result<()> {
        let mut due: Vec<LeaseId> = store.leases.iter().filter(|(_, l)| l.deadline <= now).map(|(id, _)| *id).collect();
        due.sort_unstable();
        for id in due {
            let batch = store.revoke(id)?;
            self.publish(batch);
        }
        Ok(())
    }
}

/// The in-memory backend. See the crate docs.
pub struct MemoryBackend {
    shared: Arc<Shared>,
}

impl MemoryBackend {
    /// An empty store at revision 1. Called inside a tokio runtime it starts the task that
    /// expires leases every 100 ms (the task ends when the backend is dropped); without one,
    /// expired leases are still collected at the start of every write and lease call.
    pub fn new() -> Arc<Self> {
        let (feed, _) = broadcast::channel(FEED_CAPACITY);
        let backend = Arc::new(Self { shared: Arc::new(Shared { store: Mutex::new(Store::new()), docs: Mutex::default(), feed }) });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(expiry_task(Arc::downgrade(&backend)));
        }
        backend
    }

    /// Runs `f` on the store after collecting expired leases.
    fn with_expired<T>(&self, f: impl FnOnce(&Shared, &mut Store) -> Result<T>) -> Result<T> {
        let mut store = self.shared.store.lock();
        self.shared.expire_locked(&mut store, Instant::now())?;
        f(&self.shared, &mut store)
    }
}

async fn expiry_task(backend: Weak<MemoryBackend>) {
    let mut tick = tokio::time::interval(EXPIRY_TICK);
    loop {
        tick.tick().await;
        let Some(backend) = backend.upgrade() else { return };
        let _ = backend.with_expired(|_, _| Ok(()));
    }
}

/// A random positive non-zero lease ID not in use.
fn new_lease_id(store: &Store) -> LeaseId {
    loop {
        let id = cairn_backend::lease_id_to_try(0);
        if !store.leases.contains_key(&id) {
            return id;
        }
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    async fn range(&self, req: RangeRequest) -> Result<RangeResponse> {
        store::range(&self.shared.store.lock(), &req)
    }

    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse> {
        self.with_expired(|shared, store| {
            let (resp, batch) = store.run_txn(&req)?;
            shared.publish(batch);
            Ok(resp)
        })
    }

    async fn compact(&self, rev: Revision, _physical: bool) -> Result<CompactResponse> {
        let mut store = self.shared.store.lock();
        if rev <= store.compact {
            return Err(BackendError::Compacted { compact_revision: store.compact });
        }
        if rev > store.rev {
            return Err(BackendError::FutureRevision);
        }
        store.compact_to(rev);
        Ok(CompactResponse { revision: store.rev })
    }

    async fn watch(&self, from: Revision) -> Result<FeedStream> {
        feed::open(self.shared.clone(), from)
    }

    async fn current_revision(&self) -> Result<(Revision, Revision)> {
        let store = self.shared.store.lock();
        Ok((store.rev, store.compact))
    }

    async fn lease_grant(&self, id: LeaseId, ttl: i64) -> Result<LeaseGrant> {
        self.with_expired(|_, store| {
            let id = if id == 0 { new_lease_id(store) } else { id };
            if store.leases.contains_key(&id) {
                return Err(BackendError::LeaseExists);
            }
            let deadline = Instant::now() + Duration::from_secs(ttl.max(0) as u64);
            store.leases.insert(id, Lease { ttl, deadline });
            Ok(LeaseGrant { id, ttl, revision: store.rev })
        })
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<Revision> {
        self.with_expired(|shared, store| {
            if !store.leases.contains_key(&id) {
                return Err(BackendError::LeaseNotFound);
            }
            let batch = store.revoke(id)?;
            shared.publish(batch);
            Ok(store.rev)
        })
    }

    async fn lease_keep_alive(&self, id: LeaseId) -> Result<i64> {
        self.with_expired(|_, store| {
            let lease = store.leases.get_mut(&id).ok_or(BackendError::LeaseNotFound)?;
            lease.deadline = Instant::now() + Duration::from_secs(lease.ttl.max(0) as u64);
            Ok(lease.ttl)
        })
    }

    async fn lease_time_to_live(&self, id: LeaseId, keys: bool) -> Result<LeaseInfo> {
        self.with_expired(|_, store| {
            let lease = store.leases.get(&id).ok_or(BackendError::LeaseNotFound)?;
            // etcd reports int64(remaining.Seconds()): whole seconds, truncated.
            let ttl = lease.deadline.saturating_duration_since(Instant::now()).as_secs() as i64;
            let granted_ttl = lease.ttl;
            let keys = if keys { store.attached_keys(id) } else { Vec::new() };
            Ok(LeaseInfo { id, ttl, granted_ttl, keys, revision: store.rev })
        })
    }

    async fn lease_leases(&self) -> Result<Vec<LeaseId>> {
        self.with_expired(|_, store| {
            let mut ids: Vec<LeaseId> = store.leases.keys().copied().collect();
            ids.sort_unstable();
            Ok(ids)
        })
    }

    async fn status(&self) -> Result<BackendStatus> {
        let store = self.shared.store.lock();
        let size = store.size();
        Ok(BackendStatus {
            revision: store.rev,
            compact_revision: store.compact,
            db_size: size,
            db_size_in_use: size,
            is_leader: true,
            ..BackendStatus::default()
        })
    }

    async fn hash_kv(&self, rev: Revision) -> Result<HashKv> {
        let store = self.shared.store.lock();
        let hash_revision = if rev <= 0 { store.rev } else { rev };
        if hash_revision > store.rev {
            return Err(BackendError::FutureRevision);
        }
        if hash_revision < store.compact {
            return Err(BackendError::Compacted { compact_revision: store.compact });
        }
        Ok(HashKv {
            hash: store::hash_events(&store, hash_revision),
            compact_revision: store.compact,
            hash_revision,
            revision: store.rev,
        })
    }

    async fn defragment(&self) -> Result<()> {
        Ok(())
    }

    async fn doc_get(&self, name: &str) -> Result<Option<Doc>> {
        Ok(self.shared.docs.lock().get(name).cloned())
    }

    async fn doc_put(&self, name: &str, expected: u64, value: Vec<u8>) -> Result<Option<u64>> {
        let mut docs = self.shared.docs.lock();
        let current = docs.get(name).map_or(0, |d| d.version);
        if current != expected {
            return Ok(None);
        }
        docs.insert(name.to_string(), Doc { version: expected + 1, value });
        Ok(Some(expected + 1))
    }
}
