//! The change feed: completeness, order, event shape, progress and compaction bounds.

use std::sync::Arc;

use cairn_backend::*;

use crate::util::*;
use crate::Harness;

fn put_ev(kv: KeyValue, prev: Option<KeyValue>) -> Event {
    Event { kind: EventKind::Put, kv, prev_kv: prev }
}

/// A delete event as etcd sends it: only the key and the delete's revision in `kv`.
fn del_ev(key: &str, rev: Revision, prev: KeyValue) -> Event {
    Event { kind: EventKind::Delete, kv: KeyValue { key: bytes(key), mod_revision: rev, ..KeyValue::default() }, prev_kv: Some(prev) }
}

fn batch(revision: Revision, events: Vec<Event>) -> ChangeBatch {
    ChangeBatch { revision, events }
}

fn unwrap(batches: Vec<Arc<ChangeBatch>>) -> Vec<ChangeBatch> {
    batches.into_iter().map(|b| (*b).clone()).collect()
}

/// The next change batch, skipping progress items.
async fn next_changes(feed: &mut FeedStream) -> Arc<ChangeBatch> {
    loop {
        match next_item(feed).await.expect("feed item") {
            FeedItem::Changes(b) => return b,
            FeedItem::Progress(_) => {}
        }
    }
}

/// Opens a feed that must fail with `Compacted { compact_revision }`, either from `watch`
/// itself or as its first item.
async fn assert_watch_compacted(b: &dyn Backend, from: Revision, compact_revision: Revision) {
    let want = BackendError::Compacted { compact_revision };
    match b.watch(from).await {
        Err(e) => assert_eq!(e, want, "watch from {from}"),
        Ok(mut feed) => match next_item(&mut feed).await {
            Err(e) => assert_eq!(e, want, "watch from {from}"),
            Ok(item) => panic!("watch from {from} below compaction at {compact_revision} yielded {item:?}"),
        },
    }
}

/// put a=1 (2); put b=1, c=1 (3); put a=2 (4); delete a (5); delete [b, d) (6).
async fn history(b: &dyn Backend) -> Vec<ChangeBatch> {
    put(b, "a", "1").await;
    ops(b, vec![put_op("b", "1"), put_op("c", "1")]).await;
    put(b, "a", "2").await;
    delete(b, single("a")).await;
    delete(b, span("b", "d")).await;
    vec![
        batch(2, vec![put_ev(kv("a", "1", 2, 2, 1, 0), None)]),
        batch(3, vec![put_ev(kv("b", "1", 3, 3, 1, 0), None), put_ev(kv("c", "1", 3, 3, 1, 0), None)]),
        batch(4, vec![put_ev(kv("a", "2", 2, 4, 2, 0), Some(kv("a", "1", 2, 2, 1, 0)))]),
        batch(5, vec![del_ev("a", 5, kv("a", "2", 2, 4, 2, 0))]),
        batch(6, vec![del_ev("b", 6, kv("b", "1", 3, 3, 1, 0)), del_ev("c", 6, kv("c", "1", 3, 3, 1, 0))]),
    ]
}

pub async fn history_every_event_once<H: Harness>(h: H) {
    let b = h.open().await;
    let want = history(&*b).await;
    let mut feed = b.watch(2).await.unwrap();
    assert_eq!(unwrap(collect_until(&mut feed, 6).await), want, "every revision from 2, with prev_kv");
    put(&*b, "d", "1").await;
    assert_eq!(next_changes(&mut feed).await.revision, 7, "after history the feed goes on live, with no repeats");
    let mut feed = b.watch(4).await.unwrap();
    assert_eq!(unwrap(collect_until(&mut feed, 6).await), want[2..].to_vec(), "a watch from revision 4");
}

pub async fn from_now<H: Harness>(h: H) {
    let b = h.open().await;
    put(&*b, "a", "1").await; // 2
    let mut feed = b.watch(0).await.unwrap();
    put(&*b, "b", "1").await; // 3
    assert_eq!(*next_changes(&mut feed).await, batch(3, vec![put_ev(kv("b", "1", 3, 3, 1, 0), None)]), "from 0: only new revisions");
}

