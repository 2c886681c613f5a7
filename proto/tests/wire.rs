//! Wire-contract checks: messages encode to hand-computed bytes (so a wrong field number, wire
//! type or scalar type fails here), and the services and their method paths are etcd's.
//!
//! Tag byte = (field_number << 3) | wire_type; wire types: 0 varint, 2 length-delimited.

use cairn_proto::{authpb, etcdserverpb as pb, mvccpb, v3electionpb, v3lockpb};
use prost::Message;
use tonic::server::NamedService;

fn roundtrip<M: Message + Default + PartialEq + std::fmt::Debug>(msg: &M, expected: &[u8]) {
    assert_eq!(msg.encode_to_vec(), expected, "encoding of {msg:?}");
    assert_eq!(&M::decode(expected).unwrap(), msg, "decoding back");
}

/// cluster_id 0x34c21a2d427db393, member_id 0x8e9e05c52164694d, revision 2, raft_term 2.
const HEADER_BYTES: [u8; 25] = [
    0x08, 0x93, 0xe7, 0xf6, 0x93, 0xd4, 0xc5, 0x86, 0xe1, 0x34, // 1: cluster_id (uint64)
    0x10, 0xcd, 0xd2, 0x91, 0x8b, 0xd2, 0xb8, 0x81, 0xcf, 0x8e, 0x01, // 2: member_id (uint64)
    0x18, 0x02, // 3: revision
    0x20, 0x02, // 4: raft_term
];

fn header() -> pb::ResponseHeader {
    pb::ResponseHeader {
        cluster_id: 0x34c2_1a2d_427d_b393,
        member_id: 0x8e9e_05c5_2164_694d,
        revision: 2,
        raft_term: 2,
    }
}

#[test]
fn response_header() {
    roundtrip(&header(), &HEADER_BYTES);
}

#[test]
fn range_request() {
    let req = pb::RangeRequest {
        key: b"foo".to_vec(),
        range_end: b"fop".to_vec(),
        limit: 10,
        revision: 5,
        sort_order: pb::range_request::SortOrder::Descend as i32,
        sort_target: pb::range_request::SortTarget::Mod as i32,
        serializable: true,
        keys_only: true,
        count_only: false,
        min_mod_revision: 1,
        max_mod_revision: 300,
        min_create_revision: 0,
        max_create_revision: 7,
    };
    roundtrip(
        &req,
        &[
            0x0a, 0x03, b'f', b'o', b'o', // 1: key
            0x12, 0x03, b'f', b'o', b'p', // 2: range_end
            0x18, 0x0a, // 3: limit
            0x20, 0x05, // 4: revision
            0x28, 0x02, // 5: sort_order DESCEND
            0x30, 0x03, // 6: sort_target MOD
            0x38, 0x01, // 7: serializable
            0x40, 0x01, // 8: keys_only
            0x50, 0x01, // 10: min_mod_revision
            0x58, 0xac, 0x02, // 11: max_mod_revision 300
            0x68, 0x07, // 13: max_create_revision
        ],
    );
}

#[test]
fn put_request() {
    let req = pb::PutRequest {
        key: b"k".to_vec(),
        value: b"v".to_vec(),
        lease: 0x1234,
        prev_kv: true,
        ignore_value: false,
        ignore_lease: true,
    };
    roundtrip(
        &req,
        &[
            0x0a, 0x01, b'k', // 1: key
            0x12, 0x01, b'v', // 2: value
            0x18, 0xb4, 0x24, // 3: lease
            0x20, 0x01, // 4: prev_kv
            0x30, 0x01, // 6: ignore_lease
        ],
    );
}

