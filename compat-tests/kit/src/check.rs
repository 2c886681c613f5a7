//! The black-box cases of `cairn-compat check`.
//!
//! Every case runs under its own random key prefix and deletes that prefix afterwards, so the
//! kit can be pointed at a server that holds other data. Revision assertions assume nobody else
//! writes to the server while a case runs. Compaction is global and destroys history, so the
//! compaction case runs only when the caller allows it; so do the `auth/*` cases, which enable
//! auth and put the endpoint back afterwards (see [`auth`]). `maintenance/*` (in `maint.rs`)
//! and `tls/*` (`tls.rs`, https endpoints only) run by default.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use cairn_proto::etcdserverpb::compare::{CompareResult as R, CompareTarget as T};
use cairn_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use cairn_proto::etcdserverpb::response_op::Response as OpResp;
use cairn_proto::etcdserverpb::watch_create_request::FilterType;
use cairn_proto::etcdserverpb::*;
use cairn_proto::mvccpb::event::EventType;
use tonic::Code;

use crate::client::*;

pub mod auth;
mod maint;
mod tls;

/// What the caller allows and expects (the command line's `--allow-*` flags).
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Run the compaction case (compaction is global).
    pub allow_compact: bool,
    /// Run the `auth/*` cases: they enable etcd's auth (global) and disable it again.
    pub allow_auth: bool,
    /// The endpoint is expected to refuse TLS clients without a certificate.
    pub client_cert_auth: bool,
}

/// What a case gets: clients of the endpoint and its own key prefix.
#[derive(Clone)]
pub struct Ctx {
    pub c: Clients,
    pub p: String,
    pub allow_compact: bool,
    pub opts: Options,
    /// Names, passwords and what was created by the `auth/*` cases of this run.
    pub auth: std::sync::Arc<auth::AuthRun>,
}

impl Ctx {
    fn k(&self, s: &str) -> Vec<u8> {
        format!("{}{s}", self.p).into_bytes()
    }
}

type CaseFuture = Pin<Box<dyn Future<Output = anyhow::Result<String>> + Send>>;

pub struct Case {
    pub name: &'static str,
    run: fn(Ctx) -> CaseFuture,
    /// Run after the case whatever its outcome (also after a timeout): puts global state back.
    after: Option<fn(Ctx) -> CaseFuture>,
}

macro_rules! case {
    ($name:literal, $f:path) => {
        Case { name: $name, run: |c| Box::pin($f(c)), after: None }
    };
    ($name:literal, $f:path, after $g:path) => {
        Case { name: $name, run: |c| Box::pin($f(c)), after: Some(|c| Box::pin($g(c))) }
    };
}

/// Every case, in the order they run.
pub fn cases() -> Vec<Case> {
    vec![
        case!("kv/put-get-delete", kv_put_get_delete),
        case!("kv/range-limit-more-count", range_limit_more_count),
        case!("kv/range-keys-only-count-only", range_keys_only_count_only),
        case!("kv/range-sort", range_sort),
        case!("kv/range-revision-reads", range_revision_reads),
        case!("kv/range-mod-create-filters", range_mod_create_filters),
        case!("kv/put-prev-kv-ignore-value-lease", put_ignore_value_lease),
        case!("txn/compare-targets-results", txn_compare_targets),
        case!("txn/compare-missing-key", txn_missing_key),
        case!("txn/compare-range", txn_compare_range),
        case!("txn/nested", txn_nested),
        case!("revision/increments", revisions),
        case!("error/empty-key", err_empty_key),
        case!("error/too-many-ops", err_too_many_ops),
        case!("error/duplicate-key", err_duplicate_key),
        case!("error/invalid-sort", err_invalid_sort),
        case!("error/future-revision", err_future_revision),
        case!("error/compacted-revision", err_compacted),
        case!("error/lease-not-found", err_lease_not_found),
        case!("error/ignore-value-lease", err_ignore_rules),
        case!("watch/history-prev-kv", watch_history),
        case!("watch/filters", watch_filters),
        case!("watch/prefix-and-cancel", watch_prefix_cancel),
        case!("watch/progress-request", watch_progress),
        case!("lease/grant-ttl-keys-revoke", lease_grant),
        case!("lease/keep-alive", lease_keepalive),
        case!("lease/expiry-deletes-keys", lease_expiry),
        case!("maintenance/status", maint::status),
        case!("maintenance/hash-kv", maint::hash_kv),
        case!("maintenance/hash", maint::hash),
        case!("maintenance/defragment", maint::defragment),
        case!("maintenance/snapshot", maint::snapshot),
        case!("maintenance/alarm-list", maint::alarm_list),
        case!("tls/handshake-alpn", tls::handshake),
        case!("tls/plaintext-refused", tls::plaintext_refused),
        case!("tls/client-cert-required", tls::client_cert_required),
        case!("auth/users-roles", auth::users_roles, after auth::restore),
        case!("auth/enable-permissions", auth::enable_permissions, after auth::restore),
        case!("auth/root-role", auth::root_role, after auth::restore),
    ]
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    Skip,
}

#[derive(Debug, Clone)]
pub struct Row {
    pub case: &'static str,
    pub outcome: Outcome,
    pub detail: String,
}

/// Runs the cases whose name contains `filter` (all when empty) against the plain-text
/// `endpoint`.
pub async fn run(endpoint: &str, allow_compact: bool, filter: &str) -> anyhow::Result<Vec<Row>> {
    let opts = Options { allow_compact, ..Default::default() };
    run_with(&Target::plain(endpoint), &opts, filter).await
}

/// Runs the cases whose name contains `filter` (all when empty) against `target`.
pub async fn run_with(target: &Target, opts: &Options, filter: &str) -> anyhow::Result<Vec<Row>> {
    let c = connect_to(target).await?;
    let auth = std::sync::Arc::new(auth::AuthRun::new());
    let mut rows = Vec::new();
    for case in cases().into_iter().filter(|c| c.name.contains(filter)) {
        let ctx = Ctx {
            c: c.clone(),
            p: random_prefix(),
            allow_compact: opts.allow_compact,
            opts: opts.clone(),
            auth: auth.clone(),
        };
        let prefix = ctx.p.clone();
        let out = tokio::time::timeout(Duration::from_secs(30), (case.run)(ctx.clone())).await;
        let (mut outcome, mut detail) = match out {
            Err(_) => (Outcome::Fail, "timed out after 30 s".to_string()),
            Ok(Ok(d)) if d.starts_with("skipped:") => (Outcome::Skip, d),
            Ok(Ok(d)) => (Outcome::Pass, d),
            Ok(Err(e)) => (Outcome::Fail, format!("{e:#}")),
        };
        if let Some(after) = case.after {
            let r = match tokio::time::timeout(Duration::from_secs(30), after(ctx)).await {
                Err(_) => Err(anyhow::anyhow!("timed out after 30 s")),
                Ok(r) => r,
            };
            if let Err(e) = r {
                outcome = Outcome::Fail;
                detail = format!("{detail}; RESTORING THE ENDPOINT FAILED: {e:#}");
            }
        }
        let _ = c.kv.clone().delete_range(del_prefix(&prefix)).await;
        rows.push(Row { case: case.name, outcome, detail });
    }
    Ok(rows)
}

