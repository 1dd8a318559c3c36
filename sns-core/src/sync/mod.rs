//! Synchronizers: carry users, follow relations and posts between clusters.
//!
//! Every cluster's master numbers the events it originates (users joining, follows, unfollows,
//! posts) with a gap-free sequence per origin. A [`Synchronizer`] serves one cluster: through a
//! [`SyncTransport`] it carries its cluster's own committed events to the other clusters and
//! applies theirs to its cluster's current master, found through the coordinator (and found
//! again after a failover). The servers' side is `sns.v1.Log`: `OwnEvents` (committed events
//! only, so an event leaves its cluster only once it is durable and mirrored), `Apply` and
//! `HighWater`.
//!
//! Invariants:
//! - **Idempotent by (origin, sequence).** A master drops an event at or below its origin's
//!   high-water mark and refuses a batch that would leave a hole, so redeliveries, replays and
//!   several synchronizers per cluster are harmless.
//! - **Nothing lost.** A consumer resumes from its cluster's committed high-water mark (pull
//!   transports) or acknowledges a message only after the master answered that the events are
//!   committed (RabbitMQ).
//! - **Remote events are ordinary log entries**: mirrored to the slave, committed, fanned out to
//!   the live timelines of local followers, snapshotted.
//! - **Signed between synchronizers.** With a cluster token, every batch one synchronizer hands
//!   another (over RabbitMQ or `Sync.Subscribe`) carries a MAC keyed from the token, checked
//!   before the batch is decoded ([`seal`]); refusals are logged and counted
//!   ([`SyncRefusals`]).
//!
//! Transports: [`LocalBus`] (in-process), [`GrpcBus`] (synchronizers subscribe to each
//! other) and, with the `amqp` feature, `AmqpBus` (RabbitMQ, in `sync::amqp`).

#[cfg(feature = "amqp")]
pub mod amqp;
mod grpc;
mod link;
mod local;
mod progress;
mod pull;
mod refusals;
pub mod seal;
mod service;

use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

pub use crate::grpc::events::{decode_batch, encode_batch};
pub use crate::grpc::raw::EncodedBatch;
#[cfg(feature = "amqp")]
pub use amqp::{AmqpBus, AmqpOptions, AmqpStats, CursorStore, QueueType};
pub use grpc::{GrpcBus, GrpcBusOptions};
pub use link::{ClusterLink, EventFeed};
pub use local::LocalBus;
pub use progress::{OriginStats, PROBE_INTERVAL};
pub use pull::{Source, Subscription, pull};
pub use refusals::{RefusalCounts, SyncRefusals};
pub use seal::{Refusal, SyncKey};

use crate::error::{Error, Result};
use crate::ids::ClusterId;
use crate::transport::Network;

/// How a synchronizer reaches the other clusters.
#[async_trait]
pub trait SyncTransport: Send + Sync + 'static {
    /// A short name for logs and status (`local`, `grpc`, `amqp`).
    fn name(&self) -> &'static str;

    /// Whether batches leave the process (and so are signed, when there is a key). Only the
    /// in-process transport says no.
    fn carries_batches(&self) -> bool {
        true
    }

    /// Carries `link`'s cluster's own events to the other clusters and their events into
    /// `link`'s cluster until `link.shutdown()` is cancelled, riding out failovers, peer
    /// restarts and broker restarts. Returns early only with an error it cannot ride out
    /// (such as a configuration the broker refuses).
    async fn run(&self, link: ClusterLink) -> Result<()>;

    /// The RabbitMQ transport's counters ([`AmqpBus::stats`]); `None` for any other transport.
    #[cfg(feature = "amqp")]
    fn amqp_stats(&self) -> Option<AmqpStats> {
        None
    }
}

/// Settings of a [`Synchronizer`].
///
/// Non-exhaustive, so that fields can be added later: build it with [`SynchronizerConfig::new`] and
/// set the fields you need.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SynchronizerConfig {
    /// The cluster it serves.
    pub cluster: ClusterId,
    /// Number of clusters in the deployment (must match the coordinator's).
    pub clusters: u32,
    /// The coordinator's `host:port`.
    pub coordinator: String,
    /// The cluster token for internal calls, if the deployment uses one.
    pub cluster_token: Option<String>,
}

impl SynchronizerConfig {
    /// The settings of the synchronizer of `cluster` in a deployment of `clusters` clusters whose
    /// coordinator is at `coordinator` (`host:port`), without a cluster token.
    pub fn new(cluster: ClusterId, clusters: u32, coordinator: impl Into<String>) -> Self {
        Self {
            cluster,
            clusters,
            coordinator: coordinator.into(),
            cluster_token: None,
        }
    }
}

