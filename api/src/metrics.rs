//! Prometheus metrics at `/metrics` (client port and `--listen-metrics-urls`), with etcd's
//! series names for what Cairn can report honestly:
//!
//! - `etcd_mvcc_{range,put,delete,txn}_total` (and etcd 3.4's `etcd_debugging_mvcc_*` twins):
//!   counted by the KV service per request the way etcd 3.4's mvcc layer counts them (a
//!   compare and a `prev_kv` read are ranges; an mvcc txn with more than one operation counts
//!   as a txn; a Txn's compares run in a read txn of their own). Not counted: deletes of a
//!   lease's keys on revoke or expiry, the read behind `/health`, and compares after the first
//!   failing one (etcd stops there; Cairn counts them all).
//! - `etcd_debugging_mvcc_keys_total`, `etcd_mvcc_db_total_size_in_bytes`,
//!   `etcd_mvcc_db_total_size_in_use_in_bytes`, `etcd_server_has_leader`, `etcd_server_is_leader`,
//!   `etcd_server_leader_changes_seen_total`: read from the backend when scraped (leader changes
//!   are the changes seen between scrapes and at start).
//! - `etcd_server_version`, `etcd_cluster_version`.
//! - `grpc_server_started_total` and `grpc_server_handled_total` by service, method, type and
//!   code, as go-grpc-prometheus reports them (every method pre-registered; a stream the client
//!   cancels counts as `Canceled`), the JSON gateway's calls included; the KV, Lease and Watch
//!   calls Lock and Election make in-process are not counted (etcd's do not pass its gRPC
//!   server either).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use cairn_backend::{Backend, KeyRange, RangeRequest};
use cairn_proto::etcdserverpb as pb;
use http_body::Frame;
use prometheus::{Encoder as _, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

/// Every gRPC method Cairn serves, with go-grpc-prometheus's type.
const METHODS: &[(&str, &str, &str)] = &[
    ("etcdserverpb.KV", "Range", "unary"),
    ("etcdserverpb.KV", "Put", "unary"),
    ("etcdserverpb.KV", "DeleteRange", "unary"),
    ("etcdserverpb.KV", "Txn", "unary"),
    ("etcdserverpb.KV", "Compact", "unary"),
    ("etcdserverpb.Watch", "Watch", "bidi_stream"),
    ("etcdserverpb.Lease", "LeaseGrant", "unary"),
    ("etcdserverpb.Lease", "LeaseRevoke", "unary"),
    ("etcdserverpb.Lease", "LeaseKeepAlive", "bidi_stream"),
    ("etcdserverpb.Lease", "LeaseTimeToLive", "unary"),
    ("etcdserverpb.Lease", "LeaseLeases", "unary"),
    ("etcdserverpb.Cluster", "MemberAdd", "unary"),
    ("etcdserverpb.Cluster", "MemberRemove", "unary"),
    ("etcdserverpb.Cluster", "MemberUpdate", "unary"),
    ("etcdserverpb.Cluster", "MemberList", "unary"),
    ("etcdserverpb.Cluster", "MemberPromote", "unary"),
    ("etcdserverpb.Maintenance", "Alarm", "unary"),
    ("etcdserverpb.Maintenance", "Status", "unary"),
    ("etcdserverpb.Maintenance", "Defragment", "unary"),
    ("etcdserverpb.Maintenance", "Hash", "unary"),
    ("etcdserverpb.Maintenance", "HashKV", "unary"),
    ("etcdserverpb.Maintenance", "Snapshot", "server_stream"),
    ("etcdserverpb.Maintenance", "MoveLeader", "unary"),
    ("etcdserverpb.Auth", "AuthEnable", "unary"),
    ("etcdserverpb.Auth", "AuthDisable", "unary"),
    ("etcdserverpb.Auth", "AuthStatus", "unary"),
    ("etcdserverpb.Auth", "Authenticate", "unary"),
    ("etcdserverpb.Auth", "UserAdd", "unary"),
    ("etcdserverpb.Auth", "UserGet", "unary"),
    ("etcdserverpb.Auth", "UserList", "unary"),
    ("etcdserverpb.Auth", "UserDelete", "unary"),
    ("etcdserverpb.Auth", "UserChangePassword", "unary"),
    ("etcdserverpb.Auth", "UserGrantRole", "unary"),
    ("etcdserverpb.Auth", "UserRevokeRole", "unary"),
    ("etcdserverpb.Auth", "RoleAdd", "unary"),
    ("etcdserverpb.Auth", "RoleGet", "unary"),
    ("etcdserverpb.Auth", "RoleList", "unary"),
    ("etcdserverpb.Auth", "RoleDelete", "unary"),
    ("etcdserverpb.Auth", "RoleGrantPermission", "unary"),
    ("etcdserverpb.Auth", "RoleRevokePermission", "unary"),
    ("v3lockpb.Lock", "Lock", "unary"),
    ("v3lockpb.Lock", "Unlock", "unary"),
    ("v3electionpb.Election", "Campaign", "unary"),
    ("v3electionpb.Election", "Proclaim", "unary"),
    ("v3electionpb.Election", "Leader", "unary"),
    ("v3electionpb.Election", "Observe", "server_stream"),
    ("v3electionpb.Election", "Resign", "unary"),
];

/// gRPC code names as go-grpc-prometheus writes them (grpc-go's `codes.Code.String()`).
const CODES: &[&str] = &[
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// MVCC operation counts of one request, as etcd's metricsTxnWrite sees them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpCounts {
    pub ranges: u64,
    pub puts: u64,
    pub deletes: u64,
}

impl OpCounts {
    fn put(&mut self, p: &pb::PutRequest) {
        self.puts += 1;
        if p.prev_kv || p.ignore_value || p.ignore_lease {
            self.ranges += 1;
        }
    }

    fn delete(&mut self, d: &pb::DeleteRangeRequest) {
        self.deletes += 1;
        if d.prev_kv {
            self.ranges += 1;
        }
    }

    /// A txn as etcd 3.4 applies it: the compares (nested ones on the path taken included)
    /// are ranges in a read txn of their own, then the ops of the branches taken run in a
    /// write txn; a txn without puts or deletes does both in one read txn. The groups, each
    /// one mvcc txn.
    pub fn txn_groups(req: &pb::TxnRequest, resp: &pb::TxnResponse) -> Vec<OpCounts> {
        let (mut compares, mut ops) = (0, OpCounts::default());
        ops.walk(req, resp, &mut compares);
        if has_writes(req) {
            vec![OpCounts { ranges: compares, ..Default::default() }, ops]
        } else {
            vec![OpCounts { ranges: compares + ops.ranges, ..ops }]
        }
    }

    fn walk(&mut self, req: &pb::TxnRequest, resp: &pb::TxnResponse, compares: &mut u64) {
        use pb::request_op::Request as Q;
        use pb::response_op::Response as A;
        *compares += req.compare.len() as u64;
        let branch = if resp.succeeded { &req.success } else { &req.failure };
        for (op, out) in branch.iter().zip(&resp.responses) {
            match (&op.request, &out.response) {
                (Some(Q::RequestRange(_)), _) => self.ranges += 1,
                (Some(Q::RequestPut(p)), _) => self.put(p),
                (Some(Q::RequestDeleteRange(d)), _) => self.delete(d),
                (Some(Q::RequestTxn(t)), Some(A::ResponseTxn(r))) => self.walk(t, r, compares),
                _ => {}
            }
        }
    }

    pub fn of_put(p: &pb::PutRequest) -> Self {
        let mut c = Self::default();
        c.put(p);
        c
    }

    pub fn of_delete(d: &pb::DeleteRangeRequest) -> Self {
        let mut c = Self::default();
        c.delete(d);
        c
    }

    pub fn of_range() -> Self {
        Self { ranges: 1, ..Self::default() }
    }
}

/// Whether any branch of the txn, nested ones included, puts or deletes (etcd's
/// `!isTxnReadonly`).
fn has_writes(t: &pb::TxnRequest) -> bool {
    use pb::request_op::Request as Q;
    t.success.iter().chain(&t.failure).any(|op| match &op.request {
        Some(Q::RequestPut(_) | Q::RequestDeleteRange(_)) => true,
        Some(Q::RequestTxn(inner)) => has_writes(inner),
        _ => false,
    })
}

/// The registry and every series; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    backend: Arc<dyn Backend>,
    member_id: u64,
    ranges: [IntCounter; 2],
    puts: [IntCounter; 2],
    deletes: [IntCounter; 2],
    txns: [IntCounter; 2],
    keys: IntGauge,
    db_size: IntGauge,
    db_size_in_use: IntGauge,
    has_leader: IntGauge,
    is_leader: IntGauge,
    leader_changes: IntCounter,
    last_leader: Mutex<Option<u64>>,
    /// Each of [`METHODS`]' `grpc_server_started_total` and its `grpc_server_handled_total` by
    /// code (index: the gRPC code), looked up once here rather than by labels on each call.
    calls: Vec<CallCounters>,
}

