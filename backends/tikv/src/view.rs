//! One attempt of a Cairn operation inside one TiKV transaction (or snapshot), as a
//! [`TxnView`] so that `cairn_backend::exec::execute` runs etcd's txn semantics unchanged.
//!
//! The view runs on a blocking thread and drives the async client with `Handle::block_on`.
//! Reads go to TiKV at the transaction's start timestamp, merged with the writes staged so far;
//! writes are staged (with an undo log, so a job that fails has no effect) and only handed to
//! the TiKV transaction when the attempt commits, with the revision counter and one change-log
//! entry per revision. Several jobs (client writes) may run in one view, one after the other:
//! each job that writes is sealed as its own revision, and the next job sees it. Every staged
//! row under a counted tag changes the space quota's count by its size ([`crate::size`]).

use std::collections::{BTreeMap, HashMap};

use cairn_backend::exec::TxnView;
use cairn_backend::*;
use serde::{Deserialize, Serialize};
use tikv_client::{Snapshot, Transaction};
use tokio::runtime::Handle;

use crate::keys::Keys;
use crate::size::{row_bytes, COUNTED_TAGS};

/// A change-log entry: the events of one revision and the nonce of the attempt that wrote
/// it (to tell, after an ambiguous commit, whether it was ours).
#[derive(Serialize, Deserialize)]
pub(crate) struct LogRecord {
    pub nonce: u64,
    pub batch: ChangeBatch,
}

/// A lease as stored: TTL and deadline in PD milliseconds.
#[derive(Serialize, Deserialize, Clone, Copy, Debug)]
pub(crate) struct LeaseRec {
    pub ttl: i64,
    pub expires_ms: i64,
}

pub(crate) fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("postcard encodes model types")
}

pub(crate) fn dec<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T> {
    postcard::from_bytes(b).map_err(|e| BackendError::internal(format!("tikv: undecodable record: {e}")))
}

pub(crate) fn be_i64(b: Option<Vec<u8>>, default: i64) -> Result<i64> {
    match b {
        None => Ok(default),
        Some(v) => {
            let a: [u8; 8] = v.as_slice().try_into().map_err(|_| BackendError::internal("tikv: bad counter"))?;
            Ok(i64::from_be_bytes(a))
        }
    }
}

pub(crate) enum Reader {
    Txn(Transaction),
    Snap(Snapshot),
    /// The transaction was taken out to commit it.
    Gone,
}

impl Reader {
    pub(crate) async fn get(&mut self, key: Vec<u8>) -> tikv_client::Result<Option<Vec<u8>>> {
        match self {
            Reader::Txn(t) => t.get(key).await,
            Reader::Snap(s) => s.get(key).await,
            Reader::Gone => Err(tikv_client::Error::StringError("tikv: read after commit".into())),
        }
    }

    async fn batch_get(&mut self, keys: Vec<Vec<u8>>) -> tikv_client::Result<HashMap<Vec<u8>, Vec<u8>>> {
        let it: Vec<tikv_client::KvPair> = match self {
            Reader::Txn(t) => t.batch_get(keys).await?.collect(),
            Reader::Snap(s) => s.batch_get(keys).await?.collect(),
            Reader::Gone => return Err(tikv_client::Error::StringError("tikv: read after commit".into())),
        };
        Ok(it.into_iter().map(|p| (Vec::<u8>::from(p.0), p.1)).collect())
    }

