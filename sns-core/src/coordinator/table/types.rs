//! What the routing table is configured with and what it takes and gives: its timing and size
//! ([`RoutingConfig`]), a heartbeat ([`Beat`]) and its answer ([`Assignment`]), and the views of
//! nodes it reports ([`NodeView`], [`ReportedLog`]). Addresses are validated once, here
//! ([`Address::parse`]), and carried typed from then on.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::ids::{ClusterId, Epoch, LogIndex, Role, ServerId};

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
///
/// Non-exhaustive, so that fields can be added later: build it from `RoutingConfig::default()` and
/// set the fields you need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
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

/// A node as reported by [`RoutingTable::nodes`](super::RoutingTable::nodes).
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
