//! Client failover (DESIGN §6): a logged-in user's connection that survives the loss of its
//! server.
//!
//! A [`Session`] wraps a [`Client`] and replaces it when the server stops answering. Rules:
//! - Only a session routed by the coordinator ([`Target::Coordinator`]) fails over, and only
//!   from a lost server (an error for which [`Error::calls_for_reconnect`] holds: not master,
//!   shutting down, storage failed, connection lost, unreachable, nothing to serve yet); an
//!   answer such as [`Error::OverLimit`] or a bad command is passed through. It asks the coordinator again (one [`CoordinatorClient`], reused),
//!   logs in on the master it names (a live session there, [`Error::AlreadyLoggedIn`], is
//!   resumed by attaching to it), backing off between tries, and gives up after
//!   [`SessionConfig::patience`] with the last error. A [`Target::Direct`] session never fails
//!   over: errors pass through.
//! - One reconnect at a time. Every connection has a generation number; a caller whose
//!   connection was already replaced by someone else's reconnect just uses the new one.
//! - A command that met a lost server is retried on the new connection. A retried FOLLOW
//!   answered "already following" (UNFOLLOW: "not following") succeeded: the first attempt may
//!   have been applied before its answer was lost. FOLLOW and UNFOLLOW therefore take effect
//!   once, whatever the number of tries.
//! - A timeline reopened after a failover is resumed: the server replays as many of its newest
//!   posts as the session remembers delivering (up to the server's timeline cap), oldest
//!   first; the ones already delivered are recognised by post id (by author and time when the
//!   server sent no id) and suppressed, the others are passed on in order. So the reader never
//!   sees a post twice and misses none that arrived while it was away (unless more than the
//!   replay arrived). The memory for this is bounded: the keys of the last
//!   [`SessionConfig::remembered_posts`] delivered posts (at least
//!   [`RECENT_POSTS`](crate::state::RECENT_POSTS)).
//! - Nothing posted is lost or stored twice while the session lives. Each post gets the
//!   session's next idempotency key (a random 64-bit start, then consecutive) and stays in the
//!   timeline's queue until the server acknowledges it (it is committed). When the stream is
//!   lost, posts made meanwhile join the queue; once the timeline is reopened on the new master,
//!   every unacknowledged post is re-sent, in order and with its key, before any new post. The
//!   server stores a post re-sent under a key it knows no second time and acknowledges it with
//!   the original's id. The queue is bounded ([`SessionConfig::unacked_posts`], at most 64, as
//!   many keys as the server remembers per user): a poster beyond it waits for an
//!   acknowledgement (backpressure, not loss). Only when the session gives up is the queue
//!   abandoned ([`TimelinePoster::unacknowledged`] says how many posts were not stored).
//!   Acknowledgements arrive on the timeline stream, so a timeline that nobody reads holds up
//!   posting once its buffers are full.
//! - Every failover is reported as [`SessionEvent`]s ([`Session::subscribe`]), the first one as
//!   soon as the loss is noticed, so a user interface never freezes silently.
//! - Background work is owned: the heartbeat task stops on [`Session::logout`],
//!   [`Session::close`] or drop; a timeline's reader task stops when its [`SessionTimeline`]
//!   is dropped.

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::client::{Client, CoordinatorClient};
use crate::error::{Error, Result};
use crate::ids::{PostKey, UserId};
use crate::state::Listing;
use crate::state::REMEMBERED_POST_KEYS;
use crate::transport::Network;

mod timeline;

pub use timeline::{SessionTimeline, TimelinePoster};

/// Session events kept for a slow subscriber before it misses some.
const EVENT_BUFFER: usize = 64;

/// Posts read ahead of the timeline's consumer; beyond it the stream is not read
/// (backpressure).
const POST_BUFFER: usize = 64;

/// Where a session finds its server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The server at this address (`host:port`); no failover.
    Direct(String),
    /// The master that the coordinator at this address (`host:port`) names for the user;
    /// asked again when that server is lost.
    Coordinator(String),
}

