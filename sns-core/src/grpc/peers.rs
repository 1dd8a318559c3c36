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
    /// One channel to each coordinator of the group, re-established when it breaks; an
    /// attempt to connect takes no longer than a beat. An address that cannot be used is the
    /// error.
    coordinators: Vec<(
        String,
        std::result::Result<CoordServiceClient<Channel>, String>,
    )>,
    network: Network,
    token: Option<String>,
}

impl GrpcPeers {
    fn new(link: &CoordinatorLink, network: Network) -> Self {
        let coordinators = link
            .coordinators
            .iter()
            .map(|addr| {
                let rpc = network
                    .channel_with_timeout(addr, link.interval)
                    .map(CoordServiceClient::new)
                    .map_err(|e| format!("bad coordinator address {addr:?}: {e}"));
                (addr.clone(), rpc)
            })
            .collect();
        Self {
            coordinators,
            network,
            token: link.cluster_token.clone(),
        }
    }

    /// One heartbeat to the coordinator at `addr`.
    async fn beat_one(
        &self,
        addr: &str,
        rpc: &std::result::Result<CoordServiceClient<Channel>, String>,
        beat: Beat,
        timeout: Duration,
    ) -> Answer<Assigned> {
        let mut rpc = match rpc {
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
                    "the coordinator at {addr} refused this server: {}",
                    status.message()
                ))
            }
            Ok(Err(status)) => {
                Answer::Failed(format!("{addr}: {:?}: {}", status.code(), status.message()))
            }
            Err(_) => Answer::Failed(format!("{addr}: heartbeat timed out")),
        }
    }
}

/// One answer from the answers of a coordinator group to the same beat: the assignment under
/// the newest epoch (a master's over a slave's at the same epoch: no two coordinators name
/// different masters under one epoch, but one may not know the cluster's master yet); else a
/// refusal if every member refused; else a failure naming each member's.
fn merge(answers: Vec<Answer<Assigned>>) -> Answer<Assigned> {
    let mut best: Option<(Role, Assigned)> = None;
    let mut failures = Vec::new();
    let mut refusals = Vec::new();
    for answer in answers {
        match answer {
            Answer::Assigned(role, assigned) => {
                let rank = |role: Role, a: &Assigned| (a.epoch, role == Role::Master);
                if best
                    .as_ref()
                    .is_none_or(|(r, a)| rank(role, &assigned) > rank(*r, a))
                {
                    best = Some((role, assigned));
                }
            }
            Answer::Failed(why) => failures.push(why),
            Answer::Refused(why) => refusals.push(why),
        }
    }
    match best {
        Some((role, assigned)) => Answer::Assigned(role, assigned),
        None if failures.is_empty() => Answer::Refused(refusals.join("; ")),
        None => {
            failures.extend(refusals);
            Answer::Failed(failures.join("; "))
        }
    }
}

#[tonic::async_trait]
impl Peers for GrpcPeers {
    /// The beat goes to every coordinator of the group at once; see [`merge`].
    async fn heartbeat(&self, beat: Beat, timeout: Duration) -> Answer<Assigned> {
        let calls = self
            .coordinators
            .iter()
            .map(|(addr, rpc)| self.beat_one(addr, rpc, beat.clone(), timeout));
        merge(super::join_all(calls).await)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn assigned(role: Role, epoch: u64) -> Answer<Assigned> {
        Answer::Assigned(
            role,
            Assigned {
                epoch: Epoch(epoch),
                master: None,
                slaves: Vec::new(),
            },
        )
    }

    fn role_and_epoch(answer: &Answer<Assigned>) -> Option<(Role, u64)> {
        match answer {
            Answer::Assigned(role, a) => Some((*role, a.epoch.0)),
            _ => None,
        }
    }

    #[test]
    fn the_newest_epoch_wins_and_a_master_over_a_slave_at_the_same_epoch() {
        let failed = Answer::Failed("down".to_string());
        let merged = merge(vec![
            assigned(Role::Master, 3),
            failed.clone(),
            assigned(Role::Slave, 4),
        ]);
        assert_eq!(role_and_epoch(&merged), Some((Role::Slave, 4)));
        let merged = merge(vec![assigned(Role::Slave, 3), assigned(Role::Master, 3)]);
        assert_eq!(role_and_epoch(&merged), Some((Role::Master, 3)));
        let merged = merge(vec![failed, assigned(Role::Master, 2)]);
        assert_eq!(role_and_epoch(&merged), Some((Role::Master, 2)));
    }

    #[test]
    fn no_answer_is_a_failure_unless_every_member_refused() {
        let refused = Answer::Refused("wrong token".to_string());
        let failed = Answer::Failed("down".to_string());
        assert!(matches!(
            merge(vec![refused.clone(), refused.clone()]),
            Answer::Refused(_)
        ));
        match merge(vec![refused, failed]) {
            Answer::Failed(why) => assert!(why.contains("down") && why.contains("wrong token")),
            other => panic!("{other:?}"),
        }
    }
}
