//! The server: the semantics of the client-facing service (DESIGN §4) over a durable log.
//!
//! Write path: a command is validated against the current state and sequenced under one lock
//! (event id, log index, time), applied to the in-memory state and queued on the storage in log
//! order. The commit task then waits for durability in the same order and only then marks the
//! entry committed, fans posts out to online followers and answers the caller. So nothing is
//! acknowledged or delivered live before it is durable, and concurrent writers share fsyncs.
//! Reads see the sequenced state; a timeline opened now shows only committed posts.

mod heartbeat;
mod sessions;
mod timeline;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use heartbeat::CoordinatorLink;
pub use timeline::TimelineFeed;

use crate::error::{Error, Result};
use crate::event::{Event, EventKind, LogEntry, Post, normalize_post_text};
use crate::ids::{ClusterId, Epoch, EventId, LogIndex, ServerId, Timestamp, UserId};
use crate::state::{Applied, DEFAULT_TIMELINE_CAP, State, StateConfig};
use crate::storage::{Durable, Snapshot, Storage};
use sessions::Sessions;
use timeline::{FeedOwner, Subscribers};

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
    /// Most timeline streams open at once on this server.
    pub max_timeline_streams: usize,
    /// Posts queued per timeline stream before the reader counts as fallen behind.
    pub stream_queue: usize,
    /// Most posts per second accepted on one timeline stream (excess is slowed down).
    pub max_posts_per_second: u32,
    /// Most concurrent HTTP/2 streams per client connection.
    pub max_concurrent_streams: u32,
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
            max_timeline_streams: 10_000,
            stream_queue: 1024,
            max_posts_per_second: 1000,
            max_concurrent_streams: 256,
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

/// An entry sequenced but not yet durable, with what to do once it is.
struct Pending {
    id: EventId,
    durable: Durable,
    applied: Applied,
    reply: oneshot::Sender<Result<()>>,
}

/// Everything guarded by the server's one lock.
struct Core {
    state: State,
    epoch: Epoch,
    role: Role,
    next_index: LogIndex,
    next_seq: u64,
    last_at: Timestamp,
    /// Highest committed sequence number per origin (a timeline opened now shows no more).
    committed: BTreeMap<ClusterId, u64>,
    entries_since_snapshot: u64,
    sessions: Sessions,
    subscribers: Subscribers,
    /// Set when the storage failed: the state may be ahead of the disk, so refuse everything.
    failed: Option<String>,
}