#[test]
fn txn_with_compare_and_ops() {
    let cmp = pb::Compare {
        result: pb::compare::CompareResult::NotEqual as i32,
        target: pb::compare::CompareTarget::Mod as i32,
        key: b"k".to_vec(),
        range_end: vec![0],
        // int64, not sint64: -1 is ten bytes of varint.
        target_union: Some(pb::compare::TargetUnion::ModRevision(-1)),
    };
    let cmp_bytes = [
        0x08, 0x03, // 1: result NOT_EQUAL
        0x10, 0x02, // 2: target MOD
        0x1a, 0x01, b'k', // 3: key
        0x30, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0x01, // 6: mod_revision -1
        0x82, 0x04, 0x01, 0x00, // 64: range_end
    ];
    roundtrip(&cmp, &cmp_bytes);

    let txn = pb::TxnRequest {
        compare: vec![cmp],
        success: vec![pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                key: b"k".to_vec(),
                ..Default::default()
            })),
        }],
        failure: vec![pb::RequestOp {
            request: Some(pb::request_op::Request::RequestDeleteRange(
                pb::DeleteRangeRequest {
                    key: b"k".to_vec(),
                    prev_kv: true,
                    ..Default::default()
                },
            )),
        }],
    };
    let mut expected = vec![0x0a, cmp_bytes.len() as u8]; // 1: compare
    expected.extend_from_slice(&cmp_bytes);
    expected.extend_from_slice(&[0x12, 0x05, 0x12, 0x03, 0x0a, 0x01, b'k']); // 2: success[put]
    expected.extend_from_slice(&[0x1a, 0x07, 0x1a, 0x05, 0x0a, 0x01, b'k', 0x18, 0x01]); // 3: failure[delete_range]
    roundtrip(&txn, &expected);

    let resp = pb::TxnResponse {
        header: Some(header()),
        succeeded: true,
        responses: vec![pb::ResponseOp {
            response: Some(pb::response_op::Response::ResponseTxn(
                pb::TxnResponse::default(),
            )),
        }],
    };
    let mut expected = vec![0x0a, 25];
    expected.extend_from_slice(&HEADER_BYTES);
    expected.extend_from_slice(&[0x10, 0x01]); // 2: succeeded
    expected.extend_from_slice(&[0x1a, 0x02, 0x22, 0x00]); // 3: responses[4: response_txn {}]
    roundtrip(&resp, &expected);
}

#[test]
fn range_response_with_key_value() {
    let kv = mvccpb::KeyValue {
        key: b"foo".to_vec(),
        create_revision: 2,
        mod_revision: 3,
        version: 2,
        value: b"bar".to_vec(),
        lease: 9,
    };
    let kv_bytes = [
        0x0a, 0x03, b'f', b'o', b'o', // 1: key
        0x10, 0x02, // 2: create_revision
        0x18, 0x03, // 3: mod_revision
        0x20, 0x02, // 4: version
        0x2a, 0x03, b'b', b'a', b'r', // 5: value
        0x30, 0x09, // 6: lease
    ];
    roundtrip(&kv, &kv_bytes);

    let resp = pb::RangeResponse {
        header: Some(header()),
        kvs: vec![kv],
        more: true,
        count: 3,
    };
    let mut expected = vec![0x0a, 25];
    expected.extend_from_slice(&HEADER_BYTES);
    expected.extend_from_slice(&[0x12, kv_bytes.len() as u8]);
    expected.extend_from_slice(&kv_bytes);
    expected.extend_from_slice(&[0x18, 0x01, 0x20, 0x03]); // 3: more, 4: count
    roundtrip(&resp, &expected);
}

