//! The backend conformance suite against the in-memory backend (no persistence cases: it keeps
//! nothing across a restart).

use std::sync::Arc;

use cairn_backend_tests::{backend_suite, Harness};
use cairn_memory::MemoryBackend;

struct Memory;

#[async_trait::async_trait]
impl Harness for Memory {
    type B = MemoryBackend;

    async fn open(&self) -> Arc<MemoryBackend> {
        MemoryBackend::new()
    }
}

backend_suite!(Memory, no_persistence);
