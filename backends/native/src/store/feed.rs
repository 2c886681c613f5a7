//! Reading the change log back as events, for watchers that start in the past.

use cairn_backend::{ChangeBatch, Event, EventKind, KeyValue, Result, Revision};

use super::codec::{decode_kv, is_tombstone, EVENTS, HISTORY};
use super::view::db_err;
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
        // The change log is not in the overlay.
        self.flush()?;
        let db = self.db.read();
        let r = db.begin_read().map_err(db_err)?;
        let events = r.open_table(EVENTS).map_err(db_err)?;
        let history = r.open_table(HISTORY).map_err(db_err)?;
        let mut out: Vec<ChangeBatch> = Vec::new();
        let iter = events
            .range::<(u64, u32)>((from as u64, 0)..=(to as u64, u32::MAX))
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
            let key = v.value();
            let rec = history
                .get((key, rev as u64))
                .map_err(db_err)?
                .ok_or_else(|| db_err(format!("history lost a version at revision {rev}")))?;
            let prev_kv = match history
                .range::<(&[u8], u64)>((key, 0)..(key, rev as u64))
                .map_err(db_err)?
                .next_back()
            {
                Some(p) => {
                    let (_, pv) = p.map_err(db_err)?;
                    (!is_tombstone(pv.value())).then(|| decode_kv(key, pv.value(), true))
                }
                None => None,
            };
            let event = if is_tombstone(rec.value()) {
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
                    kv: decode_kv(key, rec.value(), true),
                    prev_kv,
                }
            };
            out.last_mut().expect("pushed above").events.push(event);
        }
        Ok(out)
    }
}
