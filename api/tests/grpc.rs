//! KV, Lease, Maintenance and Cluster over real gRPC calls, including etcd's error rows.

mod common;

use cairn_api::ServerConfig;
use cairn_proto::etcdserverpb::cluster_client::ClusterClient;
use cairn_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use cairn_proto::etcdserverpb::kv_client::KvClient;
use cairn_proto::etcdserverpb::lease_client::LeaseClient;
use cairn_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use cairn_proto::etcdserverpb::request_op::Request as Op;
use cairn_proto::etcdserverpb::response_op::Response as OpResp;
use cairn_proto::etcdserverpb::*;
use common::TestServer;
use tonic::transport::Channel;
use tonic::Code;

async fn kv(s: &TestServer) -> KvClient<Channel> {
    KvClient::connect(s.url()).await.unwrap()
}

fn put_req(k: &str, v: &str) -> PutRequest {
    PutRequest { key: k.into(), value: v.into(), ..Default::default() }
}

fn get_req(k: &str) -> RangeRequest {
    RangeRequest { key: k.into(), ..Default::default() }
}

fn assert_status<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, msg: &str) {
    let e = r.expect_err("expected an error");
    assert_eq!((e.code(), e.message()), (code, msg));
}

#[tokio::test]
async fn put_get_delete_round_trip() {
    let s = TestServer::start().await;
    let mut c = kv(&s).await;
    let put = c.put(put_req("foo", "bar")).await.unwrap().into_inner();
    let h = put.header.unwrap();
    assert_eq!(h.revision, 2, "first write is revision 2");
    assert_eq!((h.cluster_id, h.member_id), (0xcdf818194e3a8c32, 0x8e9e05c52164694d));

    let mut req = put_req("foo", "baz");
    req.prev_kv = true;
    let put = c.put(req).await.unwrap().into_inner();
    assert_eq!(put.prev_kv.unwrap().value, b"bar");

    let got = c.range(get_req("foo")).await.unwrap().into_inner();
    assert_eq!(got.count, 1);
    let kv = &got.kvs[0];
    assert_eq!((kv.value.as_slice(), kv.version, kv.create_revision, kv.mod_revision), (&b"baz"[..], 2, 2, 3));

    let del = DeleteRangeRequest { key: "foo".into(), prev_kv: true, ..Default::default() };
    let del = c.delete_range(del).await.unwrap().into_inner();
    assert_eq!((del.deleted, del.header.unwrap().revision), (1, 4));
    assert_eq!(del.prev_kvs[0].value, b"baz");
    assert_eq!(c.range(get_req("foo")).await.unwrap().into_inner().count, 0);
    s.stop().await;
}

#[tokio::test]
async fn range_prefix_limit_sort_and_old_revisions() {
    let s = TestServer::start().await;
    let mut c = kv(&s).await;
    for (k, v) in [("a/1", "z"), ("a/2", "y"), ("a/3", "x"), ("b", "w")] {
        c.put(put_req(k, v)).await.unwrap();
    }
    let prefix = RangeRequest { key: "a/".into(), range_end: "a0".into(), limit: 2, ..Default::default() };
    let r = c.range(prefix.clone()).await.unwrap().into_inner();
    assert_eq!((r.count, r.more, r.kvs.len()), (3, true, 2));
    let by_value = RangeRequest {
        limit: 0,
        sort_order: range_request::SortOrder::Ascend as i32,
        sort_target: range_request::SortTarget::Value as i32,
        ..prefix
    };
    let r = c.range(by_value).await.unwrap().into_inner();
    let keys: Vec<_> = r.kvs.iter().map(|kv| String::from_utf8_lossy(&kv.key).into_owned()).collect();
    assert_eq!(keys, ["a/3", "a/2", "a/1"]);
    let all = RangeRequest { key: vec![0], range_end: vec![0], count_only: true, ..Default::default() };
    assert_eq!(c.range(all).await.unwrap().into_inner().count, 4);
    let old = RangeRequest { revision: 2, ..get_req("a/2") };
    assert_eq!(c.range(old).await.unwrap().into_inner().count, 0);
    s.stop().await;
}