#[test]
fn watch_create_request() {
    let create = pb::WatchCreateRequest {
        key: b"a".to_vec(),
        range_end: b"b".to_vec(),
        start_revision: 3,
        progress_notify: true,
        filters: vec![
            pb::watch_create_request::FilterType::Noput as i32,
            pb::watch_create_request::FilterType::Nodelete as i32,
        ],
        prev_kv: true,
        watch_id: 0,
        fragment: true,
    };
    let create_bytes = [
        0x0a, 0x01, b'a', // 1: key
        0x12, 0x01, b'b', // 2: range_end
        0x18, 0x03, // 3: start_revision
        0x20, 0x01, // 4: progress_notify
        0x2a, 0x02, 0x00, 0x01, // 5: filters, packed [NOPUT, NODELETE]
        0x30, 0x01, // 6: prev_kv
        0x40, 0x01, // 8: fragment
    ];
    roundtrip(&create, &create_bytes);

    let req = pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(create)),
    };
    let mut expected = vec![0x0a, create_bytes.len() as u8];
    expected.extend_from_slice(&create_bytes);
    roundtrip(&req, &expected);

    let cancel = pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CancelRequest(
            pb::WatchCancelRequest { watch_id: 4 },
        )),
    };
    roundtrip(&cancel, &[0x12, 0x02, 0x08, 0x04]);
    let progress = pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::ProgressRequest(
            pb::WatchProgressRequest {},
        )),
    };
    roundtrip(&progress, &[0x1a, 0x00]);
}

#[test]
fn watch_response_with_events() {
    let resp = pb::WatchResponse {
        header: None,
        watch_id: 1,
        created: false,
        canceled: true,
        compact_revision: 2,
        cancel_reason: "x".into(),
        fragment: true,
        events: vec![mvccpb::Event {
            r#type: mvccpb::event::EventType::Delete as i32,
            kv: Some(mvccpb::KeyValue {
                key: b"k".to_vec(),
                mod_revision: 5,
                ..Default::default()
            }),
            prev_kv: Some(mvccpb::KeyValue {
                key: b"k".to_vec(),
                ..Default::default()
            }),
        }],
    };
    roundtrip(
        &resp,
        &[
            0x10, 0x01, // 2: watch_id
            0x20, 0x01, // 4: canceled
            0x28, 0x02, // 5: compact_revision
            0x32, 0x01, b'x', // 6: cancel_reason
            0x38, 0x01, // 7: fragment
            0x5a, 0x0e, // 11: events
            0x08, 0x01, // 1: type DELETE
            0x12, 0x05, 0x0a, 0x01, b'k', 0x18, 0x05, // 2: kv
            0x1a, 0x03, 0x0a, 0x01, b'k', // 3: prev_kv
        ],
    );
}

