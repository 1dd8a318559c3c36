//! What the sequenced but not yet committed entries will change, for validating new commands.
//!
//! The server's [`State`] holds committed entries only, so nothing uncommitted can be seen by
//! LIST, timelines or any other reader, and discarding uncommitted entries (a master that lost
//! its role) only needs [`Uncommitted::clear`]. Commands are validated against the committed
//! state *plus* the effects recorded here: an entry sequenced before a command commits before
//! it, or is discarded together with it (discarding drops every uncommitted entry at once), so
//! validating against both is exact.

use std::collections::HashMap;

use crate::event::{EventKind, LogEntry};
use crate::ids::{LogIndex, UserId};
use crate::state::State;

/// Effects of the uncommitted entries: users joining and the latest follow change per pair,
/// each with the index of the entry that made it (so committing that entry retires it).
#[derive(Debug, Default)]
pub(crate) struct Uncommitted {
    users: HashMap<UserId, LogIndex>,
    follows: HashMap<(UserId, UserId), (bool, LogIndex)>,
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

    /// Records the effect of a newly sequenced entry.
    pub(crate) fn record(&mut self, entry: &LogEntry) {
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
            EventKind::Posted { .. } => {}
        }
    }

    /// Retires what `entry` recorded, now that the committed state holds it (unless a later
    /// uncommitted entry changed the same thing again).
    pub(crate) fn committed(&mut self, entry: &LogEntry) {
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
            EventKind::Posted { .. } => {}
        }
    }

    /// Forgets every uncommitted effect (the entries were discarded).
    pub(crate) fn clear(&mut self) {
        self.users.clear();
        self.follows.clear();
    }

    /// Whether nothing is recorded.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.users.is_empty() && self.follows.is_empty()
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
}
