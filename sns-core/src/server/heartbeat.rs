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
        core.known_epoch = core.known_epoch.max(epoch);
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
        match role {
            Role::Master if epoch == core.epoch => {
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
    let mut last_ok = Instant::now();
    let mut reachable = true;
    let mut claiming = false;
    let mut last_beat: Option<Instant> = None;
    loop {
        let Some((period, early)) = shared.upgrade().map(|shared| {
            let server = Server { shared };
            let period = if server.lost_master() {
                link.interval / 4
            } else {
                link.interval
            };
            (period, Arc::clone(&server.shared.beat_now))
        }) else {
            return;
        };
        let due = last_beat.map_or_else(Instant::now, |t| t + period);
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep_until(due) => {},
            () = early.notified() => {},
        }
        if shutdown.is_cancelled() {
            return;
        }
        last_beat = Some(Instant::now());
        let Some(server) = shared.upgrade().map(|shared| Server { shared }) else {
            return;
        };
        let (info, number) = server.beat(&link, claiming);
        let mut request = tonic::Request::new(info);
        if let Some(token) = &token {
            request.metadata_mut().insert(TOKEN_METADATA, token.clone());
        }
        let call = tokio::time::timeout(link.interval, rpc.heartbeat(request));
        // A stopping server says nothing more: in particular not that its slave left.
        let answer = match tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            answer = call => answer,
        } {
            Ok(Ok(reply)) => Ok(reply.into_inner()),
            // A refusal no retry can change: this server is misconfigured.
            Ok(Err(status))
                if matches!(
                    status.code(),
                    Code::InvalidArgument | Code::Unauthenticated | Code::PermissionDenied
                ) =>
            {
                server.give_up(format!(
                    "the coordinator at {} refused this server: {}",
                    link.coordinator,
                    status.message()
                ));
                return;
            }
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
                let master = master_of(&confirmation);
                let slaves = slaves_of(&confirmation);
                server.assign(role, Epoch(confirmation.epoch), master, slaves, number);
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
                    // It may come back as master, but only under a new epoch.
                    claiming = false;
                }
            }
        }
    }
}
