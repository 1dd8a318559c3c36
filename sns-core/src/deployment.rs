//! A whole deployment in one process: a coordinator and N clusters of servers, each server on
//! its own listener and storage, joined to the coordinator by heartbeats.
//!
//! `sns up` runs one over TCP on the course's ports with file storage; `TestCluster` (feature
//! `test-util`) runs one on in-memory pipes ([`Transport::Memory`]), with no sockets at all.
//! Servers can be stopped, crashed, restarted, and cut off from the coordinator one by one (a cut is a
//! property of the memory network, so it stalls real connections, as a partition would).
//!
//! On the memory network the coordinator is node [`COORDINATOR_NODE`], server `s` of cluster
//! `c` is node `cluster<c>-server<s>` ([`server_node`]) and cluster `c`'s synchronizer is node
//! `cluster<c>-sync` ([`synchronizer_node`]); addresses are `node:port`.
//!
//! The shape, settings and port layout are in `deployment/config.rs`, the synchronizers in
//! `deployment/buses.rs`, and crashes, failing disks and cuts in `deployment/faults.rs`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::coordinator::{Coordinator, CoordinatorConfig, RoutingConfig};
use crate::error::{Error, Result};
use crate::ids::{ClusterId, ServerId};
use crate::server::{CoordinatorLink, Server, ServerConfig};
use crate::storage::{CrashDisk, MemoryStorage, Storage};
#[cfg(feature = "amqp")]
use crate::sync::CursorStore;
use crate::transport::{MemoryNetwork, Network};

mod buses;
mod config;
mod faults;

use buses::RunningSync;
pub use buses::SynchronizerPlace;
pub use config::{
    Bus, CLIENT_NODE, COORDINATOR_NODE, Data, DeploymentConfig, Ports, Transport, server_node,
    synchronizer_node,
};
use config::{bind, coordinator_port, first_server_port, network_of};
pub use faults::Direction;

/// One server slot of a deployment.
#[derive(Debug)]
struct Slot {
    /// Host part of the address: the advertised host (TCP) or the node name (memory).
    host: String,
    port: u16,
    memory: MemoryStorage,
    disk: CrashDisk,
    running: Option<Running>,
}

#[derive(Debug)]
struct Running {
    server: Server,
    shutdown: CancellationToken,
    serving: JoinHandle<Result<()>>,
}

/// A running deployment.
///
/// Two clusters of one server each, in memory; [`Deployment::servers`] lists where each
/// server listens:
///
/// ```
/// use std::time::Duration;
///
/// use sns_core::{Deployment, DeploymentConfig};
///
/// # #[tokio::main]
/// # async fn main() -> sns_core::Result<()> {
/// let mut config = DeploymentConfig::in_memory();
/// config.clusters = 2;
/// config.servers_per_cluster = 1;
/// let deployment = Deployment::start(config).await?;
/// deployment.wait_for_masters(Duration::from_secs(10)).await?;
/// for server in deployment.servers() {
///     println!("cluster {} server {} at {}", server.cluster, server.server, server.addr);
/// }
/// assert_eq!(deployment.servers().len(), 2);
/// deployment.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Deployment {
    config: DeploymentConfig,
    coordinator: Coordinator,
    coordinator_addr: String,
    /// The network outsiders dial from.
    network: Network,
    coordinator_shutdown: CancellationToken,
    coordinator_task: JoinHandle<Result<()>>,
    slots: BTreeMap<(ClusterId, ServerId), Slot>,
    synchronizers: BTreeMap<ClusterId, RunningSync>,
    /// The port each synchronizer listens on, kept across its restarts ([`Bus::Grpc`]).
    sync_ports: BTreeMap<ClusterId, u16>,
    /// Each cluster's RabbitMQ publisher cursor, when kept in memory.
    #[cfg(feature = "amqp")]
    amqp_cursors: BTreeMap<ClusterId, CursorStore>,
}

/// A row of [`Deployment::servers`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerPlace {
    /// Cluster.
    pub cluster: ClusterId,
    /// Server id.
    pub server: ServerId,
    /// `host:port` clients use.
    pub addr: String,
    /// Data directory, if on disk.
    pub data_dir: Option<PathBuf>,
    /// Whether it is running.
    pub running: bool,
}

impl Deployment {
    /// Starts the coordinator, then every server; returns once all listen (roles are assigned
    /// by the first heartbeats, see [`Deployment::wait_for_masters`]).
    pub async fn start(config: DeploymentConfig) -> Result<Self> {
        if config.clusters == 0 || config.servers_per_cluster == 0 {
            return Err(Error::invalid(
                "a deployment needs at least one cluster and one server",
            ));
        }
        let port = coordinator_port(&config)?;
        let mut deployment = Self::start_coordinator(config, port).await?;
        if let Err(e) = deployment.start_members().await {
            deployment.shutdown().await;
            return Err(e);
        }
        Ok(deployment)
    }

