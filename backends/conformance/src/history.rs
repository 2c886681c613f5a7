//! A linearizability checker for histories of concurrent puts and gets on etcd's KV model.
//!
//! etcd gives every write a unique revision and answers every read at a revision, so a history
//! carries its own witness order: a put sits at `(revision, 0)`, a get at `(header revision,
//! 1)`. The history is linearizable if that order
//! 1. is a total order of the writes (acknowledged put revisions are unique),
//! 2. respects real time (an operation that finished before another started comes first;
//!    two reads at one revision are equal),
//! 3. explains every read: a get at revision `R` returns the key's last write at or below `R`
//!    (no acknowledged put to the key falls between the returned `mod_revision` and `R`,
//!    the returned value is the one written at that `mod_revision`, and a missing key means
//!    no acknowledged put at or below `R`).
//!
//! Puts whose outcome is unknown (the client saw an error or a timeout) may or may not have
//! taken effect: a read may return their value, at the revision it reports; they never
//! constrain anything else. Values must be unique per put.

use std::collections::HashMap;
use std::time::Instant;

#[derive(Clone, Debug)]
pub enum Op {
    Put { key: String, value: String },
    Get { key: String },
}

#[derive(Clone, Debug)]
pub enum Outcome {
    /// The put was acknowledged at this revision.
    Put { revision: i64 },
    /// The get answered at header revision `revision` with the key's value and mod revision.
    Get {
        revision: i64,
        kv: Option<(String, i64)>,
    },
    /// The client got an error: a put may or may not have happened; a get is ignored.
    Unknown,
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub start: Instant,
    pub end: Instant,
    pub op: Op,
    pub outcome: Outcome,
}

