//! The crate's one error type. Variants say what the caller can do: fix the input, retry
//! elsewhere, or give up. [`Error::calls_for_reconnect`] tells the errors after which a client
//! finds its server again (not master, shutting down, storage failed, connection lost) from
//! the answers it passes to its user (a bad command, a limit reached). On the wire an error
//! crosses as itself, in one mapping both ways (the gRPC layer's `status` module).

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in Tiny SNS. New kinds may be added: match the ones you act
/// on and let the rest fall through (or ask [`Error::calls_for_reconnect`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A username is malformed or names no known user. Fix the input.
    #[error("invalid username: {0:?}")]
    InvalidUsername(String),
    /// A user tried to follow or unfollow themself. Fix the input.
    #[error("same client")]
    SameClient,
    /// The follower already follows the followee.
    #[error("already following")]
    AlreadyFollowing,
    /// The follower does not follow the followee.
    #[error("not following")]
    NotFollowing,
    /// The user already has a live session; wait for it to end or expire.
    #[error("user {0} is already logged in")]
    AlreadyLoggedIn(crate::UserId),
    /// The user has never logged in on this cluster.
    #[error("user {0} is not logged in")]
    NotLoggedIn(crate::UserId),
    /// A post or request is malformed (too long, not UTF-8, missing argument...). Fix the input.
    #[error("{0}")]
    InvalidInput(String),
    /// The caller is not allowed to do this (e.g. posting as another user on a stream).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The request conflicts with what exists (e.g. a server slot alive at another address).
    #[error("{0}")]
    Conflict(String),
    /// One of this server's limits for a user or for everyone was reached (e.g. timeline
    /// streams per user); the message names the limit and its value. The server is fine:
    /// failing over to another one does not help. Close something, or wait, then retry.
    #[error("{0}")]
    OverLimit(String),
    /// A bounded table is full (e.g. the coordinator's synchronizers of a cluster). Retry later,
    /// once an entry has gone.
    #[error("{0}")]
    Full(String),
    /// The caller lacks the cluster token required for internal calls.
    #[error("missing or wrong cluster token")]
    Unauthorized,
    /// This server is not the master of its cluster: a slave, or a master that stepped down
    /// (its change may or may not have been committed). Ask the coordinator who the master is
    /// and retry there.
    #[error("not master: {0}")]
    NotMaster(String),
    /// The process that was asked (named in the message: a server, a synchronizer) is shutting
    /// down. Retry on the server that takes over, or once it is back.
    #[error("{0} is shutting down")]
    ShuttingDown(String),
    /// This server's storage failed; it takes no more writes until it is restarted. Its durable
    /// state is unchanged beyond the last successful fsync. Retry on the server that takes over.
    #[error("storage failed: {0}")]
    StorageFailed(String),
    /// A connection broke in the middle of a call or stream, or a peer stopped answering in
    /// time. Retry, on the same server or after asking the coordinator again.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The server could not keep up with this caller: a timeline reader fell behind its queue
    /// and was cut off. The server itself is fine; reopen and go on (posts missed meanwhile
    /// are on the timeline's history).
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// Nothing can serve the request now (e.g. no live server in a cluster, a port already
    /// taken). Retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The server could not be reached or the connection broke. Retry later.
    #[error("cannot reach {addr}: {reason}")]
    Unreachable {
        /// The address that was tried.
        addr: String,
        /// Why it failed.
        reason: String,
    },
    /// A storage operation failed. Durable state is unchanged beyond the last successful fsync.
    #[error("storage: {0}")]
    Io(#[from] std::io::Error),
    /// The log entries asked for were compacted away: the first entry still held is `first`.
    /// Fetch a snapshot (or a state transfer) instead, then read from after it.
    #[error("log entries before {first} were compacted away; fetch a snapshot")]
    Compacted {
        /// The first log index still held.
        first: crate::LogIndex,
    },
    /// Data on disk or on the wire failed its checks.
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// A peer answered with an error this crate has no better name for.
    #[error("rpc failed: {0}")]
    Rpc(String),
}

impl Error {
    /// Whether the request itself was at fault (a bad or impossible command), rather than the
    /// server or the system (unavailable, storage, a peer): what a log tells apart.
    pub fn is_the_callers(&self) -> bool {
        matches!(
            self,
            Self::InvalidUsername(_)
                | Self::SameClient
                | Self::AlreadyFollowing
                | Self::NotFollowing
                | Self::AlreadyLoggedIn(_)
                | Self::NotLoggedIn(_)
                | Self::InvalidInput(_)
                | Self::PermissionDenied(_)
                | Self::Unauthorized
                | Self::OverLimit(_)
        )
    }

    /// Whether the caller should find the server that serves it now and retry there: the one
    /// that answered is not master, shutting down, lost its storage or its connection, could
    /// not keep up, or nothing serves yet. Every other error is an answer to give the user;
    /// failing over would not change it.
    pub fn calls_for_reconnect(&self) -> bool {
        matches!(
            self,
            Self::NotMaster(_)
                | Self::ShuttingDown(_)
                | Self::StorageFailed(_)
                | Self::ConnectionLost(_)
                | Self::Overloaded(_)
                | Self::Unavailable(_)
                | Self::Unreachable { .. }
        )
    }

    /// Shorthand for [`Error::InvalidInput`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidInput(message.into())
    }

    /// Shorthand for [`Error::ShuttingDown`] of this server.
    pub fn server_shutting_down() -> Self {
        Self::ShuttingDown("server".to_string())
    }
}
