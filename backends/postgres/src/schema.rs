//! Versioned schema migrations, applied at start-up by whichever process gets there first.
//!
//! Every migration runs in one transaction together with the row in `schema_version` that
//! records it, under a transaction-level advisory lock, so several processes starting at once
//! apply each migration exactly once and a crash half-way leaves the previous version intact.

use sqlx::{Connection, PgConnection, Row};

/// The advisory lock key that serialises migrations ("cairn" in ASCII).
const MIGRATION_LOCK: i64 = 0x0063_6169_726e;

/// The migrations, in order; version `i + 1` is `MIGRATIONS[i]`. Never edit one that shipped:
/// add a new one.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: the MVCC store, the change log, leases and the revision counter.
    r#"
    -- One row: the current revision (the last one written), the compaction point, and how far
    -- superseded versions have been physically removed. Every write transaction locks it first
    -- (SELECT ... FOR UPDATE), which serialises revision allocation across processes.
    CREATE TABLE meta (
        id                smallint PRIMARY KEY CHECK (id = 1),
        revision          bigint NOT NULL,
        compact_revision  bigint NOT NULL,
        compacted_through bigint NOT NULL
    );
    INSERT INTO meta (id, revision, compact_revision, compacted_through) VALUES (1, 1, 0, 0);

    -- Every version of every key, tombstones included (deleted = true, zero fields). The rows
    -- of one revision are its events, in txn order by sub; prev_revision points at the key's
    -- previous live version (0: none) so the change feed can send prev_kv.
    CREATE TABLE kv (
        key             bytea   NOT NULL,
        mod_revision    bigint  NOT NULL,
        sub             integer NOT NULL,
        create_revision bigint  NOT NULL,
        version         bigint  NOT NULL,
        lease           bigint  NOT NULL,
        value           bytea   NOT NULL,
        deleted         boolean NOT NULL,
        prev_revision   bigint  NOT NULL,
        PRIMARY KEY (key, mod_revision)
    );
    CREATE INDEX kv_by_revision ON kv (mod_revision, sub);

    -- The live keys: the newest version of every key that is not deleted. bytea compares
    -- bytewise, so key ranges are index range scans.
    CREATE TABLE current (
        key             bytea  PRIMARY KEY,
        create_revision bigint NOT NULL,
        mod_revision    bigint NOT NULL,
        version         bigint NOT NULL,
        lease           bigint NOT NULL,
        value           bytea  NOT NULL
    );
    CREATE INDEX current_by_lease ON current (lease) WHERE lease <> 0;

    -- Leases; expiry is decided by the database clock.
    CREATE TABLE leases (
        id         bigint PRIMARY KEY,
        ttl        bigint NOT NULL,
        expires_at timestamptz NOT NULL
    );
    CREATE INDEX leases_by_expiry ON leases (expires_at);
    "#,
    // 2: named documents beside the key space (auth store, alarms, membership), replaced by
    // compare-and-set on their version.
    r#"
    CREATE TABLE docs (
        name    text   PRIMARY KEY,
        version bigint NOT NULL,
        value   bytea  NOT NULL
    );
    "#,
    // 3: the space quota's count of the bytes Cairn's rows hold (meta.bytes), kept exact by
    // every statement that adds or removes rows of kv, current or leases (the writer's batch,
    // compaction's deletes, lease grants) in the same statement or transaction. The functions
    // are the one definition of what a row counts: its key and value (octet_length: the
    // uncompressed length, read from the TOAST pointer without fetching the value) plus a
    // fixed overhead standing for the tuple header, the fixed-width columns and the index
    // entries (kv: ~24 B header + 4 B line pointer + 45 B of columns + two index entries ~50 B;
    // current: ~24 + 4 + 32 + one index entry ~20 B; a lease: etcd's leaseOverhead).
    r#"
    CREATE FUNCTION cairn_kv_bytes(key bytea, value bytea) RETURNS bigint
        LANGUAGE sql IMMUTABLE PARALLEL SAFE
        AS 'SELECT octet_length($1)::bigint + octet_length($2) + 128';
    CREATE FUNCTION cairn_current_bytes(key bytea, value bytea) RETURNS bigint
        LANGUAGE sql IMMUTABLE PARALLEL SAFE
        AS 'SELECT octet_length($1)::bigint + octet_length($2) + 80';
    CREATE FUNCTION cairn_lease_bytes() RETURNS bigint
        LANGUAGE sql IMMUTABLE PARALLEL SAFE
        AS 'SELECT 64::bigint';
    -- ACCESS EXCLUSIVE on meta: no writer commits (they all lock meta first) until this
    -- migration does, so the count below (a later statement, a newer snapshot) is exact.
    ALTER TABLE meta ADD COLUMN bytes bigint NOT NULL DEFAULT 0;
    UPDATE meta SET bytes =
          (SELECT coalesce(sum(cairn_kv_bytes(key, value)), 0) FROM kv)
        + (SELECT coalesce(sum(cairn_current_bytes(key, value)), 0) FROM current)
        + (SELECT count(*) * cairn_lease_bytes() FROM leases)
    WHERE id = 1;
    "#,
];

/// Brings the database to the newest schema. Fails when the database has a newer schema than
/// this build knows.
pub(crate) async fn migrate(conn: &mut PgConnection) -> anyhow::Result<i32> {
    let mut tx = conn.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(MIGRATION_LOCK).execute(&mut *tx).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS schema_version (
            version    integer PRIMARY KEY,
            applied_at timestamptz NOT NULL DEFAULT now()
        )",
    )
    .execute(&mut *tx)
    .await?;
    let have: i32 = sqlx::query("SELECT COALESCE(max(version), 0) FROM schema_version").fetch_one(&mut *tx).await?.try_get(0)?;
    let known = MIGRATIONS.len() as i32;
    if have > known {
        anyhow::bail!("the database has schema version {have}, newer than this build of Cairn knows ({known}); upgrade Cairn");
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(have as usize) {
        let version = i as i32 + 1;
        sqlx::raw_sql(sqlx::AssertSqlSafe(*sql)).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO schema_version (version) VALUES ($1)").bind(version).execute(&mut *tx).await?;
        tracing::info!(version, "postgres: applied schema migration");
    }
    tx.commit().await?;
    Ok(known)
}
