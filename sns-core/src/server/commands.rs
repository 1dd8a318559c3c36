//! The client-facing commands (DESIGN §4): login, follow, unfollow, list, post, timeline.
//!
//! Invariant: a command is validated against the committed state plus the effects of the
//! entries sequenced before it, then sequenced under one lock; its caller is answered only once
//! the entry is committed.

use std::sync::{Arc, MutexGuard, Weak};

use tokio::sync::{mpsc, oneshot};

use super::pipeline::Pending;
use super::timeline::{FeedOwner, TimelineFeed};
use super::uncommitted::KeyedOriginal;
use super::{Core, Server, Shared, finish, known, limits, lock_core};
use crate::error::{Error, Result};
use crate::event::{Event, EventKind, LogEntry, Post, normalize_post_text};
use crate::ids::{EventId, PostKey, Role, Timestamp, UserId};
use crate::state::{Listing, RECENT_POSTS, State};

impl Server {
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
    /// committed ([`Error::NotMaster`] if it is discarded instead, as it would be for the original).
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
                return Err(Error::server_shutting_down());
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
    pub(super) fn open_feed(
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

    /// The user known by `target`, for a command of `user`.
    pub(super) fn target(&self, core: &mut Core, user: UserId, target: &str) -> Result<UserId> {
        core.knows(user)?;
        core.sessions.touch(user, tokio::time::Instant::now());
        let target = UserId::parse(target)?;
        core.knows(target)?;
        Ok(target)
    }

    /// Waits for an in-flight slot (backpressure on writers while the commit path is full).
    pub(super) async fn slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit> {
        Arc::clone(&self.shared.inflight)
            .acquire_owned()
            .await
            .map_err(|_| Error::server_shutting_down())
    }

    /// The core, if this server accepts client writes.
    pub(super) fn writable(&self) -> Result<MutexGuard<'_, Core>> {
        let core = self.readable()?;
        if core.role != Role::Master {
            return Err(Error::NotMaster(
                "this server is not the master of its cluster".to_string(),
            ));
        }
        if core.truncating {
            return Err(Error::NotMaster(
                "this server is discarding uncommitted entries".to_string(),
            ));
        }
        Ok(core)
    }

    /// The core, if this server is healthy.
    pub(super) fn readable(&self) -> Result<MutexGuard<'_, Core>> {
        let core = self.lock();
        if let Some(why) = &core.failed {
            return Err(Error::StorageFailed(why.clone()));
        }
        if self.shared.shutdown.is_cancelled() {
            return Err(Error::server_shutting_down());
        }
        Ok(core)
    }

    /// Gives `kind` the next event id, time and log index, records its effect for validation
    /// and queues it for durability and commit. Must be called with the core locked (the order
    /// of calls is the log order).
    pub(super) fn sequence(
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
        self.shared.counters.appended.inc();
        self.shared.sequenced_index.send_replace(entry.index);
        let (reply, wait) = oneshot::channel();
        self.enqueue(Pending {
            entries: vec![entry],
            generation: core.generation,
            durable,
            reply: Some(reply),
            sequenced_at: Some(std::time::Instant::now()),
            _slots: Some(slot),
        });
        wait
    }
}

impl Server {
    /// Hands sequenced entries to the commit pipeline. The queue cannot be full: every queued
    /// batch holds in-flight slots, of which there are fewer than its capacity.
    pub(super) fn enqueue(&self, pending: Pending) {
        if let Err(e) = self.shared.commits.try_send(pending) {
            let pending = match e {
                mpsc::error::TrySendError::Full(p) | mpsc::error::TrySendError::Closed(p) => p,
            };
            if let Some(reply) = pending.reply {
                let _ = reply.send(Err(Error::server_shutting_down()));
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
