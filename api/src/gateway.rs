//! etcd's JSON gRPC gateway on the client port (`POST /v3/kv/range` and the rest, also under
//! `/v3beta/` and `/v3alpha/`), as etcd's grpc-gateway v1 serves it.
//!
//! A request's JSON body is decoded into the gRPC request message (proto3 JSON with proto field
//! names, via the serde impls `pbjson-build` generates in `cairn_proto`) and sent to the *same*
//! tonic services the gRPC port serves, in-process through a [`Routes`] used as a gRPC client
//! transport: validation, auth (the `Authorization` header becomes the `authorization`
//! metadata, as in grpc-gateway), quotas and errors are the gRPC path's. The answer is written
//! back as JSON: 64-bit integers as strings, bytes as base64, enums by name, default values
//! left out. Errors are grpc-gateway v1's: the HTTP status from the gRPC code and
//! `{"error":MSG,"message":MSG,"code":CODE}`. Streaming calls (`/v3/watch`,
//! `/v3/lease/keepalive`, `/v3/maintenance/snapshot`, `/v3/election/observe`) answer with one
//! `{"result":{...}}` per message, each followed by a newline; a body may carry several request
//! objects one after the other.
//!
//! etcd's gateway reaches its gRPC server over one client connection, so the server's
//! `--max-concurrent-streams` bounds how many gateway calls run at once: a call beyond it waits
//! until another ends (etcd's e2e v3_curl_maxstream_test.go relies on that). The gateway keeps
//! the same bound with a semaphore: each call holds a permit until its answer (or its stream)
//! ends.
//!
//! As in etcd, where gateway calls pass through the gRPC server, they count in
//! `grpc_server_started_total` / `grpc_server_handled_total`.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use cairn_proto::{etcdserverpb as pb, v3electionpb as el, v3lockpb as lk};
use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use http::uri::PathAndQuery;
use http::{HeaderMap, Response, StatusCode};
use http_body::Frame;
use http_body_util::{Full, StreamBody};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tonic::client::Grpc;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::service::Routes;
use tonic::{Code, Status};
use cairn_proto::codec::Codec;

use crate::metrics::Metrics;

/// The gateway: the in-process gRPC services it forwards to.
/// The in-process services, counting each call in the gRPC metrics when given.
#[derive(Clone, Default)]
struct Upstream {
    routes: Routes,
    metrics: Option<Metrics>,
}

impl tower_service::Service<http::Request<Body>> for Upstream {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
        tower_service::Service::<http::Request<Body>>::poll_ready(&mut self.routes, cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let call = self.metrics.as_ref().and_then(|m| m.grpc_call(req.uri().path()));
        let answer = self.routes.call(req);
        Box::pin(async move {
            let resp = answer.await?;
            Ok(match call {
                Some(call) => call.wrap(resp),
                None => resp,
            })
        })
    }
}

#[derive(Clone)]
pub struct Gateway {
    routes: Upstream,
    /// --max-concurrent-streams, as a bound on calls in flight (none: unbounded).
    streams: Option<Arc<Semaphore>>,
}

/// What a gateway call needs from the HTTP request.
struct Call {
    metadata: MetadataMap,
    body: Bytes,
    /// This call's share of --max-concurrent-streams, held until it ends.
    permit: Option<OwnedSemaphorePermit>,
}

type Answer = BoxFuture<'static, Response<Body>>;

impl Gateway {
    /// `routes` must hold every service the gateway maps (KV, Watch, Lease, Cluster,
    /// Maintenance, Auth, Lock, Election).
    pub fn new(routes: Routes) -> Self {
        Self { routes: Upstream { routes, metrics: None }, streams: None }
    }

