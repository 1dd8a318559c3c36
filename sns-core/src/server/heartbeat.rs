//! The server's link to the coordinator: a heartbeat every interval, from the first second.
//!
//! The first heartbeat registers the server; each reply assigns its role and tells the
//! cluster's epoch. A master that has not reached the coordinator for a whole failure timeout
//! steps down (it may already have been replaced), so two masters never accept writes for long.

use std::sync::Arc;
use std::time::Duration;

use sns_proto::csce438::ServerInfo;
use sns_proto::csce438::coord_service_client::CoordServiceClient;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;

use super::{Role, Server, Shared};
use crate::grpc::coord::{TOKEN_METADATA, node_role, role_from_wire, role_name};
use crate::ids::Epoch;
use crate::transport::Network;

/// How a server reaches and reports to its coordinator.
#[derive(Debug, Clone)]
pub struct CoordinatorLink {
    /// The coordinator's `host:port`.
    pub coordinator: String,
    /// The host clients should use to reach this server.
    pub advertise_host: String,
    /// The port clients should use to reach this server.
    pub advertise_port: u16,
    /// Time between heartbeats (default 1 s; the course used 5 s).
    pub interval: Duration,
    /// Heartbeats a master may miss before it steps down (default 2).
    pub missed_heartbeats: u32,
    /// The cluster token, if the deployment uses one.
    pub cluster_token: Option<String>,
}

impl CoordinatorLink {
    /// A link with the default timing and no token.
    pub fn new(
        coordinator: impl Into<String>,
        advertise_host: impl Into<String>,
        port: u16,
    ) -> Self {
        Self {
            coordinator: coordinator.into(),
            advertise_host: advertise_host.into(),
            advertise_port: port,
            interval: Duration::from_secs(1),
            missed_heartbeats: 2,
            cluster_token: None,
        }
    }
}

impl Server {
    /// Joins a deployment: the server refuses client writes until the coordinator makes it
    /// master, and heartbeats through `network` until it shuts down.
    pub fn join(&self, link: CoordinatorLink, network: Network) {
        self.set_role(Role::Slave);
        let (tasks, shutdown) = self.tasks();
        let shared = Arc::downgrade(&self.shared);
        tasks.spawn(run(shared, link, network, shutdown.clone()));
    }

    /// Applies the coordinator's answer to a heartbeat.
    fn assign(&self, role: Role, epoch: Epoch) {
        let mut core = self.lock();
        // Only a master writes under the cluster's epoch; a slave keeps reporting the epoch of
        // its own log, so a coordinator that lost its state can tell whose log is the newest.
        if role == Role::Master && epoch > core.epoch {
            core.epoch = epoch;
        }
        if core.role != role {
            tracing::info!(
                cluster = %self.shared.config.cluster,
                server = %self.shared.config.server_id,
                role = role_name(role),
                %epoch,
                "role assigned by the coordinator"
            );
            self.change_role(&mut core, role);
        }
    }

    /// The heartbeat message; `claiming` is whether this server holds (or, having stepped down
    /// for lack of a coordinator, still claims) mastership.
    fn beat(&self, link: &CoordinatorLink, claiming: bool) -> ServerInfo {
        let log = self.positions();
        ServerInfo {
            server_id: self.shared.config.server_id.get() as i32,
            hostname: link.advertise_host.clone(),
            port: link.advertise_port.to_string(),
            r#type: role_name(log.role).to_string(),
            cluster_id: self.shared.config.cluster.get() as i32,
            is_master: claiming,
            epoch: log.epoch.0,
            node_role: node_role(log.role).into(),
            durable_index: log.durable.0,
            commit_index: log.commit.0,
            // Replication (and so a slave's acknowledged position) is not built yet.
            slave_acked_index: None,
        }
    }
}

async fn run(
    shared: std::sync::Weak<Shared>,
    link: CoordinatorLink,
    network: Network,
    shutdown: CancellationToken,
) {
    // One connection, re-established by the channel when it breaks; an attempt may take no
    // longer than a beat.
    let channel = match network.channel_with_timeout(&link.coordinator, link.interval) {
        Ok(channel) => channel,
        Err(e) => {
            tracing::error!(coordinator = %link.coordinator, "bad coordinator address: {e}");
            return;
        }
    };
    let mut rpc = CoordServiceClient::new(channel);
    let token = link
        .cluster_token
        .as_deref()
        .and_then(|t| MetadataValue::try_from(t).ok());
    let failure_timeout = link.interval * link.missed_heartbeats.max(1);
    let mut ticks = tokio::time::interval(link.interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_ok = Instant::now();
    let mut reachable = true;
    let mut claiming = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {},
        }
        let Some(server) = shared.upgrade().map(|shared| Server { shared }) else {
            return;
        };
        let mut request = tonic::Request::new(server.beat(&link, claiming));
        if let Some(token) = &token {
            request.metadata_mut().insert(TOKEN_METADATA, token.clone());
        }
        let answer = match tokio::time::timeout(link.interval, rpc.heartbeat(request)).await {
            Ok(Ok(reply)) => Ok(reply.into_inner()),
            Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
            Err(_) => Err("heartbeat timed out".to_string()),
        };
        match answer {
            Ok(confirmation) => {
                if !reachable {
                    tracing::info!(coordinator = %link.coordinator, "coordinator reachable again");
                }
                reachable = true;
                last_ok = Instant::now();
                let role = role_from_wire(confirmation.assigned_role).unwrap_or(
                    if confirmation.role == "master" {
                        Role::Master
                    } else {
                        Role::Slave
                    },
                );
                claiming = role == Role::Master;
                server.assign(role, Epoch(confirmation.epoch));
            }
            Err(why) => {
                if reachable {
                    tracing::warn!(coordinator = %link.coordinator, "heartbeat failed: {why}");
                }
                reachable = false;
                if server.role() == Role::Master && last_ok.elapsed() > failure_timeout {
                    tracing::warn!(
                        "coordinator unreachable for a whole failure timeout: stepping down"
                    );
                    server.set_role(Role::Slave);
                }
            }
        }
    }
}
