//! The backend conformance suite against the native backend, on a temp dir per case.

use std::sync::Arc;

use cairn_backend_tests::{backend_suite, Harness};
use cairn_native::{NativeBackend, NativeConfig};

struct Native {
    dir: tempfile::TempDir,
}

impl Native {
    fn new() -> Self {
        Native {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn config(&self) -> NativeConfig {
        NativeConfig {
            data_dir: self.dir.path().join("data"),
            ..Default::default()
        }
    }
}

#[async_trait::async_trait]
impl Harness for Native {
    type B = NativeBackend;

    async fn open(&self) -> Arc<NativeBackend> {
        NativeBackend::open(self.config())
            .await
            .expect("open native backend")
    }

    async fn reopen(&self, b: Arc<NativeBackend>) -> Option<Arc<NativeBackend>> {
        b.shutdown().await.expect("shut down native backend");
        drop(b);
        Some(self.open().await)
    }
}

backend_suite!(Native::new());
