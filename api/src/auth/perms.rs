//! The range permission cache: for each user, the union of the key ranges its roles may read
//! and write, answering "may this user read/write this key or range" without walking roles.
//!
//! Ranges follow etcd's "bytes affine" intervals: an empty end (or a stored range end of "\0")
//! means "to the end of the key space", and a permission with no range end covers one key.
//! A single key is permitted when any interval holds it; a range only when the intervals that
//! overlap it cover it without a gap.

use std::cmp::Ordering;
use std::collections::HashMap;

use super::state::{AuthState, PermType};

/// `[begin, end)`; `end` empty is +infinity.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Interval {
    begin: Vec<u8>,
    end: Vec<u8>,
}

/// Compares two bounds where the empty byte string sorts after everything (etcd's
/// `BytesAffineComparable`).
fn cmp_affine(a: &[u8], b: &[u8]) -> Ordering {
    match (a.is_empty(), b.is_empty()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => a.cmp(b),
    }
}

impl Interval {
    /// The interval a stored permission covers.
    fn of_permission(key: &[u8], range_end: &[u8]) -> Self {
        match range_end {
            [] => Self::point(key),
            [0] => Self { begin: key.to_vec(), end: Vec::new() },
            end => Self { begin: key.to_vec(), end: end.to_vec() },
        }
    }

    /// `[key, key + "\0")`: exactly one key.
    fn point(key: &[u8]) -> Self {
        let mut end = key.to_vec();
        end.push(0);
        Self { begin: key.to_vec(), end }
    }

    fn overlaps(&self, other: &Interval) -> bool {
        cmp_affine(&self.begin, &other.end) == Ordering::Less && cmp_affine(&other.begin, &self.end) == Ordering::Less
    }
}

/// The intervals of one permission type, sorted by begin.
#[derive(Clone, Debug, Default)]
struct Intervals(Vec<Interval>);

impl Intervals {
    fn insert(&mut self, ivl: Interval) {
        self.0.push(ivl);
    }

    fn finish(&mut self) {
        self.0.sort_by(|a, b| cmp_affine(&a.begin, &b.begin).then_with(|| cmp_affine(&a.end, &b.end)));
    }

    /// Whether some interval holds `key`.
    fn holds_key(&self, key: &[u8]) -> bool {
        let p = Interval::point(key);
        self.0.iter().any(|i| i.overlaps(&p))
    }

    /// Whether the intervals overlapping `q` cover it without a gap (etcd's `Contains`).
    fn covers(&self, q: &Interval) -> bool {
        let mut span: Option<(&[u8], &[u8])> = None;
        for i in self.0.iter().filter(|i| i.overlaps(q)) {
            span = match span {
                None => Some((&i.begin, &i.end)),
                Some((begin, end)) => {
                    if cmp_affine(end, &i.begin) == Ordering::Less {
                        return false;
                    }
                    let end = if cmp_affine(&i.end, end) == Ordering::Greater { &i.end[..] } else { end };
                    Some((begin, end))
                }
            };
        }
        match span {
            Some((begin, end)) => {
                cmp_affine(end, &q.end) != Ordering::Less && cmp_affine(begin, &q.begin) != Ordering::Greater
            }
            None => false,
        }
    }
}

/// What one user may read and write.
#[derive(Clone, Debug, Default)]
struct UserPerms {
    read: Intervals,
    write: Intervals,
}

/// Whether the check is for reading or writing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// Every user's merged permissions, rebuilt whenever the auth state changes.
#[derive(Clone, Debug, Default)]
pub struct PermCache {
    users: HashMap<String, UserPerms>,
}

impl PermCache {
    pub fn build(state: &AuthState) -> Self {
        let mut users = HashMap::new();
        for (name, user) in &state.users {
            let mut perms = UserPerms::default();
            for role in user.roles.iter().filter_map(|r| state.roles.get(r)) {
                for p in &role.perms {
                    let ivl = Interval::of_permission(&p.key, &p.range_end);
                    match p.perm_type {
                        PermType::Read => perms.read.insert(ivl),
                        PermType::Write => perms.write.insert(ivl),
                        PermType::ReadWrite => {
                            perms.read.insert(ivl.clone());
                            perms.write.insert(ivl);
                        }
                    }
                }
            }
            perms.read.finish();
            perms.write.finish();
            users.insert(name.clone(), perms);
        }
        Self { users }
    }