/// Settings of a [`Session`]; the defaults suit the default server settings.
///
/// Non-exhaustive, so that fields can be added later: build it from `SessionConfig::default()` and
/// set the fields you need.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SessionConfig {
    /// Time between session heartbeats (the server expires a session after two missed ones).
    pub heartbeat_interval: Duration,
    /// How long a failover may take before the session gives up with the last error.
    pub patience: Duration,
    /// First pause between reconnect attempts; it doubles after each failed attempt...
    pub first_retry: Duration,
    /// ...up to this.
    pub max_retry: Duration,
    /// How many delivered posts a timeline remembers to suppress their replay after a
    /// reconnect (at least [`RECENT_POSTS`](crate::state::RECENT_POSTS)).
    pub remembered_posts: usize,
    /// How many posts a timeline keeps unacknowledged (sent, or waiting for a reopened stream)
    /// before [`TimelinePoster::post`] waits for an acknowledgement: from 1 to
    /// [`REMEMBERED_POST_KEYS`] (64; larger values count as 64), so the server still knows the
    /// key of every post re-sent after a failover.
    pub unacked_posts: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(3),
            patience: Duration::from_secs(10),
            first_retry: Duration::from_millis(100),
            max_retry: Duration::from_secs(1),
            remembered_posts: 1024,
            unacked_posts: REMEMBERED_POST_KEYS,
        }
    }
}

/// What a session reports about its connection, for a user interface to show. New events may
/// be added.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEvent {
    /// The server was lost; the session is looking for the master. Sent once per failover,
    /// as soon as the loss is noticed.
    Reconnecting {
        /// Why: the error that revealed the loss.
        reason: String,
    },
    /// The session is logged in again, on the server at `addr`.
    Reconnected {
        /// The new server's `host:port`.
        addr: String,
    },
    /// The failover failed; the operation that needed it returns `reason` as its error.
    GaveUp {
        /// The last error met.
        reason: String,
    },
}

/// Whether `error` says the server is lost (rather than answering the request).
fn is_server_lost(error: &Error) -> bool {
    error.calls_for_reconnect()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks: a poisoned one is still consistent.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The connection in use, and how many times it was replaced.
#[derive(Debug, Clone)]
struct Current {
    client: Client,
    generation: u64,
}

/// What a session and its timelines share.
#[derive(Debug)]
struct Inner {
    network: Network,
    user: UserId,
    coordinator: Option<CoordinatorClient>,
    config: SessionConfig,
    current: Mutex<Current>,
    /// Held for the whole of a reconnect, so there is one at a time.
    reconnecting: tokio::sync::Mutex<()>,
    events: broadcast::Sender<SessionEvent>,
    keys: PostKeys,
}

/// The idempotency keys of a session's posts: a random 64-bit start, then one more per post
/// (wrapping, skipping 0). Keys of one session never repeat (before 2^64 posts); two sessions
/// of a user (e.g. the client restarted) overlap only if their random starts fall within the
/// number of posts of each other, a chance of about (posts of both) / 2^64.
#[derive(Debug)]
struct PostKeys {
    next: AtomicU64,
}

impl PostKeys {
    fn new() -> Self {
        Self {
            next: AtomicU64::new(random_u64()),
        }
    }

    fn next(&self) -> PostKey {
        loop {
            if let Some(key) = PostKey::new(self.next.fetch_add(1, Ordering::Relaxed)) {
                return key;
            }
        }
    }
}

/// 64 random bits: SipHash under the process's random keys (std seeds them from the operating
/// system), over the clock and the process id.
fn random_u64() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    hasher.write_u128(since_epoch.as_nanos());
    hasher.write_u32(std::process::id());
    hasher.finish()
}

impl Inner {
    fn current(&self) -> Current {
        lock(&self.current).clone()
    }

    fn emit(&self, event: SessionEvent) {
        // No subscriber is fine: nobody is watching.
        let _ = self.events.send(event);
    }

    /// Whether this session fails over from `error`.
    fn fails_over(&self, error: &Error) -> bool {
        self.coordinator.is_some() && is_server_lost(error)
    }

