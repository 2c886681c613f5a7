//! Auth through the real `etcdctl` (v3 API): users, roles, grants, `auth enable/disable`,
//! `--user name:password`, and etcd's exact error lines.

mod common;

use std::process::Stdio;

use cairn_api::auth::AuthConfig;
use cairn_api::ServerConfig;
use common::TestServer;
use tokio::process::Command;

const ETCDCTL: &str = "/usr/bin/etcdctl";

/// Runs etcdctl; returns whether it succeeded, stdout, and stdout + stderr.
async fn run(s: &TestServer, args: &[&str]) -> (bool, String, String) {
    assert!(std::path::Path::new(ETCDCTL).exists(), "{ETCDCTL} is missing: install Debian's etcd-client");
    let out = Command::new(ETCDCTL)
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &s.addr.to_string(), "--command-timeout", "5s"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("spawn etcdctl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let text = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    (out.status.success(), stdout, text)
}

async fn ok(s: &TestServer, args: &[&str]) -> String {
    let (success, stdout, text) = run(s, args).await;
    assert!(success, "etcdctl {args:?} failed: {text}");
    stdout
}

async fn fails(s: &TestServer, args: &[&str], expected: &str) {
    let (success, _, text) = run(s, args).await;
    assert!(!success, "etcdctl {args:?} should fail: {text}");
    assert!(text.contains(expected), "etcdctl {args:?}: expected {expected:?} in {text:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_roles_and_permissions() {
    let cfg = ServerConfig { auth: AuthConfig { bcrypt_cost: 4, ..Default::default() }, ..ServerConfig::default() };
    let s = TestServer::start_with(cfg).await;
    let root = ["--user", "root:root"];
    let with_root = |args: &[&'static str]| -> Vec<&'static str> { [&root[..], args].concat() };

    fails(&s, &["auth", "enable"], "Error: etcdserver: root user does not exist").await;
    assert_eq!(ok(&s, &["user", "add", "root:root"]).await, "User root created\n");
    fails(&s, &["user", "add", "root:x"], "Error: etcdserver: user name already exists").await;
    // etcdctl answers "root user does not have root role" by creating and granting the role.
    assert_eq!(ok(&s, &["auth", "enable"]).await, "Authentication Enabled\n");
    assert_eq!(ok(&s, &["--user", "root:root", "user", "get", "root"]).await, "User: root\nRoles: root\n");

    fails(&s, &["put", "foo", "bar"], "Error: etcdserver: user name is empty").await;
    fails(&s, &["--user", "root:wrong", "put", "foo", "bar"], "authentication failed, invalid user ID or password")
        .await;
    assert_eq!(ok(&s, &with_root(&["put", "foo", "bar"])).await, "OK\n");

    assert_eq!(ok(&s, &with_root(&["role", "add", "test-role"])).await, "Role test-role created\n");
    assert_eq!(
        ok(&s, &with_root(&["role", "grant-permission", "test-role", "--prefix=true", "readwrite", "pre/"])).await,
        "Role test-role updated\n"
    );
    assert_eq!(
        ok(&s, &with_root(&["role", "grant-permission", "test-role", "read", "foo"])).await,
        "Role test-role updated\n"
    );
    assert_eq!(
        ok(&s, &with_root(&["role", "get", "test-role"])).await,
        "Role test-role\nKV Read:\n\tfoo\n\t[pre/, pre0) (prefix pre/)\nKV Write:\n\t[pre/, pre0) (prefix pre/)\n"
    );
    assert_eq!(ok(&s, &with_root(&["user", "add", "test-user:pass"])).await, "User test-user created\n");
    ok(&s, &with_root(&["user", "grant-role", "test-user", "test-role"])).await;
    assert_eq!(ok(&s, &with_root(&["user", "get", "test-user"])).await, "User: test-user\nRoles: test-role\n");
    assert_eq!(ok(&s, &with_root(&["user", "list"])).await, "root\ntest-user\n");
    assert_eq!(ok(&s, &with_root(&["role", "list"])).await, "root\ntest-role\n");

    let user = ["--user", "test-user:pass"];
    let as_user = |args: &[&'static str]| -> Vec<&'static str> { [&user[..], args].concat() };
    assert_eq!(ok(&s, &as_user(&["put", "pre/a", "1"])).await, "OK\n");
    assert_eq!(ok(&s, &as_user(&["get", "pre/", "--prefix"])).await, "pre/a\n1\n");
    assert_eq!(ok(&s, &as_user(&["get", "foo"])).await, "foo\nbar\n");
    fails(&s, &as_user(&["put", "foo", "x"]), "Error: etcdserver: permission denied").await;
    fails(&s, &as_user(&["get", "", "--from-key"]), "Error: etcdserver: permission denied").await;
    fails(&s, &as_user(&["user", "list"]), "Error: etcdserver: permission denied").await;
    fails(&s, &with_root(&["user", "delete", "root"]), "Error: etcdserver: invalid auth management").await;
    fails(&s, &with_root(&["role", "revoke-permission", "test-role", "nope"]), "permission is not granted to the role")
        .await;

    assert_eq!(
        ok(&s, &with_root(&["user", "revoke-role", "test-user", "test-role"])).await,
        "Role test-role is revoked from user test-user\n"
    );
    assert_eq!(ok(&s, &with_root(&["role", "delete", "test-role"])).await, "Role test-role deleted\n");
    assert_eq!(ok(&s, &with_root(&["user", "delete", "test-user"])).await, "User test-user deleted\n");
    assert_eq!(ok(&s, &with_root(&["auth", "disable"])).await, "Authentication Disabled\n");
    assert_eq!(ok(&s, &["put", "foo", "free"]).await, "OK\n");
    s.stop().await;
}
