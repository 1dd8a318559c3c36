//! The server's link to the coordinator: a heartbeat every interval, from the first second.
//!
//! The first heartbeat registers the server; each reply assigns its role, tells the cluster's
//! epoch, names the master a slave must mirror and lists the slaves a master may accept
//! mirroring sessions from. A master's beat names the slaves it counts as in sync; an answered
//! beat confirms that slaves left out of it are no longer counted. A master that has not
//! reached the coordinator for a whole failure timeout steps down (it may already have been
//! replaced) and stops claiming mastership, so it comes back, if at all, under a new epoch.
//! Beats go out early when something changed (a slave lost or in sync, a newer epoch, a
//! mirroring session the last answer does not vouch for), and four times as often while a
//! slave has no stream to its master, so a promotion reaches it quickly.
//!
//! Those decisions are plain values in module `policy` (stepped by each beat's fate, with the
//! time passed in, and tested without sockets or clocks); this file sends the beats and
//! carries the decisions out.

use std::sync::Arc;
use std::time::Duration;

use sns_proto::csce438::coord_service_client::CoordServiceClient;
use sns_proto::csce438::{Confirmation, ServerInfo};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::metadata::MetadataValue;

use super::replication::{ListedSlave, MirrorTarget, Roster, run_mirror};
use super::{Joined, Role, Server, Shared};
use crate::error::{Error, Result};
use crate::grpc::coord::{node_role, role_from_wire, role_name};
use crate::grpc::metadata::TOKEN as TOKEN_METADATA;
use crate::ids::{Epoch, ServerId};
use crate::transport::{Network, address};
use policy::{Answer, Decision, Heartbeats, Held};

mod policy;

/// How a server reaches and reports to its coordinator.
#[derive(Debug, Clone)]
pub struct CoordinatorLink {
    /// The coordinator's `host:port`.
    pub coordinator: String,
    /// The host clients should use to reach this server.
    pub advertise_host: String,
    /// The port clients should use to reach this server.
    pub advertise_port: u16,
    /// Time between heartbeats (default 500 ms; the course used 5 s).
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
            interval: crate::coordinator::DEFAULT_HEARTBEAT_INTERVAL,
            missed_heartbeats: 2,
            cluster_token: None,
        }
    }
}

impl Server {
    /// Joins a deployment: the server refuses client writes until the coordinator makes it
    /// master, mirrors the master the coordinator names while it is slave, and heartbeats
    /// through `network` until it shuts down. Open it with [`Server::open_replica`].
    pub fn join(&self, link: CoordinatorLink, network: Network) {
        self.set_role(Role::Slave);
        let _ = self.shared.joined.set(Joined {
            network: network.clone(),
            cluster_token: link.cluster_token.clone(),
        });
        let (tasks, shutdown) = self.tasks();
        let shared = Arc::downgrade(&self.shared);
        tasks.spawn(run_mirror(shared.clone(), shutdown.clone()));
        tasks.spawn(run(shared, link, network, shutdown.clone()));
    }

    /// Checks the cluster token presented by a peer server (mirroring).
    pub(crate) fn authorize_peer(&self, presented: Option<&str>) -> Result<()> {
        let Some(joined) = self.shared.joined.get() else {
            return Err(Error::Unavailable(
                "this server is standalone and has no slaves".to_string(),
            ));
        };
        crate::auth::check_token(joined.cluster_token.as_deref(), presented)
    }

    /// Applies the coordinator's answer to heartbeat number `beat`: the role, the epoch, the
    /// master to mirror (to a slave) and the slaves to accept mirroring from (to a master).
    fn assign(
        &self,
        role: Role,
        epoch: Epoch,
        master: Option<MirrorTarget>,
        slaves: Vec<ListedSlave>,
        beat: u64,
    ) {
        let mut core = self.lock();
        let held = Held {
            role: core.role,
            epoch: core.epoch,
            known_epoch: core.known_epoch,
        }
        .assigned(role, epoch);
        core.known_epoch = held.known_epoch;
        core.epoch = held.epoch;
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
        match role {
            Role::Master if held.vouched_by(epoch) => {
                if core.replicas.confirmed(beat, &*self.shared.storage) {
                    tracing::info!("the coordinator knows the lost slave is out of sync");
                }
                self.open_gate(&core);
            }
            Role::Master => {}
            Role::Slave => {
                let own = self.shared.config.server_id;
                let target = master.filter(|m| m.server != own);
                self.shared.mirror_target.send_if_modified(|current| {
                    if *current == target {
                        false
                    } else {
                        *current = target;
                        true
                    }
                });
            }
        }
        let slaves = if core.role == Role::Master {
            slaves
        } else {
            Vec::new()
        };
        self.shared
            .listed_slaves
            .send_replace(Roster { beat, slaves });
    }

