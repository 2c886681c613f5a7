//! etcd's post-processing of a range read, shared by every backend.

use crate::model::{KeyValue, RangeRequest, SortOrder, SortTarget};

/// How many kvs (in key order) a backend must fetch for `req`: `None` means all of them,
/// because filters or a sort other than ascending-by-key need the whole range; otherwise
/// `limit + 1`, so that `more` can be told.
pub fn fetch_limit(req: &RangeRequest) -> Option<usize> {
    let key_order = matches!(
        (req.sort_order, req.sort_target),
        (SortOrder::None, SortTarget::Key) | (SortOrder::Ascend, SortTarget::Key)
    );
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
            kvs.sort_by_cached_key(key_of);
            kvs.reverse();
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
