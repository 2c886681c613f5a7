//! The write-ahead log that holds the raft log and the raft vote.
//!
//! Layout: `<dir>/<seq:016x>.wal` segment files, each a sequence of records framed as
//! `len: u32 LE | crc32: u32 LE | payload` (payload = postcard-encoded [`Record`]). One writer
//! appends records and calls `fdatasync` once per batch of jobs, then completes every job of
//! the batch: an append is acknowledged only after it is on disk. The writer is a thread of
//! its own that batches whatever jobs queued up (group commit), or, for a single node, the
//! submitting thread itself, one job at a time (the proposer already groups requests).
//!
//! A segment is extended ahead of its records by writing zeros, [`ZERO_AHEAD`] bytes at a time
//! (etcd preallocates its WAL files too), so the fsync of a record does not also have to write
//! the file's new size; the zeros after the last record mark the end of its data.
//!
//! Recovery replays every segment in order. A torn or corrupt record at the end of the last
//! segment (a crash in the middle of a write) is cut off; damage anywhere else is an error,
//! because acknowledged records would be lost. Each new segment starts with the current vote,
//! committed id and purge point, so older segments can be deleted once every entry in them is
//! purged. The committed id is written ahead of the next appended entries rather than on its
//! own (see `save_committed` in log_store.rs).
//!
//! After any write or sync error the writer fails every later job: it never writes after a
//! record that may be torn, so a full disk cannot corrupt what is stored.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::types::{Entry, LogId, TypeConfig, Vote};

const SEGMENT_BYTES: u64 = 64 << 20;
const HEADER: usize = 8;
/// Bytes of zeros written past the end of the records whenever a batch reaches the end of what
/// is already written.
const ZERO_AHEAD: u64 = 2 << 20;

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Record {
    Entry(Entry),
    Vote(Vote),
    Committed(Option<LogId>),
    /// Remove entries with index >= this.
    Truncate(u64),
    /// Entries up to and including this log id are no longer needed.
    Purge(LogId),
}

/// An entry of the in-memory log, kept as its log record's bytes: a decoded request holds
/// several allocations and takes 2-4x the room (decoded when raft reads it).
pub(crate) struct LogEntry {
    pub log_id: LogId,
    payload: Box<[u8]>,
    /// The entry as it was appended, until its first read takes it: on a single node that is
    /// the state machine's apply, which so decodes nothing it was just handed.
    unread: Option<Entry>,
}

impl LogEntry {
    /// The entry of a [`Record::Entry`]'s encoded `payload`.
    fn new(log_id: LogId, payload: Box<[u8]>) -> Self {
        LogEntry {
            log_id,
            payload,
            unread: None,
        }
    }

    /// The entry, taken as appended on its first read and decoded from its bytes after that.
    pub fn read(&mut self) -> io::Result<Entry> {
        match self.unread.take() {
            Some(e) => Ok(e),
            None => self.decode(),
        }
    }

    pub fn decode(&self) -> io::Result<Entry> {
        match postcard::from_bytes(&self.payload).map_err(io::Error::other)? {
            Record::Entry(e) => Ok(e),
            _ => Err(io::Error::other(
                "the in-memory log holds a record that is no entry",
            )),
        }
    }
}

/// The log as it is in memory: what replay rebuilds and what readers see.
#[derive(Default)]
pub(crate) struct LogState {
    pub entries: BTreeMap<u64, LogEntry>,
    pub vote: Option<Vote>,
    pub committed: Option<LogId>,
    /// `committed` changed since it was last written: the next append writes it first.
    pub committed_unwritten: bool,
    pub purged: Option<LogId>,
}

