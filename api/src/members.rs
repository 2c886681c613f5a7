//! Cluster membership as etcd keeps it (etcdserver/api/membership): the members with their
//! peer URLs and learner flag, and the IDs removed for good. Persisted as the backend document
//! [`MEMBERS_DOC`] (etcd keeps them in its "members" and "members_removed" buckets), changed
//! by compare-and-set.
//!
//! The store starts from --initial-cluster (every member with its name and peer URLs); each
//! member of a replicated native cluster publishes its client URLs when it starts
//! ([`Members::publish`]). Members added through MemberAdd are recorded and listed but not yet
//! joined to raft (issue #7). etcd's strict reconfiguration checks are applied with that in
//! mind: a member is "started" once it published its client URLs.

use std::sync::Arc;

use cairn_backend::{Backend, BackendError, MemberChange};
use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};

use crate::errors::ApiError;

/// The backend document holding the membership.
pub const MEMBERS_DOC: &str = "members";

/// etcd allows one learner at a time.
const MAX_LEARNERS: usize = 1;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: u64,
    /// Empty until the member starts and publishes it (only this member does).
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    pub is_learner: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    members: Vec<Member>,
    removed: Vec<u64>,
}

/// The membership store of this server.
#[derive(Clone)]
pub struct Members {
    backend: Arc<dyn Backend>,
    /// This member as configured (name, client URLs, initial peer URLs).
    me: Member,
    /// The members of --initial-cluster; empty: this member alone.
    initial: Vec<Member>,
    strict: bool,
    /// The backend replicates among members of its own (native): membership changes reach
    /// its raft group, so a single node can grow.
    replicated: bool,
}

/// The first peer URL, where the backend's replication reaches a member.
fn first_url(m: &Member) -> String {
    m.peer_urls.first().cloned().unwrap_or_default()
}

/// etcd's ID for a member added at runtime: the first 8 bytes (big-endian) of SHA-1 over the
/// sorted peer URLs, the cluster name (empty for MemberAdd) and the Unix time in seconds.
pub fn added_member_id(peer_urls: &[String], unix_secs: i64) -> u64 {
    let mut urls = peer_urls.to_vec();
    urls.sort();
    let mut h = Sha1::new();
    h.update(urls.concat().as_bytes());
    h.update(unix_secs.to_string().as_bytes());
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().expect("sha1 is 20 bytes"))
}

