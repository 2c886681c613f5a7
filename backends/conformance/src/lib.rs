//! The conformance suite every Cairn backend runs.
//!
//! A backend's test file implements [`Harness`] and calls [`backend_suite!`], which expands to
//! one `#[test]` per case (each on its own multi-thread tokio runtime), named
//! `<group>::<case>`, e.g. `txn::nested_compare_sees_state_before_txn`:
//!
//! ```ignore
//! use std::sync::Arc;
//! use cairn_backend_tests::{backend_suite, Harness};
//!
//! struct Mem;
//!
//! #[async_trait::async_trait]
//! impl Harness for Mem {
//!     type B = cairn_memory::MemoryBackend;
//!     async fn open(&self) -> Arc<Self::B> { cairn_memory::MemoryBackend::new() }
//! }
//!
//! backend_suite!(Mem, no_persistence);
//! ```
//!
//! A durable backend keeps its storage in the harness (a temp dir made by the harness
//! constructor, which runs once per case), implements [`Harness::reopen`] and calls
//! `backend_suite!(ctor)` without `no_persistence`, which adds the `persistence` cases.
//!
//! Cases are plain `async fn(H)` in [`cases`], grouped by topic; the expected behaviour is
//! etcd's (3.4.23 was checked side by side where noted), and each assertion says which rule it
//! checks so that a failure names the broken rule.

pub mod cases;
pub mod history;
pub mod util;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cairn_backend::Backend;

/// How a case gets its backend.
#[async_trait]
pub trait Harness: Send + Sync + 'static {
    type B: Backend;

    /// A fresh, empty store (at revision 1, no leases).
    async fn open(&self) -> Arc<Self::B>;

    /// Closes `b` (the case holds no other reference to it; wait for its tasks to stop) and
    /// opens the same storage again. `None` when the backend has no durability; such a backend
    /// runs `backend_suite!(ctor, no_persistence)` so that the persistence cases are not
    /// generated at all, and this default is never called.
    async fn reopen(&self, b: Arc<Self::B>) -> Option<Arc<Self::B>> {
        drop(b);
        None
    }
}

/// The longest a single case may run before it fails as hung.
pub const CASE_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs one case on a fresh multi-thread runtime: builds the harness inside the runtime, runs
/// the case under [`CASE_TIMEOUT`], then shuts the runtime down.
pub fn run<H, F, Fut>(harness: impl FnOnce() -> H, case: F)
where
    H: Harness,
    F: FnOnce(H) -> Fut,
    Fut: Future<Output = ()>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("build a tokio runtime");
    rt.block_on(async {
        let h = harness();
        if tokio::time::timeout(CASE_TIMEOUT, case(h)).await.is_err() {
            panic!("case did not finish within {CASE_TIMEOUT:?}");
        }
    });
    rt.shutdown_timeout(Duration::from_secs(5));
}

/// Expands to the whole suite, one `#[test]` per case, for the harness built by `$harness`
/// (an expression evaluated once per case, inside that case's runtime).
///
/// `backend_suite!(ctor)` generates every case, persistence included;
/// `backend_suite!(ctor, no_persistence)` leaves out the `persistence` group, for backends
/// without durability. Use it once per test file, at module level.
#[macro_export]
macro_rules! backend_suite {
    ($harness:expr $(,)?) => {
        $crate::backend_suite!($harness, no_persistence);
        $crate::__backend_cases!(persistence:
            data_survives_reopen,
            compaction_survives_reopen,
            leases_survive_reopen,
            history_survives_reopen,
            docs_survive_reopen,
        );
    };
    ($harness:expr, no_persistence $(,)?) => {
        fn __cairn_harness() -> impl $crate::Harness {
            $harness
        }
        $crate::__backend_cases!(range:
            single_key,
            interval,
            inverted_interval_is_empty,
            prefix,
            from_key,
            all_keys,
            at_revision,
            limit_and_more,
            count_only,
            keys_only,
            sort_orders,
            sort_then_limit,
            revision_filters,
            future_revision,
        );
        $crate::__backend_cases!(txn:
            compare_every_target_and_result,
            compare_missing_key,
            compare_range,
            success_and_failure_branches,
            nested_txn,
            nested_compare_sees_state_before_txn,
            reads_see_own_writes,
            read_only_txn_keeps_revision,
            delete_missing_keeps_revision,
            puts_share_revision,
            same_value_put_bumps_version,
            delete_then_recreate_resets,
            put_without_lease_detaches,
            ignore_value_and_lease,
            ignore_on_missing_key_fails,
            unknown_lease_fails_without_effect,
            prev_kv,
            delete_range,
            range_at_past_revision,
            range_at_future_revision_fails,
        );
        $crate::__backend_cases!(revisions:
            empty_store_at_revision_1,
            first_write_is_revision_2,
            versions_and_revisions_per_key,
            concurrent_writers_gap_free,
            concurrent_compare_and_swap,
        );
        $crate::__backend_cases!(compaction:
            reads_below_compaction_fail,
            read_at_compaction_point,
            compact_twice_fails,
            compact_future_fails,
            compact_keeps_revision,
            compact_keeps_latest_versions,
            txn_range_below_compaction_fails,
            hash_kv,
            status_and_defragment,
        );
        $crate::__backend_cases!(watch:
            history_every_event_once,
            from_now,
            txn_events_in_order,
            delete_event_shape,
            racing_writers_lose_nothing,
            below_compaction_fails,
            at_compaction_point,
            progress_after_catch_up,
            progress_when_idle,
            from_future_revision,
            lease_revoke_events,
            slow_reader_loses_nothing,
        );
        $crate::__backend_cases!(docs:
            absent_then_created,
            version_conflict_changes_nothing,
            concurrent_writers_one_wins,
            outside_the_key_space,
        );
        $crate::__backend_cases!(lease:
            grant_ids,
            grant_existing_fails,
            revoke_deletes_keys,
            revoke_without_keys,
            missing_lease_fails,
            keep_alive,
            keep_alive_extends,
            time_to_live,
            leases_list,
            expiry_deletes_keys,
            put_with_revoked_lease_fails,
            reattach_moves_key,
        );
    };
}

/// One module of `#[test]`s for one case group; see [`backend_suite!`].
#[doc(hidden)]
#[macro_export]
macro_rules! __backend_cases {
    ($group:ident: $($case:ident),* $(,)?) => {
        mod $group {
            $(
                #[test]
                fn $case() {
                    $crate::run(super::__cairn_harness, $crate::cases::$group::$case);
                }
            )*
        }
    };
}
