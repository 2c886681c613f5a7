//! `cairn-compat`: a black-box conformance kit for etcd v3 gRPC endpoints.
//!
//! - [`check`]: self-contained cases run against any etcd-compatible endpoint, each under its own
//!   random key prefix (so a server that holds other data works) and cleaned up afterwards.
//! - [`diff`]: the same request scripts sent to two endpoints, the answers normalised (IDs,
//!   revisions relative to the script's first revision, lease IDs mapped, TTLs within 1 s) and
//!   compared step by step.
//! - [`spawn`]: starts etcd or Cairn on free loopback ports with fresh data dirs.

pub mod check;
pub mod client;
pub mod diff;
pub mod spawn;