    /// Whether `user`'s roles grant `access` on `key` (empty `range_end`) or on the range
    /// `[key, range_end)` ("\0" meaning to the end of the key space).
    pub fn permits(&self, user: &str, key: &[u8], range_end: &[u8], access: Access) -> bool {
        let Some(perms) = self.users.get(user) else {
            return false;
        };
        let ivls = match access {
            Access::Read => &perms.read,
            Access::Write => &perms.write,
        };
        match range_end {
            [] => ivls.holds_key(key),
            [0] => ivls.covers(&Interval { begin: key.to_vec(), end: Vec::new() }),
            end => ivls.covers(&Interval { begin: key.to_vec(), end: end.to_vec() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::state::{Perm, Role, User};

    fn cache(perms: &[(PermType, &str, &str)]) -> PermCache {
        let mut st = AuthState::default();
        let role = Role {
            perms: perms
                .iter()
                .map(|(t, k, e)| Perm { perm_type: *t, key: k.as_bytes().to_vec(), range_end: e.as_bytes().to_vec() })
                .collect(),
        };
        st.roles.insert("r".into(), role);
        st.users.insert("u".into(), User { roles: vec!["r".into()], ..Default::default() });
        PermCache::build(&st)
    }

    #[test]
    fn single_key_permission() {
        let c = cache(&[(PermType::Read, "foo", "")]);
        assert!(c.permits("u", b"foo", b"", Access::Read));
        assert!(!c.permits("u", b"foo", b"", Access::Write));
        assert!(!c.permits("u", b"fooo", b"", Access::Read));
        assert!(!c.permits("u", b"foo", b"fop", Access::Read));
        assert!(!c.permits("nobody", b"foo", b"", Access::Read));
    }

    #[test]
    fn prefix_permission() {
        let c = cache(&[(PermType::ReadWrite, "foo/", "foo0")]);
        assert!(c.permits("u", b"foo/a", b"", Access::Write));
        assert!(c.permits("u", b"foo/", b"foo0", Access::Read));
        assert!(c.permits("u", b"foo/a", b"foo/b", Access::Read));
        assert!(!c.permits("u", b"foo", b"foo0", Access::Read));
        assert!(!c.permits("u", b"foo0", b"", Access::Write));
        assert!(!c.permits("u", b"foo/", b"\0", Access::Read));
    }

    #[test]
    fn from_key_permission() {
        let c = cache(&[(PermType::Write, "k", "\0")]);
        assert!(c.permits("u", b"k", b"", Access::Write));
        assert!(c.permits("u", b"zzz", b"", Access::Write));
        assert!(c.permits("u", b"k", b"\0", Access::Write));
        assert!(c.permits("u", b"m", b"z", Access::Write));
        assert!(!c.permits("u", b"a", b"", Access::Write));
        assert!(!c.permits("u", b"a", b"\0", Access::Write));
        assert!(!c.permits("u", b"k", b"\0", Access::Read));
    }

    #[test]
    fn adjacent_ranges_cover_together_gaps_do_not() {
        let c = cache(&[(PermType::Read, "a", "c"), (PermType::Read, "c", "e"), (PermType::Read, "f", "g")]);
        assert!(c.permits("u", b"a", b"e", Access::Read));
        assert!(c.permits("u", b"b", b"d", Access::Read));
        assert!(!c.permits("u", b"a", b"g", Access::Read));
        assert!(!c.permits("u", b"e", b"", Access::Read));
    }

    #[test]
    fn roles_of_a_user_are_merged() {
        let mut st = AuthState::default();
        let perm = |t, k: &str, e: &str| Perm { perm_type: t, key: k.into(), range_end: e.into() };
        st.roles.insert("r1".into(), Role { perms: vec![perm(PermType::Read, "a", "b")] });
        st.roles.insert("r2".into(), Role { perms: vec![perm(PermType::Read, "b", "c")] });
        st.users.insert("u".into(), User { roles: vec!["r1".into(), "r2".into(), "gone".into()], ..Default::default() });
        let c = PermCache::build(&st);
        assert!(c.permits("u", b"a", b"c", Access::Read));
    }
}
