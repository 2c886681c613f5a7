//! Runs a command against a real single-node PD + TiKV started in docker with testcontainers:
//!
//! ```sh
//! cargo run -p cairn-tikv --features testcontainers --example with-tikv -- \
//!     cargo test -p cairn-tikv --test conformance
//! ```
//!
//! It starts `pingcap/pd` and `pingcap/tikv` (tag from `CAIRN_TIKV_IMAGE_TAG`, default
//! below) on the host network (PD on 127.0.0.1:2379, TiKV on 127.0.0.1:20160, so those ports
//! must be free), waits until a Cairn backend can write and read, runs the command with
//! `CAIRN_TIKV_PD=127.0.0.1:2379` (the conformance harness then uses the real cluster instead
//! of the fake, one key namespace per case), removes the containers and exits with the
//! command's status. Needs a docker engine.

use std::time::{Duration, Instant};

use cairn_backend::*;
use cairn_tikv::{TikvBackend, TikvOptions};
use testcontainers::core::WaitFor;
use testcontainers::runners::AsyncRunner;
use testcontainers::{GenericImage, ImageExt};

const DEFAULT_TAG: &str = "v8.5.1";

#[tokio::main]
async fn main() {
    let cmd: Vec<String> = std::env::args().skip(1).collect();
    if cmd.is_empty() {
        eprintln!("usage: with-tikv COMMAND [ARGS...]");
        std::process::exit(2);
    }
    let tag = std::env::var("CAIRN_TIKV_IMAGE_TAG").unwrap_or_else(|_| DEFAULT_TAG.to_string());
    let pd = GenericImage::new("pingcap/pd", &tag)
        .with_wait_for(WaitFor::Nothing)
        .with_network("host")
        .with_cmd([
            "--name=pd0",
            "--data-dir=/data/pd0",
            "--client-urls=http://127.0.0.1:2379",
            "--peer-urls=http://127.0.0.1:2380",
            "--initial-cluster=pd0=http://127.0.0.1:2380",
        ])
        .start()
        .await
        .expect("start PD (is a docker engine running?)");
    let tikv = GenericImage::new("pingcap/tikv", &tag)
        .with_wait_for(WaitFor::Nothing)
        .with_network("host")
        .with_cmd([
            "--addr=127.0.0.1:20160",
            "--status-addr=127.0.0.1:20180",
            "--data-dir=/data/tikv0",
            "--pd=127.0.0.1:2379",
        ])
        .start()
        .await
        .expect("start TiKV");
    let endpoint = "127.0.0.1:2379".to_string();
    wait_ready(&endpoint).await;
    let status = tokio::process::Command::new(&cmd[0])
        .args(&cmd[1..])
        .env("CAIRN_TIKV_PD", &endpoint)
        .status()
        .await
        .expect("run the command");
    let _ = tikv.rm().await;
    let _ = pd.rm().await;
    std::process::exit(status.code().unwrap_or(1));
}

/// Until a backend can write and read back (PD elected, TiKV registered, region ready).
async fn wait_ready(endpoint: &str) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let opts = TikvOptions {
            namespace: b"cairn-ready/".to_vec(),
            retry_timeout: Duration::from_secs(5),
            ..TikvOptions::default()
        };
        let r = async {
            let b = TikvBackend::connect(vec![endpoint.to_string()], opts).await?;
            let put = PutRequest { key: b"ready".to_vec(), value: b"1".to_vec(), ..PutRequest::default() };
            b.txn(TxnRequest::unconditional(vec![RequestOp::Put(put)])).await?;
            b.shutdown().await;
            Ok::<_, BackendError>(())
        }
        .await;
        match r {
            Ok(()) => return,
            Err(e) if Instant::now() < deadline => {
                eprintln!("with-tikv: waiting for PD + TiKV: {e}");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) => panic!("PD + TiKV did not become ready: {e}"),
        }
    }
}
