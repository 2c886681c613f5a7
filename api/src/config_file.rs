//! etcd's YAML config file (keys as in etcd.conf.yml.sample) turned into `flag=value` pairs,
//! so that one parser (clap's) checks every value. The nested TLS sections map onto the
//! `--*` and `--peer-*` TLS flags.

use serde_yaml::Value;

/// Keys of `client-transport-security` and `peer-transport-security`, and their flags.
const CLIENT_TLS: &[(&str, &str)] = &[
    ("cert-file", "cert-file"),
    ("key-file", "key-file"),
    ("client-cert-auth", "client-cert-auth"),
    ("trusted-ca-file", "trusted-ca-file"),
    ("auto-tls", "auto-tls"),
    ("crl-file", "client-crl-file"),
    ("allowed-hostname", "client-cert-allowed-hostname"),
];
const PEER_TLS: &[(&str, &str)] = &[
    ("cert-file", "peer-cert-file"),
    ("key-file", "peer-key-file"),
    ("client-cert-auth", "peer-client-cert-auth"),
    ("trusted-ca-file", "peer-trusted-ca-file"),
    ("auto-tls", "peer-auto-tls"),
    ("crl-file", "peer-crl-file"),
    ("allowed-cn", "peer-cert-allowed-cn"),
    ("allowed-hostname", "peer-cert-allowed-hostname"),
];

/// Durations in etcd's YAML decode from numbers as nanoseconds.
const DURATION_KEYS: &[&str] = &[
    "backend-batch-interval",
    "grpc-keepalive-min-time",
    "grpc-keepalive-interval",
    "grpc-keepalive-timeout",
    "experimental-corrupt-check-time",
    "experimental-compact-hash-check-time",
    "experimental-compaction-sleep-interval",
    "experimental-watch-progress-notify-interval",
    "experimental-warning-apply-duration",
    "experimental-warning-unary-request-duration",
    "experimental-downgrade-check-time",
    "experimental-wait-cluster-ready-timeout",
];

/// The file's settings as `(flag, value)` pairs; empty (null) keys keep their defaults.
pub fn to_args(text: &str) -> Result<Vec<(String, String)>, String> {
    let doc: Value = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    let Value::Mapping(map) = doc else {
        return if doc.is_null() { Ok(Vec::new()) } else { Err("expected a mapping at top level".into()) };
    };
    let mut out = Vec::new();
    for (k, v) in map {
        let key = k.as_str().ok_or("non-string key")?.to_string();
        match key.as_str() {
            "client-transport-security" => section(&v, CLIENT_TLS, &mut out)?,
            "peer-transport-security" => section(&v, PEER_TLS, &mut out)?,
            _ => {
                if let Some(val) = scalar(&v)? {
                    let val =
                        if DURATION_KEYS.contains(&key.as_str()) && v.is_number() { format!("{val}ns") } else { val };
                    out.push((key, val));
                }
            }
        }
    }
    Ok(out)
}

fn section(v: &Value, keys: &[(&str, &str)], out: &mut Vec<(String, String)>) -> Result<(), String> {
    let Value::Mapping(map) = v else { return Ok(()) };
    for (k, v) in map {
        let key = k.as_str().ok_or("non-string key")?;
        let flag = keys.iter().find(|(name, _)| *name == key).map_or_else(|| key.to_string(), |(_, f)| f.to_string());
        if let Some(val) = scalar(v)? {
            out.push((flag, val));
        }
    }
    Ok(())
}

/// A value as flag text: lists are comma-joined, null is "not set".
fn scalar(v: &Value) -> Result<Option<String>, String> {
    Ok(match v {
        Value::Null => None,
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(s.clone()),
        Value::Sequence(items) => {
            let parts: Result<Vec<_>, _> = items.iter().map(|i| scalar(i).map(Option::unwrap_or_default)).collect();
            Some(parts?.join(","))
        }
        other => return Err(format!("unsupported value {other:?}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_file_converts() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/etcd.conf.yml.sample")).unwrap();
        let args = to_args(&text).unwrap();
        let get = |k: &str| args.iter().find(|(f, _)| f == k).map(|(_, v)| v.as_str());
        assert_eq!(get("name"), Some("default"));
        assert_eq!(get("snapshot-count"), Some("10000"));
        assert_eq!(get("data-dir"), None);
        assert_eq!(get("log-outputs"), Some("stderr"));
        assert_eq!(get("peer-auto-tls"), Some("false"));
        assert_eq!(get("auto-compaction-retention"), Some("1"));
    }

    #[test]
    fn numeric_durations_are_nanoseconds() {
        let args = to_args("grpc-keepalive-timeout: 5000000000\n").unwrap();
        assert_eq!(args, vec![("grpc-keepalive-timeout".to_string(), "5000000000ns".to_string())]);
    }
}