impl LogState {
    /// Applies a record read back from the log; `payload` is its encoding.
    fn apply(&mut self, rec: Record, payload: &[u8]) {
        match rec {
            Record::Entry(e) => {
                self.entries
                    .insert(e.log_id.index, LogEntry::new(e.log_id, payload.into()));
            }
            Record::Vote(v) => self.vote = Some(v),
            Record::Committed(c) => self.committed = c,
            Record::Truncate(since) => {
                self.entries.split_off(&since);
            }
            Record::Purge(id) => {
                let keep = self.entries.split_off(&(id.index + 1));
                self.entries = keep;
                if self.purged.is_none_or(|p| p.index < id.index) {
                    self.purged = Some(id);
                }
            }
        }
    }

    pub fn last_log_id(&self) -> Option<LogId> {
        self.entries
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(self.purged)
    }
}

/// What to do when a job's bytes are on disk.
pub(crate) enum Done {
    Flushed(openraft::storage::LogFlushed<TypeConfig>),
    Notify(tokio::sync::oneshot::Sender<io::Result<()>>),
    Nothing,
}

/// Records encoded by [`Wal::encode`], not yet queued.
pub(crate) struct Encoded {
    bytes: Vec<u8>,
    max_index: Option<u64>,
    /// The entries among the records, for the in-memory log.
    pub entries: Vec<LogEntry>,
}

struct Job {
    bytes: Vec<u8>,
    max_index: Option<u64>,
    done: Done,
}

/// Handle to the log: shared state plus the writer thread's queue.
#[derive(Clone)]
pub(crate) struct Wal {
    pub state: Arc<Mutex<LogState>>,
    sink: Sink,
}

/// Who writes: the `cairn-wal` thread, or the submitter itself (see [`Wal::open`]).
#[derive(Clone)]
enum Sink {
    Thread(mpsc::Sender<Job>),
    Inline(Arc<Mutex<Writer>>),
}

impl Wal {
    /// Opens (or creates) the log in `dir` and replays it. `inline`: writes and fsyncs run on
    /// the submitter's thread (a single node's raft thread, which has nothing else to do while
    /// an entry is being made durable); otherwise on a writer thread of the log's own, so a
    /// member of a cluster keeps heartbeating meanwhile. `fsync_delay` makes every fsync take
    /// that much longer (fault injection; zero normally). `no_fsync` (etcd's
    /// --unsafe-no-fsync): appends are written but not fsynced, so an acknowledged write
    /// survives the process being killed but not the machine losing power; new segments are
    /// still synced, as etcd's are.
    pub fn open(dir: &Path, fsync_delay: std::time::Duration, no_fsync: bool, inline: bool) -> io::Result<Wal> {
        Self::open_with(dir, fsync_delay, no_fsync, SEGMENT_BYTES, inline)
    }

    /// [`Wal::open`] with segments of about `segment_bytes` each.
    fn open_with(
        dir: &Path,
        fsync_delay: std::time::Duration,
        no_fsync: bool,
        segment_bytes: u64,
        inline: bool,
    ) -> io::Result<Wal> {
        fs::create_dir_all(dir)?;
        let mut segments = list_segments(dir)?;
        let mut state = LogState::default();
        let mut seg_max: BTreeMap<u64, Option<u64>> = BTreeMap::new();
        let last_seq = segments.last().map(|(s, _)| *s);
        let mut end = 0;
        for (seq, path) in &segments {
            let is_last = Some(*seq) == last_seq;
            let (max, data_end) = replay_segment(path, is_last, &mut state)?;
            seg_max.insert(*seq, max);
            end = data_end;
        }
        let (seq, file, written) = match segments.pop() {
            Some((seq, path)) => (seq, OpenOptions::new().write(true).open(path)?, end),
            None => (0, create_segment(dir, 0)?, 0),
        };
        let allocated = file.metadata()?.len();
        let state = Arc::new(Mutex::new(state));
        let writer = Writer {
            dir: dir.to_path_buf(),
            file,
            seq,
            written,
            allocated,
            segment_bytes,
            seg_max,
            state: state.clone(),
            failed: None,
            fsync_delay,
            no_fsync,
        };
        let sink = if inline {
            Sink::Inline(Arc::new(Mutex::new(writer)))
        } else {
            let (tx, rx) = mpsc::channel();
            std::thread::Builder::new()
                .name("cairn-wal".into())
                .spawn(move || writer.run(rx))?;
            Sink::Thread(tx)
        };
        Ok(Wal { state, sink })
    }

