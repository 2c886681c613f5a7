//! etcd's Watch service: one bidirectional stream carries many watchers.
//!
//! Behaviour follows etcd 3.5's `v3rpc/watch.go` and `mvcc/watchable_store.go`:
//!
//! - **Create**: `key` empty means `"\0"`; `range_end` empty watches one key, `"\0"` every key
//!   `>= key`. `start_revision` 0 means "after the current revision"; an older revision
//!   replays history, a newer one waits. The answer is `created: true` with the watch ID and
//!   a header at the current revision. `watch_id` 0 lets the server pick the next free ID of
//!   the stream (0, 1, 2, ...); another value is the client's choice. Errors are answered as
//!   etcd does, with `created`, `canceled`, `watch_id: -1` and the mvcc error text as
//!   `cancel_reason` (`"mvcc: duplicate watch ID provided on the WatchStream"`,
//!   `"mvcc: watcher range is empty"`). A negative `start_revision` is refused as etcd 3.6
//!   does (`cancel_reason` = the compacted error text).
//! - **Compacted start**: the watch is created, then one response with `canceled: true`,
//!   `compact_revision` and header revision 0 (etcd leaves both the header revision and
//!   `cancel_reason` unset there; clients derive the error from `compact_revision`). The ID
//!   stays taken until the client cancels it.
//! - **Events**: each watcher reads its own backend change feed, keeps the events in its
//!   range and not filtered (NOPUT/NODELETE), strips `prev_kv` unless asked, and sends one
//!   response per revision, or one per batch of at most 1000 revisions while it catches up
//!   (etcd's `watchBatchMaxRevs`). Responses whose events were all filtered are not sent.
//! - **Fragment**: a watcher created with `fragment` splits a response whose encoded size is
//!   at least `max_request_bytes` + 512 KiB (etcd's gRPC overhead allowance) into several,
//!   `fragment: true` on all but the last, exactly as etcd's `sendFragments`.
//! - **Progress**: a ticker per stream (`progress_notify_interval` plus up to 10% jitter,
//!   at least 100 ms) sends `progress_notify` watchers an empty response with their watch
//!   ID and the current revision, when the watcher sent no events since the previous tick and
//!   is synced. A `WatchProgressRequest` sends one empty response with `watch_id: -1` and the
//!   current revision when every watcher of the stream is synced (etcd 3.5's
//!   `RequestProgressAll`; nothing when the stream has no watcher). Where etcd would drop a
//!   request because a watcher is still catching up, Cairn keeps one request pending and
//!   answers it as soon as all watchers have caught up to the revision it was asked at.
//! - **Ordering**: all responses of a stream go through one queue under one lock, so a
//!   watcher's created response precedes its events, a cancel response follows the last
//!   event, and a progress response at revision R follows every event `<= R` of every
//!   watcher on the stream and precedes every later one.
//! - **Flow control**: the queue is bounded; a client that stops reading blocks its own
//!   stream only. When the client goes away every watcher task of the stream ends. A client
//!   that half-closes keeps its watchers (etcd serves until the call is cancelled).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cairn_backend::{Backend, BackendError, ChangeBatch, EventKind, FeedItem, FeedStream, KeyRange, Revision};
use cairn_proto::etcdserverpb::watch_create_request::FilterType;
use cairn_proto::etcdserverpb::watch_request::RequestUnion;
use cairn_proto::etcdserverpb::watch_server::Watch;
use cairn_proto::etcdserverpb::{WatchCreateRequest, WatchRequest, WatchResponse};
use cairn_proto::mvccpb;
use futures::{FutureExt, Stream, StreamExt};
use prost::Message;
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Credentials, Guard};
use crate::errors::ApiError;
use crate::header::HeaderSource;

/// etcd's `clientv3.InvalidWatchID`: the watch ID of refused creates and stream-wide progress.
pub const INVALID_WATCH_ID: i64 = -1;
/// etcd's `clientv3.AutoWatchID`: a create with this ID lets the server choose.
pub const AUTO_WATCH_ID: i64 = 0;
/// etcd adds this to `--max-request-bytes` for gRPC message limits (`grpcOverheadBytes`).
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;
/// etcd's default `--experimental-watch-progress-notify-interval`.
pub const DEFAULT_PROGRESS_NOTIFY_INTERVAL: Duration = Duration::from_secs(10 * 60);
/// etcd's `minWatchProgressInterval`.
pub const MIN_PROGRESS_NOTIFY_INTERVAL: Duration = Duration::from_millis(100);
/// At most this many revisions go into one response while a watcher catches up
/// (etcd's `watchBatchMaxRevs`).
pub const MAX_BATCH_REVISIONS: usize = 1000;

