//! The auth store: the [`AuthState`] document in the backend (`doc_get`/`doc_put("auth")`),
//! a cached copy with its permission cache, the token provider, and etcd's permission checks.
//!
//! Writes are compare-and-set on the document version and retried on conflict, so several
//! Cairn processes sharing one backend never lose each other's changes. Each process serves
//! checks from its cache: its own writes install the new state at once, and a background task
//! re-reads the document every [`RELOAD_INTERVAL`] to pick up other processes' writes.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use cairn_backend::Backend;

use super::perms::{Access, PermCache};
use super::state::{AuthState, Changed};
use super::tokens::{TokenInfo, Tokens};
use crate::errors::{backend_status, ApiError};

/// The backend document that holds the auth state.
pub const DOC_NAME: &str = "auth";

/// The stored auth document's state.
pub fn parse_doc(value: &[u8]) -> Result<AuthState, String> {
    serde_json::from_slice(value).map_err(|e| format!("corrupt auth store: {e}"))
}

/// How often the document is re-read for changes made by other processes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Go's bcrypt bounds and default cost (etcd falls back to the default outside them).
const BCRYPT_MIN_COST: u32 = 4;
const BCRYPT_MAX_COST: u32 = 31;
const BCRYPT_DEFAULT_COST: u32 = 10;

/// One version of the auth state with what is derived from it.
#[derive(Debug)]
pub struct Snapshot {
    /// The document version (0: no document yet).
    pub version: u64,
    pub state: AuthState,
    pub perms: PermCache,
}

impl Snapshot {
    fn new(version: u64, state: AuthState) -> Self {
        let perms = PermCache::build(&state);
        Self { version, state, perms }
    }
}

/// Settings from etcd's flags.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    /// `--auth-token`.
    pub token: String,
    /// `--auth-token-ttl`.
    pub token_ttl: Duration,
    /// `--bcrypt-cost`.
    pub bcrypt_cost: u32,
    /// `--client-cert-auth`: a verified client certificate's CN names the user when a request
    /// carries no token.
    pub client_cert_auth: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            token: "simple".into(),
            token_ttl: Duration::from_secs(300),
            bcrypt_cost: BCRYPT_DEFAULT_COST,
            client_cert_auth: false,
        }
    }
}

pub struct AuthStore {
    backend: Arc<dyn Backend>,
    tokens: Tokens,
    bcrypt_cost: u32,
    pub(crate) client_cert_auth: bool,
    current: RwLock<Arc<Snapshot>>,
    /// Serializes this process's writers (the CAS loop still guards against other processes).
    writer: tokio::sync::Mutex<()>,
}

impl AuthStore {
    /// Loads the auth state from the backend.
    pub async fn open(backend: Arc<dyn Backend>, cfg: &AuthConfig) -> anyhow::Result<Arc<Self>> {
        let store = Self::new(backend, cfg)?;
        if matches!(store.tokens, Tokens::Simple(_)) {
            tracing::warn!("simple token is not cryptographically signed");
        }
        store.reload().await.map_err(|s| anyhow::anyhow!("loading the auth store: {}", s.message()))?;
        Ok(store)
    }

    /// A store with the initial state (auth disabled), not yet loaded from the backend.
    pub fn new(backend: Arc<dyn Backend>, cfg: &AuthConfig) -> anyhow::Result<Arc<Self>> {
        let tokens = Tokens::from_flag(&cfg.token, cfg.token_ttl)?;
        let bcrypt_cost = if (BCRYPT_MIN_COST..=BCRYPT_MAX_COST).contains(&cfg.bcrypt_cost) {
            cfg.bcrypt_cost
        } else {
            tracing::warn!(given = cfg.bcrypt_cost, "use default bcrypt cost instead of the invalid given cost");
            BCRYPT_DEFAULT_COST
        };
        let store = Arc::new(Self {
            backend,
            tokens,
            bcrypt_cost,
            client_cert_auth: cfg.client_cert_auth,
            current: RwLock::new(Arc::new(Snapshot::new(0, AuthState::default()))),
            writer: tokio::sync::Mutex::new(()),
        });
        Ok(store)
    }

