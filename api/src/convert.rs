//! Conversions between etcd's protobuf messages and the backend's model types. Requests are
//! converted only after `validate` accepted them.

use cairn_backend as model;
use cairn_proto::etcdserverpb as pb;
use cairn_proto::etcdserverpb::{compare, range_request, request_op, response_op};
use cairn_proto::mvccpb;

pub fn range_req(r: pb::RangeRequest) -> model::RangeRequest {
    let sort_order = match range_request::SortOrder::try_from(r.sort_order) {
        Ok(range_request::SortOrder::Ascend) => model::SortOrder::Ascend,
        Ok(range_request::SortOrder::Descend) => model::SortOrder::Descend,
        _ => model::SortOrder::None,
    };
    let sort_target = match range_request::SortTarget::try_from(r.sort_target) {
        Ok(range_request::SortTarget::Version) => model::SortTarget::Version,
        Ok(range_request::SortTarget::Create) => model::SortTarget::Create,
        Ok(range_request::SortTarget::Mod) => model::SortTarget::Mod,
        Ok(range_request::SortTarget::Value) => model::SortTarget::Value,
        _ => model::SortTarget::Key,
    };
    model::RangeRequest {
        range: model::KeyRange::new(r.key, r.range_end),
        revision: r.revision,
        limit: r.limit,
        sort_order,
        sort_target,
        serializable: r.serializable,
        keys_only: r.keys_only,
        count_only: r.count_only,
        min_mod_revision: r.min_mod_revision,
        max_mod_revision: r.max_mod_revision,
        min_create_revision: r.min_create_revision,
        max_create_revision: r.max_create_revision,
    }
}

pub fn put_req(r: pb::PutRequest) -> model::PutRequest {
    model::PutRequest {
        key: r.key,
        value: r.value,
        lease: r.lease,
        prev_kv: r.prev_kv,
        ignore_value: r.ignore_value,
        ignore_lease: r.ignore_lease,
    }
}

pub fn delete_req(r: pb::DeleteRangeRequest) -> model::DeleteRangeRequest {
    model::DeleteRangeRequest { range: model::KeyRange::new(r.key, r.range_end), prev_kv: r.prev_kv }
}

pub fn txn_req(r: pb::TxnRequest) -> model::TxnRequest {
    model::TxnRequest {
        compare: r.compare.into_iter().map(compare_req).collect(),
        success: r.success.into_iter().filter_map(request_op).collect(),
        failure: r.failure.into_iter().filter_map(request_op).collect(),
    }
}

fn request_op(op: pb::RequestOp) -> Option<model::RequestOp> {
    Some(match op.request? {
        request_op::Request::RequestRange(r) => model::RequestOp::Range(range_req(r)),
        request_op::Request::RequestPut(r) => model::RequestOp::Put(put_req(r)),
        request_op::Request::RequestDeleteRange(r) => model::RequestOp::DeleteRange(delete_req(r)),
        request_op::Request::RequestTxn(t) => model::RequestOp::Txn(txn_req(t)),
    })
}

/// A compare whose operand is missing compares against the zero value, as in etcd.
fn compare_req(c: pb::Compare) -> model::Compare {
    use compare::TargetUnion as U;
    let int = |u: &Option<U>| match u {
        Some(U::Version(v) | U::CreateRevision(v) | U::ModRevision(v) | U::Lease(v)) => *v,
        _ => 0,
    };
    let target = match compare::CompareTarget::try_from(c.target) {
        Ok(compare::CompareTarget::Create) => model::CompareTarget::Create(int(&c.target_union)),
        Ok(compare::CompareTarget::Mod) => model::CompareTarget::Mod(int(&c.target_union)),
        Ok(compare::CompareTarget::Lease) => model::CompareTarget::Lease(int(&c.target_union)),
        Ok(compare::CompareTarget::Value) => model::CompareTarget::Value(match c.target_union {
            Some(U::Value(v)) => v,
            _ => Vec::new(),
        }),
        _ => model::CompareTarget::Version(int(&c.target_union)),
    };
    let result = match compare::CompareResult::try_from(c.result) {
        Ok(compare::CompareResult::Greater) => model::CompareResult::Greater,
        Ok(compare::CompareResult::Less) => model::CompareResult::Less,
        Ok(compare::CompareResult::NotEqual) => model::CompareResult::NotEqual,
        _ => model::CompareResult::Equal,
    };
    model::Compare { result, target, range: model::KeyRange::new(c.key, c.range_end) }
}

