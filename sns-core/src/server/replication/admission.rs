//! Who may mirror a master: a server the coordinator lists as a slave of the master's cluster,
//! calling from the host it registered with, and not claiming an epoch the master was not told.
//!
//! The cluster token only says a caller belongs to the deployment; the coordinator says which
//! server is the slave. Its heartbeat answers give a master the list ([`Roster`]): every other
//! server registered in the cluster, with the host and port it registered with. A session is
//! admitted when the server its hello names is on that list and the connection comes from that
//! server's host. The slave dials the master, so the connection's source port is an ephemeral
//! one and says nothing; its *host* is what can be checked:
//!
//! - over TCP the peer is `ip:port`: the IP must be the registered host, or one of the
//!   addresses the registered name resolves to (the system resolver, as the slave's own dial
//!   resolves names; IPv4-mapped IPv6 addresses count as IPv4);
//! - on the memory network (in-process deployments) the peer is the dialling node's name, which
//!   is the host a server registers with there, so names are compared;
//! - a transport that reports no peer, or cannot resolve names (a simulated network plugged in
//!   through [`Connector`](crate::transport::Connector)), leaves only the server id to check:
//!   the session is admitted on it and the master says so at WARN.
//!
//! What this does not do: tell apart two processes on one host (all of `sns up` runs on
//! 127.0.0.1, where any holder of the token may claim to be the slave), nor admit a slave that
//! reaches its master from another address than the one it advertises (NAT, a second network
//! interface): such a slave is refused, with both addresses in the log.
//!
//! Epochs come from the coordinator alone. A hello claiming a newer epoch than the master's
//! own is refused, and the master keeps its role: if the claim is true, the coordinator's next
//! answer tells the master (which then steps down or takes the new epoch). A refusal never
//! touches the bookkeeping of the slaves already mirroring.

use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

use crate::ids::{Epoch, ServerId};
use crate::transport::{address, split_addr};

/// A slave as the coordinator lists it to its master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ListedSlave {
    pub(crate) server: ServerId,
    /// The host it registered with (its heartbeats' advertised host).
    pub(crate) host: String,
    pub(crate) port: u16,
}

impl std::fmt::Display for ListedSlave {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "server {} at {}",
            self.server,
            address(&self.host, self.port)
        )
    }
}

/// The slaves the coordinator lists for this server's cluster, as of its answer to heartbeat
/// number `beat` (empty while this server is not master).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Roster {
    pub(crate) beat: u64,
    pub(crate) slaves: Vec<ListedSlave>,
}

impl Roster {
    /// The listed slaves, for messages: "server 2 at host:port", or "no slave".
    pub(crate) fn describe(&self) -> String {
        if self.slaves.is_empty() {
            return "no slave".to_string();
        }
        self.slaves
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Where a mirroring session comes from: the connection's peer as the transport reported it
/// (`ip:port` over TCP, the dialling node's name on the memory network), if it did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Caller {
    pub(crate) peer: Option<String>,
}

impl Caller {
    /// The peer's host, without the port (and without the brackets of an IPv6 address).
    fn host(&self) -> Option<&str> {
        let peer = self.peer.as_deref()?;
        let host = split_addr(peer).map_or(peer, |(host, _)| host);
        Some(unbracket(host))
    }

    /// The peer (with its port, for logs).
    pub(crate) fn describe(&self) -> &str {
        self.peer.as_deref().unwrap_or(UNREPORTED)
    }

    /// The peer's host (without its ephemeral port, so that a slave dialling again is told
    /// the same words).
    pub(crate) fn describe_host(&self) -> &str {
        self.host().unwrap_or(UNREPORTED)
    }
}

const UNREPORTED: &str = "an address the transport did not report";

/// Refused sessions are logged at most once every [`RefusalLog::EVERY`], so that a slave that
/// keeps dialling, or a flood of fake ones, cannot flood the log; each line counts the
/// refusals left out since the previous one.
#[derive(Debug, Default)]
pub(crate) struct RefusalLog {
    last: Option<Instant>,
    unlogged: u64,
}

impl RefusalLog {
    pub(crate) const EVERY: Duration = Duration::from_secs(10);

