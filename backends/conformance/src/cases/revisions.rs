//! The revision sequence: where it starts, what advances it, and concurrent writers.

use std::collections::BTreeSet;
use std::sync::Arc;

use cairn_backend::*;

use crate::util::*;
use crate::Harness;

pub async fn empty_store_at_revision_1<H: Harness>(h: H) {
    let b = h.open().await;
    assert_eq!(b.current_revision().await.unwrap(), (1, 0), "(revision, compact revision) of an empty store");
    let resp = range(&*b, RangeRequest { range: all(), ..RangeRequest::default() }).await;
    assert_eq!((resp.revision, resp.count), (1, 0));
    let st = b.status().await.unwrap();
    assert_eq!((st.revision, st.compact_revision), (1, 0), "status of an empty store");
    assert!(b.lease_leases().await.unwrap().is_empty(), "no leases");
}

pub async fn first_write_is_revision_2<H: Harness>(h: H) {
    let b = h.open().await;
    assert_eq!(put(&*b, "a", "1").await, 2, "the first write is revision 2");
    assert_eq!(get(&*b, "a").await, Some(kv("a", "1", 2, 2, 1, 0)));
    assert_eq!(b.current_revision().await.unwrap(), (2, 0));
    assert_eq!(b.status().await.unwrap().revision, 2);
}

pub async fn versions_and_revisions_per_key<H: Harness>(h: H) {
    let b = h.open().await;
    put(&*b, "a", "1").await; // 2
    put(&*b, "b", "1").await; // 3
    put(&*b, "a", "2").await; // 4
    put(&*b, "a", "3").await; // 5
    ops(&*b, vec![put_op("b", "2"), put_op("c", "1")]).await; // 6
    assert_eq!(
        get_all(&*b).await,
        vec![kv("a", "3", 2, 5, 3, 0), kv("b", "2", 3, 6, 2, 0), kv("c", "1", 6, 6, 1, 0)],
        "create_revision stays, mod_revision follows the write, version counts puts"
    );
    assert_eq!(rev(&*b).await, 6);
}

pub async fn concurrent_writers_gap_free<H: Harness>(h: H) {
    const WRITERS: usize = 8;
    const PUTS: usize = 50;
    let b = h.open().await;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let b = Arc::clone(&b);
        tasks.push(tokio::spawn(async move {
            let mut revs = Vec::with_capacity(PUTS);
            for i in 0..PUTS {
                // Half the writers share keys, half write their own.
                let key = if w % 2 == 0 { format!("shared/{}", i % 5) } else { format!("own/{w}/{i}") };
                revs.push(put(&*b, &key, &format!("{w}-{i}")).await);
            }
            revs
        }));
    }
    let mut seen = BTreeSet::new();
    for task in tasks {
        let revs = task.await.expect("writer task");
        assert!(revs.windows(2).all(|w| w[0] < w[1]), "one writer's revisions increase: {revs:?}");
        for r in revs {
            assert!(seen.insert(r), "revision {r} was returned twice");
        }
    }
    let n = (WRITERS * PUTS) as i64;
    assert_eq!(seen, (2..=n + 1).collect::<BTreeSet<_>>(), "revisions are exactly 2..={} with no gaps", n + 1);
    assert_eq!(rev(&*b).await, n + 1);
    // The shared keys' versions count every put to them.
    let shared = range(&*b, RangeRequest { range: KeyRange::prefix(bytes("shared/")), ..RangeRequest::default() }).await;
    let versions: i64 = shared.kvs.iter().map(|kv| kv.version).sum();
    assert_eq!(versions, (WRITERS / 2 * PUTS) as i64, "every put to a shared key is a version");
}

pub async fn concurrent_compare_and_swap<H: Harness>(h: H) {
    const TASKS: usize = 4;
    const INCREMENTS: usize = 20;
    let b = h.open().await;
    put(&*b, "counter", "0").await;
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let b = Arc::clone(&b);
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            while done < INCREMENTS {
                let cur = get(&*b, "counter").await.unwrap();
                let n: i64 = String::from_utf8(cur.value).unwrap().parse().unwrap();
                let resp = txn(
                    &*b,
                    TxnRequest {
                        compare: vec![cmp("counter", CompareResult::Equal, CompareTarget::Mod(cur.mod_revision))],
                        success: vec![put_op("counter", &(n + 1).to_string())],
                        failure: vec![],
                    },
                )
                .await;
                if resp.succeeded {
                    done += 1;
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("cas task");
    }
    let total = (TASKS * INCREMENTS) as i64;
    let counter = get(&*b, "counter").await.unwrap();
    assert_eq!(counter.value, bytes(&total.to_string()), "compare-and-swap increments are atomic: none lost");
    assert_eq!(counter.version, total + 1);
    assert_eq!(rev(&*b).await, total + 2, "only successful swaps took revisions");
}