    async fn scan(&mut self, start: Vec<u8>, end: Vec<u8>, limit: u32) -> tikv_client::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let it: Vec<tikv_client::KvPair> = match self {
            Reader::Txn(t) => t.scan(start..end, limit).await?.collect(),
            Reader::Snap(s) => s.scan(start..end, limit).await?.collect(),
            Reader::Gone => return Err(tikv_client::Error::StringError("tikv: read after commit".into())),
        };
        Ok(it.into_iter().map(|p| (Vec::<u8>::from(p.0), p.1)).collect())
    }

    /// The number of keys in `[start, end)`, reading keys only, in pages.
    async fn count(&mut self, start: Vec<u8>, end: Vec<u8>) -> tikv_client::Result<usize> {
        const PAGE: u32 = 8192;
        let mut n = 0;
        let mut from = start;
        loop {
            let keys: Vec<tikv_client::Key> = match self {
                Reader::Txn(t) => t.scan_keys(from.clone()..end.clone(), PAGE).await?.collect(),
                Reader::Snap(s) => s.scan_keys(from.clone()..end.clone(), PAGE).await?.collect(),
                Reader::Gone => return Err(tikv_client::Error::StringError("tikv: read after commit".into())),
            };
            n += keys.len();
            match keys.into_iter().last() {
                Some(last) if n % PAGE as usize == 0 => {
                    from = Vec::<u8>::from(last);
                    from.push(0);
                }
                _ => return Ok(n),
            }
        }
    }
}

/// The bytes the rows of `[start, end)` count ([`row_bytes`]), reading it in pages.
async fn row_bytes_in(r: &mut Reader, start: Vec<u8>, end: Vec<u8>) -> tikv_client::Result<i64> {
    const PAGE: u32 = 4096;
    let mut total = 0;
    let mut from = start;
    loop {
        let page = r.scan(from.clone(), end.clone(), PAGE).await?;
        total += page.iter().map(|(k, v)| row_bytes(k.len(), Some(v.len()))).sum::<i64>();
        match page.last() {
            Some((last, _)) if page.len() == PAGE as usize => {
                from = last.clone();
                from.push(0);
            }
            _ => return Ok(total),
        }
    }
}

/// Reads a whole TiKV range, in pages.
pub(crate) async fn scan_all(
    r: &mut Reader,
    start: Vec<u8>,
    end: Vec<u8>,
) -> tikv_client::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    const PAGE: u32 = 4096;
    let mut out = Vec::new();
    let mut from = start;
    loop {
        let page = r.scan(from.clone(), end.clone(), PAGE).await?;
        let n = page.len();
        if let Some((last, _)) = page.last() {
            from = last.clone();
            from.push(0);
        }
        out.extend(page);
        if n < PAGE as usize {
            return Ok(out);
        }
    }
}

pub(crate) struct View {
    rt: Handle,
    pub(crate) reader: Reader,
    pub(crate) keys: Keys,
    base: Revision,
    compact: Revision,
    /// PD time (ms) of the attempt's start timestamp: the lease clock.
    pub(crate) now_ms: i64,
    /// Every TiKV write of this attempt besides the counter and the log (`None`: delete).
    /// Reads through the view see them, so later jobs of a batch see earlier jobs' writes.
    pub(crate) staged: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Values of single keys read at this attempt's snapshot (`None`: absent), read ahead or
    /// read once: the snapshot does not change, and staged writes take precedence.
    known: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// How to undo `staged` back to a checkpoint: (key, its previous staged state).
    undo: Vec<Undo>,
    /// Events of the job running now (its revision is `base + 1`).
    pub(crate) events: Vec<Event>,
    /// Revisions written by earlier jobs of this attempt (their log entries are staged).
    pub(crate) sealed: Vec<Revision>,
    /// Write the counter (unchanged) even without events, to conflict with every writer.
    pub(crate) touch_counter: bool,
    /// The first TiKV error of this attempt: the attempt is retried.
    pub(crate) failed: Option<tikv_client::Error>,
    /// This attempt's mark in its log entries (see `Inner::settle`).
    pub(crate) nonce: u64,
    /// The space counts at the snapshot ([`crate::size`]): bytes written (`None`: not stored
    /// yet, counted by a scan when needed) and freed by compaction.
    written: Option<i64>,
    freed: i64,
    /// `written` was counted by a scan in this attempt: the attempt stores it.
    counted: bool,
    /// What this attempt's staged rows change: by writes, and freed by compaction.
    grown: i64,
    released: i64,
}

