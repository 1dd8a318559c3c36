//! Client failover (DESIGN §6): a logged-in user's connection that survives the loss of its
//! server.
//!
//! A [`Session`] wraps a [`Client`] and replaces it when the server stops answering. Rules:
//! - Only a session routed by the coordinator ([`Target::Coordinator`]) fails over, and only
//!   from a lost server ([`Error::Unavailable`]: connection lost, not master, shutting down;
//!   [`Error::Unreachable`]). It asks the coordinator again (one [`CoordinatorClient`], reused),
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
//!   [`SessionConfig::remembered_posts`] delivered posts (at least [`RECENT_POSTS`]).
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

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::client::{
    Client, CoordinatorClient, ReceivedPost, TIMELINE_SEND_BUFFER, TimelineMessage, TimelineSender,
    TimelineStream,
};
use crate::error::{Error, Result};
use crate::event::normalize_post_text;
use crate::ids::{PostId, PostKey, Timestamp, UserId};
use crate::state::REMEMBERED_POST_KEYS;
use crate::state::{Listing, RECENT_POSTS};
use crate::transport::Network;

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
#[derive(Debug, Clone)]
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
    /// reconnect (at least [`RECENT_POSTS`]).
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

/// What a session reports about its connection, for a user interface to show.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// An open timeline of a [`Session`]: post with [`SessionTimeline::post`], read with
/// [`SessionTimeline::next`]. A reader task (owned; stopped when this is dropped) reads the
/// stream, takes in acknowledgements, reopens the stream after a failover (re-sending the posts
/// not acknowledged) and suppresses posts already delivered.
#[derive(Debug)]
pub struct SessionTimeline {
    posts: mpsc::Receiver<Result<ReceivedPost>>,
    poster: TimelinePoster,
    reader: JoinHandle<()>,
}

impl SessionTimeline {
    fn start(
        inner: Arc<Inner>,
        sender: TimelineSender,
        stream: TimelineStream,
        generation: u64,
    ) -> Self {
        let room = unacked_bound(inner.config.unacked_posts);
        let outbound = Arc::new(Outbound {
            queue: Mutex::new(Queue {
                sender: Some(sender),
                unacked: VecDeque::with_capacity(room),
            }),
            sending: tokio::sync::Mutex::new(()),
            room: Arc::new(Semaphore::new(room)),
            closing: AtomicBool::new(false),
            fails_over: inner.coordinator.is_some(),
        });
        let (posts_tx, posts) = mpsc::channel(POST_BUFFER);
        let reader = Reader {
            delivered: Delivered::new(inner.config.remembered_posts),
            inner: Arc::clone(&inner),
            outbound: Arc::clone(&outbound),
            posts: posts_tx,
        };
        Self {
            posts,
            poster: TimelinePoster { inner, outbound },
            reader: tokio::spawn(reader.run(stream, generation)),
        }
    }

    /// Posts `text` (see [`TimelinePoster::post`]).
    pub async fn post(&self, text: &str) -> Result<()> {
        self.poster.post(text).await
    }

    /// A handle for posting from another task while this one reads.
    pub fn poster(&self) -> TimelinePoster {
        self.poster.clone()
    }

    /// Closes the sending side (see [`TimelinePoster::close`]).
    pub fn close_sending(&self) {
        self.poster.close();
    }

    /// The next post not delivered before. `None` once the stream has ended cleanly (the
    /// sending side was closed and the server acknowledged every post); an error ends the
    /// stream (the server was lost and no failover was possible, or the server refused a post).
    pub async fn next(&mut self) -> Option<Result<ReceivedPost>> {
        self.posts.recv().await
    }
}

impl Drop for SessionTimeline {
    fn drop(&mut self) {
        self.reader.abort();
        // Posters still holding a handle stop waiting for room that would never come.
        self.poster.outbound.end();
    }
}

/// The bound on unacknowledged posts actually used for `configured`: at least 1, and at most
/// what the server remembers keys for ([`REMEMBERED_POST_KEYS`], so every re-sent post is
/// recognised) and what a stream's sender buffers ([`TIMELINE_SEND_BUFFER`], so neither a
/// post nor a re-send ever waits on the sender while holding the sending order).
fn unacked_bound(configured: usize) -> usize {
    configured
        .clamp(1, REMEMBERED_POST_KEYS)
        .min(TIMELINE_SEND_BUFFER)
}

