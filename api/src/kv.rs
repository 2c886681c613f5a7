//! The KV service: Range, Put, DeleteRange, Txn and Compact. Writes other than Txn run as
//! one-op txns, so every write path goes through the backend's txn semantics.

use std::sync::Arc;

use cairn_backend::{self as model, Backend};
use cairn_proto::etcdserverpb as pb;
use cairn_proto::etcdserverpb::kv_server::Kv;
use prost::Message;
use tonic::{Request, Response, Status};

use crate::alarms::Alarms;
use crate::auth::Guard;
use crate::convert;
use crate::errors::{backend_status, ApiError};
use crate::header::HeaderSource;
use crate::metrics::{Metrics, OpCounts};
use crate::validate;

/// etcd wraps each write in an internal raft request (an ID header and a field tag) before
/// comparing it against --max-request-bytes; this approximates that envelope.
const RAFT_ENVELOPE_BYTES: usize = 16;

/// Request limits from etcd's flags.
#[derive(Clone, Copy, Debug)]
pub struct KvLimits {
    pub max_txn_ops: usize,
    pub max_request_bytes: usize,
}

pub struct KvService {
    backend: Arc<dyn Backend>,
    header: HeaderSource,
    limits: KvLimits,
    alarms: Alarms,
    auth: Guard,
    metrics: Option<Metrics>,
}

impl KvService {
    pub fn new(backend: Arc<dyn Backend>, header: HeaderSource, limits: KvLimits, alarms: Alarms) -> Self {
        let auth = Guard::disabled(backend.clone());
        Self { backend, header, limits, alarms, auth, metrics: None }
    }

    /// Counts each request's MVCC operations in `metrics` (etcd_mvcc_*_total).
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn count(&self, ops: OpCounts) {
        if let Some(m) = &self.metrics {
            m.record_ops(ops);
        }
    }

    /// Checks every request against the auth store behind `auth`.
    pub fn with_auth(mut self, auth: Guard) -> Self {
        self.auth = auth;
        self
    }

    /// While the NOSPACE alarm is on, writes that add data are refused (etcd's capped applier).
    fn check_space(&self, adds_data: bool) -> Result<(), Status> {
        if adds_data && self.alarms.no_space() {
            return Err(ApiError::NoSpace.into());
        }
        Ok(())
    }

    /// A backend error, raising the NOSPACE alarm when the quota was hit.
    async fn write_error(&self, e: cairn_backend::BackendError) -> Status {
        backend_status(self.alarms.raise_on_nospace(self.header.member_id(), e).await)
    }

    /// etcd's "request is too large" check, applied to writes as they would enter raft.
    fn check_size(&self, encoded_len: usize) -> Result<(), Status> {
        if encoded_len + RAFT_ENVELOPE_BYTES > self.limits.max_request_bytes {
            return Err(ApiError::RequestTooLarge.into());
        }
        Ok(())
    }

    /// Runs one write op as a txn and returns its single response.
    async fn write_one(&self, op: model::RequestOp) -> Result<model::ResponseOp, Status> {
        let txn = model::TxnRequest::unconditional(vec![op]);
        let resp = match self.backend.txn(txn).await {
            Ok(r) => r,
            Err(e) => return Err(self.write_error(e).await),
        };
        resp.responses.into_iter().next().ok_or_else(|| Status::internal("empty txn response"))
    }
}

/// Whether any branch of the txn (nested ones included) puts a key.
fn has_puts(t: &model::TxnRequest) -> bool {
    t.success.iter().chain(&t.failure).any(|op| match op {
        model::RequestOp::Put(_) => true,
        model::RequestOp::Txn(inner) => has_puts(inner),
        _ => false,
    })
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(&self, req: Request<pb::RangeRequest>) -> Result<Response<pb::RangeResponse>, Status> {
        let who = self.auth.caller(&req);
        let req = req.into_inner();
        validate::check_range(&req)?;
        self.auth.check_range(&who?, &req.key, &req.range_end)?;
        let resp = self.backend.range(convert::range_req(req)).await.map_err(backend_status)?;
        self.count(OpCounts::of_range());
        let header = self.header.header(resp.revision);
        Ok(Response::new(convert::range_resp(resp, header)))
    }

    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let who = self.auth.caller(&req);
        let req = req.into_inner();
        validate::check_put(&req)?;
        self.check_size(req.encoded_len())?;
        self.auth.check_put(&who?, &req).await?;
        self.check_space(true)?;
        let ops = OpCounts::of_put(&req);
        match self.write_one(model::RequestOp::Put(convert::put_req(req))).await? {
            model::ResponseOp::Put(r) => {
                self.count(ops);
                let header = self.header.header(r.revision);
                Ok(Response::new(convert::put_resp(r, header)))
            }
            other => Err(Status::internal(format!("unexpected txn response {other:?}"))),
        }
    }

    async fn delete_range(
        &self,
        req: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        let who = self.auth.caller(&req);
        let req = req.into_inner();
        validate::check_delete(&req)?;
        self.check_size(req.encoded_len())?;
        self.auth.check_delete(&who?, &req)?;
        let ops = OpCounts::of_delete(&req);
        match self.write_one(model::RequestOp::DeleteRange(convert::delete_req(req))).await? {
            model::ResponseOp::DeleteRange(r) => {
                self.count(ops);
                let header = self.header.header(r.revision);
                Ok(Response::new(convert::delete_resp(r, header)))
            }
            other => Err(Status::internal(format!("unexpected txn response {other:?}"))),
        }
    }

    async fn txn(&self, req: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let who = self.auth.caller(&req);
        let req = req.into_inner();
        validate::check_txn(&req, self.limits.max_txn_ops)?;
        self.auth.check_txn(&who?, &req).await?;
        let size = req.encoded_len();
        let counted = self.metrics.is_some().then(|| req.clone());
        let txn = convert::txn_req(req);
        if txn.has_writes() {
            self.check_size(size)?;
        }
        self.check_space(has_puts(&txn))?;
        let resp = match self.backend.txn(txn).await {
            Ok(r) => r,
            Err(e) => return Err(self.write_error(e).await),
        };
        let header = self.header.header(resp.revision);
        let resp = convert::txn_resp(resp, header);
        if let Some(req) = counted {
            OpCounts::txn_groups(&req, &resp).into_iter().for_each(|ops| self.count(ops));
        }
        Ok(Response::new(resp))
    }

    async fn compact(&self, req: Request<pb::CompactionRequest>) -> Result<Response<pb::CompactionResponse>, Status> {
        // etcd 3.5 checks no permission for compaction, only that a given token is valid.
        self.auth.caller(&req)?;
        let req = req.into_inner();
        let resp = self.backend.compact(req.revision, req.physical).await.map_err(backend_status)?;
        Ok(Response::new(pb::CompactionResponse { header: Some(self.header.header(resp.revision)) }))
    }
}