    /// Binds and starts the coordinator on `port`: a deployment with no servers yet.
    async fn start_coordinator(config: DeploymentConfig, port: u16) -> Result<Self> {
        let listener = bind(&config, COORDINATOR_NODE, port).await?;
        let coordinator_addr = match config.transport {
            Transport::Tcp => {
                crate::transport::address(&config.advertise_host, listener.port().unwrap_or(port))
            }
            Transport::Memory(_) => listener.addr().to_string(),
        };
        let coordinator_config = CoordinatorConfig {
            routing: RoutingConfig {
                clusters: config.clusters,
                servers: config.servers_per_cluster,
                heartbeat_interval: config.heartbeat_interval,
                missed_heartbeats: config.missed_heartbeats,
                allow_unclean_promotion: config.allow_unclean_promotion,
            },
            cluster_token: config.cluster_token.clone(),
        };
        let coordinator_shutdown = CancellationToken::new();
        let coordinator = match &config.routing_store {
            None => Coordinator::new(coordinator_config),
            Some(store) => Coordinator::in_group(
                coordinator_config,
                coordinator_addr.clone(),
                std::sync::Arc::clone(store),
                coordinator_shutdown.clone(),
            ),
        };
        let coordinator_task = tokio::spawn({
            let coordinator = coordinator.clone();
            let shutdown = coordinator_shutdown.clone();
            async move { coordinator.serve(listener, shutdown).await }
        });
        let network = network_of(&config, CLIENT_NODE);
        Ok(Self {
            config,
            coordinator,
            coordinator_addr,
            network,
            coordinator_shutdown,
            coordinator_task,
            slots: BTreeMap::new(),
            synchronizers: BTreeMap::new(),
            sync_ports: BTreeMap::new(),
            #[cfg(feature = "amqp")]
            amqp_cursors: BTreeMap::new(),
        })
    }

    /// Starts every server, cluster by cluster, then every synchronizer; stops at the first
    /// that fails (the caller shuts down what started).
    async fn start_members(&mut self) -> Result<()> {
        for c in 1..=self.config.clusters {
            for s in 1..=self.config.servers_per_cluster {
                let (Some(cluster), Some(server)) = (ClusterId::new(c), ServerId::new(s)) else {
                    continue;
                };
                let host = match self.config.transport {
                    Transport::Tcp => self.config.advertise_host.clone(),
                    Transport::Memory(_) => server_node(cluster, server),
                };
                self.slots.insert(
                    (cluster, server),
                    Slot {
                        host,
                        port: first_server_port(self.config.ports, cluster, server),
                        memory: MemoryStorage::new(),
                        disk: CrashDisk::new(),
                        running: None,
                    },
                );
                self.restart(cluster, server).await?;
            }
        }
        for cluster in (1..=self.config.clusters).filter_map(ClusterId::new) {
            self.restart_synchronizer(cluster).await?;
        }
        Ok(())
    }

    /// The coordinator's `host:port`.
    pub fn coordinator_addr(&self) -> &str {
        &self.coordinator_addr
    }

    /// The coordinator itself.
    pub fn coordinator(&self) -> &Coordinator {
        &self.coordinator
    }

    /// The network to reach the deployment from outside (clients, tools): TCP, or the memory
    /// network as node [`CLIENT_NODE`].
    pub fn network(&self) -> &Network {
        &self.network
    }

    /// The memory network the deployment runs on, if it does.
    pub fn memory_network(&self) -> Option<&MemoryNetwork> {
        match &self.config.transport {
            Transport::Tcp => None,
            Transport::Memory(network) => Some(network),
        }
    }

    /// The deployment's settings.
    pub fn config(&self) -> &DeploymentConfig {
        &self.config
    }

    fn data_dir(&self, cluster: ClusterId, server: ServerId) -> Option<PathBuf> {
        match &self.config.data {
            Data::Memory | Data::Simulated => None,
            Data::Dir(root) => Some(root.join(format!("cluster{cluster}/server{server}"))),
        }
    }

    /// Where every server is.
    pub fn servers(&self) -> Vec<ServerPlace> {
        self.slots
            .iter()
            .map(|((cluster, server), slot)| ServerPlace {
                cluster: *cluster,
                server: *server,
                addr: crate::transport::address(&slot.host, slot.port),
                data_dir: self.data_dir(*cluster, *server),
                running: slot.running.is_some(),
            })
            .collect()
    }