/// The table and the closing `N passed, N failed` line.
pub fn render(endpoint: &str, rows: &[Row]) -> String {
    let w = rows.iter().map(|r| r.case.len()).max().unwrap_or(4).max(4);
    let mut s = format!("cairn-compat check against {endpoint}\n\n");
    s += &format!("{:<w$}  {:<6}  detail\n", "case", "result");
    s += &format!("{:-<w$}  {:-<6}  {:-<6}\n", "", "", "");
    for r in rows {
        let o = match r.outcome {
            Outcome::Pass => "pass",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "skip",
        };
        s += &format!("{:<w$}  {:<6}  {}\n", r.case, o, r.detail.replace('\n', " "));
    }
    let passed = rows.iter().filter(|r| r.outcome == Outcome::Pass).count();
    let failed = rows.iter().filter(|r| r.outcome == Outcome::Fail).count();
    let skipped = rows.iter().filter(|r| r.outcome == Outcome::Skip).count();
    s += "\n";
    if skipped > 0 {
        s += &format!("{skipped} skipped\n");
    }
    s += &format!("{passed} passed, {failed} failed\n");
    s
}

// ---- helpers ----

pub(crate) fn expect_status<T: std::fmt::Debug>(
    what: &str,
    r: Result<T, tonic::Status>,
    code: Code,
    msg: &str,
) -> anyhow::Result<()> {
    match r {
        Ok(v) => bail!("{what}: expected {code:?} {msg:?}, got a response {v:?}"),
        Err(e) => {
            ensure!(
                e.code() == code && e.message() == msg,
                "{what}: expected {code:?} {msg:?}, got {:?} {:?}",
                e.code(),
                e.message()
            );
            Ok(())
        }
    }
}

fn keys(kvs: &[cairn_proto::mvccpb::KeyValue], p: &str) -> Vec<String> {
    kvs.iter().map(|kv| lossy(&kv.key).strip_prefix(p).unwrap_or("?").to_string()).collect()
}

async fn put_rev(c: &mut Clients, r: PutRequest) -> anyhow::Result<i64> {
    Ok(rev(&c.kv.put(r).await?.into_inner().header))
}

// ---- KV ----

async fn kv_put_get_delete(x: Ctx) -> anyhow::Result<String> {
    let mut cl = x.c.clone();
    let c = &mut cl;
    let k = format!("{}k", x.p);
    let r1 = put_rev(c, put(k.clone(), "v1")).await?;
    let g = c.kv.range(get(k.clone())).await?.into_inner();
    ensure!(g.count == 1 && g.kvs.len() == 1 && !g.more, "get after put: {g:?}");
    let kv = &g.kvs[0];
    ensure!(
        (kv.key.as_slice(), kv.value.as_slice(), kv.version, kv.create_revision, kv.mod_revision, kv.lease)
            == (k.as_bytes(), &b"v1"[..], 1, r1, r1, 0),
        "stored key-value after put at revision {r1}: {kv:?}"
    );
    ensure!(rev(&g.header) == r1, "read header revision {} != {r1}", rev(&g.header));
    let p = c.kv.put(PutRequest { prev_kv: true, ..put(k.clone(), "v2") }).await?.into_inner();
    let r2 = rev(&p.header);
    ensure!(r2 == r1 + 1, "second put revision {r2}, expected {}", r1 + 1);
    ensure!(p.prev_kv.as_ref().map(|kv| kv.value.as_slice()) == Some(b"v1"), "prev_kv: {:?}", p.prev_kv);
    let kv = c.kv.range(get(k.clone())).await?.into_inner().kvs.remove(0);
    ensure!((kv.version, kv.create_revision, kv.mod_revision) == (2, r1, r2), "after overwrite: {kv:?}");
    let d = c.kv.delete_range(DeleteRangeRequest { prev_kv: true, ..del(k.clone()) }).await?.into_inner();
    ensure!(d.deleted == 1 && rev(&d.header) == r2 + 1, "delete: {d:?}");
    ensure!(d.prev_kvs.len() == 1 && d.prev_kvs[0].value == b"v2", "delete prev_kvs: {:?}", d.prev_kvs);
    let g = c.kv.range(get(k.clone())).await?.into_inner();
    ensure!(g.count == 0 && g.kvs.is_empty(), "get after delete: {g:?}");
    let d = c.kv.delete_range(del(k.clone())).await?.into_inner();
    ensure!(d.deleted == 0 && rev(&d.header) == r2 + 1, "deleting a missing key: {d:?}");
    // Put after delete starts a new generation: version 1, new create revision.
    let r4 = put_rev(c, put(k.clone(), "v3")).await?;
    let kv = c.kv.range(get(k.clone())).await?.into_inner().kvs.remove(0);
    ensure!((kv.version, kv.create_revision) == (1, r4), "recreated key: {kv:?}");
    Ok(format!("revisions {r1}..{r4}"))
}

async fn fill(x: &mut Ctx, kvs: &[(&str, &str)]) -> anyhow::Result<Vec<i64>> {
    let mut revs = Vec::new();
    for (k, v) in kvs {
        let key = x.k(k);
        revs.push(put_rev(&mut x.c, put(key, *v)).await?);
    }
    Ok(revs)
}

async fn range_limit_more_count(mut x: Ctx) -> anyhow::Result<String> {
    fill(&mut x, &[("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")]).await?;
    let p = x.p.clone();
    let mut cl = x.c.clone();
    let c = &mut cl;
    let r = c.kv.range(RangeRequest { limit: 2, ..get_prefix(&p) }).await?.into_inner();
    ensure!((r.count, r.more, keys(&r.kvs, &p)) == (4, true, vec!["a".into(), "b".into()]), "limit 2: {r:?}");
    let r = c.kv.range(RangeRequest { limit: 4, ..get_prefix(&p) }).await?.into_inner();
    ensure!((r.count, r.more, r.kvs.len()) == (4, false, 4), "limit 4: count {} more {}", r.count, r.more);
    let r = c.kv.range(RangeRequest { limit: 10, ..get_prefix(&p) }).await?.into_inner();
    ensure!((r.count, r.more, r.kvs.len()) == (4, false, 4), "limit 10: count {} more {}", r.count, r.more);
    // [b, d): half-open.
    let r = c.kv.range(RangeRequest { key: x.k("b"), range_end: x.k("d"), ..Default::default() }).await?.into_inner();
    ensure!(keys(&r.kvs, &p) == ["b", "c"], "range [b, d): {:?}", keys(&r.kvs, &p));
    // limit 0 is no limit.
    let r = c.kv.range(RangeRequest { limit: 0, ..get_prefix(&p) }).await?.into_inner();
    ensure!(r.kvs.len() == 4 && !r.more, "limit 0: {} keys", r.kvs.len());
    Ok("limit/more/count, half-open ranges".into())
}

