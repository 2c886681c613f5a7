//! etcd's backend layout in a bbolt file, as `etcdctl snapshot save` receives it from
//! Maintenance.Snapshot: the MVCC key space in bucket "key" (one entry per retained version),
//! "meta" (consistent index, compaction marks), "lease", "members", "members_removed",
//! "cluster" and "alarm", followed by the SHA-256 of the file that `etcdctl snapshot restore`
//! checks.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::{write_db, Bucket};

/// One retained version of a key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Version {
    pub key: Vec<u8>,
    /// The main revision that wrote this version, and its place within that revision.
    pub revision: i64,
    pub sub: i64,
    /// A delete: etcd keeps a tombstone entry with only the key.
    pub tombstone: bool,
    pub create_revision: i64,
    pub version: i64,
    pub value: Vec<u8>,
    pub lease: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lease {
    pub id: i64,
    pub ttl: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Member {
    pub id: u64,
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    pub is_learner: bool,
}

/// Everything a snapshot holds.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub versions: Vec<Version>,
    pub leases: Vec<Lease>,
    pub members: Vec<Member>,
    pub removed_members: Vec<u64>,
    /// (member ID, alarm type number)
    pub alarms: Vec<(u64, i32)>,
    pub compact_revision: i64,
    pub consistent_index: u64,
    /// e.g. "3.5.0"
    pub cluster_version: String,
}

/// etcd's revision key: 8-byte big-endian main revision, '_', 8-byte big-endian sub.
pub fn revision_key(main: i64, sub: i64, tombstone: bool) -> Vec<u8> {
    let mut k = Vec::with_capacity(18);
    k.extend_from_slice(&main.to_be_bytes());
    k.push(b'_');
    k.extend_from_slice(&sub.to_be_bytes());
    if tombstone {
        k.push(b't');
    }
    k
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A proto3 varint field, left out when zero.
fn int_field(out: &mut Vec<u8>, field: u32, v: i64) {
    if v != 0 {
        varint(out, u64::from(field << 3));
        varint(out, v as u64);
    }
}

/// A proto3 bytes field, left out when empty.
fn bytes_field(out: &mut Vec<u8>, field: u32, v: &[u8]) {
    if !v.is_empty() {
        varint(out, u64::from(field << 3 | 2));
        varint(out, v.len() as u64);
        out.extend_from_slice(v);
    }
}

/// mvccpb.KeyValue as etcd marshals it; a tombstone carries only the key.
pub fn encode_key_value(v: &Version) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.key.len() + v.value.len() + 32);
    bytes_field(&mut out, 1, &v.key);
    if !v.tombstone {
        int_field(&mut out, 2, v.create_revision);
        int_field(&mut out, 3, v.revision);
        int_field(&mut out, 4, v.version);
        bytes_field(&mut out, 5, &v.value);
        int_field(&mut out, 6, v.lease);
    }
    out
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '<' | '>' | '&' => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_list(v: &[String]) -> String {
    format!(
        "[{}]",
        v.iter()
            .map(|s| json_string(s))
            .collect::<Vec<_>>()
            .join(",")
    )
}

/// etcd's member record in the "members" bucket (Go's JSON of membership.Member).
pub fn member_json(m: &Member) -> String {
    let mut s = format!("{{\"id\":{},\"peerURLs\":{}", m.id, json_list(&m.peer_urls));
    if m.is_learner {
        s.push_str(",\"isLearner\":true");
    }
    if !m.name.is_empty() {
        s.push_str(&format!(",\"name\":{}", json_string(&m.name)));
    }
    if !m.client_urls.is_empty() {
        s.push_str(&format!(",\"clientURLs\":{}", json_list(&m.client_urls)));
    }
    s.push('}');
    s
}

