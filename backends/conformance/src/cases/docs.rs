//! Named documents (`doc_get` / `doc_put`): the frontend's metadata beside the key space.

use cairn_backend::*;
use futures::StreamExt;

use crate::util::*;
use crate::Harness;

pub async fn absent_then_created<H: Harness>(h: H) {
    let b = h.open().await;
    assert_eq!(b.doc_get("auth").await.unwrap(), None, "a document never written is absent");
    assert_eq!(b.doc_put("auth", 0, b"one".to_vec()).await.unwrap(), Some(1), "creating it gives version 1");
    assert_eq!(b.doc_get("auth").await.unwrap(), Some(Doc { version: 1, value: b"one".to_vec() }));
    assert_eq!(b.doc_put("auth", 1, b"two".to_vec()).await.unwrap(), Some(2), "a matching version replaces it");
    assert_eq!(b.doc_get("auth").await.unwrap(), Some(Doc { version: 2, value: b"two".to_vec() }));
    assert_eq!(b.doc_get("other").await.unwrap(), None, "documents are independent");
}

pub async fn version_conflict_changes_nothing<H: Harness>(h: H) {
    let b = h.open().await;
    assert_eq!(b.doc_put("d", 0, b"a".to_vec()).await.unwrap(), Some(1));
    assert_eq!(b.doc_put("d", 0, b"b".to_vec()).await.unwrap(), None, "creating an existing document conflicts");
    assert_eq!(b.doc_put("d", 5, b"c".to_vec()).await.unwrap(), None, "a stale version conflicts");
    assert_eq!(b.doc_get("d").await.unwrap(), Some(Doc { version: 1, value: b"a".to_vec() }), "a conflict changes nothing");
}

pub async fn concurrent_writers_one_wins<H: Harness>(h: H) {
    let b = h.open().await;
    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move { b.doc_put("race", 0, vec![i]).await.unwrap() }));
    }
    let mut wins = 0;
    for t in tasks {
        if t.await.unwrap().is_some() {
            wins += 1;
        }
    }
    assert_eq!(wins, 1, "exactly one of several concurrent creates wins");
}

pub async fn outside_the_key_space<H: Harness>(h: H) {
    let b = h.open().await;
    put(&*b, "k", "v").await; // 2
    let mut feed = b.watch(0).await.unwrap();
    b.doc_put("d", 0, b"x".to_vec()).await.unwrap();
    assert_eq!(b.current_revision().await.unwrap().0, 2, "a document write takes no revision");
    assert_eq!(get_all(&*b).await.len(), 1, "documents are not keys");
    let r = put(&*b, "k", "w").await;
    assert_eq!(r, 3);
    loop {
        match tokio::time::timeout(WAIT, feed.next()).await.expect("feed item").expect("feed open").unwrap() {
            FeedItem::Progress(_) => continue,
            FeedItem::Changes(c) => {
                assert_eq!(c.revision, 3, "the feed carries no event for a document");
                break;
            }
        }
    }
}
