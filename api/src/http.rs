//! etcd's plain HTTP endpoints on the client port, next to gRPC: `/health`, `/livez`,
//! `/readyz`, `/version`, `/metrics` (`crate::metrics`, which also counts the gRPC calls passing
//! through here) and the JSON gateway under `/v3/` (`crate::gateway`). A tower layer
//! in front of the gRPC router answers them, passes gRPC requests on, and answers anything else
//! with Go's 404. Every HTTP answer carries etcd's CORS headers.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use cairn_backend::{Backend, KeyRange, RangeRequest};
use cairn_proto::etcdserverpb::kv_server::KvServer;
use cairn_proto::etcdserverpb::AlarmType;
use futures::future::BoxFuture;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use http_body_util::Full;
use tonic::body::Body;
use tower_layer::Layer;
use tower_service::Service;

use crate::alarms::Alarms;
use crate::auth::AuthStore;
use crate::conn::ConnInfo;
use crate::gateway::{with_cors, Gateway};
use crate::kv::KvService;
use crate::metrics::Metrics;

/// What the endpoints need to answer.
pub struct HttpState {
    pub backend: Arc<dyn Backend>,
    pub alarms: Alarms,
    /// The server version (--cairn-version).
    pub version: String,
    /// The JSON gateway under `/v3/`.
    pub gateway: Gateway,
    pub metrics: Metrics,
    /// With --client-cert-auth and auth enabled, etcd refuses gateway requests whose client
    /// certificate names a user (the gateway would not use it).
    pub auth: Arc<AuthStore>,
    pub client_cert_auth: bool,
    /// The KV service, also among the gRPC routes: its calls (the bulk of a server's) go to it
    /// straight from here, without the router's per-call boxing and service clone.
    pub kv: KvServer<KvService>,
}

/// The path prefix of the KV service's methods.
const KV_PREFIX: &str = "/etcdserverpb.KV/";

#[derive(Clone)]
pub struct HttpEndpointsLayer {
    state: Arc<HttpState>,
}

impl HttpEndpointsLayer {
    pub fn new(state: HttpState) -> Self {
        Self { state: Arc::new(state) }
    }

    /// A layer over state that other listeners (--listen-metrics-urls) share.
    pub fn shared(state: Arc<HttpState>) -> Self {
        Self { state }
    }
}

impl<S> Layer<S> for HttpEndpointsLayer {
    type Service = HttpEndpoints<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpEndpoints { inner, state: self.state.clone() }
    }
}

#[derive(Clone)]
pub struct HttpEndpoints<S> {
    inner: S,
    state: Arc<HttpState>,
}

impl<S, B> Service<Request<B>> for HttpEndpoints<S>
where
    S: Service<Request<B>, Response = Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Display + Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let is_grpc = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        if is_grpc {
            let call = self.state.metrics.grpc_call(req.uri().path());
            let metered = |resp| match call {
                Some(call) => call.wrap(resp),
                None => resp,
            };
            if req.uri().path().starts_with(KV_PREFIX) {
                // (a generated server is always ready: its poll_ready returns Ready at once)
                let answer = self.state.kv.clone().call(req);
                return Box::pin(async move { Ok(metered(answer.await.unwrap_or_else(|never| match never {}))) });
            }
            let answer = self.inner.call(req);
            return Box::pin(async move { Ok(metered(answer.await?)) });
        }
        let path = req.uri().path().to_string();
        let query = parse_query(req.uri().query().unwrap_or_default());
        let state = self.state.clone();
        if Gateway::owns(&path) {
            let has_cn = req
                .extensions()
                .get::<ConnInfo>()
                .and_then(|c| c.common_name.as_ref())
                .is_some_and(|cn| !cn.is_empty());
            let (parts, body) = req.into_parts();
            return Box::pin(async move {
                let body = match body.collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(e) => {
                        let text = format!("reading the request body: {e}\n");
                        return Ok(with_cors(reply(StatusCode::BAD_REQUEST, "text/plain; charset=utf-8", text)));
                    }
                };
                if has_cn && state.client_cert_auth && state.auth.is_enabled() {
                    // (after reading the body: HTTP/2 clients take an early answer as an error)
                    let text = "CommonName of client sending a request against gateway will be ignored and not used as expected\n";
                    let mut resp = reply(StatusCode::BAD_REQUEST, "text/plain; charset=utf-8", text.into());
                    resp.headers_mut().insert("x-content-type-options", http::HeaderValue::from_static("nosniff"));
                    return Ok(resp);
                }
                Ok(state.gateway.handle(&parts.method, &path, &parts.headers, body).await)
            });
        }
        match path.as_str() {
            "/health" | "/livez" | "/readyz" | "/version" | "/metrics" if req.method() == Method::GET => {
                Box::pin(async move { Ok(with_cors(state.answer(&path, &query).await)) })
            }
            // Go's default answer for a path nothing serves.
            _ => Box::pin(async {
                Ok(with_cors(reply(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "404 page not found\n".into())))
            }),
        }
    }
}

