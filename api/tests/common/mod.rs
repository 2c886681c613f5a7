//! A real Cairn server on 127.0.0.1 port 0 over the in-memory backend.

#![allow(dead_code)]

pub mod process;

use std::net::SocketAddr;

use cairn_api::{Server, ServerConfig};
use cairn_memory::MemoryBackend;
use tokio::sync::oneshot;

pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(ServerConfig::default()).await
    }

    pub async fn start_with(cfg: ServerConfig) -> Self {
        let server = Server::bind(cfg, MemoryBackend::new()).await.expect("bind");
        let addr = server.local_addrs()[0];
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async move {
            let _ = rx.await;
        }));
        Self { addr, stop: Some(tx), task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}
