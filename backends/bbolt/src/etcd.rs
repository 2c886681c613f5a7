//! etcd's backend layout in a bbolt file, as `etcdctl snapshot save` receives it from
//! Maintenance.Snapshot: the MVCC key space in bucket "key" (one entry per retained version),
//! "meta" (consistent index, compaction marks), "lease", "members", "members_removed",
//! "cluster" and "alarm", followed by the SHA-256 of the file that `etcdctl snapshot restore`
//! checks.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::read::ReadError;
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

/// An auth user as etcd stores it (authpb.User).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthUser {
    pub name: String,
    /// The bcrypt hash, empty for a user without a password.
    pub password: String,
    pub roles: Vec<String>,
    pub no_password: bool,
}

/// A key-range permission (authpb.Permission): READ = 0, WRITE = 1, READWRITE = 2.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthPerm {
    pub perm_type: i32,
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
}

/// An auth role as etcd stores it (authpb.Role).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthRole {
    pub name: String,
    pub perms: Vec<AuthPerm>,
}

/// etcd's auth store: buckets "auth" (enabled flag, revision), "authUsers", "authRoles".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Auth {
    pub enabled: bool,
    pub revision: u64,
    pub users: Vec<AuthUser>,
    pub roles: Vec<AuthRole>,
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
    /// The auth store; `None` writes no auth buckets (etcd then starts with auth disabled).
    pub auth: Option<Auth>,
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

    if let Some(auth) = &snap.auth {
        let mut a = Bucket::new();
        a.insert(b"authEnabled".to_vec(), vec![u8::from(auth.enabled)]);
        a.insert(
            b"authRevision".to_vec(),
            auth.revision.to_be_bytes().to_vec(),
        );
        buckets.insert(b"auth".to_vec(), a);
        let users: Bucket = auth
            .users
            .iter()
            .map(|u| (u.name.clone().into_bytes(), encode_user(u)))
            .collect();
        buckets.insert(b"authUsers".to_vec(), users);
        let roles: Bucket = auth
            .roles
            .iter()
            .map(|r| (r.name.clone().into_bytes(), encode_role(r)))
            .collect();
        buckets.insert(b"authRoles".to_vec(), roles);
    }
    write_db(&buckets)
}

/// authpb.User as etcd marshals it.
fn encode_user(u: &AuthUser) -> Vec<u8> {
    let mut out = Vec::new();
    bytes_field(&mut out, 1, u.name.as_bytes());
    bytes_field(&mut out, 2, u.password.as_bytes());
    for r in &u.roles {
        varint(&mut out, 3 << 3 | 2);
        varint(&mut out, r.len() as u64);
        out.extend_from_slice(r.as_bytes());
    }
    if u.no_password {
        // options: UserAddOptions{no_password: true}
        out.extend_from_slice(&[4 << 3 | 2, 2, 1 << 3, 1]);
    }
    out
}

/// authpb.Role as etcd marshals it.
fn encode_role(r: &AuthRole) -> Vec<u8> {
    let mut out = Vec::new();
    bytes_field(&mut out, 1, r.name.as_bytes());
    for p in &r.perms {
        let mut m = Vec::new();
        int_field(&mut m, 1, i64::from(p.perm_type));
        bytes_field(&mut m, 2, &p.key);
        bytes_field(&mut m, 3, &p.range_end);
        varint(&mut out, 2 << 3 | 2);
        varint(&mut out, m.len() as u64);
        out.extend_from_slice(&m);
    }
    out
}

/// `db` followed by its SHA-256, as etcd streams a snapshot.
pub fn with_hash(mut db: Vec<u8>) -> Vec<u8> {
    let sum = Sha256::digest(&db);
    db.extend_from_slice(&sum);
    db
}

/// One field of a protobuf message: its number and its varint or bytes payload.
enum Field<'a> {
    Varint(u32, u64),
    Bytes(u32, &'a [u8]),
}

fn read_varint(b: &[u8], at: &mut usize) -> Result<u64, ReadError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let Some(&byte) = b.get(*at) else {
            return Err(ReadError("truncated protobuf varint".into()));
        };
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(ReadError("protobuf varint too long".into()))
}

