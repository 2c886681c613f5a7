//! [`Guard`]: the one place the services ask "who is calling, and may they do this?", with
//! etcd's checks for each kind of request (etcd's `apply_auth.go`, `v3_server.go` and the auth
//! wrappers of the maintenance and cluster servers).
//!
//! The caller is named by a token in the gRPC metadata (`token`, or `authorization` as etcd
//! 3.5 also accepts), or, with `--client-cert-auth` and no token, by the common name of the
//! verified client certificate.

use std::sync::Arc;

use cairn_backend::Backend;
use cairn_proto::etcdserverpb as pb;
use tonic::{Request, Status};

use super::perms::Access;
use super::store::AuthStore;
use super::tokens::TokenInfo;
use crate::conn::ConnInfo;
use crate::errors::{backend_status, ApiError};

/// Who sent a request: `None` when it carried no credentials.
#[derive(Clone, Debug, Default)]
pub struct Caller(pub Option<TokenInfo>);

impl Caller {
    pub fn username(&self) -> Option<&str> {
        self.0.as_ref().map(|i| i.username.as_str())
    }
}

/// The credentials a request carries.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    /// The `token` (or `authorization`) metadata; `Some(None)` when it is not valid text.
    token: Option<Option<String>>,
    /// The verified client certificate's CN, unless the request came through the JSON gateway
    /// (which proxies with the server's own certificate, whose CN is no user).
    common_name: Option<String>,
}

impl Credentials {
    pub fn of<T>(req: &Request<T>) -> Self {
        let md = req.metadata();
        let token = md.get("token").or_else(|| md.get("authorization")).map(|t| t.to_str().ok().map(str::to_string));
        let common_name = req
            .extensions()
            .get::<ConnInfo>()
            .and_then(|c| c.common_name.clone())
            .filter(|_| md.get("grpcgateway-accept").is_none());
        Self { token, common_name }
    }
}

#[derive(Clone)]
pub struct Guard {
    store: Arc<AuthStore>,
    backend: Arc<dyn Backend>,
}

impl Guard {
    pub fn new(store: Arc<AuthStore>, backend: Arc<dyn Backend>) -> Self {
        Self { store, backend }
    }

    /// A guard for a server without an auth store (auth stays disabled, every request passes).
    pub fn disabled(backend: Arc<dyn Backend>) -> Self {
        let store = AuthStore::new(backend.clone(), &super::AuthConfig::default()).expect("default auth config");
        Self { store, backend }
    }

    pub fn store(&self) -> &Arc<AuthStore> {
        &self.store
    }

