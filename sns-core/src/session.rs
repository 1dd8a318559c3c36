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
//! - A reopened timeline replays its newest posts ([`RECENT_POSTS`]); the ones already
//!   delivered are recognised by post id (by author and time when the server sent no id) and
//!   suppressed, so the reader never sees a post twice. The memory for this is bounded: the
//!   keys of the last [`SessionConfig::remembered_posts`] delivered posts (at least
//!   [`RECENT_POSTS`], which covers a replay as long as post times grow in delivery order).
//! - Posts carry no acknowledgement on the wire: a post written on a stream that breaks before
//!   the server reads it is lost with the stream. A post made while the timeline reconnects
//!   waits for the new stream.
//! - Every failover is reported as [`SessionEvent`]s ([`Session::subscribe`]), the first one as
//!   soon as the loss is noticed, so a user interface never freezes silently.
//! - Background work is owned: the heartbeat task stops on [`Session::logout`],
//!   [`Session::close`] or drop; a timeline's reader task stops when its [`SessionTimeline`]
//!   is dropped.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::client::{Client, CoordinatorClient, ReceivedPost, TimelineSender, TimelineStream};
use crate::error::{Error, Result};
use crate::event::normalize_post_text;
use crate::ids::{PostId, Timestamp, UserId};
use crate::server::{Listing, RECENT_POSTS};
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
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(3),
            patience: Duration::from_secs(10),
            first_retry: Duration::from_millis(100),
            max_retry: Duration::from_secs(1),
            remembered_posts: 1024,
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
    matches!(error, Error::Unavailable(_) | Error::Unreachable { .. })
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
/// stream, reopens it after a failover and suppresses posts already delivered.
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
        let outbound = Arc::new(Outbound {
            sender: watch::Sender::new(Some(sender)),
            closing: AtomicBool::new(false),
            fails_over: inner.coordinator.is_some(),
            patience: inner.config.patience,
        });
        let (posts_tx, posts) = mpsc::channel(POST_BUFFER);
        let reader = Reader {
            delivered: Delivered::new(inner.config.remembered_posts),
            inner,
            outbound: Arc::clone(&outbound),
            posts: posts_tx,
        };
        Self {
            posts,
            poster: TimelinePoster { outbound },
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
    /// sending side was closed and the server stored every post); an error ends the stream
    /// (the server was lost and no failover was possible, or the server refused a post).
    pub async fn next(&mut self) -> Option<Result<ReceivedPost>> {
        self.posts.recv().await
    }
}

impl Drop for SessionTimeline {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The sending side of an open timeline, shared by its posters and its reader.
#[derive(Debug)]
struct Outbound {
    /// The stream's current sender: replaced after a reconnect, `None` while reconnecting or
    /// once closed.
    sender: watch::Sender<Option<TimelineSender>>,
    /// Set by [`TimelinePoster::close`].
    closing: AtomicBool,
    /// Whether the session fails over (a poster then waits for the reopened stream).
    fails_over: bool,
    patience: Duration,
}

impl Outbound {
    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }
}

/// Posts on a [`SessionTimeline`]; cloneable, for posting from another task than the reader.
#[derive(Debug, Clone)]
pub struct TimelinePoster {
    outbound: Arc<Outbound>,
}

impl TimelinePoster {
    /// Posts `text`: one line, at most 4096 bytes (else [`Error::InvalidInput`], nothing
    /// sent); empty lines are ignored. While the timeline reconnects after a failover, waits
    /// (up to the session's patience) for the reopened stream.
    pub async fn post(&self, text: &str) -> Result<()> {
        if normalize_post_text(text.as_bytes())?.is_none() {
            return Ok(());
        }
        let mut watching = self.outbound.sender.subscribe();
        let mut deadline = None;
        loop {
            if self.outbound.is_closing() {
                return Err(Error::Unavailable(
                    "the timeline is closed for posting".to_string(),
                ));
            }
            let sender = watching.borrow_and_update().clone();
            let error = match sender {
                Some(sender) => match sender.post(text).await {
                    Ok(()) => return Ok(()),
                    Err(e) => e,
                },
                None => Error::Unavailable("the timeline is reconnecting".to_string()),
            };
            if !self.outbound.fails_over || !is_server_lost(&error) {
                return Err(error);
            }
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + self.outbound.patience);
            match tokio::time::timeout_at(deadline, watching.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return Err(error),
            }
        }
    }

    /// Closes the sending side: the server ends the stream once it has stored every post
    /// sent before, and [`SessionTimeline::next`] then returns `None`.
    pub fn close(&self) {
        self.outbound.closing.store(true, Ordering::Release);
        self.outbound.sender.send_replace(None);
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
                return;
            };
            if self.outbound.is_closing() || !self.inner.fails_over(&broken) {
                let _ = self.posts.send(Err(broken)).await;
                return;
            }
            // Posts made from now on wait for the reopened stream.
            self.outbound.sender.send_replace(None);
            match self.reopen(generation, broken).await {
                Ok((reopened, sender, next)) => {
                    if self.outbound.is_closing() {
                        return;
                    }
                    self.outbound.sender.send_replace(Some(sender));
                    stream = next;
                    generation = reopened;
                }
                Err(e) => {
                    let _ = self.posts.send(Err(e)).await;
                    return;
                }
            }
        }
    }

    /// Passes on the stream's posts not delivered before; returns the error that broke the
    /// stream, or `None` when it ended cleanly or nobody reads any more.
    async fn deliver(&mut self, stream: &mut TimelineStream) -> Option<Error> {
        loop {
            match stream.next().await {
                Some(Ok(post)) => {
                    if self.delivered.first_time(&post) && self.posts.send(Ok(post)).await.is_err()
                    {
                        return None;
                    }
                }
                Some(Err(e)) => return Some(e),
                None if self.outbound.is_closing() => return None,
                None => {
                    return Some(Error::Unavailable(
                        "the server ended the timeline stream".to_string(),
                    ));
                }
            }
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
            match current.client.timeline().await {
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
enum PostKey {
    /// By id, when the server sent one.
    Id(PostId),
    /// By author and server-assigned time (unique per author) otherwise.
    AuthorTime(UserId, Timestamp),
}

impl PostKey {
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
    order: VecDeque<PostKey>,
    keys: HashSet<PostKey>,
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
        let key = PostKey::of(post);
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
