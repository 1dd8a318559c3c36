//! etcd in tests (features `test-util` and `etcd`): run against the etcd named by
//! `SNS_ETCD_URL`, or skip.
//!
//! Without `SNS_ETCD_URL` a test prints that it was skipped and passes; with
//! `SNS_REQUIRE_ETCD=1` a missing or unreachable etcd fails it instead. Each test gets a key
//! prefix of its own, so tests running at once never see each other's keys.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::coordinator::{EtcdOptions, EtcdStore, RoutingStore};

/// The variable naming the etcd members (comma-separated URLs).
pub const ETCD_URL_VAR: &str = "SNS_ETCD_URL";
/// The variable that turns a missing etcd into a failure (`1`).
pub const REQUIRE_ETCD_VAR: &str = "SNS_REQUIRE_ETCD";

/// Options on the etcd of `SNS_ETCD_URL` with a key prefix no other test uses, for a
/// deployment of `clusters` × `servers`; `None` after printing that `test` was skipped, when
/// the variable is not set or etcd does not answer.
///
/// # Panics
///
/// When `SNS_REQUIRE_ETCD=1` and there is no reachable etcd.
pub async fn etcd_options(test: &str, clusters: u32, servers: u32) -> Option<EtcdOptions> {
    let required = std::env::var(REQUIRE_ETCD_VAR).is_ok_and(|v| v == "1");
    let urls = match std::env::var(ETCD_URL_VAR) {
        Ok(urls) if !urls.is_empty() => urls,
        _ => {
            assert!(
                !required,
                "{test}: {REQUIRE_ETCD_VAR}=1 but {ETCD_URL_VAR} is not set"
            );
            eprintln!("{test}: skipped: {ETCD_URL_VAR} is not set (no etcd)");
            return None;
        }
    };
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let endpoints = urls.split(',').map(str::to_string).collect();
    let mut options = EtcdOptions::new(endpoints, clusters, servers);
    options.prefix = format!(
        "/sns-test/{}-{}-{}",
        test,
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let probe = match EtcdStore::connect(options.clone()).await {
        Ok(store) => store.load().await.map(|_| ()),
        Err(e) => Err(e),
    };
    match probe {
        Ok(()) => Some(options),
        Err(e) => {
            assert!(!required, "{test}: etcd is unreachable: {e}");
            eprintln!("{test}: skipped: etcd is unreachable: {e}");
            None
        }
    }
}
