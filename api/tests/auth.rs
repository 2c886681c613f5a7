//! Authentication and authorization over real gRPC: the Auth service's rules and errors,
//! permission checks in KV, Lease, Watch and Maintenance, JWT tokens, and persistence of the
//! auth store across a restart on the native backend.

mod common;

use std::sync::Arc;

use cairn_api::auth::AuthConfig;
use cairn_api::{Server, ServerConfig};
use cairn_proto::authpb;
use cairn_proto::etcdserverpb::auth_client::AuthClient;
use cairn_proto::etcdserverpb::kv_client::KvClient;
use cairn_proto::etcdserverpb::lease_client::LeaseClient;
use cairn_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use cairn_proto::etcdserverpb::request_op::Request as Op;
use cairn_proto::etcdserverpb::watch_client::WatchClient;
use cairn_proto::etcdserverpb::*;
use common::TestServer;
use tonic::transport::Channel;
use tonic::{Code, Request};

fn fast_auth() -> ServerConfig {
    ServerConfig { auth: AuthConfig { bcrypt_cost: 4, ..Default::default() }, ..ServerConfig::default() }
}

fn with_token<T>(msg: T, token: &str) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert("token", token.parse().unwrap());
    req
}

fn assert_status<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, msg: &str) {
    let e = r.expect_err("expected an error");
    assert_eq!((e.code(), e.message()), (code, msg));
}

fn perm(t: authpb::permission::Type, key: &str, end: &str) -> Option<authpb::Permission> {
    Some(authpb::Permission { perm_type: t as i32, key: key.into(), range_end: end.into() })
}

async fn user_add(a: &mut AuthClient<Channel>, token: Option<&str>, name: &str, pw: &str) {
    let msg = AuthUserAddRequest { name: name.into(), password: pw.into(), ..Default::default() };
    let req = match token {
        Some(t) => with_token(msg, t),
        None => Request::new(msg),
    };
    a.user_add(req).await.unwrap();
}

async fn login(a: &mut AuthClient<Channel>, name: &str, pw: &str) -> String {
    a.authenticate(AuthenticateRequest { name: name.into(), password: pw.into() }).await.unwrap().into_inner().token
}

/// root/root with the root role and auth enabled; returns root's token.
async fn enable(a: &mut AuthClient<Channel>) -> String {
    user_add(a, None, "root", "root").await;
    a.user_grant_role(AuthUserGrantRoleRequest { user: "root".into(), role: "root".into() }).await.unwrap();
    a.auth_enable(AuthEnableRequest {}).await.unwrap();
    login(a, "root", "root").await
}

#[tokio::test]
async fn enabling_needs_a_root_user_with_the_root_role() {
    let s = TestServer::start_with(fast_auth()).await;
    let mut a = AuthClient::connect(s.url()).await.unwrap();
    assert_status(a.auth_enable(AuthEnableRequest {}).await, Code::FailedPrecondition, "etcdserver: root user does not exist");
    user_add(&mut a, None, "root", "root").await;
    assert_status(
        a.auth_enable(AuthEnableRequest {}).await,
        Code::FailedPrecondition,
        "etcdserver: root user does not have root role",
    );
    assert_status(
        a.authenticate(AuthenticateRequest { name: "root".into(), password: "root".into() }).await,
        Code::FailedPrecondition,
        "etcdserver: authentication is not enabled",
    );
    a.user_grant_role(AuthUserGrantRoleRequest { user: "root".into(), role: "root".into() }).await.unwrap();
    let st = a.auth_status(AuthStatusRequest {}).await.unwrap().into_inner();
    assert!(!st.enabled);
    assert_eq!(st.auth_revision, 3, "1 at creation, then user add and grant");
    a.auth_enable(AuthEnableRequest {}).await.unwrap();
    assert_status(a.auth_status(AuthStatusRequest {}).await, Code::InvalidArgument, "etcdserver: user name is empty");
    let token = login(&mut a, "root", "root").await;
    let st = a.auth_status(with_token(AuthStatusRequest {}, &token)).await.unwrap().into_inner();
    assert!(st.enabled);
    assert_eq!(st.auth_revision, 3, "enabling does not advance the auth revision");
    s.stop().await;
}