/// Checks `history`; the error names the first violation found.
pub fn check(history: &[Entry]) -> Result<(), String> {
    // 1. Unique revisions of acknowledged puts; index puts by key and by value.
    let mut by_rev: HashMap<i64, &Entry> = HashMap::new();
    let mut puts_by_key: HashMap<&str, Vec<(i64, &str)>> = HashMap::new();
    let mut value_owner: HashMap<&str, (&str, Option<i64>)> = HashMap::new();
    for e in history {
        if let Op::Put { key, value } = &e.op {
            let acked = match e.outcome {
                Outcome::Put { revision } => {
                    if let Some(other) = by_rev.insert(revision, e) {
                        return Err(format!(
                            "two acknowledged puts at revision {revision}: {:?} and {:?}",
                            other.op, e.op
                        ));
                    }
                    puts_by_key.entry(key).or_default().push((revision, value));
                    Some(revision)
                }
                _ => None,
            };
            if value_owner.insert(value, (key, acked)).is_some() {
                return Err(format!(
                    "value {value:?} written twice: values must be unique"
                ));
            }
        }
    }
    for v in puts_by_key.values_mut() {
        v.sort_unstable();
    }

    // 2. Real time: positions of completed operations, sorted by end time; the largest position
    //    among those that ended before an operation started must be below its own.
    let pos = |e: &Entry| -> Option<(i64, u8)> {
        match e.outcome {
            Outcome::Put { revision } => Some((revision, 0)),
            Outcome::Get { revision, .. } => Some((revision, 1)),
            Outcome::Unknown => None,
        }
    };
    let mut done: Vec<(Instant, (i64, u8), usize)> = history
        .iter()
        .enumerate()
        .filter_map(|(i, e)| Some((e.end, pos(e)?, i)))
        .collect();
    done.sort_by_key(|d| d.0);
    let mut prefix_max: Vec<((i64, u8), usize)> = Vec::with_capacity(done.len());
    for (_, p, i) in &done {
        let m = match prefix_max.last() {
            Some(&(best, j)) if best >= *p => (best, j),
            _ => (*p, *i),
        };
        prefix_max.push(m);
    }
    for (i, e) in history.iter().enumerate() {
        let Some(p) = pos(e) else { continue };
        let before = done.partition_point(|d| d.0 < e.start);
        if before == 0 {
            continue;
        }
        let (best, j) = prefix_max[before - 1];
        // Equal positions are two reads at one revision, which may come in either order.
        if best > p && j != i {
            return Err(format!(
                "real-time order violated: {:?} -> {:?} finished before {:?} -> {:?} started, \
                 but its position {best:?} is not below {p:?}",
                history[j].op, history[j].outcome, e.op, e.outcome
            ));
        }
    }

    // 3. Reads return the last write at or below their revision.
    for e in history {
        let (Op::Get { key }, Outcome::Get { revision, kv }) = (&e.op, &e.outcome) else {
            continue;
        };
        let puts = puts_by_key
            .get(key.as_str())
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let upto = puts.partition_point(|(r, _)| r <= revision);
        let last_acked = upto.checked_sub(1).map(|i| puts[i]);
        match kv {
            None => {
                if let Some((r, v)) = last_acked {
                    return Err(format!(
                        "get {key:?} at revision {revision} found nothing, but {v:?} was put at revision {r}"
                    ));
                }
            }
            Some((value, mod_rev)) => {
                if mod_rev > revision {
                    return Err(format!(
                        "get {key:?} at revision {revision} returned a write from revision {mod_rev}"
                    ));
                }
                match value_owner.get(value.as_str()) {
                    None => {
                        return Err(format!("get {key:?} returned {value:?}, which nobody put"))
                    }
                    Some((k, _)) if k != key => {
                        return Err(format!("get {key:?} returned {value:?}, put to {k:?}"))
                    }
                    Some((_, Some(r))) if r != mod_rev => {
                        return Err(format!(
                            "get {key:?} returned {value:?} at mod revision {mod_rev}, acknowledged at {r}"
                        ))
                    }
                    _ => {}
                }
                if let Some((r, v)) = last_acked {
                    if r > *mod_rev {
                        return Err(format!(
                            "get {key:?} at revision {revision} returned the write of revision {mod_rev}, \
                             missing {v:?} acknowledged at revision {r}"
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(base: Instant, s: u64, e: u64, op: Op, outcome: Outcome) -> Entry {
        Entry {
            start: base + Duration::from_millis(s),
            end: base + Duration::from_millis(e),
            op,
            outcome,
        }
    }

    fn put(k: &str, v: &str) -> Op {
        Op::Put {
            key: k.into(),
            value: v.into(),
        }
    }

    fn get(k: &str) -> Op {
        Op::Get { key: k.into() }
    }

    #[test]
    fn accepts_a_linearizable_history() {
        let b = Instant::now();
        let h = vec![
            at(b, 0, 10, put("a", "1"), Outcome::Put { revision: 2 }),
            at(b, 5, 15, put("a", "2"), Outcome::Put { revision: 3 }),
            // Concurrent with the second put: may see either.
            at(
                b,
                6,
                12,
                get("a"),
                Outcome::Get {
                    revision: 2,
                    kv: Some(("1".into(), 2)),
                },
            ),
            at(
                b,
                20,
                30,
                get("a"),
                Outcome::Get {
                    revision: 3,
                    kv: Some(("2".into(), 3)),
                },
            ),
            at(b, 20, 30, put("b", "x"), Outcome::Unknown),
            at(
                b,
                40,
                50,
                get("b"),
                Outcome::Get {
                    revision: 4,
                    kv: Some(("x".into(), 4)),
                },
            ),
        ];
        check(&h).unwrap();
    }

    #[test]
    fn refuses_a_stale_read() {
        let b = Instant::now();
        let h = vec![
            at(b, 0, 10, put("a", "1"), Outcome::Put { revision: 2 }),
            at(b, 11, 20, put("a", "2"), Outcome::Put { revision: 3 }),
            at(
                b,
                21,
                30,
                get("a"),
                Outcome::Get {
                    revision: 2,
                    kv: Some(("1".into(), 2)),
                },
            ),
        ];
        let e = check(&h).unwrap_err();
        assert!(e.contains("real-time"), "{e}");
    }

    #[test]
    fn refuses_a_lost_write() {
        let b = Instant::now();
        let h = vec![
            at(b, 0, 10, put("a", "1"), Outcome::Put { revision: 2 }),
            at(
                b,
                11,
                20,
                get("a"),
                Outcome::Get {
                    revision: 5,
                    kv: None,
                },
            ),
        ];
        assert!(check(&h).unwrap_err().contains("found nothing"));
    }

    #[test]
    fn refuses_duplicate_revisions_and_wrong_values() {
        let b = Instant::now();
        let dup = vec![
            at(b, 0, 10, put("a", "1"), Outcome::Put { revision: 2 }),
            at(b, 0, 10, put("b", "2"), Outcome::Put { revision: 2 }),
        ];
        assert!(check(&dup).unwrap_err().contains("two acknowledged puts"));
        let wrong = vec![
            at(b, 0, 10, put("a", "1"), Outcome::Put { revision: 2 }),
            at(
                b,
                11,
                20,
                get("a"),
                Outcome::Get {
                    revision: 2,
                    kv: Some(("9".into(), 2)),
                },
            ),
        ];
        assert!(check(&wrong).unwrap_err().contains("nobody put"));
    }
}
