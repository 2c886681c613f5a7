//! TLS for the client URLs with etcd's flags: --cert-file/--key-file, --trusted-ca-file with
//! --client-cert-auth (required, verified client certificates), --client-crl-file,
//! --auto-tls (a self-signed certificate for the listen hosts), --cipher-suites (Go's names)
//! and --tls-min-version/--tls-max-version. rustls with the ring provider.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, SupportedProtocolVersion};

/// etcd's client transport security flags.
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    pub cert_file: String,
    pub key_file: String,
    pub trusted_ca_file: String,
    pub client_cert_auth: bool,
    pub crl_file: String,
    pub auto_tls: bool,
    /// Go cipher suite names; empty means the defaults.
    pub cipher_suites: Vec<String>,
    /// "TLS1.2" / "TLS1.3" or empty.
    pub min_version: String,
    pub max_version: String,
    /// --peer-cert-allowed-cn: a verified client certificate must carry this common name.
    pub allowed_cn: String,
    /// --peer-cert-allowed-hostname: a verified client certificate must be valid for this
    /// host name (a DNS or IP subject alternative name).
    pub allowed_hostname: String,
}

impl ClientTls {
    pub fn is_configured(&self) -> bool {
        self.auto_tls || (!self.cert_file.is_empty() && !self.key_file.is_empty())
    }

    /// The rustls configuration serving `hosts` (used for --auto-tls certificates).
    pub fn server_config(&self, hosts: &[String]) -> anyhow::Result<Arc<ServerConfig>> {
        let provider = Arc::new(self.provider()?);
        let (certs, key) = if !self.cert_file.is_empty() && !self.key_file.is_empty() {
            load_pair(Path::new(&self.cert_file), Path::new(&self.key_file))?
        } else if self.auto_tls {
            self_signed(hosts)?
        } else {
            bail!("TLS key/cert (--cert-file, --key-file) must be provided for https client URLs");
        };
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&self.versions()?)
            .context("TLS versions")?;
        let builder = if self.client_cert_auth {
            builder.with_client_cert_verifier(self.client_verifier(provider)?)
        } else {
            builder.with_no_client_auth()
        };
        let mut cfg = builder.with_single_cert(certs, key).context("TLS certificate and key")?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// The rustls configuration a member dials https peer URLs with (etcd's --peer-* flags):
    /// it presents --peer-cert-file (or, with --peer-auto-tls, a self-signed certificate) and
    /// verifies the peer against --peer-trusted-ca-file. Without a CA, as with etcd's auto TLS,
    /// the peer's certificate is not verified (the channel is encrypted, not authenticated).
    pub fn peer_client_config(&self, hosts: &[String]) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let provider = Arc::new(self.provider()?);
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&self.versions()?)
            .context("TLS versions")?;
        let inner: Option<Arc<dyn rustls::client::danger::ServerCertVerifier>> = if self.trusted_ca_file.is_empty() {
            None
        } else {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(&self.trusted_ca_file).context("reading --peer-trusted-ca-file")? {
                roots.add(cert.context("parsing --peer-trusted-ca-file")?).context("adding a trusted CA")?;
            }
            Some(
                rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .context("peer certificate verifier")?,
            )
        };
        let verifier = NamedServer {
            inner,
            provider: provider.clone(),
            allowed_cn: self.allowed_cn.clone(),
            allowed_hostname: self.allowed_hostname.clone(),
        };
        let builder = builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier));
        let (certs, key) = if !self.cert_file.is_empty() && !self.key_file.is_empty() {
            load_pair(Path::new(&self.cert_file), Path::new(&self.key_file))?
        } else {
            self_signed(hosts)?
        };
        let mut cfg = builder.with_client_auth_cert(certs, key).context("peer TLS certificate and key")?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }

    fn client_verifier(
        &self,
        provider: Arc<CryptoProvider>,
    ) -> anyhow::Result<Arc<dyn rustls::server::danger::ClientCertVerifier>> {
        if self.trusted_ca_file.is_empty() {
            bail!("--client-cert-auth needs --trusted-ca-file");
        }
        let mut roots = RootCertStore::empty();
        let mut trusted = Vec::new();
        for cert in CertificateDer::pem_file_iter(&self.trusted_ca_file).context("reading --trusted-ca-file")? {
            let cert = cert.context("parsing --trusted-ca-file")?;
            trusted.push(cert.clone());
            roots.add(cert).context("adding a trusted CA")?;
        }
        let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
        if !self.crl_file.is_empty() {
            verifier = verifier.with_crls(load_crls(Path::new(&self.crl_file))?);
        }
        let inner = verifier.build().context("client certificate verifier")?;
        Ok(Arc::new(TrustedRootAsClient {
            inner,
            trusted,
            allowed_cn: self.allowed_cn.clone(),
            allowed_hostname: self.allowed_hostname.clone(),
        }))
    }

    /// ring's provider, restricted to --cipher-suites when given (TLS 1.3 suites stay, as Go
    /// applies the list to TLS 1.2 only).
    fn provider(&self) -> anyhow::Result<CryptoProvider> {
        let mut provider = ring::default_provider();
        if self.cipher_suites.is_empty() {
            return Ok(provider);
        }
        let wanted: Vec<&str> = self.cipher_suites.iter().map(|n| go_suite_name(n)).collect();
        for name in &wanted {
            let known = provider.cipher_suites.iter().any(|s| s.suite().as_str() == Some(name));
            if !known {
                bail!("unexpected TLS cipher suite {name:?}");
            }
        }
        provider.cipher_suites.retain(|s| {
            s.version() == &rustls::version::TLS13 || s.suite().as_str().is_some_and(|n| wanted.contains(&n))
        });
        Ok(provider)
    }

    fn versions(&self) -> anyhow::Result<Vec<&'static SupportedProtocolVersion>> {
        let rank = |v: &str| -> anyhow::Result<u8> {
            Ok(match v {
                "" => 0,
                "TLS1.2" => 2,
                "TLS1.3" => 3,
                other => bail!("unsupported TLS version {other:?} (Cairn supports TLS1.2 and TLS1.3)"),
            })
        };
        let min = rank(&self.min_version)?.max(2);
        let max = match rank(&self.max_version)? {
            0 => 3,
            m => m,
        };
        let all = [(2, &rustls::version::TLS12), (3, &rustls::version::TLS13)];
        let chosen: Vec<_> = all.iter().filter(|(r, _)| (min..=max).contains(r)).map(|(_, v)| *v).collect();
        if chosen.is_empty() {
            bail!("--tls-min-version is greater than --tls-max-version");
        }
        Ok(chosen)
    }
}

