//! The state of the memory backend: every version of every key, the change log and the leases.
//! Everything here is synchronous and runs under the backend's one mutex.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::Arc;
use std::time::Instant;

use cairn_backend::exec::{self, TxnView};
use cairn_backend::*;

/// One version of a key: the value written at `rev`, or a tombstone (`None`).
#[derive(Clone, Debug)]
pub(crate) struct Version {
    pub rev: Revision,
    pub kv: Option<KeyValue>,
}

#[derive(Clone, Debug)]
pub(crate) struct Lease {
    pub ttl: i64,
    pub deadline: Instant,
}

#[derive(Debug)]
pub(crate) struct Store {
    /// The current revision; 1 for the empty store.
    pub rev: Revision,
    /// The compaction point; 0 before the first compaction.
    pub compact: Revision,
    /// Every key's versions, oldest first. Compaction keeps the version visible at the compact
    /// revision and everything newer.
    pub keys: BTreeMap<Vec<u8>, Vec<Version>>,
    /// The events of every revision `>= compact` (the compact revision itself is kept so that a
    /// watch may start there, as in etcd).
    pub log: BTreeMap<Revision, Arc<ChangeBatch>>,
    pub leases: HashMap<LeaseId, Lease>,
}

impl Store {
    pub fn new() -> Self {
        Self { rev: 1, compact: 0, keys: BTreeMap::new(), log: BTreeMap::new(), leases: HashMap::new() }
    }

    /// Every stored key in `range` with its versions, in key order.
    fn keys_in<'a>(&'a self, range: &'a KeyRange) -> Box<dyn Iterator<Item = (&'a Vec<u8>, &'a Vec<Version>)> + 'a> {
        if range.is_single() {
            return Box::new(self.keys.get_key_value(&range.key).into_iter());
        }
        let upper = match range.upper() {
            // BTreeMap::range panics on an inverted interval; etcd returns nothing.
            Some(end) if range.key.as_slice() >= end => return Box::new(std::iter::empty()),
            Some(end) => Bound::Excluded(end.to_vec()),
            None => Bound::Unbounded,
        };
        Box::new(self.keys.range((Bound::Included(range.key.clone()), upper)))
    }

    /// The live kvs in `range` as of `rev`, in key order.
    pub fn live_at(&self, range: &KeyRange, rev: Revision) -> Vec<KeyValue> {
        self.keys_in(range)
            .filter_map(|(_, versions)| versions.iter().rev().find(|v| v.rev <= rev).and_then(|v| v.kv.clone()))
            .collect()
    }

    /// The live keys currently attached to `lease`.
    pub fn attached_keys(&self, lease: LeaseId) -> Vec<Vec<u8>> {
        self.live_at(&KeyRange::new(vec![0], vec![0]), self.rev)
            .into_iter()
            .filter(|kv| kv.lease == lease)
            .map(|kv| kv.key)
            .collect()
    }

    /// Runs a txn through the shared executor and, when it wrote, commits it at the next
    /// revision. Returns the batch of events to publish.
    pub fn run_txn(&mut self, req: &TxnRequest) -> Result<(TxnResponse, Option<Arc<ChangeBatch>>)> {
        let mut view = WriteView { store: self, pending: BTreeMap::new(), events: Vec::new() };
        let (resp, wrote) = exec::execute(&mut view, req)?;
        if !wrote {
            return Ok((resp, None));
        }
        let WriteView { pending, events, .. } = view;
        let rev = self.rev + 1;
        for (key, kv) in pending {
            self.keys.entry(key).or_default().push(Version { rev, kv });
        }
        self.rev = rev;
        let batch = Arc::new(ChangeBatch { revision: rev, events });
        self.log.insert(rev, batch.clone());
        Ok((resp, Some(batch)))
    }

    /// Deletes every key attached to `id` at one revision (none if it has no keys) and forgets
    /// the lease.
    pub fn revoke(&mut self, id: LeaseId) -> Result<Option<Arc<ChangeBatch>>> {
        let ops = self
            .attached_keys(id)
            .into_iter()
            .map(|key| RequestOp::DeleteRange(DeleteRangeRequest { range: KeyRange::single(key), prev_kv: false }))
            .collect();
        let (_, batch) = self.run_txn(&TxnRequest::unconditional(ops))?;
        self.leases.remove(&id);
        Ok(batch)
    }

    /// Drops what no read or watch at `>= rev` can see. The caller checked `compact < rev <= self.rev`.
    pub fn compact_to(&mut self, rev: Revision) {
        self.keys.retain(|_, versions| {
            // Keep the version visible at `rev` (unless it is a tombstone) and everything newer.
            if let Some(i) = versions.iter().rposition(|v| v.rev <= rev) {
                let keep_from = if versions[i].kv.is_some() { i } else { i + 1 };
                versions.drain(..keep_from);
            }
            !versions.is_empty()
        });
        self.log = self.log.split_off(&rev);
        self.compact = rev;
    }

