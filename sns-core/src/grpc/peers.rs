//! A joined server's calls to the rest of the deployment over gRPC: heartbeats to the
//! coordinator (`csce438.CoordService/Heartbeat`) and mirroring streams to its master
//! (`sns.v1.Replication/Mirror`). The server's core decides what to say and what an answer
//! means; this module only carries beats and answers across the wire.
//!
//! Invariant: an answer that names no well-formed master or slave names none; malformed
//! entries are left out, so nobody is admitted or mirrored on them.

use std::sync::Arc;
use std::time::Duration;

use sns_proto::csce438::coord_service_client::CoordServiceClient;
use sns_proto::csce438::{Confirmation, ServerInfo};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Code, Request};

use super::coord::{node_role, role_from_wire, role_name};
use super::metadata::with_token;
use crate::error::Result;
use crate::ids::{Epoch, Role, ServerId};
use crate::server::replication::{FromSlave, ListedSlave, MirrorTarget};
use crate::server::{Answer, Assigned, Beat, CoordinatorLink, MasterFeed, Peers, Server};
use crate::transport::{Network, address};

impl Server {
    /// Joins a deployment: the server refuses client writes until the coordinator makes it
    /// master, mirrors the master the coordinator names while it is slave, and heartbeats
    /// through `network` until it shuts down. Open it with [`Server::open_replica`].
    pub fn join(&self, link: CoordinatorLink, network: Network) {
        let peers = GrpcPeers::new(&link, network.clone());
        self.join_with(link, network, Arc::new(peers));
    }
}

/// [`Peers`] over gRPC on a [`Network`].
struct GrpcPeers {
    /// One channel to the coordinator, re-established when it breaks; an attempt to connect
    /// takes no longer than a beat. An address that cannot be used is the error.
    coordinator: std::result::Result<CoordServiceClient<Channel>, String>,
    coordinator_addr: String,
    network: Network,
    token: Option<String>,
}

impl GrpcPeers {
    fn new(link: &CoordinatorLink, network: Network) -> Self {
        let coordinator = network
            .channel_with_timeout(&link.coordinator, link.interval)
            .map(CoordServiceClient::new)
            .map_err(|e| format!("bad coordinator address {:?}: {e}", link.coordinator));
        Self {
            coordinator,
            coordinator_addr: link.coordinator.clone(),
            network,
            token: link.cluster_token.clone(),
        }
    }
}

#[tonic::async_trait]
impl Peers for GrpcPeers {
    async fn heartbeat(&self, beat: Beat, timeout: Duration) -> Answer<Assigned> {
        let mut rpc = match &self.coordinator {
            Ok(rpc) => rpc.clone(),
            Err(why) => return Answer::Refused(why.clone()),
        };
        let request = with_token(Request::new(beat_to_wire(beat)), self.token.as_deref());
        match tokio::time::timeout(timeout, rpc.heartbeat(request)).await {
            Ok(Ok(reply)) => answer_from_wire(reply.into_inner()),
            // A refusal no retry can change: this server is misconfigured.
            Ok(Err(status))
                if matches!(
                    status.code(),
                    Code::InvalidArgument | Code::Unauthenticated | Code::PermissionDenied
                ) =>
            {
                Answer::Refused(format!(
                    "the coordinator at {} refused this server: {}",
                    self.coordinator_addr,
                    status.message()
                ))
            }
            Ok(Err(status)) => Answer::Failed(format!("{:?}: {}", status.code(), status.message())),
            Err(_) => Answer::Failed("heartbeat timed out".to_string()),
        }
    }

    async fn mirror(
        &self,
        addr: &str,
        outbound: mpsc::Receiver<FromSlave>,
    ) -> Result<Box<dyn MasterFeed>> {
        let stream =
            super::replication::open(&self.network, addr, self.token.as_deref(), outbound).await?;
        Ok(Box::new(stream))
    }
}

/// A heartbeat in the course's `ServerInfo`, with this project's fields.
fn beat_to_wire(beat: Beat) -> ServerInfo {
    ServerInfo {
        server_id: beat.server.get() as i32,
        hostname: beat.host,
        port: beat.port.to_string(),
        r#type: role_name(beat.role).to_string(),
        cluster_id: beat.cluster.get() as i32,
        is_master: beat.claiming,
        epoch: beat.epoch.0,
        node_role: node_role(beat.role).into(),
        durable_index: beat.durable.0,
        commit_index: beat.commit.0,
        slave_acked_index: beat.in_sync.iter().map(|(_, acked)| acked.0).min(),
        in_sync_slaves: beat.in_sync.iter().map(|(s, _)| s.get()).collect(),
        failure: beat.failure.unwrap_or_default(),
    }
}

/// The coordinator's answer: the role (the typed field, or the course's string), the epoch,
/// the master and the slaves.
fn answer_from_wire(confirmation: Confirmation) -> Answer<Assigned> {
    let role =
        role_from_wire(confirmation.assigned_role).unwrap_or(if confirmation.role == "master" {
            Role::Master
        } else {
            Role::Slave
        });
    let assigned = Assigned {
        epoch: Epoch(confirmation.epoch),
        master: master_of(&confirmation),
        slaves: slaves_of(&confirmation),
    };
    Answer::Assigned(role, assigned)
}

/// The slaves a heartbeat answer lists (to a master).
fn slaves_of(confirmation: &Confirmation) -> Vec<ListedSlave> {
    confirmation
        .slaves
        .iter()
        .filter_map(|info| {
            let server = u32::try_from(info.server_id).ok().and_then(ServerId::new)?;
            let port = info.port.parse::<u16>().ok()?;
            (!info.hostname.is_empty()).then(|| ListedSlave {
                server,
                host: info.hostname.clone(),
                port,
            })
        })
        .collect()
}

/// The master named in a heartbeat answer, if any.
fn master_of(confirmation: &Confirmation) -> Option<MirrorTarget> {
    let server = u32::try_from(confirmation.master_server_id)
        .ok()
        .and_then(ServerId::new)?;
    let port = confirmation.master_port.parse::<u16>().ok()?;
    if confirmation.master_hostname.is_empty() {
        return None;
    }
    Some(MirrorTarget {
        server,
        addr: address(&confirmation.master_hostname, port),
    })
}