struct CallCounters {
    started: IntCounter,
    handled: Vec<IntCounter>,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric name");
    registry.register(Box::new(c.clone())).expect("unique metric name");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric name");
    registry.register(Box::new(g.clone())).expect("unique metric name");
    g
}

impl Metrics {
    pub fn new(backend: Arc<dyn Backend>, member_id: u64, version: &str, cluster_version: &str) -> Self {
        let r = Registry::new();
        let pair = |op: &str, help: &str| {
            [
                counter(&r, &format!("etcd_mvcc_{op}_total"), help),
                counter(&r, &format!("etcd_debugging_mvcc_{op}_total"), help),
            ]
        };
        let ranges = pair("range", "Total number of ranges seen by this member.");
        let puts = pair("put", "Total number of puts seen by this member.");
        let deletes = pair("delete", "Total number of deletes seen by this member.");
        let txns = pair("txn", "Total number of txns seen by this member.");
        let keys = gauge(&r, "etcd_debugging_mvcc_keys_total", "Total number of keys.");
        let db_size = gauge(
            &r,
            "etcd_mvcc_db_total_size_in_bytes",
            "Total size of the underlying database physically allocated in bytes.",
        );
        let db_size_in_use = gauge(
            &r,
            "etcd_mvcc_db_total_size_in_use_in_bytes",
            "Total size of the underlying database logically in use in bytes.",
        );
        let has_leader =
            gauge(&r, "etcd_server_has_leader", "Whether or not a leader exists. 1 is existence, 0 is not.");
        let is_leader =
            gauge(&r, "etcd_server_is_leader", "Whether or not this member is a leader. 1 if is, 0 otherwise.");
        let leader_changes = counter(&r, "etcd_server_leader_changes_seen_total", "The number of leader changes seen.");
        let server_version = IntGaugeVec::new(
            Opts::new(
                "etcd_server_version",
                "Which version is running. 1 for 'server_version' label with current version.",
            ),
            &["server_version"],
        )
        .expect("valid metric");
        r.register(Box::new(server_version.clone())).expect("unique metric name");
        server_version.with_label_values(&[version]).set(1);
        let cluster = IntGaugeVec::new(
            Opts::new(
                "etcd_cluster_version",
                "Which version is running. 1 for 'cluster_version' label with current cluster version",
            ),
            &["cluster_version"],
        )
        .expect("valid metric");
        r.register(Box::new(cluster.clone())).expect("unique metric name");
        cluster.with_label_values(&[cluster_version]).set(1);
        let started = IntCounterVec::new(
            Opts::new("grpc_server_started_total", "Total number of RPCs started on the server."),
            &["grpc_method", "grpc_service", "grpc_type"],
        )
        .expect("valid metric");
        let handled = IntCounterVec::new(
            Opts::new(
                "grpc_server_handled_total",
                "Total number of RPCs completed on the server, regardless of success or failure.",
            ),
            &["grpc_code", "grpc_method", "grpc_service", "grpc_type"],
        )
        .expect("valid metric");
        r.register(Box::new(started.clone())).expect("unique metric name");
        r.register(Box::new(handled.clone())).expect("unique metric name");
        // go-grpc-prometheus's InitializeMetrics: every method and code starts at 0.
        let calls = METHODS
            .iter()
            .map(|(service, method, kind)| CallCounters {
                started: started.with_label_values(&[method, service, kind]),
                handled: CODES.iter().map(|code| handled.with_label_values(&[code, method, service, kind])).collect(),
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                registry: r,
                backend,
                member_id,
                ranges,
                puts,
                deletes,
                txns,
                keys,
                db_size,
                db_size_in_use,
                has_leader,
                is_leader,
                leader_changes,
                last_leader: Mutex::new(None),
                calls,
            }),
        }
    }

    /// Counts one request's MVCC operations.
    pub fn record_ops(&self, c: OpCounts) {
        let i = &self.inner;
        i.ranges.iter().for_each(|m| m.inc_by(c.ranges));
        i.puts.iter().for_each(|m| m.inc_by(c.puts));
        i.deletes.iter().for_each(|m| m.inc_by(c.deletes));
        if c.ranges + c.puts + c.deletes > 1 {
            i.txns.iter().for_each(|m| m.inc());
        }
    }

    /// Starts counting one gRPC call to `path` (`/service/method`); `None` for paths that are
    /// no known method.
    pub fn grpc_call(&self, path: &str) -> Option<GrpcCall> {
        let (service, method) = path.strip_prefix('/')?.split_once('/')?;
        let at = METHODS.iter().position(|(s, m, _)| *s == service && *m == method)?;
        self.inner.calls[at].started.inc();
        Some(GrpcCall { metrics: self.clone(), method: at })
    }

    /// The text exposition, with the backend-derived gauges read now.
    pub async fn render(&self) -> String {
        let i = &self.inner;
        if let Ok(st) = i.backend.status().await {
            i.db_size.set(st.db_size);
            i.db_size_in_use.set(st.db_size_in_use);
            let leader = st.leader.or(st.is_leader.then_some(i.member_id));
            i.has_leader.set(i64::from(leader.is_some()));
            i.is_leader.set(i64::from(st.is_leader));
            let mut last = i.last_leader.lock().unwrap_or_else(|e| e.into_inner());
            if leader.is_some() && leader != *last {
                i.leader_changes.inc();
                *last = leader;
            }
        }
        let all = RangeRequest { range: KeyRange::new(vec![0], vec![0]), count_only: true, ..Default::default() };
        if let Ok(resp) = i.backend.range(all).await {
            i.keys.set(resp.count);
        }
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&i.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// One gRPC call being counted; records `grpc_server_handled_total` once.
pub struct GrpcCall {
    metrics: Metrics,
    /// Index in [`METHODS`].
    method: usize,
}

impl GrpcCall {
    /// `code`: the gRPC code, an index in [`CODES`].
    fn finish(self, code: usize) {
        self.metrics.inner.calls[self.method].handled[code].inc();
    }

    /// Records the call from its response: a `grpc-status` in the headers (trailers-only
    /// answer) now, otherwise from the trailers when the body ends, or `Canceled` when the
    /// body is dropped before them.
    pub fn wrap(self, resp: http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body> {
        if let Some(code) = resp.headers().get("grpc-status") {
            self.finish(code_index(code.as_bytes()));
            return resp;
        }
        resp.map(|body| tonic::body::Body::new(MeteredBody { inner: body, call: Some(self) }))
    }
}

const CODE_OK: usize = 0;
const CODE_CANCELED: usize = 1;
const CODE_UNKNOWN: usize = 2;

/// The gRPC code of a `grpc-status` value (an index in [`CODES`]); `Unknown` when it is none.
fn code_index(status: &[u8]) -> usize {
    std::str::from_utf8(status)
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&i| i < CODES.len())
        .unwrap_or(CODE_UNKNOWN)
}

struct MeteredBody {
    inner: tonic::body::Body,
    call: Option<GrpcCall>,
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            call.finish(CODE_CANCELED);
        }
    }
}

