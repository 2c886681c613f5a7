//! Auto-compaction: etcd's `--auto-compaction-mode` and `--auto-compaction-retention`.
//!
//! Two modes, as in etcd:
//! - **periodic** (retention a duration; a bare integer means hours): the current revision is
//!   sampled every tenth of `min(retention, 1h)`, and every `min(retention, 1h)` (the first
//!   time once `retention` has passed since start) history is compacted to the oldest sample
//!   kept, taken about `retention` ago. So `--auto-compaction-retention=1` keeps about an
//!   hour of history and compacts hourly; `=10m` keeps ten minutes and compacts every ten.
//! - **revision** (retention a count of revisions): every five minutes history is compacted
//!   to `current - retention`, unless that is not positive or was compacted last time.
//!
//! Compactions are not physical (the request returns once the compaction is applied; old
//! rows are removed in the background), a revision that is already compacted counts as done,
//! and any other failure is retried at the next sample. Only the leader compacts (a member of
//! a native cluster that is not leading samples but skips the compaction, like etcd's paused
//! compactor); on the PostgreSQL and TiKV backends every Cairn process counts as leader and
//! the second to compact a revision finds it compacted.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use cairn_backend::{Backend, BackendError, Revision};
use tokio::time::Instant;

/// How often revision mode compacts (etcd's fixed interval).
pub const REVISION_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// Longest time between periodic compactions, whatever the retention.
const MAX_PERIODIC_INTERVAL: Duration = Duration::from_secs(3600);
/// Periodic mode samples the revision this many times per compaction interval.
const SAMPLES_PER_INTERVAL: u32 = 10;

/// What the two flags ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutoCompaction {
    /// Keep about this much time of history.
    Periodic(Duration),
    /// Keep this many revisions of history.
    Revision(i64),
}

impl AutoCompaction {
    /// Checks `--auto-compaction-mode` (etcd's flag verification); the error is etcd's text.
    pub fn check_mode(mode: &str) -> Result<(), String> {
        match mode {
            "periodic" | "revision" => Ok(()),
            other => Err(format!("unknown auto-compaction-mode {other:?}")),
        }
    }

    /// Reads the two flags as etcd does: a non-negative integer is hours (periodic) or
    /// revisions (revision); anything else must be a Go duration (which in revision mode
    /// counts nanoseconds as revisions, as etcd does). `None`: a retention of zero, which
    /// turns auto-compaction off.
    pub fn parse(mode: &str, retention: &str) -> Result<Option<Self>, String> {
        Self::check_mode(mode)?;
        let retention = if retention.is_empty() { "0" } else { retention };
        let by_revision = mode == "revision";
        let parsed = match retention.parse::<i64>() {
            Ok(n) if n >= 0 && by_revision => AutoCompaction::Revision(n),
            Ok(n) if n >= 0 => AutoCompaction::Periodic(Duration::from_secs(n as u64).saturating_mul(3600)),
            _ => {
                let d = crate::godur::parse(retention).map_err(|e| format!("error parsing CompactionRetention: {e}"))?;
                match by_revision {
                    true => AutoCompaction::Revision(d.as_nanos().min(i64::MAX as u128) as i64),
                    false => AutoCompaction::Periodic(d),
                }
            }
        };
        Ok(match parsed {
            AutoCompaction::Revision(0) => None,
            AutoCompaction::Periodic(d) if d.is_zero() => None,
            a => Some(a),
        })
    }

    /// Runs the compactor until the task is aborted.
    pub fn spawn(self, backend: Arc<dyn Backend>) -> tokio::task::JoinHandle<()> {
        match self {
            AutoCompaction::Periodic(period) => tokio::spawn(periodic(backend, period)),
            AutoCompaction::Revision(keep) => tokio::spawn(by_revision(backend, keep, REVISION_INTERVAL)),
        }
    }
}