    /// Counts the gateway's calls in `metrics`' gRPC series.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.routes.metrics = Some(metrics);
        self
    }

    /// Bounds the calls in flight at once to `max_concurrent_streams`, as etcd's gateway
    /// connection to its own gRPC server is.
    pub fn with_stream_limit(mut self, max_concurrent_streams: Option<u32>) -> Self {
        self.streams = max_concurrent_streams.map(|n| Arc::new(Semaphore::new(n as usize)));
        self
    }

    /// True for the paths the gateway owns (everything under `/v3/`, `/v3beta/`, `/v3alpha/`).
    pub fn owns(path: &str) -> bool {
        canonical(path).is_some()
    }

    /// Answers one HTTP request for a path [`Gateway::owns`].
    pub async fn handle(&self, method: &http::Method, path: &str, headers: &HeaderMap, body: Bytes) -> Response<Body> {
        let Some(path) = canonical(path) else {
            return with_cors(plain(StatusCode::NOT_FOUND, "Not Found\n"));
        };
        if !is_method(&path) {
            return with_cors(plain(StatusCode::NOT_FOUND, "Not Found\n"));
        }
        if method != http::Method::POST {
            return with_cors(plain(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n"));
        }
        let permit = match &self.streams {
            Some(streams) => Some(streams.clone().acquire_owned().await.expect("the semaphore is never closed")),
            None => None,
        };
        let call = Call { metadata: metadata_from(headers), body, permit };
        match route(&path, self.routes.clone(), call) {
            Some(answer) => with_cors(answer.await),
            None => with_cors(plain(StatusCode::NOT_FOUND, "Not Found\n")),
        }
    }
}

/// The path with `/v3beta/` or `/v3alpha/` rewritten to `/v3/`; `None` outside the gateway.
fn canonical(path: &str) -> Option<String> {
    if path.starts_with("/v3/") {
        return Some(path.to_string());
    }
    ["/v3beta/", "/v3alpha/"].iter().find_map(|p| path.strip_prefix(p)).map(|rest| format!("/v3/{rest}"))
}

/// Whether the gateway maps `path` (canonical) to a gRPC method.
fn is_method(path: &str) -> bool {
    let probe = Call { metadata: MetadataMap::new(), body: Bytes::new(), permit: None };
    // Building the answer future does not run it.
    route(path, Upstream::default(), probe).is_some()
}

/// The HTTP path's gRPC method, called. `None` for a path no method has.
fn route(path: &str, r: Upstream, c: Call) -> Option<Answer> {
    macro_rules! unary {
        ($grpc:literal, $req:ty, $resp:ty) => {
            Box::pin(unary::<$req, $resp>(r, $grpc, c))
        };
    }
    Some(match path {
        "/v3/kv/range" => unary!("/etcdserverpb.KV/Range", pb::RangeRequest, pb::RangeResponse),
        "/v3/kv/put" => unary!("/etcdserverpb.KV/Put", pb::PutRequest, pb::PutResponse),
        "/v3/kv/deleterange" => {
            unary!("/etcdserverpb.KV/DeleteRange", pb::DeleteRangeRequest, pb::DeleteRangeResponse)
        }
        "/v3/kv/txn" => unary!("/etcdserverpb.KV/Txn", pb::TxnRequest, pb::TxnResponse),
        "/v3/kv/compaction" => unary!("/etcdserverpb.KV/Compact", pb::CompactionRequest, pb::CompactionResponse),
        "/v3/watch" => Box::pin(bidi::<pb::WatchRequest, pb::WatchResponse>(r, "/etcdserverpb.Watch/Watch", c)),
        "/v3/lease/grant" => {
            unary!("/etcdserverpb.Lease/LeaseGrant", pb::LeaseGrantRequest, pb::LeaseGrantResponse)
        }
        "/v3/lease/revoke" | "/v3/kv/lease/revoke" => {
            unary!("/etcdserverpb.Lease/LeaseRevoke", pb::LeaseRevokeRequest, pb::LeaseRevokeResponse)
        }
        "/v3/lease/keepalive" => Box::pin(bidi::<pb::LeaseKeepAliveRequest, pb::LeaseKeepAliveResponse>(
            r,
            "/etcdserverpb.Lease/LeaseKeepAlive",
            c,
        )),
        "/v3/lease/timetolive" | "/v3/kv/lease/timetolive" => {
            unary!("/etcdserverpb.Lease/LeaseTimeToLive", pb::LeaseTimeToLiveRequest, pb::LeaseTimeToLiveResponse)
        }
        "/v3/lease/leases" | "/v3/kv/lease/leases" => {
            unary!("/etcdserverpb.Lease/LeaseLeases", pb::LeaseLeasesRequest, pb::LeaseLeasesResponse)
        }
        "/v3/cluster/member/add" => {
            unary!("/etcdserverpb.Cluster/MemberAdd", pb::MemberAddRequest, pb::MemberAddResponse)
        }
        "/v3/cluster/member/remove" => {
            unary!("/etcdserverpb.Cluster/MemberRemove", pb::MemberRemoveRequest, pb::MemberRemoveResponse)
        }
        "/v3/cluster/member/update" => {
            unary!("/etcdserverpb.Cluster/MemberUpdate", pb::MemberUpdateRequest, pb::MemberUpdateResponse)
        }
        "/v3/cluster/member/list" => {
            unary!("/etcdserverpb.Cluster/MemberList", pb::MemberListRequest, pb::MemberListResponse)
        }
        "/v3/cluster/member/promote" => {
            unary!("/etcdserverpb.Cluster/MemberPromote", pb::MemberPromoteRequest, pb::MemberPromoteResponse)
        }
        "/v3/maintenance/alarm" => unary!("/etcdserverpb.Maintenance/Alarm", pb::AlarmRequest, pb::AlarmResponse),
        "/v3/maintenance/status" => unary!("/etcdserverpb.Maintenance/Status", pb::StatusRequest, pb::StatusResponse),
        "/v3/maintenance/defragment" => {
            unary!("/etcdserverpb.Maintenance/Defragment", pb::DefragmentRequest, pb::DefragmentResponse)
        }
        // Hash and HashKV share this path in etcd's rpc.proto; Hash is registered first and wins.
        "/v3/maintenance/hash" => unary!("/etcdserverpb.Maintenance/Hash", pb::HashRequest, pb::HashResponse),
        "/v3/maintenance/snapshot" => Box::pin(server_stream::<pb::SnapshotRequest, pb::SnapshotResponse>(
            r,
            "/etcdserverpb.Maintenance/Snapshot",
            c,
        )),
        "/v3/maintenance/transfer-leadership" => {
            unary!("/etcdserverpb.Maintenance/MoveLeader", pb::MoveLeaderRequest, pb::MoveLeaderResponse)
        }
        "/v3/auth/enable" => unary!("/etcdserverpb.Auth/AuthEnable", pb::AuthEnableRequest, pb::AuthEnableResponse),
        "/v3/auth/disable" => {
            unary!("/etcdserverpb.Auth/AuthDisable", pb::AuthDisableRequest, pb::AuthDisableResponse)
        }
        "/v3/auth/status" => unary!("/etcdserverpb.Auth/AuthStatus", pb::AuthStatusRequest, pb::AuthStatusResponse),
        "/v3/auth/authenticate" => {
            unary!("/etcdserverpb.Auth/Authenticate", pb::AuthenticateRequest, pb::AuthenticateResponse)
        }
        "/v3/auth/user/add" => unary!("/etcdserverpb.Auth/UserAdd", pb::AuthUserAddRequest, pb::AuthUserAddResponse),
        "/v3/auth/user/get" => unary!("/etcdserverpb.Auth/UserGet", pb::AuthUserGetRequest, pb::AuthUserGetResponse),
        "/v3/auth/user/list" => {
            unary!("/etcdserverpb.Auth/UserList", pb::AuthUserListRequest, pb::AuthUserListResponse)
        }
        "/v3/auth/user/delete" => {
            unary!("/etcdserverpb.Auth/UserDelete", pb::AuthUserDeleteRequest, pb::AuthUserDeleteResponse)
        }
        "/v3/auth/user/changepw" => unary!(
            "/etcdserverpb.Auth/UserChangePassword",
            pb::AuthUserChangePasswordRequest,
            pb::AuthUserChangePasswordResponse
        ),
        "/v3/auth/user/grant" => {
            unary!("/etcdserverpb.Auth/UserGrantRole", pb::AuthUserGrantRoleRequest, pb::AuthUserGrantRoleResponse)
        }
        "/v3/auth/user/revoke" => {
            unary!("/etcdserverpb.Auth/UserRevokeRole", pb::AuthUserRevokeRoleRequest, pb::AuthUserRevokeRoleResponse)
        }
        "/v3/auth/role/add" => unary!("/etcdserverpb.Auth/RoleAdd", pb::AuthRoleAddRequest, pb::AuthRoleAddResponse),
        "/v3/auth/role/get" => unary!("/etcdserverpb.Auth/RoleGet", pb::AuthRoleGetRequest, pb::AuthRoleGetResponse),
        "/v3/auth/role/list" => {
            unary!("/etcdserverpb.Auth/RoleList", pb::AuthRoleListRequest, pb::AuthRoleListResponse)
        }
        "/v3/auth/role/delete" => {
            unary!("/etcdserverpb.Auth/RoleDelete", pb::AuthRoleDeleteRequest, pb::AuthRoleDeleteResponse)
        }
        "/v3/auth/role/grant" => unary!(
            "/etcdserverpb.Auth/RoleGrantPermission",
            pb::AuthRoleGrantPermissionRequest,
            pb::AuthRoleGrantPermissionResponse
        ),
        "/v3/auth/role/revoke" => unary!(
            "/etcdserverpb.Auth/RoleRevokePermission",
            pb::AuthRoleRevokePermissionRequest,
            pb::AuthRoleRevokePermissionResponse
        ),
        "/v3/lock/lock" => unary!("/v3lockpb.Lock/Lock", lk::LockRequest, lk::LockResponse),
        "/v3/lock/unlock" => unary!("/v3lockpb.Lock/Unlock", lk::UnlockRequest, lk::UnlockResponse),
        "/v3/election/campaign" => {
            unary!("/v3electionpb.Election/Campaign", el::CampaignRequest, el::CampaignResponse)
        }
        "/v3/election/proclaim" => {
            unary!("/v3electionpb.Election/Proclaim", el::ProclaimRequest, el::ProclaimResponse)
        }
        "/v3/election/leader" => unary!("/v3electionpb.Election/Leader", el::LeaderRequest, el::LeaderResponse),
        "/v3/election/observe" => {
            Box::pin(server_stream::<el::LeaderRequest, el::LeaderResponse>(r, "/v3electionpb.Election/Observe", c))
        }
        "/v3/election/resign" => unary!("/v3electionpb.Election/Resign", el::ResignRequest, el::ResignResponse),
        _ => return None,
    })
}

/// grpc-gateway's metadata from HTTP headers: `Authorization` as `authorization`, permanent
/// HTTP headers as `grpcgateway-<name>`, `Grpc-Metadata-<name>` as `<name>`, and the host as
/// `x-forwarded-host`.
fn metadata_from(headers: &HeaderMap) -> MetadataMap {
    const PERMANENT: &[&str] = &[
        "accept",
        "accept-charset",
        "accept-language",
        "accept-ranges",
        "authorization",
        "cache-control",
        "content-type",
        "cookie",
        "date",
        "expect",
        "from",
        "host",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-schedule-tag-match",
        "if-unmodified-since",
        "max-forwards",
        "origin",
        "pragma",
        "referer",
        "user-agent",
        "via",
        "warning",
    ];
    let mut md = MetadataMap::new();
    for (name, value) in headers {
        let Ok(value) = value.to_str() else { continue };
        let Ok(value) = MetadataValue::try_from(value) else {
            continue;
        };
        let name = name.as_str();
        if name == "authorization" {
            md.append("authorization", value.clone());
        }
        let key = if PERMANENT.contains(&name) {
            format!("grpcgateway-{name}")
        } else if let Some(rest) = name.strip_prefix("grpc-metadata-") {
            rest.to_string()
        } else {
            continue;
        };
        if let Ok(key) = tonic::metadata::MetadataKey::from_bytes(key.as_bytes()) {
            md.append(key, value);
        }
    }
    if let Some(host) = headers.get("x-forwarded-host").or_else(|| headers.get(http::header::HOST)) {
        if let Ok(Ok(v)) = host.to_str().map(MetadataValue::try_from) {
            md.insert("x-forwarded-host", v);
        }
    }
    md
}

/// Decodes the first JSON value of `body`; an empty body is the default message, as with
/// grpc-gateway (its decoder's io.EOF is not an error).
fn decode_first<T: DeserializeOwned + Default>(body: &[u8]) -> Result<Option<T>, String> {
    let mut values = serde_json::Deserializer::from_slice(body).into_iter::<T>();
    match values.next() {
        None => Ok(None),
        Some(Ok(v)) => Ok(Some(v)),
        Some(Err(e)) => Err(e.to_string()),
    }
}

/// Every JSON value of `body`, in order, up to the first that does not decode.
fn decode_all<T: DeserializeOwned>(body: &[u8]) -> (Vec<T>, Option<String>) {
    let mut out = Vec::new();
    for v in serde_json::Deserializer::from_slice(body).into_iter::<T>() {
        match v {
            Ok(v) => out.push(v),
            Err(e) => return (out, Some(e.to_string())),
        }
    }
    (out, None)
}

async fn client(routes: Upstream) -> Result<Grpc<Upstream>, Status> {
    let mut grpc = Grpc::new(routes);
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    Ok(grpc)
}

fn request<T>(metadata: MetadataMap, msg: T) -> tonic::Request<T> {
    tonic::Request::from_parts(metadata, tonic::Extensions::default(), msg)
}

async fn unary<Req, Resp>(routes: Upstream, path: &'static str, call: Call) -> Response<Body>
where
    Req: prost::Message + DeserializeOwned + Default + Send + 'static,
    Resp: prost::Message + Serialize + Default + Send + 'static,
{
    let msg = match decode_first::<Req>(&call.body) {
        Ok(m) => m.unwrap_or_default(),
        Err(e) => return error(&Status::invalid_argument(e)),
    };
    let result = async {
        let mut grpc = client(routes).await?;
        grpc.unary(request(call.metadata, msg), PathAndQuery::from_static(path), Codec::<Req, Resp>::default())
            .await
    }
    .await;
    match result {
        Ok(resp) => match serde_json::to_vec(resp.get_ref()) {
            Ok(json) => ok_json(Body::new(Full::new(Bytes::from(json)))),
            Err(e) => error(&Status::internal(e.to_string())),
        },
        Err(status) => error(&status),
    }
}

async fn server_stream<Req, Resp>(routes: Upstream, path: &'static str, call: Call) -> Response<Body>
where
    Req: prost::Message + DeserializeOwned + Default + Send + 'static,
    Resp: prost::Message + Serialize + Default + Send + 'static,
{
    let msg = match decode_first::<Req>(&call.body) {
        Ok(m) => m.unwrap_or_default(),
        Err(e) => return error(&Status::invalid_argument(e)),
    };
    let result = async {
        let mut grpc = client(routes).await?;
        grpc.server_streaming(
            request(call.metadata, msg),
            PathAndQuery::from_static(path),
            Codec::<Req, Resp>::default(),
        )
        .await
    }
    .await;
    match result {
        Ok(resp) => forward_stream(resp.into_inner(), call.permit).await,
        Err(status) => stream_error_response(&status),
    }
}

/// A client-and-server streaming call: every JSON object of the body is one request, then the
/// request side is closed (grpc-gateway's CloseSend); the responses stream back. A body whose
/// first object does not decode is refused as grpc-gateway does (code Unknown, HTTP 500).
async fn bidi<Req, Resp>(routes: Upstream, path: &'static str, call: Call) -> Response<Body>
where
    Req: prost::Message + DeserializeOwned + Default + Send + 'static,
    Resp: prost::Message + Serialize + Default + Send + 'static,
{
    let (msgs, err) = decode_all::<Req>(&call.body);
    if msgs.is_empty() {
        if let Some(e) = err {
            return error(&Status::unknown(e));
        }
    }
    let result = async {
        let mut grpc = client(routes).await?;
        grpc.streaming(
            request(call.metadata, futures::stream::iter(msgs)),
            PathAndQuery::from_static(path),
            Codec::<Req, Resp>::default(),
        )
        .await
    }
    .await;
    match result {
        Ok(resp) => forward_stream(resp.into_inner(), call.permit).await,
        Err(status) => stream_error_response(&status),
    }
}

type Chunks = Pin<Box<dyn Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>>;

/// grpc-gateway's ForwardResponseStream: the headers go out with the first message; each
/// message is `{"result":...}` and a newline; an error ends the stream with
/// `{"error":{"grpc_code":..,"http_code":..,"message":..,"http_status":..}}` (with the error's
/// HTTP status when it comes before any message).
async fn forward_stream<Resp>(
    mut inbound: tonic::Streaming<Resp>,
    permit: Option<OwnedSemaphorePermit>,
) -> Response<Body>
where
    Resp: Serialize + Send + 'static,
{
    let first = match inbound.next().await {
        None => return ok_json(Body::empty()),
        Some(Err(status)) => return stream_error_response(&status),
        Some(Ok(m)) => m,
    };
    let head = futures::stream::once(async move { result_chunk(&first) });
    // The permit lives as long as the stream: until it ends or the client goes away.
    let rest = futures::stream::unfold(Some((inbound, permit)), |state| async move {
        let (mut inbound, permit) = state?;
        match inbound.next().await {
            None => None,
            Some(Ok(m)) => Some((result_chunk(&m), Some((inbound, permit)))),
            Some(Err(status)) => Some((stream_error_chunk(&status), None)),
        }
    });
    let chunks: Chunks = Box::pin(head.chain(rest).map(|b| Ok(Frame::data(b))));
    ok_json(Body::new(StreamBody::new(chunks)))
}

fn result_chunk<T: Serialize>(msg: &T) -> Bytes {
    #[derive(Serialize)]
    struct Chunk<'a, T> {
        result: &'a T,
    }
    let mut out = serde_json::to_vec(&Chunk { result: msg }).unwrap_or_default();
    out.push(b'\n');
    Bytes::from(out)
}

fn stream_error_chunk(status: &Status) -> Bytes {
    /// grpc-gateway's internal.StreamError, fields in its order.
    #[derive(Serialize)]
    struct StreamError<'a> {
        grpc_code: i32,
        http_code: u16,
        message: &'a str,
        http_status: &'a str,
    }
    #[derive(Serialize)]
    struct Chunk<'a> {
        error: StreamError<'a>,
    }
    let http = http_status(status.code());
    let error = StreamError {
        grpc_code: status.code() as i32,
        http_code: http.as_u16(),
        message: status.message(),
        http_status: http.canonical_reason().unwrap_or_default(),
    };
    // grpc-gateway writes the error chunk without a delimiter.
    Bytes::from(serde_json::to_vec(&Chunk { error }).unwrap_or_default())
}

fn stream_error_response(status: &Status) -> Response<Body> {
    let mut resp = ok_json(Body::new(Full::new(stream_error_chunk(status))));
    *resp.status_mut() = http_status(status.code());
    resp
}

fn ok_json(body: Body) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header("grpc-metadata-content-type", "application/grpc")
        .body(body)
        .expect("static response parts")
}