#[test]
fn lease_cluster_maintenance_auth() {
    roundtrip(
        &pb::LeaseGrantRequest { ttl: 60, id: 7 },
        &[0x08, 0x3c, 0x10, 0x07],
    );
    roundtrip(
        &pb::LeaseTimeToLiveResponse {
            header: None,
            id: 7,
            ttl: 59,
            granted_ttl: 60,
            keys: vec![b"k".to_vec()],
        },
        &[0x10, 0x07, 0x18, 0x3b, 0x20, 0x3c, 0x2a, 0x01, b'k'],
    );
    roundtrip(
        &pb::LeaseLeasesResponse {
            header: None,
            leases: vec![pb::LeaseStatus { id: 7 }],
        },
        &[0x12, 0x02, 0x08, 0x07],
    );
    roundtrip(
        &pb::Member {
            id: 1,
            name: "n".into(),
            peer_ur_ls: vec!["p".into()],
            client_ur_ls: vec!["c".into()],
            is_learner: true,
        },
        &[
            0x08, 0x01, 0x12, 0x01, b'n', 0x1a, 0x01, b'p', 0x22, 0x01, b'c', 0x28, 0x01,
        ],
    );
    roundtrip(
        &pb::MemberAddRequest {
            peer_ur_ls: vec!["p".into()],
            is_learner: true,
        },
        &[0x0a, 0x01, b'p', 0x10, 0x01],
    );
    roundtrip(&pb::MemberListRequest { linearizable: true }, &[0x08, 0x01]);
    roundtrip(&pb::MemberPromoteRequest { id: 3 }, &[0x08, 0x03]);
    roundtrip(
        &pb::AlarmRequest {
            action: pb::alarm_request::AlarmAction::Activate as i32,
            member_id: 2,
            alarm: pb::AlarmType::Nospace as i32,
        },
        &[0x08, 0x01, 0x10, 0x02, 0x18, 0x01],
    );
    roundtrip(
        &pb::StatusResponse {
            version: "3.5.0".into(),
            db_size: 1,
            leader: 2,
            raft_index: 3,
            raft_term: 4,
            raft_applied_index: 5,
            errors: vec!["e".into()],
            db_size_in_use: 6,
            is_learner: true,
            ..Default::default()
        },
        &[
            0x12, 0x05, b'3', b'.', b'5', b'.', b'0', // 2: version
            0x18, 0x01, 0x20, 0x02, 0x28, 0x03, 0x30, 0x04, 0x38, 0x05, // 3..7
            0x42, 0x01, b'e', // 8: errors
            0x48, 0x06, // 9: dbSizeInUse
            0x50, 0x01, // 10: isLearner
        ],
    );
    roundtrip(
        &pb::HashKvResponse {
            header: None,
            hash: 0xffff_ffff,
            compact_revision: 2,
        },
        &[0x10, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x18, 0x02],
    );
    roundtrip(
        &pb::DowngradeRequest {
            action: pb::downgrade_request::DowngradeAction::Enable as i32,
            version: "3.4".into(),
        },
        &[0x08, 0x01, 0x12, 0x03, b'3', b'.', b'4'],
    );
    roundtrip(
        &pb::AuthStatusResponse {
            header: None,
            enabled: true,
            auth_revision: 4,
        },
        &[0x10, 0x01, 0x18, 0x04],
    );
    roundtrip(
        &pb::AuthUserAddRequest {
            name: "u".into(),
            password: String::new(),
            options: Some(authpb::UserAddOptions { no_password: true }),
            hashed_password: "h".into(),
        },
        &[0x0a, 0x01, b'u', 0x1a, 0x02, 0x08, 0x01, 0x22, 0x01, b'h'],
    );
    roundtrip(
        &pb::AuthRoleGrantPermissionRequest {
            name: "r".into(),
            perm: Some(authpb::Permission {
                perm_type: authpb::permission::Type::Readwrite as i32,
                key: b"a".to_vec(),
                range_end: b"b".to_vec(),
            }),
        },
        &[
            0x0a, 0x01, b'r', 0x12, 0x08, 0x08, 0x02, 0x12, 0x01, b'a', 0x1a, 0x01, b'b',
        ],
    );
    roundtrip(
        &authpb::Role {
            name: b"r".to_vec(),
            key_permission: vec![authpb::Permission::default()],
        },
        &[0x0a, 0x01, b'r', 0x12, 0x00],
    );
}

#[test]
fn lock_and_election() {
    roundtrip(
        &v3lockpb::LockRequest {
            name: b"l".to_vec(),
            lease: 9,
        },
        &[0x0a, 0x01, b'l', 0x10, 0x09],
    );
    roundtrip(
        &v3lockpb::LockResponse {
            header: None,
            key: b"l/9".to_vec(),
        },
        &[0x12, 0x03, b'l', b'/', b'9'],
    );
    let leader = v3electionpb::LeaderKey {
        name: b"e".to_vec(),
        key: b"e/1".to_vec(),
        rev: 5,
        lease: 9,
    };
    let leader_bytes = [
        0x0a, 0x01, b'e', 0x12, 0x03, b'e', b'/', b'1', 0x18, 0x05, 0x20, 0x09,
    ];
    roundtrip(&leader, &leader_bytes);
    roundtrip(
        &v3electionpb::CampaignRequest {
            name: b"e".to_vec(),
            lease: 9,
            value: b"v".to_vec(),
        },
        &[0x0a, 0x01, b'e', 0x10, 0x09, 0x1a, 0x01, b'v'],
    );
    let mut expected = vec![0x0a, leader_bytes.len() as u8];
    expected.extend_from_slice(&leader_bytes);
    expected.extend_from_slice(&[0x12, 0x01, b'v']);
    roundtrip(
        &v3electionpb::ProclaimRequest {
            leader: Some(leader),
            value: b"v".to_vec(),
        },
        &expected,
    );
}

