//! What the sequenced but not yet committed entries will change, for validating new commands.
//!
//! The server's [`State`] holds committed entries only, so nothing uncommitted can be seen by
//! LIST, timelines or any other reader, and discarding uncommitted entries (a master that lost
//! its role) only needs [`Uncommitted::clear`]. Commands are validated against the committed
//! state *plus* the effects recorded here: an entry sequenced before a command commits before
//! it, or is discarded together with it (discarding drops every uncommitted entry at once), so
//! validating against both is exact.
//!
//! Posts with an idempotency key are recorded too, with the retries waiting for them: a post
//! re-sent while its original is still uncommitted stores nothing and is answered when the
//! original commits (or fails with it when it is discarded), so one key never yields two posts.

use std::collections::HashMap;

use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::event::{EventKind, LogEntry};
use crate::ids::{ClusterId, LogIndex, PostId, PostKey, UserId};
use crate::state::State;

/// Effects of the uncommitted entries: users joining and the latest follow change per pair,
/// each with the index of the entry that made it (so committing that entry retires it), and the
/// keyed posts.
#[derive(Debug, Default)]
pub(crate) struct Uncommitted {
    users: HashMap<UserId, LogIndex>,
    follows: HashMap<(UserId, UserId), (bool, LogIndex)>,
    keyed_posts: HashMap<(UserId, PostKey), KeyedPost>,
    /// The highest sequence number sequenced per origin.
    origins: HashMap<ClusterId, u64>,
}

/// An uncommitted post that carries a key, and the retries of it waiting for its commit.
#[derive(Debug)]
struct KeyedPost {
    id: PostId,
    index: LogIndex,
    retries: Vec<oneshot::Sender<Result<()>>>,
}

/// A post already made under a key (see [`Uncommitted::post_with_key`]).
#[derive(Debug)]
pub(crate) enum KeyedOriginal {
    /// Committed: the retry is answered with its id at once.
    Committed(PostId),
    /// Sequenced, not committed yet: `outcome` answers once it commits (`Ok`) or is discarded.
    Uncommitted {
        id: PostId,
        outcome: oneshot::Receiver<Result<()>>,
    },
}

impl Uncommitted {
    /// Whether `user` exists once everything sequenced has committed.
    pub(crate) fn has_user(&self, state: &State, user: UserId) -> bool {
        state.has_user(user) || self.users.contains_key(&user)
    }

    /// Whether `follower` follows `followee` once everything sequenced has committed.
    pub(crate) fn follows(&self, state: &State, follower: UserId, followee: UserId) -> bool {
        match self.follows.get(&(follower, followee)) {
            Some((following, _)) => *following,
            None => state.follows(follower, followee),
        }
    }

    /// The highest sequence number of `origin` once everything sequenced has committed.
    pub(crate) fn high_water(&self, state: &State, origin: ClusterId) -> u64 {
        let sequenced = self.origins.get(&origin).copied().unwrap_or(0);
        state.high_water(origin).max(sequenced)
    }

    /// The post `author` already made under `key`, committed (among the author's remembered
    /// keys in `state`) or not; for an uncommitted one the caller is registered to hear how it
    /// ends.
    pub(crate) fn post_with_key(
        &mut self,
        state: &State,
        author: UserId,
        key: PostKey,
    ) -> Option<KeyedOriginal> {
        if let Some(id) = state.post_with_key(author, key) {
            return Some(KeyedOriginal::Committed(id));
        }
        let original = self.keyed_posts.get_mut(&(author, key))?;
        let (answer, outcome) = oneshot::channel();
        original.retries.push(answer);
        Some(KeyedOriginal::Uncommitted {
            id: original.id,
            outcome,
        })
    }

    /// Records the effect of a newly sequenced entry.
    pub(crate) fn record(&mut self, entry: &LogEntry) {
        let id = entry.event.id;
        if entry.event.completes() {
            let seq = self.origins.entry(id.origin).or_insert(0);
            *seq = (*seq).max(id.seq);
        }
        match &entry.event.kind {
            EventKind::UserJoined { user } => {
                self.users.insert(*user, entry.index);
            }
            EventKind::Followed { follower, followee } => {
                self.follows
                    .insert((*follower, *followee), (true, entry.index));
            }
            EventKind::Unfollowed { follower, followee } => {
                self.follows
                    .insert((*follower, *followee), (false, entry.index));
            }
            EventKind::Posted {
                author,
                key: Some(key),
                ..
            } => {
                let original = KeyedPost {
                    id: entry.event.id,
                    index: entry.index,
                    retries: Vec::new(),
                };
                self.keyed_posts.insert((*author, *key), original);
            }
            EventKind::Posted { key: None, .. } => {}
            EventKind::Image(image) => {
                for user in &image.users {
                    self.users.insert(*user, entry.index);
                }
            }
        }
    }

