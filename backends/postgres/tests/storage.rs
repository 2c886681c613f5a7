//! Storage-level properties: range reads are index range scans (EXPLAIN), compaction removes
//! superseded versions in bounded batches and defragment gives the space back.

use std::sync::Arc;

use cairn_backend::*;
use cairn_backend_tests::util::{get, get_all, get_all_at, ops, put, put_op, rev};
use cairn_postgres::{testing, PostgresBackend, PostgresOptions};
use sqlx::Row;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap()
}

async fn open(o: PostgresOptions) -> Arc<PostgresBackend> {
    let url = testing::server().create_database().await.unwrap();
    PostgresBackend::connect(&url, o).await.unwrap()
}

fn assert_index_scan(what: &str, plan: &str) {
    println!("--- {what}\n{plan}");
    assert!(plan.contains("Index"), "{what}: the plan uses an index:\n{plan}");
    assert!(!plan.contains("Seq Scan"), "{what}: the plan has no sequential scan:\n{plan}");
}

/// Prefix, interval, from-key and past-revision reads on 40,000 keys (twice as many versions)
/// are index range scans on the bytea primary keys.
#[test]
fn range_reads_use_index_range_scans() {
    rt().block_on(async {
        let b = open(PostgresOptions::default()).await;
        for round in 0..2 {
            for chunk in 0..40 {
                let puts = (0..1000).map(|i| put_op(&format!("dir{chunk:02}/key{i:04}"), &round.to_string())).collect();
                ops(&*b, puts).await;
            }
        }
        sqlx::query("ANALYZE").execute(b.pool()).await.unwrap();
        let r = rev(&*b).await;
        let prefix = KeyRange::prefix(b"dir17/".to_vec());
        assert_index_scan("prefix dir17/ (latest)", &b.explain_range(&prefix, None, None).await.unwrap());
        assert_index_scan("prefix dir17/ limit 10 (latest)", &b.explain_range(&prefix, None, Some(10)).await.unwrap());
        let interval = KeyRange::new(b"dir03/key0100".to_vec(), b"dir03/key0200".to_vec());
        assert_index_scan("interval (latest)", &b.explain_range(&interval, None, None).await.unwrap());
        assert_index_scan("single key (latest)", &b.explain_range(&KeyRange::single(b"dir05/key0005".to_vec()), None, None).await.unwrap());
        let from = KeyRange::new(b"dir39/key0990".to_vec(), vec![0]);
        assert_index_scan("from key (latest)", &b.explain_range(&from, None, None).await.unwrap());
        assert_index_scan("prefix dir17/ at a past revision", &b.explain_range(&prefix, Some(r - 40), None).await.unwrap());
        assert_index_scan("interval at a past revision", &b.explain_range(&interval, Some(r - 40), None).await.unwrap());
        // And the answers are right: bytewise order, the prefix only.
        let resp = b.range(RangeRequest { range: prefix.clone(), limit: 3, ..RangeRequest::default() }).await.unwrap();
        assert_eq!(resp.count, 1000);
        assert_eq!(resp.kvs[0].key, b"dir17/key0000".to_vec());
        assert!(resp.more);
        b.shutdown().await;
    });
}

/// Keys sort bytewise (bytea), including bytes >= 0x80 and 0x00, as etcd's.
#[test]
fn keys_sort_bytewise() {
    rt().block_on(async {
        let b = open(PostgresOptions::default()).await;
        let keys: Vec<Vec<u8>> = vec![vec![0xff], vec![0x80, 0x00], b"a".to_vec(), b"B".to_vec(), vec![0x00], b"a\x00".to_vec(), vec![0xc3, 0xa9]];
        let puts = keys
            .iter()
            .map(|k| RequestOp::Put(PutRequest { key: k.clone(), value: b"v".to_vec(), ..PutRequest::default() }))
            .collect();
        ops(&*b, puts).await;
        let got: Vec<Vec<u8>> = get_all(&*b).await.into_iter().map(|kv| kv.key).collect();
        let mut want = keys.clone();
        want.sort();
        assert_eq!(got, want, "every key (etcd's all-keys range is [\\0, \\0): from \\0 on), in byte order");
        let upper = b.range(RangeRequest { range: KeyRange::new(vec![0x80], vec![0]), ..RangeRequest::default() }).await.unwrap();
        assert_eq!(upper.kvs.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>(), vec![vec![0x80, 0x00], vec![0xc3, 0xa9], vec![0xff]]);
        b.shutdown().await;
    });
}

async fn kv_rows(b: &PostgresBackend) -> i64 {
    sqlx::query("SELECT count(*) FROM kv").fetch_one(b.pool()).await.unwrap().try_get(0).unwrap()
}

async fn kv_bytes(b: &PostgresBackend) -> i64 {
    let row = sqlx::query("SELECT pg_relation_size('kv'), pg_total_relation_size('kv')").fetch_one(b.pool()).await.unwrap();
    println!("kv heap {} bytes, with indexes and TOAST {} bytes", row.try_get::<i64, _>(0).unwrap(), row.try_get::<i64, _>(1).unwrap());
    row.try_get(1).unwrap()
}