/// A staged key and its staged state before (`None`: it was not staged).
type Undo = (Vec<u8>, Option<Option<Vec<u8>>>);

/// Where a job started, to undo it when it fails.
pub(crate) struct Checkpoint {
    undo: usize,
    events: usize,
    touch_counter: bool,
    grown: i64,
    released: i64,
}

impl View {
    /// Reads the counter, the compact revision, the space counts and the keys `ahead` (TiKV
    /// keys the jobs will read: a request's [`View::get_raw`] finds them without a round
    /// trip), all in one batch get; on a TiKV error, the error's text.
    pub(crate) fn open(
        rt: Handle,
        mut reader: Reader,
        keys: Keys,
        now_ms: i64,
        ahead: &[Vec<u8>],
    ) -> std::result::Result<View, String> {
        let meta = [keys.revision(), keys.compact(), keys.size_written(), keys.size_freed()];
        let wanted: Vec<Vec<u8>> = meta.iter().chain(ahead).cloned().collect();
        let mut found = rt.block_on(reader.batch_get(wanted)).map_err(|e| e.to_string())?;
        let mut take = |i: usize| found.remove(&meta[i]);
        let base = be_i64(take(0), 1).unwrap_or(1);
        let compact = be_i64(take(1), 0).unwrap_or(0);
        let written = match take(2) {
            Some(b) => Some(be_i64(Some(b), 0).map_err(|e| format!("space count: {e}"))?),
            None => None,
        };
        let freed = be_i64(take(3), 0).map_err(|e| format!("space count: {e}"))?;
        // The keys found come back owned; only the missing ones are copied again. (A meta key
        // among `ahead` was taken above; it is never one: those are other prefixes.)
        let mut known: HashMap<Vec<u8>, Option<Vec<u8>>> =
            ahead.iter().filter(|k| !found.contains_key(*k)).map(|k| (k.clone(), None)).collect();
        known.extend(found.into_iter().map(|(k, v)| (k, Some(v))));
        Ok(View {
            rt,
            reader,
            keys,
            base,
            compact,
            now_ms,
            staged: BTreeMap::new(),
            known,
            undo: Vec::new(),
            events: Vec::new(),
            sealed: Vec::new(),
            touch_counter: false,
            failed: None,
            nonce: rand::random(),
            written,
            freed,
            counted: false,
            grown: 0,
            released: 0,
        })
    }