/// The sending side of an open timeline, shared by its posters and its reader.
#[derive(Debug)]
struct Outbound {
    queue: Mutex<Queue>,
    /// Held while posts are put on a stream (a poster's one post, or the reader's re-sending
    /// of every unacknowledged post to a reopened stream before it is used), so a stream
    /// carries posts in queue order and re-sent posts before new ones. Never held while waiting
    /// for room or for the network: sends cannot wait (see [`unacked_bound`]).
    sending: tokio::sync::Mutex<()>,
    /// Free places in `Queue::unacked`; a poster waits for one (backpressure). Closed when the
    /// timeline ends for good.
    room: Arc<Semaphore>,
    /// Set by [`TimelinePoster::close`].
    closing: AtomicBool,
    /// Whether the session fails over (posts are then kept and re-sent after a failover).
    fails_over: bool,
}

/// The current stream's sender and the posts it has not acknowledged.
#[derive(Debug)]
struct Queue {
    /// `None` while reconnecting, or once closed or ended.
    sender: Option<TimelineSender>,
    /// Posts sent (or waiting for the reopened stream) and not acknowledged, oldest first.
    unacked: VecDeque<Unacked>,
}

/// A post not acknowledged yet; it holds its place in the queue until it is.
#[derive(Debug)]
struct Unacked {
    key: PostKey,
    text: String,
    _room: OwnedSemaphorePermit,
}

impl Outbound {
    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    fn unacked(&self) -> usize {
        lock(&self.queue).unacked.len()
    }

    /// The server stored the post sent with `key`, and so every post sent before it on the
    /// same stream (it handles a stream's posts in order): they leave the queue.
    fn acknowledged(&self, key: PostKey) {
        let mut queue = lock(&self.queue);
        if let Some(at) = queue.unacked.iter().position(|post| post.key == key) {
            queue.unacked.drain(..=at);
        }
    }

    /// No stream any more: posters get an error instead of waiting.
    fn end(&self) {
        lock(&self.queue).sender = None;
        self.room.close();
    }
}

fn closed_for_posting() -> Error {
    Error::ConnectionLost("the timeline is closed for posting".to_string())
}

/// Posts on a [`SessionTimeline`]; cloneable, for posting from another task than the reader.
#[derive(Debug, Clone)]
pub struct TimelinePoster {
    inner: Arc<Inner>,
    outbound: Arc<Outbound>,
}

impl TimelinePoster {
    /// Posts `text`: one line, at most 4096 bytes (else [`Error::InvalidInput`], nothing
    /// sent); empty lines are ignored. The post gets the session's next key and is kept until
    /// the server acknowledges it; after a failover it is re-sent on the reopened stream, so it
    /// is stored exactly once. Returns once the post is sent, or queued while the timeline
    /// reconnects; waits first while [`SessionConfig::unacked_posts`] posts are
    /// unacknowledged. Fails if the timeline has ended or was closed for posting, and (a
    /// session that does not fail over) if the stream is broken.
    pub async fn post(&self, text: &str) -> Result<()> {
        let Some(text) = normalize_post_text(text.as_bytes())? else {
            return Ok(());
        };
        let room = Arc::clone(&self.outbound.room)
            .acquire_owned()
            .await
            .map_err(|_| closed_for_posting())?;
        let _order = self.outbound.sending.lock().await;
        let key = self.inner.keys.next();
        let sender = {
            let mut queue = lock(&self.outbound.queue);
            if self.outbound.is_closing() {
                return Err(closed_for_posting());
            }
            queue.unacked.push_back(Unacked {
                key,
                text: text.to_string(),
                _room: room,
            });
            queue.sender.clone()
        };
        let Some(sender) = sender else {
            // Reconnecting: the reader sends it on the reopened stream.
            return Ok(());
        };
        match sender.post_keyed(text, key).await {
            Ok(()) => Ok(()),
            // The stream broke: the reader notices and re-sends the post on the reopened one.
            Err(_) if self.outbound.fails_over => Ok(()),
            Err(e) => {
                let mut queue = lock(&self.outbound.queue);
                if queue.unacked.back().is_some_and(|post| post.key == key) {
                    queue.unacked.pop_back();
                }
                Err(e)
            }
        }
    }

    /// How many posts are not acknowledged yet: sent and not known to be stored, or waiting
    /// for a reopened stream. If the timeline ends with an error, these were not stored.
    pub fn unacknowledged(&self) -> usize {
        self.outbound.unacked()
    }

    /// Closes the sending side: the server ends the stream once it has stored every post
    /// sent before (after a failover, once the unacknowledged ones are re-sent and stored),
    /// and [`SessionTimeline::next`] then returns `None`.
    pub fn close(&self) {
        // Under the queue's lock, so a reopened stream is never handed out after this.
        let mut queue = lock(&self.outbound.queue);
        self.outbound.closing.store(true, Ordering::Release);
        queue.sender = None;
    }
}

