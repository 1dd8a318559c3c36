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

mod committed;
mod heartbeat;
mod limits;
mod pipeline;
pub(crate) mod replication;
mod sessions;
mod sync;
mod timeline;
mod uncommitted;

use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use committed::CommittedEntries;
pub use heartbeat::CoordinatorLink;
pub use limits::{DEFAULT_MAX_CONNECTIONS, RESERVED_DESCRIPTORS, connection_cap};
pub use sync::{MAX_APPLY_BATCH, OwnEvents, RefusalCounts, check_reader};
pub use timeline::TimelineFeed;

use crate::error::{Error, Result};
use crate::event::{Event, EventKind, LogEntry, Post, normalize_post_text};
use crate::ids::{ClusterId, Epoch, EventId, LogIndex, PostKey, ServerId, Timestamp, UserId};
use crate::state::{DEFAULT_TIMELINE_CAP, State, StateConfig};
use crate::storage::Storage;
use crate::transport::{ConnectionLimits, Listener, Network};
use committed::RecentEntries;
use pipeline::{Gate, Pending};
use replication::{MirrorTarget, RefusalLog, Replicas, Roster};
use sessions::Sessions;
use timeline::{FeedOwner, Subscribers};
use uncommitted::{KeyedOriginal, Uncommitted};

/// How long a stopping server waits for open connections to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How many posts a timeline shows when it is opened.
pub const RECENT_POSTS: usize = 20;

/// Settings of a [`Server`]; every field has a sensible default.
#[derive(Debug, Clone)]
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
    /// The settings of this server's [`State`].
    pub fn state_config(&self) -> StateConfig {
        StateConfig {
            cluster: self.cluster,
            clusters: self.clusters,
            timeline_cap: self.timeline_cap,
        }
    }
}

/// The answer to `LIST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// Every known user, ascending.
    pub all_users: Vec<UserId>,
    /// The caller's followers, ascending.
    pub followers: Vec<UserId>,
}

/// Whether this server may accept client writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Serves clients.
    Master,
    /// Mirrors the master; refuses clients with `UNAVAILABLE`.
    Slave,
}

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
    entries_since_snapshot: u64,
    snapshot_running: bool,
    sessions: Sessions,
    subscribers: Subscribers,
    /// Set when the storage failed: the state may be ahead of the disk, so refuse everything.
    failed: Option<String>,
}

struct Shared {
    config: ServerConfig,
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
}