/// grpc-gateway v1's DefaultHTTPError.
fn error(status: &Status) -> Response<Body> {
    #[derive(Serialize)]
    struct ErrorBody<'a> {
        error: &'a str,
        message: &'a str,
        code: i32,
    }
    let body = ErrorBody { error: status.message(), message: status.message(), code: status.code() as i32 };
    Response::builder()
        .status(http_status(status.code()))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::new(Full::new(Bytes::from(serde_json::to_vec(&body).unwrap_or_default()))))
        .expect("static response parts")
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header("x-content-type-options", "nosniff")
        .body(Body::new(Full::new(Bytes::from_static(text.as_bytes()))))
        .expect("static response parts")
}

/// etcd's CORS headers (its default `--cors` is `*`), on every HTTP answer of the client port.
pub fn with_cors(mut resp: Response<Body>) -> Response<Body> {
    let h = resp.headers_mut();
    h.insert("access-control-allow-headers", http::HeaderValue::from_static("accept, content-type, authorization"));
    h.insert("access-control-allow-methods", http::HeaderValue::from_static("POST, GET, OPTIONS, PUT, DELETE"));
    h.insert("access-control-allow-origin", http::HeaderValue::from_static("*"));
    resp
}

/// grpc-gateway v1's HTTPStatusFromCode.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beta_and_alpha_paths_are_v3() {
        assert_eq!(canonical("/v3beta/kv/put").as_deref(), Some("/v3/kv/put"));
        assert_eq!(canonical("/v3alpha/watch").as_deref(), Some("/v3/watch"));
        assert_eq!(canonical("/v3/kv/range").as_deref(), Some("/v3/kv/range"));
        assert_eq!(canonical("/v2/keys"), None);
    }

    #[test]
    fn json_is_grpc_gateway_shaped() {
        let req: pb::RangeRequest =
            decode_first(br#"{"key":"Zm9v","limit":"2","sort_order":"DESCEND","revision":3}"#).unwrap().unwrap();
        assert_eq!(req.key, b"foo");
        assert_eq!(req.limit, 2);
        assert_eq!(req.revision, 3);
        assert_eq!(req.sort_order, pb::range_request::SortOrder::Descend as i32);
        let resp = pb::LeaseGrantResponse { id: 5, ttl: 30, ..Default::default() };
        assert_eq!(serde_json::to_string(&resp).unwrap(), r#"{"ID":"5","TTL":"30"}"#);
        assert!(decode_first::<pb::RangeRequest>(b"").unwrap().is_none());
        assert!(decode_first::<pb::RangeRequest>(br#"{"key":1}"#).is_err());
    }

    #[test]
    fn stream_errors_are_grpc_gateway_v1_shaped() {
        let chunk = stream_error_chunk(&Status::unknown("auth: invalid auth token"));
        assert_eq!(
            chunk,
            r#"{"error":{"grpc_code":2,"http_code":500,"message":"auth: invalid auth token","http_status":"Internal Server Error"}}"#
        );
    }

    #[test]
    fn status_mapping_is_grpc_gateway_v1() {
        assert_eq!(http_status(Code::FailedPrecondition), StatusCode::PRECONDITION_FAILED);
        assert_eq!(http_status(Code::InvalidArgument), StatusCode::BAD_REQUEST);
        assert_eq!(http_status(Code::Unavailable), StatusCode::SERVICE_UNAVAILABLE);
    }
}