/// The timeline's reader task.
struct Reader {
    inner: Arc<Inner>,
    outbound: Arc<Outbound>,
    posts: mpsc::Sender<Result<ReceivedPost>>,
    delivered: Delivered,
}

impl Reader {
    async fn run(mut self, mut stream: TimelineStream, mut generation: u64) {
        loop {
            let Some(broken) = self.deliver(&mut stream).await else {
                self.outbound.end();
                return;
            };
            let everything_stored = self.outbound.unacked() == 0;
            if self.outbound.is_closing() && everything_stored {
                // Closed, and the server has every post: the stream's end changes nothing.
                self.outbound.end();
                return;
            }
            if !self.inner.fails_over(&broken) {
                self.end(broken).await;
                return;
            }
            // Posts made from now on wait in the queue for the reopened stream.
            lock(&self.outbound.queue).sender = None;
            match self.reopen(generation, broken).await {
                Ok((reopened, sender, next)) => {
                    self.resend(sender).await;
                    stream = next;
                    generation = reopened;
                }
                Err(e) => {
                    self.end(e).await;
                    return;
                }
            }
        }
    }

    /// Ends the timeline with `error`, after which posting fails.
    async fn end(&self, error: Error) {
        self.outbound.end();
        let _ = self.posts.send(Err(error)).await;
    }

    /// Passes on the stream's posts not delivered before and takes in acknowledgements;
    /// returns the error that broke the stream, or `None` when it ended cleanly or nobody
    /// reads any more.
    async fn deliver(&mut self, stream: &mut TimelineStream) -> Option<Error> {
        loop {
            match stream.next_message().await {
                Some(Ok(TimelineMessage::Post(post))) => {
                    if self.delivered.first_time(&post) && self.posts.send(Ok(post)).await.is_err()
                    {
                        return None;
                    }
                }
                Some(Ok(TimelineMessage::Ack(ack))) => self.outbound.acknowledged(ack.key),
                Some(Err(e)) => return Some(e),
                None if self.outbound.is_closing() && self.outbound.unacked() == 0 => return None,
                // A stream that ends while posts wait for their acknowledgement (e.g. a server
                // shutting down) is as good as broken.
                None => {
                    return Some(Error::ConnectionLost(
                        "the server ended the timeline stream".to_string(),
                    ));
                }
            }
        }
    }

    /// Puts every unacknowledged post, in order and with its key, on the reopened stream, then
    /// hands the stream to the posters (or, once closed for posting, drops it so the server
    /// ends the stream after the re-sent posts).
    async fn resend(&self, sender: TimelineSender) {
        let _order = self.outbound.sending.lock().await;
        let unacked: Vec<(PostKey, String)> = lock(&self.outbound.queue)
            .unacked
            .iter()
            .map(|post| (post.key, post.text.clone()))
            .collect();
        if !unacked.is_empty() {
            tracing::info!(
                user = %self.inner.user,
                posts = unacked.len(),
                "re-sending unacknowledged posts"
            );
        }
        for (key, text) in unacked {
            if sender.post_keyed(&text, key).await.is_err() {
                // Broken already: the stream's end says so, and the next reopen re-sends.
                break;
            }
        }
        let mut queue = lock(&self.outbound.queue);
        if !self.outbound.is_closing() {
            queue.sender = Some(sender);
        }
    }