async fn range_keys_only_count_only(mut x: Ctx) -> anyhow::Result<String> {
    fill(&mut x, &[("a", "1"), ("b", "2"), ("c", "3")]).await?;
    let p = x.p.clone();
    let mut cl = x.c.clone();
    let c = &mut cl;
    let r = c.kv.range(RangeRequest { keys_only: true, ..get_prefix(&p) }).await?.into_inner();
    ensure!(r.count == 3 && r.kvs.len() == 3, "keys_only: {r:?}");
    ensure!(r.kvs.iter().all(|kv| kv.value.is_empty() && kv.version == 1), "keys_only values: {:?}", r.kvs);
    let r = c.kv.range(RangeRequest { count_only: true, ..get_prefix(&p) }).await?.into_inner();
    ensure!(r.count == 3 && r.kvs.is_empty() && !r.more, "count_only: {r:?}");
    let r = c.kv.range(RangeRequest { count_only: true, limit: 1, ..get_prefix(&p) }).await?.into_inner();
    ensure!(r.count == 3 && r.kvs.is_empty(), "count_only with limit: {r:?}");
    Ok("keys_only, count_only".into())
}

async fn range_sort(mut x: Ctx) -> anyhow::Result<String> {
    // key order a b c; value order c a b; create order b c a; after re-put of b, mod order c a b.
    fill(&mut x, &[("b", "y"), ("c", "w"), ("a", "x"), ("b", "z")]).await?;
    let p = x.p.clone();
    let mut checks = 0;
    let cases: &[(SortOrder, SortTarget, &[&str])] = &[
        (SortOrder::Ascend, SortTarget::Key, &["a", "b", "c"]),
        (SortOrder::Descend, SortTarget::Key, &["c", "b", "a"]),
        (SortOrder::Ascend, SortTarget::Value, &["c", "a", "b"]),
        (SortOrder::Descend, SortTarget::Value, &["b", "a", "c"]),
        (SortOrder::Ascend, SortTarget::Create, &["b", "c", "a"]),
        (SortOrder::Descend, SortTarget::Create, &["a", "c", "b"]),
        (SortOrder::Ascend, SortTarget::Mod, &["c", "a", "b"]),
        (SortOrder::Descend, SortTarget::Mod, &["b", "a", "c"]),
        (SortOrder::Descend, SortTarget::Version, &["b", "a", "c"]),
    ];
    for (order, target, want) in cases {
        let req = RangeRequest { sort_order: *order as i32, sort_target: *target as i32, ..get_prefix(&p) };
        let r = x.c.kv.range(req.clone()).await?.into_inner();
        let got = keys(&r.kvs, &p);
        // Version descending: b has version 2, a and c tie (their order is unspecified).
        let ok =
            if *target == SortTarget::Version { got.first().map(String::as_str) == Some("b") } else { got == *want };
        ensure!(ok, "sort {order:?} by {target:?}: got {got:?}, want {want:?}");
        // With a limit the sort applies before the limit.
        let r = x.c.kv.range(RangeRequest { limit: 1, ..req }).await?.into_inner();
        ensure!(
            keys(&r.kvs, &p).first().map(String::as_str) == Some(want[0]) && r.more && r.count == 3,
            "sort {order:?} by {target:?} with limit 1: {:?} more {} count {}",
            keys(&r.kvs, &p),
            r.more,
            r.count
        );
        checks += 2;
    }
    Ok(format!("{checks} orderings"))
}

async fn range_revision_reads(mut x: Ctx) -> anyhow::Result<String> {
    let revs = fill(&mut x, &[("k", "v1"), ("k", "v2"), ("other", "o")]).await?;
    let k = x.k("k");
    let mut cl = x.c.clone();
    let c = &mut cl;
    let d = rev(&c.kv.delete_range(del(k.clone())).await?.into_inner().header);
    for (at, want) in
        [(revs[0], Some("v1")), (revs[1], Some("v2")), (revs[2], Some("v2")), (d, None), (revs[0] - 1, None)]
    {
        let r = c.kv.range(RangeRequest { revision: at, ..get(k.clone()) }).await?.into_inner();
        let got = r.kvs.first().map(|kv| lossy(&kv.value));
        ensure!(got.as_deref() == want, "read at revision {at}: {got:?}, want {want:?}");
        ensure!(rev(&r.header) == d, "header of a read at {at} is the current revision {d}, got {}", rev(&r.header));
    }
    let r = c.kv.range(RangeRequest { revision: revs[1], ..get(k.clone()) }).await?.into_inner();
    let kv = &r.kvs[0];
    ensure!((kv.version, kv.create_revision, kv.mod_revision) == (2, revs[0], revs[1]), "historic kv: {kv:?}");
    Ok(format!("reads at {}..{d}", revs[0] - 1))
}

async fn range_mod_create_filters(mut x: Ctx) -> anyhow::Result<String> {
    let revs = fill(&mut x, &[("a", "1"), ("b", "1"), ("c", "1"), ("a", "2")]).await?;
    let (ra, rb, rc, ra2) = (revs[0], revs[1], revs[2], revs[3]);
    let p = x.p.clone();
    let mut cl = x.c.clone();
    let c = &mut cl;
    let cases: Vec<(RangeRequest, Vec<&str>, String)> = vec![
        (RangeRequest { min_mod_revision: rc, ..get_prefix(&p) }, vec!["a", "c"], format!("min_mod {rc}")),
        (RangeRequest { max_mod_revision: rc, ..get_prefix(&p) }, vec!["b", "c"], format!("max_mod {rc}")),
        (RangeRequest { min_create_revision: rb, ..get_prefix(&p) }, vec!["b", "c"], format!("min_create {rb}")),
        (RangeRequest { max_create_revision: rb, ..get_prefix(&p) }, vec!["a", "b"], format!("max_create {rb}")),
        (
            RangeRequest { min_mod_revision: rb, max_mod_revision: rc, ..get_prefix(&p) },
            vec!["b", "c"],
            format!("mod in [{rb}, {rc}]"),
        ),
        (
            RangeRequest { min_create_revision: ra, max_create_revision: ra, min_mod_revision: ra2, ..get_prefix(&p) },
            vec!["a"],
            "create = a's, mod >= a's second".into(),
        ),
    ];
    let n = cases.len();
    for (req, want, what) in cases {
        let r = c.kv.range(req).await?.into_inner();
        ensure!(keys(&r.kvs, &p) == want, "{what}: got {:?}, want {want:?}", keys(&r.kvs, &p));
    }
    Ok(format!("{n} filters"))
}