/// etcd's mvcc error texts, sent as `cancel_reason` of refused creates.
pub const ERR_DUPLICATE_WATCH_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";
pub const ERR_EMPTY_WATCHER_RANGE: &str = "mvcc: watcher range is empty";

/// Responses queued per stream before a slow client blocks the stream's watchers
/// (etcd: `chanBufLen` 128 for events plus 16 for control responses).
const STREAM_QUEUE: usize = 128;
/// Bounds of the retry delay when a feed fails with a transient backend error.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Settings of the Watch service.
#[derive(Clone, Debug)]
pub struct WatchConfig {
    /// etcd's `--max-request-bytes`; fragmenting starts at this plus [`GRPC_OVERHEAD_BYTES`].
    pub max_request_bytes: usize,
    /// etcd's `--experimental-watch-progress-notify-interval` (zero: etcd's 10 minutes;
    /// below 100 ms: raised to 100 ms, as etcd does).
    pub progress_notify_interval: Duration,
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self { max_request_bytes: 1536 * 1024, progress_notify_interval: DEFAULT_PROGRESS_NOTIFY_INTERVAL }
    }
}

/// The Watch gRPC service.
#[derive(Clone)]
pub struct WatchService {
    shared: Arc<Shared>,
}

struct Shared {
    backend: Arc<dyn Backend>,
    /// Checks each create against the caller's read permission.
    auth: Guard,
    header: HeaderSource,
    /// Encoded size at which a fragmenting watcher splits a response.
    fragment_limit: usize,
    progress_interval: Duration,
    /// Open watch streams and running watcher tasks (each holding a backend feed).
    streams: AtomicUsize,
    watchers: AtomicUsize,
}

/// Counts one live object in a gauge while it exists.
struct Gauge<'a>(&'a AtomicUsize);

impl<'a> Gauge<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Self(n)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl WatchService {
    pub fn new(backend: Arc<dyn Backend>, header: HeaderSource, cfg: WatchConfig) -> Self {
        let mut progress_interval = cfg.progress_notify_interval;
        if progress_interval.is_zero() {
            progress_interval = DEFAULT_PROGRESS_NOTIFY_INTERVAL;
        }
        if progress_interval < MIN_PROGRESS_NOTIFY_INTERVAL {
            tracing::warn!(
                min = ?MIN_PROGRESS_NOTIFY_INTERVAL,
                "adjusting watch progress notify interval to minimum period"
            );
            progress_interval = MIN_PROGRESS_NOTIFY_INTERVAL;
        }
        let fragment_limit = cfg.max_request_bytes.saturating_add(GRPC_OVERHEAD_BYTES);
        let shared = Shared {
            auth: Guard::disabled(backend.clone()),
            backend,
            header,
            fragment_limit,
            progress_interval,
            streams: AtomicUsize::new(0),
            watchers: AtomicUsize::new(0),
        };
        Self { shared: Arc::new(shared) }
    }

    /// Checks each watch create against the auth store behind `auth`.
    pub fn with_auth(mut self, auth: Guard) -> Self {
        Arc::get_mut(&mut self.shared).expect("with_auth before serving").auth = auth;
        self
    }

    /// Open Watch streams (etcd's `etcd_debugging_mvcc_watch_stream_total`).
    pub fn stream_count(&self) -> usize {
        self.shared.streams.load(Ordering::Relaxed)
    }

    /// Watchers following a backend feed (etcd's `etcd_debugging_mvcc_watcher_total`, without
    /// compacted watchers whose IDs are still held).
    pub fn watcher_count(&self) -> usize {
        self.shared.watchers.load(Ordering::Relaxed)
    }
}

