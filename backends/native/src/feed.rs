//! One watcher's feed (see `Backend::watch`): history from the store up to the present, then
//! the live batches the store broadcasts, never skipping or repeating a revision.
//!
//! The feed is a stream its watcher polls itself. It used to be a task of its own that moved
//! the broadcast batches into a channel, with a fresh idle timer per batch: with a thousand
//! watchers, each put woke two thousand tasks and moved a thousand timers. Now a batch wakes
//! the watcher's task only, and the idle timer is moved only when it fires.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cairn_backend::{BackendError, ChangeBatch, FeedItem, FeedStream, Result, Revision};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::time::{Instant, Sleep};

use crate::store::Store;

/// How long a feed stays quiet before it reports progress.
const IDLE_PROGRESS: Duration = Duration::from_millis(500);
/// Most revisions read from the store at a time while catching up.
const CATCH_UP_REVISIONS: usize = 256;

/// The feed of revisions from `next` on. `rx` must have subscribed before `next - 1` was
/// current, so that a live batch missing from it shows up as a gap (or a lag) to catch up on.
pub(crate) fn stream(
    store: Arc<Store>,
    rx: broadcast::Receiver<Arc<ChangeBatch>>,
    next: Revision,
) -> FeedStream {
    let (current, _) = store.current();
    let feed = Feed {
        store,
        rx,
        next,
        queue: VecDeque::new(),
        catch_up: Some((current, After::Progress)),
        done: false,
        last_item: Instant::now(),
        idle: Box::pin(tokio::time::sleep(IDLE_PROGRESS)),
    };
    Box::pin(futures::stream::unfold(feed, |mut f| async move {
        loop {
            if let Some(item) = f.queue.pop_front() {
                return Some((item, f));
            }
            if f.done {
                return None;
            }
            f.step().await;
        }
    }))
}

struct Feed {
    store: Arc<Store>,
    rx: broadcast::Receiver<Arc<ChangeBatch>>,
    /// The next revision to deliver.
    next: Revision,
    /// Items ready for the watcher.
    queue: VecDeque<Result<FeedItem>>,
    /// Revisions still to read from the store, through this one, and what follows them.
    catch_up: Option<(Revision, After)>,
    /// The feed has ended (after its queued items).
    done: bool,
    /// When the last live batch came (or the idle timer last fired).
    last_item: Instant,
    idle: Pin<Box<Sleep>>,
}

/// What a catch-up is followed by.
enum After {
    /// The first one: a progress report at the revision caught up to.
    Progress,
    /// A live batch that came after a gap.
    Batch(Arc<ChangeBatch>),
    /// Nothing (a lagging receiver caught up).
    Nothing,
}

impl Feed {
    /// Queues the next items, or ends the feed.
    async fn step(&mut self) {
        if let Some((upto, after)) = self.catch_up.take() {
            return self.catch_up_step(upto, after).await;
        }
        loop {
            tokio::select! {
                biased;
                item = self.rx.recv() => {
                    self.last_item = Instant::now();
                    return self.live(item);
                }
                _ = self.idle.as_mut() => {
                    let quiet_until = self.last_item + IDLE_PROGRESS;
                    if Instant::now() < quiet_until {
                        self.idle.as_mut().reset(quiet_until);
                        continue;
                    }
                    // Idle: tell the watcher how far it is synced, if nothing is in flight.
                    self.last_item = Instant::now();
                    self.idle.as_mut().reset(self.last_item + IDLE_PROGRESS);
                    if self.store.current().0 == self.next - 1 {
                        self.queue.push_back(Ok(FeedItem::Progress(self.next - 1)));
                        return;
                    }
                }
            }
        }
    }

    fn live(&mut self, item: std::result::Result<Arc<ChangeBatch>, RecvError>) {
        match item {
            Ok(b) if b.revision < self.next => {}
            Ok(b) if b.revision > self.next => self.catch_up = Some((b.revision - 1, After::Batch(b))),
            Ok(b) => self.deliver(b),
            Err(RecvError::Lagged(_)) => self.catch_up = Some((self.store.current().0, After::Nothing)),
            Err(RecvError::Closed) => self.done = true,
        }
    }

    fn deliver(&mut self, b: Arc<ChangeBatch>) {
        self.next = b.revision + 1;
        self.queue.push_back(Ok(FeedItem::Changes(b)));
    }

    fn fail(&mut self, e: BackendError) {
        self.queue.push_back(Err(e));
        self.done = true;
    }

    /// Reads the next revisions through `upto` from the store (a bounded number at a time:
    /// the watcher takes them before more are read).
    async fn catch_up_step(&mut self, upto: Revision, after: After) {
        if self.next <= upto {
            let (_, compact) = self.store.current();
            if self.next < compact {
                return self.fail(BackendError::Compacted { compact_revision: compact });
            }
            let (s, from) = (self.store.clone(), self.next);
            match crate::blocking(move || s.read_events(from, upto, CATCH_UP_REVISIONS)).await {
                Err(e) => return self.fail(e),
                Ok(batches) if batches.is_empty() => self.next = upto + 1,
                Ok(batches) => {
                    for b in batches {
                        self.deliver(Arc::new(b));
                    }
                    if self.next <= upto {
                        self.catch_up = Some((upto, after));
                        return;
                    }
                }
            }
        }
        match after {
            After::Progress => self.queue.push_back(Ok(FeedItem::Progress(self.next - 1))),
            After::Batch(b) => self.deliver(b),
            After::Nothing => {}
        }
    }
}
