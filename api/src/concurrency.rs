//! etcd's Lock (`v3lockpb.Lock`) and Election (`v3electionpb.Election`) services, built the way
//! etcd's v3lock and v3election servers build them: on the KV, Lease and Watch services (called
//! in-process through a [`Routes`] as a gRPC transport, with the caller's credentials), with
//! clientv3/concurrency's recipes. A lock or a campaign puts `NAME/<lease in hex>` with the
//! session's lease; whoever's key has the lowest create revision under `NAME/` holds it; a
//! waiter watches for the deletion of each key with a lower create revision. Errors are etcd
//! 3.4's: everything a handler returns is code Unknown with the message (etcd returns the
//! clientv3 error values, which gRPC turns into Unknown), e.g. `election: no leader`,
//! `election: not leader`, `"leader" field must be provided`.

use std::pin::Pin;

use cairn_backend::prefix_end;
use cairn_proto::etcdserverpb::{
    compare, kv_client::KvClient, lease_client::LeaseClient, range_request, request_op, watch_client::WatchClient,
    watch_request, Compare, DeleteRangeRequest, LeaseGrantRequest, PutRequest, RangeRequest, RangeResponse, RequestOp,
    ResponseHeader, TxnRequest, TxnResponse, WatchCreateRequest, WatchRequest,
};
use cairn_proto::mvccpb::{event::EventType, KeyValue};
use cairn_proto::v3electionpb::{
    election_server::Election, CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse,
    ProclaimRequest, ProclaimResponse, ResignRequest, ResignResponse,
};
use cairn_proto::v3lockpb::{lock_server::Lock, LockRequest, LockResponse, UnlockRequest, UnlockResponse};
use futures::{Stream, StreamExt};
use tonic::metadata::MetadataMap;
use tonic::service::Routes;
use tonic::{Request, Response, Status};

use crate::conn::ConnInfo;

/// clientv3/concurrency's default session TTL (seconds), for a lock or campaign without a lease.
const DEFAULT_SESSION_TTL: i64 = 60;

const ERR_NO_LEADER: &str = "election: no leader";
const ERR_NOT_LEADER: &str = "election: not leader";
const ERR_MISSING_LEADER_KEY: &str = "\"leader\" field must be provided";

/// In-process clients of the KV, Lease and Watch services, carrying one caller's credentials.
#[derive(Clone)]
struct Client {
    routes: Routes,
    metadata: MetadataMap,
    conn: Option<ConnInfo>,
}

/// etcd's handlers return clientv3 errors; gRPC sends them as code Unknown.
fn unknown(s: Status) -> Status {
    Status::unknown(s.message().to_string())
}

impl Client {
    fn of<T>(routes: &Routes, req: &Request<T>) -> Self {
        let mut metadata = MetadataMap::new();
        for key in ["token", "authorization", "grpcgateway-accept"] {
            if let Some(v) = req.metadata().get(key) {
                metadata.insert(key, v.clone());
            }
        }
        Self { routes: routes.clone(), metadata, conn: req.extensions().get::<ConnInfo>().cloned() }
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut ext = tonic::Extensions::default();
        if let Some(c) = &self.conn {
            ext.insert(c.clone());
        }
        Request::from_parts(self.metadata.clone(), ext, msg)
    }

    async fn txn(&self, t: TxnRequest) -> Result<TxnResponse, Status> {
        KvClient::new(self.routes.clone()).txn(self.req(t)).await.map(Response::into_inner).map_err(unknown)
    }

    async fn range(&self, r: RangeRequest) -> Result<RangeResponse, Status> {
        KvClient::new(self.routes.clone()).range(self.req(r)).await.map(Response::into_inner).map_err(unknown)
    }

    async fn delete(&self, key: Vec<u8>) -> Result<ResponseHeader, Status> {
        let r = DeleteRangeRequest { key, ..Default::default() };
        let resp = KvClient::new(self.routes.clone()).delete_range(self.req(r)).await.map_err(unknown)?;
        Ok(resp.into_inner().header.unwrap_or_default())
    }

    /// concurrency.NewSession(WithLease(lease)).Orphan(): a new lease only for lease 0.
    async fn session_lease(&self, lease: i64) -> Result<i64, Status> {
        if lease != 0 {
            return Ok(lease);
        }
        let r = LeaseGrantRequest { ttl: DEFAULT_SESSION_TTL, id: 0 };
        let resp = LeaseClient::new(self.routes.clone()).lease_grant(self.req(r)).await.map_err(unknown)?;
        Ok(resp.into_inner().id)
    }