    pub(crate) fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            undo: self.undo.len(),
            events: self.events.len(),
            touch_counter: self.touch_counter,
            grown: self.grown,
            released: self.released,
        }
    }

    /// Undoes everything staged since `cp` (a job that failed has no effect).
    pub(crate) fn restore(&mut self, cp: Checkpoint) {
        while self.undo.len() > cp.undo {
            let (k, prev) = self.undo.pop().expect("undo entry");
            match prev {
                None => {
                    self.staged.remove(&k);
                }
                Some(p) => {
                    self.staged.insert(k, p);
                }
            }
        }
        self.events.truncate(cp.events);
        self.touch_counter = cp.touch_counter;
        self.grown = cp.grown;
        self.released = cp.released;
    }

    /// Ends a job that succeeded: if it wrote, its events become revision `base + 1` (its log
    /// entry is staged), and the next job runs on top of it.
    pub(crate) fn seal(&mut self) {
        if !self.events.is_empty() {
            self.base += 1;
            let batch = ChangeBatch { revision: self.base, events: std::mem::take(&mut self.events) };
            let entry = enc(&LogRecord { nonce: self.nonce, batch });
            self.put_row(self.keys.log(self.base), entry, None);
            self.sealed.push(self.base);
        }
        self.undo.clear();
    }

    /// The bytes of every counted row in TiKV at the snapshot, by a scan (staged writes not
    /// included).
    pub(crate) fn scan_row_bytes(&mut self) -> Result<i64> {
        let mut total = 0;
        for tag in COUNTED_TAGS {
            let (s, e) = self.keys.tag_range(tag);
            let r = self.rt.block_on(row_bytes_in(&mut self.reader, s, e));
            total += self.io(r)?;
        }
        Ok(total)
    }

    /// The bytes written, as stored or (data from before the count) counted now.
    fn written(&mut self) -> Result<i64> {
        if let Some(w) = self.written {
            return Ok(w);
        }
        // Counted at this snapshot: what compaction frees after it comes off `freed`, so the
        // base is the rows plus what was freed so far.
        let w = self.scan_row_bytes()? + self.freed;
        tracing::info!(bytes = w - self.freed, "tikv: counted the existing rows for the space quota");
        self.written = Some(w);
        self.counted = true;
        Ok(w)
    }

    /// The space quota's measure: the bytes of Cairn's rows, this attempt's staged writes
    /// included.
    pub(crate) fn size(&mut self) -> Result<u64> {
        let written = self.written()?;
        Ok((written + self.grown - self.freed - self.released).max(0) as u64)
    }

    /// etcd's quota check ([`quota::exceeds`]) for a request adding `cost` bytes.
    pub(crate) fn check_quota(&mut self, cost: u64, quota: u64) -> Result<()> {
        if cost > 0 && quota::exceeds(self.size()?, cost, quota) {
            return Err(BackendError::NoSpace);
        }
        Ok(())
    }

    /// Stages the space counts this attempt changed (a write attempt, before it commits).
    pub(crate) fn stage_sizes(&mut self) -> Result<()> {
        if self.grown != 0 || self.counted {
            let w = self.written()? + self.grown;
            self.put_raw(self.keys.size_written(), w.to_be_bytes().to_vec());
        }
        if self.released != 0 {
            let f = self.freed + self.released;
            self.put_raw(self.keys.size_freed(), f.to_be_bytes().to_vec());
        }
        Ok(())
    }

    fn io<T>(&mut self, r: tikv_client::Result<T>) -> Result<T> {
        r.map_err(|e| {
            let msg = format!("tikv: {e}");
            if self.failed.is_none() {
                self.failed = Some(e);
            }
            BackendError::Unavailable(msg)
        })
    }

    /// A key's value, staged writes included.
    pub(crate) fn get_raw(&mut self, key: Vec<u8>) -> Result<Option<Vec<u8>>> {
        if let Some(v) = self.staged.get(&key) {
            return Ok(v.clone());
        }
        if let Some(v) = self.known.get(&key) {
            return Ok(v.clone());
        }
        let r = self.rt.block_on(self.reader.get(key.clone()));
        let v = self.io(r)?;
        self.known.insert(key, v.clone());
        Ok(v)
    }

    /// Every pair in `[start, end)`, staged writes included.
    pub(crate) fn scan_raw(&mut self, start: Vec<u8>, end: Vec<u8>) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let r = self.rt.block_on(scan_all(&mut self.reader, start.clone(), end.clone()));
        let pairs = self.io(r)?;
        if self.staged.range(start.clone()..end.clone()).next().is_none() {
            return Ok(pairs);
        }
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = pairs.into_iter().collect();
        for (k, v) in self.staged.range(start..end) {
            match v {
                Some(v) => {
                    merged.insert(k.clone(), v.clone());
                }
                None => {
                    merged.remove(k);
                }
            }
        }
        Ok(merged.into_iter().collect())
    }

    /// At most `limit` pairs of `[start, end)` as stored in TiKV (staged writes not included).
    pub(crate) fn scan_raw_limit(
        &mut self,
        start: Vec<u8>,
        end: Vec<u8>,
        limit: u32,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let r = self.rt.block_on(self.reader.scan(start, end, limit));
        self.io(r)
    }

    fn stage(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        let prev = self.staged.insert(key.clone(), value);
        self.undo.push((key, prev));
    }

    /// The change in counted bytes when `key` becomes `value`; `stored`: the length of its
    /// value in TiKV at the snapshot (`None`: absent), used when the attempt has not staged it.
    fn row_change(&self, key: &[u8], value: Option<usize>, stored: Option<usize>) -> i64 {
        let before = match self.staged.get(key) {
            Some(staged) => staged.as_ref().map(Vec::len),
            None => stored,
        };
        row_bytes(key.len(), value) - row_bytes(key.len(), before)
    }

    /// Writes a key that is not counted (meta keys, documents).
    pub(crate) fn put_raw(&mut self, key: Vec<u8>, value: Vec<u8>) {
        debug_assert!(!self.keys.is_counted(&key), "counted rows go through put_row");
        self.stage(key, Some(value));
    }

    /// Writes a counted row whose value in TiKV has length `stored` (`None`: absent).
    pub(crate) fn put_row(&mut self, key: Vec<u8>, value: Vec<u8>, stored: Option<usize>) {
        self.grown += self.row_change(&key, Some(value.len()), stored);
        self.stage(key, Some(value));
    }

    /// Deletes a counted row whose value in TiKV has length `stored` (`None`: absent).
    pub(crate) fn delete_row(&mut self, key: Vec<u8>, stored: Option<usize>) {
        self.grown += self.row_change(&key, None, stored);
        self.stage(key, None);
    }

    /// Compaction's delete of a counted row (a history version or a log entry read at the
    /// snapshot, value length `stored`): freed, not written, so compaction and writers never
    /// write the same count.
    pub(crate) fn free_row(&mut self, key: Vec<u8>, stored: usize) {
        self.released -= self.row_change(&key, None, Some(stored));
        self.stage(key, None);
    }

    pub(crate) fn lease(&mut self, id: LeaseId) -> Result<Option<LeaseRec>> {
        match self.get_raw(self.keys.lease(id))? {
            Some(b) => Ok(Some(dec::<LeaseRec>(&b)?)),
            None => Ok(None),
        }
    }

    /// Writes (`Some`) or deletes lease `id`, whose record now is `old`.
    pub(crate) fn set_lease(&mut self, id: LeaseId, old: Option<&LeaseRec>, rec: Option<LeaseRec>) {
        let stored = old.map(|r| enc(r).len());
        match rec {
            Some(r) => self.put_row(self.keys.lease(id), enc(&r), stored),
            None => self.delete_row(self.keys.lease(id), stored),
        }
    }

    /// Keys attached to lease `id`.
    pub(crate) fn attached(&mut self, id: LeaseId) -> Result<Vec<Vec<u8>>> {
        let (s, e) = self.keys.attach_range(id);
        let pairs = self.scan_raw(s, e)?;
        Ok(pairs.iter().filter_map(|(k, _)| self.keys.attached_key(k).map(|k| k.to_vec())).collect())
    }
}

