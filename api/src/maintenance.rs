//! The Maintenance service: Status, hashes, defragmentation, alarms (see `alarms`) and the
//! Snapshot stream (see `snapshot`). MoveLeader and Downgrade are not served yet.

use std::pin::Pin;
use std::sync::Arc;

use cairn_backend::Backend;
use cairn_proto::etcdserverpb as pb;
use cairn_proto::etcdserverpb::maintenance_server::Maintenance;
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::auth::Guard;
use crate::alarms::{self, Alarms};
use crate::errors::{backend_status, ApiError};
use crate::header::HeaderSource;
use crate::members::Members;
use crate::snapshot;

pub struct MaintenanceService {
    backend: Arc<dyn Backend>,
    header: HeaderSource,
    /// The etcd version reported by Status (--cairn-version).
    version: String,
    alarms: Alarms,
    auth: Guard,
    /// The membership that snapshots record.
    members: Option<Members>,
}

impl MaintenanceService {
    pub fn new(backend: Arc<dyn Backend>, header: HeaderSource, version: String, alarms: Alarms) -> Self {
        let auth = Guard::disabled(backend.clone());
        Self { backend, header, version, alarms, auth, members: None }
    }

    /// Records `members` in snapshots.
    pub fn with_members(mut self, members: Members) -> Self {
        self.members = Some(members);
        self
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

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<pb::SnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(&self, req: Request<pb::AlarmRequest>) -> Result<Response<pb::AlarmResponse>, Status> {
        let who = self.auth.caller(&req)?;
        if req.get_ref().action == pb::alarm_request::AlarmAction::Get as i32 {
            self.auth.require_user(&who)?;
        } else {
            self.auth.check_admin(&who)?;
        }
        let req = req.into_inner();
        use pb::alarm_request::AlarmAction;
        let alarms = match AlarmAction::try_from(req.action) {
            Ok(AlarmAction::Get) => self.alarms.get(req.alarm),
            Ok(AlarmAction::Activate) => {
                self.alarms.activate(req.member_id, req.alarm).await.map_err(backend_status)?.into_iter().collect()
            }
            Ok(AlarmAction::Deactivate) => {
                self.alarms.deactivate(req.member_id, req.alarm).await.map_err(backend_status)?.into_iter().collect()
            }
            Err(_) => vec![],
        };
        Ok(Response::new(pb::AlarmResponse { header: Some(self.current_header().await?), alarms }))
    }

    async fn status(&self, req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        self.auth.require_user(&self.auth.caller(&req)?)?;
        let st = self.backend.status().await.map_err(backend_status)?;
        self.header.set_raft_term(st.raft_term);
        Ok(Response::new(pb::StatusResponse {
            header: Some(self.header.header(st.revision)),
            version: self.version.clone(),
            db_size: st.db_size,
            leader: st.leader.unwrap_or(if st.is_leader { self.header.member_id() } else { 0 }),
            raft_index: st.raft_index,
            raft_term: st.raft_term,
            raft_applied_index: st.raft_applied_index,
            errors: self.alarms.get(pb::AlarmType::None as i32).iter().map(alarms::describe).collect(),
            db_size_in_use: st.db_size_in_use,
            is_learner: st.is_learner,
        }))
    }

    async fn defragment(
        &self,
        req: Request<pb::DefragmentRequest>,
    ) -> Result<Response<pb::DefragmentResponse>, Status> {
        self.auth.check_admin(&self.auth.caller(&req)?)?;
        self.backend.defragment().await.map_err(backend_status)?;
        Ok(Response::new(pb::DefragmentResponse { header: Some(self.current_header().await?) }))
    }

    /// etcd hashes the whole backend file; Cairn has no such file, so this is HashKV's hash
    /// at the current revision.
    async fn hash(&self, req: Request<pb::HashRequest>) -> Result<Response<pb::HashResponse>, Status> {
        self.auth.check_admin(&self.auth.caller(&req)?)?;
        let h = self.backend.hash_kv(0).await.map_err(backend_status)?;
        Ok(Response::new(pb::HashResponse { header: Some(self.header.header(h.revision)), hash: h.hash }))
    }

    async fn hash_kv(&self, req: Request<pb::HashKvRequest>) -> Result<Response<pb::HashKvResponse>, Status> {
        self.auth.check_admin(&self.auth.caller(&req)?)?;
        let h = self.backend.hash_kv(req.into_inner().revision).await.map_err(backend_status)?;
        Ok(Response::new(pb::HashKvResponse {
            header: Some(self.header.header(h.revision)),
            hash: h.hash,
            compact_revision: h.compact_revision,
        }))
    }

    type SnapshotStream = SnapshotStream;

    async fn snapshot(&self, req: Request<pb::SnapshotRequest>) -> Result<Response<SnapshotStream>, Status> {
        self.auth.check_admin(&self.auth.caller(&req)?)?;
        let cluster_version = format!("{}.0", self.version.splitn(3, '.').take(2).collect::<Vec<_>>().join("."));
        let snap = snapshot::collect(&self.backend, self.members.as_ref(), &self.alarms, &cluster_version)
            .await
            .map_err(backend_status)?;
        let db = tokio::task::spawn_blocking(move || cairn_bbolt::etcd::snapshot_db(&snap))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(size = db.len(), "sending database snapshot to client");
        let msgs = snapshot::chunks(db)
            .into_iter()
            .map(|(blob, remaining_bytes)| Ok(pb::SnapshotResponse { header: None, remaining_bytes, blob }));
        Ok(Response::new(Box::pin(futures::stream::iter(msgs)) as SnapshotStream))
    }

    async fn move_leader(
        &self,
        req: Request<pb::MoveLeaderRequest>,
    ) -> Result<Response<pb::MoveLeaderResponse>, Status> {
        self.auth.check_admin(&self.auth.caller(&req)?)?;
        let target = req.get_ref().target_id;
        let st = self.backend.status().await.map_err(backend_status)?;
        let me = self.header.member_id();
        let leader = st.leader.unwrap_or(if st.is_leader { me } else { 0 });
        // etcd: only the leader moves leadership; moving it to itself is done already.
        if leader != me {
            return Err(ApiError::NotLeader.into());
        }
        if target != me {
            self.backend.move_leader(target).await.map_err(backend_status)?;
        }
        let st = self.backend.status().await.map_err(backend_status)?;
        Ok(Response::new(pb::MoveLeaderResponse { header: Some(self.header.header(st.revision)) }))
    }

    async fn downgrade(&self, req: Request<pb::DowngradeRequest>) -> Result<Response<pb::DowngradeResponse>, Status> {
        self.auth.check_admin(&self.auth.caller(&req)?)?;
        Err(ApiError::unimplemented("Maintenance.Downgrade").into())
    }
}
