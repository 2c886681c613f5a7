//! The Cluster service for a single member. Membership changes are not served yet.

use cairn_proto::etcdserverpb as pb;
use cairn_proto::etcdserverpb::cluster_server::Cluster;
use tonic::{Request, Response, Status};

use crate::auth::Guard;
use crate::errors::ApiError;
use crate::header::HeaderSource;

/// This member as MemberList reports it.
#[derive(Clone, Debug)]
pub struct MemberInfo {
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
}

pub struct ClusterService {
    header: HeaderSource,
    me: MemberInfo,
    auth: Option<Guard>,
}

impl ClusterService {
    pub fn new(header: HeaderSource, me: MemberInfo) -> Self {
        Self { header, me, auth: None }
    }

    /// Checks membership changes against the auth store behind `auth`.
    pub fn with_auth(mut self, auth: Guard) -> Self {
        self.auth = Some(auth);
        self
    }

    /// etcd's `checkMembershipOperationPermission`: membership changes need the root role.
    fn check_member_op<T>(&self, req: &Request<T>) -> Result<(), Status> {
        match &self.auth {
            Some(auth) => auth.check_admin(&auth.caller(req)?),
            None => Ok(()),
        }
    }

    /// etcd's cluster service leaves the header revision at 0.
    fn header(&self) -> Option<pb::ResponseHeader> {
        Some(self.header.header(0))
    }

    fn members(&self) -> Vec<pb::Member> {
        vec![pb::Member {
            id: self.header.member_id(),
            name: self.me.name.clone(),
            peer_ur_ls: self.me.peer_urls.clone(),
            client_ur_ls: self.me.client_urls.clone(),
            is_learner: false,
        }]
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(&self, req: Request<pb::MemberAddRequest>) -> Result<Response<pb::MemberAddResponse>, Status> {
        self.check_member_op(&req)?;
        Err(ApiError::unimplemented("Cluster.MemberAdd").into())
    }

    async fn member_remove(
        &self,
        req: Request<pb::MemberRemoveRequest>,
    ) -> Result<Response<pb::MemberRemoveResponse>, Status> {
        self.check_member_op(&req)?;
        Err(ApiError::unimplemented("Cluster.MemberRemove").into())
    }

    async fn member_update(
        &self,
        req: Request<pb::MemberUpdateRequest>,
    ) -> Result<Response<pb::MemberUpdateResponse>, Status> {
        self.check_member_op(&req)?;
        Err(ApiError::unimplemented("Cluster.MemberUpdate").into())
    }

    async fn member_list(&self, _: Request<pb::MemberListRequest>) -> Result<Response<pb::MemberListResponse>, Status> {
        Ok(Response::new(pb::MemberListResponse { header: self.header(), members: self.members() }))
    }

    async fn member_promote(
        &self,
        req: Request<pb::MemberPromoteRequest>,
    ) -> Result<Response<pb::MemberPromoteResponse>, Status> {
        self.check_member_op(&req)?;
        Err(ApiError::unimplemented("Cluster.MemberPromote").into())
    }
}