impl TxnView for View {
    fn base_revision(&self) -> Revision {
        self.base
    }

    fn compact_revision(&self) -> Revision {
        self.compact
    }

    fn range_latest(
        &mut self,
        range: &KeyRange,
        limit: Option<usize>,
        count_only: bool,
    ) -> Result<(Vec<KeyValue>, i64)> {
        if range.is_single() {
            // One get (staged, read ahead or read now) instead of a count and a scan.
            let kv = match self.get_raw(self.keys.current(&range.key))? {
                Some(v) => Some(dec::<KeyValue>(&v)?),
                None => None,
            };
            let count = i64::from(kv.is_some());
            if count_only {
                return Ok((Vec::new(), count));
            }
            return Ok((kv.into_iter().take(limit.unwrap_or(usize::MAX)).collect(), count));
        }
        let Some((s, e)) = self.keys.current_range(range) else {
            return Ok((Vec::new(), 0));
        };
        // Without staged writes in the range, the count needs keys only and the kvs only the
        // first `limit`.
        if (limit.is_some() || count_only) && self.staged.range(s.clone()..e.clone()).next().is_none() {
            let r = self.rt.block_on(self.reader.count(s.clone(), e.clone()));
            let count = self.io(r)? as i64;
            if count_only {
                return Ok((Vec::new(), count));
            }
            let want = limit.unwrap_or(usize::MAX).min(u32::MAX as usize) as u32;
            let r = self.rt.block_on(self.reader.scan(s, e, want));
            let mut live = Vec::new();
            for (_, v) in self.io(r)? {
                live.push(dec(&v)?);
            }
            return Ok((live, count));
        }
        let pairs = self.scan_raw(s, e)?;
        let mut live: Vec<KeyValue> = Vec::with_capacity(pairs.len());
        for (_, v) in pairs {
            live.push(dec(&v)?);
        }
        let count = live.len() as i64;
        if count_only {
            return Ok((Vec::new(), count));
        }
        Ok((live.into_iter().take(limit.unwrap_or(usize::MAX)).collect(), count))
    }

