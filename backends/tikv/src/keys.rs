//! The key layout in TiKV. Every key starts with the namespace prefix, then one tag byte:
//!
//! | key | value |
//! |---|---|
//! | `P m r` | the revision counter, 8 bytes big-endian (absent: 1) |
//! | `P m c` | the compact revision, 8 bytes (absent: 0) |
//! | `P m t` | compacted-through: physical compaction finished up to here |
//! | `P m s` / `P m f` | bytes of Cairn's rows written / freed by compaction (see [`crate::size`]) |
//! | `P c <key>` | the live version of `key` (raw key: byte order is key order) |
//! | `P h <esc(key)> <rev>` | every version of `key` at `rev` (a tombstone after a delete) |
//! | `P e <rev>` | the change log: all events of revision `rev` |
//! | `P l <lease id>` | a lease: TTL and deadline on PD's clock |
//! | `P a <lease id> <key>` | `key` is attached to the lease |
//! | `P d <name>` | a named document |
//!
//! `esc` is an order-preserving escape: each `0x00` byte becomes `0x00 0xFF`, and the key ends
//! with `0x00 0x01`. So for any two keys, `esc(a) < esc(b)` exactly when `a < b`, no escaped key
//! is a prefix of another, and the 8-byte big-endian revision after it sorts the versions of
//! one key by revision, right after each other.

use cairn_backend::{KeyRange, LeaseId, Revision};

#[derive(Clone, Debug)]
pub(crate) struct Keys {
    prefix: Vec<u8>,
}

pub(crate) const TAG_CURRENT: u8 = b'c';
pub(crate) const TAG_HISTORY: u8 = b'h';
pub(crate) const TAG_LOG: u8 = b'e';
pub(crate) const TAG_LEASE: u8 = b'l';
pub(crate) const TAG_ATTACH: u8 = b'a';
pub(crate) const TAG_DOC: u8 = b'd';

impl Keys {
    pub(crate) fn new(prefix: &[u8]) -> Keys {
        Keys { prefix: prefix.to_vec() }
    }