fn cmp_value(key: &str, value: &str) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Value as i32,
        key: key.into(),
        range_end: vec![],
        target_union: Some(TargetUnion::Value(value.into())),
    }
}

#[tokio::test]
async fn txn_branches_and_one_revision() {
    let s = TestServer::start().await;
    let mut c = kv(&s).await;
    c.put(put_req("k", "v1")).await.unwrap();
    let txn = TxnRequest {
        compare: vec![cmp_value("k", "v1")],
        success: vec![
            RequestOp { request: Some(Op::RequestPut(put_req("k", "v2"))) },
            RequestOp { request: Some(Op::RequestPut(put_req("other", "x"))) },
            RequestOp { request: Some(Op::RequestRange(get_req("k"))) },
        ],
        failure: vec![RequestOp { request: Some(Op::RequestRange(get_req("k"))) }],
    };
    let r = c.txn(txn.clone()).await.unwrap().into_inner();
    assert!(r.succeeded);
    assert_eq!(r.header.unwrap().revision, 3);
    let Some(OpResp::ResponseRange(read)) = &r.responses[2].response else { panic!("{r:?}") };
    assert_eq!(read.kvs[0].value, b"v2");
    assert_eq!(read.header.as_ref().unwrap().revision, 3);
    let r = c.txn(txn).await.unwrap().into_inner();
    assert!(!r.succeeded);
    assert_eq!(r.header.unwrap().revision, 3, "a read-only branch takes no revision");
    s.stop().await;
}

#[tokio::test]
async fn compaction_and_revision_errors() {
    let s = TestServer::start().await;
    let mut c = kv(&s).await;
    for i in 0..4 {
        c.put(put_req("k", &i.to_string())).await.unwrap();
    }
    let r = c.compact(CompactionRequest { revision: 4, physical: true }).await.unwrap().into_inner();
    assert_eq!(r.header.unwrap().revision, 5);
    assert_status(
        c.range(RangeRequest { revision: 3, ..get_req("k") }).await,
        Code::OutOfRange,
        "etcdserver: mvcc: required revision has been compacted",
    );
    assert_status(
        c.range(RangeRequest { revision: 99, ..get_req("k") }).await,
        Code::OutOfRange,
        "etcdserver: mvcc: required revision is a future revision",
    );
    assert_status(
        c.compact(CompactionRequest { revision: 3, physical: false }).await,
        Code::OutOfRange,
        "etcdserver: mvcc: required revision has been compacted",
    );
    assert_eq!(c.range(RangeRequest { revision: 4, ..get_req("k") }).await.unwrap().into_inner().count, 1);
    s.stop().await;
}

#[tokio::test]
async fn validation_errors() {
    let s = TestServer::start().await;
    let mut c = kv(&s).await;
    assert_status(c.put(put_req("", "v")).await, Code::InvalidArgument, "etcdserver: key is not provided");
    assert_status(c.range(get_req("")).await, Code::InvalidArgument, "etcdserver: key is not provided");
    let r = PutRequest { ignore_value: true, ..put_req("k", "v") };
    assert_status(c.put(r).await, Code::InvalidArgument, "etcdserver: value is provided");
    let r = PutRequest { ignore_lease: true, lease: 7, ..put_req("k", "v") };
    assert_status(c.put(r).await, Code::InvalidArgument, "etcdserver: lease is provided");
    let r = PutRequest { ignore_value: true, ..put_req("missing", "") };
    assert_status(c.put(r).await, Code::InvalidArgument, "etcdserver: key not found");
    let r = PutRequest { lease: 12345, ..put_req("k", "v") };
    assert_status(c.put(r).await, Code::NotFound, "etcdserver: requested lease not found");
    let r = RangeRequest { sort_order: 9, ..get_req("k") };
    assert_status(c.range(r).await, Code::InvalidArgument, "etcdserver: invalid sort option");
    let ops: Vec<_> =
        (0..129).map(|i| RequestOp { request: Some(Op::RequestPut(put_req(&format!("k{i}"), ""))) }).collect();
    let t = TxnRequest { success: ops, ..Default::default() };
    assert_status(c.txn(t).await, Code::InvalidArgument, "etcdserver: too many operations in txn request");
    let dup = RequestOp { request: Some(Op::RequestPut(put_req("d", ""))) };
    let t = TxnRequest { success: vec![dup.clone(), dup], ..Default::default() };
    assert_status(c.txn(t).await, Code::InvalidArgument, "etcdserver: duplicate key given in txn request");
    s.stop().await;
}

