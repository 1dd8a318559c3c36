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
use crate::sync::{
    AmqpBus, AmqpOptions, CursorStore, GrpcBus, GrpcBusOptions, LocalBus, SyncTransport,
    Synchronizer, SynchronizerConfig,
};
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

/// How a deployment's synchronizers carry events between clusters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Bus {
    /// No synchronizers: every cluster is an island.
    None,
    /// In-process ([`LocalBus`]): each synchronizer reads the other clusters' masters.
    #[default]
    Local,
    /// gRPC between synchronizers ([`GrpcBus`]): cluster `c`'s synchronizer (id `c`) serves
    /// `sns.v1.Sync` on its own listener (port `9000 + c` with [`Ports::Course`]), registers
    /// with the coordinator and subscribes to the other clusters' synchronizers.
    Grpc,
    /// Through a RabbitMQ broker ([`AmqpBus`]). Each cluster's publisher cursor is kept in
    /// `cluster<c>/synchronizer/amqp-<prefix>.cursor` under a [`Data::Dir`], else in memory
    /// for the deployment's lifetime (across [`Deployment::restart_synchronizer`]).
    Amqp(AmqpOptions),
}

/// The port of cluster `cluster`'s synchronizer in the course's layout ([`Bus::Grpc`]). The
/// layout holds at most 6 clusters ([`Deployment::start`] checks), so it never overflows.
fn course_synchronizer_port(cluster: ClusterId) -> u16 {
    u16::try_from(9000u32.saturating_add(cluster.get())).unwrap_or(u16::MAX)
}

/// The node name callers outside the deployment (clients, tools) dial from on the memory
/// network.
pub const CLIENT_NODE: &str = "client";

/// How the components of a deployment talk to each other.
#[derive(Debug, Clone)]
pub enum Transport {
    /// The operating system's TCP, on `bind_host`, advertised as `advertise_host` (binaries).
    Tcp,
    /// In-memory pipes on this network: no sockets; `bind_host` and `advertise_host` are
    /// unused (embedding and tests).
    Memory(MemoryNetwork),
}

/// Which way a cut between a server and the coordinator goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Bytes from the server to the coordinator (its heartbeats) stall.
    ToCoordinator,
    /// Bytes from the coordinator to the server (the replies) stall.
    FromCoordinator,
    /// Both.
    Both,
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
    /// On simulated disks with a write cache (for tests): [`Deployment::crash`] loses every
    /// write not yet synced, as pulling the plug would.
    Simulated,
}

/// Shape and settings of a deployment.
#[derive(Debug, Clone)]
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
    /// [`FileStorageOptions::repair`](crate::storage::FileStorageOptions::repair)); without it a damaged directory fails the start.
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
        }
    }
}

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
    amqp_cursors: BTreeMap<ClusterId, CursorStore>,
}

/// A running synchronizer.
#[derive(Debug)]
struct RunningSync {
    synchronizer: Synchronizer,
    task: JoinHandle<Result<()>>,
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

/// A row of [`Deployment::synchronizers`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynchronizerPlace {
    /// The cluster it serves (its synchronizer id is the cluster id).
    pub cluster: ClusterId,
    /// `host:port` of its `sns.v1.Sync` service ([`Bus::Grpc`]); `None` for a transport that
    /// serves nothing.
    pub addr: Option<String>,
    /// Whether it is running.
    pub running: bool,
}

/// Listens for one component: on `bind_host:port` over TCP, on `node:port` in memory.
async fn bind(config: &DeploymentConfig, node: &str, port: u16) -> Result<Listener> {
    match &config.transport {
        Transport::Tcp => tcp::bind(&crate::transport::address(&config.bind_host, port)).await,
        Transport::Memory(network) => network.bind(&crate::transport::address(node, port)),
    }
}