    /// Retires what `entry` recorded, now that the committed state holds it (unless a later
    /// uncommitted entry changed the same thing again).
    pub(crate) fn committed(&mut self, entry: &LogEntry) {
        let id = entry.event.id;
        if entry.event.completes() && self.origins.get(&id.origin) == Some(&id.seq) {
            self.origins.remove(&id.origin);
        }
        match &entry.event.kind {
            EventKind::UserJoined { user } => {
                if self.users.get(user) == Some(&entry.index) {
                    self.users.remove(user);
                }
            }
            EventKind::Followed { follower, followee }
            | EventKind::Unfollowed { follower, followee } => {
                let key = (*follower, *followee);
                if self
                    .follows
                    .get(&key)
                    .is_some_and(|(_, i)| *i == entry.index)
                {
                    self.follows.remove(&key);
                }
            }
            EventKind::Posted {
                author,
                key: Some(key),
                ..
            } => {
                let slot = (*author, *key);
                if self
                    .keyed_posts
                    .get(&slot)
                    .is_some_and(|original| original.index == entry.index)
                    && let Some(original) = self.keyed_posts.remove(&slot)
                {
                    for retry in original.retries {
                        let _ = retry.send(Ok(()));
                    }
                }
            }
            EventKind::Posted { key: None, .. } => {}
            EventKind::Image(image) => {
                for user in &image.users {
                    if self.users.get(user) == Some(&entry.index) {
                        self.users.remove(user);
                    }
                }
            }
        }
    }

    /// Forgets every uncommitted effect (the entries were discarded); retries waiting for a
    /// discarded post are told it was not stored.
    pub(crate) fn clear(&mut self) {
        self.origins.clear();
        self.users.clear();
        self.follows.clear();
        for (_, original) in self.keyed_posts.drain() {
            for retry in original.retries {
                let _ = retry.send(Err(Error::NotMaster(
                    "this server lost its role before the post was committed".to_string(),
                )));
            }
        }
    }

    /// Whether nothing is recorded.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.users.is_empty()
            && self.follows.is_empty()
            && self.keyed_posts.is_empty()
            && self.origins.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;
    use crate::ids::{ClusterId, Epoch, EventId, Timestamp};

    fn u(id: u32) -> UserId {
        UserId::new(id).expect("user")
    }

    fn entry(index: u64, kind: EventKind) -> LogEntry {
        LogEntry {
            index: LogIndex(index),
            epoch: Epoch(1),
            event: Event {
                id: EventId {
                    origin: ClusterId::new(1).expect("cluster"),
                    seq: index,
                },
                at: Timestamp(index as i64),
                kind,
            },
        }
    }

    #[test]
    fn later_changes_outlive_the_commit_of_earlier_ones() {
        let state = State::default();
        let mut pending = Uncommitted::default();
        let follow = entry(
            1,
            EventKind::Followed {
                follower: u(1),
                followee: u(2),
            },
        );
        let unfollow = entry(
            2,
            EventKind::Unfollowed {
                follower: u(1),
                followee: u(2),
            },
        );
        pending.record(&follow);
        assert!(pending.follows(&state, u(1), u(2)));
        pending.record(&unfollow);
        assert!(!pending.follows(&state, u(1), u(2)));
        // The follow commits (the state would now say "following"), but the unfollow after it
        // is still pending and wins.
        pending.committed(&follow);
        assert!(!pending.follows(&state, u(1), u(2)));
        pending.committed(&unfollow);
        assert!(pending.is_empty());
    }

    #[test]
    fn joined_users_are_known_until_cleared() {
        let state = State::default();
        let mut pending = Uncommitted::default();
        pending.record(&entry(1, EventKind::UserJoined { user: u(5) }));
        assert!(pending.has_user(&state, u(5)));
        pending.clear();
        assert!(!pending.has_user(&state, u(5)));
    }

    fn keyed_post(index: u64, author: u32, key: u64) -> LogEntry {
        entry(
            index,
            EventKind::Posted {
                author: u(author),
                text: std::sync::Arc::from("text"),
                key: PostKey::new(key),
            },
        )
    }

    fn key(key: u64) -> PostKey {
        PostKey::new(key).expect("a key is not 0")
    }

    #[test]
    fn a_retry_of_an_uncommitted_keyed_post_is_answered_when_it_commits() {
        let mut state = State::default();
        let mut pending = Uncommitted::default();
        let original = keyed_post(1, 1, 9);
        assert!(pending.post_with_key(&state, u(1), key(9)).is_none());
        pending.record(&original);
        assert!(
            pending.post_with_key(&state, u(2), key(9)).is_none(),
            "keys are per author"
        );
        let Some(KeyedOriginal::Uncommitted { id, mut outcome }) =
            pending.post_with_key(&state, u(1), key(9))
        else {
            panic!("the original is uncommitted");
        };
        assert_eq!(id, original.event.id);
        assert!(outcome.try_recv().is_err(), "no answer before the commit");
        state.apply(&original.event);
        pending.committed(&original);
        assert!(matches!(outcome.try_recv(), Ok(Ok(()))));
        assert!(pending.is_empty());
        // From now on the committed state answers.
        assert!(matches!(
            pending.post_with_key(&state, u(1), key(9)),
            Some(KeyedOriginal::Committed(id)) if id == original.event.id
        ));
    }

    #[test]
    fn a_retry_of_a_discarded_keyed_post_is_told_it_was_not_stored() {
        let state = State::default();
        let mut pending = Uncommitted::default();
        pending.record(&keyed_post(1, 1, 9));
        let Some(KeyedOriginal::Uncommitted { mut outcome, .. }) =
            pending.post_with_key(&state, u(1), key(9))
        else {
            panic!("the original is uncommitted");
        };
        pending.clear();
        assert!(matches!(outcome.try_recv(), Ok(Err(Error::NotMaster(_)))));
        assert!(pending.post_with_key(&state, u(1), key(9)).is_none());
    }
}
