//! `auth/*`: users, roles, key-range permissions, AuthEnable/Authenticate/AuthDisable and
//! etcd's auth errors, to the letter.
//!
//! Enabling auth is global, so these cases run only with `--allow-auth`, and only when auth is
//! disabled and no user `root` exists (the kit must be able to authenticate as root to disable
//! auth again). Every user and role the kit creates is named `cairn-compat-<hex>-...`; `root`
//! (and the role `root` when it did not exist) is created by the kit with a random password.
//! After each case, whatever its outcome (also after a timeout), [`restore`] disables auth as
//! root and deletes what the kit created, so the endpoint is left as found; when that fails
//! the case fails and its detail says what is left (with root's password).

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, ensure, Context as _};
use cairn_proto::authpb::permission::Type as PermType;
use cairn_proto::authpb::Permission;
use cairn_proto::etcdserverpb::*;
use tonic::Code;

use super::{expect_status, Ctx};
use crate::client::*;

const EMPTY_USER: &str = "etcdserver: user name is empty";
const AUTH_FAILED: &str = "etcdserver: authentication failed, invalid user ID or password";
const DENIED: &str = "etcdserver: permission denied";

/// What the `auth/*` cases of one run created.
pub struct AuthRun {
    /// Prefix of every user and role name the kit creates.
    pub tag: String,
    /// The password of the `root` user the kit creates.
    pub root_pw: String,
    /// A case passed the preconditions and may have changed the auth store.
    touched: AtomicBool,
    created_root_user: AtomicBool,
    created_root_role: AtomicBool,
}

impl AuthRun {
    pub fn new() -> Self {
        Self {
            tag: format!("cairn-compat-{:08x}", rand::random::<u32>()),
            root_pw: format!("root-{:016x}", rand::random::<u64>()),
            touched: AtomicBool::new(false),
            created_root_user: AtomicBool::new(false),
            created_root_role: AtomicBool::new(false),
        }
    }
}