pub fn kv(kv: model::KeyValue) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: kv.key,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        value: kv.value,
        lease: kv.lease,
    }
}

/// A watch event as etcd sends it.
pub fn event(e: model::Event, with_prev_kv: bool) -> mvccpb::Event {
    let kind = match e.kind {
        model::EventKind::Put => mvccpb::event::EventType::Put,
        model::EventKind::Delete => mvccpb::event::EventType::Delete,
    };
    mvccpb::Event {
        r#type: kind as i32,
        kv: Some(kv(e.kv)),
        prev_kv: if with_prev_kv { e.prev_kv.map(kv) } else { None },
    }
}

/// Headers of responses nested in a txn carry only the revision, as etcd's apply layer
/// leaves them; the outermost header is filled by the service.
fn bare_header(revision: model::Revision) -> Option<pb::ResponseHeader> {
    Some(pb::ResponseHeader { revision, ..Default::default() })
}

pub fn range_resp(r: model::RangeResponse, header: pb::ResponseHeader) -> pb::RangeResponse {
    pb::RangeResponse { header: Some(header), kvs: r.kvs.into_iter().map(kv).collect(), more: r.more, count: r.count }
}

pub fn put_resp(r: model::PutResponse, header: pb::ResponseHeader) -> pb::PutResponse {
    pb::PutResponse { header: Some(header), prev_kv: r.prev_kv.map(kv) }
}

pub fn delete_resp(r: model::DeleteRangeResponse, header: pb::ResponseHeader) -> pb::DeleteRangeResponse {
    pb::DeleteRangeResponse {
        header: Some(header),
        deleted: r.deleted,
        prev_kvs: r.prev_kvs.into_iter().map(kv).collect(),
    }
}

pub fn txn_resp(r: model::TxnResponse, header: pb::ResponseHeader) -> pb::TxnResponse {
    pb::TxnResponse {
        header: Some(header),
        succeeded: r.succeeded,
        responses: r.responses.into_iter().map(response_op).collect(),
    }
}

fn response_op(op: model::ResponseOp) -> pb::ResponseOp {
    use response_op::Response as R;
    let response = match op {
        model::ResponseOp::Range(r) => {
            let h = bare_header(r.revision);
            R::ResponseRange(pb::RangeResponse { header: h, ..range_resp(r, Default::default()) })
        }
        model::ResponseOp::Put(r) => {
            let h = bare_header(r.revision);
            R::ResponsePut(pb::PutResponse { header: h, ..put_resp(r, Default::default()) })
        }
        model::ResponseOp::DeleteRange(r) => {
            let h = bare_header(r.revision);
            R::ResponseDeleteRange(pb::DeleteRangeResponse { header: h, ..delete_resp(r, Default::default()) })
        }
        // etcd sets no revision on a nested txn's header.
        model::ResponseOp::Txn(t) => R::ResponseTxn(txn_resp(t, Default::default())),
    };
    pb::ResponseOp { response: Some(response) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_operands_and_defaults() {
        let c = pb::Compare {
            result: compare::CompareResult::Greater as i32,
            target: compare::CompareTarget::Mod as i32,
            key: b"k".to_vec(),
            range_end: vec![],
            target_union: Some(compare::TargetUnion::ModRevision(7)),
        };
        let m = compare_req(c);
        assert_eq!(m.target, model::CompareTarget::Mod(7));
        assert_eq!(m.result, model::CompareResult::Greater);
        let c = pb::Compare { target: compare::CompareTarget::Value as i32, key: b"k".to_vec(), ..Default::default() };
        assert_eq!(compare_req(c).target, model::CompareTarget::Value(vec![]));
    }

    #[test]
    fn nested_headers_are_bare() {
        let inner = model::TxnResponse {
            revision: 4,
            succeeded: true,
            responses: vec![model::ResponseOp::Put(model::PutResponse { revision: 4, prev_kv: None })],
        };
        let outer = model::TxnResponse { revision: 4, succeeded: true, responses: vec![model::ResponseOp::Txn(inner)] };
        let hdr = pb::ResponseHeader { cluster_id: 1, member_id: 2, revision: 4, raft_term: 3 };
        let resp = txn_resp(outer, hdr);
        let Some(response_op::Response::ResponseTxn(t)) = &resp.responses[0].response else { panic!() };
        assert_eq!(t.header, Some(pb::ResponseHeader::default()));
        let Some(response_op::Response::ResponsePut(p)) = &t.responses[0].response else { panic!() };
        assert_eq!(p.header, Some(pb::ResponseHeader { revision: 4, ..Default::default() }));
    }
}
