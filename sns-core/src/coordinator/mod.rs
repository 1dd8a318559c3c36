//! The coordinator: routes clients to their cluster's master, registers servers and
//! synchronizers through heartbeats, and detects dead nodes.
//!
//! [`RoutingTable`] is the pure core (no I/O, explicit time); [`Coordinator`] wraps it in a lock
//! and serves it over gRPC (`csce438.CoordService`, its `csce662` alias, and `sns.v1.Admin`).
//! Heartbeats, registrations and admin calls require the cluster token when one is set.

#[cfg(feature = "etcd")]
mod etcd;
mod group;
mod store;
mod table;

use std::sync::{Arc, Mutex, MutexGuard};

#[cfg(feature = "etcd")]
pub use etcd::{DEFAULT_LEASE, EtcdOptions, EtcdStore};
pub use group::GroupStatus;
pub use store::{MemoryStore, Revision, RolesRecord, RoutingStore, StoredRoles, Swap, Term};
pub use table::{
    Address, Assignment, Beat, DEFAULT_HEARTBEAT_INTERVAL, FORGET_AFTER_TIMEOUTS, NodeView,
    ReportedLog, RoutingConfig, RoutingTable, SYNCHRONIZERS_PER_CLUSTER, Verdict,
};

use crate::error::Result;
use group::Group;

/// The largest `sns.v1.Admin` status reply a status client should accept: a full table (1,000
/// clusters of 9 servers and 4 synchronizers each, every host name 253 bytes long, the most the
/// binaries allow) encodes to less (checked by a test), above gRPC's default 4 MiB.
pub const MAX_STATUS_REPLY: usize = 16 << 20;

/// The `host:port`s in a coordinator address: one, or the members of a group separated by
/// commas (`host1:port,host2:port`).
pub fn group_addrs(addr: &str) -> Result<Vec<String>> {
    let addrs: Vec<String> = addr
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_string)
        .collect();
    if addrs.is_empty() {
        return Err(crate::error::Error::invalid(format!(
            "coordinator address {addr:?} names no host:port"
        )));
    }
    Ok(addrs)
}

/// Settings of a [`Coordinator`].
///
/// Non-exhaustive, so that fields can be added later: build it from `CoordinatorConfig::default()`
/// and set the fields you need.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct CoordinatorConfig {
    /// Clusters and heartbeat timing.
    pub routing: RoutingConfig,
    /// When set, internal calls must carry this token (metadata `sns-cluster-token`).
    pub cluster_token: Option<String>,
}

/// The coordinator service. Cheap to clone; clones share the table.
///
/// Servers join it by heartbeats (see [`Deployment`](crate::Deployment), or the `sns server`
/// binary); clients ask it where a user's master is. Served alone, it knows no server yet:
///
/// ```
/// use sns_core::{Coordinator, CoordinatorClient, CoordinatorConfig, MemoryNetwork, UserId};
/// use tokio_util::sync::CancellationToken;
///
/// # #[tokio::main]
/// # async fn main() -> sns_core::Result<()> {
/// let mut config = CoordinatorConfig::default();
/// config.routing.clusters = 3;
/// let coordinator = Coordinator::new(config);
/// let network = MemoryNetwork::new();
/// let listener = network.bind("coordinator:0")?;
/// let addr = listener.addr().to_string();
/// let shutdown = CancellationToken::new();
/// let serving = tokio::spawn({
///     let (coordinator, shutdown) = (coordinator.clone(), shutdown.clone());
///     async move { coordinator.serve(listener, shutdown).await }
/// });
///
/// let client = CoordinatorClient::connect(&network.node("client"), &addr).await?;
/// let asked = client.locate(UserId::new(1).unwrap()).await;
/// // Nothing serves user 1's cluster yet: try again later.
/// assert!(asked.is_err_and(|e| e.calls_for_reconnect()));
/// assert!(coordinator.table().nodes(tokio::time::Instant::now()).is_empty());
///
/// shutdown.cancel();
/// serving.await.expect("the serving task")?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Coordinator {
    table: Arc<Mutex<RoutingTable>>,
    token: Option<Arc<str>>,
    group: Arc<Group>,
}

impl Coordinator {
    /// A coordinator alone, with an empty table and its roles in memory: it leads at once.
    pub fn new(config: CoordinatorConfig) -> Self {
        Self {
            table: Arc::new(Mutex::new(RoutingTable::new(
                config.routing,
                tokio::time::Instant::now(),
            ))),
            token: config.cluster_token.map(Arc::from),
            group: Arc::new(Group::alone()),
        }
    }

