//! The routing table and failure detector: pure, driven by heartbeats and explicit times.
//!
//! Invariants:
//! - a node is alive while its last heartbeat is at most `missed_heartbeats` intervals old;
//! - a (cluster, server) slot alive at one address cannot be taken over from another address;
//! - each cluster has at most one master; a master stays master while alive;
//! - every master is named under a new epoch, including a master that restarted or stepped
//!   down (it no longer claims mastership): one epoch, one master process, which is what lets
//!   a rejoining server find where its log diverged;
//! - when the master is dead, only a live slave in the master's last reported in-sync set is
//!   promoted (it holds every committed entry); with none, the cluster stays without a master
//!   (unavailable, never losing a committed change) until the old master returns, unless
//!   `allow_unclean_promotion` is set, which promotes the live server with the most recent log
//!   and says so loudly;
//! - the coordinator's state is soft: after a restart, the first heartbeat of a server that
//!   claims mastership with the highest epoch seen re-establishes it (never over a live master);
//!   servers that claim nothing wait one heartbeat interval after the coordinator started and
//!   after their cluster was first heard from (the election window, so every server that came
//!   up with them has spoken), after which only the one with the most recent log (highest
//!   epoch, then longest durable log, then lowest server id) may become master. So servers
//!   started together with no data elect server 1, whichever spoke first. Servers report
//!   the epoch of their own log, not the epoch they were told;
//! - the table is bounded: servers register only in a configured slot (cluster
//!   `1..=clusters`, server `1..=servers`), at most [`SYNCHRONIZERS_PER_CLUSTER`]
//!   synchronizers per cluster, and a node dead for [`FORGET_AFTER_TIMEOUTS`] failure timeouts
//!   is forgotten. Forgetting drops only the node's entry (its address and last report), never
//!   its cluster's roles: the epoch, the master's id and the in-sync set stay, so a forgotten
//!   master is treated exactly as a dead one (only an in-sync slave may replace it, and it is
//!   master again if it returns first).
//!
//! How one heartbeat moves a cluster's roles is in `table/roles.rs`; the configuration and the
//! types the table takes and reports are in `table/types.rs`.

use std::collections::BTreeMap;

use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::ids::Role;
use crate::ids::{ClusterId, Epoch, ServerId, UserId};

mod roles;
mod types;

use super::store::{Revision, RolesRecord, StoredRoles};
use roles::ClusterRoles;
pub use types::{
    Address, Assignment, Beat, DEFAULT_HEARTBEAT_INTERVAL, FORGET_AFTER_TIMEOUTS, NodeView,
    ReportedLog, RoutingConfig, SYNCHRONIZERS_PER_CLUSTER,
};

/// What a heartbeat calls for (see [`RoutingTable::judge`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Answer the beat with this.
    Answer(Assignment),
    /// Write `record` as `cluster`'s roles over revision `expected`, install it, then answer
    /// with `assignment`; if the write fails, the beat gets no answer.
    Write {
        /// The cluster whose roles change.
        cluster: ClusterId,
        /// The revision of the record the change was judged on.
        expected: Revision,
        /// The new roles.
        record: RolesRecord,
        /// The answer once they are written.
        assignment: Assignment,
    },
}

#[derive(Debug, Clone)]
struct Node {
    addr: Address,
    last_beat: Instant,
    epoch: Epoch,
    log: ReportedLog,
    failure: Option<String>,
}

/// The coordinator's soft state.
#[derive(Debug, Clone)]
pub struct RoutingTable {
    config: RoutingConfig,
    started: Instant,
    /// When each cluster was first heard from (its election window opens then).
    first_heard: BTreeMap<ClusterId, Instant>,
    servers: BTreeMap<(ClusterId, ServerId), Node>,
    syncs: BTreeMap<u32, Node>,
    roles: BTreeMap<ClusterId, ClusterRoles>,
    /// When nodes dead too long were last forgotten.
    last_forgotten: Instant,
    /// Heartbeats taken since the table was made.
    heartbeats: u64,
}