/// Periodic mode's compaction interval and sampling interval for a retention.
fn periodic_intervals(period: Duration) -> (Duration, Duration) {
    let interval = period.min(MAX_PERIODIC_INTERVAL);
    (interval, interval / SAMPLES_PER_INTERVAL)
}

async fn periodic(backend: Arc<dyn Backend>, period: Duration) {
    let (interval, tick) = periodic_intervals(period);
    // Samples cover `period` plus one tick, so the oldest was taken at least `period` ago.
    let keep = (period.as_nanos() / tick.as_nanos().max(1)) as usize + 1;
    let mut samples: VecDeque<Revision> = VecDeque::with_capacity(keep.min(1024) + 1);
    let mut last_done = Instant::now();
    // The first compaction waits a whole retention, later ones an interval.
    let mut wait = period;
    loop {
        if let Ok((rev, _)) = backend.current_revision().await {
            samples.push_back(rev);
            if samples.len() > keep {
                samples.pop_front();
            }
        }
        tokio::time::sleep(tick).await;
        if last_done.elapsed() < wait || !leads(&backend).await {
            continue;
        }
        wait = interval;
        let Some(&rev) = samples.front().filter(|r| **r > 0) else { continue };
        tracing::info!(revision = rev, compact_period = ?period, "starting auto periodic compaction");
        let started = std::time::Instant::now();
        match compact(&backend, rev).await {
            Ok(()) => {
                last_done = Instant::now();
                tracing::info!(
                    revision = rev, compact_period = ?period, took = ?started.elapsed(),
                    "completed auto periodic compaction"
                );
            }
            Err(e) => tracing::warn!(
                revision = rev, compact_period = ?period, retry_interval = ?tick, error = %e,
                "failed auto periodic compaction"
            ),
        }
    }
}

async fn by_revision(backend: Arc<dyn Backend>, keep: i64, interval: Duration) {
    let mut last: Revision = 0;
    loop {
        tokio::time::sleep(interval).await;
        if !leads(&backend).await {
            continue;
        }
        let Ok((current, _)) = backend.current_revision().await else { continue };
        let rev = current.saturating_sub(keep);
        if rev <= 0 || rev == last {
            continue;
        }
        tracing::info!(revision = rev, revision_compaction_retention = keep, "starting auto revision compaction");
        let started = std::time::Instant::now();
        match compact(&backend, rev).await {
            Ok(()) => {
                last = rev;
                tracing::info!(
                    revision = rev, revision_compaction_retention = keep, took = ?started.elapsed(),
                    "completed auto revision compaction"
                );
            }
            Err(e) => tracing::warn!(
                revision = rev, revision_compaction_retention = keep, retry_interval = ?interval, error = %e,
                "failed auto revision compaction"
            ),
        }
    }
}

