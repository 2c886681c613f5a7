//! etcd's v3 gRPC API for Cairn: the messages, clients and servers generated from the `.proto`
//! files in `proto/` (compiled by `protox` and `tonic-prost-build` at build time; no `protoc`).
//!
//! The wire contract is etcd 3.5's: package, service, method, message and field names, field
//! numbers and types are etcd's, so gRPC paths such as `/etcdserverpb.KV/Range`,
//! `/v3lockpb.Lock/Lock` and `/v3electionpb.Election/Campaign` match, and any etcd client can
//! talk to a Cairn server.
//!
//! - [`etcdserverpb`]: KV, Watch, Lease, Cluster, Maintenance and Auth (`kv_server::KvServer`,
//!   `kv_client::KvClient`, ...).
//! - [`mvccpb`]: `KeyValue` and `Event`.
//! - [`authpb`]: `User`, `Role`, `Permission`, `UserAddOptions`.
//! - [`v3lockpb`]: the Lock service.
//! - [`v3electionpb`]: the Election service.

#![allow(clippy::all, clippy::pedantic)]

/// etcd's `mvccpb` package: stored key-values and watch events.
pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

/// etcd's `authpb` package: users, roles and permissions.
pub mod authpb {
    tonic::include_proto!("authpb");
}

/// etcd's `etcdserverpb` package: the main v3 API.
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

/// etcd's `v3lockpb` package: the Lock service.
pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
}

/// etcd's `v3electionpb` package: the Election service.
pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
}

/// The encoded `google.protobuf.FileDescriptorSet` of all five packages (with source info), for
/// gRPC reflection or a JSON gateway.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/cairn_descriptor.bin"));