    /// Writes records (or queues them for the writer thread); `done` runs once they are
    /// durable (or failed).
    pub fn submit(&self, records: &[Record], done: Done) -> io::Result<()> {
        let job = self.encode(records)?;
        self.submit_encoded(job, done)
    }

    /// Sets raft's committed id. It is written ahead of the next appended entries, not on its
    /// own: it is a hint that lets a restart apply sooner (openraft takes the state machine's
    /// last applied when that is newer, and a leader tells the rest), and a write of its own
    /// sat between an entry's fsync and its reply.
    pub fn set_committed(&self, committed: Option<LogId>) {
        let mut st = self.state.lock();
        st.committed = committed;
        st.committed_unwritten = true;
    }

    /// `entries` framed for the log, after the committed id if it changed since it was last
    /// written, to queue with [`Wal::submit_encoded`].
    pub fn encode_entries(&self, entries: impl IntoIterator<Item = Entry>) -> io::Result<Encoded> {
        let mut records = Vec::new();
        {
            let mut st = self.state.lock();
            if std::mem::take(&mut st.committed_unwritten) {
                records.push(Record::Committed(st.committed));
            }
        }
        records.extend(entries.into_iter().map(Record::Entry));
        let mut encoded = self.encode(&records)?;
        let appended = records.into_iter().filter_map(|r| match r {
            Record::Entry(e) => Some(e),
            _ => None,
        });
        for (kept, e) in encoded.entries.iter_mut().zip(appended) {
            kept.unread = Some(e);
        }
        Ok(encoded)
    }

    /// Records framed for the log, to queue with [`Wal::submit_encoded`].
    pub fn encode(&self, records: &[Record]) -> io::Result<Encoded> {
        let mut bytes = Vec::new();
        let mut max_index = None;
        let mut entries = Vec::new();
        for r in records {
            let payload = encode(r, &mut bytes)?;
            if let Record::Entry(e) = r {
                max_index = Some(e.log_id.index);
                entries.push(LogEntry::new(e.log_id, payload.into_boxed_slice()));
            }
        }
        Ok(Encoded {
            bytes,
            max_index,
            entries,
        })
    }

    /// Writes encoded records (or queues them for the writer thread); `done` runs once they
    /// are durable (or failed).
    pub fn submit_encoded(&self, job: Encoded, done: Done) -> io::Result<()> {
        let job = Job {
            bytes: job.bytes,
            max_index: job.max_index,
            done,
        };
        match &self.sink {
            Sink::Thread(tx) => tx
                .send(job)
                .map_err(|_| io::Error::other("write-ahead log writer stopped")),
            Sink::Inline(w) => {
                w.lock().process(vec![job]);
                Ok(())
            }
        }
    }

    /// Writes records and waits until they are durable.
    pub async fn write_sync(&self, records: &[Record]) -> io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(records, Done::Notify(tx))?;
        rx.await
            .map_err(|_| io::Error::other("write-ahead log writer stopped"))?
    }
}

/// Frames `rec` onto `out`; returns its payload.
fn encode(rec: &Record, out: &mut Vec<u8>) -> io::Result<Vec<u8>> {
    let payload = postcard::to_allocvec(rec).map_err(io::Error::other)?;
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(payload)
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016x}.wal"))
}

fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for ent in fs::read_dir(dir)? {
        let path = ent?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(hex) = name.strip_suffix(".wal") else {
            continue;
        };
        if let Ok(seq) = u64::from_str_radix(hex, 16) {
            out.push((seq, path));
        }
    }
    out.sort();
    Ok(out)
}

