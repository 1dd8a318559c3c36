//! The RabbitMQ transport: each synchronizer publishes its cluster's own committed events to a
//! broker and consumes the other clusters' events from its cluster's own durable queue. Only
//! with the `amqp` feature, which brings in the `lapin` client.
//!
//! Layout (see `docs/sync-rabbitmq.md`): a durable topic exchange `<prefix>.events`; a durable
//! queue `<prefix>.cluster.<c>` per consuming cluster (quorum by default, single active
//! consumer), bound to `origin.<o>` for every other cluster `o`. A message is one
//! [`SignedBatch`](sns_proto::sns_v1::SignedBatch) ([`seal_bytes`](super::seal::seal_bytes)):
//! one origin's consecutive events, signed with the key derived from the cluster token.
//!
//! Invariants:
//! - **Nothing lost on the way out.** The publisher sends persistent messages with publisher
//!   confirms and advances its cursor ([`CursorStore`]) only past confirmed messages; after any
//!   fault it publishes again from the cursor.
//! - **Nothing lost on the way in.** The consumer acknowledges a message only once the master
//!   answered that its events are committed; unacknowledged messages are redelivered.
//! - **Nothing applied twice.** Redeliveries and republished events are dropped by the master
//!   (idempotent by origin and sequence number).
//! - **Only what the origin sent.** With a key, a message without a valid MAC is dropped
//!   before it is decoded; a message claiming events beyond its origin's own committed
//!   high-water mark is dropped before any repair. Both are logged and counted
//!   ([`SyncRefusals`](super::SyncRefusals)).
//! - **No hole, no stall.** A message that does not follow the cluster's high-water mark for
//!   its origin (a gap: a queue that was purged, recreated or lost) is preceded by the missing
//!   events, read straight from the origin's master, waiting [`REPAIR_PATIENCE`] at most for
//!   it; what cannot be read then is read later. Each origin's messages are handled on their
//!   own, so one origin's repair never holds up another's messages.
//! - **Never gives up** while not stopped: after a broker or connection fault each side
//!   reconnects with backoff (at most [`MAX_RETRY`] apart), declares the layout again and
//!   resumes. Only a layout the broker refuses ends [`AmqpBus::run`] with an error.

mod consume;
mod cursor;
mod publish;
mod stats;
pub(crate) mod topology;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use lapin::{Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;

pub use consume::REPAIR_PATIENCE;
pub use cursor::{CursorStore, WRITE_EVERY};
pub use publish::{APP_ID, CONTENT_TYPE, MAX_IN_FLIGHT, MESSAGE_TYPE};
pub use stats::AmqpStats;
pub use topology::delete_topology;

use super::{ClusterLink, SyncTransport};
use crate::error::{Error, Result};
use crate::ids::ClusterId;
use stats::AmqpCounters;

/// First pause before reconnecting after a fault.
pub const FIRST_RETRY: Duration = Duration::from_millis(50);
/// Longest pause between reconnection attempts.
pub const MAX_RETRY: Duration = Duration::from_secs(1);
/// Longest wait for the broker to accept a connection before trying again.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a graceful close of a connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Which kind of queue consuming clusters get.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum QueueType {
    /// Quorum queues (`x-queue-type: quorum`): replicated over the nodes of a RabbitMQ cluster
    /// (Raft), so a node's loss loses no message. The default.
    #[default]
    Quorum,
    /// Classic durable queues (`x-queue-type: classic`): kept on one node.
    Classic,
}

impl QueueType {
    /// The value of the `x-queue-type` queue argument.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quorum => "quorum",
            Self::Classic => "classic",
        }
    }
}

impl std::str::FromStr for QueueType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "quorum" => Ok(Self::Quorum),
            "classic" => Ok(Self::Classic),
            other => Err(Error::invalid(format!(
                "unknown queue type {other:?} (expected quorum or classic)"
            ))),
        }
    }
}

