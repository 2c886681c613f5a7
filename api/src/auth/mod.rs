//! etcd's authentication and authorization.
//!
//! - `state`: users, roles, permissions, the enabled flag and auth revision, and etcd's rules
//!   for changing them (pure data, serialized as one backend document).
//! - `perms`: the per-user range permission cache.
//! - `tokens`: simple and JWT tokens (`--auth-token`).
//! - `store`: [`AuthStore`], persistence with compare-and-set, the cached state, Authenticate,
//!   and the permission checks.
//! - `guard`: [`Guard`], which every service uses to name the caller and check a request.
//! - `service`: the Auth gRPC service.

pub mod guard;
pub mod perms;
pub mod service;
pub mod state;
pub mod store;
pub mod tokens;

pub use guard::{Caller, Credentials, Guard};
pub use service::AuthService;
pub use store::{AuthConfig, AuthStore};