    /// etcd's `AuthInfoFromCtx`: a token that does not check out is an error even when auth is
    /// disabled (etcd forgets simple tokens when auth is disabled).
    pub fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        self.resolve(&Credentials::of(req))
    }

    /// The caller named by credentials taken from a request earlier (a stream checks each
    /// watch it creates against the token as it is then).
    pub fn resolve(&self, creds: &Credentials) -> Result<Caller, Status> {
        if let Some(token) = &creds.token {
            let token = token.as_deref().ok_or(ApiError::InvalidAuthToken)?;
            return Ok(Caller(Some(self.store.token_info(token)?)));
        }
        if self.store.client_cert_auth {
            if let Some(cn) = &creds.common_name {
                return Ok(Caller(Some(TokenInfo { username: cn.clone(), revision: self.store.revision() })));
            }
        }
        Ok(Caller(None))
    }

    fn op(&self, who: &Caller, key: &[u8], range_end: &[u8], access: Access) -> Result<(), ApiError> {
        self.store.check_op(who.0.as_ref(), key, range_end, access)
    }

    /// Root role required (when auth is enabled).
    pub fn check_admin(&self, who: &Caller) -> Result<(), Status> {
        Ok(self.store.check_admin(who.0.as_ref())?)
    }

    /// etcd's `requireAuthInfo`: any authenticated user (when auth is enabled).
    pub fn require_user(&self, who: &Caller) -> Result<(), Status> {
        if self.store.is_enabled() && who.0.is_none() {
            return Err(ApiError::UserEmpty.into());
        }
        Ok(())
    }

    pub fn check_range(&self, who: &Caller, key: &[u8], range_end: &[u8]) -> Result<(), Status> {
        Ok(self.op(who, key, range_end, Access::Read)?)
    }

    pub async fn check_put(&self, who: &Caller, r: &pb::PutRequest) -> Result<(), Status> {
        let mut leases = Vec::new();
        self.put_checks(who, r, &mut leases)?;
        self.check_lease_writes(who, &leases).await
    }

    pub fn check_delete(&self, who: &Caller, r: &pb::DeleteRangeRequest) -> Result<(), Status> {
        self.op(who, &r.key, &r.range_end, Access::Write)?;
        if r.prev_kv {
            self.op(who, &r.key, &r.range_end, Access::Read)?;
        }
        Ok(())
    }

    /// Every compare and every op of a txn, nested txns included.
    pub async fn check_txn(&self, who: &Caller, r: &pb::TxnRequest) -> Result<(), Status> {
        if !self.store.is_enabled() {
            return Ok(());
        }
        let mut leases = Vec::new();
        self.txn_checks(who, r, &mut leases)?;
        self.check_lease_writes(who, &leases).await
    }

    fn put_checks(&self, who: &Caller, r: &pb::PutRequest, leases: &mut Vec<i64>) -> Result<(), ApiError> {
        self.op(who, &r.key, b"", Access::Write)?;
        if r.lease != 0 {
            leases.push(r.lease);
        }
        if r.prev_kv {
            self.op(who, &r.key, b"", Access::Read)?;
        }
        Ok(())
    }

    fn txn_checks(&self, who: &Caller, r: &pb::TxnRequest, leases: &mut Vec<i64>) -> Result<(), ApiError> {
        for c in &r.compare {
            self.op(who, &c.key, &c.range_end, Access::Read)?;
        }
        for op in r.success.iter().chain(&r.failure) {
            use pb::request_op::Request as Op;
            match &op.request {
                Some(Op::RequestRange(g)) => self.op(who, &g.key, &g.range_end, Access::Read)?,
                Some(Op::RequestPut(p)) => self.put_checks(who, p, leases)?,
                Some(Op::RequestDeleteRange(d)) => {
                    if d.prev_kv {
                        self.op(who, &d.key, &d.range_end, Access::Read)?;
                    }
                    self.op(who, &d.key, &d.range_end, Access::Write)?;
                }
                Some(Op::RequestTxn(t)) => self.txn_checks(who, t, leases)?,
                None => {}
            }
        }
        Ok(())
    }

    /// The keys attached to a lease (empty when it does not exist).
    async fn lease_keys(&self, id: i64) -> Result<Vec<Vec<u8>>, Status> {
        match self.backend.lease_time_to_live(id, true).await {
            Ok(info) => Ok(info.keys),
            Err(cairn_backend::BackendError::LeaseNotFound) => Ok(Vec::new()),
            Err(e) => Err(backend_status(e)),
        }
    }

    /// etcd's `checkLeasePuts`: attaching to or revoking a lease needs write permission on
    /// every key already attached to it (root may always).
    pub async fn check_lease_writes(&self, who: &Caller, leases: &[i64]) -> Result<(), Status> {
        if leases.is_empty() || self.store.check_admin(who.0.as_ref()).is_ok() {
            return Ok(());
        }
        for &id in leases {
            for key in self.lease_keys(id).await? {
                self.op(who, &key, b"", Access::Write)?;
            }
        }
        Ok(())
    }

    /// A keep-alive (etcd 3.5's `checkLeaseRenew`): an authenticated user with write
    /// permission on every attached key.
    pub async fn check_lease_renew(&self, who: &Caller, id: i64) -> Result<(), Status> {
        if !self.store.is_enabled() {
            return Ok(());
        }
        self.require_user(who)?;
        self.check_lease_writes(who, &[id]).await
    }

    /// LeaseRevoke: write permission on every attached key.
    pub async fn check_lease_revoke(&self, who: &Caller, id: i64) -> Result<(), Status> {
        self.check_lease_writes(who, &[id]).await
    }

    /// LeaseTimeToLive: an authenticated user, and with `keys` read permission on every
    /// attached key (etcd 3.5).
    pub async fn check_lease_time_to_live(&self, who: &Caller, id: i64, keys: bool) -> Result<(), Status> {
        self.require_user(who)?;
        if !keys || !self.store.is_enabled() || self.store.check_admin(who.0.as_ref()).is_ok() {
            return Ok(());
        }
        for key in self.lease_keys(id).await? {
            self.op(who, &key, b"", Access::Read)?;
        }
        Ok(())
    }

    /// LeaseLeases: an authenticated user with read permission on the keys of every lease
    /// (etcd 3.5).
    pub async fn check_lease_leases(&self, who: &Caller, ids: &[i64]) -> Result<(), Status> {
        if !self.store.is_enabled() {
            return Ok(());
        }
        self.require_user(who)?;
        if self.store.check_admin(who.0.as_ref()).is_ok() {
            return Ok(());
        }
        for &id in ids {
            for key in self.lease_keys(id).await? {
                self.op(who, &key, b"", Access::Read)?;
            }
        }
        Ok(())
    }

    /// For a watch create: `None` when permitted, else etcd's cancel reason. etcd 3.4 sends
    /// the text of the gRPC status error (`rpc error: code = PermissionDenied desc =
    /// etcdserver: permission denied`), not only its message.
    pub fn watch_denied(&self, creds: &Credentials, key: &[u8], range_end: &[u8]) -> Option<String> {
        // tonic's code names are grpc-go's (`PermissionDenied`, `InvalidArgument`, ...).
        let text = |s: Status| format!("rpc error: code = {:?} desc = {}", s.code(), s.message());
        let who = match self.resolve(creds) {
            Ok(w) => w,
            Err(s) => return Some(text(s)),
        };
        match self.op(&who, key, range_end, Access::Read) {
            Ok(()) => None,
            Err(e @ (ApiError::InvalidAuthToken | ApiError::AuthOldRevision | ApiError::UserEmpty)) => {
                Some(text(e.into()))
            }
            Err(_) => Some(text(ApiError::PermissionDenied.into())),
        }
    }
}