/// Serves `/metrics` and `/health` on a `--listen-metrics-urls` listener (HTTP/1.1, TLS when
/// `tls` is given), as etcd does; anything else is Go's 404.
pub fn spawn_metrics_listener(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    state: Arc<HttpState>,
) -> tokio::task::JoinHandle<()> {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            };
            let state = state.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let state = state.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let query = parse_query(req.uri().query().unwrap_or_default());
                        let resp = match path.as_str() {
                            "/metrics" | "/health" if req.method() == Method::GET => state.answer(&path, &query).await,
                            _ => {
                                reply(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "404 page not found\n".into())
                            }
                        };
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let http = hyper::server::conn::http1::Builder::new();
                let _ = match acceptor {
                    None => http.serve_connection(hyper_util::rt::TokioIo::new(tcp), service).await,
                    Some(acceptor) => match acceptor.accept(tcp).await {
                        Ok(tls) => http.serve_connection(hyper_util::rt::TokioIo::new(tls), service).await,
                        Err(_) => return,
                    },
                };
            });
        }
    })
}

fn parse_query(q: &str) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.entry(k.to_string()).or_default().push(v.to_string());
    }
    out
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Body::new(Full::new(Bytes::from(body))))
        .expect("static response parts")
}

impl HttpState {
    async fn answer(&self, path: &str, query: &HashMap<String, Vec<String>>) -> Response<Body> {
        match path {
            "/metrics" => {
                reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", self.metrics.render().await)
            }
            "/version" => {
                let cluster = cluster_version(&self.version);
                let body = format!(r#"{{"etcdserver":"{}","etcdcluster":"{cluster}"}}"#, self.version);
                reply(StatusCode::OK, "application/json", body)
            }
            "/health" => {
                let (ok, reason) = self.health(query).await;
                // etcd 3.5 added the reason; etcd 3.4 answers {"health":"..."} only.
                let body = if older_than_3_5(&self.version) {
                    format!(r#"{{"health":"{ok}"}}"#)
                } else {
                    format!(r#"{{"health":"{ok}","reason":"{reason}"}}"#)
                };
                let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                reply(status, "application/json", body)
            }
            _ => {
                let (ok, reason) = self.health(query).await;
                let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                let body = if ok { "ok\n".to_string() } else { format!("not ok: {reason}\n") };
                reply(status, "text/plain; charset=utf-8", body)
            }
        }
    }

    /// etcd's health check: no active alarm (unless excluded with `?exclude=NAME`) and a read
    /// of the key "health" succeeds (serializable with `?serializable=true`).
    async fn health(&self, query: &HashMap<String, Vec<String>>) -> (bool, String) {
        let excluded = query.get("exclude").cloned().unwrap_or_default();
        for alarm in self.alarms.get(AlarmType::None as i32) {
            let name = AlarmType::try_from(alarm.alarm).map_or("UNKNOWN", |t| t.as_str_name());
            if !excluded.iter().any(|e| e == name) {
                return (false, format!("ALARM {name}"));
            }
        }
        let serializable = query.get("serializable").is_some_and(|v| v.iter().any(|s| s == "true"));
        let req = RangeRequest { range: KeyRange::single(b"health".to_vec()), serializable, ..Default::default() };
        match self.backend.range(req).await {
            Ok(_) => (true, String::new()),
            Err(e) => (false, format!("QGET ERROR:{e}")),
        }
    }
}

/// Whether `version` (--cairn-version) names an etcd release before 3.5.
fn older_than_3_5(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) < (3, 5)
}

/// The cluster version etcd reports next to its own: major.minor.0.
fn cluster_version(version: &str) -> String {
    let mut parts = version.split('.');
    match (parts.next(), parts.next()) {
        (Some(major), Some(minor)) => format!("{major}.{minor}.0"),
        _ => version.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_body_follows_the_emulated_release() {
        assert!(older_than_3_5("3.4.23"));
        assert!(!older_than_3_5("3.5.17"));
        assert!(!older_than_3_5("3.6.0"));
        assert!(!older_than_3_5("4.0.0"));
    }

    #[test]
    fn cluster_version_is_major_minor_zero() {
        assert_eq!(cluster_version("3.5.17"), "3.5.0");
    }

    #[test]
    fn query_lists() {
        let q = parse_query("exclude=NOSPACE&exclude=CORRUPT&serializable=true");
        assert_eq!(q["exclude"], vec!["NOSPACE", "CORRUPT"]);
        assert_eq!(q["serializable"], vec!["true"]);
    }
}