/// Settings of the RabbitMQ transport.
///
/// Non-exhaustive, so that fields can be added later: build it from `AmqpOptions::default()` (or
/// [`AmqpOptions::new`]) and set the fields you need.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AmqpOptions {
    /// The broker: `amqp://user:password@host:port/vhost` (the vhost URL-encoded, `%2f` for
    /// `/`; `?heartbeat=<s>` sets the heartbeat). Plain TCP only.
    pub url: String,
    /// The kind of the consuming queues.
    pub queue_type: QueueType,
    /// Prefix of the exchange and queue names (letters, digits, `.`, `_`, `-`), so several
    /// deployments can share a broker.
    pub prefix: String,
    /// Most messages delivered to a consumer and not yet acknowledged.
    pub prefetch: u16,
}

impl Default for AmqpOptions {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_string(),
            queue_type: QueueType::Quorum,
            prefix: "sns".to_string(),
            prefetch: 256,
        }
    }
}

impl std::fmt::Debug for AmqpOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpOptions")
            .field("url", &redacted(&self.url))
            .field("queue_type", &self.queue_type)
            .field("prefix", &self.prefix)
            .field("prefetch", &self.prefetch)
            .finish()
    }
}

impl AmqpOptions {
    /// The default settings for the broker at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }

    /// Checks the URL (an `amqp://` URL: this transport speaks plain TCP), the prefix and the
    /// prefetch count.
    pub fn validate(&self) -> Result<()> {
        let uri: lapin::uri::AMQPUri = self.url.parse().map_err(|e| {
            Error::invalid(format!("not a RabbitMQ URL: {} ({e})", redacted(&self.url)))
        })?;
        if uri.scheme != lapin::uri::AMQPScheme::AMQP {
            return Err(Error::invalid(format!(
                "only amqp:// URLs are supported (no TLS), not {}",
                redacted(&self.url)
            )));
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if self.prefix.is_empty() || self.prefix.len() > 200 || !self.prefix.chars().all(allowed) {
            return Err(Error::invalid(format!(
                "a RabbitMQ prefix is 1 to 200 letters, digits, '.', '_' or '-', not {:?}",
                self.prefix
            )));
        }
        if self.prefetch == 0 {
            return Err(Error::invalid(
                "the RabbitMQ prefetch count must be at least 1",
            ));
        }
        Ok(())
    }

    /// The exchange every synchronizer publishes to: `<prefix>.events`.
    pub fn exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }

    /// The queue `cluster` consumes: `<prefix>.cluster.<cluster>`.
    pub fn queue(&self, cluster: ClusterId) -> String {
        format!("{}.cluster.{cluster}", self.prefix)
    }

    /// The routing key of `origin`'s events: `origin.<origin>`.
    pub fn routing_key(origin: ClusterId) -> String {
        format!("origin.{origin}")
    }

    /// The `connection_name` a synchronizer's connection shows in the broker:
    /// `<prefix> cluster <c> <role>`.
    pub fn connection_name(&self, cluster: ClusterId, role: &str) -> String {
        format!("{} cluster {cluster} {role}", self.prefix)
    }

    /// Whether the URL logs in as RabbitMQ's default user `guest` (also when it names no
    /// user): fine on a laptop, not for a deployment.
    pub fn uses_guest(&self) -> bool {
        self.url
            .parse::<lapin::uri::AMQPUri>()
            .is_ok_and(|uri| uri.authority.userinfo.username == "guest")
    }
}

/// `url` with its password replaced by `***`.
fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{path}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// The RabbitMQ transport (see the module documentation). Clones share their counters.
#[derive(Debug, Clone)]
pub struct AmqpBus {
    options: AmqpOptions,
    cursor: CursorStore,
    counters: Arc<AmqpCounters>,
}

impl AmqpBus {
    /// The transport with `options`, keeping the publisher's cursor in `cursor`.
    pub fn new(options: AmqpOptions, cursor: CursorStore) -> Self {
        Self {
            options,
            cursor,
            counters: Arc::default(),
        }
    }

    /// What it published, what the broker answered, and what it consumed and dropped, counted
    /// since it was made.
    pub fn stats(&self) -> AmqpStats {
        self.counters.snapshot()
    }