    /// Counts a refusal at `now`: `Some(n)` when it is to be logged, `n` being the refusals
    /// left out of the log since the previous line.
    pub(crate) fn note(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < Self::EVERY)
        {
            self.unlogged += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// Why a mirroring session is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The server the hello names is not among the slaves the coordinator lists.
    NotListed,
    /// The server is listed, but the session comes from another host than it registered with.
    WrongHost(ListedSlave),
    /// The hello claims an epoch newer than this master's.
    EpochAhead { ours: Epoch },
}

/// How a caller compares with the coordinator's list, before any name is resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Identity {
    /// Listed, from its registered host.
    Confirmed,
    /// Listed; the caller's IP must be among the addresses the registered name resolves to.
    Resolve {
        slave: ListedSlave,
        ip: IpAddr,
    },
    /// Listed, but the transport reported no host to compare with.
    Unverifiable(ListedSlave),
    Refused(Refusal),
}

/// Looks `server` up in `roster` and compares the caller's host with the one it registered.
pub(crate) fn identify(roster: &Roster, server: ServerId, caller: &Caller) -> Identity {
    let Some(slave) = roster.slaves.iter().find(|s| s.server == server) else {
        return Identity::Refused(Refusal::NotListed);
    };
    let Some(from) = caller.host() else {
        return Identity::Unverifiable(slave.clone());
    };
    let registered = unbracket(&slave.host);
    if from.eq_ignore_ascii_case(registered) {
        return Identity::Confirmed;
    }
    match (ip(from), ip(registered)) {
        (Some(a), Some(b)) if a == b => Identity::Confirmed,
        (Some(ip), None) => Identity::Resolve {
            slave: slave.clone(),
            ip,
        },
        _ => Identity::Refused(Refusal::WrongHost(slave.clone())),
    }
}

/// Whether `ip` is among `resolved` (the addresses a registered name stands for).
pub(crate) fn resolves_to(resolved: &[IpAddr], ip: IpAddr) -> bool {
    resolved.iter().any(|r| r.to_canonical() == ip)
}

/// A hello's epoch claim against this master's epoch.
pub(crate) fn check_epoch(claimed: Epoch, ours: Epoch) -> Result<(), Refusal> {
    if claimed > ours {
        Err(Refusal::EpochAhead { ours })
    } else {
        Ok(())
    }
}

/// An IP address, IPv4-mapped IPv6 addresses as IPv4.
fn ip(host: &str) -> Option<IpAddr> {
    host.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

fn unbracket(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(id: u32) -> ServerId {
        ServerId::new(id).expect("server")
    }

    fn roster(host: &str) -> Roster {
        Roster {
            beat: 1,
            slaves: vec![ListedSlave {
                server: s(2),
                host: host.to_string(),
                port: 10001,
            }],
        }
    }

    fn from(peer: &str) -> Caller {
        Caller {
            peer: Some(peer.to_string()),
        }
    }

    #[test]
    fn the_listed_slave_is_admitted_from_its_registered_host_whatever_its_source_port() {
        let listed = roster("10.0.0.2");
        assert_eq!(
            identify(&listed, s(2), &from("10.0.0.2:53122")),
            Identity::Confirmed
        );
        assert_eq!(
            identify(&listed, s(2), &from("[::ffff:10.0.0.2]:40000")),
            Identity::Confirmed,
            "an IPv4-mapped IPv6 peer is the IPv4 address"
        );
        // On the memory network the peer is the dialling node's name, as registered.
        assert_eq!(
            identify(&roster("cluster1-server2"), s(2), &from("cluster1-server2")),
            Identity::Confirmed
        );
    }

    #[test]
    fn another_server_or_another_host_is_refused() {
        let listed = roster("10.0.0.2");
        assert_eq!(
            identify(&listed, s(3), &from("10.0.0.2:53122")),
            Identity::Refused(Refusal::NotListed)
        );
        assert_eq!(
            identify(&Roster::default(), s(2), &from("10.0.0.2:53122")),
            Identity::Refused(Refusal::NotListed),
            "a master the coordinator lists no slave for admits nobody"
        );
        let wrong = Identity::Refused(Refusal::WrongHost(listed.slaves[0].clone()));
        assert_eq!(identify(&listed, s(2), &from("10.0.0.9:53122")), wrong);
        assert_eq!(
            identify(&roster("cluster1-server2"), s(2), &from("intruder")),
            Identity::Refused(Refusal::WrongHost(
                roster("cluster1-server2").slaves[0].clone()
            ))
        );
    }

    #[test]
    fn a_registered_name_is_resolved_and_an_unreported_peer_leaves_the_id_alone() {
        let listed = roster("c.example");
        let ip: IpAddr = "10.0.0.2".parse().expect("ip");
        assert_eq!(
            identify(&listed, s(2), &from("10.0.0.2:53122")),
            Identity::Resolve {
                slave: listed.slaves[0].clone(),
                ip
            }
        );
        assert!(resolves_to(&["::ffff:10.0.0.2".parse().expect("ip")], ip));
        assert!(!resolves_to(&["10.0.0.3".parse().expect("ip")], ip));
        assert_eq!(
            identify(&listed, s(2), &Caller::default()),
            Identity::Unverifiable(listed.slaves[0].clone())
        );
    }

    #[test]
    fn refusals_are_logged_at_most_once_every_ten_seconds_with_a_count_of_the_others() {
        let t0 = Instant::now();
        let mut log = RefusalLog::default();
        assert_eq!(log.note(t0), Some(0));
        assert_eq!(log.note(t0 + Duration::from_secs(1)), None);
        assert_eq!(log.note(t0 + Duration::from_secs(9)), None);
        assert_eq!(log.note(t0 + RefusalLog::EVERY), Some(2));
        assert_eq!(log.note(t0 + RefusalLog::EVERY * 3), Some(0));
    }

    #[test]
    fn only_the_coordinator_names_newer_epochs() {
        assert_eq!(check_epoch(Epoch(4), Epoch(4)), Ok(()));
        assert_eq!(check_epoch(Epoch(3), Epoch(4)), Ok(()));
        assert_eq!(
            check_epoch(Epoch(u64::MAX), Epoch(4)),
            Err(Refusal::EpochAhead { ours: Epoch(4) })
        );
    }
}
