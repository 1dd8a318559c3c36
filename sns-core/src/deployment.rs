//! A whole deployment in one process: a coordinator and N clusters of servers, each server on
//! its own listener and storage, joined to the coordinator by heartbeats.
//!
//! `sns up` runs one on the course's ports with file storage; `TestCluster` (feature
//! `test-util`) runs one on ephemeral ports. Servers can be killed, restarted and isolated from
//! the coordinator one by one.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::coordinator::{Coordinator, CoordinatorConfig, RoutingConfig};
use crate::error::{Error, Result};
use crate::ids::{ClusterId, ServerId};
use crate::server::{CoordinatorLink, Server, ServerConfig};
use crate::storage::{FileStorage, MemoryStorage, Storage};

/// Which ports the components listen on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ports {
    /// The course's layout: the coordinator on the given port, server `s` of cluster `c` on
    /// `c * 10000 + s - 1`.
    Course {
        /// The coordinator's port.
        coordinator: u16,
    },
    /// Ports chosen by the operating system.
    Auto,
}

/// Where servers keep their data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    /// In memory: survives a restart within the process, not the process.
    Memory,
    /// Under this directory, in `cluster<c>/server<s>/`.
    Dir(PathBuf),
}

/// Shape and settings of a deployment.
#[derive(Debug, Clone)]
pub struct DeploymentConfig {
    /// Number of clusters.
    pub clusters: u32,
    /// Servers per cluster (a master and its slaves).
    pub servers_per_cluster: u32,
    /// Listening ports.
    pub ports: Ports,
    /// Address to bind listeners to.
    pub bind_host: String,
    /// Host advertised to clients.
    pub advertise_host: String,
    /// Storage of the servers.
    pub data: Data,
    /// Heartbeat interval.
    pub heartbeat_interval: Duration,
    /// Missed heartbeats before a node is dead.
    pub missed_heartbeats: u32,
    /// Cluster token for internal calls.
    pub cluster_token: Option<String>,
    /// Template for each server's settings (cluster and server ids are filled in).
    pub server: ServerConfig,
}

impl Default for DeploymentConfig {
    fn default() -> Self {
        Self {
            clusters: 3,
            servers_per_cluster: 2,
            ports: Ports::Course { coordinator: 9090 },
            bind_host: "127.0.0.1".to_string(),
            advertise_host: "127.0.0.1".to_string(),
            data: Data::Dir(PathBuf::from("./sns-data")),
            heartbeat_interval: Duration::from_secs(1),
            missed_heartbeats: 2,
            cluster_token: None,
            server: ServerConfig::default(),
        }
    }
}

