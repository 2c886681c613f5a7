//! What the space quota measures: the bytes of the rows Cairn keeps in TiKV.
//!
//! TiKV's size on disk cannot be read through the transactional API, and the cluster may
//! hold other data, so the quota (etcd's `--quota-backend-bytes`) is on a logical count: each
//! row under a counted tag (live versions, the history, the change log, leases and lease
//! attachments) costs its whole TiKV key, its value and [`ROW_OVERHEAD`]. Named documents
//! (auth, alarms, members) and the counters under `P m` are not counted.
//!
//! The count is kept exactly, inside the transactions that change the rows, in two keys beside
//! the revision counter:
//! - `P m s` (written): every transaction that adds or removes rows other than compaction's
//!   (txns, lease grants, revokes and expiries) adds its change. Each of them writes this key,
//!   so any two conflict in TiKV and one retries: the total is serial across processes.
//! - `P m f` (freed): each compaction batch adds what it deleted. Compaction deletes history
//!   versions and log entries no writer touches any more, so it never conflicts with writers.
//!
//! The size is `written - freed`. Data written before the count existed has no `P m s`: the
//! first transaction that needs the size (the one [`crate::TikvBackend::connect`] runs) scans
//! the counted rows and stores `written = rows + freed` at its snapshot, which stays exact
//! whatever compaction frees later.

use crate::keys::{TAG_ATTACH, TAG_CURRENT, TAG_HISTORY, TAG_LEASE, TAG_LOG};

/// The estimated metadata of one row in TiKV (its MVCC write record and timestamps).
pub(crate) const ROW_OVERHEAD: u64 = 32;

/// The tags whose rows are counted.
pub(crate) const COUNTED_TAGS: [u8; 5] = [TAG_CURRENT, TAG_HISTORY, TAG_LOG, TAG_LEASE, TAG_ATTACH];

/// What a row with this key and value (`None`: no row) counts.
pub(crate) fn row_bytes(key_len: usize, value_len: Option<usize>) -> i64 {
    match value_len {
        Some(v) => (key_len + v) as i64 + ROW_OVERHEAD as i64,
        None => 0,
    }
}
