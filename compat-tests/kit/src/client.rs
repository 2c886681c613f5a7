//! Connections, request builders and small helpers shared by `check` and `diff`.

use std::time::Duration;

use anyhow::Context as _;
use cairn_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use cairn_proto::etcdserverpb::kv_client::KvClient;
use cairn_proto::etcdserverpb::lease_client::LeaseClient;
use cairn_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use cairn_proto::etcdserverpb::request_op::Request as Op;
use cairn_proto::etcdserverpb::watch_client::WatchClient;
use cairn_proto::etcdserverpb::*;
use tonic::transport::{Channel, Endpoint};

/// gRPC clients of one endpoint (cheap to clone: they share one HTTP/2 connection).
#[derive(Clone)]
pub struct Clients {
    pub endpoint: String,
    pub kv: KvClient<Channel>,
    pub watch: WatchClient<Channel>,
    pub lease: LeaseClient<Channel>,
    pub maint: MaintenanceClient<Channel>,
}

/// `host:port` or a URL (`http://host:port`); only plain-text gRPC.
pub fn endpoint_url(endpoint: &str) -> String {
    if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    }
}

pub async fn connect(endpoint: &str) -> anyhow::Result<Clients> {
    let ch = Endpoint::from_shared(endpoint_url(endpoint))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .with_context(|| format!("connecting to {endpoint}"))?;
    Ok(Clients {
        endpoint: endpoint.to_string(),
        kv: KvClient::new(ch.clone()),
        watch: WatchClient::new(ch.clone()),
        lease: LeaseClient::new(ch.clone()),
        maint: MaintenanceClient::new(ch),
    })
}

/// A fresh key prefix nobody else uses: `/cairn-compat/<16 hex digits>/`.
pub fn random_prefix() -> String {
    format!("/cairn-compat/{:016x}/", rand::random::<u64>())
}

/// The range end that covers every key starting with `prefix` (etcd's `GetPrefixRangeEnd`).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

pub fn put(k: impl Into<Vec<u8>>, v: impl Into<Vec<u8>>) -> PutRequest {
    PutRequest { key: k.into(), value: v.into(), ..Default::default() }
}

pub fn get(k: impl Into<Vec<u8>>) -> RangeRequest {
    RangeRequest { key: k.into(), ..Default::default() }
}

pub fn get_prefix(p: &str) -> RangeRequest {
    RangeRequest { key: p.into(), range_end: prefix_end(p.as_bytes()), ..Default::default() }
}

pub fn del(k: impl Into<Vec<u8>>) -> DeleteRangeRequest {
    DeleteRangeRequest { key: k.into(), ..Default::default() }
}

pub fn del_prefix(p: &str) -> DeleteRangeRequest {
    DeleteRangeRequest { key: p.into(), range_end: prefix_end(p.as_bytes()), ..Default::default() }
}

pub fn op_put(r: PutRequest) -> RequestOp {
    RequestOp { request: Some(Op::RequestPut(r)) }
}
pub fn op_get(r: RangeRequest) -> RequestOp {
    RequestOp { request: Some(Op::RequestRange(r)) }
}
pub fn op_del(r: DeleteRangeRequest) -> RequestOp {
    RequestOp { request: Some(Op::RequestDeleteRange(r)) }
}
pub fn op_txn(r: TxnRequest) -> RequestOp {
    RequestOp { request: Some(Op::RequestTxn(r)) }
}

/// A compare of `target` on `key` with `result`; the value goes into the target's union member.
pub fn cmp(key: impl Into<Vec<u8>>, target: CompareTarget, result: CompareResult, v: CmpVal) -> Compare {
    let union = match (target, v) {
        (CompareTarget::Value, CmpVal::Bytes(b)) => TargetUnion::Value(b),
        (CompareTarget::Version, CmpVal::Int(n)) => TargetUnion::Version(n),
        (CompareTarget::Create, CmpVal::Int(n)) => TargetUnion::CreateRevision(n),
        (CompareTarget::Mod, CmpVal::Int(n)) => TargetUnion::ModRevision(n),
        (CompareTarget::Lease, CmpVal::Int(n)) => TargetUnion::Lease(n),
        (t, v) => panic!("compare target {t:?} with {v:?}"),
    };
    Compare {
        result: result as i32,
        target: target as i32,
        key: key.into(),
        range_end: vec![],
        target_union: Some(union),
    }
}