    fn range_at(
        &mut self,
        range: &KeyRange,
        rev: Revision,
        limit: Option<usize>,
        count_only: bool,
    ) -> Result<(Vec<KeyValue>, i64)> {
        let Some((s, e)) = self.keys.history_range(range) else {
            return Ok((Vec::new(), 0));
        };
        let pairs = self.scan_raw(s, e)?;
        // Versions come grouped by key, by revision: keep the newest at or below `rev`.
        let mut at: BTreeMap<Vec<u8>, Option<KeyValue>> = BTreeMap::new();
        for (k, v) in pairs {
            let Some((key, r)) = self.keys.parse_history(&k) else {
                continue;
            };
            if r > rev || !range.contains(&key) {
                continue;
            }
            let version: Option<KeyValue> = dec(&v)?;
            at.insert(key, version);
        }
        let live: Vec<KeyValue> = at.into_values().flatten().collect();
        let count = live.len() as i64;
        if count_only {
            return Ok((Vec::new(), count));
        }
        Ok((live.into_iter().take(limit.unwrap_or(usize::MAX)).collect(), count))
    }

    fn lease_exists(&mut self, id: LeaseId) -> Result<bool> {
        Ok(self.lease(id)?.is_some())
    }

    fn put(&mut self, kv: KeyValue, prev: Option<KeyValue>) -> Result<()> {
        let key = kv.key.clone();
        // A live key has its lease's attachment (empty value); the history version is new.
        let prev_lease = prev.as_ref().map_or(0, |p| p.lease);
        if prev_lease != 0 && prev_lease != kv.lease {
            self.delete_row(self.keys.attach(prev_lease, &key), Some(0));
        }
        if kv.lease != 0 {
            let stored = (prev_lease == kv.lease).then_some(0);
            self.put_row(self.keys.attach(kv.lease, &key), Vec::new(), stored);
        }
        let stored = prev.as_ref().map(|p| enc(p).len());
        self.put_row(self.keys.current(&key), enc(&kv), stored);
        self.put_row(self.keys.history(&key, kv.mod_revision), enc(&Some(kv.clone())), None);
        self.events.push(Event { kind: EventKind::Put, kv, prev_kv: prev });
        Ok(())
    }

    fn delete(&mut self, prev: KeyValue, rev: Revision) -> Result<()> {
        let key = prev.key.clone();
        if prev.lease != 0 {
            self.delete_row(self.keys.attach(prev.lease, &key), Some(0));
        }
        self.delete_row(self.keys.current(&key), Some(enc(&prev).len()));
        self.put_row(self.keys.history(&key, rev), enc(&None::<KeyValue>), None);
        self.events.push(Event {
            kind: EventKind::Delete,
            kv: KeyValue { key, mod_revision: rev, ..KeyValue::default() },
            prev_kv: Some(prev),
        });
        Ok(())
    }
}