    /// A coordinator of a group that keeps its clusters' roles in `store` (every coordinator
    /// of the group on the same store; see [`RoutingStore`]). `name` tells it apart in logs
    /// and in the store's leader key. It takes heartbeats and answers clients at once, from the
    /// roles as last read; it changes roles only while it leads. Its work with the store
    /// (following the records, campaigning, renewing) runs until `shutdown`, when it resigns.
    pub fn in_group(
        config: CoordinatorConfig,
        name: impl Into<String>,
        store: Arc<dyn RoutingStore>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Self {
        let interval = config.routing.heartbeat_interval;
        let coordinator = Self {
            table: Arc::new(Mutex::new(RoutingTable::new(
                config.routing,
                tokio::time::Instant::now(),
            ))),
            token: config.cluster_token.map(Arc::from),
            group: Arc::new(Group::new(
                name.into(),
                store,
                config.routing.failure_timeout(),
            )),
        };
        group::spawn(coordinator.clone(), interval, shutdown);
        coordinator
    }

    /// The routing table, locked.
    pub fn table(&self) -> MutexGuard<'_, RoutingTable> {
        // Table updates complete before anything that could panic: a poisoned lock is usable.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks the token presented by an internal call.
    pub fn authorize(&self, presented: Option<&str>) -> Result<()> {
        crate::auth::check_token(self.token.as_deref(), presented)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::ids::{ClusterId, Epoch, ServerId};

    fn beat(port: u16) -> Beat {
        Beat {
            cluster: ClusterId::new(1).expect("cluster"),
            server: ServerId::new(1).expect("server"),
            addr: Address::parse("127.0.0.1", &port.to_string()).expect("address"),
            claims_master: false,
            epoch: Epoch(0),
            log: Default::default(),
            in_sync: Vec::new(),
            failure: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_expire_as_time_passes() {
        let coordinator = Coordinator::new(CoordinatorConfig {
            routing: RoutingConfig {
                clusters: 1,
                heartbeat_interval: Duration::from_secs(5),
                missed_heartbeats: 2,
                ..RoutingConfig::default()
            },
            cluster_token: None,
        });
        let now = tokio::time::Instant::now;
        // A master is named once the cluster's servers had one interval to speak (the
        // election window opens with the cluster's first beat).
        tokio::time::advance(Duration::from_secs(5)).await;
        coordinator
            .table()
            .heartbeat(beat(10000), now())
            .expect("registered");
        assert!(coordinator.table().route(1, now()).is_err(), "window open");
        tokio::time::advance(Duration::from_secs(5)).await;
        coordinator
            .table()
            .heartbeat(beat(10000), now())
            .expect("named master");
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(coordinator.table().route(1, now()).is_ok());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(
            coordinator.table().route(1, now()).is_err(),
            "dead after 2 x 5 s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_server_leaves_the_table_after_ten_failure_timeouts() {
        let coordinator = Coordinator::new(CoordinatorConfig::default());
        let now = tokio::time::Instant::now;
        let timeout = RoutingConfig::default().failure_timeout();
        coordinator
            .table()
            .heartbeat(beat(10000), now())
            .expect("registered");
        let other = Beat {
            server: ServerId::new(2).expect("server"),
            ..beat(10001)
        };
        coordinator
            .table()
            .heartbeat(other.clone(), now())
            .expect("registered");
        // Server 2 beats on; server 1 is silent.
        let mut silent = Duration::ZERO;
        while silent <= timeout * 10 {
            assert_eq!(
                coordinator.table().nodes(now()).len(),
                2,
                "after {silent:?}"
            );
            tokio::time::advance(timeout / 2).await;
            silent += timeout / 2;
            coordinator
                .table()
                .heartbeat(other.clone(), now())
                .expect("beats on");
        }
        let left: Vec<u32> = coordinator
            .table()
            .nodes(now())
            .iter()
            .map(|n| n.id)
            .collect();
        assert_eq!(left, [2]);
    }

    #[test]
    fn the_token_is_enforced_only_when_set() {
        let open = Coordinator::new(CoordinatorConfig::default());
        assert!(open.authorize(None).is_ok());
        let closed = Coordinator::new(CoordinatorConfig {
            cluster_token: Some("s3cret".into()),
            ..CoordinatorConfig::default()
        });
        assert!(closed.authorize(None).is_err());
        assert!(closed.authorize(Some("wrong")).is_err());
        assert!(closed.authorize(Some("s3cret")).is_ok());
    }
}
