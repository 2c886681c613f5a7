//! The queries shared by reads, the write path and the change feed, and error mapping.
//!
//! Key ranges become range predicates on bytea (`key >= $a AND key < $b`), never LIKE, so they
//! are index range scans on the primary keys of `current` and `kv`.

use std::sync::Arc;

use cairn_backend::{BackendError, ChangeBatch, Event, EventKind, KeyRange, KeyValue, Revision};
use futures::TryStreamExt;
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, PgConnection, Postgres, Row};

/// The shape of a key range's predicate.
#[derive(Clone, Copy)]
enum Shape {
    Single,
    From,
    Between,
    Empty,
}

fn shape(r: &KeyRange) -> Shape {
    if r.is_single() {
        return Shape::Single;
    }
    match r.upper() {
        None => Shape::From,
        Some(end) if r.key.as_slice() < end => Shape::Between,
        Some(_) => Shape::Empty,
    }
}

/// The predicate on `col` for `r`, with its parameters starting at `$first`; returns the SQL
/// and the number of parameters it uses.
fn predicate(r: &KeyRange, col: &str, first: usize) -> (String, usize) {
    match shape(r) {
        Shape::Single => (format!("{col} = ${first}"), 1),
        Shape::From => (format!("{col} >= ${first}"), 1),
        Shape::Between => (format!("{col} >= ${first} AND {col} < ${}", first + 1), 2),
        Shape::Empty => ("false".to_string(), 0),
    }
}

type PgQuery<'q> = Query<'q, Postgres, PgArguments>;

pub(crate) fn bind_range<'q>(q: PgQuery<'q>, r: &KeyRange) -> PgQuery<'q> {
    match shape(r) {
        Shape::Single | Shape::From => q.bind(r.key.clone()),
        Shape::Between => q.bind(r.key.clone()).bind(r.range_end.clone()),
        Shape::Empty => q,
    }
}

pub(crate) const KV_COLS: &str = "key, create_revision, mod_revision, version, lease, value";

pub(crate) fn decode_kv(row: &PgRow) -> Result<KeyValue, sqlx::Error> {
    decode_kv_at(row, 0)
}

/// The kv in columns `at..at + 6` of `row` ([`KV_COLS`] in order).
pub(crate) fn decode_kv_at(row: &PgRow, at: usize) -> Result<KeyValue, sqlx::Error> {
    Ok(KeyValue {
        key: row.try_get(at)?,
        create_revision: row.try_get(at + 1)?,
        mod_revision: row.try_get(at + 2)?,
        version: row.try_get(at + 3)?,
        lease: row.try_get(at + 4)?,
        value: row.try_get(at + 5)?,
    })
}

/// The SQL of a range read: the live keys in `r` now (`at == None`, from `current`) or as of a
/// past revision (from `kv`: each key's newest version at or below it, unless a tombstone), in
/// key order, at most `LIMIT $n` (NULL: all). With `count`, the number of such keys instead.
pub(crate) fn range_sql(r: &KeyRange, at: bool, count: bool) -> String {
    let (pred, used) = predicate(r, "key", 1);
    let next = used + 1;
    match (at, count) {
        (false, false) => format!("SELECT {KV_COLS} FROM current WHERE {pred} ORDER BY key LIMIT ${next}"),
        (false, true) => format!("SELECT count(*) FROM current WHERE {pred}"),
        (true, false) => format!(
            "SELECT {KV_COLS} FROM (SELECT DISTINCT ON (key) {KV_COLS}, deleted FROM kv \
             WHERE {pred} AND mod_revision <= ${next} ORDER BY key, mod_revision DESC) v \
             WHERE NOT deleted ORDER BY key LIMIT ${}",
            next + 1
        ),
        (true, true) => format!(
            "SELECT count(*) FROM (SELECT DISTINCT ON (key) deleted FROM kv \
             WHERE {pred} AND mod_revision <= ${next} ORDER BY key, mod_revision DESC) v WHERE NOT deleted"
        ),
    }
}

/// Live kvs in `r` now or at revision `at`, in key order, at most `limit`.
pub(crate) async fn fetch_range(
    conn: &mut PgConnection,
    r: &KeyRange,
    at: Option<Revision>,
    limit: Option<usize>,
) -> Result<Vec<KeyValue>, sqlx::Error> {
    let sql = range_sql(r, at.is_some(), false);
    let mut q = bind_range(sqlx::query(AssertSqlSafe(sql)), r);
    if let Some(rev) = at {
        q = q.bind(rev);
    }
    q = q.bind(limit.map(|l| l as i64));
    let rows = q.fetch_all(&mut *conn).await?;
    rows.iter().map(decode_kv).collect()
}