    /// Fails over and opens the timeline on the new master.
    async fn reopen(
        &self,
        mut used: u64,
        mut reason: Error,
    ) -> Result<(u64, TimelineSender, TimelineStream)> {
        let deadline = Instant::now() + self.inner.config.patience;
        loop {
            let current = self.inner.reconnect(used, reason, deadline).await?;
            match current
                .client
                .resume_timeline(self.delivered.capacity)
                .await
            {
                Ok((sender, stream)) => return Ok((current.generation, sender, stream)),
                Err(e) if is_server_lost(&e) && Instant::now() < deadline => {
                    used = current.generation;
                    reason = e;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// How a delivered post is recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Seen {
    /// By id, when the server sent one.
    Id(PostId),
    /// By author and server-assigned time (unique per author) otherwise.
    AuthorTime(UserId, Timestamp),
}

impl Seen {
    fn of(post: &ReceivedPost) -> Self {
        match post.id {
            Some(id) => Self::Id(id),
            None => Self::AuthorTime(post.author, post.at),
        }
    }
}

/// The keys of the last `capacity` delivered posts: bounded memory, enough to recognise a
/// replay of the newest [`RECENT_POSTS`].
#[derive(Debug)]
struct Delivered {
    order: VecDeque<Seen>,
    keys: HashSet<Seen>,
    capacity: usize,
}

impl Delivered {
    fn new(capacity: usize) -> Self {
        let capacity = capacity.max(RECENT_POSTS);
        Self {
            order: VecDeque::with_capacity(capacity),
            keys: HashSet::with_capacity(capacity),
            capacity,
        }
    }

    /// Records `post` as delivered; `false` if it was delivered already.
    fn first_time(&mut self, post: &ReceivedPost) -> bool {
        let key = Seen::of(post);
        if !self.keys.insert(key) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.keys.remove(&oldest);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ClusterId;

    fn post(seq: Option<u64>, author: u32, at: i64) -> ReceivedPost {
        ReceivedPost {
            id: seq.map(|seq| PostId {
                origin: ClusterId::new(1).expect("cluster"),
                seq,
            }),
            author: UserId::new(author).expect("user"),
            at: Timestamp(at),
            text: "t".to_string(),
        }
    }

    #[test]
    fn post_keys_are_consecutive_and_never_zero() {
        let keys = PostKeys {
            next: AtomicU64::new(u64::MAX - 1),
        };
        let drawn: Vec<u64> = (0..4).map(|_| keys.next().get()).collect();
        assert_eq!(drawn, [u64::MAX - 1, u64::MAX, 1, 2]);
    }

    #[test]
    fn the_unacked_bound_stays_within_what_the_server_remembers() {
        assert_eq!(unacked_bound(0), 1);
        assert_eq!(unacked_bound(10), 10);
        assert_eq!(unacked_bound(usize::MAX), REMEMBERED_POST_KEYS);
        assert!(unacked_bound(usize::MAX) <= TIMELINE_SEND_BUFFER);
    }

    #[test]
    fn an_ack_retires_its_post_and_every_earlier_one_and_frees_their_room() {
        let room = Arc::new(Semaphore::new(3));
        let key = |k: u64| PostKey::new(k).expect("a key is not 0");
        let unacked = (1..=3)
            .map(|k| Unacked {
                key: key(k),
                text: format!("post {k}"),
                _room: Arc::clone(&room).try_acquire_owned().expect("room"),
            })
            .collect();
        let outbound = Outbound {
            queue: Mutex::new(Queue {
                sender: None,
                unacked,
            }),
            sending: tokio::sync::Mutex::new(()),
            room: Arc::clone(&room),
            closing: AtomicBool::new(false),
            fails_over: true,
        };
        outbound.acknowledged(key(9));
        assert_eq!(outbound.unacked(), 3, "an unknown key retires nothing");
        assert_eq!(room.available_permits(), 0);
        outbound.acknowledged(key(2));
        assert_eq!(outbound.unacked(), 1);
        assert_eq!(room.available_permits(), 2);
        outbound.acknowledged(key(3));
        assert_eq!(outbound.unacked(), 0);
        assert_eq!(room.available_permits(), 3);
    }

    #[test]
    fn a_post_is_delivered_once_by_id_or_by_author_and_time() {
        let mut delivered = Delivered::new(100);
        assert!(delivered.first_time(&post(Some(1), 2, 10)));
        assert!(!delivered.first_time(&post(Some(1), 2, 10)));
        // Another id at the same time is another post.
        assert!(delivered.first_time(&post(Some(2), 2, 10)));
        assert!(delivered.first_time(&post(None, 2, 10)));
        assert!(!delivered.first_time(&post(None, 2, 10)));
        assert!(delivered.first_time(&post(None, 3, 10)));
    }

    #[test]
    fn only_the_last_delivered_posts_are_remembered_and_never_fewer_than_a_replay() {
        let mut delivered = Delivered::new(1);
        assert_eq!(delivered.capacity, RECENT_POSTS);
        let count = RECENT_POSTS as u64 + 5;
        for seq in 1..=count {
            assert!(delivered.first_time(&post(Some(seq), 2, seq as i64)));
        }
        assert_eq!(delivered.keys.len(), RECENT_POSTS);
        assert_eq!(delivered.order.len(), RECENT_POSTS);
        // The newest RECENT_POSTS (what a reopened timeline replays) are all recognised...
        for seq in count - RECENT_POSTS as u64 + 1..=count {
            assert!(!delivered.first_time(&post(Some(seq), 2, seq as i64)));
        }
        // ...the oldest are forgotten.
        assert!(delivered.first_time(&post(Some(1), 2, 1)));
    }
}
