//! Live timeline delivery: who is watching their timeline, and the feed each of them reads.
//!
//! Fan-out never blocks the commit path: each subscriber has a bounded queue, filled with
//! `try_send`. A subscriber whose queue is full has fallen behind; it is dropped from the
//! registry and its feed ends with an error, so the client reopens its timeline rather than
//! silently missing posts.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::event::Post;
use crate::ids::{UserId, UserMap};

#[derive(Debug)]
struct Subscriber {
    id: u64,
    queue: mpsc::Sender<Arc<Post>>,
    lagged: Arc<AtomicBool>,
}

/// Online timeline streams, by user.
#[derive(Debug, Default)]
pub(crate) struct Subscribers {
    next_id: u64,
    by_user: UserMap<Vec<Subscriber>>,
}

/// The receiving end of one subscription.
#[derive(Debug)]
pub(crate) struct Subscription {
    pub(crate) id: u64,
    pub(crate) queue: mpsc::Receiver<Arc<Post>>,
    pub(crate) lagged: Arc<AtomicBool>,
}

impl Subscribers {
    /// Registers a new stream of `user` whose queue holds `capacity` posts, pre-filled with
    /// `recent` (which must fit).
    pub(crate) fn subscribe(
        &mut self,
        user: UserId,
        capacity: usize,
        recent: &[Arc<Post>],
    ) -> Subscription {
        let (tx, rx) = mpsc::channel(capacity.max(recent.len()).max(1));
        for post in recent {
            // Cannot fail: the queue is empty and large enough.
            let _ = tx.try_send(Arc::clone(post));
        }
        self.next_id += 1;
        let lagged = Arc::new(AtomicBool::new(false));
        self.by_user.entry(user).or_default().push(Subscriber {
            id: self.next_id,
            queue: tx,
            lagged: Arc::clone(&lagged),
        });
        Subscription {
            id: self.next_id,
            queue: rx,
            lagged,
        }
    }

    /// Removes stream `id` of `user`.
    pub(crate) fn unsubscribe(&mut self, user: UserId, id: u64) {
        if let Some(list) = self.by_user.get_mut(&user) {
            list.retain(|s| s.id != id);
            if list.is_empty() {
                self.by_user.remove(&user);
            }
        }
    }

    /// Number of users with at least one open stream.
    pub(crate) fn online_users(&self) -> usize {
        self.by_user.len()
    }

    /// Whether `user` has an open stream.
    pub(crate) fn is_online(&self, user: UserId) -> bool {
        self.by_user.contains_key(&user)
    }

    /// The users with an open stream.
    pub(crate) fn users(&self) -> impl Iterator<Item = UserId> + '_ {
        self.by_user.keys().copied()
    }

    /// Queues `post` on every stream of `user`; streams that fell behind are dropped.
    pub(crate) fn deliver(&mut self, user: UserId, post: &Arc<Post>) -> u64 {
        let Some(list) = self.by_user.get_mut(&user) else {
            return 0;
        };
        let mut delivered = 0;
        list.retain(|s| match s.queue.try_send(Arc::clone(post)) {
            Ok(()) => {
                delivered += 1;
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                s.lagged.store(true, Ordering::Release);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        if list.is_empty() {
            self.by_user.remove(&user);
        }
        delivered
    }

    /// Drops every stream (server shutdown): their feeds end.
    pub(crate) fn clear(&mut self) {
        self.by_user.clear();
    }
}

/// Called when a feed is dropped, to unregister it and update the user's session.
pub(crate) trait FeedOwner: Send + Sync {
    fn feed_closed(&self, user: UserId, id: u64);
}

/// A user's timeline as a stream: the recent posts (newest first) come first, then new posts
/// of followed users as they are committed (oldest first). Dropping it closes the stream.
pub struct TimelineFeed {
    user: UserId,
    subscription: Subscription,
    owner: Box<dyn FeedOwner>,
    failed: bool,
}

impl std::fmt::Debug for TimelineFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimelineFeed")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl TimelineFeed {
    pub(crate) fn new(user: UserId, subscription: Subscription, owner: Box<dyn FeedOwner>) -> Self {
        Self {
            user,
            subscription,
            owner,
            failed: false,
        }
    }

    /// The user whose timeline this is.
    pub fn user(&self) -> UserId {
        self.user
    }

    /// The next post; `None` once the server closed the stream, `Some(Err(_))` (then `None`)
    /// if this reader fell too far behind and posts were dropped.
    pub async fn next(&mut self) -> Option<Result<Arc<Post>>> {
        std::future::poll_fn(|cx| self.poll_next_post(cx)).await
    }

    /// Poll form of [`TimelineFeed::next`].
    pub fn poll_next_post(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Arc<Post>>>> {
        if self.failed {
            return Poll::Ready(None);
        }
        match self.subscription.queue.poll_recv(cx) {
            Poll::Ready(Some(post)) => Poll::Ready(Some(Ok(post))),
            Poll::Ready(None) | Poll::Pending
                if self.subscription.lagged.load(Ordering::Acquire) =>
            {
                self.failed = true;
                Poll::Ready(Some(Err(Error::Overloaded(
                    "timeline reader fell behind; reopen the timeline".to_string(),
                ))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl tokio_stream::Stream for TimelineFeed {
    type Item = Result<Arc<Post>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_next_post(cx)
    }
}

impl Drop for TimelineFeed {
    fn drop(&mut self) {
        self.owner.feed_closed(self.user, self.subscription.id);
    }
}