/// A Tiny SNS server. Cheap to clone; all clones are the same server.
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
    /// Opens a standalone server on `storage`: recovers the snapshot and log and starts the
    /// commit pipeline. It is master, and without a slave what is durable is committed, so
    /// every recovered entry is.
    pub async fn open(config: ServerConfig, storage: Arc<dyn Storage>) -> Result<Self> {
        Self::open_as(config, storage, Role::Master).await
    }

    /// Opens a server that will [`join`](Self::join) a deployment: it starts as slave, and the
    /// recovered entries after the persisted commit index stay uncommitted until a master
    /// confirms them (or drops them as a tail it never committed), or until this server is made
    /// master.
    pub async fn open_replica(config: ServerConfig, storage: Arc<dyn Storage>) -> Result<Self> {
        Self::open_as(config, storage, Role::Slave).await
    }

    async fn open_as(config: ServerConfig, storage: Arc<dyn Storage>, role: Role) -> Result<Self> {
        let mut recovered = storage.recover().await?;
        let last = recovered.last_index();
        let snapshot_index = recovered.snapshot.as_ref().map(|s| s.index);
        let commit = match role {
            Role::Master => last,
            Role::Slave => recovered.commit.max(snapshot_index.unwrap_or_default()),
        };
        let tail_start = recovered
            .entries
            .iter()
            .position(|e| e.index > commit)
            .unwrap_or(recovered.entries.len());
        let tail = recovered.entries.split_off(tail_start);
        let state = recovered.replay(&config.state_config())?;
        let last_epoch = tail
            .last()
            .or(recovered.entries.last())
            .map(|e| e.epoch)
            .or(recovered.snapshot.as_ref().map(|s| s.epoch))
            .unwrap_or(Epoch(0));
        let inflight = config.max_inflight.max(1);
        let mut core = Core {
            next_index: commit.next(),
            next_seq: state.high_water(config.cluster) + 1,
            last_at: state.latest_time(),
            state,
            uncommitted: Uncommitted::default(),
            epoch: last_epoch,
            known_epoch: last_epoch,
            last_epoch,
            role,
            durable: last,
            commit,
            generation: 0,
            truncating: false,
            recent: RecentEntries::new(config.recent_entries.max(2 * inflight)),
            replicas: Replicas::default(),
            counted_by_master: false,
            mirroring: false,
            entries_since_snapshot: recovered.entries.len() as u64,
            snapshot_running: false,
            sessions: Sessions::new(config.session_timeout),
            subscribers: Subscribers::default(),
            failed: None,
        };
        for entry in &tail {
            core.sequenced(entry.clone());
        }
        tracing::info!(
            cluster = %config.cluster,
            server = %config.server_id,
            users = core.state.user_count(),
            commit = %commit,
            uncommitted = tail.len(),
            "server state recovered"
        );
        // One more than the slots: the recovered tail holds none.
        let (commits, queue) = mpsc::channel(inflight + 1);
        let (durable_stage, durable_queue) = mpsc::channel(inflight + 1);
        let gate = Gate {
            generation: 0,
            upto: match role {
                Role::Master => Gate::OPEN,
                Role::Slave => commit,
            },
        };
        let (gate, gate_rx) = watch::channel(gate);
        let shared = Arc::new(Shared {
            streams: limits::StreamSlots::new(
                config.max_timeline_streams,
                config.max_timeline_streams_per_user.max(1),
            ),
            pacing: limits::PostPacing::new(config.max_posts_per_second),
            refused: sync::RemoteRefusals::default(),
            inflight: Arc::new(Semaphore::new(inflight)),
            config,
            storage,
            commits,
            commit_index: watch::channel(commit).0,
            durable_index: watch::channel(last).0,
            sequenced_index: watch::channel(LogIndex(core.next_index.0 - 1)).0,
            gate,
            mirror_target: watch::channel(None).0,
            listed_slaves: watch::channel(Roster::default()).0,
            refusals: Mutex::new(RefusalLog::default()),
            beat_now: Arc::new(Notify::new()),
            truncated: Notify::new(),
            fatal: watch::channel(None).0,
            joined: OnceLock::new(),
            core: Mutex::new(core),
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        });
        let weak = Arc::downgrade(&shared);
        let token = shared.shutdown.clone();
        shared.tasks.spawn(pipeline::run_durability(
            weak.clone(),
            queue,
            durable_stage,
            token.clone(),
        ));
        shared
            .tasks
            .spawn(pipeline::run_commits(weak, durable_queue, gate_rx, token));
        if !tail.is_empty() {
            // Already durable: the pipeline commits them once the gate passes them.
            let generation = 0;
            let pending = Pending {
                entries: tail,
                generation,
                durable: Box::pin(async { Ok(()) }),
                reply: None,
                _slots: None,
            };
            let _ = shared.commits.send(pending).await;
        }
        Ok(Self { shared })
    }

    /// Serves the client-facing gRPC services (`csce438.SNSService` and its `csce662` alias)
    /// and the replication service on `listener` until `shutdown` is cancelled, then stops
    /// every task of this server and returns once they have all finished.
    pub async fn serve(&self, listener: Listener, shutdown: CancellationToken) -> Result<()> {
        let routes = crate::grpc::sns::routes(self.clone())
            .add_service(crate::grpc::replication::service(self.clone()))
            .add_service(crate::grpc::sync::service(self.clone()));
        let stop = {
            let shutdown = shutdown.clone();
            let own = self.shared.shutdown.clone();
            async move {
                tokio::select! {
                    () = shutdown.cancelled() => {},
                    () = own.cancelled() => {},
                }
                // Timeline and mirroring streams are endless: end them so the graceful stop
                // can complete.
                own.cancel();
            }
        };
        let config = &self.shared.config;
        let listener = listener.limited(ConnectionLimits {
            max_connections: config.max_connections.max(1),
            handshake_timeout: config.handshake_timeout,
        });
        // HTTP/2 windows are at most 2^31 - 1 bytes (the library asserts it).
        let window = |bytes: u32| bytes.clamp(1, (1 << 31) - 1);
        let serving = crate::transport::server_builder()
            .max_concurrent_streams(Some(config.max_concurrent_streams))
            .initial_stream_window_size(Some(window(config.stream_window)))
            .initial_connection_window_size(Some(window(config.connection_window)))
            .add_routes(routes)
            .serve_with_incoming_shutdown(listener, stop);
        // A peer that neither reads nor closes must not hold the shutdown forever.
        let own = self.shared.shutdown.clone();
        let result = tokio::select! {
            result = serving => result,
            () = async {
                own.cancelled().await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => {
                tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; closing them");
                Ok(())
            }
        };
        self.close().await;
        result.map_err(|e| Error::Unavailable(format!("server transport failed: {e}")))
    }

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

    /// The current role.
    pub fn role(&self) -> Role {
        self.lock().role
    }

    /// Changes the role (driven by the coordinator). A master that stops being master discards
    /// its uncommitted entries; a server made master commits every entry it holds.
    pub fn set_role(&self, role: Role) {
        let mut core = self.lock();
        self.change_role(&mut core, role);
    }

    /// Where this server's log stands.
    pub fn positions(&self) -> LogPositions {
        let core = self.lock();
        LogPositions {
            role: core.role,
            epoch: core.epoch,
            known_epoch: core.known_epoch,
            sequenced: LogIndex(core.next_index.0 - 1),
            durable: core.durable,
            commit: core.commit,
            in_sync: core.replicas.in_sync(),
            counted_by_master: core.role == Role::Slave && core.counted_by_master,
        }
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

    fn change_role(&self, core: &mut Core, role: Role) {
        if core.role == role {
            return;
        }
        tracing::info!(
            cluster = %self.shared.config.cluster,
            server = %self.shared.config.server_id,
            from = ?core.role,
            to = ?role,
            "role changed"
        );
        if core.role == Role::Master {
            self.discard_uncommitted(core);
            core.replicas.clear(&*self.shared.storage);
        }
        core.role = role;
        core.counted_by_master = false;
        if role == Role::Slave {
            // Entries the new master has not confirmed wait for its commit index.
            self.set_gate(core, core.commit);
        } else {
            self.shared.mirror_target.send_replace(None);
            self.open_gate(core);
        }
    }

    /// Lets the pipeline commit up to `upto` in the current generation.
    fn set_gate(&self, core: &Core, upto: LogIndex) {
        self.shared.gate.send_replace(Gate {
            generation: core.generation,
            upto,
        });
    }

    /// On a master: the gate follows the slaves counted for the commit point.
    fn open_gate(&self, core: &Core) {
        let upto = core.replicas.quorum().unwrap_or(Gate::OPEN);
        self.set_gate(core, upto);
    }

    /// Drops every sequenced entry that has not committed: their callers get `Unavailable`,
    /// the state never saw them, and the log is truncated after the commit index. The
    /// truncation is queued after the entries' appends (storage serves calls in order), and
    /// writes (and mirroring) wait until it is done.
    fn discard_uncommitted(&self, core: &mut Core) {
        if core.next_index == core.commit.next() {
            return;
        }
        let discarded = core.next_index.0 - core.commit.0 - 1;
        tracing::warn!(
            cluster = %self.shared.config.cluster,
            server = %self.shared.config.server_id,
            commit = %core.commit,
            discarded,
            "discarding uncommitted entries"
        );
        self.forget_uncommitted(core);
        core.truncating = true;
        let commit = core.commit;
        let shared = Arc::downgrade(&self.shared);
        let storage = Arc::clone(&self.shared.storage);
        self.shared.tasks.spawn(async move {
            let result = storage.truncate_after(commit).await;
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let mut core = lock_core(&shared.core);
            core.truncating = false;
            if let Err(e) = result {
                storage_failed(
                    &shared,
                    &mut core,
                    format!("cannot discard uncommitted entries: {e}"),
                );
            }
            drop(core);
            shared.truncated.notify_waiters();
        });
    }

    /// The in-memory part of a discard: voids the pending entries (new generation) and
    /// rewinds the sequence to the commit index.
    fn forget_uncommitted(&self, core: &mut Core) {
        core.generation += 1;
        core.uncommitted.clear();
        core.recent.truncate_after(core.commit);
        core.next_index = core.commit.next();
        core.next_seq = core.state.high_water(self.shared.config.cluster) + 1;
        core.durable = core.durable.min(core.commit);
        core.last_at = core.state.latest_time();
        core.last_epoch = core.recent.last_epoch().unwrap_or(core.last_epoch);
        self.shared.sequenced_index.send_replace(core.commit);
        let upto = self.shared.gate.borrow().upto;
        self.set_gate(core, upto);
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        lock_core(&self.shared.core)
    }

    /// Logs `user` in, creating the user on first login. Refused while the user has a live
    /// session elsewhere.
    pub async fn login(&self, user: UserId) -> Result<()> {
        let slot = self.slot().await?;
        let wait = {
            let mut core = self.writable()?;
            // In a deployment a server serves its own cluster's users only (a standalone
            // server is the only cluster: it serves everyone).
            if !core.state.is_local(user) {
                let config = &self.shared.config;
                return Err(Error::invalid(format!(
                    "user {user} belongs to cluster {}; this server serves cluster {}",
                    crate::ids::ClusterId::of_user(user, config.clusters),
                    config.cluster
                )));
            }
            core.sessions.login(user, tokio::time::Instant::now())?;
            if core.uncommitted.has_user(&core.state, user) {
                None
            } else {
                Some(self.sequence(&mut core, slot, EventKind::UserJoined { user }))
            }
        };
        match wait {
            Some(wait) => finish(wait).await,
            None => Ok(()),
        }
    }

    /// Keeps `user`'s live session alive. A heartbeat never starts a session: for a user who
    /// is not logged in here it fails with [`Error::NotLoggedIn`], so nobody can keep a user
    /// locked out by heartbeating as them.
    pub fn heartbeat(&self, user: UserId) -> Result<()> {
        let mut core = self.readable()?;
        known(&core.state, user)?;
        if core.sessions.refresh(user, tokio::time::Instant::now()) {
            Ok(())
        } else {
            Err(Error::NotLoggedIn(user))
        }
    }

    /// Ends `user`'s session at once (nothing to end is fine; an unknown user is an error).
    pub fn logout(&self, user: UserId) -> Result<()> {
        let mut core = self.readable()?;
        known(&core.state, user)?;
        core.sessions.logout(user);
        Ok(())
    }

    /// Whether `user` has a live session.
    pub fn is_logged_in(&self, user: UserId) -> bool {
        self.lock()
            .sessions
            .is_alive(user, tokio::time::Instant::now())
    }

    /// `user` follows `target` (a username as typed).
    pub async fn follow(&self, user: UserId, target: &str) -> Result<()> {
        let slot = self.slot().await?;
        let wait = {
            let mut core = self.writable()?;
            let target = self.target(&mut core, user, target)?;
            if target == user {
                return Err(Error::SameClient);
            }
            if core.uncommitted.follows(&core.state, user, target) {
                return Err(Error::AlreadyFollowing);
            }
            let kind = EventKind::Followed {
                follower: user,
                followee: target,
            };
            self.sequence(&mut core, slot, kind)
        };
        finish(wait).await
    }

    /// `user` stops following `target` (a username as typed).
    pub async fn unfollow(&self, user: UserId, target: &str) -> Result<()> {
        let slot = self.slot().await?;
        let wait = {
            let mut core = self.writable()?;
            let target = self.target(&mut core, user, target)?;
            if target == user {
                return Err(Error::SameClient);
            }
            if !core.uncommitted.follows(&core.state, user, target) {
                return Err(Error::NotFollowing);
            }
            let kind = EventKind::Unfollowed {
                follower: user,
                followee: target,
            };
            self.sequence(&mut core, slot, kind)
        };
        finish(wait).await
    }

    /// All users and `user`'s followers.
    pub fn list(&self, user: UserId) -> Result<Listing> {
        let mut core = self.writable()?;
        known(&core.state, user)?;
        core.sessions.touch(user, tokio::time::Instant::now());
        Ok(Listing {
            all_users: core.state.users().collect(),
            followers: core.state.followers(user).collect(),
        })
    }

    /// `user` posts `text` (raw bytes as received: one trailing newline is stripped, at most
    /// 4096 bytes of UTF-8). Returns the post's id, or `None` for an empty line (ignored).
    pub async fn post(&self, user: UserId, text: &[u8]) -> Result<Option<EventId>> {
        self.post_keyed(user, text, None).await
    }

    /// [`Server::post`] with the client's idempotency key: a post of `user` already made under
    /// `key` (committed and among the user's last
    /// [`REMEMBERED_POST_KEYS`](crate::state::REMEMBERED_POST_KEYS) keyed posts, or sequenced
    /// and not yet committed) is not stored again; the answer is that post's id, once it is
    /// committed (`Unavailable` if it is discarded instead, as it would be for the original).
    pub async fn post_keyed(
        &self,
        user: UserId,
        text: &[u8],
        key: Option<PostKey>,
    ) -> Result<Option<EventId>> {
        let Some(text) = normalize_post_text(text)? else {
            return Ok(None);
        };
        let slot = self.slot().await?;
        let (id, wait) = {
            let mut guard = self.writable()?;
            let core = &mut *guard;
            core.knows(user)?;
            match key.and_then(|key| core.uncommitted.post_with_key(&core.state, user, key)) {
                Some(KeyedOriginal::Committed(id)) => return Ok(Some(id)),
                Some(KeyedOriginal::Uncommitted { id, outcome }) => (id, outcome),
                None => {
                    let id = EventId {
                        origin: self.shared.config.cluster,
                        seq: core.next_seq,
                    };
                    let kind = EventKind::Posted {
                        author: user,
                        text: Arc::from(text),
                        key,
                    };
                    (id, self.sequence(core, slot, kind))
                }
            }
        };
        // A retry's answer comes from the commit of its original, which a stopping server
        // never makes: stop waiting with it. (Nor does a server whose storage failed: a retry
        // of an original caught by the failure waits until the server stops.)
        tokio::select! {
            result = finish(wait) => result?,
            () = self.shared.shutdown.cancelled() => {
                return Err(Error::Unavailable("server is shutting down".to_string()));
            }
        }
        Ok(Some(id))
    }

    /// The posts `user` is shown on opening the timeline: the last 20 committed posts of the
    /// users they follow, newest first.
    pub fn recent_posts(&self, user: UserId) -> Result<Vec<Arc<Post>>> {
        let core = self.readable()?;
        known(&core.state, user)?;
        Ok(core.state.recent_timeline(user, RECENT_POSTS))
    }

    /// Opens `user`'s timeline: the last 20 committed posts (newest first), then live posts.
    pub fn open_timeline(&self, user: UserId) -> Result<TimelineFeed> {
        self.open_feed(user, |state| state.recent_timeline(user, RECENT_POSTS))
    }

    /// Resumes `user`'s timeline (a client reopening it after losing its server): up to
    /// `replay` of the newest committed posts (at most the timeline's cap), **oldest first**,
    /// then live posts. The client skips the ones it had and passes on the rest in order.
    pub fn resume_timeline(&self, user: UserId, replay: usize) -> Result<TimelineFeed> {
        self.open_feed(user, |state| {
            let mut recent = state.recent_timeline(user, replay);
            recent.reverse();
            recent
        })
    }

    /// Opens a feed of `user` that starts with `first`'s posts, then live posts.
    fn open_feed(
        &self,
        user: UserId,
        first: impl FnOnce(&State) -> Vec<Arc<Post>>,
    ) -> Result<TimelineFeed> {
        let slot = self.shared.streams.acquire(user)?;
        let mut core = self.writable()?;
        known(&core.state, user)?;
        // Only a logged-in user's stream opens (and then keeps the session alive).
        if !core.sessions.is_alive(user, tokio::time::Instant::now()) {
            return Err(Error::NotLoggedIn(user));
        }
        let recent: Vec<Arc<Post>> = first(&core.state);
        let subscription =
            core.subscribers
                .subscribe(user, self.shared.config.stream_queue, &recent);
        core.sessions
            .stream_opened(user, tokio::time::Instant::now());
        drop(core);
        let owner = Box::new(FeedHandle {
            shared: Arc::downgrade(&self.shared),
            _slot: slot,
        });
        Ok(TimelineFeed::new(user, subscription, owner))
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

    /// The user known by `target`, for a command of `user`.
    fn target(&self, core: &mut Core, user: UserId, target: &str) -> Result<UserId> {
        core.knows(user)?;
        core.sessions.touch(user, tokio::time::Instant::now());
        let target = UserId::parse(target)?;
        core.knows(target)?;
        Ok(target)
    }

    /// Waits for an in-flight slot (backpressure on writers while the commit path is full).
    async fn slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit> {
        Arc::clone(&self.shared.inflight)
            .acquire_owned()
            .await
            .map_err(|_| Error::Unavailable("server is shutting down".to_string()))
    }

    /// The core, if this server accepts client writes.
    fn writable(&self) -> Result<MutexGuard<'_, Core>> {
        let core = self.readable()?;
        if core.role != Role::Master {
            return Err(Error::Unavailable(
                "this server is not the master of its cluster".to_string(),
            ));
        }
        if core.truncating {
            return Err(Error::Unavailable(
                "this server is discarding uncommitted entries".to_string(),
            ));
        }
        Ok(core)
    }

    /// The core, if this server is healthy.
    fn readable(&self) -> Result<MutexGuard<'_, Core>> {
        let core = self.lock();
        if let Some(why) = &core.failed {
            return Err(Error::Unavailable(why.clone()));
        }
        if self.shared.shutdown.is_cancelled() {
            return Err(Error::Unavailable("server is shutting down".to_string()));
        }
        Ok(core)
    }

    /// Gives `kind` the next event id, time and log index, records its effect for validation
    /// and queues it for durability and commit. Must be called with the core locked (the order
    /// of calls is the log order).
    fn sequence(
        &self,
        core: &mut Core,
        slot: tokio::sync::OwnedSemaphorePermit,
        kind: EventKind,
    ) -> oneshot::Receiver<Result<()>> {
        let now = Timestamp::now()
            .0
            .saturating_add(self.shared.config.clock_offset_micros);
        let at = Timestamp(now.max(core.last_at.0 + 1));
        let id = EventId {
            origin: self.shared.config.cluster,
            seq: core.next_seq,
        };
        let entry = LogEntry {
            index: core.next_index,
            epoch: core.epoch,
            event: Event { id, at, kind },
        };
        core.sequenced(entry.clone());
        let durable = self.shared.storage.append(vec![entry.clone()]);
        self.shared.sequenced_index.send_replace(entry.index);
        let (reply, wait) = oneshot::channel();
        self.enqueue(Pending {
            entries: vec![entry],
            generation: core.generation,
            durable,
            reply: Some(reply),
            _slots: Some(slot),
        });
        wait
    }
}