#[tokio::test]
async fn management_errors() {
    let s = TestServer::start_with(fast_auth()).await;
    let mut a = AuthClient::connect(s.url()).await.unwrap();
    user_add(&mut a, None, "u", "pw").await;
    let dup = AuthUserAddRequest { name: "u".into(), password: "x".into(), ..Default::default() };
    assert_status(a.user_add(dup).await, Code::FailedPrecondition, "etcdserver: user name already exists");
    let empty = AuthUserAddRequest { name: "".into(), password: "x".into(), ..Default::default() };
    assert_status(a.user_add(empty).await, Code::InvalidArgument, "etcdserver: user name is empty");
    assert_status(
        a.user_get(AuthUserGetRequest { name: "nobody".into() }).await,
        Code::FailedPrecondition,
        "etcdserver: user name not found",
    );
    a.role_add(AuthRoleAddRequest { name: "r".into() }).await.unwrap();
    assert_status(
        a.role_add(AuthRoleAddRequest { name: "r".into() }).await,
        Code::FailedPrecondition,
        "etcdserver: role name already exists",
    );
    assert_status(
        a.user_grant_role(AuthUserGrantRoleRequest { user: "u".into(), role: "nope".into() }).await,
        Code::FailedPrecondition,
        "etcdserver: role name not found",
    );
    assert_status(
        a.user_revoke_role(AuthUserRevokeRoleRequest { name: "u".into(), role: "r".into() }).await,
        Code::FailedPrecondition,
        "etcdserver: role is not granted to the user",
    );
    assert_status(
        a.role_revoke_permission(AuthRoleRevokePermissionRequest { role: "r".into(), key: "k".into(), range_end: vec![] })
            .await,
        Code::FailedPrecondition,
        "etcdserver: permission is not granted to the role",
    );
    let grant = AuthRoleGrantPermissionRequest { name: "r".into(), perm: perm(authpb::permission::Type::Read, "b", "a") };
    assert_status(a.role_grant_permission(grant).await, Code::InvalidArgument, "etcdserver: invalid auth management");
    let grant = AuthRoleGrantPermissionRequest { name: "r".into(), perm: perm(authpb::permission::Type::Write, "b", "c") };
    a.role_grant_permission(grant).await.unwrap();
    let got = a.role_get(AuthRoleGetRequest { role: "r".into() }).await.unwrap().into_inner();
    assert_eq!(got.perm, vec![perm(authpb::permission::Type::Write, "b", "c").unwrap()]);
    a.user_grant_role(AuthUserGrantRoleRequest { user: "u".into(), role: "r".into() }).await.unwrap();
    assert_eq!(a.user_get(AuthUserGetRequest { name: "u".into() }).await.unwrap().into_inner().roles, ["r"]);
    a.role_delete(AuthRoleDeleteRequest { role: "r".into() }).await.unwrap();
    assert!(a.user_get(AuthUserGetRequest { name: "u".into() }).await.unwrap().into_inner().roles.is_empty());
    assert_eq!(a.user_list(AuthUserListRequest {}).await.unwrap().into_inner().users, ["u"]);
    s.stop().await;
}

