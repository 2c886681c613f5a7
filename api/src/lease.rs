//! The Lease service: grant (with etcd's TTL bounds), revoke, the keep-alive stream,
//! time-to-live and listing.

use std::pin::Pin;
use std::sync::Arc;

use cairn_backend::{Backend, BackendError};
use cairn_proto::etcdserverpb as pb;
use cairn_proto::etcdserverpb::lease_server::Lease;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::alarms::Alarms;
use crate::auth::{Caller, Guard};
use crate::errors::{backend_status, ApiError};
use crate::header::HeaderSource;

/// etcd's largest lease TTL in seconds.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// etcd's smallest lease TTL: one and a half election timeouts, counted in whole heartbeat
/// ticks, rounded up to seconds (2 s with the default 100 ms / 1000 ms).
pub fn min_lease_ttl(heartbeat_interval_ms: u64, election_timeout_ms: u64) -> i64 {
    let heartbeat = heartbeat_interval_ms.max(1);
    let election_ticks = election_timeout_ms / heartbeat;
    let min_ms = (3 * election_ticks / 2) * heartbeat;
    min_ms.div_ceil(1000) as i64
}

pub struct LeaseService {
    backend: Arc<dyn Backend>,
    header: HeaderSource,
    min_ttl: i64,
    alarms: Alarms,
    auth: Guard,
}

impl LeaseService {
    pub fn new(backend: Arc<dyn Backend>, header: HeaderSource, min_ttl: i64, alarms: Alarms) -> Self {
        let auth = Guard::disabled(backend.clone());
        Self { backend, header, min_ttl, alarms, auth }
    }

    /// Checks every request against the auth store behind `auth`.
    pub fn with_auth(mut self, auth: Guard) -> Self {
        self.auth = auth;
        self
    }

    async fn current_header(&self) -> Result<pb::ResponseHeader, Status> {
        let (rev, _) = self.backend.current_revision().await.map_err(backend_status)?;
        Ok(self.header.header(rev))
    }
}

/// Answers one keep-alive: the renewed TTL, or 0 when the lease does not exist (as etcd does,
/// rather than failing the stream).
async fn keep_alive_once(
    backend: &dyn Backend,
    header: &HeaderSource,
    id: i64,
    auth: &Guard,
    who: &Caller,
) -> Result<pb::LeaseKeepAliveResponse, Status> {
    auth.check_lease_renew(who, id).await?;
    let (rev, _) = backend.current_revision().await.map_err(backend_status)?;
    let ttl = match backend.lease_keep_alive(id).await {
        Ok(ttl) => ttl,
        Err(BackendError::LeaseNotFound) => 0,
        Err(e) => return Err(backend_status(e)),
    };
    Ok(pb::LeaseKeepAliveResponse { header: Some(header.header(rev)), id, ttl })
}

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<pb::LeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        req: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        self.auth.caller(&req)?;
        let req = req.into_inner();
        if req.ttl > MAX_LEASE_TTL {
            return Err(ApiError::LeaseTtlTooLarge.into());
        }
        if self.alarms.no_space() {
            return Err(ApiError::NoSpace.into());
        }
        let ttl = req.ttl.max(self.min_ttl);
        let grant = match self.backend.lease_grant(req.id, ttl).await {
            Ok(g) => g,
            Err(e) => return Err(backend_status(self.alarms.raise_on_nospace(self.header.member_id(), e).await)),
        };
        Ok(Response::new(pb::LeaseGrantResponse {
            header: Some(self.header.header(grant.revision)),
            id: grant.id,
            ttl: grant.ttl,
            error: String::new(),
        }))
    }

    async fn lease_revoke(
        &self,
        req: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let who = self.auth.caller(&req)?;
        let id = req.into_inner().id;
        self.auth.check_lease_revoke(&who, id).await?;
        let rev = self.backend.lease_revoke(id).await.map_err(backend_status)?;
        Ok(Response::new(pb::LeaseRevokeResponse { header: Some(self.header.header(rev)) }))
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let who = self.auth.caller(&req)?;
        let auth = self.auth.clone();
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let backend = self.backend.clone();
        let header = self.header.clone();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = inbound.next().await {
                let resp = keep_alive_once(backend.as_ref(), &header, msg.id, &auth, &who).await;
                let failed = resp.is_err();
                if tx.send(resp).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        let who = self.auth.caller(&req)?;
        let req = req.into_inner();
        self.auth.check_lease_time_to_live(&who, req.id, req.keys).await?;
        match self.backend.lease_time_to_live(req.id, req.keys).await {
            Ok(info) => Ok(Response::new(pb::LeaseTimeToLiveResponse {
                header: Some(self.header.header(info.revision)),
                id: info.id,
                ttl: info.ttl,
                granted_ttl: info.granted_ttl,
                keys: info.keys,
            })),
            // etcd answers an unknown lease with TTL -1 rather than an error.
            Err(BackendError::LeaseNotFound) => Ok(Response::new(pb::LeaseTimeToLiveResponse {
                header: Some(self.current_header().await?),
                id: req.id,
                ttl: -1,
                ..Default::default()
            })),
            Err(e) => Err(backend_status(e)),
        }
    }

    async fn lease_leases(
        &self,
        req: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        let who = self.auth.caller(&req)?;
        let ids = self.backend.lease_leases().await.map_err(backend_status)?;
        self.auth.check_lease_leases(&who, &ids).await?;
        Ok(Response::new(pb::LeaseLeasesResponse {
            header: Some(self.current_header().await?),
            leases: ids.into_iter().map(|id| pb::LeaseStatus { id }).collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_ttl_follows_etcd() {
        assert_eq!(min_lease_ttl(100, 1000), 2);
        assert_eq!(min_lease_ttl(100, 5000), 8);
        assert_eq!(min_lease_ttl(10, 100), 1);
    }
}
