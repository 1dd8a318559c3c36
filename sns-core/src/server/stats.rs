//! What a server counts for operators: appends, commits, deliveries, refusals, and how long
//! commits and syncs take; read as one [`ServerStats`] by [`Server::stats`].

use super::{LogPositions, Server, lock_core};
use crate::error::Error;
use crate::ids::{ClusterId, LogIndex, ServerId};
use crate::server::RefusalCounts;
use crate::stats::{Counter, Histogram, LatencyHistogram};

/// The counters a server keeps (in its shared part, outside the lock).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) appended: Counter,
    pub(crate) committed: Counter,
    pub(crate) deliveries: Counter,
    refused_limits: Counter,
    refused_input: Counter,
    refused_role: Counter,
    /// From a client write's sequencing to its commit.
    pub(crate) commit_latency: LatencyHistogram,
}

/// One server's figures at one moment (see [`Server::stats`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerStats {
    /// Role, epochs and log positions.
    pub positions: LogPositions,
    /// Entries appended to the local log since the server opened.
    pub appended: u64,
    /// Entries committed since the server opened.
    pub committed: u64,
    /// Posts handed to open timeline streams.
    pub deliveries: u64,
    /// Users with a live session.
    pub sessions: usize,
    /// Open timeline streams.
    pub timeline_streams: usize,
    /// Client requests refused for a limit (connections, streams, pace, sizes).
    pub refused_limits: u64,
    /// Client requests refused as bad input (unknown user, malformed, not permitted).
    pub refused_input: u64,
    /// Client requests refused because this server cannot serve them now (not master, stopping,
    /// storage failed).
    pub refused_role: u64,
    /// Other clusters' events refused, per origin.
    pub refused_remote: Vec<(ClusterId, RefusalCounts)>,
    /// On a master: every mirroring slave, its acknowledged index and whether it is counted
    /// for the commit point (in sync).
    pub slaves: Vec<SlaveStats>,
    /// From a client write's sequencing to its commit.
    pub commit_latency: Histogram,
    /// The storage's `fdatasync` times, if it keeps them.
    pub sync_latency: Option<Histogram>,
}

/// One slave as its master sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SlaveStats {
    /// The slave.
    pub server: ServerId,
    /// The last index it acknowledged as durable.
    pub acked: LogIndex,
    /// Whether it is counted for the commit point.
    pub in_sync: bool,
}

impl Server {
    /// This server's figures now (for metrics and status pages).
    pub fn stats(&self) -> ServerStats {
        let counters = &self.shared.counters;
        let (sessions, slaves) = {
            let core = lock_core(&self.shared.core);
            let now = tokio::time::Instant::now();
            (core.sessions.live(now), core.replicas.all())
        };
        ServerStats {
            positions: self.positions(),
            appended: counters.appended.get(),
            committed: counters.committed.get(),
            deliveries: counters.deliveries.get(),
            sessions,
            timeline_streams: self.open_timelines(),
            refused_limits: counters.refused_limits.get(),
            refused_input: counters.refused_input.get(),
            refused_role: counters.refused_role.get(),
            refused_remote: self.refused_remote().into_iter().collect(),
            slaves: slaves
                .into_iter()
                .map(|(server, acked, in_sync)| SlaveStats {
                    server,
                    acked,
                    in_sync,
                })
                .collect(),
            commit_latency: counters.commit_latency.snapshot(),
            sync_latency: self.shared.storage.sync_latency(),
        }
    }

    /// Counts a client request refused with `error`, by kind.
    pub(crate) fn count_refusal(&self, error: &Error) {
        let counters = &self.shared.counters;
        match error {
            Error::OverLimit(_) | Error::Full(_) | Error::Overloaded(_) => {
                counters.refused_limits.inc();
            }
            e if e.calls_for_reconnect() => counters.refused_role.inc(),
            _ => counters.refused_input.inc(),
        }
    }
}
