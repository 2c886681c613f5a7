//! Small helpers the cases are written with. Keys and values are `&str` for readability.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_backend::*;
use futures::StreamExt;

/// Generous bound for anything a case waits for (feed items, lease expiry).
pub const WAIT: Duration = Duration::from_secs(10);

pub fn bytes(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

pub fn kv(key: &str, value: &str, create: Revision, modr: Revision, version: i64, lease: LeaseId) -> KeyValue {
    KeyValue { key: bytes(key), create_revision: create, mod_revision: modr, version, value: bytes(value), lease }
}

pub fn put_op(key: &str, value: &str) -> RequestOp {
    RequestOp::Put(PutRequest { key: bytes(key), value: bytes(value), ..PutRequest::default() })
}

pub fn put_lease_op(key: &str, value: &str, lease: LeaseId) -> RequestOp {
    RequestOp::Put(PutRequest { key: bytes(key), value: bytes(value), lease, ..PutRequest::default() })
}

pub fn del_op(range: KeyRange) -> RequestOp {
    RequestOp::DeleteRange(DeleteRangeRequest { range, prev_kv: true })
}

pub fn get_op(range: KeyRange) -> RequestOp {
    RequestOp::Range(RangeRequest { range, ..RangeRequest::default() })
}

pub fn single(key: &str) -> KeyRange {
    KeyRange::single(bytes(key))
}

pub fn span(key: &str, end: &str) -> KeyRange {
    KeyRange::new(bytes(key), bytes(end))
}

pub fn all() -> KeyRange {
    KeyRange::new(vec![0], vec![0])
}

pub fn cmp(key: &str, result: CompareResult, target: CompareTarget) -> Compare {
    Compare { result, target, range: single(key) }
}

/// Runs a txn that must succeed.
pub async fn txn(b: &dyn Backend, req: TxnRequest) -> TxnResponse {
    b.txn(req).await.expect("txn")
}

/// Runs `ops` unconditionally.
pub async fn ops(b: &dyn Backend, ops: Vec<RequestOp>) -> TxnResponse {
    txn(b, TxnRequest::unconditional(ops)).await
}

/// Puts `key = value` (no lease); returns the write's revision.
pub async fn put(b: &dyn Backend, key: &str, value: &str) -> Revision {
    put_req(b, PutRequest { key: bytes(key), value: bytes(value), ..PutRequest::default() }).await.expect("put").revision
}

pub async fn put_lease(b: &dyn Backend, key: &str, value: &str, lease: LeaseId) -> Revision {
    put_req(b, PutRequest { key: bytes(key), value: bytes(value), lease, ..PutRequest::default() })
        .await
        .expect("put with lease")
        .revision
}

/// A single put as the frontend sends it: a txn of one op.
pub async fn put_req(b: &dyn Backend, req: PutRequest) -> Result<PutResponse> {
    let resp = b.txn(TxnRequest::unconditional(vec![RequestOp::Put(req)])).await?;
    match resp.responses.into_iter().next() {
        Some(ResponseOp::Put(p)) => Ok(p),
        other => panic!("a put txn answered {other:?}"),
    }
}

/// Deletes `range`; returns the response of the delete.
pub async fn delete(b: &dyn Backend, range: KeyRange) -> DeleteRangeResponse {
    let resp = ops(b, vec![del_op(range)]).await;
    match resp.responses.into_iter().next() {
        Some(ResponseOp::DeleteRange(d)) => d,
        other => panic!("a delete txn answered {other:?}"),
    }
}

pub async fn range(b: &dyn Backend, req: RangeRequest) -> RangeResponse {
    b.range(req).await.expect("range")
}

pub async fn get(b: &dyn Backend, key: &str) -> Option<KeyValue> {
    let mut resp = range(b, RangeRequest { range: single(key), ..RangeRequest::default() }).await;
    assert!(resp.kvs.len() <= 1, "a single-key range returned {} kvs", resp.kvs.len());
    resp.kvs.pop()
}

/// Every live kv.
pub async fn get_all(b: &dyn Backend) -> Vec<KeyValue> {
    range(b, RangeRequest { range: all(), ..RangeRequest::default() }).await.kvs
}

pub async fn get_all_at(b: &dyn Backend, revision: Revision) -> Result<Vec<KeyValue>> {
    Ok(b.range(RangeRequest { range: all(), revision, ..RangeRequest::default() }).await?.kvs)
}

pub fn keys(kvs: &[KeyValue]) -> Vec<String> {
    kvs.iter().map(|kv| String::from_utf8_lossy(&kv.key).into_owned()).collect()
}

pub async fn rev(b: &dyn Backend) -> Revision {
    b.current_revision().await.expect("current_revision").0
}

/// Reads a feed until it has delivered every revision `<= until` (a batch or a progress at or
/// past it), failing on errors or after [`WAIT`]. Returns the batches, checking on the way that
/// their revisions strictly increase and that progress never goes back.
pub async fn collect_until(feed: &mut FeedStream, until: Revision) -> Vec<Arc<ChangeBatch>> {
    let mut out: Vec<Arc<ChangeBatch>> = Vec::new();
    let mut progress = 0;
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let item = match tokio::time::timeout(left, feed.next()).await {
            Ok(Some(Ok(item))) => item,
            Ok(Some(Err(e))) => panic!("feed failed: {e}"),
            Ok(None) => panic!("feed ended before revision {until}"),
            Err(_) => panic!("feed did not reach revision {until} within {WAIT:?}; got {:?}, progress {progress}", revs(&out)),
        };
        let reached = match item {
            FeedItem::Changes(batch) => {
                if let Some(last) = out.last() {
                    assert!(batch.revision > last.revision, "feed went from revision {} to {}", last.revision, batch.revision);
                }
                assert!(batch.revision > progress, "feed sent revision {} after progress {progress}", batch.revision);
                assert!(!batch.events.is_empty(), "feed sent revision {} without events", batch.revision);
                let r = batch.revision;
                out.push(batch);
                r
            }
            FeedItem::Progress(p) => {
                assert!(p >= progress, "progress went back from {progress} to {p}");
                progress = p;
                p
            }
        };
        if reached >= until {
            return out;
        }
    }
}

/// The next item of a feed within [`WAIT`].
pub async fn next_item(feed: &mut FeedStream) -> Result<FeedItem> {
    match tokio::time::timeout(WAIT, feed.next()).await {
        Ok(Some(item)) => item,
        Ok(None) => panic!("feed ended"),
        Err(_) => panic!("no feed item within {WAIT:?}"),
    }
}

pub fn revs(batches: &[Arc<ChangeBatch>]) -> Vec<Revision> {
    batches.iter().map(|b| b.revision).collect()
}

/// Polls `check` every 50 ms until it returns true, failing after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not true within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts that `result` is the error `want`.
#[track_caller]
pub fn assert_err<T: std::fmt::Debug>(result: Result<T>, want: BackendError, what: &str) {
    match result {
        Err(e) => assert_eq!(e, want, "{what}"),
        Ok(v) => panic!("{what}: expected {want:?}, got Ok({v:?})"),
    }
}
