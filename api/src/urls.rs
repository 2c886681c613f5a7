//! etcd's listen URLs: `http://IP:port` (or `https://`), where `localhost` is the one host
//! name allowed, as in etcd's bind check.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// The socket address to bind for one of --listen-client-urls.
pub fn bind_addr(url: &str) -> Result<SocketAddr, String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("unsupported URL scheme in {url:?} (Cairn serves http:// and https:// only)"))?;
    let hostport = rest.split('/').next().unwrap_or_default();
    let (host, port) =
        hostport.rsplit_once(':').ok_or_else(|| format!("URL address does not have the form \"host:port\": {url}"))?;
    let port: u16 = port.parse().map_err(|_| format!("invalid port in URL {url}"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip = match host {
        "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
        "" => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        h => h.parse().map_err(|_| format!("expected IP in URL for binding ({url})"))?,
    };
    Ok(SocketAddr::new(ip, port))
}

/// The host part of a URL (without brackets or port), e.g. for certificate names.
pub fn host(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let hostport = rest.split('/').next()?;
    let host = hostport.rsplit_once(':').map_or(hostport, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| host.to_string())
}

/// Whether the URL asks for TLS.
pub fn is_tls(url: &str) -> bool {
    url.starts_with("https://")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_etcd_listen_urls() {
        assert_eq!(bind_addr("http://localhost:2379").unwrap(), "127.0.0.1:2379".parse().unwrap());
        assert_eq!(bind_addr("http://0.0.0.0:2379").unwrap(), "0.0.0.0:2379".parse().unwrap());
        assert_eq!(bind_addr("https://[::1]:23790").unwrap(), "[::1]:23790".parse().unwrap());
        assert_eq!(bind_addr("http://127.0.0.1:0/").unwrap(), "127.0.0.1:0".parse().unwrap());
    }

    #[test]
    fn hosts() {
        assert_eq!(host("https://localhost:2379").as_deref(), Some("localhost"));
        assert_eq!(host("https://[::1]:2379/").as_deref(), Some("::1"));
        assert_eq!(host("http://:2379"), None);
    }

    #[test]
    fn rejects_host_names_and_other_schemes() {
        assert_eq!(
            bind_addr("http://example.com:2379").unwrap_err(),
            "expected IP in URL for binding (http://example.com:2379)"
        );
        assert!(bind_addr("unix://sock").is_err());
        assert!(bind_addr("http://127.0.0.1").is_err());
    }
}