/// The cluster a synchronizer with id `id` serves in a deployment of `clusters` clusters:
/// `((id - 1) % clusters) + 1`, as users map to clusters.
pub fn cluster_of_synchronizer(id: u32, clusters: u32) -> Result<ClusterId> {
    if id == 0 {
        return Err(Error::invalid("synchronizer ids start at 1"));
    }
    if clusters == 0 {
        return Err(Error::invalid("a deployment has at least one cluster"));
    }
    ClusterId::new((id - 1) % clusters + 1)
        .ok_or_else(|| Error::invalid(format!("synchronizer id {id} maps to no cluster")))
}

/// A synchronizer for one cluster (see the module documentation). Cheap to clone; all clones
/// are the same synchronizer.
///
/// A [`Deployment`](crate::Deployment) starts one per cluster by itself (its `bus`). Here the
/// deployment starts none ([`Bus::None`](crate::Bus::None)) and the program runs them, in
/// process ([`LocalBus`]); user 2 (cluster 2) then becomes known on cluster 1:
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// use sns_core::testing::eventually;
/// use sns_core::{
///     Bus, ClusterId, CoordinatorClient, Deployment, DeploymentConfig, LocalBus, Synchronizer,
///     SynchronizerConfig, UserId,
/// };
///
/// # #[tokio::main]
/// # async fn main() -> sns_core::Result<()> {
/// let mut config = DeploymentConfig::in_memory();
/// config.clusters = 2;
/// config.servers_per_cluster = 1;
/// config.bus = Bus::None;
/// let deployment = Deployment::start(config).await?;
/// deployment.wait_for_masters(Duration::from_secs(10)).await?;
/// let mut running = Vec::new();
/// for cluster in [1, 2] {
///     let cluster = ClusterId::new(cluster).unwrap();
///     let config = SynchronizerConfig::new(cluster, 2, deployment.coordinator_addr());
///     let synchronizer = Synchronizer::new(&config, deployment.network(), Arc::new(LocalBus))?;
///     let task = tokio::spawn({
///         let synchronizer = synchronizer.clone();
///         async move { synchronizer.run().await }
///     });
///     running.push((synchronizer, task));
/// }
///
/// let coordinator = CoordinatorClient::new(deployment.network(), deployment.coordinator_addr())?;
/// let (one, two) = (UserId::new(1).unwrap(), UserId::new(2).unwrap());
/// let alice = coordinator.login(one).await?;
/// let _bob = coordinator.login(two).await?;
/// let known = eventually(Duration::from_secs(10), || async {
///     alice.list().await.is_ok_and(|listing| listing.all_users.contains(&two))
/// })
/// .await;
/// assert!(known, "user 2 reached cluster 1");
///
/// for (synchronizer, task) in running {
///     synchronizer.stop();
///     task.await.expect("the synchronizer task")?;
/// }
/// deployment.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Synchronizer {
    link: ClusterLink,
    transport: Arc<dyn SyncTransport>,
}

impl std::fmt::Debug for Synchronizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Synchronizer")
            .field("cluster", &self.link.cluster())
            .field("transport", &self.transport.name())
            .finish()
    }
}

impl Synchronizer {
    /// A synchronizer for `config.cluster`, reaching the coordinator and servers over
    /// `network` and the other clusters through `transport`.
    pub fn new(
        config: &SynchronizerConfig,
        network: &Network,
        transport: Arc<dyn SyncTransport>,
    ) -> Result<Self> {
        let link = ClusterLink::new(
            config.cluster,
            config.clusters,
            network,
            &config.coordinator,
            config.cluster_token.as_deref(),
            CancellationToken::new(),
        )?;
        Ok(Self { link, transport })
    }

    /// The cluster it serves.
    pub fn cluster(&self) -> ClusterId {
        self.link.cluster()
    }

    /// Its handle on the clusters.
    pub fn link(&self) -> &ClusterLink {
        &self.link
    }

    /// What it refused to apply (forged, altered or invalid batches), counted since it
    /// started.
    pub fn refusals(&self) -> &SyncRefusals {
        self.link.refusals()
    }

    /// Its RabbitMQ transport's counters; `None` when it syncs by another transport.
    #[cfg(feature = "amqp")]
    pub fn amqp_stats(&self) -> Option<AmqpStats> {
        self.transport.amqp_stats()
    }

    /// Runs until [`stop`](Self::stop) is called (or the transport fails for good).
    pub async fn run(&self) -> Result<()> {
        tracing::info!(
            cluster = %self.link.cluster(),
            transport = self.transport.name(),
            signed = self.link.sync_key().is_some(),
            "synchronizer running"
        );
        if self.link.sync_key().is_none() && self.transport.carries_batches() {
            tracing::warn!(
                cluster = %self.link.cluster(),
                "sync batches are not signed (no cluster token); anyone who can publish to \
                 the broker, or serve as a synchronizer, can forge events"
            );
        }
        let result = self.transport.run(self.link.clone()).await;
        if let Err(e) = &result {
            tracing::error!(cluster = %self.link.cluster(), "synchronizer failed: {e}");
        }
        result
    }

    /// Stops it: [`run`](Self::run) returns soon after.
    pub fn stop(&self) {
        self.link.shutdown().cancel();
    }
}
