//! The in-memory state: a pure, deterministic fold of the log.
//!
//! [`State::apply`] does no I/O. It keeps the users, who follows whom (and since when), the
//! followers of each user, a capped fan-out-on-write timeline per user, and the high-water mark
//! of every origin cluster. An event at or below its origin's high-water mark is a duplicate and
//! changes nothing; an event that skips a sequence number is refused, so the state never has a
//! hole that a later delivery would have to fill.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use crate::codec::{Decoder, Encoder};
use crate::error::{Error, Result};
use crate::event::{Event, EventKind, Post};
use crate::ids::{ClusterId, EventId, Timestamp, UserId};

/// Default number of posts a materialized timeline keeps (as Mastodon does).
pub const DEFAULT_TIMELINE_CAP: usize = 400;

/// What applying one event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The event was at or below its origin's high-water mark: nothing changed.
    Duplicate,
    /// The event skipped sequence numbers of its origin and was not applied.
    Gap {
        /// The sequence number the origin needed next.
        expected: u64,
    },
    /// A user became known (or already was).
    UserJoined,
    /// A follow relation changed.
    FollowChanged,
    /// A post was added to the timelines of the author's followers.
    Posted(Arc<Post>),
}

/// One user's relations and materialized timeline.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Account {
    /// Who this user follows, and since when.
    following: BTreeMap<UserId, Timestamp>,
    /// Who follows this user.
    followers: BTreeSet<UserId>,
    /// Posts of followed users, oldest first, ordered by [`Post::order_key`], capped.
    timeline: VecDeque<Arc<Post>>,
}

/// The state of one server: a fold of its log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    users: BTreeSet<UserId>,
    accounts: HashMap<UserId, Account>,
    high_water: BTreeMap<ClusterId, u64>,
    /// The latest event time applied (so a restarted server never stamps an earlier time).
    latest: Timestamp,
    timeline_cap: usize,
}

impl Default for State {
    fn default() -> Self {
        Self::new(DEFAULT_TIMELINE_CAP)
    }
}

impl State {
    /// An empty state whose timelines keep at most `timeline_cap` posts.
    pub fn new(timeline_cap: usize) -> Self {
        Self {
            users: BTreeSet::new(),
            accounts: HashMap::new(),
            high_water: BTreeMap::new(),
            latest: Timestamp::default(),
            timeline_cap: timeline_cap.max(1),
        }
    }

    /// Applies one event. Pure and deterministic: the same events in the same per-origin order
    /// give the same state, and re-applying an event changes nothing.
    pub fn apply(&mut self, event: &Event) -> Applied {
        let hw = self.high_water.entry(event.id.origin).or_insert(0);
        if event.id.seq <= *hw {
            return Applied::Duplicate;
        }
        if event.id.seq != *hw + 1 {
            return Applied::Gap { expected: *hw + 1 };
        }
        *hw = event.id.seq;
        self.latest = self.latest.max(event.at);
        match &event.kind {
            EventKind::UserJoined { user } => {
                self.users.insert(*user);
                self.accounts.entry(*user).or_default();
                Applied::UserJoined
            }
            EventKind::Followed { follower, followee } => {
                self.accounts
                    .entry(*follower)
                    .or_default()
                    .following
                    .entry(*followee)
                    .or_insert(event.at);
                self.accounts
                    .entry(*followee)
                    .or_default()
                    .followers
                    .insert(*follower);
                Applied::FollowChanged
            }
            EventKind::Unfollowed { follower, followee } => {
                if let Some(account) = self.accounts.get_mut(follower) {
                    account.following.remove(followee);
                    account.timeline.retain(|post| post.author != *followee);
                }
                if let Some(account) = self.accounts.get_mut(followee) {
                    account.followers.remove(follower);
                }
                Applied::FollowChanged
            }
            EventKind::Posted { author, text } => {
                let post = Arc::new(Post {
                    id: event.id,
                    author: *author,
                    at: event.at,
                    text: Arc::clone(text),
                });
                self.fan_out(&post);
                Applied::Posted(post)
            }
        }
    }

