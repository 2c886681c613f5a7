//! Physical compaction: removing the versions no read or watch can ask for any more.
//!
//! After `compact(rev)` has moved the compaction point (a short transaction on `meta`), the
//! superseded versions are deleted in bounded batches, each its own short transaction, walking
//! `kv` by revision windows so that no statement holds locks or scans for long. A version row
//! below `rev` goes when a newer version of the same key is also below `rev` (so the version
//! visible at `rev` stays, and so does the previous version of a key written exactly at `rev`,
//! which a watch from `rev` sends as prev_kv), and a tombstone below `rev` goes as well. Rows at
//! or above `rev` are never touched, so the change log from `rev` on stays complete. Each batch
//! is retried on transient errors; progress is reported through tracing and recorded in
//! `meta.compacted_through` when done, so a process that starts and finds an unfinished
//! compaction resumes it. Each batch subtracts the bytes of the rows it removed from the space
//! quota's count (`meta.bytes`) in the same statement. Deleted rows become reusable space for
//! PostgreSQL at the next (auto)vacuum; `defragment` runs VACUUM FULL to give it back to the
//! filesystem.

use std::time::{Duration, Instant};

use cairn_backend::Revision;
use sqlx::{PgPool, Row};

use crate::sql::is_transient;

/// Revisions per window.
const WINDOW: i64 = 10_000;
/// Retries of one batch statement on transient errors.
const RETRIES: u32 = 10;

async fn retry<T, F, Fut>(what: &str, mut f: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let mut attempt = 0;
    loop {
        match f().await {
            Err(e) if is_transient(&e) && attempt < RETRIES => {
                attempt += 1;
                tracing::warn!(error = %e, attempt, "postgres: compaction {what} failed transiently, retrying");
                tokio::time::sleep(Duration::from_millis(50 << attempt.min(6))).await;
            }
            other => return other,
        }
    }
}

/// Removes what compaction at `rev` made unreachable, `batch` rows per statement. Returns
/// the number of rows removed.
pub(crate) async fn physical(pool: &PgPool, rev: Revision, batch: i64) -> Result<u64, sqlx::Error> {
    let started = Instant::now();
    let lowest: Option<i64> = retry("scan", || async {
        sqlx::query("SELECT min(mod_revision) FROM kv").fetch_one(pool).await?.try_get(0)
    })
    .await?;
    let mut lo = lowest.unwrap_or(rev);
    let mut removed: u64 = 0;
    while lo < rev {
        let hi = lo.saturating_add(WINDOW).min(rev);
        loop {
            let n = retry("batch", || async {
                // The rows and their bytes in the space count (meta.bytes) go together, in one
                // statement: the count is subtracted under the meta row lock, taken only once
                // the rows are deleted, so a write batch waits for a statement's end at most.
                let r = sqlx::query(
                    "WITH d AS (
                        DELETE FROM kv WHERE ctid IN (
                            SELECT k.ctid FROM kv k
                            WHERE k.mod_revision >= $1 AND k.mod_revision < $2
                              AND (k.deleted OR EXISTS (
                                    SELECT 1 FROM kv n WHERE n.key = k.key
                                      AND n.mod_revision > k.mod_revision AND n.mod_revision < $3))
                            LIMIT $4)
                        RETURNING cairn_kv_bytes(key, value) AS b),
                     u AS (UPDATE meta SET bytes = bytes - (SELECT sum(b) FROM d)::bigint
                           WHERE id = 1 AND EXISTS (SELECT 1 FROM d))
                     SELECT count(*) FROM d",
                )
                .bind(lo)
                .bind(hi)
                .bind(rev)
                .bind(batch)
                .fetch_one(pool)
                .await?;
                Ok(r.try_get::<i64, _>(0)?.max(0) as u64)
            })
            .await?;
            removed += n;
            if n > 0 {
                tracing::info!(compact_revision = rev, window_from = lo, window_to = hi, removed, "postgres: compaction progress");
            }
            if (n as i64) < batch {
                break;
            }
        }
        lo = hi;
    }
    retry("finish", || async {
        sqlx::query("UPDATE meta SET compacted_through = GREATEST(compacted_through, $1) WHERE id = 1").bind(rev).execute(pool).await
    })
    .await?;
    tracing::info!(compact_revision = rev, removed, elapsed_ms = started.elapsed().as_millis() as u64, "postgres: compaction done");
    Ok(removed)
}