#[tokio::test]
async fn permissions_are_checked_everywhere() {
    let s = TestServer::start_with(fast_auth()).await;
    let mut a = AuthClient::connect(s.url()).await.unwrap();
    let root = enable(&mut a).await;
    user_add(&mut a, Some(&root), "u", "pw").await;
    a.role_add(with_token(AuthRoleAddRequest { name: "r".into() }, &root)).await.unwrap();
    let grant = AuthRoleGrantPermissionRequest { name: "r".into(), perm: perm(authpb::permission::Type::Readwrite, "foo/", "foo0") };
    a.role_grant_permission(with_token(grant, &root)).await.unwrap();
    let grant = AuthRoleGrantPermissionRequest { name: "r".into(), perm: perm(authpb::permission::Type::Read, "ro", "") };
    a.role_grant_permission(with_token(grant, &root)).await.unwrap();
    a.user_grant_role(with_token(AuthUserGrantRoleRequest { user: "u".into(), role: "r".into() }, &root)).await.unwrap();
    let u = login(&mut a, "u", "pw").await;
    assert_status(
        a.authenticate(AuthenticateRequest { name: "u".into(), password: "bad".into() }).await,
        Code::InvalidArgument,
        "etcdserver: authentication failed, invalid user ID or password",
    );

    let mut kv = KvClient::connect(s.url()).await.unwrap();
    let put = |k: &str| PutRequest { key: k.into(), value: b"v".to_vec(), ..Default::default() };
    assert_status(kv.put(put("foo/a")).await, Code::InvalidArgument, "etcdserver: user name is empty");
    assert_status(kv.put(with_token(put("foo/a"), "bogus.1")).await, Code::Unauthenticated, "etcdserver: invalid auth token");
    kv.put(with_token(put("foo/a"), &u)).await.unwrap();
    kv.put(with_token(put("ro"), &root)).await.unwrap();
    assert_status(kv.put(with_token(put("ro"), &u)).await, Code::PermissionDenied, "etcdserver: permission denied");
    let get = |k: &str, end: &str| RangeRequest { key: k.into(), range_end: end.into(), ..Default::default() };
    kv.range(with_token(get("ro", ""), &u)).await.unwrap();
    kv.range(with_token(get("foo/", "foo0"), &u)).await.unwrap();
    assert_status(kv.range(with_token(get("foo", "foo0"), &u)).await, Code::PermissionDenied, "etcdserver: permission denied");
    let del = DeleteRangeRequest { key: "ro".into(), ..Default::default() };
    assert_status(kv.delete_range(with_token(del, &u)).await, Code::PermissionDenied, "etcdserver: permission denied");

    // A txn is checked op by op, nested txns included.
    let nested = TxnRequest {
        success: vec![RequestOp { request: Some(Op::RequestPut(put("elsewhere"))) }],
        ..Default::default()
    };
    let txn = TxnRequest {
        success: vec![
            RequestOp { request: Some(Op::RequestPut(put("foo/b"))) },
            RequestOp { request: Some(Op::RequestTxn(nested)) },
        ],
        ..Default::default()
    };
    assert_status(kv.txn(with_token(txn, &u)).await, Code::PermissionDenied, "etcdserver: permission denied");

    // Admin only.
    let mut m = MaintenanceClient::connect(s.url()).await.unwrap();
    assert_status(m.defragment(with_token(DefragmentRequest {}, &u)).await, Code::PermissionDenied, "etcdserver: permission denied");
    m.status(with_token(StatusRequest {}, &u)).await.unwrap();
    assert_status(m.status(StatusRequest {}).await, Code::InvalidArgument, "etcdserver: user name is empty");
    assert_status(a.user_list(with_token(AuthUserListRequest {}, &u)).await, Code::PermissionDenied, "etcdserver: permission denied");
    a.user_get(with_token(AuthUserGetRequest { name: "u".into() }, &u)).await.unwrap();
    a.role_get(with_token(AuthRoleGetRequest { role: "r".into() }, &u)).await.unwrap();
    assert_status(
        a.user_get(with_token(AuthUserGetRequest { name: "root".into() }, &u)).await,
        Code::PermissionDenied,
        "etcdserver: permission denied",
    );
    assert_status(
        a.user_delete(with_token(AuthUserDeleteRequest { name: "root".into() }, &root)).await,
        Code::InvalidArgument,
        "etcdserver: invalid auth management",
    );

    // A lease with a key the user may not write cannot be revoked by that user.
    let mut l = LeaseClient::connect(s.url()).await.unwrap();
    let id = l.lease_grant(with_token(LeaseGrantRequest { ttl: 60, id: 0 }, &root)).await.unwrap().into_inner().id;
    kv.put(with_token(PutRequest { key: "ro".into(), value: b"x".to_vec(), lease: id, ..Default::default() }, &root))
        .await
        .unwrap();
    assert_status(
        l.lease_revoke(with_token(LeaseRevokeRequest { id }, &u)).await,
        Code::PermissionDenied,
        "etcdserver: permission denied",
    );
    l.lease_revoke(with_token(LeaseRevokeRequest { id }, &root)).await.unwrap();

    // A watch the user may not read is cancelled at creation.
    let mut w = WatchClient::connect(s.url()).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let create = |k: &str| WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(WatchCreateRequest {
            key: k.into(),
            ..Default::default()
        })),
    };
    tx.send(create("secret")).await.unwrap();
    tx.send(create("foo/a")).await.unwrap();
    let mut stream =
        w.watch(with_token(tokio_stream::wrappers::ReceiverStream::new(rx), &u)).await.unwrap().into_inner();
    let denied = stream.message().await.unwrap().unwrap();
    assert!(denied.created && denied.canceled);
    // etcd 3.4 sends the gRPC status error's text (checked against etcd 3.4.23 with cairn-compat).
    assert_eq!(
        (denied.watch_id, denied.cancel_reason.as_str()),
        (-1, "rpc error: code = PermissionDenied desc = etcdserver: permission denied")
    );
    let ok = stream.message().await.unwrap().unwrap();
    assert!(ok.created && !ok.canceled);

    // Deleting the user forgets its tokens.
    a.user_delete(with_token(AuthUserDeleteRequest { name: "u".into() }, &root)).await.unwrap();
    assert_status(kv.range(with_token(get("ro", ""), &u)).await, Code::Unauthenticated, "etcdserver: invalid auth token");
    s.stop().await;
}

