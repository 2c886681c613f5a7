//! Maintenance.Snapshot: the store as an etcd bbolt file (see `cairn_bbolt::etcd`), built from
//! the backend contract's own reads.
//!
//! The key space comes from one consistent cut at the current revision `cur`: every version
//! etcd would still hold after compaction at `c` is the live key set read at `c` (the newest
//! version <= `c` of each key) plus every change in `(c, cur]` read from the change feed, with
//! its sub-revision from the event order. The sub-revisions of versions written at or before
//! `c` are not kept by the contract; they are numbered in key order within their revision,
//! which nothing can observe (no read or watch may ask for revisions below `c`). A compaction
//! racing the read restarts it. Leases, members, alarms and the auth store are read right after
//! the key space.
//!
//! The other way, [`read_etcd_data_dir`] reads an etcd data dir's backend (what `etcdctl
//! snapshot restore` writes, or an etcd member's own) so a fresh native store can start from
//! it, and [`import_auth`] carries its auth store over.

use std::sync::Arc;

use cairn_backend::{Backend, BackendError, EventKind, FeedItem, KeyRange, RangeRequest, Revision};
use cairn_bbolt::etcd::{Auth, AuthPerm, AuthRole, AuthUser, Lease, Member, Snapshot, Version};
use futures::StreamExt;

use crate::alarms::Alarms;
use crate::auth::state::{AuthState, Perm, PermType, Role, User};
use crate::members::Members;

/// How many times a read that lost a race with compaction is retried.
const ATTEMPTS: usize = 5;

/// The key space: (current revision, compact revision, versions).
async fn key_space(
    backend: &dyn Backend,
) -> Result<(Revision, Revision, Vec<Version>), BackendError> {
    let mut last = None;
    for _ in 0..ATTEMPTS {
        match key_space_once(backend).await {
            Err(e @ BackendError::Compacted { .. }) => last = Some(e),
            other => return other,
        }
    }
    Err(last.expect("at least one attempt"))
}

async fn key_space_once(
    backend: &dyn Backend,
) -> Result<(Revision, Revision, Vec<Version>), BackendError> {
    let (cur, compact) = backend.current_revision().await?;
    let mut versions = Vec::new();
    if compact > 0 {
        let all = RangeRequest {
            range: KeyRange::new(vec![0], vec![0]),
            revision: compact,
            ..Default::default()
        };
        let mut kvs = backend.range(all).await?.kvs;
        kvs.sort_by(|a, b| (a.mod_revision, &a.key).cmp(&(b.mod_revision, &b.key)));
        let mut sub = 0;
        let mut prev_rev = 0;
        for kv in kvs {
            sub = if kv.mod_revision == prev_rev {
                sub + 1
            } else {
                0
            };
            prev_rev = kv.mod_revision;
            versions.push(Version {
                key: kv.key,
                revision: kv.mod_revision,
                sub,
                tombstone: false,
                create_revision: kv.create_revision,
                version: kv.version,
                value: kv.value,
                lease: kv.lease,
            });
        }
    }
    let from = compact + 1;
    if from <= cur {
        let mut feed = backend.watch(from).await?;
        'feed: while let Some(item) = feed.next().await {
            match item? {
                FeedItem::Progress(r) if r >= cur => break,
                FeedItem::Progress(_) => {}
                FeedItem::Changes(batch) => {
                    if batch.revision > cur {
                        break 'feed;
                    }
                    for (sub, ev) in batch.events.iter().enumerate() {
                        let kv = &ev.kv;
                        let tombstone = ev.kind == EventKind::Delete;
                        versions.push(Version {
                            key: kv.key.clone(),
                            revision: batch.revision,
                            sub: sub as i64,
                            tombstone,
                            create_revision: kv.create_revision,
                            version: kv.version,
                            value: kv.value.clone(),
                            lease: kv.lease,
                        });
                    }
                    if batch.revision == cur {
                        break 'feed;
                    }
                }
            }
        }
    }
    Ok((cur, compact, versions))
}