pub type WatchResponseStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = WatchResponseStream;

    async fn watch(&self, request: Request<Streaming<WatchRequest>>) -> Result<Response<Self::WatchStream>, Status> {
        let creds = Credentials::of(&request);
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let ctx = Arc::new(StreamCtx {
            shared: self.shared.clone(),
            creds,
            probe: tx.clone(),
            out: Mutex::new(Out {
                tx,
                entries: HashMap::new(),
                pending_progress: None,
                known_rev: 0,
            }),
        });
        tokio::spawn(run_stream(ctx, inbound));
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// What one stream's tasks share.
struct StreamCtx {
    shared: Arc<Shared>,
    /// The stream's token or client certificate, resolved again at each create.
    creds: Credentials,
    /// Only used to learn that the client went away (`closed()`).
    probe: mpsc::Sender<Result<WatchResponse, Status>>,
    out: Mutex<Out>,
}

/// The send side of a stream and the watcher table; every response is queued while holding
/// this lock, which orders progress responses against every watcher's events.
struct Out {
    tx: mpsc::Sender<Result<WatchResponse, Status>>,
    entries: HashMap<i64, Entry>,
    /// A stream-wide progress request not answered yet: the revision it was asked at.
    pending_progress: Option<Revision>,
    /// The highest revision known to exist (from the backend or from events sent).
    known_rev: Revision,
}

/// One registered watch ID.
struct Entry {
    /// Tells this registration apart from an earlier one with the same ID.
    generation: u64,
    /// Every event of this watcher with a revision `<= sent_rev` is queued.
    sent_rev: Revision,
    /// The revision of the newest event queued.
    last_event_rev: Revision,
    progress_notify: bool,
    /// No events were sent since the last progress tick (etcd's `progress[id]`).
    progress_due: bool,
    /// The watcher still follows its feed (false after compaction, as etcd keeps the ID).
    live: bool,
}

/// The stream ended because the client went away or the watch was cancelled.
struct Gone;

impl Out {
    async fn send(&mut self, resp: WatchResponse) -> Result<(), Gone> {
        self.tx.send(Ok(resp)).await.map_err(|_| Gone)
    }

    /// Answers the pending stream-wide progress request if every watcher has caught up.
    fn try_progress_all(&mut self, header: &HeaderSource) {
        let Some(asked_at) = self.pending_progress else { return };
        if self.entries.is_empty() {
            self.pending_progress = None;
            return;
        }
        let mut lo = Revision::MAX;
        let mut hi = 0;
        for e in self.entries.values() {
            if !e.live {
                return;
            }
            lo = lo.min(e.sent_rev);
            hi = hi.max(e.last_event_rev);
        }
        if lo < asked_at || lo < hi {
            return;
        }
        let rev = lo.min(self.known_rev.max(asked_at));
        self.pending_progress = None;
        // etcd drops a progress notification when the stream's queue is full.
        let _ = self.tx.try_send(Ok(WatchResponse {
            header: Some(header.header(rev)),
            watch_id: INVALID_WATCH_ID,
            ..Default::default()
        }));
    }
}

/// Aborts the watcher tasks of a stream when its coordinator ends, however it ends.
struct Tasks(HashMap<i64, (u64, JoinHandle<()>)>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for (_, (_, h)) in self.0.drain() {
            h.abort();
        }
    }
}

/// The coordinator of one stream: reads client requests and runs the progress ticker.
async fn run_stream(ctx: Arc<StreamCtx>, mut inbound: Streaming<WatchRequest>) {
    let shared = ctx.shared.clone();
    let _open = Gauge::new(&shared.streams);
    let mut tasks = Tasks(HashMap::new());
    let mut next_id: i64 = 0;
    let mut next_generation: u64 = 0;
    let mut inbound_open = true;
    let interval = jittered(ctx.shared.progress_interval);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            biased;
            _ = ctx.probe.closed() => break,
            msg = inbound.next(), if inbound_open => match msg {
                None => inbound_open = false,
                Some(Err(status)) => {
                    tracing::debug!(%status, "watch stream receive failed");
                    let _ = ctx.probe.try_send(Err(status));
                    break;
                }
                Some(Ok(req)) => {
                    let r = match req.request_union {
                        Some(RequestUnion::CreateRequest(c)) => {
                            create(&ctx, &mut tasks, &mut next_id, &mut next_generation, c).await
                        }
                        Some(RequestUnion::CancelRequest(c)) => cancel(&ctx, &mut tasks, c.watch_id).await,
                        Some(RequestUnion::ProgressRequest(_)) => {
                            progress_all(&ctx).await;
                            Ok(())
                        }
                        None => Ok(()),
                    };
                    if r.is_err() {
                        break;
                    }
                }
            },
            _ = ticker.tick() => progress_tick(&ctx).await,
        }
    }
    drop(tasks);
    ctx.out.lock().await.entries.clear();
}

