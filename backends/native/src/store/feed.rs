//! Reading the change log back as events, for watchers that start in the past.

use cairn_backend::{ChangeBatch, Event, EventKind, KeyValue, Result, Revision};

use super::codec::{decode_kv, decode_version, index_tombstone, is_tombstone, VERSIONS};
use super::view::{db_err, version_record};
use super::Store;

impl Store {
    /// The events of revisions `from..=to`, at most `max_revisions` of them, grouped by
    /// revision in order, with `prev_kv` filled in where history still has it.
    pub fn read_events(
        &self,
        from: Revision,
        to: Revision,
        max_revisions: usize,
    ) -> Result<Vec<ChangeBatch>> {
        // VERSIONS is the change log; it is not in the overlay.
        self.flush()?;
        let db = self.db.read();
        let r = db.begin_read().map_err(db_err)?;
        let versions = r.open_table(VERSIONS).map_err(db_err)?;
        let mut out: Vec<ChangeBatch> = Vec::new();
        let iter = versions
            .range::<(u64, u32)>((from.max(0) as u64, 0)..=(to.max(0) as u64, u32::MAX))
            .map_err(db_err)?;
        for item in iter {
            let (k, v) = item.map_err(db_err)?;
            let (rev, _) = k.value();
            let rev = rev as i64;
            if out.last().is_none_or(|b| b.revision != rev) {
                if out.len() == max_revisions {
                    break;
                }
                out.push(ChangeBatch {
                    revision: rev,
                    events: Vec::new(),
                });
            }
            let (key, rec) = decode_version(v.value());
            // The index lock is taken per lookup: applies go on meanwhile (what they add is
            // newer than every row of this read txn, so never the previous version of one).
            let prev = self.index.read().newest_below(key, rev as u64);
            let prev_kv = match prev {
                Some((prev_rev, entry)) if !index_tombstone(entry) => {
                    let row = version_record(&versions, prev_rev, entry)?;
                    Some(decode_kv(key, decode_version(row.value()).1, true))
                }
                _ => None,
            };
            let event = if is_tombstone(rec) {
                Event {
                    kind: EventKind::Delete,
                    kv: KeyValue {
                        key: key.to_vec(),
                        mod_revision: rev,
                        ..Default::default()
                    },
                    prev_kv,
                }
            } else {
                Event {
                    kind: EventKind::Put,
                    kv: decode_kv(key, rec, true),
                    prev_kv,
                }
            };
            out.last_mut().expect("pushed above").events.push(event);
        }
        Ok(out)
    }
}