/// The number of live keys in `r` now or at revision `at`.
pub(crate) async fn count_range(conn: &mut PgConnection, r: &KeyRange, at: Option<Revision>) -> Result<i64, sqlx::Error> {
    let sql = range_sql(r, at.is_some(), true);
    let mut q = bind_range(sqlx::query(AssertSqlSafe(sql)), r);
    if let Some(rev) = at {
        q = q.bind(rev);
    }
    q.fetch_one(&mut *conn).await?.try_get(0)
}

/// Live kvs in `r` (now or at `at`) as a range op needs them: at most `limit`, and the number
/// of live keys in the range (a second query only when the limit cut the answer).
pub(crate) async fn range_with_count(
    conn: &mut PgConnection,
    r: &KeyRange,
    at: Option<Revision>,
    limit: Option<usize>,
    count_only: bool,
) -> Result<(Vec<KeyValue>, i64), sqlx::Error> {
    if count_only {
        return Ok((Vec::new(), count_range(conn, r, at).await?));
    }
    let kvs = fetch_range(conn, r, at, limit).await?;
    let count = if needs_count_query(r, limit, kvs.len()) { count_range(conn, r, at).await? } else { kvs.len() as i64 };
    Ok((kvs, count))
}

/// Whether the rows fetched for `r` under `limit` may be fewer than the live keys in `r`, so
/// that the count needs a query of its own: only when the limit cut the answer, and never for a
/// single key, which has at most one live version (a txn's put reads its key with limit 1:
/// without this, every put of an existing key cost a `count(*)` round trip).
pub(crate) fn needs_count_query(r: &KeyRange, limit: Option<usize>, fetched: usize) -> bool {
    match limit {
        Some(l) if fetched >= l => !(r.is_single() && l >= 1),
        _ => false,
    }
}

/// A read of the live keys in `r` in one statement (one snapshot, no transaction): the
/// revision, the compact revision, at most `limit` kvs in key order and the number of live
/// keys in `r` (counted in the statement only when the limit may cut the answer; with
/// `count_only`, only counted).
pub(crate) async fn read_latest(
    conn: &mut PgConnection,
    r: &KeyRange,
    limit: Option<usize>,
    count_only: bool,
) -> Result<(Revision, Revision, Vec<KeyValue>, i64), sqlx::Error> {
    let (pred, used) = predicate(r, "key", 1);
    let count = format!("(SELECT count(*) FROM current WHERE {pred})");
    let sql = if count_only {
        format!("SELECT revision, compact_revision, {count} FROM meta WHERE id = 1")
    } else {
        let count = if needs_count_query(r, limit, usize::MAX) { count.as_str() } else { "NULL::int8" };
        format!(
            "SELECT m.revision, m.compact_revision, {count}, c.key, c.create_revision, c.mod_revision, c.version, c.lease, c.value
             FROM meta m LEFT JOIN (SELECT {KV_COLS} FROM current WHERE {pred} ORDER BY key LIMIT ${}) c ON true
             WHERE m.id = 1 ORDER BY c.key",
            used + 1
        )
    };
    let mut q = bind_range(sqlx::query(AssertSqlSafe(sql)), r);
    if !count_only {
        q = q.bind(limit.map(|l| l as i64));
    }
    let rows = q.fetch_all(&mut *conn).await?;
    let first = rows.first().ok_or(sqlx::Error::RowNotFound)?;
    let (rev, compact, counted): (Revision, Revision, Option<i64>) = (first.try_get(0)?, first.try_get(1)?, first.try_get(2)?);
    if count_only {
        return Ok((rev, compact, Vec::new(), counted.unwrap_or(0)));
    }
    let mut kvs = Vec::with_capacity(rows.len());
    for row in &rows {
        if row.try_get::<Option<Vec<u8>>, _>(3)?.is_some() {
            kvs.push(decode_kv_at(row, 3)?);
        }
    }
    let count = counted.unwrap_or(kvs.len() as i64);
    Ok((rev, compact, kvs, count))
}

/// (revision, compact revision) as of the caller's snapshot.
pub(crate) async fn read_meta(conn: &mut PgConnection, for_update: bool) -> Result<(Revision, Revision), sqlx::Error> {
    let sql = if for_update {
        "SELECT revision, compact_revision FROM meta WHERE id = 1 FOR UPDATE"
    } else {
        "SELECT revision, compact_revision FROM meta WHERE id = 1"
    };
    let row = sqlx::query(sql).fetch_one(&mut *conn).await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}