    fn with(&self, tag: u8, rest: &[&[u8]]) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + 1 + rest.iter().map(|r| r.len()).sum::<usize>());
        k.extend_from_slice(&self.prefix);
        k.push(tag);
        for r in rest {
            k.extend_from_slice(r);
        }
        k
    }

    pub(crate) fn tag(&self, tag: u8) -> Vec<u8> {
        self.with(tag, &[])
    }

    /// `[start, end)` of every key with this tag.
    pub(crate) fn tag_range(&self, tag: u8) -> (Vec<u8>, Vec<u8>) {
        (self.tag(tag), self.tag(tag + 1))
    }

    pub(crate) fn revision(&self) -> Vec<u8> {
        self.with(b'm', &[b"r"])
    }
    pub(crate) fn compact(&self) -> Vec<u8> {
        self.with(b'm', &[b"c"])
    }
    pub(crate) fn compacted_through(&self) -> Vec<u8> {
        self.with(b'm', &[b"t"])
    }
    /// The bytes written to the counted rows (every write but compaction's deletes adds its
    /// change here), 8 bytes big-endian; absent in data written before the space quota.
    pub(crate) fn size_written(&self) -> Vec<u8> {
        self.with(b'm', &[b"s"])
    }
    /// The bytes compaction deleted from the counted rows, 8 bytes big-endian (absent: 0).
    pub(crate) fn size_freed(&self) -> Vec<u8> {
        self.with(b'm', &[b"f"])
    }

    /// Whether `k` is a row the space quota counts ([`crate::size::COUNTED_TAGS`]).
    pub(crate) fn is_counted(&self, k: &[u8]) -> bool {
        k.strip_prefix(self.prefix.as_slice())
            .and_then(|rest| rest.first())
            .is_some_and(|tag| crate::size::COUNTED_TAGS.contains(tag))
    }

    pub(crate) fn current(&self, key: &[u8]) -> Vec<u8> {
        self.with(TAG_CURRENT, &[key])
    }

    /// The TiKV range `[start, end)` of the live versions of `range`; `None` when empty.
    pub(crate) fn current_range(&self, range: &KeyRange) -> Option<(Vec<u8>, Vec<u8>)> {
        if range.is_single() {
            let start = self.current(&range.key);
            let mut end = start.clone();
            end.push(0);
            return Some((start, end));
        }
        let start = self.current(&range.key);
        let end = match range.upper() {
            Some(e) => {
                if e <= range.key.as_slice() {
                    return None;
                }
                self.current(e)
            }
            None => self.tag(TAG_CURRENT + 1),
        };
        Some((start, end))
    }

    pub(crate) fn history(&self, key: &[u8], rev: Revision) -> Vec<u8> {
        let mut k = self.tag(TAG_HISTORY);
        escape_into(&mut k, key);
        k.extend_from_slice(&(rev as u64).to_be_bytes());
        k
    }

    /// The TiKV range of every version of every key in `range`; `None` when empty.
    pub(crate) fn history_range(&self, range: &KeyRange) -> Option<(Vec<u8>, Vec<u8>)> {
        let mut start = self.tag(TAG_HISTORY);
        if range.is_single() {
            escape_into(&mut start, &range.key);
            let mut end = start.clone();
            end.extend_from_slice(&[0xff; 9]);
            return Some((start, end));
        }
        escape_unterminated(&mut start, &range.key);
        let end = match range.upper() {
            Some(e) => {
                if e <= range.key.as_slice() {
                    return None;
                }
                let mut end = self.tag(TAG_HISTORY);
                escape_unterminated(&mut end, e);
                end
            }
            None => self.tag(TAG_HISTORY + 1),
        };
        Some((start, end))
    }

    /// Splits a history key into the user key and the revision.
    pub(crate) fn parse_history(&self, k: &[u8]) -> Option<(Vec<u8>, Revision)> {
        let rest = k.strip_prefix(self.prefix.as_slice())?.strip_prefix(&[TAG_HISTORY])?;
        let mut key = Vec::new();
        let mut i = 0;
        loop {
            match (rest.get(i)?, rest.get(i + 1)) {
                (0, Some(0xff)) => {
                    key.push(0);
                    i += 2;
                }
                (0, Some(1)) => {
                    i += 2;
                    break;
                }
                (0, _) => return None,
                (b, _) => {
                    key.push(*b);
                    i += 1;
                }
            }
        }
        let rev: [u8; 8] = rest.get(i..i + 8)?.try_into().ok()?;
        Some((key, u64::from_be_bytes(rev) as Revision))
    }

    pub(crate) fn log(&self, rev: Revision) -> Vec<u8> {
        self.with(TAG_LOG, &[&(rev as u64).to_be_bytes()])
    }

    pub(crate) fn lease(&self, id: LeaseId) -> Vec<u8> {
        self.with(TAG_LEASE, &[&(id as u64).to_be_bytes()])
    }

    pub(crate) fn parse_lease(&self, k: &[u8]) -> Option<LeaseId> {
        let rest = k.strip_prefix(self.prefix.as_slice())?.strip_prefix(&[TAG_LEASE])?;
        Some(u64::from_be_bytes(rest.try_into().ok()?) as LeaseId)
    }

    pub(crate) fn attach(&self, id: LeaseId, key: &[u8]) -> Vec<u8> {
        self.with(TAG_ATTACH, &[&(id as u64).to_be_bytes(), key])
    }

    /// The range of every key attached to lease `id`.
    pub(crate) fn attach_range(&self, id: LeaseId) -> (Vec<u8>, Vec<u8>) {
        let start = self.with(TAG_ATTACH, &[&(id as u64).to_be_bytes()]);
        let end = match (id as u64).checked_add(1) {
            Some(n) => self.with(TAG_ATTACH, &[&n.to_be_bytes()]),
            None => self.tag(TAG_ATTACH + 1),
        };
        (start, end)
    }

    pub(crate) fn attached_key<'a>(&self, k: &'a [u8]) -> Option<&'a [u8]> {
        k.strip_prefix(self.prefix.as_slice())?.strip_prefix(&[TAG_ATTACH])?.get(8..)
    }

    pub(crate) fn doc(&self, name: &str) -> Vec<u8> {
        self.with(TAG_DOC, &[name.as_bytes()])
    }
}

fn escape_unterminated(out: &mut Vec<u8>, key: &[u8]) {
    for &b in key {
        out.push(b);
        if b == 0 {
            out.push(0xff);
        }
    }
}

fn escape_into(out: &mut Vec<u8>, key: &[u8]) {
    escape_unterminated(out, key);
    out.extend_from_slice(&[0, 1]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keys_sort_by_key_then_revision() {
        let k = Keys::new(b"p/");
        let keys: Vec<&[u8]> = vec![
            b"",
            b"\x00",
            b"\x00\x00",
            b"\x00\x01",
            b"\x00\xff",
            b"a",
            b"a\x00",
            b"a\x00b",
            b"a\x01",
            b"ab",
            b"b",
            b"\xff",
        ];
        let mut enc = Vec::new();
        for key in &keys {
            for rev in [2i64, 10, 300] {
                enc.push(k.history(key, rev));
            }
        }
        let mut sorted = enc.clone();
        sorted.sort();
        assert_eq!(enc, sorted, "encoding preserves (key, revision) order");
        for key in &keys {
            assert_eq!(k.parse_history(&k.history(key, 7)), Some((key.to_vec(), 7)));
        }
        // Ranges select exactly the keys inside them.
        let r = KeyRange::new(b"a".to_vec(), b"ab".to_vec());
        let (s, e) = k.history_range(&r).unwrap();
        for key in &keys {
            let h = k.history(key, 5);
            assert_eq!(h >= s && h < e, r.contains(key), "key {key:?}");
        }
        let r = KeyRange::single(b"a".to_vec());
        let (s, e) = k.history_range(&r).unwrap();
        for key in &keys {
            let h = k.history(key, 5);
            assert_eq!(h >= s && h < e, r.contains(key), "single key {key:?}");
        }
    }
}