impl RoutingTable {
    /// An empty table, as of `now`.
    pub fn new(config: RoutingConfig, now: Instant) -> Self {
        Self {
            config: RoutingConfig {
                clusters: config.clusters.max(1),
                servers: config.servers.max(1),
                ..config
            },
            started: now,
            first_heard: BTreeMap::new(),
            servers: BTreeMap::new(),
            syncs: BTreeMap::new(),
            roles: BTreeMap::new(),
            last_forgotten: now,
            heartbeats: 0,
        }
    }

    /// Heartbeats taken since the table was made.
    pub fn heartbeats(&self) -> u64 {
        self.heartbeats
    }

    /// Masters named in place of a dead one since the table was made, per cluster.
    pub fn promotions(&self) -> BTreeMap<ClusterId, u64> {
        self.roles
            .iter()
            .map(|(cluster, roles)| (*cluster, roles.promotions))
            .collect()
    }

    /// The epoch of `cluster`'s roles as this table holds them (0 before any master).
    pub fn epoch(&self, cluster: ClusterId) -> Epoch {
        self.roles
            .get(&cluster)
            .map(|r| r.epoch)
            .unwrap_or_default()
    }

    /// The table's configuration.
    pub fn config(&self) -> RoutingConfig {
        self.config
    }

    /// Whether `node` has spoken within the failure timeout and reports no failure: only such
    /// a node is routed to, mirrored or named master.
    fn alive(&self, node: &Node, now: Instant) -> bool {
        self.speaking(node, now) && node.failure.is_none()
    }

    /// Whether `node` has spoken within the failure timeout (healthy or not).
    fn speaking(&self, node: &Node, now: Instant) -> bool {
        now.saturating_duration_since(node.last_beat) <= self.config.failure_timeout()
    }