/// One server slot of a deployment.
#[derive(Debug)]
struct Slot {
    port: u16,
    memory: MemoryStorage,
    isolated: Arc<AtomicBool>,
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
    coordinator_shutdown: CancellationToken,
    coordinator_task: JoinHandle<Result<()>>,
    slots: BTreeMap<(ClusterId, ServerId), Slot>,
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

async fn bind(host: &str, port: u16) -> Result<TcpListener> {
    TcpListener::bind((host, port)).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            Error::Unavailable(format!("port {port} is already in use"))
        } else {
            Error::Unavailable(format!("cannot listen on {host}:{port}: {e}"))
        }
    })
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
                coordinator
            }
            Ports::Auto => 0,
        };
        let listener = bind(&config.bind_host, coordinator_port).await?;
        let coordinator_addr = format!(
            "{}:{}",
            config.advertise_host,
            listener.local_addr()?.port()
        );
        let coordinator = Coordinator::new(CoordinatorConfig {
            routing: RoutingConfig {
                clusters: config.clusters,
                heartbeat_interval: config.heartbeat_interval,
                missed_heartbeats: config.missed_heartbeats,
            },
            cluster_token: config.cluster_token.clone(),
        });
        let coordinator_shutdown = CancellationToken::new();
        let coordinator_task = tokio::spawn({
            let coordinator = coordinator.clone();
            let shutdown = coordinator_shutdown.clone();
            async move { coordinator.serve(listener, shutdown).await }
        });
        let mut deployment = Self {
            config,
            coordinator,
            coordinator_addr,
            coordinator_shutdown,
            coordinator_task,
            slots: BTreeMap::new(),
        };
        for c in 1..=deployment.config.clusters {
            for s in 1..=deployment.config.servers_per_cluster {
                let (Some(cluster), Some(server)) = (ClusterId::new(c), ServerId::new(s)) else {
                    continue;
                };
                let port = match deployment.config.ports {
                    Ports::Course { .. } => (c * 10_000 + s - 1) as u16,
                    Ports::Auto => 0,
                };
                deployment.slots.insert(
                    (cluster, server),
                    Slot {
                        port,
                        memory: MemoryStorage::new(),
                        isolated: Arc::new(AtomicBool::new(false)),
                        running: None,
                    },
                );
                if let Err(e) = deployment.restart(cluster, server).await {
                    deployment.shutdown().await;
                    return Err(e);
                }
            }
        }
        Ok(deployment)
    }

    /// The coordinator's `host:port`.
    pub fn coordinator_addr(&self) -> &str {
        &self.coordinator_addr
    }

    /// The coordinator itself.
    pub fn coordinator(&self) -> &Coordinator {
        &self.coordinator
    }

    /// The deployment's settings.
    pub fn config(&self) -> &DeploymentConfig {
        &self.config
    }

    fn data_dir(&self, cluster: ClusterId, server: ServerId) -> Option<PathBuf> {
        match &self.config.data {
            Data::Memory => None,
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
                addr: format!("{}:{}", self.config.advertise_host, slot.port),
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

    /// Stops a server as a crash would: its tasks end, its storage is closed; nothing that was
    /// acknowledged is lost.
    pub async fn kill(&mut self, cluster: ClusterId, server: ServerId) -> Result<()> {
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
        self.kill(cluster, server).await?;
        let data_dir = self.data_dir(cluster, server);
        let slot = self
            .slots
            .get_mut(&(cluster, server))
            .ok_or_else(|| Error::invalid(format!("no server {server} in cluster {cluster}")))?;
        let storage: Arc<dyn Storage> = match data_dir {
            None => Arc::new(slot.memory.clone()),
            Some(dir) => Arc::new(FileStorage::open(&dir).map_err(|e| {
                Error::Unavailable(format!("cannot open data directory {}: {e}", dir.display()))
            })?),
        };
        let listener = bind(&self.config.bind_host, slot.port).await?;
        slot.port = listener.local_addr()?.port();
        let config = ServerConfig {
            cluster,
            server_id: server,
            clusters: self.config.clusters,
            ..self.config.server.clone()
        };
        let instance = Server::open(config, storage).await?;
        let mut link = CoordinatorLink::new(
            self.coordinator_addr.clone(),
            self.config.advertise_host.clone(),
            slot.port,
        );
        link.interval = self.config.heartbeat_interval;
        link.missed_heartbeats = self.config.missed_heartbeats;
        link.cluster_token = self.config.cluster_token.clone();
        instance.join(link, Arc::clone(&slot.isolated));
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

    /// Cuts (or restores) a server's link to the coordinator: its heartbeats stop arriving.
    pub fn isolate(&self, cluster: ClusterId, server: ServerId, isolated: bool) -> Result<()> {
        let slot = self
            .slots
            .get(&(cluster, server))
            .ok_or_else(|| Error::invalid(format!("no server {server} in cluster {cluster}")))?;
        slot.isolated.store(isolated, Ordering::Relaxed);
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
                            .is_some_and(|server| server.role() == crate::server::Role::Master)
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

    /// Stops every server, then the coordinator, and waits for all their tasks.
    pub async fn shutdown(mut self) {
        let keys: Vec<_> = self.slots.keys().copied().collect();
        for (cluster, server) in keys {
            let _ = self.kill(cluster, server).await;
        }
        self.coordinator_shutdown.cancel();
        let _ = (&mut self.coordinator_task).await;
    }
}