/// `interval` plus up to a tenth of it, as etcd's `GetProgressReportInterval`.
fn jittered(interval: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    let tenth = (interval.as_nanos() / 10).max(1) as u64;
    interval + Duration::from_nanos(h.finish() % tenth)
}

async fn current_revision(ctx: &StreamCtx) -> Result<Revision, BackendError> {
    ctx.shared.backend.current_revision().await.map(|(rev, _)| rev)
}

fn refused(header: &HeaderSource, rev: Revision, reason: impl Into<String>) -> WatchResponse {
    WatchResponse {
        header: Some(header.header(rev)),
        watch_id: INVALID_WATCH_ID,
        created: true,
        canceled: true,
        cancel_reason: reason.into(),
        ..Default::default()
    }
}

async fn create(
    ctx: &Arc<StreamCtx>,
    tasks: &mut Tasks,
    next_id: &mut i64,
    next_generation: &mut u64,
    req: WatchCreateRequest,
) -> Result<(), Gone> {
    let header = &ctx.shared.header;
    let wsrev = match current_revision(ctx).await {
        Ok(rev) => rev,
        Err(e) => {
            let mut out = ctx.out.lock().await;
            let known = out.known_rev;
            return out.send(refused(header, known, ApiError::from(e).to_string())).await;
        }
    };

    let mut key = req.key;
    if key.is_empty() {
        key = vec![0];
    }
    let range = KeyRange { key, range_end: req.range_end };
    if req.start_revision < 0 {
        let reason = ApiError::Compacted.to_string();
        return ctx.out.lock().await.send(refused(header, wsrev, reason)).await;
    }
    if let Some(reason) = ctx.shared.auth.watch_denied(&ctx.creds, &range.key, &range.range_end) {
        return ctx.out.lock().await.send(refused(header, wsrev, reason)).await;
    }
    if let Some(end) = range.upper() {
        if range.key.as_slice() >= end {
            return ctx.out.lock().await.send(refused(header, wsrev, ERR_EMPTY_WATCHER_RANGE)).await;
        }
    }

    // Pick the ID as etcd's watchStream.Watch does.
    let (id, auto) = {
        let out = ctx.out.lock().await;
        if req.watch_id == AUTO_WATCH_ID {
            let mut id = *next_id;
            while out.entries.contains_key(&id) {
                id += 1;
            }
            (id, true)
        } else if out.entries.contains_key(&req.watch_id) {
            drop(out);
            return ctx.out.lock().await.send(refused(header, wsrev, ERR_DUPLICATE_WATCH_ID)).await;
        } else {
            (req.watch_id, false)
        }
    };

    let from = if req.start_revision == 0 { wsrev + 1 } else { req.start_revision };
    let feed = ctx.shared.backend.watch(from).await;
    let compacted = match &feed {
        Ok(_) => None,
        Err(BackendError::Compacted { compact_revision }) => Some(*compact_revision),
        Err(e) => {
            let reason = ApiError::from(e.clone()).to_string();
            return ctx.out.lock().await.send(refused(header, wsrev, reason)).await;
        }
    };
    if auto {
        *next_id = id + 1;
    }
    *next_generation += 1;
    let generation = *next_generation;

    let spec = Spec {
        id,
        generation,
        range,
        no_put: req.filters.contains(&(FilterType::Noput as i32)),
        no_delete: req.filters.contains(&(FilterType::Nodelete as i32)),
        prev_kv: req.prev_kv,
        fragment: req.fragment,
    };

    let mut out = ctx.out.lock().await;
    // A watcher from the future is synced until its start revision, as in etcd.
    out.known_rev = out.known_rev.max(wsrev);
    out.entries.insert(
        id,
        Entry {
            generation,
            sent_rev: (from - 1).min(wsrev),
            last_event_rev: 0,
            progress_notify: req.progress_notify,
            progress_due: true,
            live: compacted.is_none(),
        },
    );
    out.send(WatchResponse { header: Some(header.header(wsrev)), watch_id: id, created: true, ..Default::default() })
        .await?;
    match (feed, compacted) {
        (_, Some(compact_revision)) => {
            out.send(compacted_response(header, id, compact_revision)).await?;
        }
        (Ok(feed), None) => {
            let task = tokio::spawn(run_watcher(ctx.clone(), spec, feed, from - 1));
            if let Some((_, old)) = tasks.0.insert(id, (generation, task)) {
                old.abort();
            }
        }
        (Err(_), None) => unreachable!("feed errors other than compaction returned above"),
    }
    Ok(())
}