    /// A watch on `key` (with `range_end`) from `start_revision`, as a stream of responses.
    async fn watch(
        &self,
        key: Vec<u8>,
        range_end: Vec<u8>,
        start_revision: i64,
    ) -> Result<Pin<Box<dyn Stream<Item = Result<cairn_proto::etcdserverpb::WatchResponse, Status>> + Send>>, Status>
    {
        let create = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(WatchCreateRequest {
                key,
                range_end,
                start_revision,
                ..Default::default()
            })),
        };
        // The request side stays open for as long as the watch is wanted.
        let outbound = futures::stream::iter([create]).chain(futures::stream::pending());
        let resp = WatchClient::new(self.routes.clone()).watch(self.req(outbound)).await.map_err(unknown)?;
        Ok(Box::pin(resp.into_inner().map(|r| r.map_err(unknown))))
    }

    /// clientv3/concurrency's waitDelete: until `key` is deleted at or after `rev`.
    async fn wait_delete(&self, key: Vec<u8>, rev: i64) -> Result<(), Status> {
        let mut events = self.watch(key, Vec::new(), rev).await?;
        while let Some(resp) = events.next().await {
            let resp = resp?;
            if resp.canceled {
                return Err(Status::unknown(resp.cancel_reason));
            }
            if resp.events.iter().any(|e| e.r#type == EventType::Delete as i32) {
                return Ok(());
            }
        }
        Err(Status::unknown("lost watcher waiting for delete"))
    }

    /// clientv3/concurrency's waitDeletes: until no key under `prefix` has a create revision
    /// at or below `max_create_rev`; the header of the last read.
    async fn wait_deletes(&self, prefix: &[u8], max_create_rev: i64) -> Result<ResponseHeader, Status> {
        loop {
            let r = RangeRequest { max_create_revision: max_create_rev, ..last_create(prefix) };
            let resp = self.range(r).await?;
            let Some(kv) = resp.kvs.first() else {
                return Ok(resp.header.unwrap_or_default());
            };
            let rev = resp.header.as_ref().map_or(0, |h| h.revision);
            self.wait_delete(kv.key.clone(), rev).await?;
        }
    }
}

/// `Get(prefix, WithFirstCreate())`: the key under `prefix` with the lowest create revision.
fn first_create(prefix: &[u8]) -> RangeRequest {
    RangeRequest {
        key: prefix.to_vec(),
        range_end: prefix_end(prefix),
        limit: 1,
        sort_order: range_request::SortOrder::Ascend as i32,
        sort_target: range_request::SortTarget::Create as i32,
        ..Default::default()
    }
}

/// `Get(prefix, WithLastCreate())`.
fn last_create(prefix: &[u8]) -> RangeRequest {
    RangeRequest { sort_order: range_request::SortOrder::Descend as i32, ..first_create(prefix) }
}

fn create_rev_is(key: &[u8], rev: i64) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Create as i32,
        key: key.to_vec(),
        target_union: Some(compare::TargetUnion::CreateRevision(rev)),
        ..Default::default()
    }
}

fn op_put(key: &[u8], value: Vec<u8>, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: key.to_vec(),
            value,
            lease,
            ..Default::default()
        })),
    }
}

fn op_range(r: RangeRequest) -> RequestOp {
    RequestOp { request: Some(request_op::Request::RequestRange(r)) }
}

fn op_delete(key: &[u8]) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest {
            key: key.to_vec(),
            ..Default::default()
        })),
    }
}

/// The kvs of the `i`th response of a txn, when it is a range.
fn range_kvs(resp: &TxnResponse, i: usize) -> &[KeyValue] {
    use cairn_proto::etcdserverpb::response_op::Response as R;
    match resp.responses.get(i).and_then(|r| r.response.as_ref()) {
        Some(R::ResponseRange(r)) => &r.kvs,
        _ => &[],
    }
}

fn waiter_key(prefix: &[u8], lease: i64) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(format!("{lease:x}").as_bytes());
    k
}

/// Deletes `key` if dropped before [`Cleanup::disarm`]: a waiting lock or campaign whose
/// caller went away gives up its place, as etcd's do on context cancellation.
struct Cleanup {
    client: Client,
    key: Option<Vec<u8>>,
}

impl Cleanup {
    fn disarm(mut self) {
        self.key = None;
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let client = self.client.clone();
            tokio::spawn(async move {
                let _ = client.delete(key).await;
            });
        }
    }
}

/// The Lock service.
#[derive(Clone)]
pub struct LockService {
    routes: Routes,
}