/// Compaction in batches of 100 rows removes every superseded version, keeps what reads and
/// watches at the compact revision need, and defragment returns the space.
#[test]
fn compaction_removes_superseded_versions_in_batches_and_gives_space_back() {
    rt().block_on(async {
        let b = open(PostgresOptions { compaction_batch: 100, ..PostgresOptions::default() }).await;
        let big = "x".repeat(2000);
        // 8 keys, 300 versions each (in txns of 8 puts), then one more put of k0 and a delete of k7.
        for _ in 0..300 {
            ops(&*b, (0..8).map(|k| put_op(&format!("k{k}"), &big)).collect()).await;
        }
        put(&*b, "k0", "last").await;
        let del = ops(&*b, vec![RequestOp::DeleteRange(DeleteRangeRequest { range: KeyRange::single(b"k7".to_vec()), prev_kv: false })]).await;
        let last = rev(&*b).await;
        assert_eq!(del.revision, last);
        let rows_before = kv_rows(&b).await;
        assert_eq!(rows_before, 8 * 300 + 2);
        let bytes_before = kv_bytes(&b).await;
        let before = get_all(&*b).await;
        b.compact(last, true).await.unwrap();
        // Kept: k1..k6 at their last version, k0's last version and the one before it (the
        // previous kv of an event at the compact revision... here k0's put is at last-1, so
        // only its last), k7's tombstone at the compact revision and its previous version.
        let rows_after = kv_rows(&b).await;
        assert_eq!(rows_after, 6 + 1 + 2, "only what reads and watches at the compact revision need");
        assert_eq!(get_all(&*b).await, before, "the live keys are unchanged");
        assert_eq!(get_all_at(&*b, last).await.unwrap(), before, "reads at the compact revision work");
        let mut feed = b.watch(last).await.unwrap();
        let got = cairn_backend_tests::util::collect_until(&mut feed, last).await;
        assert_eq!(got[0].events[0].prev_kv.as_ref().map(|p| p.version), Some(300), "a watch from the compact revision still has prev_kv");
        // VACUUM FULL keeps rows that a transaction still running anywhere in the cluster
        // may see (tests running at the same time on other databases): retry until it can drop them.
        let mut bytes_after = i64::MAX;
        for _ in 0..40 {
            b.defragment().await.unwrap();
            bytes_after = kv_bytes(&b).await;
            if bytes_after * 4 < bytes_before {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        println!("kv: {rows_before} rows / {bytes_before} bytes before compaction, {rows_after} rows / {bytes_after} bytes after compaction + defragment");
        assert!(bytes_after * 4 < bytes_before, "defragment gave the space back: {bytes_before} -> {bytes_after}");
        assert_eq!(get(&*b, "k0").await.unwrap().version, 301);
        let st = b.status().await.unwrap();
        assert!(st.db_size > 0 && st.db_size_in_use > 0 && st.db_size_in_use <= st.db_size, "{st:?}");
        b.shutdown().await;
    });
}

/// A compaction that did not finish (the process died) is resumed by the next process.
#[test]
fn unfinished_compaction_is_resumed_at_start() {
    rt().block_on(async {
        let url = testing::server().create_database().await.unwrap();
        let b = PostgresBackend::connect(&url, PostgresOptions::default()).await.unwrap();
        for i in 0..50 {
            put(&*b, "k", &i.to_string()).await;
        }
        // Move the compaction point as compact() does, but "die" before removing anything.
        sqlx::query("UPDATE meta SET compact_revision = 51").execute(b.pool()).await.unwrap();
        b.shutdown().await;
        drop(b);
        let b = PostgresBackend::connect(&url, PostgresOptions::default()).await.unwrap();
        let bb = &*b;
        cairn_backend_tests::util::eventually(std::time::Duration::from_secs(10), "the compaction was resumed", || async move {
            // The version visible at 51 and the one before it (prev_kv of revision 51's event).
            kv_rows(bb).await == 2
        })
        .await;
        let through: i64 = sqlx::query("SELECT compacted_through FROM meta").fetch_one(b.pool()).await.unwrap().try_get(0).unwrap();
        assert_eq!(through, 51);
        b.shutdown().await;
    });
}

/// Status reports a non-zero raft term (etcd's headers never carry term 0 once serving, and
/// etcdctl's protobuf output has it: e2e TestCtlV3GetFormat), the same in every process on the
/// database, and an index that follows the revision.
#[test]
fn status_reports_a_constant_term_and_the_revision_as_index() {
    rt().block_on(async {
        let url = testing::server().create_database().await.unwrap();
        let a = PostgresBackend::connect(&url, PostgresOptions::default()).await.unwrap();
        let b = PostgresBackend::connect(&url, PostgresOptions::default()).await.unwrap();
        put(&*a, "k", "v").await;
        put(&*b, "k", "w").await;
        for s in [a.status().await.unwrap(), b.status().await.unwrap()] {
            assert_eq!(s.raft_term, cairn_postgres::RAFT_TERM);
            assert_ne!(s.raft_term, 0);
            assert_eq!(s.revision, 3);
            assert_eq!((s.raft_index, s.raft_applied_index), (3, 3));
            assert!(s.is_leader);
        }
        a.shutdown().await;
        b.shutdown().await;
    });
}