#[test]
fn service_names() {
    use cairn_proto::etcdserverpb::{
        auth_server::AuthServer, cluster_server::ClusterServer, kv_server::KvServer,
        lease_server::LeaseServer, maintenance_server::MaintenanceServer,
        watch_server::WatchServer,
    };
    assert_eq!(<KvServer<()> as NamedService>::NAME, "etcdserverpb.KV");
    assert_eq!(
        <WatchServer<()> as NamedService>::NAME,
        "etcdserverpb.Watch"
    );
    assert_eq!(
        <LeaseServer<()> as NamedService>::NAME,
        "etcdserverpb.Lease"
    );
    assert_eq!(
        <ClusterServer<()> as NamedService>::NAME,
        "etcdserverpb.Cluster"
    );
    assert_eq!(
        <MaintenanceServer<()> as NamedService>::NAME,
        "etcdserverpb.Maintenance"
    );
    assert_eq!(<AuthServer<()> as NamedService>::NAME, "etcdserverpb.Auth");
    assert_eq!(
        <v3lockpb::lock_server::LockServer<()> as NamedService>::NAME,
        "v3lockpb.Lock"
    );
    assert_eq!(
        <v3electionpb::election_server::ElectionServer<()> as NamedService>::NAME,
        "v3electionpb.Election"
    );
    assert_eq!(pb::kv_server::SERVICE_NAME, "etcdserverpb.KV");
}

// Just enough of descriptor.proto to read services and methods out of FILE_DESCRIPTOR_SET.
#[derive(Clone, PartialEq, Message)]
struct FileDescriptorSet {
    #[prost(message, repeated, tag = "1")]
    file: Vec<FileDescriptorProto>,
}
#[derive(Clone, PartialEq, Message)]
struct FileDescriptorProto {
    #[prost(string, tag = "2")]
    package: String,
    #[prost(message, repeated, tag = "6")]
    service: Vec<ServiceDescriptorProto>,
}
#[derive(Clone, PartialEq, Message)]
struct ServiceDescriptorProto {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, repeated, tag = "2")]
    method: Vec<MethodDescriptorProto>,
}
#[derive(Clone, PartialEq, Message)]
struct MethodDescriptorProto {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    input_type: String,
    #[prost(string, tag = "3")]
    output_type: String,
    #[prost(bool, tag = "5")]
    client_streaming: bool,
    #[prost(bool, tag = "6")]
    server_streaming: bool,
}

