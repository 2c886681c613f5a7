//! The backend conformance suite against a real PostgreSQL server (one per test binary, see
//! `cairn_postgres::testing`), a fresh database per case; reopen is a new backend instance
//! (new pool, new tasks) on the same database, as a restarted process would be.

use std::sync::{Arc, Mutex};

use cairn_backend_tests::{backend_suite, Harness};
use cairn_postgres::{testing, PostgresBackend, PostgresOptions};

struct Pg {
    url: Mutex<Option<String>>,
}

fn options() -> PostgresOptions {
    PostgresOptions { max_connections: 4, ..PostgresOptions::default() }
}

#[async_trait::async_trait]
impl Harness for Pg {
    type B = PostgresBackend;

    async fn open(&self) -> Arc<PostgresBackend> {
        let url = testing::server().create_database().await.expect("create a test database");
        *self.url.lock().unwrap() = Some(url.clone());
        PostgresBackend::connect(&url, options()).await.expect("connect the postgres backend")
    }

    async fn reopen(&self, b: Arc<PostgresBackend>) -> Option<Arc<PostgresBackend>> {
        b.shutdown().await;
        drop(b);
        let url = self.url.lock().unwrap().clone().expect("open before reopen");
        Some(PostgresBackend::connect(&url, options()).await.expect("reconnect the postgres backend"))
    }
}

backend_suite!(Pg { url: Mutex::new(None) });