async fn put_ignore_value_lease(x: Ctx) -> anyhow::Result<String> {
    let k = x.k("k");
    let mut cl = x.c.clone();
    let c = &mut cl;
    let lease = c.lease.lease_grant(LeaseGrantRequest { ttl: 60, id: 0 }).await?.into_inner().id;
    let cleanup = LeaseRevokeRequest { id: lease };
    let res: anyhow::Result<()> = async {
        c.kv.put(put(k.clone(), "v1")).await?;
        // ignore_value: keeps the value, attaches the lease.
        let p =
            c.kv.put(PutRequest { ignore_value: true, lease, prev_kv: true, ..put(k.clone(), "") }).await?.into_inner();
        ensure!(p.prev_kv.as_ref().map(|kv| (kv.value.as_slice(), kv.lease)) == Some((b"v1", 0)), "prev: {p:?}");
        let kv = c.kv.range(get(k.clone())).await?.into_inner().kvs.remove(0);
        ensure!((kv.value.as_slice(), kv.lease, kv.version) == (&b"v1"[..], lease, 2), "after ignore_value: {kv:?}");
        // ignore_lease: keeps the lease, changes the value.
        c.kv.put(PutRequest { ignore_lease: true, ..put(k.clone(), "v2") }).await?;
        let kv = c.kv.range(get(k.clone())).await?.into_inner().kvs.remove(0);
        ensure!((kv.value.as_slice(), kv.lease, kv.version) == (&b"v2"[..], lease, 3), "after ignore_lease: {kv:?}");
        // A plain put detaches the lease.
        c.kv.put(put(k.clone(), "v3")).await?;
        let kv = c.kv.range(get(k.clone())).await?.into_inner().kvs.remove(0);
        ensure!(kv.lease == 0, "a put without lease detaches it: {kv:?}");
        Ok(())
    }
    .await;
    let _ = c.lease.lease_revoke(cleanup).await;
    res?;
    Ok("ignore_value, ignore_lease, prev_kv".into())
}

// ---- Txn ----

async fn txn_compare_targets(x: Ctx) -> anyhow::Result<String> {
    let k = x.k("k");
    let mut cl = x.c.clone();
    let c = &mut cl;
    let lease = c.lease.lease_grant(LeaseGrantRequest { ttl: 60, id: 0 }).await?.into_inner().id;
    let res: anyhow::Result<usize> = async {
        let r1 = put_rev(c, put(k.clone(), "m")).await?;
        let r2 = put_rev(c, PutRequest { lease, ..put(k.clone(), "m") }).await?;
        // version 2, create r1, mod r2, value "m", lease `lease`.
        let vals: Vec<(T, CmpVal, CmpVal, CmpVal)> = vec![
            (T::Version, CmpVal::Int(2), CmpVal::Int(1), CmpVal::Int(3)),
            (T::Create, CmpVal::Int(r1), CmpVal::Int(r1 - 1), CmpVal::Int(r1 + 1)),
            (T::Mod, CmpVal::Int(r2), CmpVal::Int(r2 - 1), CmpVal::Int(r2 + 1)),
            (T::Value, CmpVal::Bytes(b"m".to_vec()), CmpVal::Bytes(b"a".to_vec()), CmpVal::Bytes(b"z".to_vec())),
            (T::Lease, CmpVal::Int(lease), CmpVal::Int(lease - 1), CmpVal::Int(lease + 1)),
        ];
        let mut n = 0;
        for (t, eq, below, above) in vals {
            // (result, operand, expected outcome)
            let rows = [
                (R::Equal, &eq, true),
                (R::Equal, &below, false),
                (R::NotEqual, &eq, false),
                (R::NotEqual, &above, true),
                (R::Greater, &below, true),
                (R::Greater, &eq, false),
                (R::Less, &above, true),
                (R::Less, &eq, false),
            ];
            for (res, v, want) in rows {
                let txn = TxnRequest { compare: vec![cmp(k.clone(), t, res, v.clone())], ..Default::default() };
                let r = c.kv.txn(txn).await?.into_inner();
                ensure!(r.succeeded == want, "{t:?} {res:?} {v:?}: succeeded {}, want {want}", r.succeeded);
                ensure!(rev(&r.header) == r2, "an empty txn took a revision ({} != {r2})", rev(&r.header));
                n += 1;
            }
        }
        // Several compares: all must hold.
        let both = vec![
            cmp(k.clone(), T::Version, R::Equal, CmpVal::Int(2)),
            cmp(k.clone(), T::Value, R::Equal, CmpVal::Bytes(b"x".to_vec())),
        ];
        let r = c.kv.txn(TxnRequest { compare: both, ..Default::default() }).await?.into_inner();
        ensure!(!r.succeeded, "one false compare of two must fail the txn");
        Ok(n + 1)
    }
    .await;
    let _ = c.lease.lease_revoke(LeaseRevokeRequest { id: lease }).await;
    Ok(format!("{} compares", res?))
}

async fn txn_missing_key(x: Ctx) -> anyhow::Result<String> {
    let k = x.k("missing");
    let mut cl = x.c.clone();
    let c = &mut cl;
    let rows: Vec<(T, R, CmpVal, bool)> = vec![
        (T::Version, R::Equal, CmpVal::Int(0), true),
        (T::Create, R::Equal, CmpVal::Int(0), true),
        (T::Mod, R::Equal, CmpVal::Int(0), true),
        (T::Lease, R::Equal, CmpVal::Int(0), true),
        (T::Version, R::Greater, CmpVal::Int(0), false),
        (T::Mod, R::Less, CmpVal::Int(1), true),
        (T::Value, R::Equal, CmpVal::Bytes(vec![]), false),
        (T::Value, R::NotEqual, CmpVal::Bytes(b"x".to_vec()), false),
    ];
    let n = rows.len();
    for (t, res, v, want) in rows {
        let txn = TxnRequest { compare: vec![cmp(k.clone(), t, res, v.clone())], ..Default::default() };
        let r = c.kv.txn(txn).await?.into_inner();
        ensure!(r.succeeded == want, "missing key, {t:?} {res:?} {v:?}: succeeded {}, want {want}", r.succeeded);
    }
    // The usual create-if-absent shape.
    let create = TxnRequest {
        compare: vec![cmp(k.clone(), T::Create, R::Equal, CmpVal::Int(0))],
        success: vec![op_put(put(k.clone(), "new"))],
        failure: vec![op_get(get(k.clone()))],
    };
    let r = c.kv.txn(create.clone()).await?.into_inner();
    ensure!(r.succeeded && matches!(r.responses[0].response, Some(OpResp::ResponsePut(_))), "create-if-absent: {r:?}");
    let r = c.kv.txn(create).await?.into_inner();
    let Some(OpResp::ResponseRange(g)) = &r.responses[0].response else { bail!("second create-if-absent: {r:?}") };
    ensure!(!r.succeeded && g.kvs[0].value == b"new", "second create-if-absent: {r:?}");
    Ok(format!("{} compares on a missing key", n + 2))
}

async fn txn_compare_range(mut x: Ctx) -> anyhow::Result<String> {
    fill(&mut x, &[("r/a", "1"), ("r/b", "1"), ("r/c", "2")]).await?;
    let p = format!("{}r/", x.p);
    let mut cl = x.c.clone();
    let c = &mut cl;
    let mk = |t: T, res: R, v: CmpVal| {
        let mut cm = cmp(p.clone(), t, res, v);
        cm.range_end = prefix_end(p.as_bytes());
        TxnRequest { compare: vec![cm], ..Default::default() }
    };
    let rows = [
        (mk(T::Version, R::Equal, CmpVal::Int(1)), true, "all versions 1"),
        (mk(T::Value, R::Equal, CmpVal::Bytes(b"1".to_vec())), false, "not all values 1"),
        (mk(T::Value, R::Less, CmpVal::Bytes(b"3".to_vec())), true, "all values < 3"),
        (mk(T::Create, R::Greater, CmpVal::Int(0)), true, "all created"),
    ];
    for (txn, want, what) in rows {
        let r = c.kv.txn(txn).await?.into_inner();
        ensure!(r.succeeded == want, "range compare {what}: succeeded {}, want {want}", r.succeeded);
    }
    Ok("compares over a key range".into())
}

