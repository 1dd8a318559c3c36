//! A session's open timeline: the sending side (the queue of posts not yet acknowledged,
//! re-sent in order after a failover) and the reader task (reads the stream, takes in
//! acknowledgements, reopens the stream after a failover, suppresses posts delivered before).
//!
//! Invariants (see the parent module for the whole rule set): a post stays queued until the
//! server acknowledges it; after a reopen every unacknowledged post is re-sent, in order and
//! with its key, before any new post; the reader passes on a post at most once, remembering the
//! keys of the last `remembered_posts` delivered.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Inner, POST_BUFFER, is_server_lost, lock};
use crate::client::{
    ReceivedPost, TIMELINE_SEND_BUFFER, TimelineMessage, TimelineSender, TimelineStream,
};
use crate::error::{Error, Result};
use crate::event::normalize_post_text;
use crate::ids::{PostId, PostKey, Timestamp, UserId};
use crate::state::{RECENT_POSTS, REMEMBERED_POST_KEYS};

/// An open timeline of a [`Session`](super::Session): post with [`SessionTimeline::post`],
/// read with [`SessionTimeline::next`]. A reader task (owned; stopped when this is dropped) reads the
/// stream, takes in acknowledgements, reopens the stream after a failover (re-sending the posts
/// not acknowledged) and suppresses posts already delivered.
///
/// Dropping it abandons the posts the server has not acknowledged yet (a `post` returns once
/// the post is handed to the stream, not once it is stored). To be sure every post is stored,
/// call [`close_sending`](Self::close_sending) and read until [`next`](Self::next) returns
/// `None`: the server ends the stream once it has stored everything sent before.
#[derive(Debug)]
pub struct SessionTimeline {
    posts: mpsc::Receiver<Result<ReceivedPost>>,
    poster: TimelinePoster,
    reader: JoinHandle<()>,
}

impl SessionTimeline {
    pub(super) fn start(
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
            stored: watch::Sender::new(0),
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
    /// Posts the server has acknowledged since the timeline opened.
    stored: watch::Sender<u64>,
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
            self.stored.send_modify(|stored| *stored += at as u64 + 1);
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
    /// reconnects; waits first while
    /// [`SessionConfig::unacked_posts`](super::SessionConfig::unacked_posts) posts are
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

    /// How many posts the server has acknowledged (stored) since the timeline opened, as a
    /// receiver that sees every change. Posts are acknowledged in the order they were posted,
    /// so when it reads `n`, the first `n` posts that [`post`](Self::post) accepted (from any
    /// clone of this poster; an empty text, which is ignored, does not count) are stored.
    pub fn stored(&self) -> watch::Receiver<u64> {
        self.outbound.stored.subscribe()
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
    use std::sync::atomic::AtomicU64;

    use super::super::PostKeys;
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
            stored: watch::Sender::new(0),
        };
        let stored = outbound.stored.subscribe();
        outbound.acknowledged(key(9));
        assert_eq!(outbound.unacked(), 3, "an unknown key retires nothing");
        assert_eq!(room.available_permits(), 0);
        assert_eq!(*stored.borrow(), 0);
        outbound.acknowledged(key(2));
        assert_eq!(outbound.unacked(), 1);
        assert_eq!(room.available_permits(), 2);
        assert_eq!(*stored.borrow(), 2, "an ack counts every post it retires");
        outbound.acknowledged(key(2));
        assert_eq!(*stored.borrow(), 2, "a repeated ack counts nothing");
        outbound.acknowledged(key(3));
        assert_eq!(outbound.unacked(), 0);
        assert_eq!(room.available_permits(), 3);
        assert_eq!(*stored.borrow(), 3);
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