/// An RSA key pair made with the openssl command line, as PEM files in `dir`.
fn rsa_keys(dir: &std::path::Path) -> (String, String) {
    let private = dir.join("jwt.key");
    let public = dir.join("jwt.pub");
    let run = |args: &[&str]| {
        let st = std::process::Command::new("openssl").args(args).output().expect("openssl");
        assert!(st.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&st.stderr));
    };
    run(&["genrsa", "-traditional", "-out", private.to_str().unwrap(), "2048"]);
    run(&["rsa", "-in", private.to_str().unwrap(), "-pubout", "-out", public.to_str().unwrap()]);
    (public.display().to_string(), private.display().to_string())
}

#[tokio::test]
async fn jwt_rs256_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let (public, private) = rsa_keys(dir.path());
    let token = format!("jwt,pub-key={public},priv-key={private},sign-method=RS256,ttl=1m");
    let cfg = ServerConfig { auth: AuthConfig { token, bcrypt_cost: 4, ..Default::default() }, ..ServerConfig::default() };
    let s = TestServer::start_with(cfg).await;
    let mut a = AuthClient::connect(s.url()).await.unwrap();
    let root = enable(&mut a).await;
    assert_eq!(root.split('.').count(), 3, "a JWT: header.claims.signature");
    let mut kv = KvClient::connect(s.url()).await.unwrap();
    kv.put(with_token(PutRequest { key: "k".into(), value: b"v".to_vec(), ..Default::default() }, &root)).await.unwrap();

    // A token carries the auth revision it was issued at; after a change it is stale.
    user_add(&mut a, Some(&root), "u", "pw").await;
    assert_status(
        kv.put(with_token(PutRequest { key: "k".into(), value: b"v".to_vec(), ..Default::default() }, &root)).await,
        Code::InvalidArgument,
        "etcdserver: revision of auth store is old",
    );
    let fresh = login(&mut a, "root", "root").await;
    kv.put(with_token(PutRequest { key: "k".into(), value: b"v".to_vec(), ..Default::default() }, &fresh)).await.unwrap();
    let mut forged = fresh.clone();
    forged.pop();
    forged.push(if fresh.ends_with('A') { 'B' } else { 'A' });
    assert_status(
        kv.range(with_token(RangeRequest { key: "k".into(), ..Default::default() }, &forged)).await,
        Code::Unauthenticated,
        "etcdserver: invalid auth token",
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_store_survives_a_restart_on_the_native_backend() {
    let dir = tempfile::tempdir().unwrap();
    let open = || async {
        cairn_native::NativeBackend::open(cairn_native::NativeConfig {
            data_dir: dir.path().to_path_buf(),
            snapshot_count: 10_000,
            heartbeat_interval_ms: 100,
            election_timeout_ms: 1000,
            quota_backend_bytes: 0,
            member_id: 1,
            ..Default::default()
        })
        .await
        .unwrap()
    };
    let serve = |backend: Arc<cairn_native::NativeBackend>| async move {
        let server = Server::bind(fast_auth(), backend).await.unwrap();
        let url = format!("http://{}", server.local_addrs()[0]);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async move {
            let _ = rx.await;
        }));
        (url, tx, task)
    };

    let backend = open().await;
    let (url, stop, task) = serve(backend.clone()).await;
    let mut a = AuthClient::connect(url).await.unwrap();
    let root = enable(&mut a).await;
    a.role_add(with_token(AuthRoleAddRequest { name: "r".into() }, &root)).await.unwrap();
    drop(a);
    let _ = stop.send(());
    let _ = task.await;
    backend.shutdown().await.unwrap();
    drop(backend);

    let backend = open().await;
    let (url, stop, task) = serve(backend.clone()).await;
    let mut a = AuthClient::connect(url).await.unwrap();
    assert_status(a.user_list(AuthUserListRequest {}).await, Code::InvalidArgument, "etcdserver: user name is empty");
    let root = login(&mut a, "root", "root").await;
    let roles = a.role_list(with_token(AuthRoleListRequest {}, &root)).await.unwrap().into_inner().roles;
    assert_eq!(roles, ["r"]);
    let _ = stop.send(());
    let _ = task.await;
    backend.shutdown().await.unwrap();
}
