//! The auth store's state (users, roles, the enabled flag, the auth revision) and etcd's rules
//! for changing it. Pure data: [`super::store::AuthStore`] persists it and serves it.
//!
//! Each change follows etcd 3.5's `auth/store.go`: the same checks in the same order, the same
//! errors, and the auth revision advanced exactly where etcd advances it (enabling auth does
//! not; a duplicate grant of a role does not).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::errors::ApiError;

pub const ROOT_USER: &str = "root";
pub const ROOT_ROLE: &str = "root";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PermType {
    Read,
    Write,
    ReadWrite,
}

impl PermType {
    /// From authpb's `Permission.Type` number (READ = 0, WRITE = 1, READWRITE = 2).
    pub fn from_i32(v: i32) -> Self {
        match v {
            1 => PermType::Write,
            2 => PermType::ReadWrite,
            _ => PermType::Read,
        }
    }

    pub fn as_i32(self) -> i32 {
        match self {
            PermType::Read => 0,
            PermType::Write => 1,
            PermType::ReadWrite => 2,
        }
    }
}

/// A key-range permission: one key (`range_end` empty), `[key, range_end)`, or from `key` on
/// (`range_end` = "\0").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Perm {
    pub perm_type: PermType,
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Sorted, as etcd keeps them (it binary-searches for "root").
    pub roles: Vec<String>,
    /// The bcrypt hash; empty for users without a password.
    pub password: String,
    pub no_password: bool,
}

impl User {
    pub fn has_root_role(&self) -> bool {
        self.roles.binary_search_by(|r| r.as_str().cmp(ROOT_ROLE)).is_ok()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    /// Sorted by key.
    pub perms: Vec<Perm>,
}

/// Everything the auth store keeps, serialized as one document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthState {
    pub enabled: bool,
    pub revision: u64,
    pub users: BTreeMap<String, User>,
    pub roles: BTreeMap<String, Role>,
}

impl Default for AuthState {
    /// A new store: etcd commits auth revision 1 when it creates the auth buckets.
    fn default() -> Self {
        Self { enabled: false, revision: 1, users: BTreeMap::new(), roles: BTreeMap::new() }
    }
}

/// Whether a change altered the state (and so must be persisted).
pub type Changed = bool;

impl AuthState {
    fn bump(&mut self) -> Changed {
        self.revision += 1;
        true
    }

    pub fn auth_enable(&mut self) -> Result<Changed, ApiError> {
        if self.enabled {
            return Ok(false);
        }
        let root = self.users.get(ROOT_USER).ok_or(ApiError::RootUserNotExist)?;
        if !root.has_root_role() {
            return Err(ApiError::RootRoleNotExist);
        }
        self.enabled = true;
        Ok(true)
    }

    pub fn auth_disable(&mut self) -> Changed {
        if !self.enabled {
            return false;
        }
        self.enabled = false;
        self.bump()
    }

    /// `password` is the bcrypt hash, or empty for a user without a password.
    pub fn user_add(&mut self, name: &str, password: String, no_password: bool) -> Result<Changed, ApiError> {
        if name.is_empty() {
            return Err(ApiError::UserEmpty);
        }
        if self.users.contains_key(name) {
            return Err(ApiError::UserAlreadyExist);
        }
        let password = if no_password { String::new() } else { password };
        self.users.insert(name.to_string(), User { roles: Vec::new(), password, no_password });
        Ok(self.bump())
    }

    pub fn user_delete(&mut self, name: &str) -> Result<Changed, ApiError> {
        if self.enabled && name == ROOT_USER {
            return Err(ApiError::InvalidAuthMgmt);
        }
        self.users.remove(name).ok_or(ApiError::UserNotFound)?;
        Ok(self.bump())
    }

    pub fn user_change_password(&mut self, name: &str, password: String) -> Result<Changed, ApiError> {
        let user = self.users.get_mut(name).ok_or(ApiError::UserNotFound)?;
        if !user.no_password {
            user.password = password;
        }
        Ok(self.bump())
    }

    pub fn user_grant_role(&mut self, name: &str, role: &str) -> Result<Changed, ApiError> {
        if !self.users.contains_key(name) {
            return Err(ApiError::UserNotFound);
        }
        if role != ROOT_ROLE && !self.roles.contains_key(role) {
            return Err(ApiError::RoleNotFound);
        }
        let user = self.users.get_mut(name).expect("checked above");
        match user.roles.binary_search_by(|r| r.as_str().cmp(role)) {
            Ok(_) => Ok(false),
            Err(at) => {
                user.roles.insert(at, role.to_string());
                Ok(self.bump())
            }
        }
    }