#[derive(Debug, Clone)]
pub enum CmpVal {
    Int(i64),
    Bytes(Vec<u8>),
}

/// The revision in a response header (0 when absent).
pub fn rev(h: &Option<ResponseHeader>) -> i64 {
    h.as_ref().map_or(0, |h| h.revision)
}

/// The current revision of the endpoint, read with a one-key Range (a read takes no revision).
pub async fn current_rev(c: &mut Clients) -> anyhow::Result<i64> {
    let r = c.kv.range(get("/cairn-compat/rev-probe")).await?.into_inner();
    Ok(rev(&r.header))
}

pub fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A bidirectional stream whose response headers may only come with the first response: etcd
/// (grpc-go) sends nothing until it has something to say, so the call runs in a task and the
/// first read waits for it.
struct Bidi<Resp> {
    pending: Option<tokio::task::JoinHandle<Result<tonic::Response<tonic::Streaming<Resp>>, tonic::Status>>>,
    rx: Option<tonic::Streaming<Resp>>,
}

impl<Resp: Send + 'static> Bidi<Resp> {
    /// The next message, `None` when nothing arrives within `wait`.
    async fn next(&mut self, wait: Duration) -> anyhow::Result<Option<Resp>> {
        let fut = async {
            if let Some(h) = self.pending.as_mut() {
                let r = h.await?;
                self.pending = None;
                self.rx = Some(r?.into_inner());
            }
            let rx = self.rx.as_mut().ok_or_else(|| anyhow::anyhow!("stream failed to open"))?;
            rx.message().await?.ok_or_else(|| anyhow::anyhow!("stream ended"))
        };
        match tokio::time::timeout(wait, fut).await {
            Err(_) => Ok(None),
            Ok(r) => Ok(Some(r?)),
        }
    }
}

/// One bidirectional Watch stream.
pub struct WatchStream {
    tx: tokio::sync::mpsc::Sender<WatchRequest>,
    rx: Bidi<WatchResponse>,
}

impl WatchStream {
    pub async fn open(c: &mut Clients) -> anyhow::Result<Self> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let mut client = c.watch.clone();
        let h = tokio::spawn(async move { client.watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
        Ok(Self { tx, rx: Bidi { pending: Some(h), rx: None } })
    }

    pub async fn send(&self, r: watch_request::RequestUnion) -> anyhow::Result<()> {
        self.tx.send(WatchRequest { request_union: Some(r) }).await.map_err(|_| anyhow::anyhow!("watch stream closed"))
    }

    pub async fn create(&self, r: WatchCreateRequest) -> anyhow::Result<()> {
        self.send(watch_request::RequestUnion::CreateRequest(r)).await
    }

    /// The next response, `None` when nothing arrives within `wait`.
    pub async fn next(&mut self, wait: Duration) -> anyhow::Result<Option<WatchResponse>> {
        self.rx.next(wait).await
    }

    /// Responses until `n` events were seen in total (or `wait` passed without a response).
    pub async fn events(&mut self, n: usize, wait: Duration) -> anyhow::Result<Vec<cairn_proto::mvccpb::Event>> {
        let mut out = Vec::new();
        while out.len() < n {
            match self.next(wait).await? {
                Some(r) => out.extend(r.events),
                None => break,
            }
        }
        Ok(out)
    }
}

/// One bidirectional LeaseKeepAlive stream.
pub struct KeepAlive {
    tx: tokio::sync::mpsc::Sender<LeaseKeepAliveRequest>,
    rx: Bidi<LeaseKeepAliveResponse>,
}

impl KeepAlive {
    pub async fn open(c: &mut Clients) -> anyhow::Result<Self> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let mut client = c.lease.clone();
        let h =
            tokio::spawn(async move { client.lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
        Ok(Self { tx, rx: Bidi { pending: Some(h), rx: None } })
    }

    pub async fn ping(&mut self, id: i64) -> anyhow::Result<LeaseKeepAliveResponse> {
        self.tx.send(LeaseKeepAliveRequest { id }).await.map_err(|_| anyhow::anyhow!("keep-alive stream closed"))?;
        self.rx.next(Duration::from_secs(5)).await?.ok_or_else(|| anyhow::anyhow!("no keep-alive response within 5 s"))
    }
}
