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

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::replication::{FromSlave, ListedSlave, MirrorTarget, Roster, ToSlave, run_mirror};
use super::{Joined, Role, Server, Shared};
use crate::error::{Error, Result};
use crate::ids::{ClusterId, Epoch, LogIndex, ServerId};
use crate::transport::Network;
pub(crate) use policy::Answer;
use policy::{Decision, Heartbeats, Held};

mod policy;

/// How a server reaches and reports to its coordinator.
///
/// Non-exhaustive, so that fields can be added later: build it with [`CoordinatorLink::new`] and
/// set the fields you need.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CoordinatorLink {
    /// The coordinators' `host:port`s: one, or every member of a group (each beat goes to
    /// all of them; a master keeps serving while any answers it under its epoch).
    pub coordinators: Vec<String>,
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
    /// A link to the coordinator (or group) at `coordinator` (one `host:port`, or several
    /// separated by commas), with the default timing and no token.
    pub fn new(
        coordinator: impl Into<String>,
        advertise_host: impl Into<String>,
        port: u16,
    ) -> Self {
        let coordinator = coordinator.into();
        let coordinators =
            crate::coordinator::group_addrs(&coordinator).unwrap_or_else(|_| vec![coordinator]);
        Self {
            coordinators,
            advertise_host: advertise_host.into(),
            advertise_port: port,
            interval: crate::coordinator::DEFAULT_HEARTBEAT_INTERVAL,
            missed_heartbeats: 2,
            cluster_token: None,
        }
    }
}

/// A heartbeat as this server reports it to the coordinator.
#[derive(Debug, Clone)]
pub(crate) struct Beat {
    /// The reporting server.
    pub(crate) cluster: ClusterId,
    /// Its id in its cluster.
    pub(crate) server: ServerId,
    /// Where clients reach it.
    pub(crate) host: String,
    /// Its port for clients.
    pub(crate) port: u16,
    /// Its role.
    pub(crate) role: Role,
    /// Whether it holds mastership (a master that stepped down, or failed, does not).
    pub(crate) claiming: bool,
    /// The epoch of its log.
    pub(crate) epoch: Epoch,
    /// The last entry durable in its storage.
    pub(crate) durable: LogIndex,
    /// The last committed entry.
    pub(crate) commit: LogIndex,
    /// On a master: the slaves counted as in sync, with what each acknowledged as durable.
    pub(crate) in_sync: Vec<(ServerId, LogIndex)>,
    /// Why it cannot serve, if it cannot.
    pub(crate) failure: Option<String>,
}

/// The coordinator's answer to a heartbeat, beyond the role: the cluster's epoch, the master
/// a slave must mirror, and the slaves a master may accept mirroring from.
#[derive(Debug, Clone)]
pub(crate) struct Assigned {
    /// The cluster's epoch.
    pub(crate) epoch: Epoch,
    /// The master to mirror (to a slave).
    pub(crate) master: Option<MirrorTarget>,
    /// The slaves the coordinator lists for the cluster (to a master).
    pub(crate) slaves: Vec<ListedSlave>,
}

/// A slave's stream of messages from its master.
#[async_trait::async_trait]
pub(crate) trait MasterFeed: Send {
    /// The next message; `None` when the master ended the stream.
    async fn recv(&mut self) -> Option<Result<ToSlave>>;
}

/// What a server of a deployment needs from the network, provided by the wire layer when it
/// joins: its heartbeat to the coordinator, and a mirroring stream to its master.
#[async_trait::async_trait]
pub(crate) trait Peers: Send + Sync {
    /// Sends one heartbeat and waits at most `timeout` for the answer.
    async fn heartbeat(&self, beat: Beat, timeout: Duration) -> Answer<Assigned>;

    /// Opens a mirroring stream to the master at `addr`, sending what `outbound` yields.
    async fn mirror(
        &self,
        addr: &str,
        outbound: mpsc::Receiver<FromSlave>,
    ) -> Result<Box<dyn MasterFeed>>;
}

impl Server {
    /// Joins a deployment through `peers`: the server refuses client writes until the
    /// coordinator makes it master, mirrors the master the coordinator names while it is
    /// slave, and heartbeats until it shuts down. (The public `join` that reaches peers over
    /// gRPC is the wire layer's.)
    pub(crate) fn join_with(&self, link: CoordinatorLink, network: Network, peers: Arc<dyn Peers>) {
        self.set_role(Role::Slave);
        let _ = self.shared.joined.set(Joined {
            network,
            cluster_token: link.cluster_token.clone(),
            peers: Arc::clone(&peers),
        });
        let (tasks, shutdown) = self.tasks();
        let shared = Arc::downgrade(&self.shared);
        tasks.spawn(run_mirror(shared.clone(), shutdown.clone()));
        tasks.spawn(run(shared, link, peers, shutdown.clone()));
    }

    /// Checks the cluster token presented by a peer server (mirroring).
    pub(crate) fn authorize_peer(&self, presented: Option<&str>) -> Result<()> {
        let Some(joined) = self.shared.joined.get() else {
            return Err(Error::PermissionDenied(
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
                role = role.name(),
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
    fn beat(&self, link: &CoordinatorLink, claiming: bool) -> (Beat, u64) {
        let (number, in_sync, failure) = {
            let mut core = self.lock();
            let (number, in_sync) = core.replicas.announce();
            (number, in_sync, core.failed.clone())
        };
        let log = self.positions();
        // A server that cannot serve claims nothing.
        let claiming = claiming && failure.is_none();
        let beat = Beat {
            cluster: self.shared.config.cluster,
            server: self.shared.config.server_id,
            host: link.advertise_host.clone(),
            port: link.advertise_port,
            role: log.role,
            claiming,
            epoch: log.epoch,
            durable: log.durable,
            commit: log.commit,
            in_sync,
            failure,
        };
        (beat, number)
    }

    /// Whether this server is a slave without a stream to its master.
    fn lost_master(&self) -> bool {
        let core = self.lock();
        core.role == Role::Slave && !core.mirroring
    }
}

/// Heartbeats until shutdown: sends each beat, feeds its fate to [`Heartbeats`] and carries
/// out the decision.
async fn run(
    shared: std::sync::Weak<Shared>,
    link: CoordinatorLink,
    peers: Arc<dyn Peers>,
    shutdown: CancellationToken,
) {
    let start = Instant::now();
    let mut heartbeats = Heartbeats::new(link.interval, link.missed_heartbeats);
    // For the logs: who the beats go to.
    let coordinators = link.coordinators.join(",");
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
        let (beat, number) = server.beat(&link, heartbeats.claiming());
        let call = peers.heartbeat(beat, link.interval);
        // A stopping server says nothing more: in particular not that its slave left.
        let answer = tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            answer = call => answer,
        };
        let decision = heartbeats.step(start.elapsed(), answer, server.role());
        if !server.carry_out(decision, number, &coordinators) {
            return;
        }
    }
}

impl Server {
    /// Carries out what the heartbeat policy decided about the answer to beat `beat`.
    /// Returns whether heartbeats go on.
    fn carry_out(&self, decision: Decision<Assigned>, beat: u64, coordinator: &str) -> bool {
        match decision {
            Decision::Assign {
                role,
                answer,
                regained,
            } => {
                if regained {
                    tracing::info!(coordinator, "coordinator reachable again");
                }
                self.assign(role, answer.epoch, answer.master, answer.slaves, beat);
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