/// Go accepts a client that presents one of the trusted CA certificates itself (a self-signed
/// certificate, as etcd's tests use with CN=root); webpki refuses a CA certificate as end
/// entity. This verifier accepts exactly that case, within the certificate's validity, and
/// leaves everything else to webpki.
#[derive(Debug)]
struct TrustedRootAsClient {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    trusted: Vec<CertificateDer<'static>>,
    allowed_cn: String,
    allowed_hostname: String,
}

impl TrustedRootAsClient {
    fn check_names(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        check_names(cert, &self.allowed_cn, &self.allowed_hostname)
    }
}

/// etcd's --peer-cert-allowed-cn / --peer-cert-allowed-hostname check on a verified
/// certificate (etcd applies it to the peer's client and server certificates alike). A refusal
/// is a "bad certificate" alert, which a Go client reports as "remote error: tls: bad
/// certificate"; the log line has etcd's wording.
fn check_names(cert: &CertificateDer<'_>, allowed_cn: &str, allowed_hostname: &str) -> Result<(), rustls::Error> {
    if allowed_cn.is_empty() && allowed_hostname.is_empty() {
        return Ok(());
    }
    // etcd's wording ("client certificate authentication failed") in the log line.
    let refuse = || rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName);
    let (_, c) = x509_parser::parse_x509_certificate(cert).map_err(|_| refuse())?;
    if !allowed_cn.is_empty() {
        let cn = c.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok());
        if cn != Some(allowed_cn) {
            tracing::warn!(cn = ?cn, allowed = %allowed_cn, "client certificate authentication failed: common name not allowed");
            return Err(refuse());
        }
    }
    if !allowed_hostname.is_empty() {
        let want = allowed_hostname;
        let ip: Option<std::net::IpAddr> = want.parse().ok();
        let ok = c.subject_alternative_name().ok().flatten().is_some_and(|san| {
            san.value.general_names.iter().any(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => d.eq_ignore_ascii_case(want),
                x509_parser::extensions::GeneralName::IPAddress(b) => match (ip, b.len()) {
                    (Some(std::net::IpAddr::V4(v4)), 4) => v4.octets() == **b,
                    (Some(std::net::IpAddr::V6(v6)), 16) => v6.octets() == **b,
                    _ => false,
                },
                _ => false,
            })
        });
        if !ok {
            tracing::warn!(allowed = %want, "client certificate authentication failed: not valid for the allowed host name");
            return Err(refuse());
        }
    }
    Ok(())
}