/// etcd's `types.NewURLs`: each URL must be http(s)/unix(s) with a host:port and no path;
/// the result is sorted.
pub fn parse_peer_urls(urls: &[String]) -> Result<Vec<String>, ApiError> {
    let mut out = Vec::with_capacity(urls.len());
    for u in urls {
        let (scheme, rest) = u.split_once("://").ok_or(ApiError::MemberBadUrls)?;
        if !matches!(scheme, "http" | "https" | "unix" | "unixs") {
            return Err(ApiError::MemberBadUrls);
        }
        let (host, path) = match rest.find(['/', '?', '#']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if !path.is_empty() && path != "/" {
            return Err(ApiError::MemberBadUrls);
        }
        // Go's net.SplitHostPort: a port is required; IPv6 hosts are bracketed.
        let port = if let Some(h) = host.strip_prefix('[') {
            h.split_once("]:").map(|(_, p)| p)
        } else {
            match host.matches(':').count() {
                1 => host.split_once(':').map(|(_, p)| p),
                _ => None,
            }
        };
        if port.is_none() {
            return Err(ApiError::MemberBadUrls);
        }
        out.push(u.clone());
    }
    out.sort();
    Ok(out)
}

impl Members {
    pub fn new(backend: Arc<dyn Backend>, me: Member, initial: Vec<Member>, strict: bool) -> Self {
        Self {
            backend,
            me,
            initial,
            strict,
            replicated: false,
        }
    }

    /// Marks the backend as replicating among members (see [`Members::replicated`]).
    pub fn replicated(mut self, on: bool) -> Self {
        self.replicated = on;
        self
    }

    pub fn my_id(&self) -> u64 {
        self.me.id
    }

    /// The stored membership (this member alone until something changed it) with this
    /// member's published name and client URLs.
    async fn load(&self) -> Result<(u64, State), BackendError> {
        let (version, mut state) = self.stored().await?;
        for m in state.members.iter_mut().filter(|m| m.id == self.me.id) {
            m.name = self.me.name.clone();
            m.client_urls = self.me.client_urls.clone();
        }
        state.members.sort_by_key(|m| m.id);
        Ok((version, state))
    }

    /// Replaces the stored membership if it is still at `version`; false when another writer
    /// got there first.
    async fn write(&self, version: u64, state: &State) -> Result<bool, ApiError> {
        let bytes = serde_json::to_vec(state).map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok(self
            .backend
            .doc_put(MEMBERS_DOC, version, bytes)
            .await?
            .is_some())
    }

    /// The membership as stored, with its version (the seed and version 0 before the first
    /// write).
    async fn stored(&self) -> Result<(u64, State), BackendError> {
        Ok(match self.backend.doc_get(MEMBERS_DOC).await? {
            Some(d) => (
                d.version,
                serde_json::from_slice(&d.value).map_err(BackendError::internal)?,
            ),
            None => (
                0,
                State {
                    members: if self.initial.is_empty() {
                        vec![self.me.clone()]
                    } else {
                        self.initial.clone()
                    },
                    removed: Vec::new(),
                },
            ),
        })
    }

    /// Every member, ordered by ID as etcd lists them.
    pub async fn list(&self) -> Result<Vec<Member>, BackendError> {
        Ok(self.load().await?.1.members)
    }

    /// IDs removed from the cluster.
    pub async fn removed(&self) -> Result<Vec<u64>, BackendError> {
        Ok(self.load().await?.1.removed)
    }

    /// Runs `change` on the stored state and writes it back (compare-and-set, retried when
    /// another writer got there first). `change` may refuse with an etcd error.
    async fn update<T>(
        &self,
        change: impl Fn(&mut State) -> Result<T, ApiError>,
    ) -> Result<(T, State), ApiError> {
        loop {
            let (version, mut state) = self.load().await?;
            let out = change(&mut state)?;
            if self.write(version, &state).await? {
                return Ok((out, state));
            }
        }
    }

    /// Membership changes reach the backend's own replication (a native member).
    fn clustered(&self) -> bool {
        self.replicated
    }

    fn started(m: &Member) -> bool {
        !m.client_urls.is_empty()
    }

    /// Records this member's name and client URLs in the shared store, so that every member
    /// lists them (etcd's publish at start-up). Needs a working cluster.
    pub async fn publish(&self) -> Result<(), ApiError> {
        let me = self.me.clone();
        loop {
            let (version, mut state) = self.stored().await?;
            let Some(m) = state.members.iter_mut().find(|m| m.id == me.id) else {
                // Not a member (removed, or not added yet): nothing to publish.
                return Ok(());
            };
            if m.name == me.name && m.client_urls == me.client_urls && version > 0 {
                return Ok(());
            }
            m.name = me.name.clone();
            m.client_urls = me.client_urls.clone();
            if self.write(version, &state).await? {
                return Ok(());
            }
        }
    }

    /// MemberAdd: records a new member with `peer_urls` (already parsed); returns it and the
    /// members after the change.
    pub async fn add(
        &self,
        peer_urls: Vec<String>,
        is_learner: bool,
    ) -> Result<(Member, Vec<Member>), ApiError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let new = Member {
            id: added_member_id(&peer_urls, now),
            peer_urls,
            is_learner,
            ..Default::default()
        };
        let me = self.me.id;
        let strict = self.strict;
        let clustered = self.clustered();
        let (_, state) = self
            .update(|s| {
                let voters: Vec<&Member> = s.members.iter().filter(|m| !m.is_learner).collect();
                if strict {
                    // etcd's IsReadyToAddVotingMember: a quorum of the voters after the add
                    // must have started, except when a second member joins a one-member cluster.
                    if !new.is_learner {
                        let nstarted = voters.iter().filter(|m| Self::started(m)).count();
                        let nmembers = voters.len() + 1;
                        if !(nstarted == 1 && nmembers == 2) && nstarted < nmembers / 2 + 1 {
                            return Err(ApiError::MemberNotEnoughStarted);
                        }
                    }
                    // Every other voter must be connected: a started member of a cluster is
                    // taken as connected; a single node has no connection to anyone.
                    if !clustered && voters.iter().any(|m| m.id != me) {
                        return Err(ApiError::Unhealthy);
                    }
                }
                if s.removed.contains(&new.id) {
                    return Err(ApiError::MemberNotFound);
                }
                if s.members.iter().any(|m| m.id == new.id) {
                    return Err(ApiError::MemberExist);
                }
                if s.members
                    .iter()
                    .any(|m| m.peer_urls.iter().any(|u| new.peer_urls.contains(u)))
                {
                    return Err(ApiError::PeerUrlExist);
                }
                if new.is_learner
                    && s.members.iter().filter(|m| m.is_learner).count() + 1 > MAX_LEARNERS
                {
                    return Err(ApiError::TooManyLearners);
                }
                s.members.push(new.clone());
                s.members.sort_by_key(|m| m.id);
                Ok(())
            })
            .await?;
        self.backend
            .member_change(MemberChange::Add { id: new.id, peer_url: first_url(&new), learner: new.is_learner })
            .await?;
        tracing::info!(id = %format!("{:x}", new.id), peer_urls = ?new.peer_urls, learner = new.is_learner, "added member");
        Ok((new, state.members))
    }

    /// MemberRemove: forgets member `id` for good; returns the members left.
    pub async fn remove(&self, id: u64) -> Result<Vec<Member>, ApiError> {
        let me = self.me.id;
        let strict = self.strict;
        let clustered = self.clustered();
        let (_, state) = self
            .update(|s| {
                let target = s.members.iter().find(|m| m.id == id);
                if strict && !target.is_some_and(|m| m.is_learner) {
                    // etcd's IsReadyToRemoveVotingMember: the voters left must keep a quorum
                    // of started members. (A member that is down may always go; only this one
                    // is up.)
                    let others: Vec<&Member> = s
                        .members
                        .iter()
                        .filter(|m| !m.is_learner && m.id != id)
                        .collect();
                    let nstarted = others.iter().filter(|m| Self::started(m)).count();
                    if nstarted < others.len() / 2 + 1 {
                        return Err(ApiError::MemberNotEnoughStarted);
                    }
                }
                if id == me && (!clustered || s.members.len() == 1) {
                    // Removing the only running member would stop the cluster for good; Cairn
                    // cannot hand over to anyone.
                    return Err(ApiError::MemberNotEnoughStarted);
                }
                if s.removed.contains(&id) || target.is_none() {
                    return Err(ApiError::MemberNotFound);
                }
                s.members.retain(|m| m.id != id);
                s.removed.push(id);
                Ok(())
            })
            .await?;
        self.backend.member_change(MemberChange::Remove { id }).await?;
        tracing::info!(id = %format!("{id:x}"), "removed member");
        Ok(state.members)
    }

    /// MemberUpdate: replaces the peer URLs of member `id`; returns the members after.
    pub async fn update_peer_urls(
        &self,
        id: u64,
        peer_urls: Vec<String>,
    ) -> Result<Vec<Member>, ApiError> {
        let (_, state) = self
            .update(|s| {
                if s.removed.contains(&id) || !s.members.iter().any(|m| m.id == id) {
                    return Err(ApiError::MemberNotFound);
                }
                if s.members
                    .iter()
                    .filter(|m| m.id != id)
                    .any(|m| m.peer_urls.iter().any(|u| peer_urls.contains(u)))
                {
                    return Err(ApiError::PeerUrlExist);
                }
                for m in s.members.iter_mut().filter(|m| m.id == id) {
                    m.peer_urls = peer_urls.clone();
                }
                Ok(())
            })
            .await?;
        if let Some(url) = peer_urls.first() {
            self.backend.member_change(MemberChange::Update { id, peer_url: url.clone() }).await?;
        }
        tracing::info!(id = %format!("{id:x}"), peer_urls = ?peer_urls, "updated member");
        Ok(state.members)
    }

    /// MemberPromote: etcd promotes a learner only once its log caught up with the leader's
    /// (90%); an added member never runs here, so it never has. This member is a voter.
    pub async fn promote(&self, id: u64) -> Result<Vec<Member>, ApiError> {
        let (_, state) = self.load().await?;
        if self.clustered() && !state.removed.contains(&id) {
            match state.members.iter().find(|m| m.id == id) {
                Some(m) if m.is_learner => {
                    self.backend.member_change(MemberChange::Promote { id }).await?;
                    let (_, state) = self
                        .update(|s| {
                            for m in s.members.iter_mut().filter(|m| m.id == id) {
                                m.is_learner = false;
                            }
                            Ok(())
                        })
                        .await?;
                    tracing::info!(id = %format!("{id:x}"), "promoted member");
                    return Ok(state.members);
                }
                Some(_) => return Err(ApiError::MemberNotLearner),
                None => return Err(ApiError::MemberNotFound),
            }
        }
        match state.members.iter().find(|m| m.id == id) {
            _ if state.removed.contains(&id) => Err(ApiError::MemberNotFound),
            // Known to raft but not caught up.
            Some(m) if m.id != self.me.id => Err(ApiError::LearnerNotReady),
            Some(_) => Err(ApiError::MemberNotLearner),
            None => Err(ApiError::MemberNotFound),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Member {
        Member {
            id: 0x8e9e05c52164694d,
            name: "default".into(),
            peer_urls: vec!["http://localhost:2380".into()],
            client_urls: vec!["http://localhost:2379".into()],
            is_learner: false,
        }
    }

    fn members(strict: bool) -> Members {
        Members::new(cairn_memory::MemoryBackend::new(), me(), Vec::new(), strict)
    }

    fn urls(u: &str) -> Vec<String> {
        vec![u.to_string()]
    }

    #[test]
    fn member_id_is_sha1_of_urls_and_time() {
        // SHA-1("http://a:1http://b:2" + "1700000000"), first 8 bytes.
        let id = added_member_id(&["http://b:2".into(), "http://a:1".into()], 1_700_000_000);
        let mut h = Sha1::new();
        h.update(b"http://a:1http://b:21700000000");
        let d = h.finalize();
        assert_eq!(id, u64::from_be_bytes(d[..8].try_into().unwrap()));
    }

    #[test]
    fn peer_urls_are_checked_like_go() {
        assert_eq!(
            parse_peer_urls(&["http://b:2".into(), "https://a:1".into()]).unwrap(),
            vec!["http://b:2".to_string(), "https://a:1".to_string()]
        );
        assert!(parse_peer_urls(&["http://[::1]:2380".into()]).is_ok());
        for bad in ["localhost:2380", "ftp://a:1", "http://a", "http://a:1/path"] {
            assert_eq!(
                parse_peer_urls(&[bad.into()]),
                Err(ApiError::MemberBadUrls),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn add_list_update_remove() {
        let m = members(true);
        assert_eq!(m.list().await.unwrap(), vec![me()]);
        let (new, all) = m.add(urls("http://localhost:20011"), false).await.unwrap();
        assert_eq!(all.len(), 2);
        assert!(all
            .iter()
            .any(|x| x.id == new.id && x.name.is_empty() && !x.is_learner));
        // A second voter would need a quorum of started members.
        assert_eq!(
            m.add(urls("http://localhost:20012"), false)
                .await
                .unwrap_err(),
            ApiError::MemberNotEnoughStarted
        );
        assert_eq!(
            m.add(urls("http://localhost:20011"), true)
                .await
                .unwrap_err(),
            ApiError::Unhealthy
        );
        let all = m
            .update_peer_urls(new.id, urls("http://localhost:20013"))
            .await
            .unwrap();
        assert_eq!(
            all.iter().find(|x| x.id == new.id).unwrap().peer_urls,
            urls("http://localhost:20013")
        );
        assert_eq!(
            m.update_peer_urls(new.id, urls("http://localhost:2380"))
                .await
                .unwrap_err(),
            ApiError::PeerUrlExist
        );
        assert_eq!(
            m.promote(new.id).await.unwrap_err(),
            ApiError::LearnerNotReady
        );
        assert_eq!(
            m.promote(me().id).await.unwrap_err(),
            ApiError::MemberNotLearner
        );
        assert_eq!(m.promote(42).await.unwrap_err(), ApiError::MemberNotFound);
        assert_eq!(m.remove(new.id).await.unwrap(), vec![me()]);
        assert_eq!(
            m.remove(new.id).await.unwrap_err(),
            ApiError::MemberNotFound
        );
        assert_eq!(m.removed().await.unwrap(), vec![new.id]);
        assert_eq!(
            m.remove(me().id).await.unwrap_err(),
            ApiError::MemberNotEnoughStarted
        );
        assert_eq!(
            m.update_peer_urls(42, urls("http://x:1"))
                .await
                .unwrap_err(),
            ApiError::MemberNotFound
        );
    }

    #[tokio::test]
    async fn learners() {
        let m = members(true);
        let (l, _) = m.add(urls("http://localhost:20011"), true).await.unwrap();
        assert!(l.is_learner);
        assert_eq!(
            m.add(urls("http://localhost:20012"), true)
                .await
                .unwrap_err(),
            ApiError::TooManyLearners
        );
        assert_eq!(
            m.promote(l.id).await.unwrap_err(),
            ApiError::LearnerNotReady
        );
        assert_eq!(m.remove(l.id).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn without_strict_checks_more_voters_may_join() {
        let m = members(false);
        m.add(urls("http://localhost:20011"), false).await.unwrap();
        m.add(urls("http://localhost:20012"), false).await.unwrap();
        assert_eq!(m.list().await.unwrap().len(), 3);
    }
}
