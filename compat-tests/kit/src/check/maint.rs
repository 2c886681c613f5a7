//! `maintenance/*`: Status, HashKV, Hash, Defragment, Snapshot and the alarm list.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use cairn_proto::etcdserverpb::*;
use sha2::Digest as _;
use tonic::Code;

use super::{expect_status, put_rev, Ctx};
use crate::client::*;

pub(super) async fn status(x: Ctx) -> anyhow::Result<String> {
    let mut c = x.c.clone();
    let s1 = c.maint.status(StatusRequest {}).await?.into_inner();
    let h1 = s1.header.context("Status without a header")?;
    let v = s1.version.split('.').collect::<Vec<_>>();
    ensure!(
        v.len() == 3 && v.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit())),
        "version {:?} is not MAJOR.MINOR.PATCH",
        s1.version
    );
    ensure!(s1.db_size > 0, "dbSize {}", s1.db_size);
    ensure!(
        s1.db_size_in_use == 0 || s1.db_size_in_use <= s1.db_size,
        "dbSizeInUse {} > dbSize {}",
        s1.db_size_in_use,
        s1.db_size
    );
    ensure!(s1.leader != 0 && h1.member_id != 0, "leader {} member {}", s1.leader, h1.member_id);
    ensure!(s1.raft_term >= 1 && s1.raft_term == h1.raft_term, "raftTerm {} vs header {h1:?}", s1.raft_term);
    ensure!(s1.raft_index >= 1, "raftIndex {}", s1.raft_index);
    let members = c.cluster.member_list(MemberListRequest::default()).await?.into_inner().members;
    let ids: HashSet<u64> = members.iter().map(|m| m.id).collect();
    ensure!(ids.contains(&s1.leader), "leader {:x} is not in MemberList {ids:x?}", s1.leader);
    ensure!(ids.contains(&h1.member_id), "header member {:x} is not in MemberList {ids:x?}", h1.member_id);
    let r0 = current_rev(&mut c).await?;
    ensure!(h1.revision == r0, "Status header revision {} != current revision {r0}", h1.revision);
    // A write is a new raft entry and a new revision; Status reports both.
    let r1 = put_rev(&mut c, put(x.k("k"), "v")).await?;
    let s2 = c.maint.status(StatusRequest {}).await?.into_inner();
    ensure!(
        s2.raft_index > s1.raft_index,
        "raftIndex did not grow with a write: {} -> {}",
        s1.raft_index,
        s2.raft_index
    );
    ensure!(rev(&s2.header) == r1, "Status header revision {} after a put at {r1}", rev(&s2.header));
    Ok(format!(
        "version {}, dbSize {}, leader {:x}, raftIndex {} -> {}, revision {r0} -> {r1}",
        s1.version, s1.db_size, s1.leader, s1.raft_index, s2.raft_index
    ))
}

pub(super) async fn hash_kv(x: Ctx) -> anyhow::Result<String> {
    let mut c = x.c.clone();
    put_rev(&mut c, put(x.k("a"), "1")).await?;
    let r0 = current_rev(&mut c).await?;
    let a = c.maint.hash_kv(HashKvRequest { revision: r0 }).await?.into_inner();
    let b = c.maint.hash_kv(HashKvRequest { revision: r0 }).await?.into_inner();
    let z = c.maint.hash_kv(HashKvRequest { revision: 0 }).await?.into_inner();
    ensure!(
        a.hash == b.hash && a.hash == z.hash,
        "HashKV at {r0} without writes: {} {} (revision 0: {})",
        a.hash,
        b.hash,
        z.hash
    );
    ensure!(
        rev(&a.header) == r0 && rev(&z.header) == r0,
        "HashKV header revisions {} {}",
        rev(&a.header),
        rev(&z.header)
    );
    let r1 = put_rev(&mut c, put(x.k("a"), "2")).await?;
    let n = c.maint.hash_kv(HashKvRequest { revision: 0 }).await?.into_inner();
    ensure!(n.hash != a.hash, "HashKV did not change after a put ({})", n.hash);
    ensure!(rev(&n.header) == r1, "HashKV header revision {} after a put at {r1}", rev(&n.header));
    // The hash of an old revision covers the history up to it: a later write does not change it.
    let old = c.maint.hash_kv(HashKvRequest { revision: r0 }).await?.into_inner();
    ensure!(old.hash == a.hash, "HashKV at {r0} changed after a write at {r1}: {} -> {}", a.hash, old.hash);
    ensure!(
        a.compact_revision == n.compact_revision,
        "compact revision {} -> {}",
        a.compact_revision,
        n.compact_revision
    );
    expect_status(
        "HashKV at a future revision",
        c.maint.hash_kv(HashKvRequest { revision: r1 + 1000 }).await,
        Code::OutOfRange,
        "etcdserver: mvcc: required revision is a future revision",
    )?;
    Ok(format!("{:08x} at {r0} (stable), {:08x} at {r1}", a.hash, n.hash))
}