impl Default for AuthRun {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether auth is enabled: an unauthenticated Range is refused with `user name is empty`.
async fn enabled(c: &Clients) -> anyhow::Result<bool> {
    match c.without_token().kv.range(get("/cairn-compat/auth-probe")).await {
        Ok(_) => Ok(false),
        Err(e) if e.code() == Code::InvalidArgument && e.message() == EMPTY_USER => Ok(true),
        Err(e) => Err(e).context("probing whether auth is enabled"),
    }
}

/// `None` when the case may run; else why it is skipped.
async fn precondition(x: &Ctx) -> anyhow::Result<Option<String>> {
    if !x.opts.allow_auth {
        return Ok(Some("skipped: enables auth (global); pass --allow-auth".into()));
    }
    if x.opts.client_cert_auth {
        return Ok(Some(
            "skipped: with --client-cert-auth the certificate's CN is the user of requests without a token".into(),
        ));
    }
    if enabled(&x.c).await? {
        return Ok(Some("skipped: auth is already enabled on the endpoint".into()));
    }
    let mut c = x.c.without_token();
    match c.auth.user_get(AuthUserGetRequest { name: "root".into() }).await {
        Ok(_) if !x.auth.created_root_user.load(Ordering::SeqCst) => {
            return Ok(Some("skipped: a user root exists already; the kit needs to create it".into()))
        }
        Ok(_) => {}
        Err(e) if e.message() == "etcdserver: user name not found" => {}
        Err(e) => return Err(e).context("UserGet root"),
    }
    x.auth.touched.store(true, Ordering::SeqCst);
    Ok(None)
}

async fn token(c: &Clients, name: &str, password: &str) -> anyhow::Result<Clients> {
    let req = AuthenticateRequest { name: name.into(), password: password.into() };
    let r = c.without_token().auth.authenticate(req).await.with_context(|| format!("Authenticate {name}"))?;
    let t = r.into_inner().token;
    ensure!(!t.is_empty(), "Authenticate {name}: empty token");
    c.with_token(&t)
}

/// Creates `root` with the kit's password and the root role (creating the role if missing).
async fn add_root(x: &Ctx, grant: bool) -> anyhow::Result<()> {
    let mut c = x.c.without_token();
    if !x.auth.created_root_user.load(Ordering::SeqCst) {
        let req = AuthUserAddRequest { name: "root".into(), password: x.auth.root_pw.clone(), ..Default::default() };
        c.auth.user_add(req).await.context("UserAdd root")?;
        x.auth.created_root_user.store(true, Ordering::SeqCst);
    }
    let roles = c.auth.role_list(AuthRoleListRequest {}).await?.into_inner().roles;
    if !roles.iter().any(|r| r == "root") {
        c.auth.role_add(AuthRoleAddRequest { name: "root".into() }).await.context("RoleAdd root")?;
        x.auth.created_root_role.store(true, Ordering::SeqCst);
    }
    if grant {
        let req = AuthUserGrantRoleRequest { user: "root".into(), role: "root".into() };
        c.auth.user_grant_role(req).await.context("UserGrantRole root root")?;
    }
    Ok(())
}

fn perm(t: PermType, key: Vec<u8>, range_end: Vec<u8>) -> Permission {
    Permission { perm_type: t as i32, key, range_end }
}

async fn add_user(c: &mut Clients, name: &str, pw: &str, role: Option<&str>) -> anyhow::Result<()> {
    let req = AuthUserAddRequest { name: name.into(), password: pw.into(), ..Default::default() };
    c.auth.user_add(req).await.with_context(|| format!("UserAdd {name}"))?;
    if let Some(role) = role {
        let req = AuthUserGrantRoleRequest { user: name.into(), role: role.into() };
        c.auth.user_grant_role(req).await.with_context(|| format!("UserGrantRole {name} {role}"))?;
    }
    Ok(())
}

/// Puts the endpoint back as the run found it: auth disabled (as root), the kit's users and
/// roles deleted, `root` (and the role) deleted when the kit created them.
pub(super) async fn restore(x: Ctx) -> anyhow::Result<String> {
    if !x.auth.touched.load(Ordering::SeqCst) {
        return Ok(String::new());
    }
    let a = &x.auth;
    if enabled(&x.c).await? {
        let root = token(&x.c, "root", &a.root_pw).await.with_context(|| {
            format!("auth is left ENABLED: authenticating as root (password {:?}) failed", a.root_pw)
        })?;
        root.clone()
            .auth
            .auth_disable(AuthDisableRequest {})
            .await
            .with_context(|| format!("auth is left ENABLED: AuthDisable as root (password {:?}) failed", a.root_pw))?;
        ensure!(!enabled(&x.c).await?, "auth is still enabled after AuthDisable (root password {:?})", a.root_pw);
    }
    let mut c = x.c.without_token();
    for u in c.auth.user_list(AuthUserListRequest {}).await?.into_inner().users {
        if u.starts_with(&a.tag) {
            c.auth
                .user_delete(AuthUserDeleteRequest { name: u.clone() })
                .await
                .with_context(|| format!("UserDelete {u}"))?;
        }
    }
    if a.created_root_user.load(Ordering::SeqCst) {
        c.auth.user_delete(AuthUserDeleteRequest { name: "root".into() }).await.context("UserDelete root")?;
        a.created_root_user.store(false, Ordering::SeqCst);
    }
    for r in c.auth.role_list(AuthRoleListRequest {}).await?.into_inner().roles {
        if r.starts_with(&a.tag) {
            c.auth
                .role_delete(AuthRoleDeleteRequest { role: r.clone() })
                .await
                .with_context(|| format!("RoleDelete {r}"))?;
        }
    }
    if a.created_root_role.load(Ordering::SeqCst) {
        c.auth.role_delete(AuthRoleDeleteRequest { role: "root".into() }).await.context("RoleDelete root")?;
        a.created_root_role.store(false, Ordering::SeqCst);
    }
    Ok(String::new())
}

/// User and role management with auth disabled, and its errors.
pub(super) async fn users_roles(x: Ctx) -> anyhow::Result<String> {
    if let Some(skip) = precondition(&x).await? {
        return Ok(skip);
    }
    let mut c = x.c.without_token();
    let (u, r, missing) = (format!("{}-u", x.auth.tag), format!("{}-r", x.auth.tag), format!("{}-missing", x.auth.tag));
    let fp = Code::FailedPrecondition;
    add_user(&mut c, &u, "pw", None).await?;
    let again = AuthUserAddRequest { name: u.clone(), password: "pw".into(), ..Default::default() };
    expect_status(
        "UserAdd of an existing user",
        c.auth.user_add(again).await,
        fp,
        "etcdserver: user name already exists",
    )?;
    let empty = AuthUserAddRequest { name: String::new(), password: "pw".into(), ..Default::default() };
    expect_status("UserAdd with an empty name", c.auth.user_add(empty).await, Code::InvalidArgument, EMPTY_USER)?;
    c.auth.role_add(AuthRoleAddRequest { name: r.clone() }).await.context("RoleAdd")?;
    expect_status(
        "RoleAdd of an existing role",
        c.auth.role_add(AuthRoleAddRequest { name: r.clone() }).await,
        fp,
        "etcdserver: role name already exists",
    )?;
    expect_status(
        "RoleAdd with an empty name",
        c.auth.role_add(AuthRoleAddRequest { name: String::new() }).await,
        Code::InvalidArgument,
        "etcdserver: role name is empty",
    )?;
    let rw = perm(PermType::Readwrite, x.k("rw/"), prefix_end(&x.k("rw/")));
    let ro = perm(PermType::Read, x.k("ro"), vec![]);
    for p in [rw.clone(), ro.clone()] {
        let req = AuthRoleGrantPermissionRequest { name: r.clone(), perm: Some(p) };
        c.auth.role_grant_permission(req).await.context("RoleGrantPermission")?;
    }
    let mut got = c.auth.role_get(AuthRoleGetRequest { role: r.clone() }).await?.into_inner().perm;
    got.sort_by(|a, b| a.key.cmp(&b.key));
    ensure!(got == vec![ro.clone(), rw.clone()], "RoleGet {r}: {got:?}");
    c.auth.user_grant_role(AuthUserGrantRoleRequest { user: u.clone(), role: r.clone() }).await?;
    let roles = c.auth.user_get(AuthUserGetRequest { name: u.clone() }).await?.into_inner().roles;
    ensure!(roles == vec![r.clone()], "UserGet {u}: roles {roles:?}");
    expect_status(
        "UserGrantRole of a missing role",
        c.auth.user_grant_role(AuthUserGrantRoleRequest { user: u.clone(), role: missing.clone() }).await,
        fp,
        "etcdserver: role name not found",
    )?;
    expect_status(
        "UserGet of a missing user",
        c.auth.user_get(AuthUserGetRequest { name: missing.clone() }).await,
        fp,
        "etcdserver: user name not found",
    )?;
    expect_status(
        "RoleGet of a missing role",
        c.auth.role_get(AuthRoleGetRequest { role: missing.clone() }).await,
        fp,
        "etcdserver: role name not found",
    )?;
    let users = c.auth.user_list(AuthUserListRequest {}).await?.into_inner().users;
    ensure!(users.contains(&u), "UserList {users:?} lacks {u}");
    let roles = c.auth.role_list(AuthRoleListRequest {}).await?.into_inner().roles;
    ensure!(roles.contains(&r), "RoleList {roles:?} lacks {r}");
    expect_status(
        "Authenticate while auth is disabled",
        c.auth.authenticate(AuthenticateRequest { name: u.clone(), password: "pw".into() }).await,
        fp,
        "etcdserver: authentication is not enabled",
    )?;
    expect_status(
        "AuthEnable without a root user",
        c.auth.auth_enable(AuthEnableRequest {}).await,
        fp,
        "etcdserver: root user does not exist",
    )?;
    c.auth.user_revoke_role(AuthUserRevokeRoleRequest { name: u.clone(), role: r.clone() }).await?;
    let roles = c.auth.user_get(AuthUserGetRequest { name: u.clone() }).await?.into_inner().roles;
    ensure!(roles.is_empty(), "UserGet {u} after UserRevokeRole: roles {roles:?}");
    let req = AuthRoleRevokePermissionRequest { role: r.clone(), key: x.k("ro"), range_end: vec![] };
    c.auth.role_revoke_permission(req).await.context("RoleRevokePermission")?;
    let got = c.auth.role_get(AuthRoleGetRequest { role: r.clone() }).await?.into_inner().perm;
    ensure!(got == vec![rw], "RoleGet {r} after RoleRevokePermission: {got:?}");
    c.auth.user_delete(AuthUserDeleteRequest { name: u.clone() }).await?;
    c.auth.role_delete(AuthRoleDeleteRequest { role: r.clone() }).await?;
    expect_status(
        "UserDelete of a deleted user",
        c.auth.user_delete(AuthUserDeleteRequest { name: u.clone() }).await,
        fp,
        "etcdserver: user name not found",
    )?;
    Ok("add/get/list/grant/revoke/delete, 10 errors".into())
}

/// AuthEnable, Authenticate with simple tokens, and what a user with key-range permissions may
/// and may not do; AuthDisable as root.
pub(super) async fn enable_permissions(x: Ctx) -> anyhow::Result<String> {
    if let Some(skip) = precondition(&x).await? {
        return Ok(skip);
    }
    let mut c = x.c.without_token();
    let fp = Code::FailedPrecondition;
    let (alice, role) = (format!("{}-alice", x.auth.tag), format!("{}-rw", x.auth.tag));
    add_root(&x, false).await?;
    expect_status(
        "AuthEnable while root lacks the root role",
        c.auth.auth_enable(AuthEnableRequest {}).await,
        fp,
        "etcdserver: root user does not have root role",
    )?;
    add_root(&x, true).await?;
    c.auth.role_add(AuthRoleAddRequest { name: role.clone() }).await?;
    for p in [
        perm(PermType::Readwrite, x.k("rw/"), prefix_end(&x.k("rw/"))),
        perm(PermType::Read, x.k("ro/"), prefix_end(&x.k("ro/"))),
        perm(PermType::Write, x.k("wo"), vec![]),
    ] {
        c.auth.role_grant_permission(AuthRoleGrantPermissionRequest { name: role.clone(), perm: Some(p) }).await?;
    }
    add_user(&mut c, &alice, "alice-pw", Some(&role)).await?;
    c.auth.auth_enable(AuthEnableRequest {}).await.context("AuthEnable")?;
    ensure!(enabled(&c).await?, "an unauthenticated Range still works after AuthEnable");

    let inv = Code::InvalidArgument;
    expect_status("unauthenticated Put", c.kv.put(put(x.k("rw/a"), "v")).await, inv, EMPTY_USER)?;
    let bad = AuthenticateRequest { name: alice.clone(), password: "wrong".into() };
    expect_status("Authenticate with a wrong password", c.auth.authenticate(bad).await, inv, AUTH_FAILED)?;
    let nobody = AuthenticateRequest { name: format!("{}-nobody", x.auth.tag), password: "pw".into() };
    expect_status("Authenticate of an unknown user", c.auth.authenticate(nobody).await, inv, AUTH_FAILED)?;
    let mut forged = c.with_token("cairn-compat.not-a-token.1")?;
    expect_status(
        "Range with an invalid token",
        forged.kv.range(get(x.k("rw/a"))).await,
        Code::Unauthenticated,
        "etcdserver: invalid auth token",
    )?;

    let mut a = token(&c, &alice, "alice-pw").await?;
    let pd = Code::PermissionDenied;
    a.kv.put(put(x.k("rw/a"), "1")).await.context("Put in a readwrite range")?;
    let g = a.kv.range(get_prefix(&format!("{}rw/", x.p))).await.context("Range in a readwrite range")?;
    ensure!(g.into_inner().count == 1, "Range in the readwrite range does not see the put");
    a.kv.range(get(x.k("ro/a"))).await.context("Range in a read range")?;
    a.kv.put(put(x.k("wo"), "1")).await.context("Put of a write-only key")?;
    expect_status("Put in a read range", a.kv.put(put(x.k("ro/a"), "v")).await, pd, DENIED)?;
    expect_status("Range of a write-only key", a.kv.range(get(x.k("wo"))).await, pd, DENIED)?;
    expect_status("Range outside the permissions", a.kv.range(get(x.k("other"))).await, pd, DENIED)?;
    expect_status("Range over more than the permitted range", a.kv.range(get_prefix(&x.p)).await, pd, DENIED)?;
    expect_status("DeleteRange in a read range", a.kv.delete_range(del(x.k("ro/a"))).await, pd, DENIED)?;
    let t = TxnRequest {
        compare: vec![],
        success: vec![op_put(put(x.k("rw/b"), "1"))],
        failure: vec![op_put(put(x.k("other"), "1"))],
    };
    expect_status("Txn with a forbidden put in its failure branch", a.kv.txn(t).await, pd, DENIED)?;
    let t = TxnRequest {
        compare: vec![cmp(
            x.k("other"),
            compare::CompareTarget::Version,
            compare::CompareResult::Equal,
            CmpVal::Int(0),
        )],
        success: vec![op_put(put(x.k("rw/b"), "1"))],
        failure: vec![],
    };
    expect_status("Txn comparing a forbidden key", a.kv.txn(t).await, pd, DENIED)?;
    let t = TxnRequest {
        compare: vec![cmp(x.k("ro/a"), compare::CompareTarget::Version, compare::CompareResult::Equal, CmpVal::Int(0))],
        success: vec![op_put(put(x.k("rw/b"), "1"))],
        failure: vec![op_get(get(x.k("ro/a")))],
    };
    let r = a.kv.txn(t).await.context("Txn comparing a readable key, writing a writable one")?.into_inner();
    ensure!(r.succeeded, "Txn on permitted keys did not succeed: {r:?}");
    expect_status(
        "UserList as a user without the root role",
        a.auth.user_list(AuthUserListRequest {}).await,
        pd,
        DENIED,
    )?;
    expect_status(
        "AuthDisable as a user without the root role",
        a.auth.auth_disable(AuthDisableRequest {}).await,
        pd,
        DENIED,
    )?;
    let reason = "rpc error: code = PermissionDenied desc = etcdserver: permission denied";
    watch_refused(&mut a, x.k("other"), reason).await.context("watch on a forbidden key")?;
    let reason = "rpc error: code = InvalidArgument desc = etcdserver: user name is empty";
    watch_refused(&mut c, x.k("rw/a"), reason).await.context("watch without a token")?;

    let mut root = token(&c, "root", &x.auth.root_pw).await?;
    root.kv.range(get(x.k("other"))).await.context("root: Range outside alice's permissions")?;
    let users = root.auth.user_list(AuthUserListRequest {}).await?.into_inner().users;
    ensure!(users.contains(&alice) && users.contains(&"root".to_string()), "UserList as root: {users:?}");
    // Revoking a permission applies to tokens issued before.
    let req =
        AuthRoleRevokePermissionRequest { role: role.clone(), key: x.k("rw/"), range_end: prefix_end(&x.k("rw/")) };
    root.auth.role_revoke_permission(req).await.context("RoleRevokePermission as root")?;
    expect_status("Put after its permission was revoked", a.kv.put(put(x.k("rw/a"), "2")).await, pd, DENIED)?;
    root.auth.auth_disable(AuthDisableRequest {}).await.context("AuthDisable as root")?;
    ensure!(!enabled(&c).await?, "an unauthenticated Range is still refused after AuthDisable");
    c.kv.range(get(x.k("rw/a"))).await.context("unauthenticated Range after AuthDisable")?;
    Ok("simple token; 17 refusals incl. 2 watches".into())
}

/// A watch refused by auth: etcd answers on the stream (created and canceled at once, watch ID
/// -1, the gRPC status error's text as the reason); the stream itself stays open.
async fn watch_refused(a: &mut Clients, key: Vec<u8>, reason: &str) -> anyhow::Result<()> {
    let mut w = WatchStream::open(a).await?;
    w.create(WatchCreateRequest { key, ..Default::default() }).await?;
    let r = w.next(std::time::Duration::from_secs(5)).await?.context("no answer to a refused watch within 5 s")?;
    ensure!(
        r.created && r.canceled && r.watch_id == -1 && r.events.is_empty() && r.cancel_reason == reason,
        "a refused watch must be created and canceled at once, watch ID -1, reason {reason:?}: {r:?}"
    );
    Ok(())
}

/// The root role: only a user holding it manages auth; root cannot be deleted or lose the role
/// while auth is enabled; another user with the root role can disable auth.
pub(super) async fn root_role(x: Ctx) -> anyhow::Result<String> {
    if let Some(skip) = precondition(&x).await? {
        return Ok(skip);
    }
    let mut c = x.c.without_token();
    let (admin, plain) = (format!("{}-admin", x.auth.tag), format!("{}-plain", x.auth.tag));
    add_root(&x, true).await?;
    add_user(&mut c, &admin, "admin-pw", Some("root")).await?;
    add_user(&mut c, &plain, "plain-pw", None).await?;
    c.auth.auth_enable(AuthEnableRequest {}).await.context("AuthEnable")?;
    let mut root = token(&c, "root", &x.auth.root_pw).await?;
    let mgmt = "etcdserver: invalid auth management";
    expect_status(
        "UserDelete root while auth is enabled",
        root.auth.user_delete(AuthUserDeleteRequest { name: "root".into() }).await,
        Code::InvalidArgument,
        mgmt,
    )?;
    expect_status(
        "UserRevokeRole root root while auth is enabled",
        root.auth.user_revoke_role(AuthUserRevokeRoleRequest { name: "root".into(), role: "root".into() }).await,
        Code::InvalidArgument,
        mgmt,
    )?;
    let mut p = token(&c, &plain, "plain-pw").await?;
    let pd = Code::PermissionDenied;
    let req = AuthUserAddRequest { name: format!("{}-x", x.auth.tag), password: "pw".into(), ..Default::default() };
    expect_status("UserAdd by a user without the root role", p.auth.user_add(req).await, pd, DENIED)?;
    expect_status("Range by a user without roles", p.kv.range(get(x.k("k"))).await, pd, DENIED)?;
    let mut ad = token(&c, &admin, "admin-pw").await?;
    ad.kv.put(put(x.k("k"), "v")).await.context("Put by a user with the root role")?;
    let roles = ad.auth.user_get(AuthUserGetRequest { name: admin.clone() }).await?.into_inner().roles;
    ensure!(roles == vec!["root".to_string()], "UserGet {admin}: {roles:?}");
    ad.auth.auth_disable(AuthDisableRequest {}).await.context("AuthDisable by a user with the root role")?;
    if enabled(&c).await? {
        bail!("auth still enabled after AuthDisable by {admin}");
    }
    Ok("root undeletable, root role manages auth".into())
}
