//! The crate's one error type. Variants say what the caller can do: fix the input, retry
//! elsewhere, or give up. gRPC adapters map it to a `tonic::Status` in one place
//! (`grpc::status`), and the client maps statuses back.

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in Tiny SNS.
#[derive(Debug, thiserror::Error)]
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
    /// This server cannot serve the request now (not master, shutting down, storage failed).
    /// Retry, possibly after asking the coordinator again.
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

    /// Shorthand for [`Error::InvalidInput`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidInput(message.into())
    }
}
