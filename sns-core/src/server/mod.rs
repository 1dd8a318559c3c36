//! The server: the semantics of the client-facing service (DESIGN §4) over a durable log.
//!
//! Write path, and the rule for validation: a command is validated against the *committed*
//! state plus the effects of the entries sequenced before it (module `uncommitted`), then sequenced
//! under one lock (event id, log index, time), queued on the storage in log order and shipped to
//! the slave (module `replication`). The commit pipeline (module `pipeline`) waits for local
//! durability and, while a slave is counted for the commit point, for the slave's acknowledgement,
//! and only then commits the entry: applies it to the state, publishes it to the committed-entry
//! stream, fans posts out to online followers and answers the caller. So the state, LIST,
//! timelines and every consumer see committed entries only, and a master that loses its role
//! discards its uncommitted entries by dropping them (the state never held them) and truncating
//! the log after the commit index.
//!
//! A slave runs the same pipeline on the entries its master ships: they are sequenced into its
//! log as they arrive and committed when the master's commit index passes them.
//!
//! Bounds: at most `max_inflight` entries are sequenced and not yet committed; a writer (or a
//! master's shipment) beyond that waits for a slot (backpressure) before it takes the lock.
//! Snapshots are built at the commit index by a background task from the previous snapshot and
//! the log, never under the lock and never in the way of commits.

mod commands;
mod committed;
mod config;
mod heartbeat;
mod limits;
mod open;
mod pipeline;
pub(crate) mod replication;
mod role;
mod sessions;
mod snapshots;
mod stats;
mod sync;
mod timeline;
mod uncommitted;

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use tokio::sync::{Notify, Semaphore, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use committed::CommittedEntries;
pub use config::ServerConfig;
pub use heartbeat::CoordinatorLink;
pub(crate) use heartbeat::{Answer, Assigned, Beat, MasterFeed, Peers};
pub use limits::{DEFAULT_MAX_CONNECTIONS, MAX_ARGUMENTS, RESERVED_DESCRIPTORS, connection_cap};
pub use stats::{ServerStats, SlaveStats};
pub use sync::{MAX_APPLY_BATCH, OwnEvents, RefusalCounts, check_reader};
pub use timeline::TimelineFeed;

use crate::error::{Error, Result};
use crate::event::LogEntry;
use crate::ids::{Epoch, LogIndex, ServerId, Timestamp, UserId};
use crate::state::State;
use crate::storage::Storage;
use crate::transport::Network;
use committed::RecentEntries;
use pipeline::{Gate, Pending};
use replication::{MirrorTarget, RefusalLog, Replicas, Roster};
use sessions::Sessions;
use timeline::Subscribers;
use uncommitted::Uncommitted;

pub use crate::ids::Role;
pub use crate::state::{Listing, RECENT_POSTS};

/// Where a server's log stands, as its heartbeats report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPositions {
    /// The server's role.
    pub role: Role,
    /// The epoch of the server's log: the epoch it writes under as master, or the epoch of
    /// the last entry it holds.
    pub epoch: Epoch,
    /// The newest cluster epoch this server has heard of.
    pub known_epoch: Epoch,
    /// The last entry sequenced (durable or not, committed or not).
    pub sequenced: LogIndex,
    /// The last entry durable in this server's storage.
    pub durable: LogIndex,
    /// The last committed entry.
    pub commit: LogIndex,
    /// On a master: the slaves counted for the commit point and reported to the coordinator
    /// as in sync, with the last index each acknowledged as durable.
    pub in_sync: Vec<(ServerId, LogIndex)>,
    /// On a slave: whether its master counts it for the commit point.
    pub counted_by_master: bool,
}

/// Everything guarded by the server's one lock.
struct Core {
    /// Committed entries only (see the module documentation).
    state: State,
    /// Effects of the sequenced, uncommitted entries, for validation.
    uncommitted: Uncommitted,
    /// The epoch this server writes under as master, or the epoch of its log's last entry.
    epoch: Epoch,
    /// The newest cluster epoch heard of (from the coordinator or a master): a master of an
    /// older epoch is refused.
    known_epoch: Epoch,
    /// The epoch of the last sequenced entry.
    last_epoch: Epoch,
    role: Role,
    next_index: LogIndex,
    next_seq: u64,
    last_at: Timestamp,
    /// The last entry known durable locally.
    durable: LogIndex,
    /// The last committed entry.
    commit: LogIndex,
    /// Incremented whenever uncommitted entries are discarded.
    generation: u64,
    /// Set while the log is being truncated after a discard: writes wait for it.
    truncating: bool,
    /// The newest sequenced entries (committed or not), for the committed-entry stream and
    /// for shipping to slaves.
    recent: RecentEntries,
    /// On a master: the slaves mirroring it.
    replicas: Replicas,
    /// On a slave: whether the master counts it for the commit point.
    counted_by_master: bool,
    /// On a slave: whether a mirroring stream to the master is up.
    mirroring: bool,
    sessions: Sessions,
    subscribers: Subscribers,
    /// Set when the storage failed: the state may be ahead of the disk, so refuse everything.
    failed: Option<String>,
}

