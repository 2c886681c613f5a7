//! The cases, one `pub async fn name<H: Harness>(h: H)` each, grouped by topic. Every case
//! opens its own store with `h.open()`.

pub mod compaction;
pub mod docs;
pub mod lease;
pub mod persistence;
pub mod range;
pub mod revisions;
pub mod txn;
pub mod watch;
