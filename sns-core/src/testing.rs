//! Helpers for tests and embedders (feature `test-util`): start servers and whole deployments
//! on in-memory pipes (or TCP port 0), and wait for conditions without sleeping a fixed time.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::deployment::Direction;
use crate::error::Result;
use crate::server::{Server, ServerConfig};
use crate::storage::Storage;
use crate::transport::{Listener, MemoryNetwork, Network};

#[cfg(feature = "amqp")]
mod amqp;
#[cfg(feature = "etcd")]
mod etcd;
pub mod routing_store_suite;
pub mod storage_suite;
#[cfg(feature = "amqp")]
pub use amqp::{AMQP_URL_VAR, AmqpTestBroker, REQUIRE_AMQP_VAR, TakenMessage, amqp_broker};
#[cfg(feature = "etcd")]
pub use etcd::{ETCD_URL_VAR, REQUIRE_ETCD_VAR, etcd_options};

/// The texts of the next `count` posts on `stream`, each awaited for at most `patience`; panics
/// (failing the test) if one does not come in time, the stream ends or brings an error.
pub async fn next_texts(
    stream: &mut crate::TimelineStream,
    count: usize,
    patience: Duration,
) -> Vec<String> {
    let mut texts = Vec::with_capacity(count);
    for got in 0..count {
        let post = tokio::time::timeout(patience, stream.next())
            .await
            .unwrap_or_else(|_| panic!("post {} of {count} did not come in time", got + 1))
            .unwrap_or_else(|| panic!("the stream ended after {got} of {count} posts"))
            .unwrap_or_else(|e| panic!("the stream failed after {got} of {count} posts: {e}"));
        texts.push(post.text);
    }
    texts
}

/// Polls `check` until it returns `true` or `timeout` passes; returns whether it held.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Lets every task that is ready run. On a paused clock no timer fires meanwhile, so a test
/// sees what has happened by this instant; it is no way to wait for a condition (that is
/// [`eventually`]).
pub async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// A standalone server, on in-memory pipes or a loopback TCP port.
#[derive(Debug)]
pub struct TestServer {
    /// The server itself, for direct calls.
    pub server: Server,
    /// Its address (`127.0.0.1:<port>` over TCP, `server:<port>` in memory).
    pub addr: String,
    /// The network that reaches it.
    pub network: Network,
    shutdown: CancellationToken,
    serving: JoinHandle<Result<()>>,
}

impl TestServer {
    /// Opens a server on `storage` and serves it over TCP on `127.0.0.1:0`.
    pub async fn start(config: ServerConfig, storage: Arc<dyn Storage>) -> Result<Self> {
        let listener = crate::transport::tcp::bind("127.0.0.1:0").await?;
        Self::serve(listener, Network::tcp(), config, storage).await
    }

    /// Opens a server on `storage` and serves it on a fresh in-memory network, as node
    /// `server`; [`TestServer::network`] dials it from node `client`.
    pub async fn start_in_memory(config: ServerConfig, storage: Arc<dyn Storage>) -> Result<Self> {
        let memory = MemoryNetwork::new();
        let listener = memory.bind("server:0")?;
        Self::serve(listener, memory.node("client"), config, storage).await
    }

    /// Opens a server on `storage` and serves it on `listener`; `network` is how tests reach
    /// it.
    pub async fn serve(
        listener: Listener,
        network: Network,
        config: ServerConfig,
        storage: Arc<dyn Storage>,
    ) -> Result<Self> {
        let addr = listener.addr().to_string();
        let server = Server::open(config, storage).await?;
        let shutdown = CancellationToken::new();
        let serving = tokio::spawn({
            let server = server.clone();
            let shutdown = shutdown.clone();
            async move { server.serve(listener, shutdown).await }
        });
        Ok(Self {
            server,
            addr,
            network,
            shutdown,
            serving,
        })
    }

    /// A logged-in client for `user`.
    pub async fn client(&self, user: u32) -> Result<crate::Client> {
        let user = crate::UserId::new(user).ok_or_else(|| crate::Error::invalid("bad user"))?;
        crate::Client::login(&self.network, &self.addr, user).await
    }

    /// A gRPC channel to the server, for raw calls.
    pub async fn channel(&self) -> Result<Channel> {
        self.network.connect(&self.addr).await
    }

    /// Stops serving and waits until every task of the server has finished.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        self.serving
            .await
            .map_err(|e| crate::Error::ConnectionLost(format!("server task failed: {e}")))?
    }
}