/// The fields of a protobuf message, in order; fixed-width fields are skipped.
fn fields(b: &[u8]) -> Result<Vec<Field<'_>>, ReadError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < b.len() {
        let tag = read_varint(b, &mut at)?;
        let number = (tag >> 3) as u32;
        match tag & 7 {
            0 => out.push(Field::Varint(number, read_varint(b, &mut at)?)),
            1 => at += 8,
            2 => {
                let len = read_varint(b, &mut at)? as usize;
                let Some(v) = at.checked_add(len).and_then(|end| b.get(at..end)) else {
                    return Err(ReadError("truncated protobuf field".into()));
                };
                out.push(Field::Bytes(number, v));
                at += len;
            }
            5 => at += 4,
            w => return Err(ReadError(format!("protobuf wire type {w} unsupported"))),
        }
    }
    if at > b.len() {
        return Err(ReadError("truncated protobuf field".into()));
    }
    Ok(out)
}

fn text(b: &[u8]) -> Result<String, ReadError> {
    String::from_utf8(b.to_vec()).map_err(|_| ReadError("name is not UTF-8".into()))
}

/// A revision key's (main, sub, tombstone).
fn parse_revision_key(k: &[u8]) -> Result<(i64, i64, bool), ReadError> {
    let tombstone = match k.len() {
        17 => false,
        18 if k[17] == b't' => true,
        _ => return Err(ReadError(format!("bad revision key of {} bytes", k.len()))),
    };
    if k[8] != b'_' {
        return Err(ReadError("bad revision key separator".into()));
    }
    let main = i64::from_be_bytes(k[0..8].try_into().expect("8 bytes"));
    let sub = i64::from_be_bytes(k[9..17].try_into().expect("8 bytes"));
    Ok((main, sub, tombstone))
}

fn parse_version(k: &[u8], v: &[u8]) -> Result<Version, ReadError> {
    let (revision, sub, tombstone) = parse_revision_key(k)?;
    let mut out = Version {
        revision,
        sub,
        tombstone,
        ..Default::default()
    };
    for f in fields(v)? {
        match f {
            Field::Bytes(1, b) => out.key = b.to_vec(),
            Field::Varint(2, n) => out.create_revision = n as i64,
            Field::Varint(3, n) if n as i64 != revision => {
                return Err(ReadError(format!(
                    "version at revision {revision} says mod_revision {n}"
                )))
            }
            Field::Bytes(5, b) => out.value = b.to_vec(),
            Field::Varint(4, n) => out.version = n as i64,
            Field::Varint(6, n) => out.lease = n as i64,
            _ => {}
        }
    }
    if !tombstone && out.version == 0 {
        return Err(ReadError(format!(
            "version at revision {revision} has version 0"
        )));
    }
    Ok(out)
}

