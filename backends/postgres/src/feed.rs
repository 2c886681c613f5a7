//! The change feed across processes.
//!
//! The change log is the `kv` table read by revision; notifications are only a wake-up. One
//! tailer per process reads every revision after the last one it delivered whenever it is
//! woken: by this process's writer after a commit, by a `NOTIFY` from any process (a listener
//! task on its own connection), by a fallback tick, and after the listener reconnects (a
//! notification sent while the connection was down is lost, the re-read is not). It reads the
//! counter row and the rows in one statement (one snapshot); since revisions are assigned under
//! the counter row's lock and committed with it, every revision up to the counter is complete
//! in that snapshot. It broadcasts each revision once, in order, to the process's feeds.
//!
//! A feed subscribes to the broadcast before it reads history from the database, then takes
//! only revision `next` from the broadcast, dropping what it already has; when the broadcast
//! lags or skips, it reads from `next` in the database again. So nothing is lost or repeated
//! when writes race the feed's start, when a reader is slow, or when notifications are lost.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use cairn_backend::{BackendError, ChangeBatch, FeedItem, FeedStream, Result, Revision};
use sqlx::postgres::PgListener;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::watch;

use crate::sql::{self, db_err, is_transient};
use crate::writer::CHANNEL;
use crate::Inner;

/// Revisions read from the database per query.
const CHUNK: i64 = 512;
/// How long a feed waits for a change before it reports progress.
const IDLE: Duration = Duration::from_millis(100);
/// Consecutive failed history reads (100 ms apart) before a feed gives up with an error.
const CATCH_UP_RETRIES: u32 = 300;

/// Reads revisions `from..=min(to, from + CHUNK - 1)` in one snapshot (one statement), where
/// `to` is the current revision. Returns the batches, the snapshot's (revision, compact
/// revision), and the last revision covered.
async fn read_chunk(inner: &Inner, from: Revision) -> Result<(Vec<Arc<ChangeBatch>>, Revision, Revision, Revision), sqlx::Error> {
    let mut conn = inner.pool.acquire().await?;
    let (batches, rev, compact) = sql::read_events(&mut conn, from, from.saturating_add(CHUNK - 1)).await?;
    let to = rev.min(from.saturating_add(CHUNK - 1));
    Ok((batches, rev, compact, to))
}