struct Shared {
    config: ServerConfig,
    storage: Arc<dyn Storage>,
    core: Mutex<Core>,
    commits: mpsc::UnboundedSender<Pending>,
    streams: Arc<Semaphore>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
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
    /// Opens a server on `storage`: recovers the snapshot and log, and starts the commit task.
    /// A standalone server is master.
    pub async fn open(config: ServerConfig, storage: Arc<dyn Storage>) -> Result<Self> {
        let recovered = storage.recover().await?;
        let state = recovered.replay(&config.state_config())?;
        let last = recovered.entries.last();
        let epoch = last
            .map(|e| e.epoch)
            .or(recovered.snapshot.as_ref().map(|s| s.epoch))
            .unwrap_or(Epoch(0));
        let last_at = state.latest_time();
        let committed = state.origins().map(|o| (o, state.high_water(o))).collect();
        let core = Core {
            next_index: recovered.last_index().next(),
            next_seq: state.high_water(config.cluster) + 1,
            state,
            epoch,
            role: Role::Master,
            last_at,
            committed,
            entries_since_snapshot: recovered.entries.len() as u64,
            sessions: Sessions::new(config.session_timeout),
            subscribers: Subscribers::default(),
            failed: None,
        };
        tracing::info!(
            cluster = %config.cluster,
            server = %config.server_id,
            users = core.state.user_count(),
            next_index = %core.next_index,
            "server state recovered"
        );
        let (commits, queue) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            streams: Arc::new(Semaphore::new(config.max_timeline_streams)),
            config,
            storage,
            core: Mutex::new(core),
            commits,
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        });
        let weak = Arc::downgrade(&shared);
        let token = shared.shutdown.clone();
        shared.tasks.spawn(run_commits(weak, queue, token));
        Ok(Self { shared })
    }

    /// Serves the client-facing gRPC services (`csce438.SNSService` and its `csce662` alias)
    /// on `listener` until `shutdown` is cancelled, then stops every task of this server and
    /// returns once they have all finished.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) -> Result<()> {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let routes = crate::grpc::sns::routes(self.clone());
        let stop = {
            let shutdown = shutdown.clone();
            let own = self.shared.shutdown.clone();
            async move {
                tokio::select! {
                    () = shutdown.cancelled() => {},
                    () = own.cancelled() => {},
                }
                // Timeline streams are endless: end them so the graceful stop can complete.
                own.cancel();
            }
        };
        let serving = tonic::transport::Server::builder()
            .max_concurrent_streams(Some(self.shared.config.max_concurrent_streams))
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, stop);
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

    /// Stops the commit task and every timeline stream, and waits for them to finish.
    pub async fn close(&self) {
        self.shared.shutdown.cancel();
        self.lock().subscribers.clear();
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
    }

    /// This server's configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.shared.config
    }

    /// The current role.
    pub fn role(&self) -> Role {
        self.lock().role
    }

    /// Changes the role (driven by the coordinator).
    pub fn set_role(&self, role: Role) {
        self.lock().role = role;
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        lock_core(&self.shared.core)
    }

    /// Logs `user` in, creating the user on first login. Refused while the user has a live
    /// session elsewhere.
    pub async fn login(&self, user: UserId) -> Result<()> {
        let wait = {
            let mut core = self.writable()?;
            core.sessions.login(user, tokio::time::Instant::now())?;
            if core.state.has_user(user) {
                None
            } else {
                Some(self.sequence(&mut core, EventKind::UserJoined { user }))
            }
        };
        match wait {
            Some(wait) => finish(wait).await,
            None => Ok(()),
        }
    }

    /// Keeps `user`'s session alive.
    pub fn heartbeat(&self, user: UserId) -> Result<()> {
        let mut core = self.readable()?;
        known(&core.state, user)?;
        core.sessions.touch(user, tokio::time::Instant::now());
        Ok(())
    }

    /// Ends `user`'s session at once.
    pub fn logout(&self, user: UserId) -> Result<()> {
        let mut core = self.readable()?;
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
        let wait = {
            let mut core = self.writable()?;
            let target = self.target(&mut core, user, target)?;
            if target == user {
                return Err(Error::SameClient);
            }
            if core.state.follows(user, target) {
                return Err(Error::AlreadyFollowing);
            }
            let kind = EventKind::Followed {
                follower: user,
                followee: target,
            };
            self.sequence(&mut core, kind)
        };
        finish(wait).await
    }

    /// `user` stops following `target` (a username as typed).
    pub async fn unfollow(&self, user: UserId, target: &str) -> Result<()> {
        let wait = {
            let mut core = self.writable()?;
            let target = self.target(&mut core, user, target)?;
            if target == user {
                return Err(Error::SameClient);
            }
            if !core.state.follows(user, target) {
                return Err(Error::NotFollowing);
            }
            let kind = EventKind::Unfollowed {
                follower: user,
                followee: target,
            };
            self.sequence(&mut core, kind)
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
        let Some(text) = normalize_post_text(text)? else {
            return Ok(None);
        };
        let (id, wait) = {
            let mut core = self.writable()?;
            known(&core.state, user)?;
            let id = EventId {
                origin: self.shared.config.cluster,
                seq: core.next_seq,
            };
            let kind = EventKind::Posted {
                author: user,
                text: Arc::from(text),
            };
            (id, self.sequence(&mut core, kind))
        };
        finish(wait).await?;
        Ok(Some(id))
    }

    /// Opens `user`'s timeline: the last 20 committed posts (newest first), then live posts.
    pub fn open_timeline(&self, user: UserId) -> Result<TimelineFeed> {
        let permit = Arc::clone(&self.shared.streams)
            .try_acquire_owned()
            .map_err(|_| Error::Unavailable("too many timeline streams open".to_string()))?;
        let mut core = self.writable()?;
        known(&core.state, user)?;
        let recent: Vec<Arc<Post>> = core
            .state
            .recent_timeline(user, core.state.timeline_cap())
            .into_iter()
            .filter(|post| is_committed(&core.committed, post))
            .take(RECENT_POSTS)
            .collect();
        let subscription =
            core.subscribers
                .subscribe(user, self.shared.config.stream_queue, &recent);
        core.sessions
            .stream_opened(user, tokio::time::Instant::now());
        drop(core);
        let owner = Box::new(FeedHandle {
            shared: Arc::downgrade(&self.shared),
            _permit: permit,
        });
        Ok(TimelineFeed::new(user, subscription, owner))
    }

    /// A task tracker and shutdown signal for work tied to this server's lifetime.
    pub(crate) fn tasks(&self) -> (&TaskTracker, &CancellationToken) {
        (&self.shared.tasks, &self.shared.shutdown)
    }

    /// The per-stream post rate limit.
    pub(crate) fn max_posts_per_second(&self) -> u32 {
        self.shared.config.max_posts_per_second
    }

    /// The user known by `target`, for a command of `user`.
    fn target(&self, core: &mut Core, user: UserId, target: &str) -> Result<UserId> {
        known(&core.state, user)?;
        core.sessions.touch(user, tokio::time::Instant::now());
        let target = UserId::parse(target)?;
        known(&core.state, target)?;
        Ok(target)
    }

    /// The core, if this server accepts client writes.
    fn writable(&self) -> Result<MutexGuard<'_, Core>> {
        let core = self.readable()?;
        if core.role != Role::Master {
            return Err(Error::Unavailable(
                "this server is not the master of its cluster".to_string(),
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

    /// Gives `kind` the next event id, time and log index, applies it and queues it for
    /// durability. Must be called with the core locked (the order of calls is the log order).
    fn sequence(&self, core: &mut Core, kind: EventKind) -> oneshot::Receiver<Result<()>> {
        let at = Timestamp(Timestamp::now().0.max(core.last_at.0 + 1));
        let id = EventId {
            origin: self.shared.config.cluster,
            seq: core.next_seq,
        };
        let entry = LogEntry {
            index: core.next_index,
            epoch: core.epoch,
            event: Event { id, at, kind },
        };
        let applied = core.state.apply(&entry.event);
        debug_assert!(!matches!(applied, Applied::Duplicate | Applied::Gap { .. }));
        core.next_index = core.next_index.next();
        core.next_seq += 1;
        core.last_at = at;
        let durable = self.shared.storage.append(vec![entry]);
        let (reply, wait) = oneshot::channel();
        let pending = Pending {
            id,
            durable,
            applied,
            reply,
        };
        if let Err(mpsc::error::SendError(pending)) = self.shared.commits.send(pending) {
            let _ = pending
                .reply
                .send(Err(Error::Unavailable("server is shutting down".into())));
        }
        wait
    }
}

/// Keeps the server informed when a feed closes, and holds the stream's slot.
struct FeedHandle {
    shared: Weak<Shared>,
    _permit: tokio::sync::OwnedSemaphorePermit,
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

fn is_committed(committed: &BTreeMap<ClusterId, u64>, post: &Post) -> bool {
    committed
        .get(&post.id.origin)
        .is_some_and(|seq| post.id.seq <= *seq)
}

async fn finish(wait: oneshot::Receiver<Result<()>>) -> Result<()> {
    wait.await
        .map_err(|_| Error::Unavailable("server is shutting down".to_string()))?
}

/// Waits for each sequenced entry to become durable, in log order; then marks it committed,
/// delivers posts to online followers and answers the caller.
async fn run_commits(
    shared: Weak<Shared>,
    mut queue: mpsc::UnboundedReceiver<Pending>,
    shutdown: CancellationToken,
) {
    loop {
        let pending = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            next = queue.recv() => match next {
                Some(pending) => pending,
                None => break,
            },
        };
        let Pending {
            id,
            durable,
            applied,
            reply,
        } = pending;
        let result = tokio::select! {
            result = durable => result,
            () = shutdown.cancelled() => break,
        };
        let Some(shared) = shared.upgrade() else {
            break;
        };
        let snapshot = {
            let mut core = lock_core(&shared.core);
            if let Err(e) = &result {
                let why = format!("storage failed, refusing requests: {e}");
                tracing::error!("{why}");
                core.failed = Some(why);
            } else {
                core.committed.insert(id.origin, id.seq);
                if let Applied::Posted(post) = &applied {
                    fan_out(&mut core, post);
                }
                core.entries_since_snapshot += 1;
            }
            take_snapshot_if_due(&shared.config, &mut core)
        };
        let _ = reply.send(result);
        if let Some(snapshot) = snapshot {
            let index = snapshot.index;
            match shared.storage.save_snapshot(snapshot).await {
                Ok(()) => tracing::info!(%index, "snapshot saved, log compacted"),
                Err(e) => tracing::warn!(%index, "snapshot failed (the log is intact): {e}"),
            }
        }
    }
}

fn take_snapshot_if_due(config: &ServerConfig, core: &mut Core) -> Option<Snapshot> {
    if core.failed.is_some() || core.entries_since_snapshot < config.snapshot_every {
        return None;
    }
    core.entries_since_snapshot = 0;
    let last = LogIndex(core.next_index.0 - 1);
    Some(Snapshot::of(&core.state, last, core.epoch))
}

/// Delivers a committed post to the online users whose timeline received it, iterating over
/// whichever is smaller: the author's followers or the online users.
fn fan_out(core: &mut Core, post: &Arc<Post>) {
    let Core {
        state, subscribers, ..
    } = core;
    if subscribers.online_users() == 0 {
        return;
    }
    let receives = |user: UserId| state.timeline_contains(user, post);
    if subscribers.online_users() < state.follower_count(post.author) {
        let online: Vec<UserId> = subscribers.users().filter(|u| receives(*u)).collect();
        for user in online {
            subscribers.deliver(user, post);
        }
    } else {
        for user in state.followers(post.author) {
            if subscribers.is_online(user) && receives(user) {
                subscribers.deliver(user, post);
            }
        }
    }
}
