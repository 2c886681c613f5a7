//! Physical compaction: removing what no read or watch can ask for any more.
//!
//! `compact(rev)` first moves the compact revision (one short transaction). Then superseded
//! versions are deleted in bounded batches, each its own transaction of at most
//! `compaction_batch` examined versions, walking the history keys in order: a version below
//! `rev` goes when the next version of the same key is at or below `rev` too (so only the
//! version visible at `rev` stays, as in etcd), and a tombstone below `rev` goes. The last version of a batch is
//! decided by the next batch, which starts at it. Then change-log entries below `rev` go, in
//! batches too (the entry at `rev` stays: a watch from the compact revision gets it). Finally
//! `compacted_through` records the end, so a process that starts and finds an unfinished
//! compaction resumes it.

use std::sync::Arc;

use cairn_backend::{Result, Revision};

use crate::keys::TAG_HISTORY;
use crate::view::{be_i64, dec, View};
use crate::Inner;

/// Runs physical compaction at `rev` in the background, logging the outcome.
pub(crate) async fn background(inner: Arc<Inner>, rev: Revision) {
    if let Err(e) = physical(&inner, rev).await {
        tracing::warn!(error = %e, compact_revision = rev, "tikv: background compaction failed; the next start or compaction resumes it");
    }
}

pub(crate) async fn physical(inner: &Arc<Inner>, rev: Revision) -> Result<()> {
    let batch = inner.opts.compaction_batch.max(2) as u32;
    let mut removed = 0usize;
    // History.
    let (_, hist_end) = inner.keys.tag_range(TAG_HISTORY);
    let mut cursor = inner.keys.tag(TAG_HISTORY);
    loop {
        let (from, end) = (cursor.clone(), hist_end.clone());
        let (next, n) = inner
            .run(
                true,
                Arc::new(move |v: &mut View| {
                    let pairs = v.scan_raw_limit(from.clone(), end.clone(), batch)?;
                    let full = pairs.len() == batch as usize;
                    let parsed: Vec<_> =
                        pairs.iter().map(|(k, val)| (k.clone(), v.keys.parse_history(k), val.clone())).collect();
                    let mut deleted = 0;
                    let mut next = None;
                    for (i, (k, parsed_key, val)) in parsed.iter().enumerate() {
                        let Some((key, r)) = parsed_key else { continue };
                        if *r >= rev {
                            continue;
                        }
                        let tombstone = dec::<Option<cairn_backend::KeyValue>>(val)?.is_none();
                        let superseded = match parsed.get(i + 1) {
                            Some((_, Some((k2, r2)), _)) => k2 == key && *r2 <= rev,
                            Some((_, None, _)) => false,
                            None if full => {
                                // Decided by the next batch, which starts here.
                                next = Some(k.clone());
                                continue;
                            }
                            None => false,
                        };
                        if tombstone || superseded {
                            v.free_row(k.clone(), val.len());
                            deleted += 1;
                        }
                    }
                    let next = match (full, next) {
                        (_, Some(k)) if k != from => Some(k),
                        // A batch of one undecidable version cannot happen with batch >= 2.
                        (true, _) => pairs.last().map(|(k, _)| {
                            let mut k = k.clone();
                            k.push(0);
                            k
                        }),
                        (false, _) => None,
                    };
                    Ok((next, deleted))
                }),
            )
            .await?;
        removed += n;
        match next {
            Some(k) => cursor = k,
            None => break,
        }
    }
    // Change log below `rev`.
    loop {
        let (from, end) = (inner.keys.log(0), inner.keys.log(rev));
        let n = inner
            .run(
                true,
                Arc::new(move |v: &mut View| {
                    let pairs = v.scan_raw_limit(from.clone(), end.clone(), batch)?;
                    for (k, val) in &pairs {
                        v.free_row(k.clone(), val.len());
                    }
                    Ok(pairs.len())
                }),
            )
            .await?;
        removed += n;
        if n < batch as usize {
            break;
        }
    }
    inner
        .run(
            true,
            Arc::new(move |v: &mut View| {
                let k = v.keys.compacted_through();
                if be_i64(v.get_raw(k.clone())?, 0)? < rev {
                    v.put_raw(k, rev.to_be_bytes().to_vec());
                }
                Ok(())
            }),
        )
        .await?;
    tracing::info!(compact_revision = rev, removed, "tikv: compaction done");
    Ok(())
}