#[tokio::test]
async fn request_too_large() {
    let cfg = ServerConfig { max_request_bytes: 1024, ..ServerConfig::default() };
    let s = TestServer::start_with(cfg).await;
    let mut c = kv(&s).await;
    let big = "x".repeat(2048);
    assert_status(c.put(put_req("k", &big)).await, Code::InvalidArgument, "etcdserver: request is too large");
    c.put(put_req("k", "small")).await.unwrap();
    s.stop().await;
}

#[tokio::test]
async fn lease_lifecycle() {
    let s = TestServer::start().await;
    let mut l = LeaseClient::connect(s.url()).await.unwrap();
    let mut c = kv(&s).await;
    let g = l.lease_grant(LeaseGrantRequest { ttl: 1, id: 0 }).await.unwrap().into_inner();
    assert_eq!(g.ttl, 2, "TTL below etcd's minimum is raised to it");
    assert!(g.id > 0);
    c.put(PutRequest { lease: g.id, ..put_req("leased", "v") }).await.unwrap();
    let t = l.lease_time_to_live(LeaseTimeToLiveRequest { id: g.id, keys: true }).await.unwrap().into_inner();
    assert_eq!((t.granted_ttl, t.keys.clone()), (2, vec![b"leased".to_vec()]));
    let leases = l.lease_leases(LeaseLeasesRequest {}).await.unwrap().into_inner();
    assert_eq!(leases.leases.iter().map(|s| s.id).collect::<Vec<_>>(), vec![g.id]);

    let reqs = tokio_stream::iter(vec![LeaseKeepAliveRequest { id: g.id }, LeaseKeepAliveRequest { id: 999 }]);
    let mut stream = l.lease_keep_alive(reqs).await.unwrap().into_inner();
    let a = stream.message().await.unwrap().unwrap();
    let b = stream.message().await.unwrap().unwrap();
    assert_eq!((a.id, a.ttl), (g.id, 2));
    assert_eq!((b.id, b.ttl), (999, 0), "unknown lease answers TTL 0");

    l.lease_revoke(LeaseRevokeRequest { id: g.id }).await.unwrap();
    assert_eq!(c.range(get_req("leased")).await.unwrap().into_inner().count, 0);
    let t = l.lease_time_to_live(LeaseTimeToLiveRequest { id: g.id, keys: false }).await.unwrap().into_inner();
    assert_eq!((t.id, t.ttl), (g.id, -1), "unknown lease answers TTL -1");
    s.stop().await;
}

#[tokio::test]
async fn lease_errors() {
    let s = TestServer::start().await;
    let mut l = LeaseClient::connect(s.url()).await.unwrap();
    assert_status(
        l.lease_grant(LeaseGrantRequest { ttl: 9_000_000_001, id: 0 }).await,
        Code::OutOfRange,
        "etcdserver: too large lease TTL",
    );
    l.lease_grant(LeaseGrantRequest { ttl: 10, id: 42 }).await.unwrap();
    assert_status(
        l.lease_grant(LeaseGrantRequest { ttl: 10, id: 42 }).await,
        Code::FailedPrecondition,
        "etcdserver: lease already exists",
    );
    assert_status(
        l.lease_revoke(LeaseRevokeRequest { id: 43 }).await,
        Code::NotFound,
        "etcdserver: requested lease not found",
    );
    s.stop().await;
}