impl rustls::server::danger::ClientCertVerifier for TrustedRootAsClient {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = match self.inner.verify_client_cert(end_entity, intermediates, now) {
            Err(e) if intermediates.is_empty() && self.trusted.iter().any(|t| t.as_ref() == end_entity.as_ref()) => {
                let valid = x509_parser::parse_x509_certificate(end_entity)
                    .map(|(_, c)| {
                        let t = now.as_secs() as i64;
                        c.validity().not_before.timestamp() <= t && t <= c.validity().not_after.timestamp()
                    })
                    .unwrap_or(false);
                if valid {
                    Ok(rustls::server::danger::ClientCertVerified::assertion())
                } else {
                    Err(e)
                }
            }
            other => other,
        }?;
        self.check_names(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A TLS error as Go words it where etcd's users (and tests) look for it: an alert from the
/// other side is "remote error: tls: bad certificate" and the like.
pub fn go_error(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::AlertReceived(alert)) => cairn_native::go_remote_error(alert),
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)) => {
            "client certificate authentication failed".to_string()
        }
        _ => e.to_string(),
    }
}

/// A peer's server certificate: verified against the peer CA (`inner`) or, without one (etcd's
/// auto TLS: InsecureSkipVerify), not at all; then held to the allowed CN / host name.
/// Handshake signatures are always checked.
#[derive(Debug)]
struct NamedServer {
    inner: Option<Arc<dyn rustls::client::danger::ServerCertVerifier>>,
    provider: Arc<CryptoProvider>,
    allowed_cn: String,
    allowed_hostname: String,
}

impl rustls::client::danger::ServerCertVerifier for NamedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if let Some(inner) = &self.inner {
            inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        }
        check_names(end_entity, &self.allowed_cn, &self.allowed_hostname)?;
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn load_pair(cert: &Path, key: &Path) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading --cert-file {}", cert.display()))?
        .collect();
    let certs = certs.with_context(|| format!("parsing --cert-file {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading --key-file {}", key.display()))?;
    Ok((certs, key))
}

/// CRLs in PEM or DER, as Go's x509.ParseCRL accepts both.
fn load_crls(path: &Path) -> anyhow::Result<Vec<CertificateRevocationListDer<'static>>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading --client-crl-file {}", path.display()))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Ok(vec![CertificateRevocationListDer::from(bytes)]);
    }
    let crls: Result<Vec<_>, _> = CertificateRevocationListDer::pem_slice_iter(&bytes).collect();
    crls.with_context(|| format!("parsing --client-crl-file {}", path.display()))
}

/// A self-signed certificate for the listen hosts, as etcd's --auto-tls makes.
fn self_signed(hosts: &[String]) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let mut names: Vec<String> = hosts.to_vec();
    if names.is_empty() {
        names.push("localhost".into());
    }
    let generated = rcgen::generate_simple_self_signed(names).context("generating a self-signed certificate")?;
    let key = PrivateKeyDer::try_from(generated.signing_key.serialize_der()).map_err(anyhow::Error::msg)?;
    Ok((vec![generated.cert.der().clone()], key))
}

/// Go's (and so etcd's) legacy names for the ChaCha20 suites, which rustls names with the
/// `_SHA256` suffix.
fn go_suite_name(name: &str) -> &str {
    match name {
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305" => "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305" => "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_tls_builds_a_config() {
        let tls = ClientTls { auto_tls: true, ..Default::default() };
        let cfg = tls.server_config(&["127.0.0.1".into(), "localhost".into()]).unwrap();
        assert_eq!(cfg.alpn_protocols[0], b"h2");
    }

    #[test]
    fn cipher_suites_by_go_name() {
        let tls = ClientTls {
            auto_tls: true,
            cipher_suites: vec!["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256".into()],
            ..Default::default()
        };
        let p = tls.provider().unwrap();
        assert!(p.cipher_suites.iter().any(|s| s.suite().as_str() == Some("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256")));
        assert!(!p.cipher_suites.iter().any(|s| s.suite().as_str() == Some("TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384")));
        let bad = ClientTls { cipher_suites: vec!["TLS_NOPE".into()], ..tls };
        assert!(bad.provider().is_err());
    }

    #[test]
    fn versions() {
        let only13 = ClientTls { min_version: "TLS1.3".into(), ..Default::default() };
        assert_eq!(only13.versions().unwrap().len(), 1);
        let bad = ClientTls { min_version: "TLS1.3".into(), max_version: "TLS1.2".into(), ..Default::default() };
        assert!(bad.versions().is_err());
        let https_without_cert = ClientTls::default();
        assert!(https_without_cert.server_config(&[]).is_err());
    }

    #[test]
    fn go_chacha20_names_are_accepted() {
        let tls =
            ClientTls { cipher_suites: vec!["TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305".into()], ..Default::default() };
        let p = tls.provider().unwrap();
        assert!(p
            .cipher_suites
            .iter()
            .any(|s| s.suite().as_str() == Some("TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256")));
    }
}