/// etcd's answer when a watcher's start revision is compacted: only the watch ID, canceled and
/// the compact revision; the header revision stays 0 (etcd's `WatchResponse.Revision` is unset).
fn compacted_response(header: &HeaderSource, id: i64, compact_revision: Revision) -> WatchResponse {
    WatchResponse {
        header: Some(header.header(0)),
        watch_id: id,
        canceled: true,
        compact_revision,
        ..Default::default()
    }
}

async fn cancel(ctx: &Arc<StreamCtx>, tasks: &mut Tasks, id: i64) -> Result<(), Gone> {
    let rev = current_revision(ctx).await.ok();
    let mut out = ctx.out.lock().await;
    if out.entries.remove(&id).is_none() {
        // etcd: ErrWatcherNotExist, no response.
        return Ok(());
    }
    if let Some((_, task)) = tasks.0.remove(&id) {
        task.abort();
    }
    let rev = rev.unwrap_or(out.known_rev).max(out.known_rev);
    out.known_rev = rev;
    out.send(WatchResponse {
        header: Some(ctx.shared.header.header(rev)),
        watch_id: id,
        canceled: true,
        ..Default::default()
    })
    .await?;
    let header = ctx.shared.header.clone();
    out.try_progress_all(&header);
    Ok(())
}

async fn progress_all(ctx: &Arc<StreamCtx>) {
    let rev = match current_revision(ctx).await {
        Ok(rev) => rev,
        Err(e) => {
            tracing::debug!(error = %e, "progress request: no current revision");
            return;
        }
    };
    let mut out = ctx.out.lock().await;
    if out.entries.is_empty() {
        return;
    }
    out.known_rev = out.known_rev.max(rev);
    out.pending_progress = Some(out.pending_progress.unwrap_or(0).max(rev));
    let header = ctx.shared.header.clone();
    out.try_progress_all(&header);
}

async fn progress_tick(ctx: &Arc<StreamCtx>) {
    {
        let out = ctx.out.lock().await;
        if !out.entries.values().any(|e| e.progress_notify) {
            return;
        }
    }
    let rev = current_revision(ctx).await.ok();
    let mut out = ctx.out.lock().await;
    let out = &mut *out;
    if let Some(rev) = rev {
        out.known_rev = out.known_rev.max(rev);
    }
    let known = out.known_rev;
    for (&id, e) in out.entries.iter_mut() {
        if !e.progress_notify {
            continue;
        }
        if e.progress_due && e.live && rev.is_some_and(|rev| e.sent_rev >= rev) {
            let at = e.sent_rev.min(known).max(e.last_event_rev);
            // etcd drops a progress notification when the stream's queue is full.
            let _ = out.tx.try_send(Ok(WatchResponse {
                header: Some(ctx.shared.header.header(at)),
                watch_id: id,
                ..Default::default()
            }));
        }
        e.progress_due = true;
    }
}

/// What a watcher selects and how it answers.
struct Spec {
    id: i64,
    generation: u64,
    range: KeyRange,
    no_put: bool,
    no_delete: bool,
    prev_kv: bool,
    fragment: bool,
}

impl Spec {
    fn convert(&self, batch: &ChangeBatch, into: &mut Vec<mvccpb::Event>) {
        for ev in &batch.events {
            let filtered = match ev.kind {
                EventKind::Put => self.no_put,
                EventKind::Delete => self.no_delete,
            };
            if filtered || !self.range.contains(&ev.kv.key) {
                continue;
            }
            let r#type = match ev.kind {
                EventKind::Put => mvccpb::event::EventType::Put,
                EventKind::Delete => mvccpb::event::EventType::Delete,
            };
            into.push(mvccpb::Event {
                r#type: r#type as i32,
                kv: Some(kv_to_pb(&ev.kv)),
                prev_kv: if self.prev_kv { ev.prev_kv.as_ref().map(kv_to_pb) } else { None },
            });
        }
    }
}

