//! etcd's space quota on PostgreSQL: writes that add data are refused with `NoSpace` once the
//! bytes Cairn's data takes (its rows' keys and values plus a fixed per-row overhead, counted in
//! `meta.bytes`) plus the request would reach `quota_backend_bytes`; deletes still work;
//! compaction gives the space back. The quota is on the shared database, so a second process on
//! it refuses too. The count stays exact whatever writes, expires, compacts or restarts, and
//! migration 3 computes it for an existing database.

use std::time::Duration;

use cairn_backend::*;
use cairn_backend_tests::util::{del_op, eventually, ops, put, put_lease, put_op, rev, single, span};
use cairn_postgres::{testing, PostgresBackend, PostgresOptions};
use rand::RngCore;
use sqlx::Row;

/// etcd's e2e TestCtlV3Alarm's quota: 13 bbolt pages.
const ETCD_E2E_QUOTA: u64 = 13 * 4096;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap()
}

/// 4 KiB that PostgreSQL cannot compress (stored out of line, in the TOAST table).
fn noise() -> String {
    let mut b = [0u8; 2048];
    rand::thread_rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn writes_are_refused_at_the_quota_until_compaction_and_defragment() {
    rt().block_on(async {
        let url = testing::server().create_database().await.unwrap();
        // The empty store plus a small put: its two rows (the version in kv, the live key in
        // current), not the tables' pages (~144 KiB: every index has its metapage, every table
        // its first pages), so etcd's e2e quota of 13 pages has room for it and 4 KiB values.
        let probe = PostgresBackend::connect(&url, PostgresOptions::default()).await.unwrap();
        put(&*probe, "small", "a").await;
        let empty = probe.status().await.unwrap().db_size_in_use as u64;
        probe.shutdown().await;
        println!("empty store plus one small put: {empty} B");
        assert!(empty < 1024, "an almost empty store counts its rows, not its tables' pages: {empty} B");
        assert!(empty + 10 * (4096 + 256) < ETCD_E2E_QUOTA, "{empty} B");
        let quota = empty + 512 * 1024;
        let opts = PostgresOptions { quota_backend_bytes: quota, ..PostgresOptions::default() };
        let a = PostgresBackend::connect(&url, opts.clone()).await.unwrap();
        let b = PostgresBackend::connect(&url, opts).await.unwrap();

        let mut admitted = 0;
        let refused = loop {
            let req = TxnRequest::unconditional(vec![put_op("big", &noise())]);
            match a.txn(req).await {
                Ok(_) => admitted += 1,
                Err(e) => break e,
            }
            assert!(admitted < 1000, "4 MiB written under a 512 KiB quota without NoSpace");
        };
        assert_eq!(refused, BackendError::NoSpace);
        let size = a.status().await.unwrap().db_size_in_use as u64;
        println!("empty store {empty} B, quota {quota} B, {admitted} puts of 4 KiB admitted, then NoSpace at {size} B");
        // each put of the same key counts its new version in kv (4 KiB + 3 + 128 B; the live row
        // in current is replaced), so about 124 puts fit
        assert!(admitted >= 100, "a 512 KiB quota above the empty store holds more than {admitted} 4 KiB puts");
        assert!(size + 4096 + 256 >= quota, "refused only when size + cost reaches the quota ({size} of {quota})");
        // The check measures often enough near the quota that the count ends below it (the
        // refused put was the first to reach it).
        assert!(size < quota, "the count stopped growing at the quota ({size} of {quota})");

        // The other process shares the database, so it is full as well; a lease grant costs too.
        let req = TxnRequest::unconditional(vec![put_op("big2", &noise())]);
        assert_eq!(b.txn(req).await.unwrap_err(), BackendError::NoSpace);
        // Reads and deletes (cost 0) still work.
        ops(&*a, vec![del_op(single("small"))]).await;
        assert!(a.range(RangeRequest { range: single("big"), ..RangeRequest::default() }).await.is_ok());

        // Compaction gives the bytes of the removed versions back (defragment, VACUUM FULL,
        // gives their pages to the filesystem and leaves the count as it is).
        let r = rev(&*a).await;
        a.compact(r, true).await.unwrap();
        let compacted = a.status().await.unwrap().db_size_in_use as u64;
        a.defragment().await.unwrap();
        let after = a.status().await.unwrap().db_size_in_use as u64;
        println!("after compaction: {compacted} B, after defragment: {after} B");
        assert_eq!(compacted, after, "defragment does not change the count");
        // Left: big's last version (kv and current), small's last version and tombstone.
        assert!(after < ETCD_E2E_QUOTA / 2, "compaction gave the space back ({after} B)");
        // b measured the full database less than a second ago; it measures again before refusing.
        put(&*b, "after", "defrag").await;
        put(&*a, "after", "again").await;
        b.lease_grant(0, 60).await.unwrap();
        a.shutdown().await;
        b.shutdown().await;
    });
}

#[test]
fn a_lease_grant_costs_etcds_lease_overhead() {
    rt().block_on(async {
        let url = testing::server().create_database().await.unwrap();
        let probe = PostgresBackend::connect(&url, PostgresOptions::default()).await.unwrap();
        let size = probe.status().await.unwrap().db_size_in_use as u64;
        probe.shutdown().await;
        // 64 bytes of room: a grant (cost 64) reaches the quota, a put costs more still.
        let opts = PostgresOptions { quota_backend_bytes: size + 64, ..PostgresOptions::default() };
        let b = PostgresBackend::connect(&url, opts).await.unwrap();
        assert_eq!(b.lease_grant(0, 60).await.unwrap_err(), BackendError::NoSpace);
        let req = TxnRequest::unconditional(vec![put_op("k", "v")]);
        assert_eq!(b.txn(req).await.unwrap_err(), BackendError::NoSpace);
        b.shutdown().await;
        let opts = PostgresOptions { quota_backend_bytes: size + 65, ..PostgresOptions::default() };
        let b = PostgresBackend::connect(&url, opts).await.unwrap();
        b.lease_grant(0, 60).await.unwrap();
        b.shutdown().await;
    });
}

/// The stored count and the count recomputed from the tables, with the per-row functions of
/// migration 3.
async fn counts(b: &PostgresBackend) -> (i64, i64) {
    let row = sqlx::query(
        "SELECT bytes,
                ((SELECT coalesce(sum(cairn_kv_bytes(key, value)), 0) FROM kv)
               + (SELECT coalesce(sum(cairn_current_bytes(key, value)), 0) FROM current)
               + (SELECT count(*) * cairn_lease_bytes() FROM leases))::bigint
         FROM meta WHERE id = 1",
    )
    .fetch_one(b.pool())
    .await
    .unwrap();
    (row.try_get(0).unwrap(), row.try_get(1).unwrap())
}

async fn assert_exact(b: &PostgresBackend, what: &str) -> i64 {
    let (kept, counted) = counts(b).await;
    println!("{what}: {kept} B");
    assert_eq!(kept, counted, "{what}: the stored count is the tables' count");
    kept
}

/// The count (`meta.bytes`) is what the tables hold after every kind of change, made by two
/// processes at once: puts of new and existing keys (the live row replaced), multi-key txns,
/// range deletes, leases granted (alone and batched), revoked (with and without keys) and expired, compaction in
/// the background and physical; it survives a restart; a defragment recounts a damaged count;
/// and migration 3 computes it for a database that had none.
#[test]
fn the_count_is_exact_through_writes_leases_compaction_restart_and_migration() {
    rt().block_on(async {
        let url = testing::server().create_database().await.unwrap();
        let opts = PostgresOptions { lease_sweep_interval: Duration::from_millis(50), ..PostgresOptions::default() };
        let a = PostgresBackend::connect(&url, opts.clone()).await.unwrap();
        let b = PostgresBackend::connect(&url, opts.clone()).await.unwrap();
        assert_eq!(assert_exact(&a, "empty").await, 0);
        put(&*a, "k", "v").await;
        // one kv row (1 + 1 + 128) and one current row (1 + 1 + 80)
        assert_eq!(assert_exact(&a, "one put").await, 130 + 82);
        put(&*a, "k", "vv").await;
        assert_eq!(assert_exact(&a, "the key again").await, 130 + 131 + 83, "the live row is replaced");

        // Concurrent writers on both processes, batched by each process's writer.
        let mut tasks = Vec::new();
        for (w, be) in [a.clone(), b.clone(), a.clone(), b.clone()].into_iter().enumerate() {
            tasks.push(tokio::spawn(async move {
                for i in 0..60 {
                    let v = "x".repeat((i * 37 + w * 11) % 3000);
                    match i % 6 {
                        0 => ops(&*be, vec![put_op(&format!("w{w}/a{i}"), &v), put_op(&format!("w{w}/b{i}"), "b")]).await,
                        1 => ops(&*be, vec![del_op(span(&format!("w{w}/a"), &format!("w{w}/b")))]).await,
                        _ => ops(&*be, vec![put_op(&format!("w{w}/k{}", i % 4), &v)]).await,
                    };
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_exact(&a, "after concurrent writes").await;

        // Leases: a grant counts, a revoke with keys and one without, expiry by either process.
        let before = assert_exact(&a, "before leases").await;
        let l1 = a.lease_grant(0, 60).await.unwrap().id;
        assert_eq!(assert_exact(&a, "a lease").await, before + 64, "a lease counts etcd's lease overhead");
        let l2 = b.lease_grant(0, 60).await.unwrap().id;
        put_lease(&*a, "leased/1", "v", l1).await;
        put_lease(&*b, "leased/2", "v", l1).await;
        assert_exact(&a, "leased keys").await;
        b.lease_revoke(l2).await.unwrap();
        assert_exact(&a, "a lease without keys revoked").await;
        a.lease_revoke(l1).await.unwrap();
        assert_exact(&a, "a lease with keys revoked").await;
        let l3 = b.lease_grant(0, 1).await.unwrap().id;
        put_lease(&*b, "short/1", "v", l3).await;
        let bb = b.clone();
        eventually(Duration::from_secs(10), "the lease expired", || {
            let bb = bb.clone();
            async move { bb.lease_leases().await.unwrap().is_empty() }
        })
        .await;
        assert_exact(&a, "a lease expired").await;

        // Concurrent grants on both processes: the writers batch them together (a lone grant is
        // a statement of its own), and an id granted earlier in the same batch is refused.
        let mut grants = Vec::new();
        for i in 0..40 {
            let be = if i % 2 == 0 { a.clone() } else { b.clone() };
            let id = if i % 8 == 0 { 4242 } else { 0 };
            grants.push(tokio::spawn(async move { be.lease_grant(id, 60).await }));
        }
        let (mut granted, mut refused) = (Vec::new(), 0);
        for g in grants {
            match g.await.unwrap() {
                Ok(g) => granted.push(g.id),
                Err(BackendError::LeaseExists) => refused += 1,
                Err(e) => panic!("grant failed: {e}"),
            }
        }
        assert_eq!(refused, 4, "id 4242 is granted once of five times");
        granted.sort();
        granted.dedup();
        assert_eq!(granted.len(), 36, "every other grant has an id of its own");
        let mut held = a.lease_leases().await.unwrap();
        held.sort();
        assert_eq!(held, granted);
        assert_exact(&a, "concurrent grants").await;
        for id in granted {
            b.lease_revoke(id).await.unwrap();
        }
        assert_exact(&a, "concurrent grants revoked").await;

        // Compaction: in the background on one process while the other writes, then physical.
        let full = assert_exact(&a, "before compaction").await;
        let r = rev(&*a).await;
        b.compact(r - 50, false).await.unwrap();
        for i in 0..20 {
            put(&*a, &format!("during/{}", i % 3), &"y".repeat(500)).await;
        }
        let r = rev(&*a).await;
        a.compact(r, true).await.unwrap();
        let compacted = assert_exact(&a, "after compaction").await;
        assert!(compacted < full, "compaction gave bytes back ({full} -> {compacted})");

        // A restart keeps the count; status reports it (plus the docs, none here).
        let in_use = a.status().await.unwrap().db_size_in_use;
        assert_eq!(in_use, compacted);
        a.shutdown().await;
        b.shutdown().await;
        let a = PostgresBackend::connect(&url, opts.clone()).await.unwrap();
        assert_eq!(a.status().await.unwrap().db_size_in_use, compacted, "the count survives a restart");
        a.doc_put("alarms", 0, b"0123456789".to_vec()).await.unwrap();
        assert_eq!(a.status().await.unwrap().db_size_in_use, compacted + 6 + 10 + 64, "a document counts its name and value");

        // A count damaged by hand is recounted by defragment.
        sqlx::query("UPDATE meta SET bytes = bytes + 12345").execute(a.pool()).await.unwrap();
        a.defragment().await.unwrap();
        assert_eq!(assert_exact(&a, "after defragment").await, compacted);

        // A database of schema 2 (no count): migration 3 counts what it holds.
        a.shutdown().await;
        drop(a);
        let admin = PostgresBackend::connect(&url, opts.clone()).await.unwrap();
        sqlx::raw_sql(
            "ALTER TABLE meta DROP COLUMN bytes;
             DROP FUNCTION cairn_kv_bytes(bytea, bytea), cairn_current_bytes(bytea, bytea), cairn_lease_bytes();
             DELETE FROM schema_version WHERE version = 3;",
        )
        .execute(admin.pool())
        .await
        .unwrap();
        admin.shutdown().await;
        let a = PostgresBackend::connect(&url, opts).await.unwrap();
        assert_eq!(assert_exact(&a, "migrated").await, compacted, "migration 3 counted the existing rows");
        a.shutdown().await;
    });
}