pub async fn txn_events_in_order<H: Harness>(h: H) {
    let b = h.open().await;
    put(&*b, "x", "1").await; // 2
    let mut feed = b.watch(0).await.unwrap();
    ops(&*b, vec![put_op("b", "1"), del_op(single("x")), put_op("a", "1"), del_op(single("missing"))]).await; // 3
    let got = next_changes(&mut feed).await;
    let want = batch(
        3,
        vec![put_ev(kv("b", "1", 3, 3, 1, 0), None), del_ev("x", 3, kv("x", "1", 2, 2, 1, 0)), put_ev(kv("a", "1", 3, 3, 1, 0), None)],
    );
    assert_eq!(*got, want, "one batch per txn, events in the txn's order");
}

pub async fn delete_event_shape<H: Harness>(h: H) {
    let b = h.open().await;
    let lease = b.lease_grant(0, 600).await.unwrap().id;
    put_lease(&*b, "k", "v", lease).await; // 2
    put_lease(&*b, "k", "w", lease).await; // 3
    let mut feed = b.watch(0).await.unwrap();
    delete(&*b, single("k")).await; // 4
    let got = next_changes(&mut feed).await;
    assert_eq!(got.events.len(), 1);
    let ev = &got.events[0];
    assert_eq!(ev.kind, EventKind::Delete);
    assert_eq!(ev.kv, KeyValue { key: bytes("k"), mod_revision: 4, ..KeyValue::default() }, "a delete's kv has the key and mod_revision only");
    assert_eq!(ev.prev_kv, Some(kv("k", "w", 2, 3, 2, lease)), "a delete's prev_kv is the deleted version");
}

