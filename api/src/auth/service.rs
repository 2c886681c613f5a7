//! The Auth service: enabling auth, authenticating, and managing users and roles, with etcd's
//! admin rule (every management RPC needs the root role once auth is enabled, except that users
//! may read themselves and the roles they have).

use std::sync::Arc;

use cairn_backend::Backend;
use cairn_proto::authpb;
use cairn_proto::etcdserverpb as pb;
use cairn_proto::etcdserverpb::auth_server::Auth;
use tonic::{Request, Response, Status};

use super::guard::{Caller, Guard};
use super::state::{AuthState, Changed, Perm, PermType};
use crate::errors::{backend_status, ApiError};
use crate::header::HeaderSource;

pub struct AuthService {
    guard: Guard,
    backend: Arc<dyn Backend>,
    header: HeaderSource,
}

impl AuthService {
    pub fn new(guard: Guard, backend: Arc<dyn Backend>, header: HeaderSource) -> Self {
        Self { guard, backend, header }
    }

    /// etcd fills auth responses' headers with the current KV revision.
    async fn header(&self) -> Result<Option<pb::ResponseHeader>, Status> {
        let (rev, _) = self.backend.current_revision().await.map_err(backend_status)?;
        Ok(Some(self.header.header(rev)))
    }

    fn admin<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let who = self.guard.caller(req)?;
        self.guard.check_admin(&who)?;
        Ok(who)
    }

    /// An admin-only change of the auth state.
    async fn change<T, F>(&self, req: &Request<T>, change: F) -> Result<Option<pb::ResponseHeader>, Status>
    where
        F: Fn(&mut AuthState) -> Result<Changed, ApiError>,
    {
        self.admin(req)?;
        self.guard.store().update(change).await?;
        self.header().await
    }
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn auth_enable(&self, req: Request<pb::AuthEnableRequest>) -> Result<Response<pb::AuthEnableResponse>, Status> {
        let header = self.change(&req, |st| st.auth_enable()).await?;
        tracing::info!("enabled authentication");
        Ok(Response::new(pb::AuthEnableResponse { header }))
    }

    async fn auth_disable(
        &self,
        req: Request<pb::AuthDisableRequest>,
    ) -> Result<Response<pb::AuthDisableResponse>, Status> {
        let header = self.change(&req, |st| Ok(st.auth_disable())).await?;
        tracing::info!("disabled authentication");
        Ok(Response::new(pb::AuthDisableResponse { header }))
    }

    async fn auth_status(&self, req: Request<pb::AuthStatusRequest>) -> Result<Response<pb::AuthStatusResponse>, Status> {
        self.admin(&req)?;
        let snap = self.guard.store().reload().await?;
        Ok(Response::new(pb::AuthStatusResponse {
            header: self.header().await?,
            enabled: snap.state.enabled,
            auth_revision: snap.state.revision,
        }))
    }

    async fn authenticate(
        &self,
        req: Request<pb::AuthenticateRequest>,
    ) -> Result<Response<pb::AuthenticateResponse>, Status> {
        let req = req.into_inner();
        let token = self.guard.store().authenticate(&req.name, &req.password).await.inspect_err(|e| {
            if e.message() != ApiError::AuthNotEnabled.to_string() {
                tracing::warn!(user = %req.name, error = %e.message(), "invalid authentication was requested");
            }
        })?;
        Ok(Response::new(pb::AuthenticateResponse { header: self.header().await?, token }))
    }

    async fn user_add(&self, req: Request<pb::AuthUserAddRequest>) -> Result<Response<pb::AuthUserAddResponse>, Status> {
        self.admin(&req)?;
        let r = req.get_ref();
        let no_password = r.options.as_ref().is_some_and(|o| o.no_password);
        // etcd 3.5 hashes the given password (even an empty one) before the request enters raft.
        let hash = if no_password { String::new() } else { self.guard.store().hash_password(r.password.clone()).await? };
        let header = self.change(&req, |st| st.user_add(&r.name, hash.clone(), no_password)).await?;
        tracing::info!(user = %r.name, "added a user");
        Ok(Response::new(pb::AuthUserAddResponse { header }))
    }

    async fn user_get(&self, req: Request<pb::AuthUserGetRequest>) -> Result<Response<pb::AuthUserGetResponse>, Status> {
        let who = self.guard.caller(&req)?;
        let name = &req.get_ref().name;
        if let Err(e) = self.guard.check_admin(&who) {
            if who.username() != Some(name.as_str()) {
                return Err(e);
            }
        }
        let snap = self.guard.store().snapshot();
        let roles = snap.state.user_get(name)?.roles.clone();
        Ok(Response::new(pb::AuthUserGetResponse { header: self.header().await?, roles }))
    }

    async fn user_list(&self, req: Request<pb::AuthUserListRequest>) -> Result<Response<pb::AuthUserListResponse>, Status> {
        self.admin(&req)?;
        let users = self.guard.store().snapshot().state.users.keys().cloned().collect();
        Ok(Response::new(pb::AuthUserListResponse { header: self.header().await?, users }))
    }

    async fn user_delete(
        &self,
        req: Request<pb::AuthUserDeleteRequest>,
    ) -> Result<Response<pb::AuthUserDeleteResponse>, Status> {
        let name = req.get_ref().name.clone();
        let header = self.change(&req, |st| st.user_delete(&name)).await?;
        self.guard.store().invalidate_user(&name);
        tracing::info!(user = %name, "deleted a user");
        Ok(Response::new(pb::AuthUserDeleteResponse { header }))
    }

    async fn user_change_password(
        &self,
        req: Request<pb::AuthUserChangePasswordRequest>,
    ) -> Result<Response<pb::AuthUserChangePasswordResponse>, Status> {
        self.admin(&req)?;
        let r = req.get_ref();
        // As etcd 3.5: an empty password leaves an empty hash, which no password matches.
        let hash = if r.password.is_empty() { String::new() } else { self.guard.store().hash_password(r.password.clone()).await? };
        let header = self.change(&req, |st| st.user_change_password(&r.name, hash.clone())).await?;
        self.guard.store().invalidate_user(&r.name);
        tracing::info!(user = %r.name, "changed a password of a user");
        Ok(Response::new(pb::AuthUserChangePasswordResponse { header }))
    }

    async fn user_grant_role(
        &self,
        req: Request<pb::AuthUserGrantRoleRequest>,
    ) -> Result<Response<pb::AuthUserGrantRoleResponse>, Status> {
        let r = req.get_ref();
        let header = self.change(&req, |st| st.user_grant_role(&r.user, &r.role)).await?;
        Ok(Response::new(pb::AuthUserGrantRoleResponse { header }))
    }

    async fn user_revoke_role(
        &self,
        req: Request<pb::AuthUserRevokeRoleRequest>,
    ) -> Result<Response<pb::AuthUserRevokeRoleResponse>, Status> {
        let r = req.get_ref();
        let header = self.change(&req, |st| st.user_revoke_role(&r.name, &r.role)).await?;
        Ok(Response::new(pb::AuthUserRevokeRoleResponse { header }))
    }

    async fn role_add(&self, req: Request<pb::AuthRoleAddRequest>) -> Result<Response<pb::AuthRoleAddResponse>, Status> {
        let r = req.get_ref();
        let header = self.change(&req, |st| st.role_add(&r.name)).await?;
        Ok(Response::new(pb::AuthRoleAddResponse { header }))
    }

    async fn role_get(&self, req: Request<pb::AuthRoleGetRequest>) -> Result<Response<pb::AuthRoleGetResponse>, Status> {
        let who = self.guard.caller(&req)?;
        let role = &req.get_ref().role;
        let snap = self.guard.store().snapshot();
        if let Err(e) = self.guard.check_admin(&who) {
            if !who.username().is_some_and(|u| snap.state.has_role(u, role)) {
                return Err(e);
            }
        }
        let perm = snap
            .state
            .role_get(role)?
            .perms
            .iter()
            .map(|p| authpb::Permission {
                perm_type: p.perm_type.as_i32(),
                key: p.key.clone(),
                range_end: p.range_end.clone(),
            })
            .collect();
        Ok(Response::new(pb::AuthRoleGetResponse { header: self.header().await?, perm }))
    }

    async fn role_list(&self, req: Request<pb::AuthRoleListRequest>) -> Result<Response<pb::AuthRoleListResponse>, Status> {
        self.admin(&req)?;
        let roles = self.guard.store().snapshot().state.roles.keys().cloned().collect();
        Ok(Response::new(pb::AuthRoleListResponse { header: self.header().await?, roles }))
    }

    async fn role_delete(
        &self,
        req: Request<pb::AuthRoleDeleteRequest>,
    ) -> Result<Response<pb::AuthRoleDeleteResponse>, Status> {
        let r = req.get_ref();
        let header = self.change(&req, |st| st.role_delete(&r.role)).await?;
        Ok(Response::new(pb::AuthRoleDeleteResponse { header }))
    }

    async fn role_grant_permission(
        &self,
        req: Request<pb::AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<pb::AuthRoleGrantPermissionResponse>, Status> {
        let r = req.get_ref();
        let perm = r.perm.as_ref().map(|p| Perm {
            perm_type: PermType::from_i32(p.perm_type),
            key: p.key.clone(),
            range_end: p.range_end.clone(),
        });
        let header = self.change(&req, |st| st.role_grant_permission(&r.name, perm.clone())).await?;
        Ok(Response::new(pb::AuthRoleGrantPermissionResponse { header }))
    }

    async fn role_revoke_permission(
        &self,
        req: Request<pb::AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<pb::AuthRoleRevokePermissionResponse>, Status> {
        let r = req.get_ref();
        let header = self.change(&req, |st| st.role_revoke_permission(&r.role, &r.key, &r.range_end)).await?;
        Ok(Response::new(pb::AuthRoleRevokePermissionResponse { header }))
    }
}
