//! The synchronizers of a deployment, one per cluster, on the transport its [`Bus`] names.
//!
//! A synchronizer keeps what it needs across restarts: with [`Bus::Grpc`] the port it first
//! listened on, with `Bus::Amqp` (feature `amqp`) its publisher cursor (a file under a
//! [`Data::Dir`](super::Data::Dir), else held in memory by the deployment).

use std::sync::Arc;

use tokio::task::JoinHandle;

#[cfg(feature = "amqp")]
use super::Data;
use super::config::course_synchronizer_port;
use super::{Bus, Deployment, Ports, Transport, bind, network_of, synchronizer_node};
use crate::error::{Error, Result};
use crate::ids::ClusterId;
#[cfg(feature = "amqp")]
use crate::sync::{AmqpBus, AmqpOptions, CursorStore};
use crate::sync::{
    GrpcBus, GrpcBusOptions, LocalBus, SyncTransport, Synchronizer, SynchronizerConfig,
};

/// A running synchronizer.
#[derive(Debug)]
pub(super) struct RunningSync {
    synchronizer: Synchronizer,
    task: JoinHandle<Result<()>>,
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

impl Deployment {
    /// Starts (again) the synchronizer of `cluster` (nothing with [`Bus::None`]).
    pub async fn restart_synchronizer(&mut self, cluster: ClusterId) -> Result<()> {
        self.stop_synchronizer(cluster).await?;
        let transport: Arc<dyn SyncTransport> = match &self.config.bus {
            Bus::None => return Ok(()),
            Bus::Local => Arc::new(LocalBus::new()),
            Bus::Grpc => Arc::new(self.grpc_bus(cluster).await?),
            #[cfg(feature = "amqp")]
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
    #[cfg(feature = "amqp")]
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
}