/// The bbolt file of `snap`, without the trailing hash.
pub fn snapshot_db(snap: &Snapshot) -> Vec<u8> {
    let mut buckets: BTreeMap<Vec<u8>, Bucket> = BTreeMap::new();
    let key: Bucket = snap
        .versions
        .iter()
        .map(|v| {
            (
                revision_key(v.revision, v.sub, v.tombstone),
                encode_key_value(v),
            )
        })
        .collect();
    buckets.insert(b"key".to_vec(), key);

    let mut meta = Bucket::new();
    meta.insert(
        b"consistent_index".to_vec(),
        snap.consistent_index.to_be_bytes().to_vec(),
    );
    if snap.compact_revision > 0 {
        let rev = revision_key(snap.compact_revision, 0, false);
        meta.insert(b"finishedCompactRev".to_vec(), rev.clone());
        meta.insert(b"scheduledCompactRev".to_vec(), rev);
    }
    buckets.insert(b"meta".to_vec(), meta);

    let mut lease = Bucket::new();
    for l in &snap.leases {
        let mut v = Vec::new();
        int_field(&mut v, 1, l.id);
        int_field(&mut v, 2, l.ttl);
        lease.insert(l.id.to_be_bytes().to_vec(), v);
    }
    buckets.insert(b"lease".to_vec(), lease);

    let members: Bucket = snap
        .members
        .iter()
        .map(|m| {
            (
                format!("{:x}", m.id).into_bytes(),
                member_json(m).into_bytes(),
            )
        })
        .collect();
    buckets.insert(b"members".to_vec(), members);
    let removed: Bucket = snap
        .removed_members
        .iter()
        .map(|id| (format!("{id:x}").into_bytes(), b"removed".to_vec()))
        .collect();
    buckets.insert(b"members_removed".to_vec(), removed);

    let mut cluster = Bucket::new();
    if !snap.cluster_version.is_empty() {
        cluster.insert(
            b"clusterVersion".to_vec(),
            snap.cluster_version.clone().into_bytes(),
        );
    }
    buckets.insert(b"cluster".to_vec(), cluster);

    let mut alarm = Bucket::new();
    for &(member, kind) in &snap.alarms {
        let mut k = Vec::new();
        int_field(&mut k, 1, member as i64);
        int_field(&mut k, 2, i64::from(kind));
        alarm.insert(k, Vec::new());
    }
    buckets.insert(b"alarm".to_vec(), alarm);
    write_db(&buckets)
}

/// `db` followed by its SHA-256, as etcd streams a snapshot.
pub fn with_hash(mut db: Vec<u8>) -> Vec<u8> {
    let sum = Sha256::digest(&db);
    db.extend_from_slice(&sum);
    db
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revision_keys_sort_by_revision() {
        assert_eq!(
            revision_key(2, 1, false),
            [0, 0, 0, 0, 0, 0, 0, 2, b'_', 0, 0, 0, 0, 0, 0, 0, 1]
        );
        assert_eq!(revision_key(3, 0, true).len(), 18);
        assert!(revision_key(2, 9, false) < revision_key(3, 0, false));
    }

    #[test]
    fn key_value_protobuf() {
        let v = Version {
            key: b"foo".to_vec(),
            revision: 5,
            create_revision: 2,
            version: 3,
            value: b"bar".to_vec(),
            lease: 0x1234,
            ..Default::default()
        };
        assert_eq!(
            encode_key_value(&v),
            [
                0x0a, 3, b'f', b'o', b'o', 0x10, 2, 0x18, 5, 0x20, 3, 0x2a, 3, b'b', b'a', b'r',
                0x30, 0xb4, 0x24
            ]
        );
        let t = Version {
            key: b"foo".to_vec(),
            revision: 6,
            tombstone: true,
            ..Default::default()
        };
        assert_eq!(encode_key_value(&t), [0x0a, 3, b'f', b'o', b'o']);
    }

    #[test]
    fn member_record_is_gos_json() {
        let m = Member {
            id: 10,
            name: "a".into(),
            peer_urls: vec!["http://x:2380".into()],
            ..Default::default()
        };
        assert_eq!(
            member_json(&m),
            r#"{"id":10,"peerURLs":["http://x:2380"],"name":"a"}"#
        );
        let l = Member {
            id: 1,
            peer_urls: vec![],
            is_learner: true,
            ..Default::default()
        };
        assert_eq!(
            member_json(&l),
            r#"{"id":1,"peerURLs":[],"isLearner":true}"#
        );
    }

    #[test]
    fn hash_is_appended() {
        let out = with_hash(vec![0u8; 4096]);
        assert_eq!(out.len(), 4096 + 32);
        assert_eq!(&out[4096..], Sha256::digest(vec![0u8; 4096]).as_slice());
    }
}