#[tokio::test]
async fn status_and_member_list() {
    let cfg = ServerConfig { version: "3.5.99".into(), name: "n1".into(), ..ServerConfig::default() };
    let s = TestServer::start_with(cfg).await;
    let mut m = MaintenanceClient::connect(s.url()).await.unwrap();
    let st = m.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.version, "3.5.99");
    assert_eq!(st.leader, 0x8e9e05c52164694d);
    let hkv = m.hash_kv(HashKvRequest { revision: 0 }).await.unwrap().into_inner();
    assert_eq!(hkv.header.unwrap().revision, 1);
    m.defragment(DefragmentRequest {}).await.unwrap();
    let alarms = m.alarm(AlarmRequest::default()).await.unwrap().into_inner();
    assert!(alarms.alarms.is_empty());
    // The snapshot stream is an etcd bbolt file followed by its sha256 (32 bytes).
    let mut stream = m.snapshot(SnapshotRequest {}).await.unwrap().into_inner();
    let mut snap = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        snap.extend_from_slice(&chunk.blob);
    }
    assert!(snap.len() > 4096 + 32, "a snapshot holds at least the bbolt meta pages and the hash");
    assert_eq!(&snap[16..20], &0xED0C_DAEDu32.to_le_bytes(), "the stream starts with a bbolt meta page");

    let mut cl = ClusterClient::connect(s.url()).await.unwrap();
    let list = cl.member_list(MemberListRequest::default()).await.unwrap().into_inner();
    assert_eq!(list.header.unwrap().revision, 0, "etcd leaves the cluster header revision unset");
    assert_eq!(list.members.len(), 1);
    assert_eq!((list.members[0].id, list.members[0].name.as_str()), (0x8e9e05c52164694d, "n1"));
    s.stop().await;
}

#[tokio::test]
async fn nospace_alarm_caps_writes_until_disarmed() {
    let s = TestServer::start().await;
    let mut m = MaintenanceClient::connect(s.url()).await.unwrap();
    let mut c = kv(&s).await;
    let mut l = LeaseClient::connect(s.url()).await.unwrap();
    c.put(put_req("k", "v")).await.unwrap();
    let nospace = AlarmRequest { action: 1, member_id: 0x8e9e05c52164694d, alarm: AlarmType::Nospace as i32 };
    m.alarm(nospace).await.unwrap();
    let list = m.alarm(AlarmRequest::default()).await.unwrap().into_inner();
    assert_eq!(list.alarms, vec![AlarmMember { member_id: 0x8e9e05c52164694d, alarm: AlarmType::Nospace as i32 }]);
    let st = m.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.errors, vec![format!("memberID:{} alarm:NOSPACE ", 0x8e9e05c52164694du64)]);

    let full = "etcdserver: mvcc: database space exceeded";
    assert_status(c.put(put_req("k2", "v")).await, Code::ResourceExhausted, full);
    assert_status(l.lease_grant(LeaseGrantRequest { ttl: 10, id: 0 }).await, Code::ResourceExhausted, full);
    let del = DeleteRangeRequest { key: "k".into(), ..Default::default() };
    assert_eq!(c.delete_range(del).await.unwrap().into_inner().deleted, 1, "deletes still work");

    let disarm = AlarmRequest { action: 2, ..nospace };
    assert_eq!(m.alarm(disarm).await.unwrap().into_inner().alarms.len(), 1);
    c.put(put_req("k2", "v")).await.unwrap();
    s.stop().await;
}

/// HTTP/1.1 GET on the client port, as curl or a load balancer would send it.
async fn http_get(s: &TestServer, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    conn.read_to_string(&mut raw).await.unwrap();
    let status = raw.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn http_health_and_version() {
    let s = TestServer::start().await;
    assert_eq!(http_get(&s, "/health").await, (200, r#"{"health":"true","reason":""}"#.into()));
    assert_eq!(http_get(&s, "/version").await, (200, r#"{"etcdserver":"3.5.17","etcdcluster":"3.5.0"}"#.into()));
    assert_eq!(http_get(&s, "/livez").await.0, 200);
    assert_eq!(http_get(&s, "/nope").await, (404, "404 page not found\n".into()));
    let mut m = MaintenanceClient::connect(s.url()).await.unwrap();
    let nospace = AlarmRequest { action: 1, member_id: 1, alarm: AlarmType::Nospace as i32 };
    m.alarm(nospace).await.unwrap();
    assert_eq!(http_get(&s, "/health").await, (503, r#"{"health":"false","reason":"ALARM NOSPACE"}"#.into()));
    assert_eq!(http_get(&s, "/health?exclude=NOSPACE").await.0, 200);
    s.stop().await;
}