/// Shape of a [`TestCluster`].
///
/// Non-exhaustive, so that fields can be added later: build it from `TestClusterConfig::default()`
/// and set the fields you need.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TestClusterConfig {
    /// Number of clusters.
    pub clusters: u32,
    /// Servers per cluster.
    pub servers_per_cluster: u32,
    /// File storage in a temporary directory (`true`) or memory storage.
    pub files: bool,
    /// Simulated disks that [`TestCluster::crash`] can pull the plug on (instead of memory
    /// storage; ignored with `files`).
    pub simulated_disks: bool,
    /// Heartbeat interval (short, so failures are detected quickly).
    pub heartbeat_interval: Duration,
    /// Missed heartbeats after which a node counts as dead (and a master that reached no
    /// coordinator for as long steps down). 4 × 100 ms: quick, yet a loaded 2-core machine
    /// running many such tests at once does not miss that many by accident.
    pub missed_heartbeats: u32,
    /// Cluster token for internal calls.
    pub cluster_token: Option<String>,
    /// Loopback TCP on ports chosen by the OS (`true`) or in-memory pipes, no sockets.
    pub tcp: bool,
    /// How synchronizers carry events between clusters (in-process by default).
    pub bus: crate::deployment::Bus,
    /// Microseconds added to each cluster's clocks (entry `c - 1`), to simulate skew.
    pub clock_offsets_micros: Vec<i64>,
}

impl Default for TestClusterConfig {
    fn default() -> Self {
        Self {
            clusters: 3,
            servers_per_cluster: 2,
            tcp: false,
            files: false,
            simulated_disks: false,
            heartbeat_interval: Duration::from_millis(100),
            missed_heartbeats: 4,
            cluster_token: None,
            bus: crate::deployment::Bus::default(),
            clock_offsets_micros: Vec::new(),
        }
    }
}

/// A coordinator and N clusters of servers in this process, on in-memory pipes (or on TCP
/// ports chosen by the OS).
#[derive(Debug)]
pub struct TestCluster {
    deployment: crate::deployment::Deployment,
    _dir: Option<tempfile::TempDir>,
}

fn ids(cluster: u32, server: u32) -> Result<(crate::ClusterId, crate::ServerId)> {
    crate::ClusterId::new(cluster)
        .zip(crate::ServerId::new(server))
        .ok_or_else(|| crate::Error::invalid("cluster and server ids start at 1"))
}

impl TestCluster {
    /// Starts `clusters` clusters of a master and a slave, in memory, and waits for masters.
    pub async fn start(clusters: u32) -> Result<Self> {
        Self::start_with(TestClusterConfig {
            clusters,
            ..TestClusterConfig::default()
        })
        .await
    }

    /// Starts a deployment shaped by `config` and waits until every cluster has a master.
    pub async fn start_with(config: TestClusterConfig) -> Result<Self> {
        let dir = if config.files {
            Some(tempfile::tempdir()?)
        } else {
            None
        };
        let data = match &dir {
            Some(dir) => crate::deployment::Data::Dir(dir.path().to_path_buf()),
            None if config.simulated_disks => crate::deployment::Data::Simulated,
            None => crate::deployment::Data::Memory,
        };
        let deployment =
            crate::deployment::Deployment::start(crate::deployment::DeploymentConfig {
                clusters: config.clusters,
                servers_per_cluster: config.servers_per_cluster,
                ports: crate::deployment::Ports::Auto,
                transport: if config.tcp {
                    crate::deployment::Transport::Tcp
                } else {
                    crate::deployment::Transport::Memory(MemoryNetwork::new())
                },
                data,
                heartbeat_interval: config.heartbeat_interval,
                missed_heartbeats: config.missed_heartbeats,
                cluster_token: config.cluster_token,
                bus: config.bus,
                clock_offsets_micros: config.clock_offsets_micros,
                ..crate::deployment::DeploymentConfig::default()
            })
            .await?;
        deployment.wait_for_masters(Duration::from_secs(10)).await?;
        Ok(Self {
            deployment,
            _dir: dir,
        })
    }

    /// The deployment underneath.
    pub fn deployment(&self) -> &crate::deployment::Deployment {
        &self.deployment
    }

    /// The coordinator's `host:port`.
    pub fn coordinator_addr(&self) -> &str {
        self.deployment.coordinator_addr()
    }

    /// The network that reaches the deployment from outside (from node `client` in memory).
    pub fn network(&self) -> &Network {
        self.deployment.network()
    }

