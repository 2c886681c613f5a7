//! The cluster's alarms (etcd's alarm store). A NOSPACE alarm is raised when a write hits the
//! space quota; while it is on, puts and lease grants fail with "database space exceeded" and
//! deletes, compaction and reads still work, until `etcdctl alarm disarm`.
//!
//! Alarms are persisted as the backend document [`ALARMS_DOC`] (etcd keeps them in its
//! backend's "alarm" bucket), so they survive a restart; changes go through the document's
//! compare-and-set, and this process keeps a copy for the per-request checks, re-read every
//! second so that alarms raised or disarmed through another process or member apply here too.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use cairn_backend::{Backend, BackendError};
use cairn_proto::etcdserverpb::{AlarmMember, AlarmType};

/// The backend document holding the active alarms.
pub const ALARMS_DOC: &str = "alarms";

/// (alarm type, member ID)
type AlarmSet = BTreeSet<(i32, u64)>;

#[derive(Clone, Default)]
pub struct Alarms {
    active: Arc<Mutex<AlarmSet>>,
    /// Where alarms are persisted; `None` keeps them in memory (unit tests).
    backend: Option<Arc<dyn Backend>>,
}

impl std::fmt::Debug for Alarms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alarms")
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

fn member(alarm: i32, member_id: u64) -> AlarmMember {
    AlarmMember { member_id, alarm }
}

/// The document's bytes: 12 bytes per alarm, type (i32 LE) then member ID (u64 LE).
fn encode(set: &AlarmSet) -> Vec<u8> {
    let mut out = Vec::with_capacity(set.len() * 12);
    for (t, m) in set {
        out.extend_from_slice(&t.to_le_bytes());
        out.extend_from_slice(&m.to_le_bytes());
    }
    out
}

fn decode(b: &[u8]) -> AlarmSet {
    b.chunks_exact(12)
        .map(|c| {
            let t = i32::from_le_bytes(c[..4].try_into().expect("4 bytes"));
            let m = u64::from_le_bytes(c[4..].try_into().expect("8 bytes"));
            (t, m)
        })
        .collect()
}

impl Alarms {
    /// The alarms persisted in `backend`.
    pub async fn load(backend: Arc<dyn Backend>) -> Result<Self, BackendError> {
        let set = backend
            .doc_get(ALARMS_DOC)
            .await?
            .map(|d| decode(&d.value))
            .unwrap_or_default();
        Ok(Self {
            active: Arc::new(Mutex::new(set)),
            backend: Some(backend),
        })
    }

    /// Applies `change` to the persisted set (compare-and-set, retried on a race) and mirrors
    /// the result here.
    async fn update(&self, change: impl Fn(&mut AlarmSet)) -> Result<(), BackendError> {
        let Some(backend) = &self.backend else {
            change(&mut self.active.lock().unwrap());
            return Ok(());
        };
        loop {
            let doc = backend.doc_get(ALARMS_DOC).await?;
            let (version, mut set) =
                doc.map_or((0, AlarmSet::new()), |d| (d.version, decode(&d.value)));
            let before = set.clone();
            change(&mut set);
            if set == before
                || backend
                    .doc_put(ALARMS_DOC, version, encode(&set))
                    .await?
                    .is_some()
            {
                *self.active.lock().unwrap() = set;
                return Ok(());
            }
        }
    }

    /// Raises `alarm` for `member_id`; returns the alarm (also when it was already on), or
    /// `None` for `AlarmType::None`, which etcd does not store.
    pub async fn activate(
        &self,
        member_id: u64,
        alarm: i32,
    ) -> Result<Option<AlarmMember>, BackendError> {
        if alarm == AlarmType::None as i32 {
            return Ok(None);
        }
        let was_on = self.active.lock().unwrap().contains(&(alarm, member_id));
        self.update(|s| {
            s.insert((alarm, member_id));
        })
        .await?;
        if !was_on {
            tracing::warn!(alarm = alarm_name(alarm), from = %format!("{member_id:x}"), "alarm raised");
        }
        Ok(Some(member(alarm, member_id)))
    }