    pub fn user_get(&self, name: &str) -> Result<&User, ApiError> {
        self.users.get(name).ok_or(ApiError::UserNotFound)
    }

    pub fn user_revoke_role(&mut self, name: &str, role: &str) -> Result<Changed, ApiError> {
        if self.enabled && name == ROOT_USER && role == ROOT_ROLE {
            return Err(ApiError::InvalidAuthMgmt);
        }
        let user = self.users.get_mut(name).ok_or(ApiError::UserNotFound)?;
        let before = user.roles.len();
        user.roles.retain(|r| r != role);
        if user.roles.len() == before {
            return Err(ApiError::RoleNotGranted);
        }
        Ok(self.bump())
    }

    pub fn role_get(&self, name: &str) -> Result<&Role, ApiError> {
        self.roles.get(name).ok_or(ApiError::RoleNotFound)
    }

    pub fn role_add(&mut self, name: &str) -> Result<Changed, ApiError> {
        if name.is_empty() {
            return Err(ApiError::RoleEmpty);
        }
        if self.roles.contains_key(name) {
            return Err(ApiError::RoleAlreadyExist);
        }
        self.roles.insert(name.to_string(), Role::default());
        Ok(self.bump())
    }

    /// Deletes the role and takes it away from every user that had it.
    pub fn role_delete(&mut self, name: &str) -> Result<Changed, ApiError> {
        if self.enabled && name == ROOT_ROLE {
            return Err(ApiError::InvalidAuthMgmt);
        }
        self.roles.remove(name).ok_or(ApiError::RoleNotFound)?;
        for user in self.users.values_mut() {
            user.roles.retain(|r| r != name);
        }
        Ok(self.bump())
    }

    pub fn role_grant_permission(&mut self, name: &str, perm: Option<Perm>) -> Result<Changed, ApiError> {
        let perm = perm.ok_or(ApiError::PermissionNotGiven)?;
        if !is_valid_permission_range(&perm.key, &perm.range_end) {
            return Err(ApiError::InvalidAuthMgmt);
        }
        let role = self.roles.get_mut(name).ok_or(ApiError::RoleNotFound)?;
        // etcd looks only at the first permission whose key is >= the new key.
        let at = role.perms.partition_point(|p| p.key < perm.key);
        match role.perms.get_mut(at) {
            Some(p) if p.key == perm.key && p.range_end == perm.range_end => p.perm_type = perm.perm_type,
            _ => {
                role.perms.push(perm);
                role.perms.sort_by(|a, b| a.key.cmp(&b.key));
            }
        }
        Ok(self.bump())
    }

    pub fn role_revoke_permission(&mut self, name: &str, key: &[u8], range_end: &[u8]) -> Result<Changed, ApiError> {
        let role = self.roles.get_mut(name).ok_or(ApiError::RoleNotFound)?;
        let before = role.perms.len();
        role.perms.retain(|p| p.key != key || p.range_end != range_end);
        if role.perms.len() == before {
            return Err(ApiError::PermissionNotGranted);
        }
        Ok(self.bump())
    }

    /// Whether `user` exists and has `role`.
    pub fn has_role(&self, user: &str, role: &str) -> bool {
        self.users.get(user).is_some_and(|u| u.roles.iter().any(|r| r == role))
    }
}

