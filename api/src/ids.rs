//! etcd's member and cluster IDs, derived exactly as etcd derives them for a new cluster, so
//! that clients (and etcd's own tests, which compare raw response headers) see the same IDs.

use sha1::{Digest, Sha1};

/// etcd's member ID: the first 8 bytes (big-endian) of SHA-1 over the member's peer URLs,
/// sorted and concatenated, followed by the initial cluster token.
pub fn member_id(peer_urls: &[String], token: &str) -> u64 {
    let mut urls: Vec<&str> = peer_urls.iter().map(String::as_str).collect();
    urls.sort_unstable();
    let mut hasher = Sha1::new();
    for url in urls {
        hasher.update(url.as_bytes());
    }
    hasher.update(token.as_bytes());
    first_u64(&hasher.finalize())
}

/// etcd's cluster ID: the first 8 bytes of SHA-1 over the sorted member IDs, each as 8
/// big-endian bytes.
pub fn cluster_id(member_ids: &[u64]) -> u64 {
    let mut ids = member_ids.to_vec();
    ids.sort_unstable();
    let mut hasher = Sha1::new();
    for id in ids {
        hasher.update(id.to_be_bytes());
    }
    first_u64(&hasher.finalize())
}

fn first_u64(digest: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(b)
}

/// One member of `--initial-cluster`: its name and peer URLs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitialMember {
    pub name: String,
    pub peer_urls: Vec<String>,
}

/// Parses `--initial-cluster` (`name=url,name=url,...`); URLs of the same name are grouped,
/// in first-seen order of names, as etcd does.
pub fn parse_initial_cluster(s: &str) -> Result<Vec<InitialMember>, String> {
    let mut members: Vec<InitialMember> = Vec::new();
    for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, url) = entry
            .split_once('=')
            .ok_or_else(|| format!("failed to parse initial-cluster entry {entry:?}: expected name=url"))?;
        match members.iter_mut().find(|m| m.name == name) {
            Some(m) => m.peer_urls.push(url.to_string()),
            None => members.push(InitialMember { name: name.to_string(), peer_urls: vec![url.to_string()] }),
        }
    }
    Ok(members)
}

/// The member ID of `name` and the cluster ID of a new cluster built from `initial_cluster`.
pub fn derive_ids(name: &str, initial_cluster: &str, token: &str) -> Result<(u64, u64), String> {
    let members = parse_initial_cluster(initial_cluster)?;
    let me = members
        .iter()
        .find(|m| m.name == name)
        .ok_or_else(|| format!("couldn't find local name {name:?} in the initial cluster configuration"))?;
    let ids: Vec<u64> = members.iter().map(|m| member_id(&m.peer_urls, token)).collect();
    Ok((member_id(&me.peer_urls, token), cluster_id(&ids)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_defaults() {
        let (member, cluster) = derive_ids("default", "default=http://localhost:2380", "etcd-cluster").unwrap();
        assert_eq!(format!("{member:x}"), "8e9e05c52164694d");
        assert_eq!(format!("{cluster:x}"), "cdf818194e3a8c32");
    }

    /// Checked against etcd 3.4.23 started with these flags (`etcdctl member list -w json`).
    #[test]
    fn matches_real_etcd_on_custom_urls() {
        let (member, cluster) = derive_ids("test", "test=http://127.0.0.1:23800", "etcd-cluster").unwrap();
        assert_eq!(member, 3319814642761637952);
        assert_eq!(cluster, 324952591200643719);
    }

    /// etcd's e2e suite, single node with --peer-auto-tls: peer URL https://localhost:20001,
    /// token "new". The ID has a leading zero byte, so it prints with 14 hex digits.
    #[test]
    fn e2e_single_node() {
        let (member, cluster) = derive_ids("test-0", "test-0=https://localhost:20001", "new").unwrap();
        assert_eq!(format!("{member:x}"), "a8f3458387986d");
        assert_eq!(format!("{cluster:x}"), "34c21a2d427db393");
    }

    #[test]
    fn member_urls_are_sorted() {
        let a = member_id(&["http://b:1".into(), "http://a:1".into()], "t");
        let b = member_id(&["http://a:1".into(), "http://b:1".into()], "t");
        assert_eq!(a, b);
    }

    #[test]
    fn groups_urls_by_name_and_rejects_garbage() {
        let m = parse_initial_cluster("a=http://x:1,b=http://y:1,a=http://z:1").unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].peer_urls, vec!["http://x:1", "http://z:1"]);
        assert!(parse_initial_cluster("nonsense").is_err());
        assert!(derive_ids("c", "a=http://x:1", "t").is_err());
    }
}