    /// Clears `alarm` for `member_id`; `None` when it was not on.
    pub async fn deactivate(
        &self,
        member_id: u64,
        alarm: i32,
    ) -> Result<Option<AlarmMember>, BackendError> {
        if let Some(backend) = &self.backend {
            // Another process may have raised it: look at the stored set, not only ours.
            let stored = backend
                .doc_get(ALARMS_DOC)
                .await?
                .map(|d| decode(&d.value))
                .unwrap_or_default();
            *self.active.lock().unwrap() = stored;
        }
        if !self.active.lock().unwrap().contains(&(alarm, member_id)) {
            return Ok(None);
        }
        self.update(|s| {
            s.remove(&(alarm, member_id));
        })
        .await?;
        tracing::warn!(alarm = alarm_name(alarm), from = %format!("{member_id:x}"), "alarm disarmed");
        Ok(Some(member(alarm, member_id)))
    }

    /// Keeps this process's copy in step with the stored set, which other processes on the
    /// same database (or other members) change: reads it every `every`.
    pub fn spawn_refresh(&self, every: std::time::Duration) -> Option<tokio::task::JoinHandle<()>> {
        let backend = self.backend.clone()?;
        let active = self.active.clone();
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match backend.doc_get(ALARMS_DOC).await {
                    Ok(doc) => {
                        let stored = doc.map(|d| decode(&d.value)).unwrap_or_default();
                        let mut mine = active.lock().unwrap();
                        if *mine != stored {
                            tracing::info!(alarms = ?stored, "alarms changed elsewhere");
                            *mine = stored;
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "could not refresh alarms"),
                }
            }
        }))
    }

    /// The active alarms of one type, or all of them for `AlarmType::None`.
    pub fn get(&self, alarm: i32) -> Vec<AlarmMember> {
        let active = self.active.lock().unwrap();
        active
            .iter()
            .filter(|(t, _)| alarm == AlarmType::None as i32 || *t == alarm)
            .map(|&(t, m)| member(t, m))
            .collect()
    }

    pub fn no_space(&self) -> bool {
        !self.get(AlarmType::Nospace as i32).is_empty()
    }

    /// Raises NOSPACE for `member_id` when `e` is the backend's quota error (etcd's quota
    /// check does the same before answering); returns `e`.
    pub async fn raise_on_nospace(&self, member_id: u64, e: BackendError) -> BackendError {
        if e == BackendError::NoSpace {
            if let Err(err) = self.activate(member_id, AlarmType::Nospace as i32).await {
                tracing::error!(error = %err, "could not persist the NOSPACE alarm");
            }
        }
        e
    }
}

/// etcd's text form of an alarm, as Status lists it in `errors`.
pub fn describe(a: &AlarmMember) -> String {
    format!("memberID:{} alarm:{} ", a.member_id, alarm_name(a.alarm))
}

fn alarm_name(alarm: i32) -> &'static str {
    AlarmType::try_from(alarm).map_or("UNKNOWN", |t| t.as_str_name())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn activate_get_deactivate() {
        let a = Alarms::default();
        assert!(!a.no_space());
        a.activate(7, AlarmType::Nospace as i32).await.unwrap();
        a.activate(7, AlarmType::Nospace as i32).await.unwrap();
        assert!(a.no_space());
        assert_eq!(a.get(AlarmType::None as i32).len(), 1);
        assert!(a.get(AlarmType::Corrupt as i32).is_empty());
        assert_eq!(describe(&a.get(0)[0]), "memberID:7 alarm:NOSPACE ");
        assert!(a
            .deactivate(7, AlarmType::Nospace as i32)
            .await
            .unwrap()
            .is_some());
        assert!(a
            .deactivate(7, AlarmType::Nospace as i32)
            .await
            .unwrap()
            .is_none());
        assert!(!a.no_space());
        assert!(a
            .activate(7, AlarmType::None as i32)
            .await
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn persisted_in_the_backend() {
        let backend: Arc<dyn Backend> = cairn_memory::MemoryBackend::new();
        let a = Alarms::load(backend.clone()).await.unwrap();
        a.activate(9, AlarmType::Nospace as i32).await.unwrap();
        let again = Alarms::load(backend.clone()).await.unwrap();
        assert_eq!(again.get(0), vec![member(AlarmType::Nospace as i32, 9)]);
        // Disarmed through another handle: this one sees it on its next deactivate/load.
        assert!(again
            .deactivate(9, AlarmType::Nospace as i32)
            .await
            .unwrap()
            .is_some());
        assert!(Alarms::load(backend).await.unwrap().get(0).is_empty());
    }

    #[test]
    fn encoding_round_trips() {
        let set: AlarmSet = [(1, 5), (2, u64::MAX)].into_iter().collect();
        assert_eq!(decode(&encode(&set)), set);
    }
}