    /// The running server in a slot.
    pub fn server(&self, cluster: ClusterId, server: ServerId) -> Option<&Server> {
        self.slots
            .get(&(cluster, server))
            .and_then(|slot| slot.running.as_ref())
            .map(|r| &r.server)
    }

    /// Stops a server gracefully: its tasks end after open connections are closed, its
    /// storage is closed with everything it acknowledged.
    pub async fn stop(&mut self, cluster: ClusterId, server: ServerId) -> Result<()> {
        let slot = self
            .slots
            .get_mut(&(cluster, server))
            .ok_or_else(|| Error::invalid(format!("no server {server} in cluster {cluster}")))?;
        if let Some(running) = slot.running.take() {
            running.shutdown.cancel();
            let _ = running.serving.await;
            running.server.close().await;
        }
        Ok(())
    }

    /// Starts (again) the server of a slot, on its port, with its storage.
    pub async fn restart(&mut self, cluster: ClusterId, server: ServerId) -> Result<()> {
        self.stop(cluster, server).await?;
        let data_dir = self.data_dir(cluster, server);
        let slot = self
            .slots
            .get_mut(&(cluster, server))
            .ok_or_else(|| Error::invalid(format!("no server {server} in cluster {cluster}")))?;
        let storage: Arc<dyn Storage> = match data_dir {
            None if self.config.data == Data::Simulated => Arc::new(slot.disk.open()?),
            None => Arc::new(slot.memory.clone()),
            Some(dir) => Arc::new(crate::node::open_data_dir(&dir, self.config.repair)?),
        };
        let node = server_node(cluster, server);
        let listener = bind(&self.config, &node, slot.port).await?;
        slot.port = listener.port().unwrap_or(slot.port);
        let config = ServerConfig {
            cluster,
            server_id: server,
            clusters: self.config.clusters,
            mirror_timeout: crate::node::mirror_timeout(
                self.config.heartbeat_interval,
                self.config.missed_heartbeats,
            ),
            clock_offset_micros: self
                .config
                .clock_offsets_micros
                .get(cluster.get() as usize - 1)
                .copied()
                .unwrap_or(self.config.server.clock_offset_micros),
            ..self.config.server.clone()
        };
        let mut link =
            CoordinatorLink::new(self.coordinator_addr.clone(), slot.host.clone(), slot.port);
        link.interval = self.config.heartbeat_interval;
        link.missed_heartbeats = self.config.missed_heartbeats;
        link.cluster_token = self.config.cluster_token.clone();
        let network = network_of(&self.config, &node);
        let instance = crate::node::start_server(config, storage, Some((link, network))).await?;
        let shutdown = CancellationToken::new();
        let serving = tokio::spawn({
            let instance = instance.clone();
            let shutdown = shutdown.clone();
            async move { instance.serve(listener, shutdown).await }
        });
        slot.running = Some(Running {
            server: instance,
            shutdown,
            serving,
        });
        Ok(())
    }

    /// Waits until every cluster has a live master (or `timeout` passes).
    pub async fn wait_for_masters(&self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let missing = (1..=self.config.clusters)
                .filter_map(ClusterId::new)
                .find(|c| {
                    let master = self
                        .coordinator
                        .table()
                        .master(*c, tokio::time::Instant::now());
                    // Both sides must agree: the coordinator names a master, and that server
                    // has heard it (its reply arrived).
                    !master.is_ok_and(|(_, s, _)| {
                        self.server(*c, s)
                            .is_some_and(|server| server.role() == crate::ids::Role::Master)
                    })
                });
            match missing {
                None => return Ok(()),
                Some(cluster) if tokio::time::Instant::now() >= deadline => {
                    return Err(Error::Unavailable(format!(
                        "cluster {cluster} has no master after {timeout:?}"
                    )));
                }
                Some(_) => tokio::time::sleep(self.config.heartbeat_interval / 10).await,
            }
        }
    }

    /// Stops every server, then the coordinator, and waits for all their tasks. Cuts this
    /// deployment made are healed first, so connections can close gracefully.
    pub async fn shutdown(mut self) {
        let clusters: Vec<_> = self.synchronizers.keys().copied().collect();
        for cluster in clusters {
            let _ = self.stop_synchronizer(cluster).await;
        }
        let keys: Vec<_> = self.slots.keys().copied().collect();
        if let Some(network) = self.memory_network() {
            for (cluster, server) in &keys {
                network.repair(&server_node(*cluster, *server), COORDINATOR_NODE);
            }
        }
        for (cluster, server) in keys {
            let _ = self.stop(cluster, server).await;
        }
        self.coordinator_shutdown.cancel();
        let _ = (&mut self.coordinator_task).await;
    }
}