pub(super) async fn hash(x: Ctx) -> anyhow::Result<String> {
    let mut c = x.c.clone();
    put_rev(&mut c, put(x.k("a"), "1")).await?;
    let a = c.maint.hash(HashRequest {}).await?.into_inner();
    ensure!(a.header.as_ref().is_some_and(|h| h.member_id != 0), "Hash header: {:?}", a.header);
    let r1 = put_rev(&mut c, put(x.k("a"), "2")).await?;
    let b = c.maint.hash(HashRequest {}).await?.into_inner();
    ensure!(a.hash != b.hash, "Hash of the whole store did not change after a put at {r1}: {:08x}", a.hash);
    Ok(format!("{:08x} -> {:08x}", a.hash, b.hash))
}

pub(super) async fn defragment(x: Ctx) -> anyhow::Result<String> {
    let mut c = x.c.clone();
    let r1 = put_rev(&mut c, put(x.k("k"), "before defragment")).await?;
    // etcd 3.4 answers without a header.
    c.maint.defragment(DefragmentRequest {}).await.context("Defragment")?;
    let g = c.kv.range(get(x.k("k"))).await?.into_inner();
    ensure!(
        g.kvs.first().map(|kv| (kv.value.as_slice(), kv.mod_revision)) == Some((&b"before defragment"[..], r1)),
        "key after defragment: {:?}",
        g.kvs
    );
    let s = c.maint.status(StatusRequest {}).await?.into_inner();
    ensure!(s.db_size > 0, "dbSize {} after defragment", s.db_size);
    let r2 = put_rev(&mut c, put(x.k("k"), "after")).await?;
    ensure!(r2 == r1 + 1, "put after defragment at {r2}, expected {}", r1 + 1);
    Ok(format!("dbSize {} after", s.db_size))
}

/// bbolt's meta page: the page header is 16 bytes, then the meta's magic and version.
const BBOLT_MAGIC: u32 = 0xED0C_DAED;

pub(super) async fn snapshot(x: Ctx) -> anyhow::Result<String> {
    let mut c = x.c.clone();
    put_rev(&mut c, put(x.k("k"), "in the snapshot")).await?;
    let mut st = c.maint.snapshot(SnapshotRequest {}).await?.into_inner();
    let mut blob = Vec::new();
    let mut msgs = 0;
    let mut last_remaining = None;
    while let Some(m) =
        tokio::time::timeout(Duration::from_secs(20), st.message()).await.context("snapshot stalled")??
    {
        msgs += 1;
        blob.extend_from_slice(&m.blob);
        last_remaining = Some(m.remaining_bytes);
    }
    ensure!(msgs > 0, "the snapshot stream ended without a message");
    ensure!(last_remaining == Some(0), "last message has remaining_bytes {last_remaining:?}");
    ensure!(blob.len() > 4096 + 32, "snapshot of {} bytes", blob.len());
    // etcd appends the sha256 of the database; `etcdctl snapshot restore` checks it.
    let (db, sum) = blob.split_at(blob.len() - 32);
    ensure!(sha2::Sha256::digest(db).as_slice() == sum, "the last 32 bytes are not the sha256 of the rest");
    let magic = u32::from_le_bytes(db[16..20].try_into()?);
    let version = u32::from_le_bytes(db[20..24].try_into()?);
    ensure!(magic == BBOLT_MAGIC && version == 2, "not a bbolt file: magic {magic:08x}, version {version}");
    Ok(format!("{} bytes in {msgs} messages, bbolt + sha256", blob.len()))
}

pub(super) async fn alarm_list(x: Ctx) -> anyhow::Result<String> {
    let mut c = x.c.clone();
    let req =
        AlarmRequest { action: alarm_request::AlarmAction::Get as i32, member_id: 0, alarm: AlarmType::None as i32 };
    // etcd 3.4 answers without a header.
    let r = c.maint.alarm(req).await?.into_inner();
    ensure!(r.alarms.is_empty(), "alarms raised: {:?}", r.alarms);
    Ok("no alarms".into())
}