/// In one statement (one snapshot): the current and compact revision, and the events of
/// revisions `max(from, compact)..=min(current, last)`, one batch per revision in order,
/// prev_kv filled in. Since revisions are committed with the counter, every revision up to
/// the counter is complete in the snapshot.
pub(crate) async fn read_events(
    conn: &mut PgConnection,
    from: Revision,
    last: Revision,
) -> Result<(Vec<Arc<ChangeBatch>>, Revision, Revision), sqlx::Error> {
    let mut rows = sqlx::query(
        "SELECT m.revision, m.compact_revision, e.mod_revision, e.key, e.deleted, e.create_revision, e.version, e.lease,
                e.value, e.p_create, e.p_mod, e.p_version, e.p_lease, e.p_value
         FROM meta m LEFT JOIN LATERAL (
             SELECT k.mod_revision, k.sub, k.key, k.deleted, k.create_revision, k.version, k.lease, k.value,
                    p.create_revision AS p_create, p.mod_revision AS p_mod, p.version AS p_version,
                    p.lease AS p_lease, p.value AS p_value
             FROM kv k LEFT JOIN kv p ON p.key = k.key AND p.mod_revision = k.prev_revision
             WHERE k.mod_revision >= greatest($1, m.compact_revision) AND k.mod_revision <= least(m.revision, $2)
         ) e ON true
         WHERE m.id = 1
         ORDER BY e.mod_revision, e.sub",
    )
    .bind(from)
    .bind(last)
    .fetch(&mut *conn);
    let mut out: Vec<ChangeBatch> = Vec::new();
    let mut meta = None;
    while let Some(row) = rows.try_next().await? {
        if meta.is_none() {
            meta = Some((row.try_get(0)?, row.try_get(1)?));
        }
        let Some(revision) = row.try_get::<Option<i64>, _>(2)? else { continue };
        let key: Vec<u8> = row.try_get(3)?;
        let deleted: bool = row.try_get(4)?;
        let prev_mod: Option<i64> = row.try_get(10)?;
        let prev_kv = match prev_mod {
            Some(mod_revision) => Some(KeyValue {
                key: key.clone(),
                create_revision: row.try_get(9)?,
                mod_revision,
                version: row.try_get(11)?,
                lease: row.try_get(12)?,
                value: row.try_get(13)?,
            }),
            None => None,
        };
        let event = if deleted {
            Event { kind: EventKind::Delete, kv: KeyValue { key, mod_revision: revision, ..KeyValue::default() }, prev_kv }
        } else {
            Event {
                kind: EventKind::Put,
                kv: KeyValue {
                    key,
                    create_revision: row.try_get(5)?,
                    mod_revision: revision,
                    version: row.try_get(6)?,
                    lease: row.try_get(7)?,
                    value: row.try_get(8)?,
                },
                prev_kv,
            }
        };
        match out.last_mut() {
            Some(b) if b.revision == revision => b.events.push(event),
            _ => out.push(ChangeBatch { revision, events: vec![event] }),
        }
    }
    let (rev, compact) = meta.ok_or(sqlx::Error::RowNotFound)?;
    Ok((out.into_iter().map(Arc::new).collect(), rev, compact))
}

/// SQLSTATE classes and codes that mean "try again": serialization failure, deadlock,
/// connection exceptions, and the server shutting down or starting up.
fn transient_code(code: &str) -> bool {
    matches!(code, "40001" | "40P01" | "57P01" | "57P02" | "57P03" | "53300") || code.starts_with("08")
}

/// Whether `e` means the statement did not run to completion for a reason that may pass
/// (connection loss, serialization failure); such a transaction can be retried from the start.
pub(crate) fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(d) => d.code().is_some_and(|c| transient_code(&c)),
        _ => false,
    }
}

/// The etcd-meaningful error for a database error.
pub(crate) fn db_err(e: sqlx::Error) -> BackendError {
    if let sqlx::Error::Database(d) = &e {
        if let Some(code) = d.code() {
            if code == "53100" {
                return BackendError::NoSpace;
            }
            if transient_code(&code) {
                return BackendError::Unavailable(format!("postgres: {e}"));
            }
        }
        return BackendError::Internal(format!("postgres: {e}"));
    }
    match e {
        sqlx::Error::PoolClosed => BackendError::Stopped,
        e if is_transient(&e) => BackendError::Unavailable(format!("postgres: {e}")),
        sqlx::Error::Protocol(_) => BackendError::Unavailable(format!("postgres: {e}")),
        e => BackendError::Internal(format!("postgres: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_query_only_when_the_limit_may_have_cut_a_multi_key_answer() {
        let one = KeyRange::single(b"k".to_vec());
        let prefix = KeyRange::prefix(b"k".to_vec());
        // A txn's put reads its key with limit 1 and finds it: the one row is the count.
        assert!(!needs_count_query(&one, Some(1), 1));
        assert!(!needs_count_query(&one, Some(2), 1));
        assert!(!needs_count_query(&one, None, 1));
        // limit 0 fetches nothing, so even a single key needs the count.
        assert!(needs_count_query(&one, Some(0), 0));
        // Ranges: only when the limit was reached.
        assert!(needs_count_query(&prefix, Some(3), 3));
        assert!(!needs_count_query(&prefix, Some(3), 2));
        assert!(!needs_count_query(&prefix, None, 500));
    }
}