/// The network a node dials from.
fn network_of(config: &DeploymentConfig, node: &str) -> Network {
    match &config.transport {
        Transport::Tcp => Network::tcp(),
        Transport::Memory(network) => network.node(node),
    }
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
        let coordinator_port = match config.ports {
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
                coordinator
            }
            Ports::AutoButCoordinator { coordinator } => coordinator,
            Ports::Auto => 0,
        };
        let listener = bind(&config, COORDINATOR_NODE, coordinator_port).await?;
        let coordinator_addr = match config.transport {
            Transport::Tcp => crate::transport::address(
                &config.advertise_host,
                listener.port().unwrap_or(coordinator_port),
            ),
            Transport::Memory(_) => listener.addr().to_string(),
        };
        let coordinator = Coordinator::new(CoordinatorConfig {
            routing: RoutingConfig {
                clusters: config.clusters,
                servers: config.servers_per_cluster,
                heartbeat_interval: config.heartbeat_interval,
                missed_heartbeats: config.missed_heartbeats,
                allow_unclean_promotion: config.allow_unclean_promotion,
            },
            cluster_token: config.cluster_token.clone(),
        });
        let coordinator_shutdown = CancellationToken::new();
        let coordinator_task = tokio::spawn({
            let coordinator = coordinator.clone();
            let shutdown = coordinator_shutdown.clone();
            async move { coordinator.serve(listener, shutdown).await }
        });
        let network = network_of(&config, CLIENT_NODE);
        let mut deployment = Self {
            config,
            coordinator,
            coordinator_addr,
            network,
            coordinator_shutdown,
            coordinator_task,
            slots: BTreeMap::new(),
            synchronizers: BTreeMap::new(),
            sync_ports: BTreeMap::new(),
            amqp_cursors: BTreeMap::new(),
        };
        for c in 1..=deployment.config.clusters {
            for s in 1..=deployment.config.servers_per_cluster {
                let (Some(cluster), Some(server)) = (ClusterId::new(c), ServerId::new(s)) else {
                    continue;
                };
                let port = match deployment.config.ports {
                    Ports::Course { .. } => (c * 10_000 + s - 1) as u16,
                    Ports::Auto | Ports::AutoButCoordinator { .. } => 0,
                };
                let host = match deployment.config.transport {
                    Transport::Tcp => deployment.config.advertise_host.clone(),
                    Transport::Memory(_) => server_node(cluster, server),
                };
                deployment.slots.insert(
                    (cluster, server),
                    Slot {
                        host,
                        port,
                        memory: MemoryStorage::new(),
                        disk: CrashDisk::new(),
                        running: None,
                    },
                );
                if let Err(e) = deployment.restart(cluster, server).await {
                    deployment.shutdown().await;
                    return Err(e);
                }
            }
        }
        for cluster in (1..=deployment.config.clusters).filter_map(ClusterId::new) {
            if let Err(e) = deployment.restart_synchronizer(cluster).await {
                deployment.shutdown().await;
                return Err(e);
            }
        }
        Ok(deployment)
    }

    /// Starts (again) the synchronizer of `cluster` (nothing with [`Bus::None`]).
    pub async fn restart_synchronizer(&mut self, cluster: ClusterId) -> Result<()> {
        self.stop_synchronizer(cluster).await?;
        let transport: Arc<dyn SyncTransport> = match &self.config.bus {
            Bus::None => return Ok(()),
            Bus::Local => Arc::new(LocalBus::new()),
            Bus::Grpc => Arc::new(self.grpc_bus(cluster).await?),
            Bus::Amqp(options) => {
                let options = options.clone();
                let cursor = self.amqp_cursor(cluster, &options)?;
                Arc::new(AmqpBus::new(options, cursor))
            }
        };
        let config = SynchronizerConfig {
            cluster,
            clusters: self.config.clusters,
            coordinator: self.coordinator_addr.clone(),
            cluster_token: self.config.cluster_token.clone(),
        };
        let network = network_of(&self.config, &synchronizer_node(cluster));
        let synchronizer = Synchronizer::new(&config, &network, transport)?;
        let task = tokio::spawn({
            let synchronizer = synchronizer.clone();
            async move { synchronizer.run().await }
        });
        self.synchronizers
            .insert(cluster, RunningSync { synchronizer, task });
        Ok(())
    }

    /// A gRPC transport for `cluster`'s synchronizer (id = cluster id), on a listener of its
    /// own: the port it had before, else `9000 + c` (course ports) or one the system picks.
    async fn grpc_bus(&mut self, cluster: ClusterId) -> Result<GrpcBus> {
        let node = synchronizer_node(cluster);
        let port = match (self.sync_ports.get(&cluster), self.config.ports) {
            (Some(port), _) => *port,
            (None, Ports::Course { .. }) => course_synchronizer_port(cluster),
            (None, Ports::Auto | Ports::AutoButCoordinator { .. }) => 0,
        };
        let listener = bind(&self.config, &node, port).await?;
        let port = listener.port().unwrap_or(port);
        self.sync_ports.insert(cluster, port);
        let host = match self.config.transport {
            Transport::Tcp => self.config.advertise_host.clone(),
            Transport::Memory(_) => node,
        };
        Ok(GrpcBus::new(
            listener,
            GrpcBusOptions {
                sync_id: cluster.get(),
                advertise_host: host,
                advertise_port: Some(port),
                heartbeat_interval: self.config.heartbeat_interval,
            },
        ))
    }

    /// The RabbitMQ publisher cursor of `cluster`: a file under a [`Data::Dir`], else the
    /// deployment's in-memory one.
    fn amqp_cursor(&mut self, cluster: ClusterId, options: &AmqpOptions) -> Result<CursorStore> {
        options.validate()?;
        match &self.config.data {
            Data::Dir(root) => CursorStore::file(root.join(format!(
                "cluster{cluster}/synchronizer/amqp-{}.cursor",
                options.prefix
            ))),
            Data::Memory | Data::Simulated => Ok(self
                .amqp_cursors
                .entry(cluster)
                .or_insert_with(CursorStore::memory)
                .clone()),
        }
    }

    /// Stops the synchronizer of `cluster`, if one runs, and waits for it.
    pub async fn stop_synchronizer(&mut self, cluster: ClusterId) -> Result<()> {
        if cluster.get() > self.config.clusters {
            return Err(Error::invalid(format!("no cluster {cluster}")));
        }
        if let Some(running) = self.synchronizers.remove(&cluster) {
            running.synchronizer.stop();
            match running.task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(%cluster, "synchronizer ended with: {e}"),
                Err(e) => tracing::warn!(%cluster, "synchronizer task failed: {e}"),
            }
        }
        Ok(())
    }

    /// The running synchronizer of `cluster`, if any.
    pub fn synchronizer(&self, cluster: ClusterId) -> Option<&Synchronizer> {
        self.synchronizers.get(&cluster).map(|r| &r.synchronizer)
    }

    /// Where every synchronizer is: one per cluster, none with [`Bus::None`].
    pub fn synchronizers(&self) -> Vec<SynchronizerPlace> {
        if matches!(self.config.bus, Bus::None) {
            return Vec::new();
        }
        (1..=self.config.clusters)
            .filter_map(ClusterId::new)
            .map(|cluster| SynchronizerPlace {
                cluster,
                addr: self.sync_ports.get(&cluster).map(|port| {
                    let host = match self.config.transport {
                        Transport::Tcp => self.config.advertise_host.clone(),
                        Transport::Memory(_) => synchronizer_node(cluster),
                    };
                    crate::transport::address(&host, *port)
                }),
                running: self.synchronizers.contains_key(&cluster),
            })
            .collect()
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

    /// Crashes a server: its tasks are stopped at once (connections are dropped, not closed
    /// gracefully), and on [`Data::Simulated`] disks every write not yet synced is lost. What
    /// was synced stays for [`Deployment::restart`]. (On real files, what the kernel holds is
    /// not lost by a process crash; on [`Data::Memory`] nothing is.)
    pub async fn crash(&mut self, cluster: ClusterId, server: ServerId) -> Result<()> {
        let simulated = self.config.data == Data::Simulated;
        let slot = self
            .slots
            .get_mut(&(cluster, server))
            .ok_or_else(|| Error::invalid(format!("no server {server} in cluster {cluster}")))?;
        if simulated {
            slot.disk.pull_plug();
        }
        if let Some(running) = slot.running.take() {
            running.serving.abort();
            running.shutdown.cancel();
            running.server.close().await;
            let _ = running.serving.await;
        }
        Ok(())
    }

    /// Makes every write of a server's simulated disk fail from now on, as on a full disk (for
    /// tests; needs [`Data::Simulated`]).
    pub fn fail_disk(&self, cluster: ClusterId, server: ServerId) -> Result<()> {
        if self.config.data != Data::Simulated {
            return Err(Error::invalid("failing disks need simulated disks"));
        }
        let slot = self
            .slots
            .get(&(cluster, server))
            .ok_or_else(|| Error::invalid(format!("no server {server} in cluster {cluster}")))?;
        slot.disk.fail_writes();
        Ok(())
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

    /// Cuts (`cut = true`) or heals a server's link to the coordinator in `direction`, on the
    /// memory network: heartbeats or their replies stall on the open connection, and new
    /// connections between the two do not complete. Over TCP this is refused.
    pub fn cut(
        &self,
        cluster: ClusterId,
        server: ServerId,
        direction: Direction,
        cut: bool,
    ) -> Result<()> {
        if !self.slots.contains_key(&(cluster, server)) {
            return Err(Error::invalid(format!(
                "no server {server} in cluster {cluster}"
            )));
        }
        let network = self
            .memory_network()
            .ok_or_else(|| Error::invalid("partitions need the memory transport"))?;
        let node = server_node(cluster, server);
        let links: &[(&str, &str)] = match direction {
            Direction::ToCoordinator => &[(&node, COORDINATOR_NODE)],
            Direction::FromCoordinator => &[(COORDINATOR_NODE, &node)],
            Direction::Both => &[(&node, COORDINATOR_NODE), (COORDINATOR_NODE, &node)],
        };
        for (from, to) in links {
            if cut {
                network.cut(from, to);
            } else {
                network.heal(from, to);
            }
        }
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
