//! One attempt of a Cairn operation inside one TiKV transaction (or snapshot), as a
//! [`TxnView`] so that `cairn_backend::exec::execute` runs etcd's txn semantics unchanged.
//!
//! The view runs on a blocking thread and drives the async client with `Handle::block_on`.
//! Reads go to TiKV at the transaction's start timestamp, merged with the writes staged so far;
//! writes are staged (with an undo log, so a job that fails has no effect) and only handed to
//! the TiKV transaction when the attempt commits, with the revision counter and one change-log
//! entry per revision. Several jobs (client writes) may run in one view, one after the other:
//! each job that writes is sealed as its own revision, and the next job sees it.

use std::collections::BTreeMap;

use cairn_backend::exec::TxnView;
use cairn_backend::*;
use serde::{Deserialize, Serialize};
use tikv_client::{Snapshot, Transaction};
use tokio::runtime::Handle;

use crate::keys::Keys;

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
    /// How to undo `staged` back to a checkpoint: (key, its previous staged state).
    undo: Vec<Undo>,
    /// Events of the job running now (its revision is `base + 1`).
    pub(crate) events: Vec<Event>,
    /// Revisions written by earlier jobs of this attempt.
    pub(crate) sealed: Vec<ChangeBatch>,
    /// Write the counter (unchanged) even without events, to conflict with every writer.
    pub(crate) touch_counter: bool,
    /// The first TiKV error of this attempt: the attempt is retried.
    pub(crate) failed: Option<tikv_client::Error>,
}

/// A staged key and its staged state before (`None`: it was not staged).
type Undo = (Vec<u8>, Option<Option<Vec<u8>>>);

/// Where a job started, to undo it when it fails.
pub(crate) struct Checkpoint {
    undo: usize,
    events: usize,
    touch_counter: bool,
}

impl View {
    /// Reads the counter and the compact revision; on a TiKV error, the error's text.
    pub(crate) fn open(rt: Handle, mut reader: Reader, keys: Keys, now_ms: i64) -> std::result::Result<View, String> {
        let (rev, compact) = rt
            .block_on(async {
                let rev = reader.get(keys.revision()).await?;
                let compact = reader.get(keys.compact()).await?;
                Ok::<_, tikv_client::Error>((rev, compact))
            })
            .map_err(|e| e.to_string())?;
        let base = be_i64(rev, 1).unwrap_or(1);
        let compact = be_i64(compact, 0).unwrap_or(0);
        Ok(View {
            rt,
            reader,
            keys,
            base,
            compact,
            now_ms,
            staged: BTreeMap::new(),
            undo: Vec::new(),
            events: Vec::new(),
            sealed: Vec::new(),
            touch_counter: false,
            failed: None,
        })
    }

    pub(crate) fn checkpoint(&self) -> Checkpoint {
        Checkpoint { undo: self.undo.len(), events: self.events.len(), touch_counter: self.touch_counter }
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
    }

    /// Ends a job that succeeded: if it wrote, its events become revision `base + 1`, and the
    /// next job runs on top of it.
    pub(crate) fn seal(&mut self) {
        if !self.events.is_empty() {
            self.base += 1;
            self.sealed.push(ChangeBatch { revision: self.base, events: std::mem::take(&mut self.events) });
        }
        self.undo.clear();
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
        let r = self.rt.block_on(self.reader.get(key));
        self.io(r)
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

    pub(crate) fn put_raw(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.stage(key, Some(value));
    }

    pub(crate) fn delete_raw(&mut self, key: Vec<u8>) {
        self.stage(key, None);
    }

    pub(crate) fn lease(&mut self, id: LeaseId) -> Result<Option<LeaseRec>> {
        match self.get_raw(self.keys.lease(id))? {
            Some(b) => Ok(Some(dec::<LeaseRec>(&b)?)),
            None => Ok(None),
        }
    }

    pub(crate) fn set_lease(&mut self, id: LeaseId, rec: Option<LeaseRec>) {
        match rec {
            Some(r) => self.put_raw(self.keys.lease(id), enc(&r)),
            None => self.delete_raw(self.keys.lease(id)),
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
        if let Some(p) = &prev {
            if p.lease != 0 && p.lease != kv.lease {
                self.delete_raw(self.keys.attach(p.lease, &key));
            }
        }
        if kv.lease != 0 {
            self.put_raw(self.keys.attach(kv.lease, &key), Vec::new());
        }
        self.put_raw(self.keys.current(&key), enc(&kv));
        self.put_raw(self.keys.history(&key, kv.mod_revision), enc(&Some(kv.clone())));
        self.events.push(Event { kind: EventKind::Put, kv, prev_kv: prev });
        Ok(())
    }

    fn delete(&mut self, prev: KeyValue, rev: Revision) -> Result<()> {
        let key = prev.key.clone();
        if prev.lease != 0 {
            self.delete_raw(self.keys.attach(prev.lease, &key));
        }
        self.delete_raw(self.keys.current(&key));
        self.put_raw(self.keys.history(&key, rev), enc(&None::<KeyValue>));
        self.events.push(Event {
            kind: EventKind::Delete,
            kv: KeyValue { key, mod_revision: rev, ..KeyValue::default() },
            prev_kv: Some(prev),
        });
        Ok(())
    }
}
