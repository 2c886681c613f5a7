//! The one place that turns errors into gRPC statuses with etcd's exact codes and messages.
//!
//! Clients match on these strings (etcd's `rpctypes` and clientv3 compare messages), so every
//! message is etcd's to the letter; each row has a test below.

use cairn_backend::BackendError;
use tonic::{Code, Status};

/// Every error the API answers with. Validation errors are raised by the frontend itself;
/// `Backend` wraps what the storage layer returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("etcdserver: key is not provided")]
    KeyNotProvided,
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: value is provided")]
    ValueProvided,
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: invalid sort option")]
    InvalidSortOption,
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    #[error("etcdserver: too many requests")]
    TooManyRequests,
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRevision,
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    #[error("etcdserver: watch canceled")]
    WatchCanceled,
    #[error("etcdserver: member not found")]
    MemberNotFound,
    #[error("etcdserver: member ID already exist")]
    MemberExist,
    #[error("etcdserver: Peer URLs already exists")]
    PeerUrlExist,
    #[error("etcdserver: re-configuration failed due to not enough started members")]
    MemberNotEnoughStarted,
    #[error("etcdserver: given member URLs are invalid")]
    MemberBadUrls,
    #[error("etcdserver: can only promote a learner member")]
    MemberNotLearner,
    #[error("etcdserver: can only promote a learner member which is in sync with leader")]
    LearnerNotReady,
    #[error("etcdserver: too many learner members in cluster")]
    TooManyLearners,
    #[error("etcdserver: unhealthy cluster")]
    Unhealthy,
    #[error("etcdserver: no leader")]
    NoLeader,
    #[error("etcdserver: not leader")]
    NotLeader,
    #[error("etcdserver: bad leader transferee")]
    BadLeaderTransferee,
    #[error("etcdserver: request timed out, leader transfer took too long")]
    TimeoutLeaderTransfer,
    #[error("etcdserver: leader changed")]
    LeaderChanged,
    #[error("etcdserver: request timed out")]
    Timeout,
    #[error("etcdserver: server stopped")]
    Stopped,
    #[error("etcdserver: not capable")]
    NotCapable,
    #[error("etcdserver: root user does not exist")]
    RootUserNotExist,
    #[error("etcdserver: root user does not have root role")]
    RootRoleNotExist,
    #[error("etcdserver: user name already exists")]
    UserAlreadyExist,
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    #[error("etcdserver: user name not found")]
    UserNotFound,
    #[error("etcdserver: role name already exists")]
    RoleAlreadyExist,
    #[error("etcdserver: role name not found")]
    RoleNotFound,
    #[error("etcdserver: role name is empty")]
    RoleEmpty,
    #[error("etcdserver: authentication failed, invalid user ID or password")]
    AuthFailed,
    #[error("etcdserver: permission not given")]
    PermissionNotGiven,
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    #[error("etcdserver: role is not granted to the user")]
    RoleNotGranted,
    #[error("etcdserver: permission is not granted to the role")]
    PermissionNotGranted,
    #[error("etcdserver: authentication is not enabled")]
    AuthNotEnabled,
    #[error("etcdserver: invalid auth token")]
    InvalidAuthToken,
    #[error("etcdserver: invalid auth management")]
    InvalidAuthMgmt,
    #[error("etcdserver: revision of auth store is old")]
    AuthOldRevision,
    /// etcd has no gRPC status for this one and answers with the auth store's own text.
    #[error("auth: authentication failed, password was given for no password user")]
    NoPasswordUser,
    /// An RPC Cairn does not serve yet; the text names it.
    #[error("{0}")]
    Unimplemented(String),
    /// A failure with no etcd equivalent; etcd answers such errors with code Unknown and the
    /// error's own text.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The gRPC code etcd uses for this error.
    pub fn code(&self) -> Code {
        use ApiError::*;
        match self {
            KeyNotProvided | KeyNotFound | ValueProvided | LeaseProvided | TooManyOps | DuplicateKey
            | InvalidSortOption | RequestTooLarge | UserEmpty | RoleEmpty | AuthFailed | PermissionNotGiven
            | InvalidAuthMgmt | AuthOldRevision => Code::InvalidArgument,
            RootUserNotExist | RootRoleNotExist | UserAlreadyExist | UserNotFound | RoleAlreadyExist
            | RoleNotFound | RoleNotGranted | PermissionNotGranted | AuthNotEnabled => Code::FailedPrecondition,
            PermissionDenied => Code::PermissionDenied,
            InvalidAuthToken => Code::Unauthenticated,
            NoPasswordUser => Code::Unknown,
            Compacted | FutureRevision | LeaseTtlTooLarge => Code::OutOfRange,
            NoSpace | TooManyRequests => Code::ResourceExhausted,
            LeaseNotFound | MemberNotFound => Code::NotFound,
            MemberExist | PeerUrlExist | MemberNotEnoughStarted | MemberNotLearner | LearnerNotReady
            | TooManyLearners => Code::FailedPrecondition,
            MemberBadUrls => Code::InvalidArgument,
            Unhealthy => Code::Unavailable,
            LeaseExists | NotLeader | BadLeaderTransferee => Code::FailedPrecondition,
            TimeoutLeaderTransfer => Code::Unavailable,
            WatchCanceled => Code::Cancelled,
            NoLeader | LeaderChanged | Timeout | Stopped | NotCapable => Code::Unavailable,
            Unimplemented(_) => Code::Unimplemented,
            Internal(_) => Code::Unknown,
        }
    }

    pub fn unimplemented(rpc: &str) -> Self {
        Self::Unimplemented(format!("cairn: {rpc} is not implemented yet"))
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Compacted { .. } => ApiError::Compacted,
            BackendError::FutureRevision => ApiError::FutureRevision,
            BackendError::LeaseNotFound => ApiError::LeaseNotFound,
            BackendError::LeaseExists => ApiError::LeaseExists,
            BackendError::KeyNotFound => ApiError::KeyNotFound,
            BackendError::NoSpace => ApiError::NoSpace,
            BackendError::Timeout => ApiError::Timeout,
            BackendError::Stopped => ApiError::Stopped,
            BackendError::Unavailable(why) if why.contains("leader changed") => ApiError::LeaderChanged,
            BackendError::Unavailable(why) if why == "learner not ready" => ApiError::LearnerNotReady,
            BackendError::Unavailable(why) if why == "bad leader transferee" => ApiError::BadLeaderTransferee,
            BackendError::Unavailable(why) if why == "leader transfer took too long" => ApiError::TimeoutLeaderTransfer,
            BackendError::Unavailable(_) => ApiError::NoLeader,
            BackendError::Internal(why) => ApiError::Internal(why),
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

/// Shorthand for handlers: a backend error as etcd's status.
pub fn backend_status(e: BackendError) -> Status {
    ApiError::from(e).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(e: impl Into<ApiError>, code: Code, msg: &str) {
        let status: Status = e.into().into();
        assert_eq!(status.code(), code, "code for {msg}");
        assert_eq!(status.message(), msg);
    }

    #[test]
    fn backend_compacted() {
        let e = BackendError::Compacted { compact_revision: 5 };
        check(e, Code::OutOfRange, "etcdserver: mvcc: required revision has been compacted");
    }

    #[test]
    fn backend_future_revision() {
        let e = BackendError::FutureRevision;
        check(e, Code::OutOfRange, "etcdserver: mvcc: required revision is a future revision");
    }

    #[test]
    fn backend_lease_not_found() {
        check(BackendError::LeaseNotFound, Code::NotFound, "etcdserver: requested lease not found");
    }

    #[test]
    fn backend_lease_exists() {
        check(BackendError::LeaseExists, Code::FailedPrecondition, "etcdserver: lease already exists");
    }

    #[test]
    fn backend_key_not_found() {
        check(BackendError::KeyNotFound, Code::InvalidArgument, "etcdserver: key not found");
    }

    #[test]
    fn backend_no_space() {
        check(BackendError::NoSpace, Code::ResourceExhausted, "etcdserver: mvcc: database space exceeded");
    }

    #[test]
    fn backend_timeout() {
        check(BackendError::Timeout, Code::Unavailable, "etcdserver: request timed out");
    }

    #[test]
    fn backend_stopped() {
        check(BackendError::Stopped, Code::Unavailable, "etcdserver: server stopped");
    }

    #[test]
    fn backend_unavailable_no_leader() {
        let e = BackendError::Unavailable("election in progress".into());
        check(e, Code::Unavailable, "etcdserver: no leader");
    }

    #[test]
    fn backend_unavailable_leader_changed() {
        let e = BackendError::Unavailable("leader changed during apply".into());
        check(e, Code::Unavailable, "etcdserver: leader changed");
    }

    #[test]
    fn backend_internal() {
        check(BackendError::Internal("disk on fire".into()), Code::Unknown, "disk on fire");
    }

    #[test]
    fn validation_rows() {
        use ApiError::*;
        let rows = [
            (KeyNotProvided, Code::InvalidArgument, "etcdserver: key is not provided"),
            (ValueProvided, Code::InvalidArgument, "etcdserver: value is provided"),
            (LeaseProvided, Code::InvalidArgument, "etcdserver: lease is provided"),
            (TooManyOps, Code::InvalidArgument, "etcdserver: too many operations in txn request"),
            (DuplicateKey, Code::InvalidArgument, "etcdserver: duplicate key given in txn request"),
            (InvalidSortOption, Code::InvalidArgument, "etcdserver: invalid sort option"),
            (RequestTooLarge, Code::InvalidArgument, "etcdserver: request is too large"),
            (TooManyRequests, Code::ResourceExhausted, "etcdserver: too many requests"),
            (LeaseTtlTooLarge, Code::OutOfRange, "etcdserver: too large lease TTL"),
            (WatchCanceled, Code::Cancelled, "etcdserver: watch canceled"),
            (MemberNotFound, Code::NotFound, "etcdserver: member not found"),
            (NotLeader, Code::FailedPrecondition, "etcdserver: not leader"),
            (BadLeaderTransferee, Code::FailedPrecondition, "etcdserver: bad leader transferee"),
            (TimeoutLeaderTransfer, Code::Unavailable, "etcdserver: request timed out, leader transfer took too long"),
            (NotCapable, Code::Unavailable, "etcdserver: not capable"),
        ];
        for (e, code, msg) in rows {
            check(e, code, msg);
        }
    }

    #[test]
    fn auth_rows() {
        use ApiError::*;
        let rows = [
            (RootUserNotExist, Code::FailedPrecondition, "etcdserver: root user does not exist"),
            (RootRoleNotExist, Code::FailedPrecondition, "etcdserver: root user does not have root role"),
            (UserAlreadyExist, Code::FailedPrecondition, "etcdserver: user name already exists"),
            (UserEmpty, Code::InvalidArgument, "etcdserver: user name is empty"),
            (UserNotFound, Code::FailedPrecondition, "etcdserver: user name not found"),
            (RoleAlreadyExist, Code::FailedPrecondition, "etcdserver: role name already exists"),
            (RoleNotFound, Code::FailedPrecondition, "etcdserver: role name not found"),
            (RoleEmpty, Code::InvalidArgument, "etcdserver: role name is empty"),
            (AuthFailed, Code::InvalidArgument, "etcdserver: authentication failed, invalid user ID or password"),
            (PermissionNotGiven, Code::InvalidArgument, "etcdserver: permission not given"),
            (PermissionDenied, Code::PermissionDenied, "etcdserver: permission denied"),
            (RoleNotGranted, Code::FailedPrecondition, "etcdserver: role is not granted to the user"),
            (PermissionNotGranted, Code::FailedPrecondition, "etcdserver: permission is not granted to the role"),
            (AuthNotEnabled, Code::FailedPrecondition, "etcdserver: authentication is not enabled"),
            (InvalidAuthToken, Code::Unauthenticated, "etcdserver: invalid auth token"),
            (InvalidAuthMgmt, Code::InvalidArgument, "etcdserver: invalid auth management"),
            (AuthOldRevision, Code::InvalidArgument, "etcdserver: revision of auth store is old"),
            (NoPasswordUser, Code::Unknown, "auth: authentication failed, password was given for no password user"),
        ];
        for (e, code, msg) in rows {
            check(e, code, msg);
        }
    }

    #[test]
    fn membership_rows() {
        use ApiError::*;
        let rows = [
            (MemberExist, Code::FailedPrecondition, "etcdserver: member ID already exist"),
            (PeerUrlExist, Code::FailedPrecondition, "etcdserver: Peer URLs already exists"),
            (
                MemberNotEnoughStarted,
                Code::FailedPrecondition,
                "etcdserver: re-configuration failed due to not enough started members",
            ),
            (MemberBadUrls, Code::InvalidArgument, "etcdserver: given member URLs are invalid"),
            (MemberNotLearner, Code::FailedPrecondition, "etcdserver: can only promote a learner member"),
            (
                LearnerNotReady,
                Code::FailedPrecondition,
                "etcdserver: can only promote a learner member which is in sync with leader",
            ),
            (TooManyLearners, Code::FailedPrecondition, "etcdserver: too many learner members in cluster"),
            (Unhealthy, Code::Unavailable, "etcdserver: unhealthy cluster"),
        ];
        for (e, code, msg) in rows {
            check(e, code, msg);
        }
    }

    #[test]
    fn unimplemented_names_the_rpc() {
        let s: Status = ApiError::unimplemented("Snapshot").into();
        assert_eq!(s.code(), Code::Unimplemented);
        assert!(s.message().contains("Snapshot"));
    }
}