/// A compaction to `rev`; one already done (or overtaken) counts as done.
async fn compact(backend: &Arc<dyn Backend>, rev: Revision) -> Result<(), BackendError> {
    match backend.compact(rev, false).await {
        Ok(_) | Err(BackendError::Compacted { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether this process should compact: it leads (a backend without members always does).
/// A backend that cannot tell is asked again at the next sample.
async fn leads(backend: &Arc<dyn Backend>) -> bool {
    backend.status().await.is_ok_and(|s| s.is_leader)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_backend::{PutRequest, RangeRequest, RequestOp, TxnRequest};

    #[test]
    fn flags_are_read_as_etcd_reads_them() {
        let p = |m, r| AutoCompaction::parse(m, r);
        assert_eq!(p("periodic", "0"), Ok(None));
        assert_eq!(p("periodic", ""), Ok(None));
        assert_eq!(p("revision", "0"), Ok(None));
        assert_eq!(p("periodic", "0s"), Ok(None));
        assert_eq!(p("periodic", "1"), Ok(Some(AutoCompaction::Periodic(Duration::from_secs(3600)))));
        assert_eq!(p("periodic", "72"), Ok(Some(AutoCompaction::Periodic(Duration::from_secs(72 * 3600)))));
        assert_eq!(p("periodic", "30m"), Ok(Some(AutoCompaction::Periodic(Duration::from_secs(1800)))));
        assert_eq!(p("revision", "1000"), Ok(Some(AutoCompaction::Revision(1000))));
        // etcd turns a duration into revisions by its nanoseconds.
        assert_eq!(p("revision", "1s"), Ok(Some(AutoCompaction::Revision(1_000_000_000))));
        assert_eq!(
            p("periodic", "abc"),
            Err("error parsing CompactionRetention: time: invalid duration \"abc\"".into())
        );
        assert_eq!(
            p("periodic", "-1"),
            Err("error parsing CompactionRetention: time: invalid duration \"-1\"".into())
        );
        assert_eq!(p("Periodic", "1"), Err("unknown auto-compaction-mode \"Periodic\"".into()));
    }

    #[test]
    fn periodic_intervals_are_etcds() {
        let h = Duration::from_secs(3600);
        assert_eq!(periodic_intervals(h), (h, Duration::from_secs(360)));
        assert_eq!(periodic_intervals(72 * h), (h, Duration::from_secs(360)));
        let m30 = Duration::from_secs(1800);
        assert_eq!(periodic_intervals(m30), (m30, Duration::from_secs(180)));
    }

    async fn put(b: &Arc<dyn Backend>, key: &str) -> Revision {
        let op = RequestOp::Put(PutRequest { key: key.into(), value: b"v".to_vec(), ..Default::default() });
        b.txn(TxnRequest::unconditional(vec![op])).await.unwrap().revision
    }

    async fn compacted(b: &Arc<dyn Backend>) -> Revision {
        b.current_revision().await.unwrap().1
    }

    async fn wait_for(what: &str, mut f: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f().await {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn revision_mode_keeps_the_last_n_revisions() {
        let b: Arc<dyn Backend> = cairn_memory::MemoryBackend::new();
        let task = tokio::spawn(by_revision(b.clone(), 3, Duration::from_millis(50)));
        // Fewer revisions than the retention: nothing to compact.
        put(&b, "a").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(compacted(&b).await, 0, "compacted with fewer revisions than the retention");
        let mut last = 0;
        for i in 0..10 {
            last = put(&b, &format!("k{i}")).await;
        }
        wait_for("a compaction to current - 3", async || compacted(&b).await == last - 3).await;
        // Reads below the compacted revision now fail, reads at it work.
        let at = |revision| RangeRequest { range: cairn_backend::KeyRange::single("k0"), revision, ..Default::default() };
        assert!(matches!(b.range(at(last - 4)).await, Err(BackendError::Compacted { .. })));
        b.range(at(last - 3)).await.unwrap();
        task.abort();
    }

    #[tokio::test]
    async fn periodic_mode_compacts_to_a_revision_at_least_the_retention_old() {
        let b: Arc<dyn Backend> = cairn_memory::MemoryBackend::new();
        let period = Duration::from_millis(600);
        let start = Instant::now();
        let task = tokio::spawn(periodic(b.clone(), period));
        // A put every 20 ms, remembering when each revision was written.
        let mut written: Vec<(Revision, Instant)> = Vec::new();
        while start.elapsed() < period * 4 {
            written.push((put(&b, "k").await, Instant::now()));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        task.abort();
        let c = compacted(&b).await;
        let (_, first) = written[0];
        assert!(c >= written.iter().find(|(_, t)| *t >= first + period).unwrap().0 - 5,
            "after 4 retentions the compaction should have passed the revisions of the first one (compacted {c})");
        // Whatever was written within the last retention is still readable.
        let cutoff = Instant::now() - period;
        let kept = written.iter().find(|(_, t)| *t >= cutoff).unwrap().0;
        assert!(c <= kept, "compacted {c}, past revision {kept} written less than a retention ago");
    }
}
