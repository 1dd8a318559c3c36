//! What a deployment is made of and where its parts listen: its shape and settings
//! ([`DeploymentConfig`]), the node names on the memory network, and the ports.
//!
//! The course's port layout puts server `s` of cluster `c` on `c * 10000 + s - 1` and, with
//! [`Bus::Grpc`], cluster `c`'s synchronizer on `9000 + c`; [`coordinator_port`] refuses a shape
//! that does not fit it before anything is bound, so no port computed here overflows.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::ids::{ClusterId, ServerId};
use crate::server::ServerConfig;
#[cfg(feature = "amqp")]
use crate::sync::AmqpOptions;
use crate::transport::{Listener, MemoryNetwork, Network, tcp};

/// The coordinator's node name on the memory network.
pub const COORDINATOR_NODE: &str = "coordinator";

/// The node name of server `server` of cluster `cluster` on the memory network.
pub fn server_node(cluster: ClusterId, server: ServerId) -> String {
    format!("cluster{cluster}-server{server}")
}

/// The node name of cluster `cluster`'s synchronizer on the memory network.
pub fn synchronizer_node(cluster: ClusterId) -> String {
    format!("cluster{cluster}-sync")
}

/// The node name callers outside the deployment (clients, tools) dial from on the memory
/// network.
pub const CLIENT_NODE: &str = "client";

/// How a deployment's synchronizers carry events between clusters.
///
/// Non-exhaustive because a variant comes with a feature (`Bus::Amqp`, feature `amqp`): code that
/// matches on it keeps compiling whichever features other crates turn on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Bus {
    /// No synchronizers: every cluster is an island.
    None,
    /// In-process ([`LocalBus`](crate::sync::LocalBus)): each synchronizer reads the other
    /// clusters' masters.
    #[default]
    Local,
    /// gRPC between synchronizers ([`GrpcBus`](crate::sync::GrpcBus)): cluster `c`'s
    /// synchronizer (id `c`) serves `sns.v1.Sync` on its own listener (port `9000 + c` with
    /// [`Ports::Course`]), registers with the coordinator and subscribes to the other
    /// clusters' synchronizers.
    Grpc,
    /// Through a RabbitMQ broker ([`AmqpBus`](crate::sync::AmqpBus)). Each cluster's
    /// publisher cursor is kept in `cluster<c>/synchronizer/amqp-<prefix>.cursor` under a
    /// [`Data::Dir`], else in memory for the deployment's lifetime (across
    /// [`Deployment::restart_synchronizer`](super::Deployment::restart_synchronizer)).
    /// Feature `amqp`.
    #[cfg(feature = "amqp")]
    Amqp(AmqpOptions),
}

/// The port of cluster `cluster`'s synchronizer in the course's layout ([`Bus::Grpc`]). The
/// layout holds at most 6 clusters ([`coordinator_port`] checks), so it never overflows.
pub(super) fn course_synchronizer_port(cluster: ClusterId) -> u16 {
    u16::try_from(9000u32.saturating_add(cluster.get())).unwrap_or(u16::MAX)
}

/// How the components of a deployment talk to each other.
#[derive(Debug, Clone)]
pub enum Transport {
    /// The operating system's TCP, on `bind_host`, advertised as `advertise_host` (binaries).
    Tcp,
    /// In-memory pipes on this network: no sockets; `bind_host` and `advertise_host` are
    /// unused (embedding and tests).
    Memory(MemoryNetwork),
}

/// Which ports the components listen on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ports {
    /// The course's layout: the coordinator on the given port, server `s` of cluster `c` on
    /// `c * 10000 + s - 1`, and with [`Bus::Grpc`] cluster `c`'s synchronizer on `9000 + c`.
    Course {
        /// The coordinator's port.
        coordinator: u16,
    },
    /// Ports chosen by the operating system.
    Auto,
    /// The coordinator on the given port, every other port chosen by the operating system.
    AutoButCoordinator {
        /// The coordinator's port.
        coordinator: u16,
    },
}

/// Where servers keep their data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    /// In memory: survives a restart within the process, not the process.
    Memory,
    /// Under this directory, in `cluster<c>/server<s>/`.
    Dir(PathBuf),
    /// On simulated disks with a write cache (for tests):
    /// [`Deployment::crash`](super::Deployment::crash) loses every write not yet synced, as
    /// pulling the plug would.
    Simulated,
}