fn parse_user(name: &[u8], v: &[u8]) -> Result<AuthUser, ReadError> {
    let mut u = AuthUser {
        name: text(name)?,
        ..Default::default()
    };
    for f in fields(v)? {
        match f {
            Field::Bytes(2, b) => u.password = text(b)?,
            Field::Bytes(3, b) => u.roles.push(text(b)?),
            Field::Bytes(4, b) => {
                for o in fields(b)? {
                    if let Field::Varint(1, n) = o {
                        u.no_password = n != 0;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(u)
}

fn parse_role(name: &[u8], v: &[u8]) -> Result<AuthRole, ReadError> {
    let mut r = AuthRole {
        name: text(name)?,
        ..Default::default()
    };
    for f in fields(v)? {
        if let Field::Bytes(2, b) = f {
            let mut p = AuthPerm::default();
            for pf in fields(b)? {
                match pf {
                    Field::Varint(1, n) => p.perm_type = n as i32,
                    Field::Bytes(2, k) => p.key = k.to_vec(),
                    Field::Bytes(3, e) => p.range_end = e.to_vec(),
                    _ => {}
                }
            }
            r.perms.push(p);
        }
    }
    Ok(r)
}

/// etcd's data out of a bbolt file's buckets (a data dir's `member/snap/db`, or a file
/// `etcdctl snapshot save` wrote): the key space with its revisions, the compaction mark,
/// leases, alarms, the auth store and the cluster version. Members are left out: a restored
/// data dir takes its membership from the flags, as after `etcdctl snapshot restore`.
pub fn parse_snapshot(buckets: &BTreeMap<Vec<u8>, Bucket>) -> Result<Snapshot, ReadError> {
    let empty = Bucket::new();
    let bucket = |name: &[u8]| buckets.get(name).unwrap_or(&empty);
    if !buckets.contains_key(b"key".as_slice()) || !buckets.contains_key(b"meta".as_slice()) {
        return Err(ReadError(
            "not an etcd backend file (no \"key\" or \"meta\" bucket)".into(),
        ));
    }
    let mut snap = Snapshot::default();
    for (k, v) in bucket(b"key") {
        snap.versions.push(parse_version(k, v)?);
    }
    let meta = bucket(b"meta");
    if let Some(v) = meta.get(b"finishedCompactRev".as_slice()) {
        snap.compact_revision = parse_revision_key(v)?.0;
    }
    if let Some(v) = meta.get(b"consistent_index".as_slice()) {
        if let Ok(b) = <[u8; 8]>::try_from(v.as_slice()) {
            snap.consistent_index = u64::from_be_bytes(b);
        }
    }
    for v in bucket(b"lease").values() {
        let mut l = Lease::default();
        for f in fields(v)? {
            match f {
                Field::Varint(1, n) => l.id = n as i64,
                Field::Varint(2, n) => l.ttl = n as i64,
                _ => {}
            }
        }
        snap.leases.push(l);
    }
    for k in bucket(b"alarm").keys() {
        let (mut member, mut kind) = (0u64, 0i32);
        for f in fields(k)? {
            match f {
                Field::Varint(1, n) => member = n,
                Field::Varint(2, n) => kind = n as i32,
                _ => {}
            }
        }
        snap.alarms.push((member, kind));
    }
    if let Some(v) = bucket(b"cluster").get(b"clusterVersion".as_slice()) {
        snap.cluster_version = text(v)?;
    }
    if let Some(a) = buckets.get(b"auth".as_slice()) {
        let mut auth = Auth {
            enabled: a.get(b"authEnabled".as_slice()).is_some_and(|v| v == &[1]),
            revision: a
                .get(b"authRevision".as_slice())
                .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                .map_or(0, u64::from_be_bytes),
            ..Default::default()
        };
        for (k, v) in bucket(b"authUsers") {
            auth.users.push(parse_user(k, v)?);
        }
        for (k, v) in bucket(b"authRoles") {
            auth.roles.push(parse_role(k, v)?);
        }
        snap.auth = Some(auth);
    }
    Ok(snap)
}

/// [`parse_snapshot`] of a whole bbolt file.
pub fn read_snapshot(data: &[u8]) -> Result<Snapshot, ReadError> {
    parse_snapshot(&crate::read::read_db(data)?)
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

    /// What the writer puts in a file, the reader gets back (members excepted: restored data
    /// dirs take membership from their flags).
    #[test]
    fn snapshot_round_trip() {
        let mut versions: Vec<Version> = (0..300)
            .map(|i| Version {
                key: format!("k{}", i % 40).into_bytes(),
                revision: 10 + i,
                sub: 0,
                create_revision: 10 + (i % 40),
                version: 1 + i / 40,
                value: vec![b'v'; (i as usize * 37) % 5000],
                lease: if i % 3 == 0 { 0x55 } else { 0 },
                tombstone: false,
            })
            .collect();
        versions.push(Version {
            key: b"k1".to_vec(),
            revision: 400,
            tombstone: true,
            ..Default::default()
        });
        let snap = Snapshot {
            versions: versions.clone(),
            leases: vec![Lease { id: 0x55, ttl: 30 }],
            alarms: vec![(7, 1)],
            compact_revision: 9,
            consistent_index: 42,
            cluster_version: "3.4.0".into(),
            auth: Some(Auth {
                enabled: true,
                revision: 12,
                users: vec![
                    AuthUser {
                        name: "root".into(),
                        password: "$2a$10$abc".into(),
                        roles: vec!["root".into()],
                        no_password: false,
                    },
                    AuthUser {
                        name: "u".into(),
                        roles: vec!["r1".into(), "r2".into()],
                        no_password: true,
                        ..Default::default()
                    },
                ],
                roles: vec![AuthRole {
                    name: "r1".into(),
                    perms: vec![
                        AuthPerm {
                            perm_type: 2,
                            key: b"a".to_vec(),
                            range_end: b"b".to_vec(),
                        },
                        AuthPerm {
                            perm_type: 0,
                            key: b"x".to_vec(),
                            range_end: vec![],
                        },
                    ],
                }],
            }),
            ..Default::default()
        };
        let got = read_snapshot(&with_hash(snapshot_db(&snap))).unwrap();
        assert_eq!(got.versions, versions);
        assert_eq!(got.leases, snap.leases);
        assert_eq!(got.alarms, snap.alarms);
        assert_eq!(got.compact_revision, 9);
        assert_eq!(got.consistent_index, 42);
        assert_eq!(got.cluster_version, "3.4.0");
        assert_eq!(got.auth, snap.auth);
        // Not an etcd file: a bbolt file without etcd's buckets.
        let other = crate::write_db(&BTreeMap::from([(b"x".to_vec(), Bucket::new())]));
        assert!(read_snapshot(&other).is_err());
    }
}
