//! The leader's lease clock: when each lease expires.
//!
//! Deadlines are not replicated (as in etcd): keep-alives only move them in memory, and a
//! node that becomes leader (or restarts) gives every lease a full TTL from that moment.
//! Expiry itself goes through raft as a revoke, so it happens exactly once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cairn_backend::LeaseId;
use parking_lot::Mutex;

#[derive(Default)]
pub(crate) struct LeaseClock {
    inner: Mutex<HashMap<LeaseId, Lease>>,
}

struct Lease {
    ttl: i64,
    deadline: Instant,
    /// A revoke for it has been proposed.
    expiring: bool,
}

impl LeaseClock {
    pub fn reset(&self, all: Vec<(LeaseId, i64)>) {
        let now = Instant::now();
        let mut m = self.inner.lock();
        m.clear();
        for (id, ttl) in all {
            m.insert(
                id,
                Lease {
                    ttl,
                    deadline: now + secs(ttl),
                    expiring: false,
                },
            );
        }
    }

    pub fn grant(&self, id: LeaseId, ttl: i64) {
        self.inner.lock().insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + secs(ttl),
                expiring: false,
            },
        );
    }

    pub fn forget(&self, id: LeaseId) {
        self.inner.lock().remove(&id);
    }

    /// Renews a live lease to its full TTL; `None` if it is unknown or already expired.
    pub fn refresh(&self, id: LeaseId) -> Option<i64> {
        let mut m = self.inner.lock();
        let l = m.get_mut(&id)?;
        let now = Instant::now();
        if l.deadline <= now || l.expiring {
            return None;
        }
        l.deadline = now + secs(l.ttl);
        Some(l.ttl)
    }

    /// The granted TTL and the whole seconds left (truncated, as etcd reports them), if the
    /// lease exists.
    pub fn get(&self, id: LeaseId) -> Option<(i64, i64)> {
        let m = self.inner.lock();
        let l = m.get(&id)?;
        Some((l.ttl, whole_secs_left(l.deadline)))
    }

    /// Every lease, in id order.
    pub fn ids(&self) -> Vec<LeaseId> {
        let mut ids: Vec<LeaseId> = self.inner.lock().keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Leases past their deadline that nobody is revoking yet; marks them as being revoked.
    pub fn take_expired(&self) -> Vec<LeaseId> {
        let now = Instant::now();
        let mut m = self.inner.lock();
        let mut out = Vec::new();
        for (id, l) in m.iter_mut() {
            if !l.expiring && l.deadline <= now {
                l.expiring = true;
                out.push(*id);
            }
        }
        out
    }

    /// A revoke proposal failed: let the next round try again.
    pub fn retry(&self, id: LeaseId) {
        if let Some(l) = self.inner.lock().get_mut(&id) {
            l.expiring = false;
        }
    }
}

fn whole_secs_left(deadline: Instant) -> i64 {
    deadline.saturating_duration_since(Instant::now()).as_secs() as i64
}

fn secs(ttl: i64) -> Duration {
    Duration::from_secs(ttl.max(0) as u64)
}
