//! The JSON gateway (`/v3/...`) and the Lock/Election services of a real `cairn` process,
//! driven with `curl` as etcd's e2e suite does (v3_curl_test.go, v3_curl_lease_test.go), on a
//! single node. Expected bodies were checked against etcd 3.4.23 by hand.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::process::{self, Cairn};
use serde_json::Value;

/// POSTs `body` to `path` with curl; the HTTP status and the body.
fn post(s: &Cairn, path: &str, body: &str, headers: &[&str]) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-X", "POST", "-w", "\n%{http_code}", "-d", body]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(format!("http://{}{path}", s.endpoint)).output().expect("run curl");
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// Starts a streaming POST and returns its output lines as they come (the process is killed
/// when the iterator is dropped).
struct Stream {
    child: std::process::Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Stream {
    fn start(s: &Cairn, path: &str, body: &str) -> Self {
        let mut child = Command::new("curl")
            .args(["-s", "-N", "-X", "POST", "-d", body])
            .arg(format!("http://{}{path}", s.endpoint))
            .stdout(Stdio::piped())
            .spawn()
            .expect("run curl");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Self { child, lines }
    }

    fn next_line(&mut self) -> String {
        self.lines.next().expect("stream ended").expect("read stream")
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn put_get_in_every_api_prefix() {
    let s = process::start("gw-putget", &["--backend", "memory"]);
    let (code, body) = post(&s, "/v3/kv/put", r#"{"key":"Zm9v","value":"YmFy"}"#, &[]);
    assert_eq!(code, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["header"]["revision"], "2", "64-bit integers are JSON strings: {body}");
    assert!(v["header"]["cluster_id"].is_string());
    for prefix in ["/v3", "/v3beta", "/v3alpha"] {
        let (code, body) = post(&s, &format!("{prefix}/kv/range"), r#"{"key":"Zm9v"}"#, &[]);
        assert_eq!(code, 200, "{prefix}: {body}");
        assert!(
            body.ends_with(
                r#""kvs":[{"key":"Zm9v","create_revision":"2","mod_revision":"2","version":"1","value":"YmFy"}],"count":"1"}"#
            ),
            "{prefix}: {body}"
        );
    }
    // camelCase names and numbers for 64-bit fields are accepted too (jsonpb does).
    let (_, body) = post(&s, "/v3/kv/range", r#"{"key":"Zm9v","keysOnly":true,"limit":1}"#, &[]);
    assert!(
        body.contains(r#""kvs":[{"key":"Zm9v","create_revision":"2","mod_revision":"2","version":"1"}]"#),
        "{body}"
    );
}

#[test]
fn errors_are_grpc_gateway_v1_shaped() {
    let s = process::start("gw-errors", &["--backend", "memory"]);
    let (code, body) = post(&s, "/v3/kv/range", r#"{"key":""}"#, &[]);
    assert_eq!(
        (code, body.as_str()),
        (400, r#"{"error":"etcdserver: key is not provided","message":"etcdserver: key is not provided","code":3}"#)
    );
    let (code, body) = post(&s, "/v3/auth/authenticate", r#"{"name":"root","password":"x"}"#, &[]);
    assert_eq!(code, 412, "FailedPrecondition is 412 in grpc-gateway v1: {body}");
    assert_eq!(json(&body)["code"], 9);
    let (code, body) = post(&s, "/v3/kv/range", r#"{"key":1}"#, &[]);
    assert_eq!(code, 400, "{body}");
    assert_eq!(json(&body)["code"], 3);
    let (code, body) = post(&s, "/v3/kv/nope", "{}", &[]);
    assert_eq!((code, body.as_str()), (404, "Not Found\n"));
    let out = Command::new("curl")
        .args(["-s", "-w", "%{http_code}", &format!("http://{}/v3/kv/range", s.endpoint)])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Method Not Allowed\n405");
}

#[test]
fn txn_as_in_etcds_curl_test() {
    let s = process::start("gw-txn", &["--backend", "memory"]);
    // What runtime.JSONPb{} (camelCase) makes of etcd's test txn.
    let txn = r#"{"compare":[{"target":"CREATE","key":"Zm9v","createRevision":"0"}],"success":[{"requestPut":{"key":"Zm9v","value":"YmFy"}}]}"#;
    let (code, body) = post(&s, "/v3/kv/txn", txn, &[]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""succeeded":true,"responses":[{"response_put":{"header":{"revision":"2"}}}]"#), "{body}");
    let malformed = r#"{"compare":[{"result":0,"target":1,"key":"Zm9v","TargetUnion":null}],"success":[{"Request":{"RequestPut":{"key":"Zm9v","value":"YmFy"}}}]}"#;
    let (code, body) = post(&s, "/v3/kv/txn", malformed, &[]);
    assert_eq!(
        (code, body.as_str()),
        (400, r#"{"error":"etcdserver: key not found","message":"etcdserver: key not found","code":3}"#)
    );
}

#[test]
fn watch_streams_results() {
    let s = process::start("gw-watch", &["--backend", "memory"]);
    post(&s, "/v3/kv/put", r#"{"key":"Zm9v","value":"YmFy"}"#, &[]);
    let mut w = Stream::start(&s, "/v3/watch", r#"{"create_request":{"key":"Zm9v","start_revision":1}}"#);
    let created = json(&w.next_line());
    assert_eq!(created["result"]["created"], true, "{created}");
    let events = w.next_line();
    assert!(
        events.contains(
            r#""events":[{"kv":{"key":"Zm9v","create_revision":"2","mod_revision":"2","version":"1","value":"YmFy"}}]"#
        ),
        "{events}"
    );
    // The watch stays open after the request body ended: a later delete arrives too.
    post(&s, "/v3/kv/deleterange", r#"{"key":"Zm9v"}"#, &[]);
    let deleted = w.next_line();
    assert!(deleted.contains(r#""events":[{"type":"DELETE","kv":{"key":"Zm9v","mod_revision":"3"}}]"#), "{deleted}");
}

#[test]
fn leases_as_in_etcds_curl_lease_test() {
    let s = process::start("gw-lease", &["--backend", "memory"]);
    let (_, body) = post(&s, "/v3/lease/grant", r#"{"TTL":20,"ID":123}"#, &[]);
    assert!(body.ends_with(r#""ID":"123","TTL":"20"}"#), "{body}");
    let (_, body) = post(&s, "/v3/kv/put", r#"{"key":"Zm9v","value":"YmFy","lease":123}"#, &[]);
    assert!(body.contains(r#""revision":""#), "{body}");
    for path in ["/v3/lease/timetolive", "/v3/kv/lease/timetolive"] {
        let (_, body) = post(&s, path, r#"{"ID":123,"keys":true}"#, &[]);
        assert!(body.contains(r#""grantedTTL":"20","keys":["Zm9v"]"#), "{path}: {body}");
    }
    for path in ["/v3/lease/leases", "/v3/kv/lease/leases"] {
        let (_, body) = post(&s, path, "{}", &[]);
        assert!(body.ends_with(r#""leases":[{"ID":"123"}]}"#), "{path}: {body}");
    }
    let mut ka = Stream::start(&s, "/v3/lease/keepalive", r#"{"ID":123}"#);
    let line = ka.next_line();
    assert!(line.starts_with(r#"{"result":{"header":"#) && line.ends_with(r#""ID":"123","TTL":"20"}}"#), "{line}");
    let (_, body) = post(&s, "/v3/lease/revoke", r#"{"ID":123}"#, &[]);
    assert!(body.contains(r#""revision":""#), "{body}");
    let (code, body) = post(&s, "/v3/kv/lease/revoke", r#"{"ID":123}"#, &[]);
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("etcdserver: requested lease not found"), "{body}");
}

#[test]
fn auth_token_in_the_authorization_header() {
    let s = process::start("gw-auth", &["--backend", "memory"]);
    for (path, body) in [
        ("/v3/auth/user/add", r#"{"name":"root","password":"toor"}"#),
        ("/v3/auth/role/add", r#"{"name":"root"}"#),
        ("/v3/auth/user/grant", r#"{"user":"root","role":"root"}"#),
        ("/v3/auth/enable", "{}"),
    ] {
        let (code, out) = post(&s, path, body, &[]);
        assert_eq!(code, 200, "{path}: {out}");
        assert!(out.contains(r#""revision":""#), "{path}: {out}");
    }
    let put = r#"{"key":"Zm9v","value":"YmFy"}"#;
    let (code, body) = post(&s, "/v3/kv/put", put, &[]);
    assert_eq!(
        (code, body.as_str()),
        (400, r#"{"error":"etcdserver: user name is empty","message":"etcdserver: user name is empty","code":3}"#)
    );
    let (_, body) = post(&s, "/v3/auth/authenticate", r#"{"name":"root","password":"toor"}"#, &[]);
    let token = json(&body)["token"].as_str().expect("a token").to_string();
    let (code, body) = post(&s, "/v3/kv/put", put, &[&format!("Authorization: {token}")]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""revision":""#), "{body}");
    let (code, body) = post(&s, "/v3/kv/put", put, &["Authorization: bogus"]);
    assert_eq!(
        (code, body.as_str()),
        (401, r#"{"error":"etcdserver: invalid auth token","message":"etcdserver: invalid auth token","code":16}"#)
    );
}

#[test]
fn election_over_the_gateway() {
    let s = process::start("gw-election", &["--backend", "memory"]);
    let (_, body) = post(&s, "/v3/lease/grant", r#"{"TTL":60}"#, &[]);
    let lease = json(&body)["ID"].as_str().unwrap().to_string();
    let mut observe = Stream::start(&s, "/v3/election/observe", r#"{"name":"Zm9v"}"#);
    let (code, body) =
        post(&s, "/v3/election/campaign", &format!(r#"{{"name":"Zm9v","value":"YmFy","lease":"{lease}"}}"#), &[]);
    assert_eq!(code, 200, "{body}");
    let leader = json(&body)["leader"].clone();
    let key = format!("foo/{:x}", lease.parse::<i64>().unwrap());
    assert_eq!(leader["key"].as_str().unwrap(), base64_of(key.as_bytes()), "{body}");
    assert_eq!(leader["name"], "Zm9v");
    assert_eq!(leader["lease"].as_str().unwrap(), lease);
    let first = json(&observe.next_line());
    assert_eq!(first["result"]["kv"]["value"], "YmFy", "{first}");
    let (code, body) = post(&s, "/v3/election/proclaim", &format!(r#"{{"leader":{leader},"value":"YmFyMQ=="}}"#), &[]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""revision":""#), "{body}");
    let second = json(&observe.next_line());
    assert_eq!(second["result"]["kv"]["value"], "YmFyMQ==", "{second}");
    let (_, body) = post(&s, "/v3/election/leader", r#"{"name":"Zm9v"}"#, &[]);
    assert_eq!(json(&body)["kv"]["value"], "YmFyMQ==", "{body}");
    let missing =
        r#"{"error":"\"leader\" field must be provided","message":"\"leader\" field must be provided","code":2}"#;
    assert_eq!(post(&s, "/v3/election/proclaim", r#"{"value":"YmFy"}"#, &[]), (500, missing.to_string()));
    assert_eq!(post(&s, "/v3/election/resign", "{}", &[]), (500, missing.to_string()));
    let (code, _) = post(&s, "/v3/election/resign", &format!(r#"{{"leader":{leader}}}"#), &[]);
    assert_eq!(code, 200);
    let (code, body) = post(&s, "/v3/election/leader", r#"{"name":"Zm9v"}"#, &[]);
    assert_eq!(
        (code, body.as_str()),
        (500, r#"{"error":"election: no leader","message":"election: no leader","code":2}"#)
    );
    let (_, body) = post(&s, "/v3/election/proclaim", &format!(r#"{{"leader":{leader},"value":"eA=="}}"#), &[]);
    assert_eq!(body, r#"{"error":"election: not leader","message":"election: not leader","code":2}"#);
}

#[test]
fn lock_waits_for_the_holder() {
    let s = process::start("gw-lock", &["--backend", "memory"]);
    let grant = || json(&post(&s, "/v3/lease/grant", r#"{"TTL":60}"#, &[]).1)["ID"].as_str().unwrap().to_string();
    let (l1, l2) = (grant(), grant());
    let (_, body) = post(&s, "/v3/lock/lock", &format!(r#"{{"name":"bGs=","lease":"{l1}"}}"#), &[]);
    let k1 = json(&body)["key"].as_str().unwrap().to_string();
    assert_eq!(k1, base64_of(format!("lk/{:x}", l1.parse::<i64>().unwrap()).as_bytes()));
    // The second locker waits (its curl has not answered) until the first unlocks.
    let mut second = Stream::start(&s, "/v3/lock/lock", &format!(r#"{{"name":"bGs=","lease":"{l2}"}}"#));
    // Its waiter key exists while it waits: two keys under the prefix.
    let mut waiting = 0;
    while waiting < 2 {
        let (_, body) = post(&s, "/v3/kv/range", r#"{"key":"bGsv","range_end":"bGsw","count_only":true}"#, &[]);
        waiting = json(&body)["count"].as_str().unwrap_or("0").parse().unwrap();
    }
    let (_, unlocked) = post(&s, "/v3/lock/unlock", &format!(r#"{{"key":"{k1}"}}"#), &[]);
    let unlock_rev = json(&unlocked)["header"]["revision"].clone();
    let got = json(&second.next_line());
    assert_eq!(got["key"].as_str().unwrap(), base64_of(format!("lk/{:x}", l2.parse::<i64>().unwrap()).as_bytes()));
    assert_eq!(got["header"]["revision"], unlock_rev, "the lock is taken at the unlock's revision: {got}");
    let (code, body) = post(&s, "/v3/lock/lock", r#"{"name":"bGs=","lease":"12345"}"#, &[]);
    assert_eq!(
        (code, body.as_str()),
        (
            500,
            r#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":2}"#
        )
    );
}

fn base64_of(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[test]
fn max_concurrent_streams_bounds_gateway_calls() {
    // etcd's gateway shares one connection to its gRPC server, so with --max-concurrent-streams
    // 2 and two open watches a range waits until a watch ends (v3_curl_maxstream_test.go).
    let s = process::start("gw-maxstreams", &["--backend", "memory", "--max-concurrent-streams", "2"]);
    let watch = r#"{"create_request":{"key":"Zm9v","start_revision":1}}"#;
    let mut w1 = Stream::start(&s, "/v3/watch", watch);
    assert!(w1.next_line().contains(r#""created":true"#));
    // Below the limit a range is answered.
    let (code, body) = post(&s, "/v3/kv/range", r#"{"key":"Zm9v"}"#, &[]);
    assert_eq!(code, 200, "{body}");
    let mut w2 = Stream::start(&s, "/v3/watch", watch);
    assert!(w2.next_line().contains(r#""created":true"#));
    // At the limit: the range is sent but not answered while both watches are open.
    let mut range = Command::new("curl")
        .args(["-sv", "-X", "POST", "-d", r#"{"key":"Zm9v"}"#])
        .arg(format!("http://{}/v3/kv/range", s.endpoint))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(range.stderr.take().unwrap());
    let mut lines = stderr.lines().map_while(Result::ok);
    // curl -v writes "} [N bytes data]" once it has sent the body.
    assert!(lines.any(|l| l.starts_with("} [")), "curl did not send the range");
    // Writes over gRPC are not bounded by the gateway's streams.
    process::ctl(&s, &["put", "foo", "bar"]);
    process::ctl(&s, &["put", "foo", "baz"]);
    assert!(range.try_wait().unwrap().is_none(), "the range was answered while the limit was reached");
    drop(w1);
    let out = range.wait_with_output().unwrap();
    let body = String::from_utf8(out.stdout).unwrap();
    assert!(body.ends_with(r#""value":"YmF6"}],"count":"1"}"#), "the range ran after the watch ended: {body}");
    drop(w2);
}

/// Lock and Election over gRPC itself (as clientv3's concurrency-free callers use them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_and_election_over_grpc() {
    use cairn_proto::v3electionpb::{election_client::ElectionClient, CampaignRequest, LeaderRequest, ResignRequest};
    use cairn_proto::v3lockpb::{lock_client::LockClient, LockRequest, UnlockRequest};
    let s = process::start("grpc-lock", &["--backend", "memory"]);
    let url = format!("http://{}", s.endpoint);
    let mut lock = LockClient::connect(url.clone()).await.unwrap();
    let held = lock.lock(LockRequest { name: b"L".to_vec(), lease: 0 }).await.unwrap().into_inner();
    assert!(held.key.starts_with(b"L/"), "{:?}", String::from_utf8_lossy(&held.key));
    // The session lease is a fresh one with clientv3's default TTL of 60 s.
    let lease = i64::from_str_radix(std::str::from_utf8(&held.key[2..]).unwrap(), 16).unwrap();
    let (_, body) = post(&s, "/v3/lease/timetolive", &format!(r#"{{"ID":"{lease}"}}"#), &[]);
    assert_eq!(json(&body)["grantedTTL"], "60", "{body}");
    let header = lock.unlock(UnlockRequest { key: held.key.clone() }).await.unwrap().into_inner().header.unwrap();
    assert!(header.revision > held.header.unwrap().revision);

    let mut election = ElectionClient::connect(url).await.unwrap();
    let err = election.leader(LeaderRequest { name: b"E".to_vec() }).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (tonic::Code::Unknown, "election: no leader"));
    let won = election.campaign(CampaignRequest { name: b"E".to_vec(), lease, value: b"me".to_vec() }).await.unwrap();
    let leader = won.into_inner().leader.unwrap();
    let kv = election.leader(LeaderRequest { name: b"E".to_vec() }).await.unwrap().into_inner().kv.unwrap();
    assert_eq!((kv.key, kv.value, kv.lease), (leader.key.clone(), b"me".to_vec(), lease));
    let err = election.resign(ResignRequest { leader: None }).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (tonic::Code::Unknown, "\"leader\" field must be provided"));
    election.resign(ResignRequest { leader: Some(leader) }).await.unwrap();
    assert!(election.leader(LeaderRequest { name: b"E".to_vec() }).await.is_err());
}
