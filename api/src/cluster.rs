//! The Cluster service: membership as etcd reports and changes it (see `members`). Members
//! added here are recorded and listed but not started: Cairn does not replicate yet (issue #7).

use cairn_proto::etcdserverpb as pb;
use cairn_proto::etcdserverpb::cluster_server::Cluster;
use tonic::{Request, Response, Status};

use crate::auth::Guard;
use crate::errors::backend_status;
use crate::header::HeaderSource;
use crate::members::{parse_peer_urls, Member, Members};

pub struct ClusterService {
    header: HeaderSource,
    members: Members,
    auth: Option<Guard>,
}

impl ClusterService {
    pub fn new(header: HeaderSource, members: Members) -> Self {
        Self {
            header,
            members,
            auth: None,
        }
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

    async fn list(&self) -> Result<Vec<pb::Member>, Status> {
        Ok(self
            .members
            .list()
            .await
            .map_err(backend_status)?
            .into_iter()
            .map(to_pb)
            .collect())
    }
}

fn to_pb(m: Member) -> pb::Member {
    pb::Member {
        id: m.id,
        name: m.name,
        peer_ur_ls: m.peer_urls,
        client_ur_ls: m.client_urls,
        is_learner: m.is_learner,
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        req: Request<pb::MemberAddRequest>,
    ) -> Result<Response<pb::MemberAddResponse>, Status> {
        self.check_member_op(&req)?;
        let req = req.into_inner();
        let urls = parse_peer_urls(&req.peer_ur_ls)?;
        let (new, all) = self.members.add(urls, req.is_learner).await?;
        Ok(Response::new(pb::MemberAddResponse {
            header: self.header(),
            member: Some(pb::Member {
                id: new.id,
                peer_ur_ls: new.peer_urls,
                is_learner: new.is_learner,
                ..Default::default()
            }),
            members: all.into_iter().map(to_pb).collect(),
        }))
    }

    async fn member_remove(
        &self,
        req: Request<pb::MemberRemoveRequest>,
    ) -> Result<Response<pb::MemberRemoveResponse>, Status> {
        self.check_member_op(&req)?;
        let all = self.members.remove(req.into_inner().id).await?;
        Ok(Response::new(pb::MemberRemoveResponse {
            header: self.header(),
            members: all.into_iter().map(to_pb).collect(),
        }))
    }

    async fn member_update(
        &self,
        req: Request<pb::MemberUpdateRequest>,
    ) -> Result<Response<pb::MemberUpdateResponse>, Status> {
        self.check_member_op(&req)?;
        // etcd does not validate the URLs of an update.
        let req = req.into_inner();
        let all = self
            .members
            .update_peer_urls(req.id, req.peer_ur_ls)
            .await?;
        Ok(Response::new(pb::MemberUpdateResponse {
            header: self.header(),
            members: all.into_iter().map(to_pb).collect(),
        }))
    }

    async fn member_list(
        &self,
        _: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        Ok(Response::new(pb::MemberListResponse {
            header: self.header(),
            members: self.list().await?,
        }))
    }

    async fn member_promote(
        &self,
        req: Request<pb::MemberPromoteRequest>,
    ) -> Result<Response<pb::MemberPromoteResponse>, Status> {
        self.check_member_op(&req)?;
        let all = self.members.promote(req.into_inner().id).await?;
        Ok(Response::new(pb::MemberPromoteResponse {
            header: self.header(),
            members: all.into_iter().map(to_pb).collect(),
        }))
    }
}