    /// Replaces the connection of generation `used`, which failed with `reason`: asks the
    /// coordinator for the master and logs in there, until `deadline`. Returns at once with
    /// the current connection if `used` was already replaced.
    async fn reconnect(&self, used: u64, reason: Error, deadline: Instant) -> Result<Current> {
        let Some(coordinator) = &self.coordinator else {
            return Err(reason);
        };
        let _one_at_a_time = self.reconnecting.lock().await;
        let current = self.current();
        if current.generation != used {
            return Ok(current);
        }
        self.emit(SessionEvent::Reconnecting {
            reason: reason.to_string(),
        });
        let mut pause = self.config.first_retry;
        let mut last;
        loop {
            match self.resume(coordinator).await {
                Ok(client) => {
                    let addr = client.addr().to_string();
                    let current = {
                        let mut slot = lock(&self.current);
                        slot.client = client;
                        slot.generation += 1;
                        slot.clone()
                    };
                    tracing::info!(user = %self.user, %addr, "session resumed after failover");
                    self.emit(SessionEvent::Reconnected { addr });
                    return Ok(current);
                }
                Err(e) if is_server_lost(&e) => last = e,
                Err(e) => {
                    self.emit(SessionEvent::GaveUp {
                        reason: e.to_string(),
                    });
                    return Err(e);
                }
            }
            let now = Instant::now();
            if now >= deadline {
                self.emit(SessionEvent::GaveUp {
                    reason: last.to_string(),
                });
                return Err(last);
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(self.config.max_retry);
        }
    }

    /// One attempt: the coordinator's answer, then a login there (or, if the server still
    /// holds this user's session, attaching to it).
    async fn resume(&self, coordinator: &CoordinatorClient) -> Result<Client> {
        let addr = coordinator.locate(self.user).await?;
        match Client::login(&self.network, &addr, self.user).await {
            Err(Error::AlreadyLoggedIn(_)) => Client::attach(&self.network, &addr, self.user).await,
            other => other,
        }
    }

    /// Runs `attempt` on the current connection; after a lost server, reconnects and runs it
    /// again, until it gets an answer or the patience runs out. An error of a retry for which
    /// `applied` gives a value means the change was made by an earlier try: that value is the
    /// result. Returns the result and the generation of the connection that gave it.
    async fn with_failover<T, F, Fut>(
        &self,
        attempt: F,
        applied: impl Fn(&Error) -> Option<T>,
    ) -> Result<(T, u64)>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut current = self.current();
        let mut deadline = None;
        let mut retry = false;
        loop {
            let error = match attempt(current.client.clone()).await {
                Ok(value) => return Ok((value, current.generation)),
                Err(error) => error,
            };
            if retry && let Some(value) = applied(&error) {
                return Ok((value, current.generation));
            }
            if !self.fails_over(&error) {
                return Err(error);
            }
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + self.config.patience);
            current = self.reconnect(current.generation, error, deadline).await?;
            retry = true;
        }
    }
}

/// A logged-in user's connection that survives the loss of its server (see the module
/// documentation for the rules).
///
/// Found through the coordinator ([`Target::Coordinator`]), a session follows its user's
/// cluster to a new master by itself:
///
/// ```
/// use std::time::Duration;
///
/// use sns_core::session::{Session, SessionConfig, Target};
/// use sns_core::testing::TestCluster;
/// use sns_core::UserId;
///
/// # #[tokio::main]
/// # async fn main() -> sns_core::Result<()> {
/// // One cluster of a master and a slave, in memory (feature `test-util`).
/// let cluster = TestCluster::start(1).await?;
/// let coordinator = Target::Coordinator(cluster.coordinator_addr().to_string());
/// let (one, two) = (UserId::new(1).unwrap(), UserId::new(2).unwrap());
/// let connect = |user| {
///     Session::connect(cluster.network(), coordinator.clone(), user, SessionConfig::default())
/// };
/// let alice = connect(one).await?;
/// let bob = connect(two).await?;
/// alice.follow(two).await?;
/// let mut timeline = alice.timeline().await?;
/// // Keep the poster's timeline open until the post is through: a post is only queued when
/// // `post` returns, and closing the timeline drops what is still queued.
/// let bobs = bob.timeline().await?;
/// bobs.post("hello").await?;
/// let post = tokio::time::timeout(Duration::from_secs(10), timeline.next())
///     .await
///     .expect("the post in time")
///     .expect("a post")?;
/// assert_eq!((post.author, post.text.as_str()), (two, "hello"));
/// # drop((timeline, bobs));
/// # alice.close().await;
/// # bob.close().await;
/// # cluster.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Session {
    inner: Arc<Inner>,
    stop: CancellationToken,
    heartbeat: Mutex<Option<JoinHandle<()>>>,
    logged_out: AtomicBool,
}

impl Session {
    /// Logs `user` in on the server `target` names, reached through `network`, and starts
    /// the heartbeat. A failed first login returns its error as it is (no failover yet): e.g.
    /// [`Error::AlreadyLoggedIn`], or [`Error::Unavailable`] when the coordinator knows no
    /// master for the user.
    pub async fn connect(
        network: &Network,
        target: Target,
        user: UserId,
        config: SessionConfig,
    ) -> Result<Self> {
        let (client, coordinator) = match &target {
            Target::Direct(addr) => (Client::login(network, addr, user).await?, None),
            Target::Coordinator(addr) => {
                let coordinator = CoordinatorClient::new(network, addr)?;
                (coordinator.login(user).await?, Some(coordinator))
            }
        };
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let inner = Arc::new(Inner {
            network: network.clone(),
            user,
            coordinator,
            config,
            current: Mutex::new(Current {
                client,
                generation: 0,
            }),
            reconnecting: tokio::sync::Mutex::new(()),
            events,
            keys: PostKeys::new(),
        });
        let stop = CancellationToken::new();
        let heartbeat = tokio::spawn(heartbeat(Arc::clone(&inner), stop.clone()));
        Ok(Self {
            inner,
            stop,
            heartbeat: Mutex::new(Some(heartbeat)),
            logged_out: AtomicBool::new(false),
        })
    }

