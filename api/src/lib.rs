//! Cairn's frontend: etcd's v3 gRPC services over any [`cairn_backend::Backend`].
//!
//! Code map: `server` binds the client URLs and mounts the services; one file per etcd
//! service (`kv`, `lease`, `maintenance`, `cluster`, `watch`); `validate` holds etcd's request
//! checks; `convert` the protobuf <-> model conversions; `errors` is the only place that writes etcd
//! error strings; `auth` holds users, roles, tokens and the permission checks (`auth::Guard`); `header` builds response headers; `ids` derives member and cluster IDs.
//! Protobuf types stop here: backends only see model types.

pub mod errors;
pub mod gateway;
pub mod godur;
pub mod header;
pub mod http;
pub mod ids;
pub mod alarms;
pub mod auth;
pub mod authority_fix;
pub mod coalesce;
pub mod compactor;
pub mod cluster;
pub mod concurrency;
pub mod conn;
pub mod convert;
pub mod kv;
pub mod lease;
pub mod maintenance;
pub mod metrics;
pub mod members;
pub mod peer;
pub mod server;
pub mod snapshot;
pub mod tls;
pub mod urls;
pub mod validate;
pub mod watch;

pub use server::{run, Server, ServerConfig};