struct Shared {
    config: ServerConfig,
    /// What the server counts for operators.
    counters: stats::Counters,
    storage: Arc<dyn Storage>,
    core: Mutex<Core>,
    /// The commit pipeline's first stage (see module `pipeline`).
    commits: mpsc::Sender<Pending>,
    /// Free in-flight slots (see [`ServerConfig::max_inflight`]).
    inflight: Arc<Semaphore>,
    /// The commit index, for readers of the committed-entry stream.
    commit_index: watch::Sender<LogIndex>,
    /// The last entry durable locally (a slave acknowledges it).
    durable_index: watch::Sender<LogIndex>,
    /// The last entry sequenced, for the shippers to slaves.
    sequenced_index: watch::Sender<LogIndex>,
    /// Up to where entries may commit (see module `pipeline`).
    gate: watch::Sender<Gate>,
    /// On a slave: the master to mirror, as the coordinator named it.
    mirror_target: watch::Sender<Option<MirrorTarget>>,
    /// On a master: the slaves the coordinator lists, the only servers it accepts mirroring
    /// sessions from (as of the last heartbeat answered).
    listed_slaves: watch::Sender<Roster>,
    /// On a master: when a refused mirroring session was last logged.
    refusals: Mutex<RefusalLog>,
    /// Wakes the heartbeat loop for an immediate beat.
    beat_now: Arc<Notify>,
    /// Signalled when a truncation after a discard is done.
    truncated: Notify,
    /// Why this server cannot go on (its storage failed, or the coordinator refused it), once
    /// it cannot; see [`Server::failure`].
    fatal: watch::Sender<Option<String>>,
    /// The deployment this server joined: its network and cluster token.
    joined: OnceLock<Joined>,
    streams: limits::StreamSlots,
    /// Other clusters' events refused, per origin.
    refused: sync::RemoteRefusals,
    /// The post rate limit, per user.
    pacing: limits::PostPacing,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// What a server learns when it joins a deployment.
struct Joined {
    network: Network,
    cluster_token: Option<String>,
    peers: Arc<dyn heartbeat::Peers>,
}

/// A Tiny SNS server. Cheap to clone; all clones are the same server.
///
/// A standalone server (no coordinator, no slave) on memory storage, served on an in-memory
/// network; [`Server::serve`] takes the listener and a shutdown token, and returns once every
/// task of the server has finished:
///
/// ```
/// use std::sync::Arc;
///
/// use sns_core::{Client, MemoryNetwork, MemoryStorage, Server, ServerConfig, UserId};
/// use tokio_util::sync::CancellationToken;
///
/// # #[tokio::main]
/// # async fn main() -> sns_core::Result<()> {
/// // One cluster: every user is this server's.
/// let mut config = ServerConfig::default();
/// config.clusters = 1;
/// let server = Server::open(config, Arc::new(MemoryStorage::new())).await?;
/// let network = MemoryNetwork::new();
/// let listener = network.bind("server:0")?; // or a TCP listener, e.g. on 127.0.0.1:0
/// let addr = listener.addr().to_string();
/// let shutdown = CancellationToken::new();
/// let serving = tokio::spawn({
///     let (server, shutdown) = (server.clone(), shutdown.clone());
///     async move { server.serve(listener, shutdown).await }
/// });
///
/// let client = network.node("client");
/// let alice = Client::login(&client, &addr, UserId::new(1).unwrap()).await?;
/// let bob = Client::login(&client, &addr, UserId::new(2).unwrap()).await?;
/// bob.follow(alice.user()).await?;
/// assert_eq!(alice.list().await?.followers, vec![bob.user()]);
///
/// shutdown.cancel();
/// serving.await.expect("the serving task")?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("cluster", &self.shared.config.cluster)
            .field("server_id", &self.shared.config.server_id)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Stops the commit pipeline, mirroring and every timeline stream, and waits for them to
    /// finish.
    pub async fn close(&self) {
        self.shared.shutdown.cancel();
        self.shared.inflight.close();
        self.lock().subscribers.clear();
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
    }

