//! Runs the whole suite, persistence cases included, with a harness whose `reopen` hands back
//! the same in-memory store. This is not a durability test of anything: it checks that the
//! full `backend_suite!` expansion builds and that the persistence cases are consistent with
//! a store that lost nothing, before a durable backend relies on them.

use std::sync::Arc;

use cairn_backend_tests::{backend_suite, Harness};
use cairn_memory::MemoryBackend;

struct SameStore;

#[async_trait::async_trait]
impl Harness for SameStore {
    type B = MemoryBackend;

    async fn open(&self) -> Arc<MemoryBackend> {
        MemoryBackend::new()
    }

    async fn reopen(&self, b: Arc<MemoryBackend>) -> Option<Arc<MemoryBackend>> {
        Some(b)
    }
}

backend_suite!(SameStore);
