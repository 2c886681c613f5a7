//! etcd's post-processing of a range read, shared by every backend.

use crate::model::{KeyValue, RangeRequest, SortOrder, SortTarget};

/// How many kvs (in key order) a backend must fetch for `req`: `None` means all of them,
/// because filters or a sort other than ascending-by-key need the whole range; otherwise
/// `limit + 1`, so that `more` can be told.
///
/// As in etcd, sort order NONE with a target other than KEY still fetches only `limit + 1`
/// keys in key order and sorts just those ascending (etcd decides on fetching everything
/// before it turns NONE into ASCEND), so such a page is not the first of the sorted range.
pub fn fetch_limit(req: &RangeRequest) -> Option<usize> {
    let key_order = req.sort_order == SortOrder::None || (req.sort_order, req.sort_target) == (SortOrder::Ascend, SortTarget::Key);
    let filtered = req.min_mod_revision != 0
        || req.max_mod_revision != 0
        || req.min_create_revision != 0
        || req.max_create_revision != 0;
    if req.limit > 0 && key_order && !filtered {
        Some(req.limit as usize + 1)
    } else {
        None
    }
}

/// Applies etcd's filters, sort and limit to the kvs of a range (in key order, as fetched
/// according to [`fetch_limit`]). Returns the kvs to send and the `more` flag.
pub fn finish_range(req: &RangeRequest, mut kvs: Vec<KeyValue>) -> (Vec<KeyValue>, bool) {
    if req.max_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision <= req.max_mod_revision);
    }
    if req.min_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision >= req.min_mod_revision);
    }
    if req.max_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision <= req.max_create_revision);
    }
    if req.min_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision >= req.min_create_revision);
    }
    let mut order = req.sort_order;
    if req.sort_target != SortTarget::Key && order == SortOrder::None {
        order = SortOrder::Ascend;
    }
    let key_of = |kv: &KeyValue| -> SortKey {
        match req.sort_target {
            SortTarget::Key => SortKey::Bytes(kv.key.clone()),
            SortTarget::Version => SortKey::Int(kv.version),
            SortTarget::Create => SortKey::Int(kv.create_revision),
            SortTarget::Mod => SortKey::Int(kv.mod_revision),
            SortTarget::Value => SortKey::Bytes(kv.value.clone()),
        }
    };
    match order {
        SortOrder::None => {}
        SortOrder::Ascend => {
            if req.sort_target != SortTarget::Key {
                kvs.sort_by_cached_key(key_of);
            }
        }
        SortOrder::Descend => {
            // A stable descending sort: equal elements stay in key order, as Go's sort.Sort
            // (insertion sort on etcd's small ranges) leaves them.
            kvs.sort_by_cached_key(|kv| std::cmp::Reverse(key_of(kv)));
        }
    }
    let mut more = false;
    if req.limit > 0 && kvs.len() > req.limit as usize {
        kvs.truncate(req.limit as usize);
        more = true;
    }
    if req.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    (kvs, more)
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum SortKey {
    Int(i64),
    Bytes(Vec<u8>),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, version: i64, create: i64) -> KeyValue {
        KeyValue { key: key.into(), version, create_revision: create, mod_revision: create, ..Default::default() }
    }

    fn req(order: SortOrder, target: SortTarget, limit: i64) -> RangeRequest {
        RangeRequest { sort_order: order, sort_target: target, limit, ..Default::default() }
    }

    #[test]
    fn none_order_with_a_target_sorts_only_the_fetched_page() {
        let r = req(SortOrder::None, SortTarget::Create, 2);
        assert_eq!(fetch_limit(&r), Some(3));
        let page = vec![kv("a", 1, 9), kv("b", 1, 5), kv("c", 1, 7)];
        let (kvs, more) = finish_range(&r, page);
        assert_eq!(kvs.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>(), [b"b".to_vec(), b"c".to_vec()]);
        assert!(more);
    }

    #[test]
    fn descending_sort_keeps_ties_in_key_order() {
        let r = req(SortOrder::Descend, SortTarget::Version, 0);
        assert_eq!(fetch_limit(&r), None);
        let all = vec![kv("a", 1, 1), kv("b", 2, 2), kv("c", 1, 3), kv("d", 1, 4)];
        let (kvs, _) = finish_range(&r, all);
        let keys: Vec<_> = kvs.iter().map(|kv| String::from_utf8(kv.key.clone()).unwrap()).collect();
        assert_eq!(keys, ["b", "a", "c", "d"]);
    }
}
