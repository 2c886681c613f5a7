//! etcd's `ResponseHeader`: cluster and member IDs are fixed at startup, the revision comes
//! from each response, and the raft term from the backend's status, refreshed in the
//! background so that building a header never waits on the backend.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cairn_backend::{Backend, Revision};
use cairn_proto::etcdserverpb::ResponseHeader;

/// How often the raft term is re-read from the backend.
pub const TERM_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// Builds response headers. Cheap to clone; clones share the raft term.
#[derive(Clone, Debug)]
pub struct HeaderSource {
    cluster_id: u64,
    member_id: u64,
    raft_term: Arc<AtomicU64>,
}

impl HeaderSource {
    pub fn new(cluster_id: u64, member_id: u64) -> Self {
        Self { cluster_id, member_id, raft_term: Arc::new(AtomicU64::new(0)) }
    }

    pub fn cluster_id(&self) -> u64 {
        self.cluster_id
    }

    pub fn member_id(&self) -> u64 {
        self.member_id
    }

    pub fn raft_term(&self) -> u64 {
        self.raft_term.load(Ordering::Relaxed)
    }

    pub fn set_raft_term(&self, term: u64) {
        self.raft_term.store(term, Ordering::Relaxed);
    }

    /// A header for a response served at `revision`.
    pub fn header(&self, revision: Revision) -> ResponseHeader {
        ResponseHeader { cluster_id: self.cluster_id, member_id: self.member_id, revision, raft_term: self.raft_term() }
    }

    /// Reads the term once now, then keeps refreshing it every [`TERM_REFRESH_INTERVAL`]
    /// until the returned task is aborted.
    pub async fn start_refresh(&self, backend: Arc<dyn Backend>) -> tokio::task::JoinHandle<()> {
        self.refresh_once(backend.as_ref()).await;
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TERM_REFRESH_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                this.refresh_once(backend.as_ref()).await;
            }
        })
    }

    async fn refresh_once(&self, backend: &dyn Backend) {
        match backend.status().await {
            Ok(st) => self.set_raft_term(st.raft_term),
            Err(e) => tracing::debug!(error = %e, "could not refresh raft term"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_carries_ids_revision_and_term() {
        let h = HeaderSource::new(7, 9);
        h.set_raft_term(3);
        let clone = h.clone();
        clone.set_raft_term(4);
        let hdr = h.header(12);
        assert_eq!((hdr.cluster_id, hdr.member_id, hdr.revision, hdr.raft_term), (7, 9, 12, 4));
    }
}