    /// A gRPC channel to `addr` (the coordinator or a server), for raw calls.
    pub async fn channel(&self, addr: &str) -> Result<Channel> {
        self.network().connect(addr).await
    }

    /// A logged-in client for `user`, routed by the coordinator; retries until a master of
    /// the user's cluster answers (10 s at most).
    pub async fn client(&self, user: u32) -> Result<crate::Client> {
        let user = crate::UserId::new(user).ok_or_else(|| crate::Error::invalid("bad user"))?;
        let coordinator = crate::CoordinatorClient::new(self.network(), self.coordinator_addr())?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match coordinator.login(user).await {
                Ok(client) => return Ok(client),
                Err(e) if e.calls_for_reconnect() && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(self.deployment.config().heartbeat_interval / 4).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The running server of a slot.
    pub fn server(&self, cluster: u32, server: u32) -> Option<&Server> {
        let (c, s) = ids(cluster, server).ok()?;
        self.deployment.server(c, s)
    }

    /// Stops a server gracefully (its tasks end; its storage is kept for a restart).
    pub async fn stop(&mut self, cluster: u32, server: u32) -> Result<()> {
        let (c, s) = ids(cluster, server)?;
        self.deployment.stop(c, s).await
    }

    /// Crashes a server: tasks stopped at once, and with `simulated_disks` every write not
    /// yet synced lost (see [`crate::Deployment::crash`]).
    pub async fn crash(&mut self, cluster: u32, server: u32) -> Result<()> {
        let (c, s) = ids(cluster, server)?;
        self.deployment.crash(c, s).await
    }

    /// Restarts a server on its port and storage.
    pub async fn restart(&mut self, cluster: u32, server: u32) -> Result<()> {
        let (c, s) = ids(cluster, server)?;
        self.deployment.restart(c, s).await
    }

    /// Stops the synchronizer of `cluster` (its cluster stops sending and receiving).
    pub async fn stop_synchronizer(&mut self, cluster: u32) -> Result<()> {
        let (c, _) = ids(cluster, 1)?;
        self.deployment.stop_synchronizer(c).await
    }

    /// Starts (again) the synchronizer of `cluster`.
    pub async fn restart_synchronizer(&mut self, cluster: u32) -> Result<()> {
        let (c, _) = ids(cluster, 1)?;
        self.deployment.restart_synchronizer(c).await
    }

    /// What the running synchronizer of `cluster` refused so far (forged, altered or invalid
    /// batches), if one runs.
    pub fn refusals(&self, cluster: u32) -> Option<crate::sync::RefusalCounts> {
        let (c, _) = ids(cluster, 1).ok()?;
        let synchronizer = self.deployment.synchronizer(c)?;
        Some(synchronizer.refusals().counts())
    }

    /// Makes every write of a server's disk fail from now on, as on a full disk (needs
    /// `simulated_disks`).
    pub fn fail_disk(&self, cluster: u32, server: u32) -> Result<()> {
        let (c, s) = ids(cluster, server)?;
        self.deployment.fail_disk(c, s)
    }

    /// Partitions a server from the coordinator in both directions (`cut = true`) or heals the
    /// partition (`false`). Needs the memory transport.
    pub fn partition(&self, cluster: u32, server: u32, cut: bool) -> Result<()> {
        self.partition_oneway(cluster, server, Direction::Both, cut)
    }

    /// Cuts or heals one direction between a server and the coordinator.
    pub fn partition_oneway(
        &self,
        cluster: u32,
        server: u32,
        direction: Direction,
        cut: bool,
    ) -> Result<()> {
        let (c, s) = ids(cluster, server)?;
        self.deployment.cut(c, s, direction, cut)
    }

    /// Cuts (`cut = true`) or heals both directions between two servers of a cluster (their
    /// mirroring stream stalls; each still reaches the coordinator). Needs the memory transport.
    pub fn isolate(&self, cluster: u32, a: u32, b: u32, cut: bool) -> Result<()> {
        let (c, sa) = ids(cluster, a)?;
        let (_, sb) = ids(cluster, b)?;
        let network = self
            .deployment
            .memory_network()
            .ok_or_else(|| crate::Error::invalid("partitions need the memory transport"))?;
        let (na, nb) = (
            crate::deployment::server_node(c, sa),
            crate::deployment::server_node(c, sb),
        );
        if cut {
            network.partition(&na, &nb);
        } else {
            network.repair(&na, &nb);
        }
        Ok(())
    }

    /// Stops everything and waits for every task.
    pub async fn shutdown(self) {
        self.deployment.shutdown().await;
    }
}