fn create_segment(dir: &Path, seq: u64) -> io::Result<File> {
    let file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(segment_path(dir, seq))?;
    File::open(dir)?.sync_all()?;
    Ok(file)
}

/// Replays one segment into `state`; returns the highest entry index it holds and where its
/// records end. The segment is read record by record, so replay holds one record at a time
/// besides what the log keeps (a segment is up to [`SEGMENT_BYTES`]).
fn replay_segment(
    path: &Path,
    is_last: bool,
    state: &mut LogState,
) -> io::Result<(Option<u64>, u64)> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut reader = io::BufReader::with_capacity(1 << 20, file);
    let mut pos = 0u64;
    let mut max = None;
    let mut payload = Vec::new();
    while pos < size {
        match read_record(&mut reader, size - pos, &mut payload)? {
            Next::Record(rec) => {
                if let Record::Entry(e) = &rec {
                    max = Some(e.log_id.index);
                }
                state.apply(rec, &payload);
                pos += (HEADER + payload.len()) as u64;
            }
            // Zeros to the end of the file: the space written ahead of the records.
            Next::End => break,
            Next::Bad if is_last => {
                tracing::warn!(path = %path.display(), offset = pos, "cutting torn record at the end of the write-ahead log");
                // Cutting also drops whatever followed the torn record, so that records
                // written here later are never followed by stale ones.
                let f = OpenOptions::new().write(true).open(path)?;
                f.set_len(pos)?;
                f.sync_all()?;
                break;
            }
            Next::Bad => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "write-ahead log segment {} is corrupt at offset {pos}",
                        path.display()
                    ),
                ));
            }
        }
    }
    Ok((max, pos))
}

/// What follows in a segment being replayed.
enum Next {
    /// A whole record; its payload is in the caller's buffer.
    Record(Record),
    /// Only zeros to the end of the file.
    End,
    /// A torn or damaged record (or something else that is not zeros).
    Bad,
}

