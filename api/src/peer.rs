//! The peer port: a clustered native backend's peer service on --listen-peer-urls, plain for
//! http URLs and TLS for https ones (etcd's --peer-cert-file, --peer-key-file,
//! --peer-trusted-ca-file, --peer-client-cert-auth, --peer-auto-tls, --peer-crl-file).

use std::sync::Arc;

use anyhow::Context as _;
use cairn_native::peer_proto::peer_server::PeerServer;
use cairn_native::PeerService;
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;

use crate::conn;
use crate::tls::ClientTls;
use crate::urls;

/// Bound peer listeners, not yet serving.
pub struct PeerListeners {
    listeners: Vec<(TcpListener, Option<Arc<rustls::ServerConfig>>)>,
}

impl PeerListeners {
    /// Binds every URL of --listen-peer-urls; `tls` holds the --peer-* settings.
    pub async fn bind(listen_urls: &[String], tls: &ClientTls) -> anyhow::Result<Self> {
        let mut listeners = Vec::new();
        for url in listen_urls {
            let addr = urls::bind_addr(url).map_err(anyhow::Error::msg)?;
            let l = TcpListener::bind(addr)
                .await
                .with_context(|| format!("listen tcp {addr} (peer)"))?;
            let url_tls =
                if urls::is_tls(url) {
                    let hosts: Vec<String> = urls::host(url).into_iter().collect();
                    Some(tls.server_config(&hosts).context(
                        "peer TLS (--peer-cert-file/--peer-key-file or --peer-auto-tls)",
                    )?)
                } else {
                    None
                };
            listeners.push((l, url_tls));
        }
        anyhow::ensure!(
            !listeners.is_empty(),
            "no peer URL to listen on (--listen-peer-urls)"
        );
        Ok(Self { listeners })
    }

    /// Serves `svc` on every listener until the returned task is aborted.
    pub fn serve(self, svc: PeerServer<PeerService>) -> tokio::task::JoinHandle<()> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let acceptors: Vec<_> = self
            .listeners
            .into_iter()
            .map(|(l, tls)| conn::spawn_accept_loop(l, tls, tx.clone()))
            .collect();
        drop(tx);
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(std::time::Duration::from_secs(5)))
                .add_service(svc)
                .serve_with_incoming(ReceiverStream::new(rx))
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "serving the peer port failed");
            }
            acceptors.iter().for_each(|a| a.abort());
        })
    }
}