    /// Bytes held by keys and values of every stored version, as a stand-in for a db size.
    pub fn size(&self) -> i64 {
        let bytes: usize = self
            .keys
            .iter()
            .map(|(k, vs)| vs.iter().map(|v| k.len() + v.kv.as_ref().map_or(0, |kv| kv.value.len())).sum::<usize>())
            .sum();
        bytes as i64
    }
}

/// One txn's view: the store as of the txn's start plus the txn's own writes.
struct WriteView<'a> {
    store: &'a Store,
    /// The txn's writes so far: the new kv, or `None` for a delete.
    pending: BTreeMap<Vec<u8>, Option<KeyValue>>,
    events: Vec<Event>,
}

fn take(kvs: Vec<KeyValue>, limit: Option<usize>, count_only: bool) -> (Vec<KeyValue>, i64) {
    let count = kvs.len() as i64;
    if count_only {
        return (Vec::new(), count);
    }
    (kvs.into_iter().take(limit.unwrap_or(usize::MAX)).collect(), count)
}

impl TxnView for WriteView<'_> {
    fn base_revision(&self) -> Revision {
        self.store.rev
    }

    fn compact_revision(&self) -> Revision {
        self.store.compact
    }

    fn range_latest(&mut self, range: &KeyRange, limit: Option<usize>, count_only: bool) -> Result<(Vec<KeyValue>, i64)> {
        let mut live: BTreeMap<Vec<u8>, KeyValue> =
            self.store.live_at(range, self.store.rev).into_iter().map(|kv| (kv.key.clone(), kv)).collect();
        for (key, write) in self.pending.iter().filter(|(k, _)| range.contains(k)) {
            match write {
                Some(kv) => live.insert(key.clone(), kv.clone()),
                None => live.remove(key),
            };
        }
        Ok(take(live.into_values().collect(), limit, count_only))
    }

    fn range_at(&mut self, range: &KeyRange, rev: Revision, limit: Option<usize>, count_only: bool) -> Result<(Vec<KeyValue>, i64)> {
        Ok(take(self.store.live_at(range, rev), limit, count_only))
    }

    fn lease_exists(&mut self, id: LeaseId) -> Result<bool> {
        Ok(self.store.leases.contains_key(&id))
    }

    fn put(&mut self, kv: KeyValue, prev: Option<KeyValue>) -> Result<()> {
        self.pending.insert(kv.key.clone(), Some(kv.clone()));
        self.events.push(Event { kind: EventKind::Put, kv, prev_kv: prev });
        Ok(())
    }

    fn delete(&mut self, prev: KeyValue, rev: Revision) -> Result<()> {
        self.pending.insert(prev.key.clone(), None);
        let kv = KeyValue { key: prev.key.clone(), mod_revision: rev, ..KeyValue::default() };
        self.events.push(Event { kind: EventKind::Delete, kv, prev_kv: Some(prev) });
        Ok(())
    }
}

/// A read through the shared executor, so that reads and txns follow the same rules.
pub(crate) fn range(store: &Store, req: &RangeRequest) -> Result<RangeResponse> {
    let mut view = WriteView { store, pending: BTreeMap::new(), events: Vec::new() };
    exec::range(&mut view, req)
}

/// CRC-32C (Castagnoli), the checksum etcd's HashKV uses; chainable: `crc32c(crc32c(0, a), b)`
/// equals `crc32c(0, a ++ b)`.
pub(crate) fn crc32c(crc: u32, data: &[u8]) -> u32 {
    let mut crc = !crc;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

/// The hash of every event in revisions (compact, rev]: for each, in order, the revision
/// (big-endian), the kind (0 put, 1 delete), then key and value each preceded by its length.
/// Deterministic for equal histories; not byte-compatible with etcd's hash.
pub(crate) fn hash_events(store: &Store, rev: Revision) -> u32 {
    let mut crc = 0;
    for batch in store.log.range(store.compact + 1..=rev).map(|(_, b)| b) {
        for ev in &batch.events {
            crc = crc32c(crc, &batch.revision.to_be_bytes());
            crc = crc32c(crc, &[u8::from(ev.kind == EventKind::Delete)]);
            for bytes in [&ev.kv.key, &ev.kv.value] {
                crc = crc32c(crc, &(bytes.len() as u64).to_be_bytes());
                crc = crc32c(crc, bytes);
            }
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    #[test]
    fn crc32c_check_value() {
        assert_eq!(super::crc32c(0, b"123456789"), 0xE306_9283);
        assert_eq!(super::crc32c(super::crc32c(0, b"1234"), b"56789"), 0xE306_9283);
    }
}