impl Server {
    /// Hands sequenced entries to the commit pipeline. The queue cannot be full: every queued
    /// batch holds in-flight slots, of which there are fewer than its capacity.
    fn enqueue(&self, pending: Pending) {
        if let Err(e) = self.shared.commits.try_send(pending) {
            let pending = match e {
                mpsc::error::TrySendError::Full(p) | mpsc::error::TrySendError::Closed(p) => p,
            };
            if let Some(reply) = pending.reply {
                let _ = reply.send(Err(Error::Unavailable("server is shutting down".into())));
            }
        }
    }
}

/// Keeps the server informed when a feed closes, and holds the stream's slot.
struct FeedHandle {
    shared: Weak<Shared>,
    _slot: limits::StreamSlot,
}

impl FeedOwner for FeedHandle {
    fn feed_closed(&self, user: UserId, id: u64) {
        if let Some(shared) = self.shared.upgrade() {
            let mut core = lock_core(&shared.core);
            core.subscribers.unsubscribe(user, id);
            core.sessions
                .stream_closed(user, tokio::time::Instant::now());
        }
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
    let why = format!("storage failed, refusing requests: {why}");
    tracing::error!("{why}");
    if core.failed.is_none() {
        core.failed = Some(why.clone());
    }
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
    wait.await
        .map_err(|_| Error::Unavailable("server is shutting down".to_string()))?
}
