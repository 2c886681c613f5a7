//! `tls/*`: run when the endpoint is https (`https://host:port`, or `--cacert`/`--cert`/`--key`
//! given); skipped for plain-text endpoints.

use std::time::Duration;

use anyhow::{bail, ensure};

use super::Ctx;
use crate::client::*;

fn skip_plain(x: &Ctx) -> Option<String> {
    x.c.target.tls.is_none().then(|| "skipped: plain-text endpoint (use https:// or --cacert)".to_string())
}

/// The innermost part of a transport error (`received fatal alert: BadCertificate`, ...).
fn short(e: &anyhow::Error) -> String {
    let s = format!("{e:#}");
    s.rsplit_once("error: ").map_or(s.clone(), |(_, tail)| tail.to_string())
}

/// A Range through a fresh connection to `t`, within 5 s.
async fn try_range(t: &Target) -> anyhow::Result<()> {
    let attempt = async {
        let mut c = connect_to(t).await?;
        current_rev(&mut c).await
    };
    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
        Err(_) => bail!("no answer within 5 s"),
        Ok(r) => r.map(|_| ()),
    }
}

pub(super) async fn handshake(x: Ctx) -> anyhow::Result<String> {
    if let Some(s) = skip_plain(&x) {
        return Ok(s);
    }
    // A fresh connection, so the handshake (and its ALPN) is this case's.
    let t = Target { alpn: Default::default(), ..x.c.target.clone() };
    try_range(&t).await?;
    let alpn = t.alpn.lock().unwrap().clone();
    ensure!(alpn.as_deref() == Some(b"h2"), "ALPN {:?}, gRPC over TLS needs h2", alpn.map(|a| lossy(&a)));
    let cert = if t.files.cert.is_some() { "with a client certificate" } else { "without a client certificate" };
    Ok(format!("TLS {cert}, ALPN h2"))
}

pub(super) async fn plaintext_refused(x: Ctx) -> anyhow::Result<String> {
    if let Some(s) = skip_plain(&x) {
        return Ok(s);
    }
    let plain = Target::plain(x.c.target.authority());
    match try_range(&plain).await {
        Ok(()) => bail!("a plain-text Range to the https endpoint {} succeeded", plain.authority()),
        Err(e) => Ok(format!("refused: {}", short(&e))),
    }
}

pub(super) async fn client_cert_required(x: Ctx) -> anyhow::Result<String> {
    if !x.opts.client_cert_auth {
        return Ok("skipped: pass --client-cert-auth for an endpoint that requires client certificates".into());
    }
    ensure!(x.c.target.tls.is_some(), "--client-cert-auth needs an https endpoint");
    ensure!(x.c.target.files.cert.is_some(), "--client-cert-auth needs --cert and --key");
    let files = TlsFiles { cert: None, key: None, ..x.c.target.files.clone() };
    let t = Target::new(&x.c.target.endpoint, &files)?;
    ensure!(t.tls.is_some(), "no TLS config without the client certificate");
    match try_range(&t).await {
        Ok(()) => bail!("a client without a certificate was served"),
        Err(e) => Ok(format!("refused without a certificate: {}", short(&e))),
    }
}
