//! Key and value generation, and parsing of the command line's small values.

use std::net::IpAddr;
use std::time::Duration;

/// All keys are 8 bytes: a one-byte namespace then 7 decimal digits.
pub const KEY_LEN: usize = 8;
/// Values are 256 bytes.
pub const VALUE_LEN: usize = 256;
/// The largest index a key can carry (7 digits).
pub const MAX_INDEX: u64 = 9_999_999;

/// Namespace of the put / range / txn workloads.
pub const NS_KV: u8 = b'k';
/// Namespace watched by the watch workloads.
pub const NS_WATCH: u8 = b'w';
/// The list workload's 10k-key prefix.
pub const NS_LIST: u8 = b'p';
/// The list workload's other 90k keys.
pub const NS_OTHER: u8 = b'o';

/// The 8-byte key `index` in namespace `ns`, e.g. `k0000042`.
pub fn key(ns: u8, index: u64) -> Vec<u8> {
    assert!(index <= MAX_INDEX, "key index {index} exceeds 7 digits");
    let mut k = Vec::with_capacity(KEY_LEN);
    k.push(ns);
    k.extend_from_slice(format!("{index:07}").as_bytes());
    k
}

/// The `[key, range_end)` pair covering a whole namespace.
pub fn namespace_range(ns: u8) -> (Vec<u8>, Vec<u8>) {
    (vec![ns], vec![ns + 1])
}

/// A 256-byte value; `seed` varies the content a little so values are not all identical.
pub fn value(seed: u64) -> Vec<u8> {
    let mut v = vec![b'v'; VALUE_LEN];
    let s = format!("{seed:016x}");
    v[..16].copy_from_slice(s.as_bytes());
    v
}

/// Parses `10s`, `500ms`, `2m`, `1.5s`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    if !(n.is_finite() && n >= 0.0) {
        return Err(format!("bad duration {s:?}"));
    }
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("bad duration unit in {s:?} (use ms, s or m)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `1,16,256`.
pub fn parse_list(s: &str) -> Result<Vec<usize>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            p.trim()
                .parse::<usize>()
                .map_err(|_| format!("bad number {p:?} in {s:?}"))
        })
        .collect::<Result<Vec<_>, _>>()
        .and_then(|v| {
            if v.is_empty() || v.contains(&0) {
                Err(format!("need positive numbers: {s:?}"))
            } else {
                Ok(v)
            }
        })
}

/// Parses one endpoint (`127.0.0.1:2379`, `http://localhost:2379`, `[::1]:2379`) and refuses any
/// address that is not loopback: this tool only ever loads servers on this machine.
pub fn parse_endpoint(s: &str) -> Result<String, String> {
    let rest = s.trim().trim_start_matches("http://");
    if rest.starts_with("https://") || rest.contains('/') {
        return Err(format!("endpoint {s:?}: only plain host:port on loopback"));
    }
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| format!("endpoint {s:?} needs host:port"))?;
    let _: u16 = port.parse().map_err(|_| format!("endpoint {s:?}: bad port"))?;
    let host_clean = host.trim_start_matches('[').trim_end_matches(']');
    let loopback =
        host_clean == "localhost" || host_clean.parse::<IpAddr>().map(|ip| ip.is_loopback()).unwrap_or(false);
    if !loopback {
        return Err(format!(
            "endpoint {s:?}: only loopback targets (127.0.0.0/8, localhost, ::1) are allowed"
        ));
    }
    Ok(format!("http://{host}:{port}"))
}

pub fn parse_endpoints(s: &str) -> Result<Vec<String>, String> {
    let v: Vec<String> = s
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(parse_endpoint)
        .collect::<Result<_, _>>()?;
    if v.is_empty() {
        return Err("no endpoints".into());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_eight_bytes_distinct_and_in_their_namespace() {
        let mut seen = std::collections::HashSet::new();
        for i in (0..100_000).step_by(7).chain([MAX_INDEX]) {
            let k = key(NS_KV, i);
            assert_eq!(k.len(), KEY_LEN);
            let (start, end) = namespace_range(NS_KV);
            assert!(k >= start && k < end);
            assert!(seen.insert(k));
        }
        assert_eq!(key(NS_LIST, 42), b"p0000042");
        // Key order follows index order, so a limit=500 list returns the first 500 indices.
        assert!(key(NS_LIST, 499) < key(NS_LIST, 500));
        assert!(key(NS_OTHER, MAX_INDEX) < namespace_range(NS_LIST).0);
    }

    #[test]
    #[should_panic]
    fn key_index_beyond_seven_digits_panics() {
        key(NS_KV, MAX_INDEX + 1);
    }

    #[test]
    fn values_are_256_bytes() {
        assert_eq!(value(0).len(), VALUE_LEN);
        assert_ne!(value(1), value(2));
    }

    #[test]
    fn durations_and_lists_parse() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("10h").is_err());
        assert!(parse_duration("-1s").is_err());
        assert_eq!(parse_list("1,16,256").unwrap(), vec![1, 16, 256]);
        assert!(parse_list("1,0").is_err());
        assert!(parse_list("a").is_err());
    }

    #[test]
    fn only_loopback_endpoints() {
        assert_eq!(parse_endpoint("127.0.0.1:2379").unwrap(), "http://127.0.0.1:2379");
        assert_eq!(
            parse_endpoint("http://localhost:2379").unwrap(),
            "http://localhost:2379"
        );
        assert_eq!(parse_endpoint("127.1.2.3:1").unwrap(), "http://127.1.2.3:1");
        assert_eq!(parse_endpoint("[::1]:2379").unwrap(), "http://[::1]:2379");
        assert!(parse_endpoint("10.0.0.1:2379").is_err());
        assert!(parse_endpoint("example.com:2379").is_err());
        assert!(parse_endpoint("127.0.0.1").is_err());
        assert!(parse_endpoint("https://127.0.0.1:2379").is_err());
        assert_eq!(parse_endpoints("127.0.0.1:1,127.0.0.1:2").unwrap().len(), 2);
    }
}
