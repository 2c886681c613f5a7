//! Byte encodings of the state machine's tables.

use cairn_backend::KeyValue;
use redb::TableDefinition;

/// The live keys (key -> record) that Cairn kept on disk before they moved into memory (see
/// overlay.rs). Deleted when a store is opened.
pub const OLD_CURRENT: TableDefinition<&[u8], &[u8]> = TableDefinition::new("current");
/// Every retained version, keyed as etcd's key bucket is: (revision, sub-revision) -> the
/// key's length (u32 LE), the key, then its record (a tombstone has version 0). Writes append
/// to its last leaf however long the history grows; it is also the change log.
pub const VERSIONS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("versions");
/// The index of VERSIONS by key that Cairn kept on disk before the in-memory [`super::index`]:
/// (key, revision) -> [`index_entry`]. Deleted when a store is opened.
pub const OLD_KEY_REVS: TableDefinition<(&[u8], u64), u32> = TableDefinition::new("key_revs");
/// The layout before VERSIONS and the key index: (key, revision) -> record, and the change log
/// (revision, sub-revision) -> key. Read only to migrate a store written by an older Cairn.
pub const OLD_HISTORY: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("history");
pub const OLD_EVENTS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("events");
/// Leases: ID -> granted TTL in seconds.
pub const LEASES: TableDefinition<i64, i64> = TableDefinition::new("leases");
/// Keys attached to each lease.
pub const LEASE_KEYS: TableDefinition<(i64, &[u8]), ()> = TableDefinition::new("lease_keys");
/// Documents: name -> version (u64 LE) then the value.
pub const DOCS: TableDefinition<&str, &[u8]> = TableDefinition::new("docs");
/// Scalars: see the `M_*` names.
pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

pub const M_REVISION: &str = "revision";
pub const M_COMPACT: &str = "compact_revision";
/// Revisions below this have been physically compacted.
pub const M_PHYSICAL: &str = "physical_compact";
pub const M_APPLIED: &str = "last_applied";
pub const M_MEMBERSHIP: &str = "membership";

/// A version record: `create | mod | version | lease` (i64 LE each) then the value.
pub fn encode_kv(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + kv.value.len());
    append_kv(&mut out, kv);
    out
}

fn append_kv(out: &mut Vec<u8>, kv: &KeyValue) {
    out.extend_from_slice(&kv.create_revision.to_le_bytes());
    out.extend_from_slice(&kv.mod_revision.to_le_bytes());
    out.extend_from_slice(&kv.version.to_le_bytes());
    out.extend_from_slice(&kv.lease.to_le_bytes());
    out.extend_from_slice(&kv.value);
}

/// The tombstone record of a delete at `rev`.
pub fn encode_tombstone(rev: i64) -> Vec<u8> {
    encode_kv(&tombstone(rev))
}

/// What a tombstone record holds: the delete's revision, nothing else.
fn tombstone(rev: i64) -> KeyValue {
    KeyValue {
        mod_revision: rev,
        ..Default::default()
    }
}

fn i64_at(b: &[u8], at: usize) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    i64::from_le_bytes(a)
}

/// Decodes a record of `key`; `with_value = false` leaves the value empty.
pub fn decode_kv(key: &[u8], b: &[u8], with_value: bool) -> KeyValue {
    KeyValue {
        key: key.to_vec(),
        create_revision: i64_at(b, 0),
        mod_revision: i64_at(b, 8),
        version: i64_at(b, 16),
        lease: i64_at(b, 24),
        value: if with_value {
            b[32..].to_vec()
        } else {
            Vec::new()
        },
    }
}

/// A VERSIONS row: the key's length, the key, the record.
pub fn encode_version(key: &[u8], rec: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + key.len() + rec.len());
    append_version_key(&mut out, key);
    out.extend_from_slice(rec);
    out
}

fn append_version_key(out: &mut Vec<u8>, key: &[u8]) {
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
}

/// Appends to `out` the VERSIONS row of `kv`, a tombstone at `rev` when `kv` is `None`, and
/// returns where its record starts.
pub fn append_version(out: &mut Vec<u8>, key: &[u8], kv: Option<&KeyValue>, rev: i64) -> usize {
    append_version_key(out, key);
    let at = out.len();
    match kv {
        Some(kv) => append_kv(out, kv),
        None => append_kv(out, &tombstone(rev)),
    }
    at
}

/// The key and the record of a VERSIONS row.
pub fn decode_version(b: &[u8]) -> (&[u8], &[u8]) {
    try_decode_version(b).expect("a well-formed version row")
}

/// [`decode_version`] of bytes not written by this store (a snapshot from elsewhere).
pub fn try_decode_version(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let n = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
    let key = b.get(4..4usize.checked_add(n)?)?;
    Some((key, &b[4 + n..]))
}

const TOMBSTONE_BIT: u32 = 1 << 31;

/// A key index entry: the sub-revision, with the top bit set for a tombstone.
pub fn index_entry(sub: u32, tombstone: bool) -> u32 {
    debug_assert!(sub < TOMBSTONE_BIT);
    if tombstone {
        sub | TOMBSTONE_BIT
    } else {
        sub
    }
}

/// The sub-revision of a key index entry.
pub fn index_sub(v: u32) -> u32 {
    v & !TOMBSTONE_BIT
}

/// Whether a key index entry marks a tombstone.
pub fn index_tombstone(v: u32) -> bool {
    v & TOMBSTONE_BIT != 0
}

/// Whether a record is a tombstone.
pub fn is_tombstone(b: &[u8]) -> bool {
    i64_at(b, 16) == 0
}

pub fn enc_i64(v: i64) -> [u8; 8] {
    v.to_le_bytes()
}

pub fn dec_i64(b: &[u8]) -> i64 {
    i64_at(b, 0)
}
