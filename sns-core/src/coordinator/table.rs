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

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::ids::Role;
use crate::ids::{ClusterId, Epoch, LogIndex, ServerId, UserId};

/// Default time between two heartbeats. With 2 missed beats a dead node is noticed after 1 s,
/// which leaves room for the promotion and the client's reconnection within a 2 s failover; a
/// beat is a few hundred bytes, so even many nodes cost the coordinator little.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);

/// A node dead for this many failure timeouts is forgotten (10 s with the default timing; 100 s
/// with the course's 5 s × 2): long enough that `sns status` shows a crashed node for a while,
/// short enough that entries left by departed or bogus nodes do not pile up.
pub const FORGET_AFTER_TIMEOUTS: u32 = 10;

/// Most synchronizers registered per cluster. A deployment runs one per cluster; a few more
/// are harmless (events apply idempotently); a registration beyond that is refused unless a
/// dead one can make room.
pub const SYNCHRONIZERS_PER_CLUSTER: usize = 4;

/// Timing and size of a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutingConfig {
    /// Number of clusters (users are spread over `1..=clusters`).
    pub clusters: u32,
    /// Server slots per cluster: servers register as `1..=servers`.
    pub servers: u32,
    /// Expected time between two heartbeats of a node.
    pub heartbeat_interval: Duration,
    /// A node that missed this many consecutive intervals is dead.
    pub missed_heartbeats: u32,
    /// Promote a slave that is not known to be in sync when the master dies (it may miss
    /// committed changes). Off by default.
    pub allow_unclean_promotion: bool,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            clusters: 3,
            servers: 2,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            missed_heartbeats: 2,
            allow_unclean_promotion: false,
        }
    }
}

impl RoutingConfig {
    /// How long after its last heartbeat a node counts as dead.
    pub fn failure_timeout(&self) -> Duration {
        self.heartbeat_interval * self.missed_heartbeats.max(1)
    }

    /// How long after its last heartbeat a node is forgotten.
    pub fn forget_after(&self) -> Duration {
        self.failure_timeout() * FORGET_AFTER_TIMEOUTS
    }
}

/// A `host:port` a node can be reached at, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// Host name or IP address.
    pub host: String,
    /// TCP port, 1..=65535.
    pub port: u16,
}

impl Address {
    /// Validates a hostname and a port given as text (as the course's `ServerInfo` has them).
    pub fn parse(host: &str, port: &str) -> Result<Self> {
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && host.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']')
            });
        if !host_ok {
            return Err(Error::invalid(format!(
                "hostname {:?} is not a valid host name or address",
                host.chars().take(64).collect::<String>()
            )));
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p >= 1)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "port {:?} is not a number in 1..=65535",
                    port.chars().take(16).collect::<String>()
                ))
            })?;
        Ok(Self {
            host: host.to_string(),
            port,
        })
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// A server's log positions, as its last heartbeat reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReportedLog {
    /// The role the server acts in.
    pub role: Option<Role>,
    /// The last entry durable on the server.
    pub durable: LogIndex,
    /// The last committed entry.
    pub commit: LogIndex,
    /// From a master with a slave: the last entry the slave acknowledged as durable.
    pub slave_acked: Option<LogIndex>,
}

/// What a server says in a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beat {
    /// Its cluster.
    pub cluster: ClusterId,
    /// Its id in the cluster.
    pub server: ServerId,
    /// Where clients reach it.
    pub addr: Address,
    /// Whether it currently acts as master.
    pub claims_master: bool,
    /// The latest epoch it knows of its cluster (0: it never served).
    pub epoch: Epoch,
    /// Its role and log positions.
    pub log: ReportedLog,
    /// From a master: the slaves it counts as in sync.
    pub in_sync: Vec<ServerId>,
    /// Why it cannot serve (its storage failed), if it cannot.
    pub failure: Option<String>,
}

/// The coordinator's answer to a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    /// The role the server must take.
    pub role: Role,
    /// The cluster's current epoch.
    pub epoch: Epoch,
}

/// A node as reported by [`RoutingTable::nodes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// Its cluster.
    pub cluster: ClusterId,
    /// Server id, or synchronizer id for synchronizers.
    pub id: u32,
    /// `Some(role)` for servers, `None` for synchronizers.
    pub role: Option<Role>,
    /// Where it is reached.
    pub addr: Address,
    /// Time since its last heartbeat.
    pub since_heartbeat: Duration,
    /// Whether it is alive.
    pub alive: bool,
    /// Its cluster's epoch.
    pub epoch: Epoch,
    /// The epoch of its own log, as it last reported it.
    pub log_epoch: Epoch,
    /// Its role and log positions as it last reported them (servers only).
    pub log: Option<ReportedLog>,
    /// For a slave: whether its master reported it in sync (only such a slave is promoted).
    pub in_sync: bool,
    /// Why it cannot serve, as it last reported (servers only).
    pub failure: Option<String>,
}

#[derive(Debug, Clone)]
struct Node {
    addr: Address,
    last_beat: Instant,
    epoch: Epoch,
    log: ReportedLog,
    failure: Option<String>,
}