async fn txn_nested(x: Ctx) -> anyhow::Result<String> {
    let (a, b, cc) = (x.k("a"), x.k("b"), x.k("c"));
    let mut cl = x.c.clone();
    let c = &mut cl;
    let r0 = put_rev(c, put(a.clone(), "1")).await?;
    let inner = TxnRequest {
        compare: vec![cmp(a.clone(), T::Value, R::Equal, CmpVal::Bytes(b"1".to_vec()))],
        success: vec![op_put(put(b.clone(), "in")), op_get(get(a.clone()))],
        failure: vec![op_put(put(cc.clone(), "bad"))],
    };
    let outer = TxnRequest {
        compare: vec![cmp(a.clone(), T::Version, R::Equal, CmpVal::Int(1))],
        success: vec![op_put(put(a.clone(), "2")), op_txn(inner)],
        failure: vec![],
    };
    let r = c.kv.txn(outer).await?.into_inner();
    ensure!(r.succeeded && r.responses.len() == 2, "outer: {r:?}");
    ensure!(rev(&r.header) == r0 + 1, "a nested txn is one revision: {} != {}", rev(&r.header), r0 + 1);
    let Some(OpResp::ResponseTxn(t)) = &r.responses[1].response else { bail!("second response is not a txn: {r:?}") };
    // etcd evaluates every compare, nested ones included, against the state before the txn:
    // the inner compare sees "1", not the outer put's "2". Its reads see the outer writes.
    ensure!(t.succeeded, "inner compares see the state before the txn, so the inner success branch runs: {t:?}");
    let Some(OpResp::ResponseRange(inner_get)) = &t.responses[1].response else { bail!("inner get: {t:?}") };
    ensure!(inner_get.kvs.first().map(|kv| kv.value.as_slice()) == Some(b"2"), "inner read sees the outer put: {t:?}");
    let g = c.kv.range(get(b.clone())).await?.into_inner();
    ensure!(g.kvs.first().map(|kv| kv.mod_revision) == Some(r0 + 1), "inner success put: {g:?}");
    let g = c.kv.range(get(cc.clone())).await?.into_inner();
    ensure!(g.count == 0, "inner failure branch must not run: {g:?}");
    Ok("nested txn: one revision, compares see the state before it".into())
}

async fn revisions(x: Ctx) -> anyhow::Result<String> {
    let (a, b) = (x.k("a"), x.k("b"));
    let mut cl = x.c.clone();
    let c = &mut cl;
    let r0 = current_rev(c).await?;
    let r1 = put_rev(c, put(a.clone(), "1")).await?;
    ensure!(r1 == r0 + 1, "put: {r0} -> {r1}");
    let t = TxnRequest {
        success: vec![op_put(put(a.clone(), "2")), op_put(put(b.clone(), "2")), op_del(del(x.p.clone() + "zz"))],
        ..Default::default()
    };
    let r2 = rev(&c.kv.txn(t).await?.into_inner().header);
    ensure!(r2 == r1 + 1, "a txn of two puts takes one revision: {r1} -> {r2}");
    let g = c.kv.range(get(b.clone())).await?.into_inner();
    ensure!(g.kvs[0].mod_revision == r2 && rev(&g.header) == r2, "put in txn has its revision: {g:?}");
    let t = TxnRequest { success: vec![op_get(get(a.clone()))], ..Default::default() };
    let r = rev(&c.kv.txn(t).await?.into_inner().header);
    ensure!(r == r2, "a read-only txn took a revision: {r2} -> {r}");
    let t = TxnRequest {
        compare: vec![cmp(a.clone(), T::Version, R::Equal, CmpVal::Int(99))],
        success: vec![op_put(put(a.clone(), "x"))],
        failure: vec![],
    };
    let r = rev(&c.kv.txn(t).await?.into_inner().header);
    ensure!(r == r2, "a failed txn with an empty failure branch took a revision: {r2} -> {r}");
    let r = rev(&c.kv.delete_range(del(x.p.clone() + "nothing")).await?.into_inner().header);
    ensure!(r == r2, "deleting nothing took a revision: {r2} -> {r}");
    let t = TxnRequest { success: vec![op_del(del(x.p.clone() + "nothing"))], ..Default::default() };
    let r = rev(&c.kv.txn(t).await?.into_inner().header);
    ensure!(r == r2, "a txn deleting nothing took a revision: {r2} -> {r}");
    let r3 = rev(&c.kv.delete_range(del_prefix(&x.p)).await?.into_inner().header);
    ensure!(r3 == r2 + 1, "deleting two keys takes one revision: {r2} -> {r3}");
    Ok(format!("revisions {r0}..{r3}"))
}

// ---- Errors ----

const EMPTY_KEY: &str = "etcdserver: key is not provided";

async fn err_empty_key(x: Ctx) -> anyhow::Result<String> {
    let mut cl = x.c.clone();
    let c = &mut cl;
    expect_status("Range", c.kv.range(get("")).await, Code::InvalidArgument, EMPTY_KEY)?;
    expect_status("Put", c.kv.put(put("", "v")).await, Code::InvalidArgument, EMPTY_KEY)?;
    expect_status("DeleteRange", c.kv.delete_range(del("")).await, Code::InvalidArgument, EMPTY_KEY)?;
    let t = TxnRequest { success: vec![op_put(put("", "v"))], ..Default::default() };
    expect_status("Txn put", c.kv.txn(t).await, Code::InvalidArgument, EMPTY_KEY)?;
    let t = TxnRequest { failure: vec![op_get(get(""))], ..Default::default() };
    expect_status("Txn range in failure", c.kv.txn(t).await, Code::InvalidArgument, EMPTY_KEY)?;
    Ok("Range, Put, DeleteRange, Txn".into())
}

async fn err_too_many_ops(x: Ctx) -> anyhow::Result<String> {
    let msg = "etcdserver: too many operations in txn request";
    let ops = |n: usize, p: &str| (0..n).map(|i| op_put(put(format!("{p}{i}"), "v"))).collect::<Vec<_>>();
    let mut cl = x.c.clone();
    let c = &mut cl;
    let t = TxnRequest { success: ops(129, &x.p), ..Default::default() };
    expect_status("129 puts (default --max-txn-ops 128)", c.kv.txn(t).await, Code::InvalidArgument, msg)?;
    let t = TxnRequest { success: ops(128, &x.p), ..Default::default() };
    let r = c.kv.txn(t).await.context("128 puts must be accepted")?.into_inner();
    ensure!(r.responses.len() == 128, "128 puts: {} responses", r.responses.len());
    let cmps = (0..129).map(|i| cmp(format!("{}{i}", x.p), T::Version, R::Equal, CmpVal::Int(1))).collect();
    let t = TxnRequest { compare: cmps, ..Default::default() };
    expect_status("129 compares", c.kv.txn(t).await, Code::InvalidArgument, msg)?;
    Ok("129 ops rejected, 128 accepted".into())
}