    /// Its settings.
    pub fn options(&self) -> &AmqpOptions {
        &self.options
    }

    /// Its publisher's cursor.
    pub fn cursor(&self) -> &CursorStore {
        &self.cursor
    }
}

#[async_trait]
impl SyncTransport for AmqpBus {
    fn name(&self) -> &'static str {
        "amqp"
    }

    fn amqp_stats(&self) -> Option<AmqpStats> {
        Some(self.stats())
    }

    async fn run(&self, link: ClusterLink) -> Result<()> {
        self.options.validate()?;
        if self.options.uses_guest() {
            tracing::warn!(
                cluster = %link.cluster(),
                "the RabbitMQ URL logs in as guest: give the deployment a user of its own, \
                 allowed only the {}.* exchange and queues (see docs/sync-rabbitmq.md)",
                self.options.prefix
            );
        }
        // Cancelled when the synchronizer stops, or when one side fails for good.
        let stop = link.shutdown().child_token();
        let give_up = |result: Result<()>| {
            if result.is_err() {
                stop.cancel();
            }
            result
        };
        let written = CancellationToken::new();
        let counters = &self.counters;
        let work = async {
            let (published, consumed) = tokio::join!(
                async {
                    let publishing =
                        publish::run(&link, &self.options, &self.cursor, counters, &stop);
                    give_up(publishing.await)
                },
                async { give_up(consume::run(&link, &self.options, counters, &stop).await) },
            );
            // The cursor is written a last time once the publisher is done with it.
            written.cancel();
            published.and(consumed)
        };
        let ((), result) = tokio::join!(self.cursor.keep_written(&written), work);
        result
    }
}

/// Opens a connection to the broker of `options`, shown by the broker as `name`; gives up
/// after [`CONNECT_TIMEOUT`].
pub(crate) async fn connect(options: &AmqpOptions, name: &str) -> Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        Connection::connect(&options.url, properties),
    )
    .await
    {
        Ok(connection) => connection.map_err(topology::unavailable),
        Err(_) => Err(Error::ConnectionLost(format!(
            "RabbitMQ at {} did not answer within {CONNECT_TIMEOUT:?}",
            redacted(&options.url)
        ))),
    }
}

/// Closes a connection gracefully (unacknowledged deliveries go back to their queue), waiting
/// [`CLOSE_TIMEOUT`] at most; a broken connection is just dropped.
async fn close(connection: Connection) {
    let _ = tokio::time::timeout(
        CLOSE_TIMEOUT,
        connection.close(200, "synchronizer stopping".into()),
    )
    .await;
}

/// How a session (one connection's life) ended, when not by the synchronizer stopping.
#[derive(Debug)]
enum Ended {
    /// A fault to ride out: reconnect after a pause.
    Broken(Error),
    /// A fault that retrying cannot fix: give up.
    Fatal(Error),
}

impl From<lapin::Error> for Ended {
    fn from(error: lapin::Error) -> Self {
        Self::Broken(topology::unavailable(error))
    }
}

/// One side's (publisher's or consumer's) view of broker outages: logs a warning when one
/// starts and a note when it ends, and paces the reconnection attempts in between.
struct Outage {
    cluster: ClusterId,
    role: &'static str,
    state: Mutex<OutageState>,
}

struct OutageState {
    since: Option<tokio::time::Instant>,
    pause: Duration,
}