pub async fn racing_writers_lose_nothing<H: Harness>(h: H) {
    const WRITERS: usize = 4;
    const WRITES: usize = 40;
    let b = h.open().await;
    put(&*b, "start", "1").await; // 2
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let b = Arc::clone(&b);
        tasks.push(tokio::spawn(async move {
            for i in 0..WRITES {
                let key = format!("w{w}/{}", i % 7);
                match i % 5 {
                    3 => {
                        delete(&*b, single(&key)).await;
                    }
                    4 => {
                        ops(&*b, vec![put_op(&key, "t1"), put_op(&format!("w{w}/x{i}"), "t2")]).await;
                    }
                    _ => {
                        put(&*b, &key, &i.to_string()).await;
                    }
                }
                if i % 8 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    // Open the feeds while the writers run.
    let bb: &dyn Backend = &*b;
    eventually(WAIT, "the writers got going", || async move { rev(bb).await >= 12 }).await;
    let mut from_start = b.watch(2).await.unwrap();
    let mut from_now = b.watch(0).await.unwrap();
    for t in tasks {
        t.await.expect("writer");
    }
    let last = rev(&*b).await;
    let live = collect_until(&mut from_start, last).await;
    let tail = collect_until(&mut from_now, last).await;
    let mut replay = b.watch(2).await.unwrap();
    let history = collect_until(&mut replay, last).await;
    assert_eq!(revs(&history), (2..=last).collect::<Vec<_>>(), "the replayed history has every revision");
    assert_eq!(unwrap(live), unwrap(history.clone()), "a feed opened during the writes delivers the same history, nothing lost or repeated");
    let first = tail.first().map_or(last + 1, |b| b.revision);
    assert!(first > 12, "a feed from now starts after its registration (first {first})");
    let idx = (first - 2) as usize;
    assert_eq!(unwrap(tail), unwrap(history[idx..].to_vec()), "a feed from now delivers every later revision");
}

/// put a (2); put b (3); put a (4); put c (5); delete b (6); put a (7).
async fn short_history(b: &dyn Backend) {
    put(b, "a", "1").await;
    put(b, "b", "1").await;
    put(b, "a", "2").await;
    put(b, "c", "1").await;
    delete(b, single("b")).await;
    put(b, "a", "3").await;
}

pub async fn below_compaction_fails<H: Harness>(h: H) {
    let b = h.open().await;
    short_history(&*b).await;
    b.compact(5, true).await.unwrap();
    assert_watch_compacted(&*b, 4, 5).await;
    assert_watch_compacted(&*b, 1, 5).await;
}

pub async fn at_compaction_point<H: Harness>(h: H) {
    let b = h.open().await;
    short_history(&*b).await;
    b.compact(5, true).await.unwrap();
    // etcd 3.4.23 lets a watch start at the compact revision itself (clients retry from the
    // compact_revision a compacted watch reports).
    let mut feed = b.watch(5).await.expect("watch from the compact revision");
    let got = collect_until(&mut feed, 7).await;
    assert_eq!(revs(&got), [5, 6, 7], "a watch from the compact revision");
    assert_eq!(got[0].events, vec![put_ev(kv("c", "1", 5, 5, 1, 0), None)]);
}

pub async fn progress_after_catch_up<H: Harness>(h: H) {
    let b = h.open().await;
    for k in ["a", "b", "c", "d"] {
        put(&*b, k, "1").await; // 2..5
    }
    let mut feed = b.watch(3).await.unwrap();
    let mut seen = Vec::new();
    let progress = loop {
        match next_item(&mut feed).await.unwrap() {
            FeedItem::Changes(b) => seen.push(b.revision),
            FeedItem::Progress(p) => break p,
        }
    };
    assert_eq!(seen, [3, 4, 5], "history before the first progress");
    assert!(progress >= 5, "the first progress after catching up covers the history: {progress}");
    let mut feed = b.watch(0).await.unwrap();
    match next_item(&mut feed).await.unwrap() {
        FeedItem::Progress(p) => assert!(p >= 5, "a feed from now reports progress {p} >= 5"),
        other => panic!("a feed from now on an idle store first yields progress, got {other:?}"),
    }
}

pub async fn progress_when_idle<H: Harness>(h: H) {
    let b = h.open().await;
    let mut feed = b.watch(0).await.unwrap();
    let r = put(&*b, "a", "1").await;
    assert_eq!(next_changes(&mut feed).await.revision, r);
    loop {
        match next_item(&mut feed).await.unwrap() {
            FeedItem::Progress(p) if p >= r => break,
            FeedItem::Progress(_) => {}
            other => panic!("only progress may follow on an idle store, got {other:?}"),
        }
    }
}

pub async fn from_future_revision<H: Harness>(h: H) {
    let b = h.open().await;
    put(&*b, "a", "1").await; // 2
    let mut feed = b.watch(5).await.expect("a watch may start above the current revision");
    for i in 3..=6 {
        put(&*b, "a", &i.to_string()).await;
    }
    let got = collect_until(&mut feed, 6).await;
    assert_eq!(revs(&got), [5, 6], "revisions below the start are not delivered");
}

pub async fn lease_revoke_events<H: Harness>(h: H) {
    let b = h.open().await;
    let lease = b.lease_grant(0, 600).await.unwrap().id;
    put_lease(&*b, "k1", "v", lease).await; // 2
    put_lease(&*b, "k2", "v", lease).await; // 3
    put(&*b, "other", "v").await; // 4
    let mut feed = b.watch(0).await.unwrap();
    assert_eq!(b.lease_revoke(lease).await.unwrap(), 5, "revoke returns the revision after deleting");
    let got = next_changes(&mut feed).await;
    assert_eq!(got.revision, 5);
    let mut events = got.events.clone();
    events.sort_by(|x, y| x.kv.key.cmp(&y.kv.key));
    assert_eq!(
        events,
        vec![del_ev("k1", 5, kv("k1", "v", 2, 2, 1, lease)), del_ev("k2", 5, kv("k2", "v", 3, 3, 1, lease))],
        "revoking deletes every attached key in one revision"
    );
}

pub async fn slow_reader_loses_nothing<H: Harness>(h: H) {
    // More revisions than an in-process broadcast buffer usually holds, written while the
    // feed is not read: the feed must fill what it missed from history.
    const WRITES: i64 = 1500;
    let b = h.open().await;
    let mut feed = b.watch(0).await.unwrap();
    for i in 0..WRITES {
        put(&*b, &format!("k{}", i % 10), "v").await;
    }
    let got = collect_until(&mut feed, WRITES + 1).await;
    assert_eq!(revs(&got), (2..=WRITES + 1).collect::<Vec<_>>(), "a feed that was not read for a while still delivers every revision");
}