fn kv_to_pb(kv: &cairn_backend::KeyValue) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: kv.key.clone(),
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        value: kv.value.clone(),
        lease: kv.lease,
    }
}

/// How a feed ended.
enum FeedEnd {
    Error(BackendError),
    Closed,
}

/// Follows one watcher's feed until the client goes away, the watch is cancelled (the task is
/// aborted) or the feed fails for good.
async fn run_watcher(ctx: Arc<StreamCtx>, spec: Spec, mut feed: FeedStream, mut covered: Revision) {
    let shared = ctx.shared.clone();
    let _running = Gauge::new(&shared.watchers);
    let mut retry = RETRY_MIN;
    loop {
        let first = tokio::select! {
            biased;
            _ = ctx.probe.closed() => return,
            item = feed.next() => item,
        };
        let mut events = Vec::new();
        let mut last_change: Option<Revision> = None;
        let mut revisions = 0usize;
        let mut end = None;
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Some(Ok(FeedItem::Changes(batch))) => {
                    if batch.revision <= covered {
                        continue; // never deliver a revision twice
                    }
                    covered = batch.revision;
                    last_change = Some(batch.revision);
                    revisions += 1;
                    spec.convert(&batch, &mut events);
                }
                Some(Ok(FeedItem::Progress(rev))) => {
                    covered = covered.max(rev);
                }
                Some(Err(e)) => {
                    end = Some(FeedEnd::Error(e));
                    break;
                }
                None => {
                    end = Some(FeedEnd::Closed);
                    break;
                }
            }
            if revisions >= MAX_BATCH_REVISIONS {
                break;
            }
            next = feed.next().now_or_never();
        }

        if deliver(&ctx, &spec, events, last_change, covered).await.is_err() {
            return;
        }
        if end.is_none() {
            retry = RETRY_MIN;
        }

        match end {
            None => {}
            Some(FeedEnd::Error(BackendError::Compacted { compact_revision })) => {
                let mut out = ctx.out.lock().await;
                if !owns(&out, &spec) {
                    return;
                }
                if let Some(e) = out.entries.get_mut(&spec.id) {
                    e.live = false;
                }
                let _ = out.send(compacted_response(&ctx.shared.header, spec.id, compact_revision)).await;
                return;
            }
            Some(FeedEnd::Error(e @ (BackendError::Unavailable(_) | BackendError::Timeout))) => {
                tracing::debug!(error = %e, watch_id = spec.id, "watch feed interrupted; resuming");
                // Resume right after the last revision delivered.
                loop {
                    tokio::select! {
                        biased;
                        _ = ctx.probe.closed() => return,
                        _ = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(RETRY_MAX);
                    match ctx.shared.backend.watch(covered + 1).await {
                        Ok(f) => {
                            feed = f;
                            break;
                        }
                        Err(e @ BackendError::Compacted { .. }) => {
                            feed = futures::stream::iter([Err(e)]).boxed();
                            break;
                        }
                        Err(BackendError::Unavailable(_) | BackendError::Timeout) => continue,
                        Err(e) => {
                            fail(&ctx, &spec, e).await;
                            return;
                        }
                    }
                }
            }
            Some(FeedEnd::Error(e)) => {
                fail(&ctx, &spec, e).await;
                return;
            }
            Some(FeedEnd::Closed) => {
                fail(&ctx, &spec, BackendError::Stopped).await;
                return;
            }
        }
    }
}

fn owns(out: &Out, spec: &Spec) -> bool {
    out.entries.get(&spec.id).is_some_and(|e| e.generation == spec.generation)
}