async fn err_duplicate_key(x: Ctx) -> anyhow::Result<String> {
    let msg = "etcdserver: duplicate key given in txn request";
    let (a, b) = (x.k("a"), x.k("b"));
    let mut cl = x.c.clone();
    let c = &mut cl;
    let t =
        TxnRequest { success: vec![op_put(put(a.clone(), "1")), op_put(put(a.clone(), "2"))], ..Default::default() };
    expect_status("two puts of one key", c.kv.txn(t).await, Code::InvalidArgument, msg)?;
    let t = TxnRequest { success: vec![op_del(del_prefix(&x.p)), op_put(put(b.clone(), "1"))], ..Default::default() };
    expect_status("put inside a deleted range", c.kv.txn(t).await, Code::InvalidArgument, msg)?;
    // Two reads of one key, and a put in success with the same key in failure, are fine.
    let t = TxnRequest {
        success: vec![op_get(get(a.clone())), op_get(get(a.clone())), op_put(put(a.clone(), "1"))],
        failure: vec![op_put(put(a.clone(), "2"))],
        compare: vec![],
    };
    c.kv.txn(t).await.context("reads of a written key and the same key in both branches are allowed")?;
    Ok("puts and put-over-delete".into())
}

async fn err_invalid_sort(x: Ctx) -> anyhow::Result<String> {
    let msg = "etcdserver: invalid sort option";
    let mut cl = x.c.clone();
    let c = &mut cl;
    let r = RangeRequest { sort_order: 7, ..get(x.k("a")) };
    if c.kv.range(r.clone()).await.is_ok() {
        return Ok("skipped: out-of-range sort options are accepted (etcd 3.4 does; 3.5 rejects them)".into());
    }
    expect_status("sort_order 7", c.kv.range(r).await, Code::InvalidArgument, msg)?;
    let r = RangeRequest { sort_target: 9, ..get(x.k("a")) };
    expect_status("sort_target 9", c.kv.range(r).await, Code::InvalidArgument, msg)?;
    Ok("out-of-range sort order and target".into())
}

async fn err_future_revision(x: Ctx) -> anyhow::Result<String> {
    let msg = "etcdserver: mvcc: required revision is a future revision";
    let mut cl = x.c.clone();
    let c = &mut cl;
    let r = current_rev(c).await?;
    let req = RangeRequest { revision: r + 1000, ..get(x.k("a")) };
    expect_status("Range at current + 1000", c.kv.range(req).await, Code::OutOfRange, msg)?;
    let req = RangeRequest { revision: r, ..get(x.k("a")) };
    c.kv.range(req).await.context("Range at the current revision")?;
    Ok(format!("Range at {}", r + 1000))
}

async fn err_compacted(x: Ctx) -> anyhow::Result<String> {
    if !x.allow_compact {
        return Ok("skipped: compaction is global; pass --allow-compact".into());
    }
    let msg = "etcdserver: mvcc: required revision has been compacted";
    let k = x.k("k");
    let mut cl = x.c.clone();
    let c = &mut cl;
    let r1 = put_rev(c, put(k.clone(), "1")).await?;
    let r2 = put_rev(c, put(k.clone(), "2")).await?;
    c.kv.compact(CompactionRequest { revision: r2, physical: true }).await.context("Compact")?;
    let req = RangeRequest { revision: r1, ..get(k.clone()) };
    expect_status("Range below the compaction", c.kv.range(req).await, Code::OutOfRange, msg)?;
    let req = RangeRequest { revision: r2, ..get(k.clone()) };
    let g = c.kv.range(req).await.context("Range at the compaction revision")?.into_inner();
    ensure!(g.kvs.first().map(|kv| kv.value.as_slice()) == Some(b"2"), "read at the compaction revision: {g:?}");
    expect_status(
        "Compact again at the same revision",
        c.kv.compact(CompactionRequest { revision: r2, physical: false }).await,
        Code::OutOfRange,
        msg,
    )?;
    let cur = current_rev(c).await?;
    expect_status(
        "Compact beyond the current revision",
        c.kv.compact(CompactionRequest { revision: cur + 100, physical: false }).await,
        Code::OutOfRange,
        "etcdserver: mvcc: required revision is a future revision",
    )?;
    // A watch from a compacted revision is canceled with the compact revision, not an RPC error.
    let mut w = WatchStream::open(c).await?;
    w.create(WatchCreateRequest { key: k.clone(), start_revision: r1, ..Default::default() }).await?;
    let mut got = Vec::new();
    while let Some(r) = w.next(Duration::from_secs(3)).await? {
        let done = r.canceled;
        got.push(r);
        if done {
            break;
        }
    }
    let last = got.last().context("no watch response")?;
    // etcd 3.5 gives the reason; 3.4 leaves cancel_reason empty.
    ensure!(
        last.canceled && last.compact_revision == r2 && (last.cancel_reason == msg || last.cancel_reason.is_empty()),
        "watch from {r1} after compaction at {r2}: {got:?}"
    );
    Ok(format!("compacted at {r2}"))
}

async fn err_lease_not_found(x: Ctx) -> anyhow::Result<String> {
    let msg = "etcdserver: requested lease not found";
    let mut cl = x.c.clone();
    let c = &mut cl;
    let id = 0x0c0f_fee0_0000_0000 | (rand::random::<u32>() as i64);
    let p = PutRequest { lease: id, ..put(x.k("a"), "v") };
    expect_status("Put with an unknown lease", c.kv.put(p).await, Code::NotFound, msg)?;
    let t = TxnRequest { success: vec![op_put(PutRequest { lease: id, ..put(x.k("a"), "v") })], ..Default::default() };
    expect_status("Txn put with an unknown lease", c.kv.txn(t).await, Code::NotFound, msg)?;
    expect_status(
        "LeaseRevoke of an unknown lease",
        c.lease.lease_revoke(LeaseRevokeRequest { id }).await,
        Code::NotFound,
        msg,
    )?;
    let t = c.lease.lease_time_to_live(LeaseTimeToLiveRequest { id, keys: true }).await?.into_inner();
    ensure!(t.ttl == -1 && t.id == id, "TimeToLive of an unknown lease: TTL {} ID {}", t.ttl, t.id);
    let g = LeaseGrantRequest { ttl: 9_000_000_001, id: 0 };
    expect_status(
        "LeaseGrant over the max TTL",
        c.lease.lease_grant(g).await,
        Code::OutOfRange,
        "etcdserver: too large lease TTL",
    )?;
    Ok("Put, Txn, Revoke, TimeToLive (-1), too large TTL".into())
}

