//! The cluster's alarms (etcd's alarm store). A NOSPACE alarm is raised when a write hits the
//! space quota; while it is on, puts and lease grants fail with "database space exceeded" and
//! deletes still work, until `etcdctl alarm disarm`. Alarms are kept in memory only (etcd
//! persists them in its backend).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use cairn_proto::etcdserverpb::{AlarmMember, AlarmType};

#[derive(Clone, Debug, Default)]
pub struct Alarms {
    /// (alarm type, member ID)
    active: Arc<Mutex<BTreeSet<(i32, u64)>>>,
}

fn member(alarm: i32, member_id: u64) -> AlarmMember {
    AlarmMember { member_id, alarm }
}

impl Alarms {
    /// Raises `alarm` for `member_id`; returns the alarm (also when it was already on).
    pub fn activate(&self, member_id: u64, alarm: i32) -> AlarmMember {
        let newly = self.active.lock().unwrap().insert((alarm, member_id));
        if newly {
            tracing::warn!(alarm = alarm_name(alarm), from = %format!("{member_id:x}"), "alarm raised");
        }
        member(alarm, member_id)
    }

    /// Clears `alarm` for `member_id`; `None` when it was not on.
    pub fn deactivate(&self, member_id: u64, alarm: i32) -> Option<AlarmMember> {
        let removed = self.active.lock().unwrap().remove(&(alarm, member_id));
        removed.then(|| {
            tracing::warn!(alarm = alarm_name(alarm), from = %format!("{member_id:x}"), "alarm disarmed");
            member(alarm, member_id)
        })
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

    #[test]
    fn activate_get_deactivate() {
        let a = Alarms::default();
        assert!(!a.no_space());
        a.activate(7, AlarmType::Nospace as i32);
        a.activate(7, AlarmType::Nospace as i32);
        assert!(a.no_space());
        assert_eq!(a.get(AlarmType::None as i32).len(), 1);
        assert!(a.get(AlarmType::Corrupt as i32).is_empty());
        assert_eq!(describe(&a.get(0)[0]), "memberID:7 alarm:NOSPACE ");
        assert!(a.deactivate(7, AlarmType::Nospace as i32).is_some());
        assert!(a.deactivate(7, AlarmType::Nospace as i32).is_none());
        assert!(!a.no_space());
    }
}
