//! The change feed across processes.
//!
//! The change log (`P e <rev>`) is written in the same TiKV transaction as the revision
//! counter, so a snapshot that sees counter `r` sees every log entry up to `r`. One tailer per
//! process reads the log after the last revision it delivered whenever it is woken (a local
//! commit) or on a poll tick (other processes' commits), and broadcasts each revision once, in
//! order, to the process's feeds.
//!
//! A feed subscribes to the broadcast before it reads history from TiKV, then takes only
//! revision `next` from the broadcast, dropping what it already has; when the broadcast lags
//! or skips, it reads from `next` in TiKV again. So nothing is lost or repeated when writes
//! race the feed's start, when a reader is slow, or when a process misses a wake-up.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use cairn_backend::exec::TxnView;
use cairn_backend::{BackendError, ChangeBatch, FeedItem, FeedStream, Result, Revision};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::watch;

use crate::view::{dec, LogRecord, View};
use crate::Inner;

/// Batches a slow feed may fall behind before it re-reads the log.
pub(crate) const FEED_CAPACITY: usize = 1024;
/// Revisions read per snapshot.
const CHUNK: i64 = 512;
/// How long a feed waits for a change before it reports progress.
const IDLE: Duration = Duration::from_millis(100);
/// Consecutive failed history reads (each after the retry timeout) before a feed ends.
const CATCH_UP_RETRIES: u32 = 3;

/// Reads revisions `from..=min(current, from + CHUNK - 1)` at one snapshot. Returns the
/// batches, the snapshot's (revision, compact revision) and the last revision covered.
async fn read_chunk(
    inner: &Arc<Inner>,
    from: Revision,
) -> Result<(Vec<Arc<ChangeBatch>>, Revision, Revision, Revision)> {
    inner
        .run(
            false,
            Arc::new(move |v: &mut View| {
                let (rev, compact) = (v.base_revision(), v.compact_revision());
                let to = rev.min(from.saturating_add(CHUNK - 1));
                let mut batches = Vec::new();
                let lo = from.max(compact);
                if lo <= to {
                    let (s, e) = (v.keys.log(lo), v.keys.log(to + 1));
                    for (_, val) in v.scan_raw(s, e)? {
                        let rec: LogRecord = dec(&val)?;
                        batches.push(Arc::new(rec.batch));
                    }
                }
                Ok((batches, rev, compact, to))
            }),
        )
        .await
}

/// The tailer: delivers every committed revision once, in order, to this process's feeds.
pub(crate) async fn tailer(inner: Arc<Inner>, start: Revision) {
    let mut shutdown = inner.shutdown.subscribe();
    let mut tail = start;
    let mut tick = tokio::time::interval(inner.opts.feed_poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = inner.wake.notified() => {}
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        loop {
            match read_chunk(&inner, tail + 1).await {
                Ok((batches, rev, compact, to)) => {
                    for b in batches {
                        let _ = inner.feed.send(b);
                    }
                    tail = tail.max(to).max(compact - 1);
                    if tail >= rev {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "tikv: change feed read failed; retrying on the next tick");
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
    catching_up: bool,
    pending: VecDeque<Result<FeedItem>>,
    /// Changes were delivered after the last `Progress`.
    unreported: bool,
    done: bool,
    failures: u32,
}

pub(crate) async fn open(inner: Arc<Inner>, from: Revision) -> Result<FeedStream> {
    // Subscribe first: whatever is committed after the read below comes through the broadcast.
    let rx = inner.feed.subscribe();
    let (rev, compact) = inner.meta().await?;
    // As etcd: a watch may start at the compact revision itself, not below it.
    if from > 0 && from < compact {
        return Err(BackendError::Compacted { compact_revision: compact });
    }
    let next = if from <= 0 { rev + 1 } else { from };
    let shutdown = inner.shutdown.subscribe();
    let feed = Feed {
        inner,
        rx,
        shutdown,
        next,
        catching_up: true,
        pending: VecDeque::new(),
        unreported: false,
        done: false,
        failures: 0,
    };
    Ok(Box::pin(futures::stream::unfold(feed, |mut feed| async move {
        let item = feed.next_item().await?;
        Some((item, feed))
    })))
}

impl Feed {
    async fn catch_up(&mut self) {
        match read_chunk(&self.inner, self.next).await {
            Ok((batches, rev, compact, to)) => {
                self.failures = 0;
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
            Err(e) if self.failures + 1 < CATCH_UP_RETRIES => {
                self.failures += 1;
                tracing::debug!(error = %e, attempt = self.failures, "tikv: feed read failed; retrying");
            }
            Err(e) => {
                // The watcher gets an error and may watch again from the last revision it saw.
                self.pending.push_back(Err(e));
                self.done = true;
            }
        }
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
