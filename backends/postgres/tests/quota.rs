//! etcd's space quota on PostgreSQL: writes that add data are refused with `NoSpace` once the
//! size of Cairn's tables plus the request would reach `quota_backend_bytes`; deletes still
//! work; compaction plus defragment (`VACUUM FULL`) gives the space back. The quota is on the
//! shared database, so a second process on it refuses too.

use cairn_backend::*;
use cairn_backend_tests::util::{del_op, ops, put, put_op, rev, single};
use cairn_postgres::{testing, PostgresBackend, PostgresOptions};
use rand::RngCore;

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
        // The empty store's tables: every index has its metapage, every table its first pages.
        let probe = PostgresBackend::connect(&url, PostgresOptions::default()).await.unwrap();
        put(&*probe, "small", "a").await;
        let empty = probe.status().await.unwrap().db_size_in_use as u64;
        probe.shutdown().await;
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
        // each put grows the tables by ~13 KiB (measured: 38 puts), three times its etcd cost
        assert!(admitted >= 20, "a 512 KiB quota above the empty store holds more than {admitted} 4 KiB puts");
        assert!(size + 4096 + 256 >= quota, "refused only when size + cost reaches the quota ({size} of {quota})");
        // A put grows the tables by more than its etcd cost (the value in kv's and current's
        // TOAST tables, index entries, current's superseded row): the check measures often
        // enough near the quota that the tables end at most a few puts beyond it.
        assert!(size <= quota + 64 * 1024, "the tables stopped growing near the quota ({size} of {quota})");

        // The other process shares the database, so it is full as well; a lease grant costs too.
        let req = TxnRequest::unconditional(vec![put_op("big2", &noise())]);
        assert_eq!(b.txn(req).await.unwrap_err(), BackendError::NoSpace);
        // Reads and deletes (cost 0) still work.
        ops(&*a, vec![del_op(single("small"))]).await;
        assert!(a.range(RangeRequest { range: single("big"), ..RangeRequest::default() }).await.is_ok());

        // Compaction alone keeps the tables' size (like etcd's bbolt file); defragment
        // (VACUUM FULL) gives the space of the removed versions back.
        let r = rev(&*a).await;
        a.compact(r, true).await.unwrap();
        a.defragment().await.unwrap();
        let after = a.status().await.unwrap().db_size_in_use as u64;
        println!("after compaction and defragment: {after} B");
        assert!(after + 64 * 1024 < quota, "defragment gave the space back ({after} of {quota})");
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