async fn err_ignore_rules(x: Ctx) -> anyhow::Result<String> {
    let k = x.k("k");
    let mut cl = x.c.clone();
    let c = &mut cl;
    let p = PutRequest { ignore_value: true, ..put(k.clone(), "") };
    expect_status(
        "ignore_value on a missing key",
        c.kv.put(p).await,
        Code::InvalidArgument,
        "etcdserver: key not found",
    )?;
    let p = PutRequest { ignore_lease: true, ..put(k.clone(), "v") };
    expect_status(
        "ignore_lease on a missing key",
        c.kv.put(p).await,
        Code::InvalidArgument,
        "etcdserver: key not found",
    )?;
    let p = PutRequest { ignore_value: true, ..put(k.clone(), "v") };
    expect_status(
        "ignore_value with a value",
        c.kv.put(p).await,
        Code::InvalidArgument,
        "etcdserver: value is provided",
    )?;
    let p = PutRequest { ignore_lease: true, lease: 5, ..put(k.clone(), "v") };
    expect_status(
        "ignore_lease with a lease",
        c.kv.put(p).await,
        Code::InvalidArgument,
        "etcdserver: lease is provided",
    )?;
    let t = TxnRequest {
        success: vec![op_put(PutRequest { ignore_value: true, ..put(k.clone(), "") })],
        ..Default::default()
    };
    expect_status(
        "ignore_value on a missing key in a txn",
        c.kv.txn(t).await,
        Code::InvalidArgument,
        "etcdserver: key not found",
    )?;
    Ok("key not found, value/lease is provided".into())
}

// ---- Watch ----

fn ev_summary(evs: &[cairn_proto::mvccpb::Event], p: &str) -> Vec<String> {
    evs.iter()
        .map(|e| {
            let kv = e.kv.clone().unwrap_or_default();
            let t = if e.r#type == EventType::Delete as i32 { "DELETE" } else { "PUT" };
            let prev = e.prev_kv.as_ref().map(|p| format!(" prev={}", lossy(&p.value))).unwrap_or_default();
            format!(
                "{t} {}={}@{}{prev}",
                lossy(&kv.key).strip_prefix(p).unwrap_or("?"),
                lossy(&kv.value),
                kv.mod_revision
            )
        })
        .collect()
}

async fn created(w: &mut WatchStream) -> anyhow::Result<WatchResponse> {
    let r = w.next(Duration::from_secs(5)).await?.context("no created response within 5 s")?;
    ensure!(r.created && !r.canceled && r.events.is_empty(), "first response must be 'created': {r:?}");
    Ok(r)
}

async fn watch_history(x: Ctx) -> anyhow::Result<String> {
    let k = x.k("k");
    let p = x.p.clone();
    let mut cl = x.c.clone();
    let c = &mut cl;
    let r1 = put_rev(c, put(k.clone(), "v1")).await?;
    let r2 = put_rev(c, put(k.clone(), "v2")).await?;
    let r3 = rev(&c.kv.delete_range(del(k.clone())).await?.into_inner().header);
    let mut w = WatchStream::open(c).await?;
    w.create(WatchCreateRequest { key: k.clone(), start_revision: r1, prev_kv: true, ..Default::default() }).await?;
    let cr = created(&mut w).await?;
    let evs = w.events(3, Duration::from_secs(5)).await?;
    let want = vec![format!("PUT k=v1@{r1}"), format!("PUT k=v2@{r2} prev=v1"), format!("DELETE k=@{r3} prev=v2")];
    ensure!(ev_summary(&evs, &p) == want, "replay from {r1}: {:?}, want {want:?}", ev_summary(&evs, &p));
    let del = &evs[2].kv.clone().unwrap_or_default();
    ensure!((del.version, del.create_revision) == (0, 0), "a delete event's kv has version 0, create 0: {del:?}");
    // A live event after the replay, on the same watch.
    let r4 = put_rev(c, put(k.clone(), "v3")).await?;
    let evs = w.events(1, Duration::from_secs(5)).await?;
    ensure!(ev_summary(&evs, &p) == [format!("PUT k=v3@{r4}")], "live event: {:?}", ev_summary(&evs, &p));
    Ok(format!("watch id {}, replay of 3 + 1 live", cr.watch_id))
}

async fn watch_filters(x: Ctx) -> anyhow::Result<String> {
    let k = x.k("k");
    let p = x.p.clone();
    let mut cl = x.c.clone();
    let c = &mut cl;
    let r1 = put_rev(c, put(k.clone(), "v1")).await?;
    let r2 = rev(&c.kv.delete_range(del(k.clone())).await?.into_inner().header);
    let r3 = put_rev(c, put(k.clone(), "v2")).await?;
    for (filter, want) in [
        (FilterType::Noput, vec![format!("DELETE k=@{r2}")]),
        (FilterType::Nodelete, vec![format!("PUT k=v1@{r1}"), format!("PUT k=v2@{r3}")]),
    ] {
        let mut w = WatchStream::open(c).await?;
        let req = WatchCreateRequest {
            key: k.clone(),
            start_revision: r1,
            filters: vec![filter as i32],
            ..Default::default()
        };
        w.create(req).await?;
        created(&mut w).await?;
        let evs = w.events(want.len(), Duration::from_secs(5)).await?;
        ensure!(ev_summary(&evs, &p) == want, "{filter:?}: {:?}, want {want:?}", ev_summary(&evs, &p));
        // Nothing more arrives.
        let more = w.events(1, Duration::from_millis(400)).await?;
        ensure!(more.is_empty(), "{filter:?}: unexpected {:?}", ev_summary(&more, &p));
    }
    Ok("NOPUT, NODELETE".into())
}

async fn watch_prefix_cancel(x: Ctx) -> anyhow::Result<String> {
    let wp = format!("{}w/", x.p);
    let p = x.p.clone();
    let mut cl = x.c.clone();
    let c = &mut cl;
    let mut w = WatchStream::open(c).await?;
    w.create(WatchCreateRequest {
        key: wp.clone().into(),
        range_end: prefix_end(wp.as_bytes()),
        watch_id: 0,
        ..Default::default()
    })
    .await?;
    let id = created(&mut w).await?.watch_id;
    let r1 = put_rev(c, put(format!("{wp}a"), "1")).await?;
    put_rev(c, put(format!("{p}outside"), "x")).await?;
    let r3 = put_rev(c, put(format!("{wp}b"), "2")).await?;
    let evs = w.events(2, Duration::from_secs(5)).await?;
    let want = [format!("PUT w/a=1@{r1}"), format!("PUT w/b=2@{r3}")];
    ensure!(ev_summary(&evs, &p) == want, "prefix watch: {:?}, want {want:?}", ev_summary(&evs, &p));
    w.send(watch_request::RequestUnion::CancelRequest(WatchCancelRequest { watch_id: id })).await?;
    let r = w.next(Duration::from_secs(5)).await?.context("no cancel response")?;
    ensure!(r.canceled && r.watch_id == id && r.events.is_empty(), "cancel response: {r:?}");
    put_rev(c, put(format!("{wp}c"), "3")).await?;
    let more = w.events(1, Duration::from_millis(500)).await?;
    ensure!(more.is_empty(), "events after cancel: {:?}", ev_summary(&more, &p));
    Ok(format!("watch id {id}"))
}