impl Outage {
    fn new(cluster: ClusterId, role: &'static str) -> Self {
        Self {
            cluster,
            role,
            state: Mutex::new(OutageState {
                since: None,
                pause: FIRST_RETRY,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutageState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The session is connected and its layout declared: an outage, if any, is over.
    fn connected(&self) {
        let mut state = self.lock();
        state.pause = FIRST_RETRY;
        if let Some(since) = state.since.take() {
            tracing::info!(
                cluster = %self.cluster,
                "RabbitMQ {} reconnected after {:?}",
                self.role,
                since.elapsed()
            );
        }
    }

    /// The session broke: how long to wait before the next attempt.
    fn failed(&self, error: &Error) -> Duration {
        let mut state = self.lock();
        if state.since.is_none() {
            state.since = Some(tokio::time::Instant::now());
            tracing::warn!(
                cluster = %self.cluster,
                "RabbitMQ {} interrupted, reconnecting: {error}",
                self.role
            );
        } else {
            tracing::debug!(
                cluster = %self.cluster,
                "RabbitMQ {} still interrupted: {error}",
                self.role
            );
        }
        let pause = state.pause;
        state.pause = (state.pause * 2).min(MAX_RETRY);
        pause
    }
}

/// Runs `session` again and again until it ends by `stop` (`Ok`) or fails for good.
async fn supervise<F, Fut>(outage: &Outage, stop: &CancellationToken, mut session: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<(), Ended>>,
{
    loop {
        match session().await {
            Ok(()) => return Ok(()),
            Err(_) if stop.is_cancelled() => return Ok(()),
            Err(Ended::Fatal(error)) => {
                tracing::error!(
                    cluster = %outage.cluster,
                    "RabbitMQ {} gives up: {error}",
                    outage.role
                );
                return Err(error);
            }
            Err(Ended::Broken(error)) => {
                let pause = outage.failed(&error);
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = stop.cancelled() => return Ok(()),
                }
            }
        }
    }
}

/// Connects for `role`, unless `stop` comes first (`None`).
async fn connect_or_stop(
    options: &AmqpOptions,
    cluster: ClusterId,
    role: &str,
    stop: &CancellationToken,
) -> std::result::Result<Option<Connection>, Ended> {
    let name = options.connection_name(cluster, role);
    tokio::select! {
        connection = connect(options, &name) => {
            connection.map(Some).map_err(Ended::Broken)
        }
        () = stop.cancelled() => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prefix() {
        let options = AmqpOptions {
            prefix: "t1".to_string(),
            ..AmqpOptions::default()
        };
        let c2 = ClusterId::new(2).expect("cluster");
        assert_eq!(options.exchange(), "t1.events");
        assert_eq!(options.queue(c2), "t1.cluster.2");
        assert_eq!(AmqpOptions::routing_key(c2), "origin.2");
        assert!(options.validate().is_ok());
    }

    #[test]
    fn bad_urls_prefixes_and_prefetch_are_refused() {
        for prefix in ["", "a b", "a/b", "é"] {
            let options = AmqpOptions {
                prefix: prefix.to_string(),
                ..AmqpOptions::default()
            };
            assert!(options.validate().is_err(), "{prefix:?}");
        }
        let options = AmqpOptions {
            prefetch: 0,
            ..AmqpOptions::default()
        };
        assert!(options.validate().is_err());
        for url in ["amqps://broker/%2f", "http://broker", "not a url"] {
            assert!(AmqpOptions::new(url).validate().is_err(), "{url}");
        }
        assert!(
            AmqpOptions::new("amqp://u:p@broker:5672/%2f?heartbeat=5")
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn the_guest_user_is_told_apart() {
        assert!(AmqpOptions::default().uses_guest());
        assert!(AmqpOptions::new("amqp://broker:5672/%2f").uses_guest());
        assert!(!AmqpOptions::new("amqp://sns-user:pw@broker:5672/%2f").uses_guest());
    }

    #[test]
    fn debug_hides_the_password() {
        let options = AmqpOptions::new("amqp://user:secret@broker:5672/%2f");
        let shown = format!("{options:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("amqp://user:***@broker:5672/%2f"), "{shown}");
        assert_eq!(redacted("amqp://broker/%2f"), "amqp://broker/%2f");
    }

    #[test]
    fn queue_types_parse() {
        assert_eq!("quorum".parse::<QueueType>().ok(), Some(QueueType::Quorum));
        assert_eq!(
            "classic".parse::<QueueType>().ok(),
            Some(QueueType::Classic)
        );
        assert!("lazy".parse::<QueueType>().is_err());
    }
}
