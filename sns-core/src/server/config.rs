//! A server's settings: every field has a sensible default.

use std::time::Duration;

use super::limits::DEFAULT_MAX_CONNECTIONS;
use crate::ids::{ClusterId, ServerId};
use crate::state::{DEFAULT_TIMELINE_CAP, StateConfig};

/// Settings of a [`Server`](super::Server); every field has a sensible default.
///
/// Non-exhaustive, so that fields can be added later: build it from `ServerConfig::default()` and
/// set the fields you need.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// The cluster this server belongs to (its events carry this origin).
    pub cluster: ClusterId,
    /// This server's id within the cluster.
    pub server_id: ServerId,
    /// Number of clusters in the deployment (must match the coordinator's): only users of
    /// this server's cluster get materialized timelines here. With 1, every user does.
    pub clusters: u32,
    /// Posts kept per materialized timeline.
    pub timeline_cap: usize,
    /// A session without heartbeat or stream expires after this long (two missed 3 s beats).
    pub session_timeout: Duration,
    /// Take a snapshot (and compact the log) after this many committed entries.
    pub snapshot_every: u64,
    /// Most client connections open at once; a connection accepted beyond it is closed at
    /// once, and open connections carry on.
    pub max_connections: usize,
    /// How long a new connection may take to send its HTTP/2 preface and settings before it
    /// is closed (a socket that connects and says nothing holds no slot for long).
    pub handshake_timeout: Duration,
    /// Most timeline streams open at once on this server.
    pub max_timeline_streams: usize,
    /// Most timeline streams one user may hold open at once, so that one client cannot take
    /// every stream of the server.
    pub max_timeline_streams_per_user: usize,
    /// Posts queued per timeline stream before the reader counts as fallen behind.
    pub stream_queue: usize,
    /// Most posts per second accepted from one user, across all of that user's timeline
    /// streams (bursts of as many); excess posts wait (the stream is slowed down, not cut).
    pub max_posts_per_second: u32,
    /// Most concurrent HTTP/2 streams per client connection.
    pub max_concurrent_streams: u32,
    /// Largest message a client may send on the client-facing service, in bytes (a post of
    /// [`MAX_POST_BYTES`](crate::MAX_POST_BYTES) fits with room to spare); a larger one is
    /// refused as soon as its length is read.
    pub max_message_bytes: usize,
    /// HTTP/2 receive window of each stream: bytes a client may send on one stream before
    /// the server has read them. Small, so that a client sending many tiny messages faster
    /// than they are handled is held back by flow control: the frames queued per stream
    /// stay within what HTTP/2's guard against floods of small frames allows.
    pub stream_window: u32,
    /// HTTP/2 receive window of each connection (at least 65,535). The HTTP/2 library allows a
    /// connection half of it in queued small frames (counted at 256 bytes each, less their
    /// payload) before it closes the connection with `ENHANCE_YOUR_CALM`.
    pub connection_window: u32,
    /// Most entries sequenced but not yet committed; writers beyond that wait for a slot.
    pub max_inflight: usize,
    /// Committed entries kept in memory for the committed-entry stream's live readers (older
    /// ones are read from the log).
    pub recent_entries: usize,
    /// A mirroring stream that carries nothing for this long is dead: the master stops
    /// counting the slave (after telling the coordinator), the slave dials again. The master
    /// sends a keepalive every quarter of it.
    pub mirror_timeout: Duration,
    /// Added to the wall clock when stamping events, in microseconds (may be negative): for
    /// simulating clock skew between clusters. 0 in production.
    pub clock_offset_micros: i64,
    /// How far another cluster's clock may run ahead of this server's: an event of another
    /// cluster dated later than now plus this is refused (the origin's clock is wrong), as is
    /// one dated before 2000.
    pub max_clock_skew: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            cluster: ClusterId::new(1).unwrap_or_else(|| unreachable!()),
            server_id: ServerId::new(1).unwrap_or_else(|| unreachable!()),
            clusters: 3,
            timeline_cap: DEFAULT_TIMELINE_CAP,
            session_timeout: Duration::from_secs(6),
            snapshot_every: 100_000,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            handshake_timeout: Duration::from_secs(10),
            max_timeline_streams: 10_000,
            max_timeline_streams_per_user: 4,
            stream_queue: 1024,
            max_posts_per_second: 1000,
            max_concurrent_streams: 100,
            max_message_bytes: 16 * 1024,
            stream_window: 8 * 1024,
            connection_window: 4 * 1024 * 1024,
            max_inflight: 4096,
            recent_entries: 8192,
            mirror_timeout: Duration::from_secs(1),
            clock_offset_micros: 0,
            max_clock_skew: crate::state::DEFAULT_MAX_CLOCK_SKEW,
        }
    }
}

impl ServerConfig {
    /// The settings of this server's [`State`](crate::state::State).
    pub fn state_config(&self) -> StateConfig {
        StateConfig {
            cluster: self.cluster,
            clusters: self.clusters,
            timeline_cap: self.timeline_cap,
        }
    }
}