impl http_body::Body for MeteredBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(|t| t.get("grpc-status")) {
                    let code = code_index(code.as_bytes());
                    if let Some(call) = self.call.take() {
                        call.finish(code);
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(call) = self.call.take() {
                    call.finish(CODE_OK);
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txn_counts_are_etcd_34s() {
        use pb::request_op::Request as Q;
        use pb::response_op::Response as A;
        let put =
            pb::RequestOp { request: Some(Q::RequestPut(pb::PutRequest { prev_kv: true, ..Default::default() })) };
        let get = pb::RequestOp { request: Some(Q::RequestRange(pb::RangeRequest::default())) };
        let req =
            pb::TxnRequest { compare: vec![pb::Compare::default()], success: vec![put], failure: vec![get.clone()] };
        let ok = pb::TxnResponse {
            succeeded: true,
            responses: vec![pb::ResponseOp { response: Some(A::ResponsePut(pb::PutResponse::default())) }],
            ..Default::default()
        };
        // The compare in a read txn, then the put and its prev_kv read in a write txn.
        assert_eq!(
            OpCounts::txn_groups(&req, &ok),
            [OpCounts { ranges: 1, puts: 0, deletes: 0 }, OpCounts { ranges: 1, puts: 1, deletes: 0 }]
        );
        let read_only = pb::TxnRequest { compare: vec![pb::Compare::default()], success: vec![get], failure: vec![] };
        let ok = pb::TxnResponse {
            succeeded: true,
            responses: vec![pb::ResponseOp { response: Some(A::ResponseRange(pb::RangeResponse::default())) }],
            ..Default::default()
        };
        assert_eq!(OpCounts::txn_groups(&read_only, &ok), [OpCounts { ranges: 2, puts: 0, deletes: 0 }]);
    }

    #[test]
    fn grpc_status_names_are_grpc_gos() {
        assert_eq!(CODES[code_index(b"0")], "OK");
        assert_eq!(CODES[code_index(b"1")], "Canceled");
        assert_eq!(CODES[code_index(b"2")], "Unknown");
        assert_eq!(CODES[code_index(b"16")], "Unauthenticated");
        assert_eq!(CODES[code_index(b"17")], "Unknown");
        assert_eq!(CODES[code_index(b"x")], "Unknown");
    }
}