/// Everything the snapshot file holds, read from `backend`.
pub async fn collect(
    backend: &Arc<dyn Backend>,
    members: Option<&Members>,
    alarms: &Alarms,
    cluster_version: &str,
) -> Result<Snapshot, BackendError> {
    let (_, compact, versions) = key_space(backend.as_ref()).await?;
    let mut leases = Vec::new();
    for id in backend.lease_leases().await? {
        match backend.lease_time_to_live(id, false).await {
            Ok(info) => leases.push(Lease {
                id,
                ttl: info.granted_ttl,
            }),
            // Expired or revoked since it was listed.
            Err(BackendError::LeaseNotFound) => {}
            Err(e) => return Err(e),
        }
    }
    let (members, removed_members) = match members {
        Some(m) => {
            let list = m.list().await?;
            let list = list
                .into_iter()
                .map(|m| Member {
                    id: m.id,
                    name: m.name,
                    peer_urls: m.peer_urls,
                    client_urls: m.client_urls,
                    is_learner: m.is_learner,
                })
                .collect();
            (list, m.removed().await?)
        }
        None => (Vec::new(), Vec::new()),
    };
    let auth = match backend.doc_get(crate::auth::store::DOC_NAME).await? {
        Some(doc) => Some(auth_to_etcd(&crate::auth::store::parse_doc(&doc.value).map_err(BackendError::Internal)?)),
        None => None,
    };
    let consistent_index = backend.status().await?.raft_applied_index;
    Ok(Snapshot {
        versions,
        leases,
        members,
        removed_members,
        alarms: alarms
            .get(0)
            .into_iter()
            .map(|a| (a.member_id, a.alarm))
            .collect(),
        compact_revision: compact,
        consistent_index,
        cluster_version: cluster_version.to_string(),
        auth,
    })
}

/// Cairn's auth store as etcd's buckets hold it.
pub fn auth_to_etcd(s: &AuthState) -> Auth {
    Auth {
        enabled: s.enabled,
        revision: s.revision,
        users: s
            .users
            .iter()
            .map(|(name, u)| AuthUser {
                name: name.clone(),
                password: u.password.clone(),
                roles: u.roles.clone(),
                no_password: u.no_password,
            })
            .collect(),
        roles: s
            .roles
            .iter()
            .map(|(name, r)| AuthRole {
                name: name.clone(),
                perms: r
                    .perms
                    .iter()
                    .map(|p| AuthPerm { perm_type: p.perm_type.as_i32(), key: p.key.clone(), range_end: p.range_end.clone() })
                    .collect(),
            })
            .collect(),
    }
}

/// etcd's auth buckets as Cairn's auth store (bcrypt hashes carry over as they are).
pub fn auth_from_etcd(a: &Auth) -> AuthState {
    AuthState {
        enabled: a.enabled,
        revision: a.revision,
        users: a
            .users
            .iter()
            .map(|u| {
                let mut roles = u.roles.clone();
                roles.sort();
                roles.dedup();
                (u.name.clone(), User { roles, password: u.password.clone(), no_password: u.no_password })
            })
            .collect(),
        roles: a
            .roles
            .iter()
            .map(|r| {
                let mut perms: Vec<Perm> = r
                    .perms
                    .iter()
                    .map(|p| Perm {
                        perm_type: PermType::from_i32(p.perm_type),
                        key: p.key.clone(),
                        range_end: p.range_end.clone(),
                    })
                    .collect();
                perms.sort_by(|a, b| a.key.cmp(&b.key));
                (r.name.clone(), Role { perms })
            })
            .collect(),
    }
}

/// Where an etcd data dir keeps its backend.
pub const ETCD_BACKEND_FILE: &str = "member/snap/db";

/// etcd's data in `data_dir`'s [`ETCD_BACKEND_FILE`], if there is one.
pub fn read_etcd_data_dir(data_dir: &std::path::Path) -> anyhow::Result<Option<Snapshot>> {
    use anyhow::Context;
    let path = data_dir.join(ETCD_BACKEND_FILE);
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let snap = cairn_bbolt::etcd::read_snapshot(&data).with_context(|| format!("reading etcd's backend {}", path.display()))?;
    Ok(Some(snap))
}