/// Shape and settings of a deployment.
///
/// Non-exhaustive, so that fields can be added later: build it from `DeploymentConfig::default()`
/// and set the fields you need.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeploymentConfig {
    /// Number of clusters.
    pub clusters: u32,
    /// Servers per cluster (a master and its slaves).
    pub servers_per_cluster: u32,
    /// How the components talk: TCP (default) or in-memory pipes.
    pub transport: Transport,
    /// Listening ports.
    pub ports: Ports,
    /// Address to bind listeners to.
    pub bind_host: String,
    /// Host advertised to clients.
    pub advertise_host: String,
    /// Storage of the servers.
    pub data: Data,
    /// Open damaged data directories anyway, cutting each log at its first damage (see
    /// [`FileStorageOptions::repair`](crate::storage::FileStorageOptions::repair)); without it
    /// a damaged directory fails the start.
    pub repair: bool,
    /// Heartbeat interval.
    pub heartbeat_interval: Duration,
    /// Missed heartbeats before a node is dead.
    pub missed_heartbeats: u32,
    /// Cluster token for internal calls.
    pub cluster_token: Option<String>,
    /// Let the coordinator promote a slave not known to be in sync (may lose committed
    /// changes).
    pub allow_unclean_promotion: bool,
    /// Template for each server's settings (cluster and server ids are filled in).
    pub server: ServerConfig,
    /// How synchronizers (one per cluster) carry events between clusters.
    pub bus: Bus,
    /// Microseconds added to the clocks of cluster `c`'s servers (entry `c - 1`; missing
    /// entries are 0): for simulating clock skew between clusters.
    pub clock_offsets_micros: Vec<i64>,
    /// Where the coordinator keeps the clusters' roles: `None` (default) in its memory, alone;
    /// or a shared store (e.g. `EtcdStore`, feature `etcd`), as one of a group of coordinators
    /// (see [`Coordinator::in_group`](crate::Coordinator::in_group)).
    pub routing_store: Option<std::sync::Arc<dyn crate::coordinator::RoutingStore>>,
}

impl Default for DeploymentConfig {
    fn default() -> Self {
        Self {
            clusters: 3,
            servers_per_cluster: 2,
            transport: Transport::Tcp,
            ports: Ports::Course { coordinator: 9090 },
            bind_host: "127.0.0.1".to_string(),
            advertise_host: "127.0.0.1".to_string(),
            data: Data::Dir(PathBuf::from("./sns-data")),
            repair: false,
            heartbeat_interval: crate::coordinator::DEFAULT_HEARTBEAT_INTERVAL,
            missed_heartbeats: 2,
            cluster_token: None,
            allow_unclean_promotion: false,
            server: ServerConfig::default(),
            bus: Bus::default(),
            clock_offsets_micros: Vec::new(),
            routing_store: None,
        }
    }
}

impl DeploymentConfig {
    /// The default deployment (3 clusters of a master and a slave) entirely in this process:
    /// in-memory pipes ([`Transport::Memory`] on a new network), ports chosen on that network
    /// ([`Ports::Auto`]) and storage in memory ([`Data::Memory`]). For embedding and tests.
    pub fn in_memory() -> Self {
        Self {
            transport: Transport::Memory(crate::MemoryNetwork::new()),
            ports: Ports::Auto,
            data: Data::Memory,
            ..Self::default()
        }
    }
}

/// The coordinator's port, once `config`'s shape is known to fit its port layout: with
/// [`Ports::Course`], the highest server port must fit in 16 bits and, with [`Bus::Grpc`], the
/// coordinator must not sit on a synchronizer's port.
pub(super) fn coordinator_port(config: &DeploymentConfig) -> Result<u16> {
    match config.ports {
        Ports::Course { coordinator } => {
            let highest =
                u64::from(config.clusters) * 10_000 + u64::from(config.servers_per_cluster) - 1;
            if highest > 65_535 {
                return Err(Error::invalid(format!(
                    "{} clusters do not fit the course's port layout (c*10000+s-1); use automatic ports",
                    config.clusters
                )));
            }
            let syncs = 9001..=9000 + config.clusters;
            if config.bus == Bus::Grpc && syncs.contains(&u32::from(coordinator)) {
                return Err(Error::invalid(format!(
                    "coordinator port {coordinator} is taken by a synchronizer (ports 9001..={})",
                    9000 + config.clusters
                )));
            }
            Ok(coordinator)
        }
        Ports::AutoButCoordinator { coordinator } => Ok(coordinator),
        Ports::Auto => Ok(0),
    }
}

/// The port server `server` of cluster `cluster` first listens on: `c * 10000 + s - 1` in the
/// course's layout (which [`coordinator_port`] checked fits), else one the system picks (0).
pub(super) fn first_server_port(ports: Ports, cluster: ClusterId, server: ServerId) -> u16 {
    match ports {
        Ports::Course { .. } => (cluster.get() * 10_000 + server.get() - 1) as u16,
        Ports::Auto | Ports::AutoButCoordinator { .. } => 0,
    }
}

/// Listens for one component: on `bind_host:port` over TCP, on `node:port` in memory.
pub(super) async fn bind(config: &DeploymentConfig, node: &str, port: u16) -> Result<Listener> {
    match &config.transport {
        Transport::Tcp => tcp::bind(&crate::transport::address(&config.bind_host, port)).await,
        Transport::Memory(network) => network.bind(&crate::transport::address(node, port)),
    }
}

/// The network a node dials from.
pub(super) fn network_of(config: &DeploymentConfig, node: &str) -> Network {
    match &config.transport {
        Transport::Tcp => Network::tcp(),
        Transport::Memory(network) => network.node(node),
    }
}
