//! The backend conformance suite against the in-process fake PD + TiKV (`cairn-tikv-fake`),
//! one fake per case on 127.0.0.1 port 0; reopen is a new client (new backend instance, new
//! tasks) on the same fake's data, as a restarted Cairn process would be.
//!
//! With `CAIRN_TIKV_PD` set (`host:port[,host:port...]` of a real PD), the same cases run
//! against that cluster instead, each in its own key namespace (see README.md).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_backend_tests::{backend_suite, Harness};
use cairn_tikv::{TikvBackend, TikvOptions};
use cairn_tikv_fake::FakeTikv;

struct Tikv {
    fake: Mutex<Option<Arc<FakeTikv>>>,
    endpoints: Mutex<Vec<String>>,
    namespace: Vec<u8>,
}

fn options(namespace: &[u8]) -> TikvOptions {
    TikvOptions {
        namespace: namespace.to_vec(),
        feed_poll_interval: Duration::from_millis(50),
        ..TikvOptions::default()
    }
}

impl Tikv {
    fn new() -> Tikv {
        let namespace = format!("cairn-test/{:016x}/", rand_id()).into_bytes();
        Tikv { fake: Mutex::new(None), endpoints: Mutex::new(Vec::new()), namespace }
    }
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish()
}

#[async_trait::async_trait]
impl Harness for Tikv {
    type B = TikvBackend;

    async fn open(&self) -> Arc<TikvBackend> {
        let endpoints = match std::env::var("CAIRN_TIKV_PD") {
            Ok(pd) => pd.split(',').map(str::to_string).collect(),
            Err(_) => {
                let fake = Arc::new(FakeTikv::start().await.expect("start the fake PD + TiKV"));
                let ep = vec![fake.endpoint()];
                *self.fake.lock().unwrap() = Some(fake);
                ep
            }
        };
        *self.endpoints.lock().unwrap() = endpoints.clone();
        TikvBackend::connect(endpoints, options(&self.namespace)).await.expect("connect the tikv backend")
    }

    async fn reopen(&self, b: Arc<TikvBackend>) -> Option<Arc<TikvBackend>> {
        b.shutdown().await;
        drop(b);
        let endpoints = self.endpoints.lock().unwrap().clone();
        Some(TikvBackend::connect(endpoints, options(&self.namespace)).await.expect("reconnect the tikv backend"))
    }
}

backend_suite!(Tikv::new());