#[derive(Debug, Clone, Default)]
struct ClusterRoles {
    epoch: Epoch,
    master: Option<ServerId>,
    /// The slaves the master last reported in sync.
    in_sync: std::collections::BTreeSet<ServerId>,
}

impl ClusterRoles {
    /// Names `server` master under a new epoch (above `floor` too).
    fn name_master(&mut self, server: ServerId, floor: Epoch) -> Result<()> {
        let Some(epoch) = self.epoch.0.max(floor.0).checked_add(1) else {
            return Err(Error::invalid("epoch out of range"));
        };
        self.epoch = Epoch(epoch);
        self.master = Some(server);
        self.in_sync.clear();
        Ok(())
    }
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
        }
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

    /// Records a server's heartbeat (the first one registers it) and returns its role.
    pub fn heartbeat(&mut self, beat: Beat, now: Instant) -> Result<Assignment> {
        self.check_cluster(i64::from(beat.cluster.get()))?;
        self.check_server(beat.server)?;
        self.forget_the_long_dead(now);
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
        if let Some(why) = &beat.failure {
            // A server that cannot serve is a slave, whatever it claims; if it was master, the
            // next beat of an in-sync slave promotes that slave (the master counts as dead).
            tracing::warn!(cluster = %beat.cluster, server = %beat.server, "server reports a failure: {why}");
            let epoch = self
                .roles
                .get(&beat.cluster)
                .map(|r| r.epoch)
                .unwrap_or_default();
            return Ok(Assignment {
                role: Role::Slave,
                epoch,
            });
        }
        // The election window: one interval after the coordinator started and after the
        // cluster's first server was heard, every server that came up with it has spoken once,
        // so the best of them (the lowest id among equal logs) is chosen, not the first to
        // speak.
        let first_heard = *self.first_heard.entry(beat.cluster).or_insert(now);
        let window_opened = first_heard.max(self.started);
        let heard_all =
            now.saturating_duration_since(window_opened) >= self.config.heartbeat_interval;
        let best = self.most_recent_log(beat.cluster, now);
        let live_master = self.live_master(beat.cluster, now).map(|(s, _)| s);
        let unclean = self.config.allow_unclean_promotion;
        let roles = self.roles.entry(beat.cluster).or_default();
        let (cluster, server) = (beat.cluster, beat.server);
        let role = match roles.master {
            Some(master) if master == server => {
                if beat.claims_master && beat.epoch <= roles.epoch {
                    if beat.epoch == roles.epoch {
                        roles.in_sync = beat.in_sync.iter().copied().collect();
                    }
                } else if beat.claims_master {
                    // Its epoch is newer than this table knows (a restarted coordinator).
                    roles.epoch = beat.epoch;
                    roles.in_sync = beat.in_sync.iter().copied().collect();
                } else {
                    // The master restarted or stepped down: it writes under a new epoch.
                    roles.name_master(server, beat.epoch)?;
                    tracing::info!(%cluster, %server, epoch = %roles.epoch, "master named again under a new epoch");
                }
                Role::Master
            }
            Some(master) if live_master == Some(master) => Role::Slave,
            Some(master) => {
                if roles.in_sync.contains(&server) {
                    roles.name_master(server, beat.epoch)?;
                    tracing::info!(%cluster, %server, dead = %master, epoch = %roles.epoch, "master dead: in-sync slave promoted");
                    Role::Master
                } else if unclean && best == Some(server) {
                    roles.name_master(server, beat.epoch)?;
                    tracing::error!(%cluster, %server, dead = %master, epoch = %roles.epoch, "master dead: promoting a slave NOT known to be in sync (unclean promotion); committed changes may be lost");
                    Role::Master
                } else {
                    Role::Slave
                }
            }
            // No master known (a fresh cluster, or a restarted coordinator).
            None if beat.claims_master => {
                roles.epoch = roles.epoch.max(beat.epoch);
                roles.master = Some(server);
                roles.in_sync = beat.in_sync.iter().copied().collect();
                Role::Master
            }
            None if heard_all && best == Some(server) => {
                roles.name_master(server, beat.epoch)?;
                tracing::info!(%cluster, %server, epoch = %roles.epoch, "master assigned");
                Role::Master
            }
            None => Role::Slave,
        };
        Ok(Assignment {
            role,
            epoch: roles.epoch,
        })
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
        let epoch = |c: &ClusterId| self.roles.get(c).map(|r| r.epoch).unwrap_or_default();
        let servers = self.servers.iter().map(|((c, s), node)| {
            let master = self.roles.get(c).and_then(|r| r.master) == Some(*s);
            NodeView {
                cluster: *c,
                id: s.get(),
                role: Some(if master { Role::Master } else { Role::Slave }),
                addr: node.addr.clone(),
                since_heartbeat: now.saturating_duration_since(node.last_beat),
                alive: self.alive(node, now),
                epoch: epoch(c),
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
                epoch: epoch(&cluster),
                log_epoch: Epoch(0),
                log: None,
                in_sync: false,
                failure: None,
            }
        });
        servers.chain(syncs).collect()
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