/// Every gRPC method path of etcd 3.5's v3 API, with its streaming kind
/// ("" unary, "c" client-streaming, "s" server-streaming, "cs" bidirectional).
const METHODS: &[(&str, &str)] = &[
    ("/etcdserverpb.KV/Range", ""),
    ("/etcdserverpb.KV/Put", ""),
    ("/etcdserverpb.KV/DeleteRange", ""),
    ("/etcdserverpb.KV/Txn", ""),
    ("/etcdserverpb.KV/Compact", ""),
    ("/etcdserverpb.Watch/Watch", "cs"),
    ("/etcdserverpb.Lease/LeaseGrant", ""),
    ("/etcdserverpb.Lease/LeaseRevoke", ""),
    ("/etcdserverpb.Lease/LeaseKeepAlive", "cs"),
    ("/etcdserverpb.Lease/LeaseTimeToLive", ""),
    ("/etcdserverpb.Lease/LeaseLeases", ""),
    ("/etcdserverpb.Cluster/MemberAdd", ""),
    ("/etcdserverpb.Cluster/MemberRemove", ""),
    ("/etcdserverpb.Cluster/MemberUpdate", ""),
    ("/etcdserverpb.Cluster/MemberList", ""),
    ("/etcdserverpb.Cluster/MemberPromote", ""),
    ("/etcdserverpb.Maintenance/Alarm", ""),
    ("/etcdserverpb.Maintenance/Status", ""),
    ("/etcdserverpb.Maintenance/Defragment", ""),
    ("/etcdserverpb.Maintenance/Hash", ""),
    ("/etcdserverpb.Maintenance/HashKV", ""),
    ("/etcdserverpb.Maintenance/Snapshot", "s"),
    ("/etcdserverpb.Maintenance/MoveLeader", ""),
    ("/etcdserverpb.Maintenance/Downgrade", ""),
    ("/etcdserverpb.Auth/AuthEnable", ""),
    ("/etcdserverpb.Auth/AuthDisable", ""),
    ("/etcdserverpb.Auth/AuthStatus", ""),
    ("/etcdserverpb.Auth/Authenticate", ""),
    ("/etcdserverpb.Auth/UserAdd", ""),
    ("/etcdserverpb.Auth/UserGet", ""),
    ("/etcdserverpb.Auth/UserList", ""),
    ("/etcdserverpb.Auth/UserDelete", ""),
    ("/etcdserverpb.Auth/UserChangePassword", ""),
    ("/etcdserverpb.Auth/UserGrantRole", ""),
    ("/etcdserverpb.Auth/UserRevokeRole", ""),
    ("/etcdserverpb.Auth/RoleAdd", ""),
    ("/etcdserverpb.Auth/RoleGet", ""),
    ("/etcdserverpb.Auth/RoleList", ""),
    ("/etcdserverpb.Auth/RoleDelete", ""),
    ("/etcdserverpb.Auth/RoleGrantPermission", ""),
    ("/etcdserverpb.Auth/RoleRevokePermission", ""),
    ("/v3lockpb.Lock/Lock", ""),
    ("/v3lockpb.Lock/Unlock", ""),
    ("/v3electionpb.Election/Campaign", ""),
    ("/v3electionpb.Election/Proclaim", ""),
    ("/v3electionpb.Election/Leader", ""),
    ("/v3electionpb.Election/Observe", "s"),
    ("/v3electionpb.Election/Resign", ""),
];

#[test]
fn descriptor_set_has_every_method_path() {
    let fds = FileDescriptorSet::decode(cairn_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut packages: Vec<&str> = fds.file.iter().map(|f| f.package.as_str()).collect();
    packages.sort_unstable();
    assert_eq!(
        packages,
        [
            "authpb",
            "etcdserverpb",
            "mvccpb",
            "v3electionpb",
            "v3lockpb"
        ]
    );

    let mut found = Vec::new();
    for file in &fds.file {
        for svc in &file.service {
            for m in &svc.method {
                assert!(m.input_type.starts_with('.') && m.output_type.starts_with('.'));
                let kind = match (m.client_streaming, m.server_streaming) {
                    (false, false) => "",
                    (true, false) => "c",
                    (false, true) => "s",
                    (true, true) => "cs",
                };
                found.push((format!("/{}.{}/{}", file.package, svc.name, m.name), kind));
            }
        }
    }
    let expected: Vec<(String, &str)> = METHODS.iter().map(|(p, k)| (p.to_string(), *k)).collect();
    assert_eq!(found, expected);

    // Spot-check request/response types of a few methods.
    let rpc = fds
        .file
        .iter()
        .find(|f| f.package == "etcdserverpb")
        .unwrap();
    let kv = rpc.service.iter().find(|s| s.name == "KV").unwrap();
    assert_eq!(kv.method[4].input_type, ".etcdserverpb.CompactionRequest");
    let election = fds
        .file
        .iter()
        .find(|f| f.package == "v3electionpb")
        .unwrap();
    let observe = &election.service[0].method[3];
    assert_eq!(
        (observe.input_type.as_str(), observe.output_type.as_str()),
        (
            ".v3electionpb.LeaderRequest",
            ".v3electionpb.LeaderResponse"
        )
    );
}