    /// Appends `post` to the timeline of every follower of its author who followed at or before
    /// the post's time. Cost is linear in the number of followers.
    fn fan_out(&mut self, post: &Arc<Post>) {
        let Some(author) = self.accounts.get(&post.author) else {
            return;
        };
        // Collecting first keeps the borrow of the author's follower set short; the vector is
        // reused by nothing else and costs one allocation per post.
        let followers: Vec<UserId> = author.followers.iter().copied().collect();
        let cap = self.timeline_cap;
        for follower in followers {
            let Some(account) = self.accounts.get_mut(&follower) else {
                continue;
            };
            match account.following.get(&post.author) {
                Some(since) if *since <= post.at => insert_capped(&mut account.timeline, post, cap),
                _ => {}
            }
        }
    }

    /// Whether `user` is known.
    pub fn has_user(&self, user: UserId) -> bool {
        self.users.contains(&user)
    }

    /// All known users, ascending.
    pub fn users(&self) -> impl Iterator<Item = UserId> + '_ {
        self.users.iter().copied()
    }

    /// Number of known users.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Whether `follower` follows `followee`.
    pub fn follows(&self, follower: UserId, followee: UserId) -> bool {
        self.accounts
            .get(&follower)
            .is_some_and(|a| a.following.contains_key(&followee))
    }

    /// The followers of `user`, ascending.
    pub fn followers(&self, user: UserId) -> impl Iterator<Item = UserId> + '_ {
        self.accounts
            .get(&user)
            .into_iter()
            .flat_map(|a| a.followers.iter().copied())
    }

    /// Number of followers of `user`.
    pub fn follower_count(&self, user: UserId) -> usize {
        self.accounts.get(&user).map_or(0, |a| a.followers.len())
    }

    /// The users `user` follows, ascending.
    pub fn following(&self, user: UserId) -> impl Iterator<Item = UserId> + '_ {
        self.accounts
            .get(&user)
            .into_iter()
            .flat_map(|a| a.following.keys().copied())
    }

    /// The `n` most recent posts of `user`'s timeline, newest first.
    pub fn recent_timeline(&self, user: UserId, n: usize) -> Vec<Arc<Post>> {
        self.accounts.get(&user).map_or_else(Vec::new, |a| {
            a.timeline.iter().rev().take(n).cloned().collect()
        })
    }

    /// Whether `post` sits in `user`'s timeline (it was fanned out to them).
    pub fn timeline_contains(&self, user: UserId, post: &Post) -> bool {
        self.accounts.get(&user).is_some_and(|a| {
            a.timeline
                .binary_search_by(|p| p.order_key().cmp(&post.order_key()))
                .is_ok()
        })
    }

    /// The highest sequence number applied from `origin` (0 if none).
    pub fn high_water(&self, origin: ClusterId) -> u64 {
        self.high_water.get(&origin).copied().unwrap_or(0)
    }

    /// The latest time of any applied event.
    pub fn latest_time(&self) -> Timestamp {
        self.latest
    }

    /// Every origin cluster with at least one applied event.
    pub fn origins(&self) -> impl Iterator<Item = ClusterId> + '_ {
        self.high_water.keys().copied()
    }

    /// The maximum number of posts a timeline keeps.
    pub fn timeline_cap(&self) -> usize {
        self.timeline_cap
    }

    /// Serializes the state for a snapshot. Posts shared by several timelines are written once.
    pub(crate) fn encode(&self, enc: &mut Encoder) {
        enc.len(self.users.len());
        for user in &self.users {
            enc.u32(user.get());
        }
        enc.len(self.high_water.len());
        for (origin, seq) in &self.high_water {
            enc.u32(origin.get());
            enc.u64(*seq);
        }
        enc.i64(self.latest.0);
        // Post table: every post held by some timeline, once.
        let mut table: HashMap<EventId, u64> = HashMap::new();
        let mut posts: Vec<&Arc<Post>> = Vec::new();
        let mut ids: Vec<&UserId> = self.accounts.keys().collect();
        ids.sort();
        for id in &ids {
            for post in &self.accounts[*id].timeline {
                table.entry(post.id).or_insert_with(|| {
                    posts.push(post);
                    (posts.len() - 1) as u64
                });
            }
        }
        enc.len(posts.len());
        for post in &posts {
            enc.u32(post.id.origin.get());
            enc.u64(post.id.seq);
            enc.u32(post.author.get());
            enc.i64(post.at.0);
            enc.str(&post.text);
        }
        enc.len(ids.len());
        for id in ids {
            let account = &self.accounts[id];
            enc.u32(id.get());
            enc.len(account.following.len());
            for (followee, since) in &account.following {
                enc.u32(followee.get());
                enc.i64(since.0);
            }
            enc.len(account.timeline.len());
            for post in &account.timeline {
                enc.u64(table[&post.id]);
            }
        }
    }

    /// Reads a state written by [`State::encode`]; followers are rebuilt from `following`.
    pub(crate) fn decode(dec: &mut Decoder<'_>, timeline_cap: usize) -> Result<Self> {
        let corrupt = |what: &str| Error::Corrupt(format!("snapshot: {what}"));
        let user = |raw: u32| UserId::new(raw).ok_or_else(|| corrupt("user id out of range"));
        let mut state = Self::new(timeline_cap);
        for _ in 0..dec.len(4)? {
            state.users.insert(user(dec.u32()?)?);
        }
        for _ in 0..dec.len(12)? {
            let origin = ClusterId::new(dec.u32()?).ok_or_else(|| corrupt("cluster 0"))?;
            state.high_water.insert(origin, dec.u64()?);
        }
        state.latest = Timestamp(dec.i64()?);
        let n_posts = dec.len(28)?;
        let mut posts = Vec::with_capacity(n_posts);
        for _ in 0..n_posts {
            let origin = ClusterId::new(dec.u32()?).ok_or_else(|| corrupt("cluster 0"))?;
            let seq = dec.u64()?;
            let author = user(dec.u32()?)?;
            let at = Timestamp(dec.i64()?);
            let text = Arc::from(dec.str()?);
            posts.push(Arc::new(Post {
                id: EventId { origin, seq },
                author,
                at,
                text,
            }));
        }
        for _ in 0..dec.len(20)? {
            let id = user(dec.u32()?)?;
            let mut account = Account::default();
            for _ in 0..dec.len(12)? {
                let followee = user(dec.u32()?)?;
                account.following.insert(followee, Timestamp(dec.i64()?));
            }
            for _ in 0..dec.len(8)? {
                let index = usize::try_from(dec.u64()?).map_err(|_| corrupt("post index"))?;
                let post = posts.get(index).ok_or_else(|| corrupt("post index"))?;
                insert_capped(&mut account.timeline, post, state.timeline_cap);
            }
            state.accounts.insert(id, account);
        }
        let edges: Vec<(UserId, UserId)> = state
            .accounts
            .iter()
            .flat_map(|(f, a)| a.following.keys().map(move |g| (*f, *g)))
            .collect();
        for (follower, followee) in edges {
            state
                .accounts
                .entry(followee)
                .or_default()
                .followers
                .insert(follower);
        }
        Ok(state)
    }
}

/// Inserts `post` in order into a timeline that keeps at most `cap` posts (dropping the oldest).
/// The common case, a post newer than everything held, is a push at the back.
fn insert_capped(timeline: &mut VecDeque<Arc<Post>>, post: &Arc<Post>, cap: usize) {
    let key = post.order_key();
    match timeline.back() {
        None => timeline.push_back(Arc::clone(post)),
        Some(last) if last.order_key() < key => timeline.push_back(Arc::clone(post)),
        Some(_) => match timeline.binary_search_by(|p| p.order_key().cmp(&key)) {
            Ok(_) => return,
            Err(at) => {
                if at == 0 && timeline.len() >= cap {
                    return;
                }
                timeline.insert(at, Arc::clone(post));
            }
        },
    }
    while timeline.len() > cap {
        timeline.pop_front();
    }
}

#[cfg(test)]
mod tests;