/// etcd 3.5's rule for granted ranges: a key is required; the end is empty (one key), "\0"
/// (from the key on) or after the key.
fn is_valid_permission_range(key: &[u8], range_end: &[u8]) -> bool {
    if key.is_empty() {
        return false;
    }
    range_end.is_empty() || range_end == [0] || key < range_end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_root() -> AuthState {
        let mut st = AuthState::default();
        st.user_add("root", "hash".into(), false).unwrap();
        st
    }

    #[test]
    fn a_new_store_is_at_revision_one() {
        assert_eq!(AuthState::default().revision, 1);
    }

    #[test]
    fn enable_needs_root_user_with_root_role() {
        let mut st = AuthState::default();
        assert_eq!(st.auth_enable(), Err(ApiError::RootUserNotExist));
        st.user_add("root", "h".into(), false).unwrap();
        assert_eq!(st.auth_enable(), Err(ApiError::RootRoleNotExist));
        st.user_grant_role("root", "root").unwrap();
        let rev = st.revision;
        assert_eq!(st.auth_enable(), Ok(true));
        assert_eq!(st.revision, rev, "enabling does not advance the auth revision");
        assert_eq!(st.auth_enable(), Ok(false));
        assert!(st.auth_disable());
        assert_eq!(st.revision, rev + 1);
        assert!(!st.auth_disable());
    }

    #[test]
    fn users() {
        let mut st = with_root();
        assert_eq!(st.user_add("", "h".into(), false), Err(ApiError::UserEmpty));
        assert_eq!(st.user_add("root", "h".into(), false), Err(ApiError::UserAlreadyExist));
        assert_eq!(st.user_grant_role("nobody", "root"), Err(ApiError::UserNotFound));
        assert_eq!(st.user_grant_role("root", "nope"), Err(ApiError::RoleNotFound));
        st.user_grant_role("root", "root").unwrap();
        let rev = st.revision;
        assert_eq!(st.user_grant_role("root", "root"), Ok(false));
        assert_eq!(st.revision, rev);
        assert_eq!(st.user_revoke_role("root", "x"), Err(ApiError::RoleNotGranted));
        st.auth_enable().unwrap();
        assert_eq!(st.user_revoke_role("root", "root"), Err(ApiError::InvalidAuthMgmt));
        assert_eq!(st.user_delete("root"), Err(ApiError::InvalidAuthMgmt));
        assert_eq!(st.user_delete("nobody"), Err(ApiError::UserNotFound));
        st.user_add("nopass", String::new(), true).unwrap();
        st.user_change_password("nopass", "x".into()).unwrap();
        assert_eq!(st.user_get("nopass").unwrap().password, "");
    }

    #[test]
    fn roles_sorted_in_users() {
        let mut st = with_root();
        for r in ["b", "a", "c"] {
            st.role_add(r).unwrap();
            st.user_grant_role("root", r).unwrap();
        }
        assert_eq!(st.user_get("root").unwrap().roles, ["a", "b", "c"]);
        st.role_delete("b").unwrap();
        assert_eq!(st.user_get("root").unwrap().roles, ["a", "c"]);
        assert_eq!(st.role_add(""), Err(ApiError::RoleEmpty));
        assert_eq!(st.role_add("a"), Err(ApiError::RoleAlreadyExist));
        assert_eq!(st.role_delete("zz"), Err(ApiError::RoleNotFound));
    }

    #[test]
    fn permissions() {
        let mut st = with_root();
        st.role_add("r").unwrap();
        let p = |k: &str, e: &str, t| Some(Perm { perm_type: t, key: k.into(), range_end: e.into() });
        assert_eq!(st.role_grant_permission("r", None), Err(ApiError::PermissionNotGiven));
        assert_eq!(st.role_grant_permission("r", p("", "", PermType::Read)), Err(ApiError::InvalidAuthMgmt));
        assert_eq!(st.role_grant_permission("r", p("b", "a", PermType::Read)), Err(ApiError::InvalidAuthMgmt));
        assert_eq!(st.role_grant_permission("x", p("a", "", PermType::Read)), Err(ApiError::RoleNotFound));
        st.role_grant_permission("r", p("b", "", PermType::Read)).unwrap();
        st.role_grant_permission("r", p("a", "\0", PermType::Write)).unwrap();
        st.role_grant_permission("r", p("b", "", PermType::ReadWrite)).unwrap();
        let perms = &st.role_get("r").unwrap().perms;
        assert_eq!(perms.len(), 2);
        assert_eq!(perms[0].key, b"a");
        assert_eq!(perms[1].perm_type, PermType::ReadWrite);
        assert_eq!(st.role_revoke_permission("r", b"b", b"x"), Err(ApiError::PermissionNotGranted));
        st.role_revoke_permission("r", b"b", b"").unwrap();
        assert_eq!(st.role_get("r").unwrap().perms.len(), 1);
    }

    #[test]
    fn serializes_round_trip() {
        let mut st = with_root();
        st.role_add("r").unwrap();
        let json = serde_json::to_vec(&st).unwrap();
        assert_eq!(serde_json::from_slice::<AuthState>(&json).unwrap(), st);
    }
}