/// Reads the record at the reader's position, with `left` bytes left in the file.
fn read_record(r: &mut impl Read, left: u64, payload: &mut Vec<u8>) -> io::Result<Next> {
    let mut head = [0u8; HEADER];
    if read_full(r, &mut head)? < HEADER {
        return Ok(if head.iter().all(|&b| b == 0) {
            Next::End
        } else {
            Next::Bad
        });
    }
    if head == [0; HEADER] {
        let mut buf = [0u8; 64 << 10];
        loop {
            let n = read_full(r, &mut buf)?;
            if buf[..n].iter().any(|&b| b != 0) {
                return Ok(Next::Bad);
            }
            if n < buf.len() {
                return Ok(Next::End);
            }
        }
    }
    let len = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
    if (HEADER + len) as u64 > left {
        return Ok(Next::Bad);
    }
    payload.resize(len, 0);
    if read_full(r, payload)? < len || crc32fast::hash(payload) != crc {
        return Ok(Next::Bad);
    }
    Ok(match postcard::from_bytes(payload) {
        Ok(rec) => Next::Record(rec),
        Err(_) => Next::Bad,
    })
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

struct Writer {
    dir: PathBuf,
    file: File,
    seq: u64,
    /// Where the next record goes: the end of the records in `file`.
    written: u64,
    /// The file's length: records, then zeros.
    allocated: u64,
    /// A segment is finished once its records reach this size.
    segment_bytes: u64,
    /// Highest entry index in each segment (None: no entries).
    seg_max: BTreeMap<u64, Option<u64>>,
    state: Arc<Mutex<LogState>>,
    failed: Option<String>,
    /// Fault injection: extra time every fsync takes (a slow disk); zero normally.
    fsync_delay: std::time::Duration,
    /// --unsafe-no-fsync: appended records are not fsynced.
    no_fsync: bool,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < 4096 {
                match rx.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            self.process(batch);
        }
    }

    /// Writes a batch of jobs (one fsync if any job waits for it), tells each job's waiter,
    /// and starts a new segment when this one is full.
    fn process(&mut self, batch: Vec<Job>) {
        let result = self.write_batch(&batch);
        for job in batch {
            let r = result
                .as_ref()
                .map(|_| ())
                .map_err(|e| io::Error::other(e.clone()));
            match job.done {
                Done::Flushed(cb) => cb.log_io_completed(r),
                Done::Notify(tx) => {
                    let _ = tx.send(r);
                }
                Done::Nothing => {}
            }
        }
        if result.is_ok() && self.written >= self.segment_bytes {
            if let Err(e) = self.rotate() {
                tracing::error!(error = %e, "write-ahead log rotation failed");
                self.failed = Some(e.to_string());
            }
        }
    }

    fn write_batch(&mut self, batch: &[Job]) -> Result<(), String> {
        if let Some(f) = &self.failed {
            return Err(format!("write-ahead log failed earlier: {f}"));
        }
        let res = (|| -> io::Result<()> {
            let mut buf = Vec::with_capacity(batch.iter().map(|j| j.bytes.len()).sum());
            for j in batch {
                buf.extend_from_slice(&j.bytes);
            }
            self.append(&buf)?;
            // Records nobody waits for (commit index, purge point) need no sync of their own:
            // losing them in a crash is harmless, and the next synced batch carries them.
            if !self.no_fsync && batch.iter().any(|j| !matches!(j.done, Done::Nothing)) {
                if !self.fsync_delay.is_zero() {
                    std::thread::sleep(self.fsync_delay);
                }
                self.file.sync_data()?;
            }
            Ok(())
        })();
        match res {
            Ok(()) => {
                if let Some(m) = batch.iter().filter_map(|j| j.max_index).max() {
                    let cur = self.seg_max.entry(self.seq).or_insert(None);
                    *cur = Some(cur.map_or(m, |c| c.max(m)));
                }
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "write-ahead log write failed; refusing further writes");
                self.failed = Some(e.to_string());
                Err(e.to_string())
            }
        }
    }

    /// Writes `buf` after the last record, first writing zeros ahead if it reaches past them.
    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        let end = self.written + buf.len() as u64;
        if end > self.allocated {
            let to = end + ZERO_AHEAD;
            let zeros = vec![0u8; (to - self.allocated) as usize];
            self.file.write_all_at(&zeros, self.allocated)?;
            self.allocated = to;
        }
        self.file.write_all_at(buf, self.written)?;
        self.written = end;
        Ok(())
    }

    /// Starts a new segment that begins with the current vote, commit and purge point, then
    /// deletes older segments whose entries are all purged. The finished segment loses its
    /// zeros first, so only the last segment ever has them.
    fn rotate(&mut self) -> io::Result<()> {
        self.file.set_len(self.written)?;
        self.file.sync_data()?;
        let next = self.seq + 1;
        let file = create_segment(&self.dir, next)?;
        let (vote, committed, purged) = {
            let st = self.state.lock();
            (st.vote, st.committed, st.purged)
        };
        let mut buf = Vec::new();
        if let Some(v) = vote {
            encode(&Record::Vote(v), &mut buf)?;
        }
        encode(&Record::Committed(committed), &mut buf)?;
        if let Some(p) = purged {
            encode(&Record::Purge(p), &mut buf)?;
        }
        self.file = file;
        self.seq = next;
        self.written = 0;
        self.allocated = 0;
        self.append(&buf)?;
        self.file.sync_data()?;
        self.seg_max.insert(next, None);
        let purged_index = purged.map(|p| p.index);
        let old: Vec<u64> = self
            .seg_max
            .iter()
            .filter(|(s, max)| {
                **s < next && max.is_none_or(|m| purged_index.is_some_and(|p| m <= p))
            })
            .map(|(s, _)| *s)
            .collect();
        for s in old {
            fs::remove_file(segment_path(&self.dir, s))?;
            self.seg_max.remove(&s);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};
    use std::time::Duration;

    fn entry(index: u64) -> Record {
        Record::Entry(Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Blank,
        })
    }

    fn indexes(wal: &Wal) -> Vec<u64> {
        wal.state.lock().entries.keys().copied().collect()
    }

    /// Where the records of a segment's bytes end.
    fn records_end(data: &[u8]) -> usize {
        let mut r = io::Cursor::new(data);
        let mut payload = Vec::new();
        let mut end = 0;
        while let Ok(Next::Record(_)) = read_record(&mut r, (data.len() - end) as u64, &mut payload)
        {
            end += HEADER + payload.len();
        }
        end
    }

    fn segments(dir: &Path) -> Vec<PathBuf> {
        list_segments(dir)
            .unwrap()
            .into_iter()
            .map(|(_, p)| p)
            .collect()
    }

    /// Records written after a reopen follow the earlier ones (not the zeros written ahead),
    /// across segment rotations; finished segments end with their last record. Rounds
    /// alternate between the writer thread and writing inline.
    #[tokio::test]
    async fn records_follow_each_other_across_reopens_and_rotations() {
        let dir = tempfile::tempdir().unwrap();
        for round in 0..4u64 {
            let wal = Wal::open_with(dir.path(), Duration::ZERO, false, 512, round % 2 == 1).unwrap();
            assert_eq!(indexes(&wal), (1..=round * 60).collect::<Vec<_>>());
            for i in 1..=60 {
                wal.write_sync(&[entry(round * 60 + i)]).await.unwrap();
            }
        }
        let wal = Wal::open_with(dir.path(), Duration::ZERO, false, 512, true).unwrap();
        assert_eq!(indexes(&wal), (1..=240).collect::<Vec<_>>());
        let segs = segments(dir.path());
        assert!(segs.len() >= 2, "no rotation happened: {segs:?}");
        for finished in &segs[..segs.len() - 1] {
            let data = fs::read(finished).unwrap();
            assert_eq!(
                records_end(&data),
                data.len(),
                "{finished:?} kept its zeros"
            );
        }
        let last = fs::read(segs.last().unwrap()).unwrap();
        let end = records_end(&last);
        assert!(last.len() > end, "the last segment has no zeros ahead");
        assert!(last[end..].iter().all(|&b| b == 0));
    }

    /// --unsafe-no-fsync: appends are acknowledged without an fsync (every fsync here takes
    /// 5 s longer, more than all the appends together take without one) and are read back
    /// after a reopen.
    #[tokio::test]
    async fn without_fsync_appends_are_written_but_not_synced() {
        let dir = tempfile::tempdir().unwrap();
        let stall = Duration::from_secs(5);
        let started = std::time::Instant::now();
        for inline in [true, false] {
            let wal = Wal::open_with(dir.path(), stall, true, 1 << 20, inline).unwrap();
            let from = indexes(&wal).len() as u64;
            for i in 1..=20 {
                wal.write_sync(&[entry(from + i)]).await.unwrap();
                assert!(started.elapsed() < stall, "append {} waited for an fsync", from + i);
            }
        }
        let wal = Wal::open_with(dir.path(), Duration::ZERO, false, 1 << 20, true).unwrap();
        assert_eq!(indexes(&wal), (1..=40).collect::<Vec<_>>());
    }

    /// The committed id is written with the next appended entries, and replayed from there.
    #[tokio::test]
    async fn the_committed_id_is_written_with_the_next_entries() {
        let dir = tempfile::tempdir().unwrap();
        let id = |i| Some(LogId::new(CommittedLeaderId::new(1, 1), i));
        let Record::Entry(first) = entry(1) else {
            unreachable!()
        };
        let Record::Entry(second) = entry(2) else {
            unreachable!()
        };
        {
            let wal = Wal::open_with(dir.path(), Duration::ZERO, false, 1 << 20, true).unwrap();
            let job = wal.encode_entries([first]).unwrap();
            wal.submit_encoded(job, Done::Nothing).unwrap();
            wal.set_committed(id(1));
            let job = wal.encode_entries([second]).unwrap();
            wal.submit_encoded(job, Done::Nothing).unwrap();
            // Not written until another append.
            wal.set_committed(id(2));
            wal.write_sync(&[]).await.unwrap();
        }
        let wal = Wal::open_with(dir.path(), Duration::ZERO, false, 1 << 20, true).unwrap();
        assert_eq!(indexes(&wal), vec![1, 2]);
        assert_eq!(wal.state.lock().committed, id(1));
    }

    /// A torn record at the end is cut off together with anything after it, so a record
    /// written after recovery is never followed by a stale, never acknowledged one.
    #[tokio::test]
    async fn a_torn_record_is_cut_with_what_follows_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let wal = Wal::open_with(dir.path(), Duration::ZERO, false, 1 << 20, false).unwrap();
            for i in 1..=10 {
                wal.write_sync(&[entry(i)]).await.unwrap();
            }
        }
        let path = segments(dir.path()).pop().unwrap();
        let end = records_end(&fs::read(&path).unwrap());
        // Half of record 11 and garbage up to where a whole record 11 would end, then a whole
        // record 12 (written, never synced, in a crash): exactly where the 11 written after
        // recovery will end, so only cutting keeps 12 from being read back after it.
        let mut torn = Vec::new();
        encode(&entry(11), &mut torn).unwrap();
        let len = torn.len();
        torn.truncate(len / 2);
        torn.resize(len, 0xab);
        encode(&entry(12), &mut torn).unwrap();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&torn, end as u64)
            .unwrap();
        {
            let wal = Wal::open_with(dir.path(), Duration::ZERO, false, 1 << 20, false).unwrap();
            assert_eq!(indexes(&wal), (1..=10).collect::<Vec<_>>());
            wal.write_sync(&[entry(11)]).await.unwrap();
        }
        let wal = Wal::open_with(dir.path(), Duration::ZERO, false, 1 << 20, false).unwrap();
        assert_eq!(indexes(&wal), (1..=11).collect::<Vec<_>>());
        let st = wal.state.lock();
        assert_eq!(st.entries[&11].decode().unwrap().log_id.index, 11);
    }

    /// Damage before the last segment is refused, not cut: those records were acknowledged.
    /// In the last segment, bytes after a zeroed header are damage too (cut, as torn).
    #[tokio::test]
    async fn damage_is_refused_before_the_last_segment_and_cut_in_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let wal = Wal::open_with(dir.path(), Duration::ZERO, false, 1024, false).unwrap();
            for i in 1..=200 {
                wal.write_sync(&[entry(i)]).await.unwrap();
            }
        }
        let segs = segments(dir.path());
        assert!(segs.len() >= 3, "the log rotated: {segs:?}");
        let last = segs.last().unwrap();
        let end = records_end(&fs::read(last).unwrap());
        let f = File::options().write(true).open(last).unwrap();
        f.write_all_at(&[0u8; HEADER], end as u64).unwrap();
        f.write_all_at(&[7u8; 3], (end + HEADER + 100) as u64)
            .unwrap();
        let wal = Wal::open_with(dir.path(), Duration::ZERO, false, 1024, false).unwrap();
        assert_eq!(indexes(&wal).last(), Some(&200));
        drop(wal);
        assert_eq!(
            fs::metadata(last).unwrap().len(),
            end as u64,
            "cut at the damage"
        );
        let first = &segments(dir.path())[0];
        let mut data = fs::read(first).unwrap();
        data[HEADER + 1] ^= 0xff;
        fs::write(first, &data).unwrap();
        let err = Wal::open_with(dir.path(), Duration::ZERO, false, 1024, false)
            .err()
            .expect("a damaged earlier segment is refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