    /// Keeps re-reading the document until the returned task is aborted.
    pub fn spawn_reload(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = this.reload().await {
                    tracing::debug!(error = %e.message(), "could not reload the auth store");
                }
            }
        })
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.read().expect("auth snapshot").clone()
    }

    pub fn is_enabled(&self) -> bool {
        self.snapshot().state.enabled
    }

    pub fn revision(&self) -> u64 {
        self.snapshot().state.revision
    }

    fn install(&self, snap: Snapshot) -> Arc<Snapshot> {
        let snap = Arc::new(snap);
        let mut cur = self.current.write().expect("auth snapshot");
        // Never go back to an older version (a slow reload racing a local write).
        if snap.version >= cur.version {
            self.tokens.set_enabled(snap.state.enabled);
            *cur = snap.clone();
        }
        cur.clone()
    }

    async fn read_doc(&self) -> Result<Snapshot, tonic::Status> {
        match self.backend.doc_get(DOC_NAME).await.map_err(backend_status)? {
            None => Ok(Snapshot::new(0, AuthState::default())),
            Some(doc) => {
                let state = parse_doc(&doc.value).map_err(|e| tonic::Status::from(ApiError::Internal(e)))?;
                Ok(Snapshot::new(doc.version, state))
            }
        }
    }

    /// Re-reads the document when its version moved.
    pub async fn reload(&self) -> Result<Arc<Snapshot>, tonic::Status> {
        let snap = self.read_doc().await?;
        if snap.version == self.snapshot().version {
            return Ok(self.snapshot());
        }
        Ok(self.install(snap))
    }

    /// Applies `change` to the newest state and stores the result, retrying when another
    /// writer got there first. Returns the state as stored.
    pub async fn update<F>(&self, change: F) -> Result<Arc<Snapshot>, tonic::Status>
    where
        F: Fn(&mut AuthState) -> Result<Changed, ApiError>,
    {
        let _writer = self.writer.lock().await;
        loop {
            let cur = self.read_doc().await?;
            let mut state = cur.state.clone();
            if !change(&mut state)? {
                return Ok(self.install(cur));
            }
            let value = serde_json::to_vec(&state).map_err(|e| tonic::Status::internal(e.to_string()))?;
            if let Some(version) = self.backend.doc_put(DOC_NAME, cur.version, value).await.map_err(backend_status)? {
                return Ok(self.install(Snapshot::new(version, state)));
            }
            tracing::debug!("auth store changed concurrently; retrying");
        }
    }

    /// A bcrypt hash of `password` at --bcrypt-cost, in Go's "$2a$" form (off the async threads:
    /// bcrypt is slow on purpose).
    pub async fn hash_password(&self, password: String) -> Result<String, tonic::Status> {
        let cost = self.bcrypt_cost;
        tokio::task::spawn_blocking(move || {
            bcrypt::hash_with_result(password, cost).map(|h| h.format_for_version(bcrypt::Version::TwoA))
        })
        .await
        .map_err(|e| tonic::Status::internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()).into())
    }

    /// etcd's Authenticate: checks the password against the newest state and issues a token,
    /// retrying when the auth revision moved while the (slow) password check ran.
    pub async fn authenticate(&self, name: &str, password: &str) -> Result<String, tonic::Status> {
        loop {
            let snap = self.reload().await?;
            if !snap.state.enabled {
                return Err(ApiError::AuthNotEnabled.into());
            }
            let user = snap.state.users.get(name).ok_or(ApiError::AuthFailed)?;
            if user.no_password {
                return Err(ApiError::NoPasswordUser.into());
            }
            let (hash, pw) = (user.password.clone(), password.to_string());
            let ok = tokio::task::spawn_blocking(move || bcrypt::verify(pw, &hash).unwrap_or(false))
                .await
                .map_err(|e| tonic::Status::internal(e.to_string()))?;
            if !ok {
                tracing::info!(user = name, "invalid password");
                return Err(ApiError::AuthFailed.into());
            }
            if self.revision() == snap.state.revision {
                return self
                    .tokens
                    .assign(name, snap.state.revision)
                    .map_err(|e| ApiError::Internal(e.to_string()).into());
            }
            tracing::info!("revision when password checked became stale; retrying");
        }
    }

    /// The user a token speaks for.
    pub fn token_info(&self, token: &str) -> Result<TokenInfo, ApiError> {
        self.tokens.info(token, self.revision()).ok_or_else(|| {
            tracing::warn!("invalid auth token");
            ApiError::InvalidAuthToken
        })
    }

    pub fn invalidate_user(&self, name: &str) {
        self.tokens.invalidate_user(name);
    }

    /// etcd's `isOpPermitted`: reads and writes of keys.
    pub fn check_op(&self, who: Option<&TokenInfo>, key: &[u8], range_end: &[u8], access: Access) -> Result<(), ApiError> {
        let snap = self.snapshot();
        if !snap.state.enabled {
            return Ok(());
        }
        let who = match who {
            Some(w) if w.revision != 0 => w,
            _ => return Err(ApiError::UserEmpty),
        };
        if who.revision < snap.state.revision {
            return Err(ApiError::AuthOldRevision);
        }
        let Some(user) = snap.state.users.get(&who.username) else {
            return Err(ApiError::PermissionDenied);
        };
        if user.has_root_role() || snap.perms.permits(&who.username, key, range_end, access) {
            return Ok(());
        }
        Err(ApiError::PermissionDenied)
    }

    /// etcd's `IsAdminPermitted`: the user has the root role.
    pub fn check_admin(&self, who: Option<&TokenInfo>) -> Result<(), ApiError> {
        let snap = self.snapshot();
        if !snap.state.enabled {
            return Ok(());
        }
        let who = match who {
            Some(w) if !w.username.is_empty() => w,
            _ => return Err(ApiError::UserEmpty),
        };
        match snap.state.users.get(&who.username) {
            None => Err(ApiError::UserNotFound),
            Some(u) if !u.has_root_role() => Err(ApiError::PermissionDenied),
            Some(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::state::{Perm, PermType};

    async fn store() -> Arc<AuthStore> {
        let cfg = AuthConfig { bcrypt_cost: 4, ..Default::default() };
        AuthStore::open(cairn_memory::MemoryBackend::new(), &cfg).await.unwrap()
    }

    async fn enable_with_root(s: &AuthStore) {
        let hash = s.hash_password("rootpw".into()).await.unwrap();
        s.update(|st| st.user_add("root", hash.clone(), false)).await.unwrap();
        s.update(|st| st.user_grant_role("root", "root")).await.unwrap();
        s.update(|st| st.auth_enable()).await.unwrap();
    }

    #[tokio::test]
    async fn state_survives_reopen() {
        let backend = cairn_memory::MemoryBackend::new();
        let cfg = AuthConfig { bcrypt_cost: 4, ..Default::default() };
        let s = AuthStore::open(backend.clone(), &cfg).await.unwrap();
        s.update(|st| st.role_add("r")).await.unwrap();
        let again = AuthStore::open(backend, &cfg).await.unwrap();
        assert!(again.snapshot().state.roles.contains_key("r"));
        assert_eq!(again.revision(), 2);
    }

    #[tokio::test]
    async fn concurrent_stores_do_not_lose_writes() {
        let backend = cairn_memory::MemoryBackend::new();
        let cfg = AuthConfig { bcrypt_cost: 4, ..Default::default() };
        let a = AuthStore::open(backend.clone(), &cfg).await.unwrap();
        let b = AuthStore::open(backend, &cfg).await.unwrap();
        a.update(|st| st.role_add("a")).await.unwrap();
        b.update(|st| st.role_add("b")).await.unwrap();
        let snap = a.reload().await.unwrap();
        assert!(snap.state.roles.contains_key("a") && snap.state.roles.contains_key("b"));
        assert_eq!(snap.state.revision, 3);
    }

    #[tokio::test]
    async fn authenticate_and_check() {
        let s = store().await;
        assert_eq!(s.authenticate("root", "x").await.unwrap_err().message(), "etcdserver: authentication is not enabled");
        enable_with_root(&s).await;
        let err = s.authenticate("root", "wrong").await.unwrap_err();
        assert_eq!(err.message(), "etcdserver: authentication failed, invalid user ID or password");
        assert!(s.authenticate("nobody", "x").await.is_err());
        let token = s.authenticate("root", "rootpw").await.unwrap();
        let who = s.token_info(&token).unwrap();
        assert_eq!(who.username, "root");
        assert_eq!(s.check_op(Some(&who), b"any", b"", Access::Write), Ok(()));
        assert_eq!(s.check_admin(Some(&who)), Ok(()));
        assert_eq!(s.check_op(None, b"any", b"", Access::Read), Err(ApiError::UserEmpty));
        assert_eq!(s.token_info("bogus.1"), Err(ApiError::InvalidAuthToken));

        let hash = s.hash_password("pw".into()).await.unwrap();
        s.update(|st| st.user_add("u", hash.clone(), false)).await.unwrap();
        s.update(|st| st.role_add("r")).await.unwrap();
        let perm = Perm { perm_type: PermType::Read, key: b"k".to_vec(), range_end: b"\0".to_vec() };
        s.update(|st| st.role_grant_permission("r", Some(perm.clone()))).await.unwrap();
        s.update(|st| st.user_grant_role("u", "r")).await.unwrap();
        let who = s.token_info(&s.authenticate("u", "pw").await.unwrap()).unwrap();
        assert_eq!(s.check_op(Some(&who), b"z", b"", Access::Read), Ok(()));
        assert_eq!(s.check_op(Some(&who), b"z", b"", Access::Write), Err(ApiError::PermissionDenied));
        assert_eq!(s.check_admin(Some(&who)), Err(ApiError::PermissionDenied));
        let stale = TokenInfo { username: "u".into(), revision: 1 };
        assert_eq!(s.check_op(Some(&stale), b"z", b"", Access::Read), Err(ApiError::AuthOldRevision));
    }
}
