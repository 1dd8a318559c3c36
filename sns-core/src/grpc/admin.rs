//! The typed admin client: the coordinator's `sns.v1.Admin` service (its view of the
//! deployment, as `sns status` shows it) as an async method returning typed rows.
//!
//! Invariants:
//! - The reply is read here once: the wire's role enum becomes a [`Role`] (or none, for a
//!   synchronizer), milliseconds become [`Duration`]s, positions become [`Epoch`]s and
//!   [`LogIndex`]es, and an empty failure reason becomes `None`.
//! - The cluster token goes on every call the one way the crate has (`metadata::with_token`),
//!   and a refusal comes back through the crate's one mapping as
//!   [`Error::Unauthorized`](crate::Error::Unauthorized).
//! - Replies up to [`MAX_STATUS_REPLY`] are accepted: a full table of the largest deployment.

use std::time::Duration;

use sns_proto::sns_v1::admin_client::AdminClient as AdminRpc;
use sns_proto::sns_v1::{self as wire, StatusRequest};
use tonic::transport::Channel;

use super::coord::role_from_wire;
use super::metadata::with_token;
use super::{self as grpc, Asked};
use crate::coordinator::MAX_STATUS_REPLY;
use crate::error::Result;
use crate::ids::{Epoch, LogIndex, Role};
use crate::transport::Network;

/// A handle on the coordinator's admin service, presenting the cluster token (if any) on every
/// call.
#[derive(Debug, Clone)]
pub struct AdminClient {
    rpc: AdminRpc<Channel>,
    token: Option<String>,
}

impl AdminClient {
    /// A handle on the coordinator at `addr` (`host:port`), connected now (fails with
    /// [`Error::Unreachable`](crate::Error::Unreachable) if it cannot be reached).
    pub async fn connect(network: &Network, addr: &str, token: Option<String>) -> Result<Self> {
        let channel = network.connect(addr).await?;
        Ok(Self {
            rpc: AdminRpc::new(channel).max_decoding_message_size(MAX_STATUS_REPLY),
            token,
        })
    }

    /// The coordinator's view of the deployment. A coordinator that wants a token this handle
    /// lacks, or refuses the one it presents, answers
    /// [`Error::Unauthorized`](crate::Error::Unauthorized).
    pub async fn status(&self) -> Result<DeploymentStatus> {
        let request = with_token(tonic::Request::new(StatusRequest {}), self.token.as_deref());
        let reply = self
            .rpc
            .clone()
            .status(request)
            .await
            .map_err(|s| grpc::error(&s, Asked::Peer))?
            .into_inner();
        Ok(DeploymentStatus::from(reply))
    }
}

/// The coordinator's view of the deployment: its timing and every node it knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentStatus {
    /// Number of clusters.
    pub clusters: u32,
    /// Time between heartbeats.
    pub heartbeat_interval: Duration,
    /// Silence after which a node counts as dead.
    pub failure_timeout: Duration,
    /// Every registered server and synchronizer.
    pub nodes: Vec<NodeStatus>,
    /// The answering coordinator's name in its group.
    pub coordinator: String,
    /// Where it keeps the clusters' roles: `memory` (alone) or `etcd` (a group).
    pub routing_store: String,
    /// Whether it leads its group (detects failures and promotes).
    pub leading: bool,
    /// Whether it read its store within a failure timeout (else it answers no heartbeat).
    pub store_fresh: bool,
}