    /// This server's configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.shared.config
    }

    /// How many timeline streams are open: each holds its slot until the stream has ended and
    /// been dropped.
    pub fn open_timelines(&self) -> usize {
        self.shared.streams.held()
    }

    /// How many tasks of this server (per-stream posters, mirroring, the commit pipeline) are
    /// still running; none once [`Server::close`] has returned.
    pub fn running_tasks(&self) -> usize {
        self.shared.tasks.len()
    }

    /// Waits until this server cannot go on, and says why: its storage failed (it then refuses
    /// every request and reports the failure in its heartbeats, so the coordinator routes
    /// elsewhere; its memory may be ahead of its disk, so only a restart, recovering from the
    /// log, makes it usable again), or the coordinator refused it (a cluster id out of range, a
    /// wrong cluster token). A process running one server should stop with this reason.
    pub async fn failure(&self) -> String {
        let mut fatal = self.shared.fatal.subscribe();
        match fatal.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or_default(),
            Err(_) => "the server stopped".to_string(),
        }
    }

    /// Why this server cannot go on, if it cannot (see [`Server::failure`]).
    pub fn failed(&self) -> Option<String> {
        self.shared.fatal.borrow().clone()
    }

    /// Records that this server cannot go on (see [`Server::failure`]).
    pub(crate) fn give_up(&self, why: String) {
        tracing::error!("{why}");
        set_fatal(&self.shared, why);
    }

    /// The commit index and a copy of the committed state (for tests and tools comparing
    /// servers; it copies the whole state).
    pub fn committed_state(&self) -> (LogIndex, State) {
        let core = self.lock();
        (core.commit, core.state.clone())
    }

    /// The committed entries after `after`, in order: those already committed first, then new
    /// ones as they commit.
    pub fn committed_after(&self, after: LogIndex) -> CommittedEntries {
        CommittedEntries {
            shared: Arc::downgrade(&self.shared),
            next: after.next(),
            commit: self.shared.commit_index.subscribe(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        lock_core(&self.shared.core)
    }

    /// A task tracker and shutdown signal for work tied to this server's lifetime.
    pub(crate) fn tasks(&self) -> (&TaskTracker, &CancellationToken) {
        (&self.shared.tasks, &self.shared.shutdown)
    }

    /// How long a post of `user` must wait to keep the user within the post rate limit
    /// (`None`: it may go at once); the post's turn is reserved.
    pub(crate) fn post_delay(&self, user: UserId) -> Option<std::time::Duration> {
        self.shared.pacing.delay(user, tokio::time::Instant::now())
    }
}

impl Core {
    /// Takes `entry` (the next in the log) into the sequence: its effect counts for validation,
    /// it joins the window of recent entries, and the next index, sequence number and time
    /// move past it.
    fn sequenced(&mut self, entry: LogEntry) {
        self.uncommitted.record(&entry);
        self.next_index = entry.index.next();
        if entry.event.id.origin == self.state.config().cluster {
            self.next_seq = self.next_seq.max(entry.event.id.seq + 1);
            // Only this cluster's clock drives its timestamps: another cluster's clock may run
            // ahead.
            self.last_at = Timestamp(self.last_at.0.max(entry.event.at.0));
        }
        self.last_epoch = entry.epoch;
        self.recent.push(entry);
    }

    /// Whether `user` exists for a write: committed, or joined by an uncommitted entry.
    fn knows(&self, user: UserId) -> Result<()> {
        if self.uncommitted.has_user(&self.state, user) {
            Ok(())
        } else {
            Err(Error::InvalidUsername(user.to_string()))
        }
    }
}

/// The storage failed: the state may be ahead of the disk, so the server refuses every request
/// from now on, reports the failure in its heartbeats (at once) and gives up.
fn storage_failed(shared: &Shared, core: &mut Core, why: String) {
    if core.failed.is_none() {
        core.failed = Some(format!("{why}; refusing requests"));
    }
    let why = format!("storage failed, refusing requests: {why}");
    tracing::error!("{why}");
    set_fatal(shared, why);
    shared.beat_now.notify_one();
}

/// Records the first reason this server cannot go on.
fn set_fatal(shared: &Shared, why: String) {
    shared.fatal.send_if_modified(|fatal| {
        if fatal.is_none() {
            *fatal = Some(why);
            true
        } else {
            false
        }
    });
}

impl Shared {
    /// The log of refused mirroring sessions, locked.
    fn refusals(&self) -> MutexGuard<'_, RefusalLog> {
        // Updates complete before anything that could panic: a poisoned lock is usable.
        self.refusals.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn lock_core(core: &Mutex<Core>) -> MutexGuard<'_, Core> {
    // Every critical section leaves the core consistent before anything that could panic, so a
    // poisoned lock still guards a usable state.
    core.lock().unwrap_or_else(|p| p.into_inner())
}

fn known(state: &State, user: UserId) -> Result<()> {
    if state.has_user(user) {
        Ok(())
    } else {
        Err(Error::InvalidUsername(user.to_string()))
    }
}

async fn finish(wait: oneshot::Receiver<Result<()>>) -> Result<()> {
    wait.await.map_err(|_| Error::server_shutting_down())?
}