async fn watch_progress(x: Ctx) -> anyhow::Result<String> {
    let k = x.k("k");
    let mut cl = x.c.clone();
    let c = &mut cl;
    let r1 = put_rev(c, put(k.clone(), "v")).await?;
    let mut w = WatchStream::open(c).await?;
    w.create(WatchCreateRequest { key: k.clone(), ..Default::default() }).await?;
    created(&mut w).await?;
    w.send(watch_request::RequestUnion::ProgressRequest(WatchProgressRequest {})).await?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let Some(r) = w.next(Duration::from_secs(5)).await? else {
            break;
        };
        if r.events.is_empty() && !r.created && !r.canceled {
            ensure!(rev(&r.header) >= r1, "progress revision {} < {r1}", rev(&r.header));
            return Ok(format!("progress at {} (watch id {})", rev(&r.header), r.watch_id));
        }
    }
    bail!("no progress response to a WatchProgressRequest within 5 s")
}

// ---- Lease ----

async fn lease_grant(x: Ctx) -> anyhow::Result<String> {
    let (a, b) = (x.k("a"), x.k("b"));
    let mut cl = x.c.clone();
    let c = &mut cl;
    let id = 0x3a00_0000_0000_0000 | (rand::random::<u32>() as i64);
    let g = c.lease.lease_grant(LeaseGrantRequest { ttl: 60, id }).await?.into_inner();
    let res: anyhow::Result<()> = async {
        ensure!((g.id, g.ttl, g.error.as_str()) == (id, 60, ""), "grant with an ID: {g:?}");
        expect_status(
            "granting an existing ID",
            c.lease.lease_grant(LeaseGrantRequest { ttl: 60, id }).await,
            Code::FailedPrecondition,
            "etcdserver: lease already exists",
        )?;
        c.kv.put(PutRequest { lease: id, ..put(a.clone(), "1") }).await?;
        c.kv.put(PutRequest { lease: id, ..put(b.clone(), "2") }).await?;
        let t = c.lease.lease_time_to_live(LeaseTimeToLiveRequest { id, keys: true }).await?.into_inner();
        let mut ks = t.keys.clone();
        ks.sort();
        ensure!(t.id == id && t.granted_ttl == 60 && (58..=60).contains(&t.ttl), "TimeToLive: {t:?}");
        ensure!(
            ks == vec![a.clone(), b.clone()],
            "TimeToLive keys: {:?}",
            t.keys.iter().map(|k| lossy(k)).collect::<Vec<_>>()
        );
        let t = c.lease.lease_time_to_live(LeaseTimeToLiveRequest { id, keys: false }).await?.into_inner();
        ensure!(t.keys.is_empty(), "TimeToLive without keys lists keys: {t:?}");
        let l = c.lease.lease_leases(LeaseLeasesRequest {}).await?.into_inner();
        ensure!(l.leases.iter().any(|s| s.id == id), "LeaseLeases does not list {id}");
        let r0 = current_rev(c).await?;
        let rv = c.lease.lease_revoke(LeaseRevokeRequest { id }).await?.into_inner();
        ensure!(
            rev(&rv.header) == r0 + 1,
            "revoking a lease with keys takes one revision: {r0} -> {}",
            rev(&rv.header)
        );
        let g = c.kv.range(get_prefix(&x.p)).await?.into_inner();
        ensure!(g.count == 0, "keys of a revoked lease remain: {:?}", keys(&g.kvs, &x.p));
        let t = c.lease.lease_time_to_live(LeaseTimeToLiveRequest { id, keys: true }).await?.into_inner();
        ensure!(t.ttl == -1, "TimeToLive after revoke: {t:?}");
        // A server-chosen ID is positive.
        let g = c.lease.lease_grant(LeaseGrantRequest { ttl: 30, id: 0 }).await?.into_inner();
        ensure!(g.id > 0 && g.ttl == 30, "grant without ID: {g:?}");
        c.lease.lease_revoke(LeaseRevokeRequest { id: g.id }).await?;
        Ok(())
    }
    .await;
    let _ = c.lease.lease_revoke(LeaseRevokeRequest { id }).await;
    res?;
    Ok(format!("lease {id:x}"))
}

async fn lease_keepalive(x: Ctx) -> anyhow::Result<String> {
    let mut cl = x.c.clone();
    let c = &mut cl;
    let id = c.lease.lease_grant(LeaseGrantRequest { ttl: 20, id: 0 }).await?.into_inner().id;
    let res: anyhow::Result<()> = async {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let t = c.lease.lease_time_to_live(LeaseTimeToLiveRequest { id, keys: false }).await?.into_inner();
        ensure!(t.ttl < 20, "TTL did not go down after 1.1 s: {t:?}");
        let mut ka = KeepAlive::open(c).await?;
        let r = ka.ping(id).await?;
        ensure!((r.id, r.ttl) == (id, 20), "keep-alive response: {r:?}");
        let t = c.lease.lease_time_to_live(LeaseTimeToLiveRequest { id, keys: false }).await?.into_inner();
        ensure!((19..=20).contains(&t.ttl), "TTL after keep-alive: {t:?}");
        let r = ka.ping(id).await?;
        ensure!((r.id, r.ttl) == (id, 20), "second keep-alive on the stream: {r:?}");
        let unknown = 0x0dea_d000_0000_0000 | (rand::random::<u32>() as i64);
        let r = ka.ping(unknown).await?;
        ensure!((r.id, r.ttl) == (unknown, 0), "keep-alive of an unknown lease answers TTL 0: {r:?}");
        Ok(())
    }
    .await;
    let _ = c.lease.lease_revoke(LeaseRevokeRequest { id }).await;
    res?;
    Ok("renews to the granted TTL; unknown lease TTL 0".into())
}

async fn lease_expiry(x: Ctx) -> anyhow::Result<String> {
    let k = x.k("k");
    let p = x.p.clone();
    let mut cl = x.c.clone();
    let c = &mut cl;
    let g = c.lease.lease_grant(LeaseGrantRequest { ttl: 2, id: 0 }).await?.into_inner();
    let r1 = put_rev(c, PutRequest { lease: g.id, ..put(k.clone(), "v") }).await?;
    let mut w = WatchStream::open(c).await?;
    w.create(WatchCreateRequest { key: k.clone(), start_revision: r1 + 1, ..Default::default() }).await?;
    created(&mut w).await?;
    let start = Instant::now();
    let evs = w.events(1, Duration::from_secs(12)).await?;
    let took = start.elapsed();
    ensure!(
        evs.len() == 1 && evs[0].r#type == EventType::Delete as i32,
        "no delete event within 12 s: {:?}",
        ev_summary(&evs, &p)
    );
    let g2 = c.kv.range(get(k.clone())).await?.into_inner();
    ensure!(g2.count == 0, "key of an expired lease remains");
    let t = c.lease.lease_time_to_live(LeaseTimeToLiveRequest { id: g.id, keys: false }).await?.into_inner();
    ensure!(t.ttl == -1, "TimeToLive of an expired lease: {t:?}");
    Ok(format!("granted TTL {}, key deleted after {:.1} s", g.ttl, took.as_secs_f64()))
}