/// Queues a watcher's events (if any) and records how far it has got.
async fn deliver(
    ctx: &StreamCtx,
    spec: &Spec,
    events: Vec<mvccpb::Event>,
    last_change: Option<Revision>,
    covered: Revision,
) -> Result<(), Gone> {
    let mut out = ctx.out.lock().await;
    if !owns(&out, spec) {
        return Err(Gone);
    }
    if let Some(rev) = last_change {
        out.known_rev = out.known_rev.max(rev);
    }
    if !events.is_empty() {
        let rev = last_change.unwrap_or(covered);
        let resp = WatchResponse {
            header: Some(ctx.shared.header.header(rev)),
            watch_id: spec.id,
            events,
            ..Default::default()
        };
        if spec.fragment {
            for part in fragments(resp, ctx.shared.fragment_limit) {
                out.send(part).await?;
            }
        } else {
            out.send(resp).await?;
        }
        if let Some(e) = out.entries.get_mut(&spec.id) {
            e.last_event_rev = rev;
            e.progress_due = false;
        }
    }
    if let Some(e) = out.entries.get_mut(&spec.id) {
        e.sent_rev = e.sent_rev.max(covered);
    }
    if out.pending_progress.is_some() {
        let header = ctx.shared.header.clone();
        out.try_progress_all(&header);
    }
    Ok(())
}

/// Ends a watcher whose feed failed for good: a canceled response with etcd's text for the
/// error; the ID is released.
async fn fail(ctx: &StreamCtx, spec: &Spec, e: BackendError) {
    tracing::warn!(error = %e, watch_id = spec.id, "watch feed failed");
    let mut out = ctx.out.lock().await;
    if !owns(&out, spec) {
        return;
    }
    out.entries.remove(&spec.id);
    let rev = out.known_rev;
    let _ = out
        .send(WatchResponse {
            header: Some(ctx.shared.header.header(rev)),
            watch_id: spec.id,
            canceled: true,
            cancel_reason: ApiError::from(e).to_string(),
            ..Default::default()
        })
        .await;
    let header = ctx.shared.header.clone();
    out.try_progress_all(&header);
}

/// etcd's `sendFragments`: a response smaller than `limit` or with fewer than two events goes
/// whole; otherwise events are packed while the part stays below `limit` (each part holds at
/// least one event), every part but the last carrying `fragment: true`.
pub fn fragments(resp: WatchResponse, limit: usize) -> Vec<WatchResponse> {
    if resp.encoded_len() < limit || resp.events.len() < 2 {
        return vec![resp];
    }
    let mut template = resp.clone();
    template.events = Vec::new();
    template.fragment = true;
    let mut parts = Vec::new();
    let mut rest = resp.events.into_iter().peekable();
    while rest.peek().is_some() {
        let mut cur = template.clone();
        while let Some(ev) = rest.peek() {
            cur.events.push(ev.clone());
            if cur.events.len() > 1 && cur.encoded_len() >= limit {
                cur.events.pop();
                break;
            }
            rest.next();
        }
        if rest.peek().is_none() {
            cur.fragment = false;
        }
        parts.push(cur);
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(key: &str, size: usize) -> mvccpb::Event {
        mvccpb::Event {
            r#type: 0,
            kv: Some(mvccpb::KeyValue { key: key.into(), value: vec![b'x'; size], ..Default::default() }),
            prev_kv: None,
        }
    }

    #[test]
    fn small_or_single_event_responses_are_not_fragmented() {
        let r = WatchResponse { events: vec![ev("a", 10), ev("b", 10)], ..Default::default() };
        assert_eq!(fragments(r.clone(), 1000), vec![r]);
        let big = WatchResponse { events: vec![ev("a", 5000)], ..Default::default() };
        assert_eq!(fragments(big.clone(), 100), vec![big]);
    }

    #[test]
    fn fragments_keep_order_and_flag_all_but_last() {
        let events: Vec<_> = (0..10).map(|i| ev(&format!("k{i}"), 100)).collect();
        let r = WatchResponse { watch_id: 3, events: events.clone(), ..Default::default() };
        let parts = fragments(r, 350);
        assert!(parts.len() > 1);
        let flags: Vec<bool> = parts.iter().map(|p| p.fragment).collect();
        assert!(flags[..flags.len() - 1].iter().all(|f| *f));
        assert!(!flags[flags.len() - 1]);
        let joined: Vec<_> = parts.iter().flat_map(|p| p.events.clone()).collect();
        assert_eq!(joined, events);
        for p in &parts {
            assert_eq!(p.watch_id, 3);
            assert!(p.events.len() == 1 || p.encoded_len() < 350);
        }
    }
}