    /// Checks that `cluster` is a cluster of this deployment.
    pub fn check_cluster(&self, cluster: i64) -> Result<ClusterId> {
        u32::try_from(cluster)
            .ok()
            .filter(|c| (1..=self.config.clusters).contains(c))
            .and_then(ClusterId::new)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "cluster id {cluster} is outside 1..={}",
                    self.config.clusters
                ))
            })
    }

    /// Drops the entries of nodes dead for [`RoutingConfig::forget_after`] (at most once per
    /// heartbeat interval, so a busy coordinator does not scan its table on every beat).
    /// Cluster roles and epochs are kept.
    fn forget_the_long_dead(&mut self, now: Instant) {
        if now.saturating_duration_since(self.last_forgotten) < self.config.heartbeat_interval {
            return;
        }
        self.last_forgotten = now;
        let horizon = self.config.forget_after();
        let keep = |node: &Node| now.saturating_duration_since(node.last_beat) <= horizon;
        self.servers.retain(|(cluster, server), node| {
            let kept = keep(node);
            if !kept {
                tracing::info!(%cluster, %server, addr = %node.addr, "dead server forgotten");
            }
            kept
        });
        self.syncs.retain(|id, node| {
            let kept = keep(node);
            if !kept {
                tracing::info!(sync = id, addr = %node.addr, "dead synchronizer forgotten");
            }
            kept
        });
    }

    /// Checks that `server` is a server slot of this deployment.
    fn check_server(&self, server: ServerId) -> Result<()> {
        if server.get() > self.config.servers {
            return Err(Error::invalid(format!(
                "server id {server} is outside 1..={} (the servers per cluster this coordinator \
                 was configured with)",
                self.config.servers
            )));
        }
        Ok(())
    }

    /// Records a server's heartbeat (the first one registers it) and returns its role, changing
    /// the cluster's roles at once where the beat calls for it: the table as the only
    /// coordinator with its own store. [`Coordinator`](super::Coordinator) goes through
    /// [`RoutingTable::judge`] and its store instead.
    pub fn heartbeat(&mut self, beat: Beat, now: Instant) -> Result<Assignment> {
        match self.judge(beat, now, true)? {
            Verdict::Answer(assignment) => Ok(assignment),
            Verdict::Write {
                cluster,
                expected,
                record,
                assignment,
            } => {
                self.install(StoredRoles {
                    cluster,
                    record,
                    revision: expected + 1,
                });
                Ok(assignment)
            }
        }
    }

    /// Records a server's heartbeat (the first one registers it) and judges what it calls for.
    /// The cluster's roles are never changed here: when the beat calls for a change, a
    /// `leading` coordinator gets [`Verdict::Write`] (write the record, then
    /// [`RoutingTable::install`] it and answer); any other answers from the roles as recorded,
    /// or fails with [`Error::Unavailable`] where only the leader could answer (see
    /// `ClusterRoles::unchanged_answer`).
    pub fn judge(&mut self, beat: Beat, now: Instant, leading: bool) -> Result<Verdict> {
        self.check_cluster(i64::from(beat.cluster.get()))?;
        self.check_server(beat.server)?;
        self.check_in_sync(&beat)?;
        self.heartbeats += 1;
        self.forget_the_long_dead(now);
        self.register_server(&beat, now)?;
        let cluster = beat.cluster;
        let before = self.roles.get(&cluster).cloned().unwrap_or_default();
        if let Some(why) = &beat.failure {
            // A server that cannot serve is a slave, whatever it claims; if it was master, the
            // next beat of an in-sync slave promotes that slave (the master counts as dead).
            tracing::warn!(%cluster, server = %beat.server, "server reports a failure: {why}");
            return Ok(Verdict::Answer(Assignment {
                role: Role::Slave,
                epoch: before.epoch,
            }));
        }
        let role = self.decide(&beat, now)?;
        let after = self
            .roles
            .insert(cluster, before.clone())
            .unwrap_or_default();
        let record = after.record();
        let assignment = Assignment {
            role,
            epoch: after.epoch,
        };
        if record == before.record() {
            return Ok(Verdict::Answer(assignment));
        }
        if leading {
            return Ok(Verdict::Write {
                cluster,
                expected: before.revision,
                record,
                assignment,
            });
        }
        Ok(Verdict::Answer(Assignment {
            role: before.unchanged_answer(&beat)?,
            epoch: before.epoch,
        }))
    }

    /// The role `beat` gets, moving its cluster's roles as the rules say.
    fn decide(&mut self, beat: &Beat, now: Instant) -> Result<Role> {
        let heard_all = self.election_window_closed(beat.cluster, now);
        let best = self.most_recent_log(beat.cluster, now) == Some(beat.server);
        let live_master = self.live_master(beat.cluster, now).map(|(s, _)| s);
        // A master this table never heard from is dead only once it had a whole failure timeout
        // to beat to this coordinator (one that just started, with roles from its store).
        let recorded_master = self.roles.get(&beat.cluster).and_then(|r| r.master);
        let unheard = recorded_master
            .is_some_and(|m| !self.servers.contains_key(&(beat.cluster, m)))
            && now.saturating_duration_since(self.started) <= self.config.failure_timeout();
        let unclean = self.config.allow_unclean_promotion;
        let roles = self.roles.entry(beat.cluster).or_default();
        match roles.master {
            Some(master) if master == beat.server => roles.master_beat(beat),
            Some(master) if live_master == Some(master) || unheard => Ok(Role::Slave),
            Some(_) => roles.replace_dead_master(beat, unclean && best),
            None => roles.without_master(beat, heard_all && best),
        }
    }

    /// Takes a cluster's roles as its stored record says, unless the table already holds that
    /// revision or a newer one.
    pub fn install(&mut self, stored: StoredRoles) {
        let before = self.roles.get(&stored.cluster).cloned().unwrap_or_default();
        if stored.revision <= before.revision {
            return;
        }
        tell_change(stored.cluster, &before.record(), &stored.record);
        self.roles.insert(
            stored.cluster,
            ClusterRoles::stored(stored.record, stored.revision),
        );
    }

    /// Checks what a beat says of its in-sync slaves: server slots of this deployment, not the
    /// beating server itself (it would become the cluster's durable record).
    fn check_in_sync(&self, beat: &Beat) -> Result<()> {
        for slave in &beat.in_sync {
            self.check_server(*slave)?;
            if *slave == beat.server {
                return Err(Error::invalid(format!(
                    "server {} counts itself among its in-sync slaves",
                    beat.server
                )));
            }
        }
        Ok(())
    }

    /// Records the node that sent `beat`, refusing it while another address holds its slot
    /// and still speaks.
    fn register_server(&mut self, beat: &Beat, now: Instant) -> Result<()> {
        let key = (beat.cluster, beat.server);
        if let Some(node) = self.servers.get(&key)
            && node.addr != beat.addr
            && self.speaking(node, now)
        {
            return Err(Error::Conflict(format!(
                "server {} of cluster {} is alive at {}; {} cannot take its place",
                beat.server, beat.cluster, node.addr, beat.addr
            )));
        }
        self.servers.insert(
            key,
            Node {
                addr: beat.addr.clone(),
                last_beat: now,
                epoch: beat.epoch,
                log: beat.log,
                failure: beat.failure.clone(),
            },
        );
        Ok(())
    }

    /// Whether `cluster`'s election window has closed (its first beat is recorded now if it
    /// had none): one interval after the coordinator started and after the cluster's first
    /// server was heard, every server that came up with it has spoken once, so the best of them
    /// (the lowest id among equal logs) is chosen, not the first to speak.
    fn election_window_closed(&mut self, cluster: ClusterId, now: Instant) -> bool {
        let first_heard = *self.first_heard.entry(cluster).or_insert(now);
        let window_opened = first_heard.max(self.started);
        now.saturating_duration_since(window_opened) >= self.config.heartbeat_interval
    }

    /// The live server of `cluster` whose log is the most recent: highest epoch, then longest
    /// durable log, then lowest server id.
    fn most_recent_log(&self, cluster: ClusterId, now: Instant) -> Option<ServerId> {
        self.servers_of(cluster)
            .filter(|(_, n)| self.alive(n, now))
            .max_by_key(|(s, n)| (n.epoch, n.log.durable, std::cmp::Reverse(*s)))
            .map(|(s, _)| s)
    }

    /// The registered servers of `cluster`, by id.
    fn servers_of(&self, cluster: ClusterId) -> impl Iterator<Item = (ServerId, &Node)> {
        ServerId::new(1)
            .map(|first| self.servers.range((cluster, first)..))
            .into_iter()
            .flatten()
            .take_while(move |((c, _), _)| *c == cluster)
            .map(|((_, s), node)| (*s, node))
    }

    /// The live master of `cluster` and its address, for a slave to mirror.
    pub fn mirror_source(&self, cluster: ClusterId, now: Instant) -> Option<(ServerId, Address)> {
        self.live_master(cluster, now)
            .map(|(s, addr)| (s, addr.clone()))
    }

    /// The servers of `cluster` other than its master, each at the address it registered
    /// with, by id: the servers the master accepts mirroring sessions from. A registered slave
    /// is listed until it is forgotten, dead or not (it may still reach the master).
    pub fn slaves_of(&self, cluster: ClusterId) -> Vec<(ServerId, Address)> {
        let master = self.roles.get(&cluster).and_then(|r| r.master);
        self.servers_of(cluster)
            .filter(|(s, _)| Some(*s) != master)
            .map(|(s, node)| (s, node.addr.clone()))
            .collect()
    }

    /// Records a synchronizer's registration or heartbeat.
    pub fn register_sync(&mut self, id: i64, addr: Address, now: Instant) -> Result<ClusterId> {
        let id = positive(id, "synchronizer id")?;
        self.forget_the_long_dead(now);
        match self.syncs.get(&id) {
            Some(node) if node.addr != addr && self.alive(node, now) => {
                return Err(Error::Conflict(format!(
                    "synchronizer {id} is alive at {}; {addr} cannot take its place",
                    node.addr
                )));
            }
            Some(_) => {}
            None => self.make_room_for_sync(id, now)?,
        }
        self.syncs.insert(
            id,
            Node {
                addr,
                last_beat: now,
                epoch: Epoch(0),
                log: ReportedLog::default(),
                failure: None,
            },
        );
        Ok(self.cluster_of_sync(id))
    }

    /// Before a new synchronizer `id` registers: if its cluster already has
    /// [`SYNCHRONIZERS_PER_CLUSTER`], forgets the one dead longest, or refuses when all live.
    fn make_room_for_sync(&mut self, id: u32, now: Instant) -> Result<()> {
        let cluster = self.cluster_of_sync(id);
        let same_cluster: Vec<(u32, &Node)> = self
            .syncs
            .iter()
            .filter(|(other, _)| self.cluster_of_sync(**other) == cluster)
            .map(|(other, node)| (*other, node))
            .collect();
        if same_cluster.len() < SYNCHRONIZERS_PER_CLUSTER {
            return Ok(());
        }
        let longest_dead = same_cluster
            .iter()
            .filter(|(_, node)| !self.alive(node, now))
            .min_by_key(|(_, node)| node.last_beat)
            .map(|(other, _)| *other);
        match longest_dead {
            Some(dead) => {
                self.syncs.remove(&dead);
                tracing::info!(
                    sync = dead,
                    replaced_by = id,
                    "dead synchronizer forgotten to make room"
                );
                Ok(())
            }
            None => Err(Error::Full(format!(
                "cluster {cluster} already has {SYNCHRONIZERS_PER_CLUSTER} live synchronizers; \
                 synchronizer {id} is not registered"
            ))),
        }
    }

    fn cluster_of_sync(&self, id: u32) -> ClusterId {
        let n = self.config.clusters;
        ClusterId::new((id - 1) % n + 1).unwrap_or_else(|| unreachable!())
    }

    fn live_master(&self, cluster: ClusterId, now: Instant) -> Option<(ServerId, &Address)> {
        let master = self.roles.get(&cluster)?.master?;
        let node = self.servers.get(&(cluster, master))?;
        self.alive(node, now).then_some((master, &node.addr))
    }

    /// The live master serving `user` (the course's `GetServer`).
    pub fn route(&self, user: i64, now: Instant) -> Result<(ClusterId, ServerId, Address)> {
        let user = positive(user, "user id")?;
        let user = UserId::new(user)
            .ok_or_else(|| Error::invalid(format!("user id {user} is out of range")))?;
        let cluster = ClusterId::of_user(user, self.config.clusters);
        self.master(cluster, now)
    }

    /// The live master of `cluster`.
    pub fn master(
        &self,
        cluster: ClusterId,
        now: Instant,
    ) -> Result<(ClusterId, ServerId, Address)> {
        self.live_master(cluster, now)
            .map(|(s, addr)| (cluster, s, addr.clone()))
            .ok_or_else(|| Error::Unavailable(format!("no live server in cluster {cluster}")))
    }

    /// A live slave of `cluster` (the course's `GetSlave`).
    pub fn slave(
        &self,
        cluster: ClusterId,
        now: Instant,
    ) -> Result<(ClusterId, ServerId, Address)> {
        let master = self.roles.get(&cluster).and_then(|r| r.master);
        self.servers_of(cluster)
            .find(|(s, node)| Some(*s) != master && self.alive(node, now))
            .map(|(s, node)| (cluster, s, node.addr.clone()))
            .ok_or_else(|| Error::Unavailable(format!("no live slave in cluster {cluster}")))
    }

    /// The live synchronizers, optionally without `except` (id, cluster, address).
    pub fn syncs(&self, except: Option<u32>, now: Instant) -> Vec<(u32, ClusterId, Address)> {
        self.syncs
            .iter()
            .filter(|(id, node)| Some(**id) != except && self.alive(node, now))
            .map(|(id, node)| (*id, self.cluster_of_sync(*id), node.addr.clone()))
            .collect()
    }

    /// The live synchronizer of the cluster that serves `user` (the course's
    /// `GetFollowerServer`).
    pub fn sync_for_user(&self, user: i64, now: Instant) -> Result<(u32, ClusterId, Address)> {
        let user = positive(user, "user id")?;
        let user = UserId::new(user)
            .ok_or_else(|| Error::invalid(format!("user id {user} is out of range")))?;
        let cluster = ClusterId::of_user(user, self.config.clusters);
        self.syncs(None, now)
            .into_iter()
            .find(|(_, c, _)| *c == cluster)
            .ok_or_else(|| Error::Unavailable(format!("no live synchronizer in cluster {cluster}")))
    }

    /// Every registered node, servers first, for status displays.
    pub fn nodes(&self, now: Instant) -> Vec<NodeView> {
        let servers = self.servers.iter().map(|((c, s), node)| {
            let master = self.roles.get(c).and_then(|r| r.master) == Some(*s);
            NodeView {
                cluster: *c,
                id: s.get(),
                role: Some(if master { Role::Master } else { Role::Slave }),
                addr: node.addr.clone(),
                since_heartbeat: now.saturating_duration_since(node.last_beat),
                alive: self.alive(node, now),
                epoch: self.epoch(*c),
                log_epoch: node.epoch,
                log: Some(node.log),
                in_sync: self.roles.get(c).is_some_and(|r| r.in_sync.contains(s)),
                failure: node.failure.clone(),
            }
        });
        let syncs = self.syncs.iter().map(|(id, node)| {
            let cluster = self.cluster_of_sync(*id);
            NodeView {
                cluster,
                id: *id,
                role: None,
                addr: node.addr.clone(),
                since_heartbeat: now.saturating_duration_since(node.last_beat),
                alive: self.alive(node, now),
                epoch: self.epoch(cluster),
                log_epoch: Epoch(0),
                log: None,
                in_sync: false,
                failure: None,
            }
        });
        servers.chain(syncs).collect()
    }
}