impl LockService {
    /// `routes` must serve KV, Lease and Watch.
    pub fn new(routes: Routes) -> Self {
        Self { routes }
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    async fn lock(&self, req: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let client = Client::of(&self.routes, &req);
        let req = req.into_inner();
        let lease = client.session_lease(req.lease).await?;
        // concurrency.Mutex.Lock
        let mut prefix = req.name;
        prefix.push(b'/');
        let my_key = waiter_key(&prefix, lease);
        let txn = TxnRequest {
            compare: vec![create_rev_is(&my_key, 0)],
            success: vec![op_put(&my_key, Vec::new(), lease), op_range(first_create(&prefix))],
            failure: vec![
                op_range(RangeRequest { key: my_key.clone(), ..Default::default() }),
                op_range(first_create(&prefix)),
            ],
        };
        let resp = client.txn(txn).await?;
        let header = resp.header.unwrap_or_default();
        let my_rev = if resp.succeeded {
            header.revision
        } else {
            range_kvs(&resp, 0).first().map_or(0, |kv| kv.create_revision)
        };
        let owner = range_kvs(&resp, 1);
        if owner.is_empty() || owner[0].create_revision == my_rev {
            return Ok(Response::new(LockResponse { header: Some(header), key: my_key }));
        }
        let cleanup = Cleanup { client: client.clone(), key: Some(my_key.clone()) };
        let header = client.wait_deletes(&prefix, my_rev - 1).await?;
        cleanup.disarm();
        Ok(Response::new(LockResponse { header: Some(header), key: my_key }))
    }

    async fn unlock(&self, req: Request<UnlockRequest>) -> Result<Response<UnlockResponse>, Status> {
        let client = Client::of(&self.routes, &req);
        let header = client.delete(req.into_inner().key).await?;
        Ok(Response::new(UnlockResponse { header: Some(header) }))
    }
}

/// The Election service.
#[derive(Clone)]
pub struct ElectionService {
    routes: Routes,
}

impl ElectionService {
    /// `routes` must serve KV, Lease and Watch.
    pub fn new(routes: Routes) -> Self {
        Self { routes }
    }
}

/// A resumed election's Proclaim: put `value` on the leader key if it is still the one created
/// at `leader.rev`.
async fn proclaim(client: &Client, leader: &LeaderKey, value: Vec<u8>) -> Result<ResponseHeader, Status> {
    let txn = TxnRequest {
        compare: vec![create_rev_is(&leader.key, leader.rev)],
        success: vec![op_put(&leader.key, value, leader.lease)],
        failure: vec![],
    };
    let resp = client.txn(txn).await?;
    if !resp.succeeded {
        return Err(Status::unknown(ERR_NOT_LEADER));
    }
    Ok(resp.header.unwrap_or_default())
}

/// A resumed election's Resign: delete the leader key if it is still the one created at
/// `leader.rev`.
async fn resign(client: &Client, leader: &LeaderKey) -> Result<ResponseHeader, Status> {
    let txn = TxnRequest {
        compare: vec![create_rev_is(&leader.key, leader.rev)],
        success: vec![op_delete(&leader.key)],
        failure: vec![],
    };
    Ok(client.txn(txn).await?.header.unwrap_or_default())
}

type ObserveStream = Pin<Box<dyn Stream<Item = Result<LeaderResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Election for ElectionService {
    async fn campaign(&self, req: Request<CampaignRequest>) -> Result<Response<CampaignResponse>, Status> {
        let client = Client::of(&self.routes, &req);
        let req = req.into_inner();
        let lease = client.session_lease(req.lease).await?;
        let mut prefix = req.name.clone();
        prefix.push(b'/');
        let key = waiter_key(&prefix, lease);
        let txn = TxnRequest {
            compare: vec![create_rev_is(&key, 0)],
            success: vec![op_put(&key, req.value.clone(), lease)],
            failure: vec![op_range(RangeRequest { key: key.clone(), ..Default::default() })],
        };
        let resp = client.txn(txn).await?;
        let header = resp.header.unwrap_or_default();
        let mut leader = LeaderKey { name: req.name.clone(), key: key.clone(), rev: header.revision, lease };
        let cleanup = Cleanup { client: client.clone(), key: Some(key.clone()) };
        if !resp.succeeded {
            let kv = range_kvs(&resp, 0).first().cloned().unwrap_or_default();
            leader.rev = kv.create_revision;
            if kv.value != req.value {
                if let Err(e) = proclaim(&client, &leader, req.value.clone()).await {
                    let _ = resign(&client, &leader).await;
                    cleanup.disarm();
                    return Err(e);
                }
            }
        }
        match client.wait_deletes(&prefix, leader.rev - 1).await {
            Ok(_) => {}
            Err(e) => {
                // etcd resigns only when the caller went away (Cleanup does that on drop).
                cleanup.disarm();
                return Err(e);
            }
        }
        cleanup.disarm();
        Ok(Response::new(CampaignResponse { header: Some(header), leader: Some(leader) }))
    }

    async fn proclaim(&self, req: Request<ProclaimRequest>) -> Result<Response<ProclaimResponse>, Status> {
        let client = Client::of(&self.routes, &req);
        let req = req.into_inner();
        let leader = req.leader.ok_or_else(|| Status::unknown(ERR_MISSING_LEADER_KEY))?;
        let header = proclaim(&client, &leader, req.value).await?;
        Ok(Response::new(ProclaimResponse { header: Some(header) }))
    }

    async fn leader(&self, req: Request<LeaderRequest>) -> Result<Response<LeaderResponse>, Status> {
        let client = Client::of(&self.routes, &req);
        let mut prefix = req.into_inner().name;
        prefix.push(b'/');
        let resp = client.range(first_create(&prefix)).await?;
        let kv = resp.kvs.into_iter().next().ok_or_else(|| Status::unknown(ERR_NO_LEADER))?;
        Ok(Response::new(LeaderResponse { header: resp.header, kv: Some(kv) }))
    }

    type ObserveStream = ObserveStream;

    async fn observe(&self, req: Request<LeaderRequest>) -> Result<Response<Self::ObserveStream>, Status> {
        let client = Client::of(&self.routes, &req);
        let mut prefix = req.into_inner().name;
        prefix.push(b'/');
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            // Ends when the observer goes away (send fails) or a read or watch fails.
            let _ = observe(&client, &prefix, &tx).await;
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn resign(&self, req: Request<ResignRequest>) -> Result<Response<ResignResponse>, Status> {
        let client = Client::of(&self.routes, &req);
        let leader = req.into_inner().leader.ok_or_else(|| Status::unknown(ERR_MISSING_LEADER_KEY))?;
        let header = resign(&client, &leader).await?;
        Ok(Response::new(ResignResponse { header: Some(header) }))
    }
}

type Sender = tokio::sync::mpsc::Sender<Result<LeaderResponse, Status>>;

/// clientv3/concurrency's Election.observe: the current leader, each new value it proclaims,
/// and after its key is deleted the next leader.
async fn observe(client: &Client, prefix: &[u8], tx: &Sender) -> Result<(), Status> {
    loop {
        let resp = client.range(first_create(prefix)).await?;
        let (mut header, kv) = match resp.kvs.into_iter().next() {
            Some(kv) => (resp.header.unwrap_or_default(), kv),
            None => {
                // Wait for the first put under the prefix.
                let rev = resp.header.as_ref().map_or(0, |h| h.revision);
                let mut events = client.watch(prefix.to_vec(), prefix_end(prefix), rev).await?;
                let mut found = None;
                while found.is_none() {
                    let wr = events.next().await.ok_or_else(|| Status::unknown("watch closed"))??;
                    if wr.canceled {
                        return Err(Status::unknown(wr.cancel_reason));
                    }
                    let put = wr.events.iter().find(|e| e.r#type == EventType::Put as i32);
                    if let Some(kv) = put.and_then(|e| e.kv.clone()) {
                        let mut h = wr.header.unwrap_or_default();
                        h.revision = kv.mod_revision;
                        found = Some((h, kv));
                    }
                }
                found.expect("loop ends with a put")
            }
        };
        if tx.send(Ok(LeaderResponse { header: Some(header), kv: Some(kv.clone()) })).await.is_err() {
            return Ok(());
        }
        let mut events = client.watch(kv.key.clone(), Vec::new(), header.revision + 1).await?;
        'leader: while let Some(wr) = events.next().await {
            let wr = wr?;
            for ev in wr.events {
                if ev.r#type == EventType::Delete as i32 {
                    break 'leader;
                }
                header = wr.header.unwrap_or_default();
                if tx.send(Ok(LeaderResponse { header: Some(header), kv: ev.kv })).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_etcds() {
        assert_eq!(prefix_end(b"a/"), b"a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn waiter_keys_are_name_slash_hex_lease() {
        assert_eq!(waiter_key(b"mylock/", 0x2040a214ab5f1c14), b"mylock/2040a214ab5f1c14".to_vec());
    }
}
