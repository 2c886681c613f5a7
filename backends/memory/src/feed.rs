//! The change feed: a broadcast of committed batches, backed by the store's log.
//!
//! A feed subscribes to the broadcast under the store lock (commits publish under the same
//! lock), so the log up to the current revision plus everything broadcast afterwards covers
//! every revision. It delivers only revision `next` and then `next + 1`, dropping what it has
//! already delivered; when the broadcast lags or skips, it re-reads the log from `next`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use cairn_backend::{BackendError, ChangeBatch, FeedItem, FeedStream, Result, Revision};
use tokio::sync::broadcast::{self, error::RecvError};

use crate::store::Store;
use crate::Shared;

/// How long a feed waits for a change before it reports progress.
const IDLE: Duration = Duration::from_millis(100);

struct Feed {
    shared: Arc<Shared>,
    rx: broadcast::Receiver<Arc<ChangeBatch>>,
    /// The next revision to deliver.
    next: Revision,
    pending: VecDeque<Result<FeedItem>>,
    /// Changes were delivered after the last `Progress`.
    unreported: bool,
    done: bool,
}

pub(crate) fn open(shared: Arc<Shared>, from: Revision) -> Result<FeedStream> {
    let store = shared.store.lock();
    // As etcd: a watch may start at the compact revision itself, not below it.
    if from > 0 && from < store.compact {
        return Err(BackendError::Compacted { compact_revision: store.compact });
    }
    let rx = shared.feed.subscribe();
    let next = if from <= 0 { store.rev + 1 } else { from };
    let mut feed = Feed { shared: shared.clone(), rx, next, pending: VecDeque::new(), unreported: false, done: false };
    feed.catch_up_locked(&store);
    drop(store);
    Ok(Box::pin(futures::stream::unfold(feed, |mut feed| async move {
        let item = feed.next_item().await?;
        Some((item, feed))
    })))
}

impl Feed {
    /// Queues every logged revision from `next` to the current one, then `Progress(current)`.
    fn catch_up_locked(&mut self, store: &Store) {
        if self.next <= store.rev {
            if self.next < store.compact {
                self.pending.push_back(Err(BackendError::Compacted { compact_revision: store.compact }));
                self.done = true;
                return;
            }
            for batch in store.log.range(self.next..=store.rev).map(|(_, b)| b) {
                self.pending.push_back(Ok(FeedItem::Changes(batch.clone())));
            }
            self.next = store.rev + 1;
        }
        self.pending.push_back(Ok(FeedItem::Progress(store.rev)));
        self.unreported = false;
    }

    fn catch_up(&mut self) {
        let shared = self.shared.clone();
        let store = shared.store.lock();
        self.catch_up_locked(&store);
    }

    async fn next_item(&mut self) -> Option<Result<FeedItem>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            if self.done {
                return None;
            }
            match tokio::time::timeout(IDLE, self.rx.recv()).await {
                Ok(Ok(batch)) if batch.revision < self.next => {}
                Ok(Ok(batch)) if batch.revision == self.next => {
                    self.next += 1;
                    self.unreported = true;
                    return Some(Ok(FeedItem::Changes(batch)));
                }
                // A gap (not expected) or a lagged receiver: the log has what was missed.
                Ok(Ok(_)) | Ok(Err(RecvError::Lagged(_))) => self.catch_up(),
                Ok(Err(RecvError::Closed)) => self.done = true,
                Err(_idle) if self.unreported => self.catch_up(),
                Err(_idle) => {}
            }
        }
    }
}