/// Stores an imported auth store, unless the store already has one (a second start).
pub async fn import_auth(backend: &dyn Backend, auth: &Auth) -> Result<bool, BackendError> {
    let value = serde_json::to_vec(&auth_from_etcd(auth)).map_err(|e| BackendError::Internal(e.to_string()))?;
    Ok(backend.doc_put(crate::auth::store::DOC_NAME, 0, value).await?.is_some())
}

/// etcd sends the file in 32 KiB pieces, then the SHA-256 of the file.
pub const CHUNK: usize = 32 * 1024;

/// The messages' blobs and remaining-byte counts for `db` (without its hash), as etcd streams
/// them: the file in [`CHUNK`] pieces counting down the bytes left, then the 32-byte hash with
/// 0 left.
pub fn chunks(db: Vec<u8>) -> Vec<(Vec<u8>, u64)> {
    let with_hash = cairn_bbolt::etcd::with_hash(db);
    let (file, hash) = with_hash.split_at(with_hash.len() - 32);
    let mut out = Vec::with_capacity(file.len() / CHUNK + 2);
    let mut sent = 0;
    for piece in file.chunks(CHUNK) {
        sent += piece.len();
        out.push((piece.to_vec(), (file.len() - sent) as u64));
    }
    out.push((hash.to_vec(), 0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_backend::{DeleteRangeRequest, PutRequest, RequestOp, TxnRequest};

    fn put(k: &str, v: &str) -> RequestOp {
        RequestOp::Put(PutRequest {
            key: k.into(),
            value: v.into(),
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn versions_since_compaction_with_sub_revisions() {
        let b: Arc<dyn Backend> = cairn_memory::MemoryBackend::new();
        b.txn(TxnRequest::unconditional(vec![put("a", "1")]))
            .await
            .unwrap(); // 2
        b.txn(TxnRequest::unconditional(vec![
            put("b", "1"),
            put("c", "1"),
        ]))
        .await
        .unwrap(); // 3
        b.txn(TxnRequest::unconditional(vec![put("a", "2")]))
            .await
            .unwrap(); // 4
        b.compact(4, true).await.unwrap();
        b.txn(TxnRequest::unconditional(vec![
            put("d", "1"),
            put("a", "3"),
        ]))
        .await
        .unwrap(); // 5
        let del = DeleteRangeRequest {
            range: KeyRange::single(b"b".to_vec()),
            prev_kv: false,
        };
        b.txn(TxnRequest::unconditional(vec![RequestOp::DeleteRange(del)]))
            .await
            .unwrap(); // 6
        let snap = collect(&b, None, &Alarms::default(), "3.5.0")
            .await
            .unwrap();
        let got: Vec<(String, i64, i64, bool)> = snap
            .versions
            .iter()
            .map(|v| {
                (
                    String::from_utf8(v.key.clone()).unwrap(),
                    v.revision,
                    v.sub,
                    v.tombstone,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("b".into(), 3, 0, false),
                ("c".into(), 3, 1, false),
                ("a".into(), 4, 0, false),
                ("d".into(), 5, 0, false),
                ("a".into(), 5, 1, false),
                ("b".into(), 6, 0, true),
            ]
        );
        assert_eq!(snap.compact_revision, 4);
        assert_eq!(snap.versions[4].version, 3);
    }

    #[test]
    fn chunks_count_down_then_hash() {
        let db = vec![7u8; CHUNK * 2 + 10];
        let c = chunks(db);
        assert_eq!(c.len(), 4);
        assert_eq!(c[0].1, (CHUNK + 10) as u64);
        assert_eq!(c[2], (vec![7u8; 10], 0));
        assert_eq!(c[3].0.len(), 32);
        assert_eq!(c[3].1, 0);
    }
}