/// The tailer: delivers every committed revision once, in order, to this process's feeds.
pub(crate) async fn tailer(inner: Arc<Inner>, start: Revision) {
    let mut shutdown = inner.shutdown.subscribe();
    let mut tail = start;
    let mut tick = tokio::time::interval(inner.opts.feed_poll_interval);
    loop {
        tokio::select! {
            _ = inner.wake.notified() => {
                // A notification of this process's own commit, already read after the commit.
                if inner.committed.load(Ordering::Acquire) <= tail && !inner.recheck.swap(false, Ordering::AcqRel) {
                    continue;
                }
            }
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        loop {
            inner.tail_reads.fetch_add(1, Ordering::Relaxed);
            match read_chunk(&inner, tail + 1).await {
                Ok((batches, rev, compact, to)) => {
                    // Below the compaction point the log is incomplete: never broadcast it.
                    // Feeds that see the jump re-read and report the compaction.
                    for b in batches {
                        let _ = inner.feed.send(b);
                    }
                    tail = tail.max(to).max(compact - 1);
                    if tail >= rev {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "postgres: change feed read failed; retrying on the next tick");
                    break;
                }
            }
        }
    }
}

/// Listens for notifications on a connection of its own and wakes the tailer; reconnects
/// (waking the tailer, since notifications may have been missed) when the connection drops.
pub(crate) async fn listener(inner: Arc<Inner>) {
    let mut shutdown = inner.shutdown.subscribe();
    loop {
        let connected = async {
            let mut l = PgListener::connect_with(&inner.pool).await?;
            l.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let connected = tokio::select! {
            r = connected => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let mut l = match connected {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "postgres: LISTEN connection failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    _ = shutdown.wait_for(|s| *s) => return,
                }
            }
        };
        // (Re)connected: anything may have been missed meanwhile.
        inner.recheck.store(true, Ordering::Release);
        inner.wake.notify_one();
        loop {
            let r = tokio::select! {
                r = l.try_recv() => r,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            match r {
                Ok(Some(n)) => {
                    // The payload is the committed revision (see the writer).
                    if let Ok(rev) = n.payload().parse::<Revision>() {
                        inner.committed.fetch_max(rev, Ordering::AcqRel);
                    } else {
                        inner.recheck.store(true, Ordering::Release);
                    }
                    inner.wake.notify_one();
                }
                Ok(None) => {
                    tracing::warn!("postgres: LISTEN connection lost; reconnecting");
                    inner.recheck.store(true, Ordering::Release);
                    inner.wake.notify_one();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "postgres: LISTEN failed; reconnecting");
                    inner.recheck.store(true, Ordering::Release);
                    inner.wake.notify_one();
                    break;
                }
            }
        }
    }
}

struct Feed {
    inner: Arc<Inner>,
    rx: broadcast::Receiver<Arc<ChangeBatch>>,
    shutdown: watch::Receiver<bool>,
    /// The next revision to deliver.
    next: Revision,
    /// Read from the database from `next` before taking more from the broadcast.
    catching_up: bool,
    pending: VecDeque<Result<FeedItem>>,
    /// Changes were delivered after the last `Progress`.
    unreported: bool,
    done: bool,
    /// Consecutive failed history reads.
    failures: u32,
}

pub(crate) async fn open(inner: Arc<Inner>, from: Revision) -> Result<FeedStream> {
    // Subscribe first: whatever is committed after the read below comes through the broadcast.
    let rx = inner.feed.subscribe();
    let mut conn = inner.pool.acquire().await.map_err(db_err)?;
    let (rev, compact) = sql::read_meta(&mut conn, false).await.map_err(db_err)?;
    drop(conn);
    // As etcd: a watch may start at the compact revision itself, not below it.
    if from > 0 && from < compact {
        return Err(BackendError::Compacted { compact_revision: compact });
    }
    let next = if from <= 0 { rev + 1 } else { from };
    let shutdown = inner.shutdown.subscribe();
    let feed = Feed { inner, rx, shutdown, next, catching_up: true, pending: VecDeque::new(), unreported: false, done: false, failures: 0 };
    Ok(Box::pin(futures::stream::unfold(feed, |mut feed| async move {
        let item = feed.next_item().await?;
        Some((item, feed))
    })))
}

impl Feed {
    /// Reads the next chunk of history from the database; after the last one, reports
    /// progress at the snapshot's revision and goes back to the broadcast.
    async fn catch_up(&mut self) {
        match read_chunk(&self.inner, self.next).await {
            Ok((batches, rev, compact, to)) => {
                if self.next < compact && self.next <= rev {
                    self.pending.push_back(Err(BackendError::Compacted { compact_revision: compact }));
                    self.done = true;
                    return;
                }
                for b in batches {
                    self.pending.push_back(Ok(FeedItem::Changes(b)));
                }
                self.next = self.next.max(to + 1);
                if to >= rev {
                    self.catching_up = false;
                    self.pending.push_back(Ok(FeedItem::Progress(rev)));
                    self.unreported = false;
                }
            }
            Err(e) if is_transient(&e) && self.failures < CATCH_UP_RETRIES => {
                // Connection loss or a restarting server: the log is still there; try again.
                self.failures += 1;
                tracing::debug!(error = %e, attempt = self.failures, "postgres: feed read failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                return;
            }
            Err(e) => {
                // The watcher gets etcd's error and may watch again from the last revision it saw.
                self.pending.push_back(Err(db_err(e)));
                self.done = true;
                return;
            }
        }
        self.failures = 0;
    }

    async fn next_item(&mut self) -> Option<Result<FeedItem>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            if self.done || *self.shutdown.borrow() {
                return None;
            }
            if self.catching_up {
                self.catch_up().await;
                continue;
            }
            let recv = tokio::select! {
                r = tokio::time::timeout(IDLE, self.rx.recv()) => r,
                _ = self.shutdown.wait_for(|s| *s) => return None,
            };
            match recv {
                Ok(Ok(batch)) if batch.revision < self.next => {}
                Ok(Ok(batch)) if batch.revision == self.next => {
                    self.next += 1;
                    self.unreported = true;
                    return Some(Ok(FeedItem::Changes(batch)));
                }
                // A jump (compaction overtook the tailer) or a lagged receiver: the database
                // has what was missed.
                Ok(Ok(_)) | Ok(Err(RecvError::Lagged(_))) => self.catching_up = true,
                Ok(Err(RecvError::Closed)) => self.done = true,
                Err(_idle) if self.unreported => {
                    self.unreported = false;
                    return Some(Ok(FeedItem::Progress(self.next - 1)));
                }
                Err(_idle) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use cairn_backend::{Backend, FeedItem, PutRequest, RequestOp, TxnRequest};
    use futures::StreamExt;

    use super::*;
    use crate::{testing, PostgresBackend, PostgresOptions};

    /// Each commit of this process comes back as a notification; the tailer, having read the
    /// revision right after the commit, does not read the log again for it. A watcher still
    /// gets every revision once, in order.
    #[test]
    fn the_tailer_reads_once_per_local_commit() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let url = testing::server().create_database().await.unwrap();
            let opts = PostgresOptions { feed_poll_interval: Duration::from_secs(600), ..PostgresOptions::default() };
            let b = PostgresBackend::connect(&url, opts).await.unwrap();
            let mut feed = b.watch(0).await.unwrap();
            // The listener is connected (its first wake-up rechecks): reads from here on are
            // the commits'.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let before = b.inner.tail_reads.load(Ordering::Relaxed);
            const PUTS: u64 = 20;
            let mut revs = Vec::new();
            for i in 0..PUTS {
                let put = RequestOp::Put(PutRequest { key: format!("k{i}").into(), value: b"v".to_vec(), ..Default::default() });
                revs.push(b.txn(TxnRequest::unconditional(vec![put])).await.unwrap().revision);
                // Its notification arrives before the next commit.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            let reads = b.inner.tail_reads.load(Ordering::Relaxed) - before;
            assert!(
                (PUTS..PUTS + 3).contains(&reads),
                "{reads} reads of the log for {PUTS} commits (one per commit, and its notification none)"
            );
            let mut seen = Vec::new();
            while seen.len() < revs.len() {
                match tokio::time::timeout(Duration::from_secs(5), feed.next()).await.unwrap().unwrap().unwrap() {
                    FeedItem::Changes(c) => {
                        assert_eq!(c.events[0].kv.key, format!("k{}", seen.len()).into_bytes());
                        seen.push(c.revision);
                    }
                    FeedItem::Progress(_) => {}
                }
            }
            assert_eq!(seen, revs);
        });
    }
}