/// One registered server or synchronizer as the coordinator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// Its cluster's number.
    pub cluster: u32,
    /// Server id in its cluster, or synchronizer id for synchronizers.
    pub id: u32,
    /// `Some(role)` for servers, `None` for synchronizers.
    pub role: Option<Role>,
    /// Where it is reached, `host:port`.
    pub addr: String,
    /// Time since its last heartbeat.
    pub since_heartbeat: Duration,
    /// Whether it is alive.
    pub alive: bool,
    /// Its cluster's epoch.
    pub epoch: Epoch,
    /// The epoch of its own log, as it last reported it.
    pub log_epoch: Epoch,
    /// The last entry durable on it, from its last heartbeat (servers only).
    pub durable: LogIndex,
    /// The last committed entry, from its last heartbeat (servers only).
    pub commit: LogIndex,
    /// For a master with a slave: the last entry the slave acknowledged as durable.
    pub slave_acked: Option<LogIndex>,
    /// For a slave: whether its master counts it for the commit point (only such a slave may
    /// be promoted).
    pub in_sync: bool,
    /// Why it cannot serve (its storage failed), as it last reported.
    pub failure: Option<String>,
}

impl From<wire::StatusReply> for DeploymentStatus {
    fn from(reply: wire::StatusReply) -> Self {
        Self {
            clusters: reply.clusters,
            heartbeat_interval: Duration::from_millis(reply.heartbeat_interval_ms),
            failure_timeout: Duration::from_millis(reply.failure_timeout_ms),
            nodes: reply.nodes.into_iter().map(NodeStatus::from).collect(),
            coordinator: reply.coordinator,
            routing_store: reply.routing_store,
            leading: reply.leading,
            store_fresh: reply.store_fresh,
        }
    }
}

impl From<wire::NodeStatus> for NodeStatus {
    fn from(node: wire::NodeStatus) -> Self {
        Self {
            cluster: node.cluster,
            id: node.server,
            role: role_from_wire(node.node_role),
            addr: format!("{}:{}", node.hostname, node.port),
            since_heartbeat: Duration::from_millis(node.last_heartbeat_ms),
            alive: node.alive,
            epoch: Epoch(node.epoch),
            log_epoch: Epoch(node.log_epoch),
            durable: LogIndex(node.durable_index),
            commit: LogIndex(node.commit_index),
            slave_acked: node.slave_acked_index.map(LogIndex),
            in_sync: node.in_sync,
            failure: Some(node.failure).filter(|f| !f.is_empty()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sns_proto::csce438::NodeRole;

    #[test]
    fn a_reply_reads_as_typed_rows() {
        let reply = wire::StatusReply {
            clusters: 2,
            nodes: vec![
                wire::NodeStatus {
                    cluster: 1,
                    server: 2,
                    role: "slave".to_string(),
                    hostname: "127.0.0.1".to_string(),
                    port: "10001".to_string(),
                    last_heartbeat_ms: 300,
                    alive: true,
                    epoch: 3,
                    node_role: NodeRole::Slave.into(),
                    log_epoch: 2,
                    durable_index: 40,
                    commit_index: 39,
                    slave_acked_index: None,
                    in_sync: true,
                    failure: String::new(),
                },
                wire::NodeStatus {
                    node_role: NodeRole::Synchronizer.into(),
                    failure: "gone".to_string(),
                    ..wire::NodeStatus::default()
                },
            ],
            heartbeat_interval_ms: 500,
            failure_timeout_ms: 1000,
            coordinator: "c2".to_string(),
            routing_store: "etcd".to_string(),
            leading: false,
            store_fresh: true,
        };
        let status = DeploymentStatus::from(reply);
        assert_eq!(
            (status.coordinator.as_str(), status.routing_store.as_str()),
            ("c2", "etcd")
        );
        assert!(!status.leading && status.store_fresh);
        assert_eq!(status.heartbeat_interval, Duration::from_millis(500));
        assert_eq!(status.failure_timeout, Duration::from_secs(1));
        let slave = &status.nodes[0];
        assert_eq!(slave.role, Some(Role::Slave));
        assert_eq!(slave.addr, "127.0.0.1:10001");
        assert_eq!((slave.durable, slave.commit), (LogIndex(40), LogIndex(39)));
        assert_eq!(slave.failure, None);
        let sync = &status.nodes[1];
        assert_eq!(sync.role, None);
        assert_eq!(sync.failure.as_deref(), Some("gone"));
    }
}