/// Logs a change of a cluster's master: named (first, or again under a new epoch), or promoted
/// in place of a dead one, loudly when the promoted slave was not known to be in sync.
fn tell_change(cluster: ClusterId, before: &RolesRecord, after: &RolesRecord) {
    let Some(server) = after.master else { return };
    if after.epoch == before.epoch {
        return;
    }
    let epoch = after.epoch;
    match before.master {
        Some(dead) if after.promotions > before.promotions && before.in_sync.contains(&server) => {
            tracing::info!(%cluster, %server, %dead, %epoch, "master dead: in-sync slave promoted");
        }
        Some(dead) if after.promotions > before.promotions => {
            tracing::error!(%cluster, %server, %dead, %epoch, "master dead: promoting a slave NOT known to be in sync (unclean promotion); committed changes may be lost");
        }
        Some(_) if before.master == Some(server) => {
            tracing::info!(%cluster, %server, %epoch, "master named again under a new epoch");
        }
        _ => tracing::info!(%cluster, %server, %epoch, "master assigned"),
    }
}

fn positive(value: i64, what: &str) -> Result<u32> {
    u32::try_from(value)
        .ok()
        .filter(|v| *v >= 1)
        .ok_or_else(|| Error::invalid(format!("{what} {value} must be a positive number")))
}

#[cfg(test)]
mod tests;