    /// The heartbeat message and its number; `claiming` is whether this server holds
    /// mastership.
    fn beat(&self, link: &CoordinatorLink, claiming: bool) -> (ServerInfo, u64) {
        let (number, in_sync, failure) = {
            let mut core = self.lock();
            let (number, in_sync) = core.replicas.announce();
            (number, in_sync, core.failed.clone())
        };
        let log = self.positions();
        // A server that cannot serve claims nothing.
        let claiming = claiming && failure.is_none();
        let info = ServerInfo {
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
            slave_acked_index: in_sync.iter().map(|(_, acked)| acked.0).min(),
            in_sync_slaves: in_sync.iter().map(|(s, _)| s.get()).collect(),
            failure: failure.unwrap_or_default(),
        };
        (info, number)
    }

    /// Whether this server is a slave without a stream to its master.
    fn lost_master(&self) -> bool {
        let core = self.lock();
        core.role == Role::Slave && !core.mirroring
    }
}

/// The slaves a heartbeat answer lists (to a master); malformed entries are left out, so
/// nobody is admitted on them.
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

/// Heartbeats until shutdown: sends each beat, feeds its fate to [`Heartbeats`] and carries
/// out the decision.
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
    let start = Instant::now();
    let mut heartbeats = Heartbeats::new(link.interval, link.missed_heartbeats);
    loop {
        let Some((lost_master, early)) = shared.upgrade().map(|shared| {
            let server = Server { shared };
            (server.lost_master(), Arc::clone(&server.shared.beat_now))
        }) else {
            return;
        };
        let due = start + heartbeats.next_beat(lost_master);
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep_until(due) => {},
            () = early.notified() => {},
        }
        if shutdown.is_cancelled() {
            return;
        }
        heartbeats.sent(start.elapsed());
        let Some(server) = shared.upgrade().map(|shared| Server { shared }) else {
            return;
        };
        let (info, number) = server.beat(&link, heartbeats.claiming());
        let mut request = tonic::Request::new(info);
        if let Some(token) = &token {
            request.metadata_mut().insert(TOKEN_METADATA, token.clone());
        }
        let call = tokio::time::timeout(link.interval, rpc.heartbeat(request));
        // A stopping server says nothing more: in particular not that its slave left.
        let answer = tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            answer = call => answer_of(answer, &link.coordinator),
        };
        let decision = heartbeats.step(start.elapsed(), answer, server.role());
        if !server.carry_out(decision, number, &link.coordinator) {
            return;
        }
    }
}

/// What became of a heartbeat call.
fn answer_of(
    call: std::result::Result<
        std::result::Result<tonic::Response<Confirmation>, tonic::Status>,
        tokio::time::error::Elapsed,
    >,
    coordinator: &str,
) -> Answer<Confirmation> {
    match call {
        Ok(Ok(reply)) => {
            let confirmation = reply.into_inner();
            let role = role_from_wire(confirmation.assigned_role).unwrap_or(
                if confirmation.role == "master" {
                    Role::Master
                } else {
                    Role::Slave
                },
            );
            Answer::Assigned(role, confirmation)
        }
        // A refusal no retry can change: this server is misconfigured.
        Ok(Err(status))
            if matches!(
                status.code(),
                Code::InvalidArgument | Code::Unauthenticated | Code::PermissionDenied
            ) =>
        {
            Answer::Refused(format!(
                "the coordinator at {coordinator} refused this server: {}",
                status.message()
            ))
        }
        Ok(Err(status)) => Answer::Failed(format!("{:?}: {}", status.code(), status.message())),
        Err(_) => Answer::Failed("heartbeat timed out".to_string()),
    }
}

impl Server {
    /// Carries out what the heartbeat policy decided about the answer to beat `beat`.
    /// Returns whether heartbeats go on.
    fn carry_out(&self, decision: Decision<Confirmation>, beat: u64, coordinator: &str) -> bool {
        match decision {
            Decision::Assign {
                role,
                answer,
                regained,
            } => {
                if regained {
                    tracing::info!(coordinator, "coordinator reachable again");
                }
                let master = master_of(&answer);
                let slaves = slaves_of(&answer);
                self.assign(role, Epoch(answer.epoch), master, slaves, beat);
            }
            Decision::Unanswered { why, first } => {
                if first {
                    tracing::warn!(coordinator, "heartbeat failed: {why}");
                }
            }
            Decision::StepDown { why, first } => {
                if first {
                    tracing::warn!(coordinator, "heartbeat failed: {why}");
                }
                tracing::warn!(
                    "coordinator unreachable for a whole failure timeout: stepping down"
                );
                // It may come back as master, but only under a new epoch.
                self.set_role(Role::Slave);
            }
            Decision::GiveUp(why) => {
                self.give_up(why);
                return false;
            }
        }
        true
    }
}