    /// The logged-in user.
    pub fn user(&self) -> UserId {
        self.inner.user
    }

    /// The address of the server in use now.
    pub fn addr(&self) -> String {
        self.inner.current().client.addr().to_string()
    }

    /// Events about the connection from now on (reconnecting, reconnected, gave up). A
    /// subscriber that falls more than 64 events behind misses the oldest.
    pub fn subscribe(&self) -> broadcast::Receiver<SessionEvent> {
        self.inner.events.subscribe()
    }

    fn ensure_logged_in(&self) -> Result<()> {
        if self.logged_out.load(Ordering::Acquire) {
            return Err(Error::NotLoggedIn(self.inner.user));
        }
        Ok(())
    }

    /// Follows `target`, failing over if needed; succeeds once the follow is made, even if
    /// an answer was lost on the way.
    pub async fn follow(&self, target: UserId) -> Result<()> {
        self.ensure_logged_in()?;
        let applied = |e: &Error| matches!(e, Error::AlreadyFollowing).then_some(());
        let attempt = |client: Client| async move { client.follow(target).await };
        self.inner.with_failover(attempt, applied).await?;
        Ok(())
    }

    /// Stops following `target`, failing over if needed; succeeds once the unfollow is made,
    /// even if an answer was lost on the way.
    pub async fn unfollow(&self, target: UserId) -> Result<()> {
        self.ensure_logged_in()?;
        let applied = |e: &Error| matches!(e, Error::NotFollowing).then_some(());
        let attempt = |client: Client| async move { client.unfollow(target).await };
        self.inner.with_failover(attempt, applied).await?;
        Ok(())
    }

    /// All users and this user's followers, failing over if needed.
    pub async fn list(&self) -> Result<Listing> {
        self.ensure_logged_in()?;
        let attempt = |client: Client| async move { client.list().await };
        Ok(self.inner.with_failover(attempt, |_| None).await?.0)
    }

    /// Opens the timeline (failing over if needed): the last 20 posts, newest first, then new
    /// ones live; reopened on the new master after a failover, without repeating a post.
    pub async fn timeline(&self) -> Result<SessionTimeline> {
        self.ensure_logged_in()?;
        let attempt = |client: Client| async move { client.timeline().await };
        let ((sender, stream), generation) = self.inner.with_failover(attempt, |_| None).await?;
        Ok(SessionTimeline::start(
            Arc::clone(&self.inner),
            sender,
            stream,
            generation,
        ))
    }

    /// Ends the session on the server (the course's `terminated` unfollow) and stops the
    /// heartbeat. Calling it again does nothing; afterwards commands answer
    /// [`Error::NotLoggedIn`]. No failover: if the server is lost, the error is returned
    /// and the session there expires on its own.
    pub async fn logout(&self) -> Result<()> {
        if self.logged_out.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.stop_heartbeat().await;
        self.inner.current().client.logout().await
    }

    /// Stops the heartbeat and waits for it, without logging out (the server expires the
    /// session after its timeout). Open timelines keep working until dropped.
    pub async fn close(self) {
        self.stop_heartbeat().await;
    }

    async fn stop_heartbeat(&self) {
        self.stop.cancel();
        let running = lock(&self.heartbeat).take();
        if let Some(running) = running {
            // It ends at the cancellation; an abort or panic of the task is nothing to report.
            let _ = running.await;
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(running) = lock(&self.heartbeat).take() {
            running.abort();
        }
    }
}

/// Keeps the session alive on whichever server is current. A failed beat is not acted on:
/// the next command or the timeline notices a lost server and fails over.
async fn heartbeat(inner: Arc<Inner>, stop: CancellationToken) {
    let every = inner
        .config
        .heartbeat_interval
        .max(Duration::from_millis(10));
    let mut ticks = tokio::time::interval_at(Instant::now() + every, every);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let client = inner.current().client;
        tokio::select! {
            () = stop.cancelled() => return,
            _ = client.heartbeat() => {}
        }
    }
}
