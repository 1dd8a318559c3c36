//! The in-memory state: a pure, deterministic fold of the log.
//!
//! [`State::apply`] does no I/O. It keeps every known user (of every cluster), who follows whom
//! and since when, the followers of each user, each author's most recent posts, a capped
//! timeline per **local** user, and the high-water mark of every origin cluster. An event at or
//! below its origin's high-water mark is a duplicate and changes nothing; an event that skips a
//! sequence number is refused, so the state never has a hole that a later delivery would fill.
//!
//! # Timelines
//!
//! A user `u` is *local* iff `ClusterId::of_user(u, clusters) == cluster` (a state configured
//! with one cluster treats every user as local). Only local users have a materialized timeline;
//! the users and follow relations of every cluster are known to all (for LIST and routing).
//!
//! The timeline of a local user `u` is every post by a user `f` that `u` currently follows whose
//! time `at` is at or after `since(u, f)` (the time of the `Followed` event that started the
//! current follow), ordered by `(at, post id)`, capped to the newest `timeline_cap` posts.
//!
//! This holds whatever the order in which events of *different* origins are applied (each
//! origin's own order is kept). Clock skew between origins means a post can be applied before
//! the `Followed` event it comes after in time, so each author's most recent posts (at most
//! `timeline_cap`, shared `Arc`s) are kept, and a local `Followed` backfills the followee's posts
//! with `at >= since`. `Unfollowed` removes the followee's posts from the follower's timeline; a
//! later follow starts a new `since`. The one exception is the cap: posts evicted from a full
//! timeline are not brought back when an unfollow frees room.
//!
//! Cost: a post is pushed on its author's list and fanned out to the author's local followers
//! only (remote followers cost nothing); a follow backfills at most `timeline_cap` posts.
//!
//! # Post keys
//!
//! A post may carry its client's idempotency key. For each local author the state remembers the
//! keys of the last [`REMEMBERED_POST_KEYS`] keyed posts with their post ids
//! ([`State::post_with_key`]), so a master (or a slave promoted in its place, which folded the
//! same log) recognises a post re-sent after a lost acknowledgement. The keys are part of the
//! snapshot. Only posts of local authors are originated here, so only their keys are kept.
//!
//! The snapshot form of the state, and how older snapshots are read, is in `state/snapshot.rs`.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::iter::Peekable;
use std::sync::Arc;

use crate::event::{Event, EventKind, Post};
use crate::ids::{ClusterId, PostId, PostKey, Timestamp, UserId, UserMap};

pub mod authority;
mod snapshot;

pub use authority::{
    DEFAULT_MAX_CLOCK_SKEW, EARLIEST_EVENT_TIME, Refusal, check_authority, check_clock,
};

/// Default number of posts a materialized timeline keeps (as Mastodon does).
pub const DEFAULT_TIMELINE_CAP: usize = 400;

/// Keys of a local author's most recent keyed posts that the state remembers (see the module
/// documentation). A client that keeps at most this many posts unacknowledged is sure that a
/// re-sent post is recognised. 64 keys cost about 1.5 KiB per author who uses them.
pub const REMEMBERED_POST_KEYS: usize = 64;

/// How many posts a timeline shows when it is opened.
pub const RECENT_POSTS: usize = 20;

/// The answer to `LIST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// Every known user, ascending.
    pub all_users: Vec<UserId>,
    /// The caller's followers, ascending.
    pub followers: Vec<UserId>,
}

/// What a [`State`] needs to know about where it runs.
///
/// Non-exhaustive, so that fields can be added later: build it from `StateConfig::default()` and
/// set the fields you need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct StateConfig {
    /// The cluster whose users get materialized timelines here.
    pub cluster: ClusterId,
    /// Number of clusters in the deployment (users map to clusters round robin); with 1 (or 0)
    /// every user is local.
    pub clusters: u32,
    /// Posts kept per materialized timeline, and per author for backfilling new follows.
    pub timeline_cap: usize,
}

impl Default for StateConfig {
    /// One cluster (every user local), timelines capped at [`DEFAULT_TIMELINE_CAP`].
    fn default() -> Self {
        Self {
            cluster: ClusterId::new(1).unwrap_or_else(|| unreachable!()),
            clusters: 1,
            timeline_cap: DEFAULT_TIMELINE_CAP,
        }
    }
}

impl StateConfig {
    /// Whether `user` belongs to this state's cluster (and so has a materialized timeline).
    pub fn is_local(&self, user: UserId) -> bool {
        self.clusters <= 1 || ClusterId::of_user(user, self.clusters) == self.cluster
    }
}

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
    /// A post was added to the timelines of the author's local followers.
    Posted(Arc<Post>),
    /// A state transfer replaced an origin's contribution.
    Imaged,
    /// The event spoke for what its origin may not (see [`authority`]): its place in the
    /// origin's sequence is taken, its content is not believed. Only a log written before the
    /// rule existed can hold such an event; a master refuses one before it is logged.
    Refused(Refusal),
}

/// One user's relations, own recent posts and (if local) materialized timeline.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Account {
    /// Who this user follows, and since when.
    following: BTreeMap<UserId, Timestamp>,
    /// Followers of this user who are local (they receive its posts here), with the time each
    /// follow began (the same as in the follower's `following`, kept here so a fan-out needs
    /// no lookup in the follower's account to decide).
    local_followers: BTreeMap<UserId, Timestamp>,
    /// Followers of this user who belong to other clusters (known for LIST only).
    remote_followers: BTreeSet<UserId>,
    /// This user's own most recent posts, ordered by [`Post::order_key`], capped; the source of
    /// backfills when a local user starts following this one.
    posts: VecDeque<Arc<Post>>,
    /// Posts of followed users, oldest first, ordered by [`Post::order_key`], capped. Empty
    /// for users who are not local.
    timeline: VecDeque<Arc<Post>>,
    /// Keys of this user's last [`REMEMBERED_POST_KEYS`] keyed posts, oldest first, with the
    /// posts' ids. Empty for users who are not local.
    post_keys: VecDeque<(PostKey, PostId)>,
}

impl Account {
    /// Records `follower` (local or not) as following this user since `since`.
    fn add_follower(&mut self, follower: UserId, local: bool, since: Timestamp) {
        if local {
            self.local_followers.insert(follower, since);
        } else {
            self.remote_followers.insert(follower);
        }
    }

    fn remove_follower(&mut self, follower: UserId, local: bool) {
        if local {
            self.local_followers.remove(&follower);
        } else {
            self.remote_followers.remove(&follower);
        }
    }
}

/// The state of one server: a fold of its log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    config: StateConfig,
    users: BTreeSet<UserId>,
    accounts: UserMap<Account>,
    high_water: BTreeMap<ClusterId, u64>,
    /// The latest time of this cluster's own events applied (so a restarted server never
    /// stamps an earlier time). Other clusters' times never move it: a cluster stamps its
    /// events with its own clock.
    latest: Timestamp,
}

impl Default for State {
    fn default() -> Self {
        Self::new(StateConfig::default())
    }
}

impl State {
    /// An empty state for the cluster and timeline cap of `config` (a cap of 0 counts as 1).
    pub fn new(config: StateConfig) -> Self {
        Self {
            config: StateConfig {
                timeline_cap: config.timeline_cap.max(1),
                ..config
            },
            users: BTreeSet::new(),
            accounts: UserMap::default(),
            high_water: BTreeMap::new(),
            latest: Timestamp::default(),
        }
    }

    /// Applies one event. Pure and deterministic: the same events in the same per-origin order
    /// give the same state, and re-applying an event changes nothing. Timelines do not depend
    /// on how events of different origins interleave (see the module documentation). An event
    /// of another origin that speaks for what that origin may not ([`check_authority`]) takes
    /// its place in the sequence and changes nothing else.
    pub fn apply(&mut self, event: &Event) -> Applied {
        let own = event.id.origin == self.config.cluster;
        let refusal = if own {
            None
        } else {
            check_authority(event, self.config.clusters).err()
        };
        let hw = self.high_water.entry(event.id.origin).or_insert(0);
        if event.id.seq <= *hw {
            return Applied::Duplicate;
        }
        if !event.continues(*hw) {
            return Applied::Gap { expected: *hw + 1 };
        }
        let before = *hw;
        if event.completes() {
            *hw = event.id.seq;
        }
        if let Some(refusal) = refusal {
            return Applied::Refused(refusal);
        }
        if own {
            self.latest = self.latest.max(event.at);
        }
        match &event.kind {
            EventKind::UserJoined { user } => {
                self.users.insert(*user);
                self.accounts.entry(*user).or_default();
                Applied::UserJoined
            }
            EventKind::Followed { follower, followee } => {
                self.follow(*follower, *followee, event.at);
                Applied::FollowChanged
            }
            EventKind::Unfollowed { follower, followee } => {
                self.unfollow(*follower, *followee);
                Applied::FollowChanged
            }
            EventKind::Image(image) => {
                self.apply_image(event.id.origin, before, image);
                Applied::Imaged
            }
            EventKind::Posted { author, text, key } => {
                let post = Arc::new(Post {
                    id: event.id,
                    author: *author,
                    at: event.at,
                    text: Arc::clone(text),
                });
                self.add_post(&post);
                if let Some(key) = key {
                    self.remember_key(*author, *key, event.id);
                }
                Applied::Posted(post)
            }
        }
    }

    /// Replaces `origin`'s contribution with `image`, or one piece of it (events of `origin`
    /// up to `before` were applied already): its users are known, each of its users follows
    /// exactly whom the image says (since when it says, unless already following; a list
    /// continued from an earlier piece only adds), and its posts after `before` are added.
    fn apply_image(&mut self, origin: ClusterId, before: u64, image: &crate::event::OriginImage) {
        for user in &image.users {
            self.users.insert(*user);
            self.accounts.entry(*user).or_default();
        }
        let listed: HashMap<UserId, &Vec<(UserId, Timestamp)>> =
            image.follows.iter().map(|(f, list)| (*f, list)).collect();
        for follower in &image.users {
            let wanted = listed.get(follower);
            let current: Vec<UserId> = self.following(*follower).collect();
            for followee in current {
                if !wanted.is_some_and(|list| list.iter().any(|(f, _)| *f == followee)) {
                    self.unfollow(*follower, followee);
                }
            }
            for (followee, since) in wanted.into_iter().flat_map(|list| list.iter()) {
                self.follow(*follower, *followee, *since);
            }
        }
        for (follower, followees) in &image.continued_follows {
            for (followee, since) in followees {
                self.follow(*follower, *followee, *since);
            }
        }
        for post in &image.posts {
            if post.id.origin == origin && post.id.seq > before {
                self.add_post(&Arc::new(post.clone()));
            }
        }
    }

    /// What this cluster contributes to every cluster's state (its users, whom they follow and
    /// since when, their recent posts), for a state transfer to a cluster that fell behind.
    pub fn image(&self) -> crate::event::OriginImage {
        let mut image = crate::event::OriginImage::default();
        for user in self.users.iter().filter(|u| self.config.is_local(**u)) {
            image.users.push(*user);
            let Some(account) = self.accounts.get(user) else {
                continue;
            };
            if !account.following.is_empty() {
                let follows = account.following.iter().map(|(f, t)| (*f, *t)).collect();
                image.follows.push((*user, follows));
            }
            image
                .posts
                .extend(account.posts.iter().map(|post| Post::clone(post)));
        }
        image
    }

    /// Records that `follower` follows `followee` from `at` on (an existing follow keeps its
    /// time). A local follower's timeline gets the followee's posts made at or after `since`.
    fn follow(&mut self, follower: UserId, followee: UserId, at: Timestamp) {
        let local = self.config.is_local(follower);
        let since = *self
            .accounts
            .entry(follower)
            .or_default()
            .following
            .entry(followee)
            .or_insert(at);
        let author = self.accounts.entry(followee).or_default();
        author.add_follower(follower, local, since);
        if !local {
            return;
        }
        // Backfill: posts of the followee applied before this event but made after the follow
        // began (clock skew, or the origins' events interleaved that way).
        let start = author.posts.partition_point(|post| post.at < since);
        if start == author.posts.len() {
            return;
        }
        let backfill: Vec<Arc<Post>> = author.posts.range(start..).cloned().collect();
        let cap = self.config.timeline_cap;
        if let Some(account) = self.accounts.get_mut(&follower) {
            for post in &backfill {
                insert_capped(&mut account.timeline, post, cap);
            }
        }
    }

    /// Ends a follow and removes the followee's posts from the follower's timeline.
    fn unfollow(&mut self, follower: UserId, followee: UserId) {
        if let Some(account) = self.accounts.get_mut(&follower) {
            account.following.remove(&followee);
            account.timeline.retain(|post| post.author != followee);
        }
        let local = self.config.is_local(follower);
        if let Some(account) = self.accounts.get_mut(&followee) {
            account.remove_follower(follower, local);
        }
    }

    /// Keeps `post` among its author's recent posts and appends it to the timeline of every
    /// local follower of the author who followed at or before the post's time. Cost is linear
    /// in the number of local followers.
    fn add_post(&mut self, post: &Arc<Post>) {
        let cap = self.config.timeline_cap;
        let author = self.accounts.entry(post.author).or_default();
        insert_capped(&mut author.posts, post, cap);
        if author.local_followers.is_empty() {
            return;
        }
        // Lend the follower set out while the followers' accounts are updated: no copy, and
        // nothing below touches the author's own followers.
        let followers = std::mem::take(&mut author.local_followers);
        for (follower, since) in &followers {
            if *since > post.at {
                continue;
            }
            if let Some(account) = self.accounts.get_mut(follower) {
                insert_capped(&mut account.timeline, post, cap);
            }
        }
        if let Some(author) = self.accounts.get_mut(&post.author) {
            author.local_followers = followers;
        }
    }

    /// Remembers that `author`'s post `id` carried `key` (local authors only), forgetting the
    /// oldest key beyond [`REMEMBERED_POST_KEYS`].
    fn remember_key(&mut self, author: UserId, key: PostKey, id: PostId) {
        if !self.config.is_local(author) {
            return;
        }
        let keys = &mut self.accounts.entry(author).or_default().post_keys;
        keys.push_back((key, id));
        while keys.len() > REMEMBERED_POST_KEYS {
            keys.pop_front();
        }
    }

    /// The id of `author`'s post that carried `key`, if it is among the author's last
    /// [`REMEMBERED_POST_KEYS`] keyed posts (and the author is local).
    pub fn post_with_key(&self, author: UserId, key: PostKey) -> Option<PostId> {
        let keys = &self.accounts.get(&author)?.post_keys;
        // Newest first: a retry is almost always of one of the last few posts.
        keys.iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|(_, id)| *id)
    }

    /// This state's configuration.
    pub fn config(&self) -> &StateConfig {
        &self.config
    }

    /// Whether `user` is local here (has a materialized timeline).
    pub fn is_local(&self, user: UserId) -> bool {
        self.config.is_local(user)
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

    /// The followers of `user` (of every cluster), ascending.
    pub fn followers(&self, user: UserId) -> impl Iterator<Item = UserId> + '_ {
        self.accounts.get(&user).into_iter().flat_map(|a| Merged {
            a: a.local_followers.keys().copied().peekable(),
            b: a.remote_followers.iter().copied().peekable(),
        })
    }

    /// Number of followers of `user` (of every cluster).
    pub fn follower_count(&self, user: UserId) -> usize {
        self.accounts
            .get(&user)
            .map_or(0, |a| a.local_followers.len() + a.remote_followers.len())
    }

    /// The local followers of `user` (those whose timeline receives its posts), ascending.
    pub fn local_followers(&self, user: UserId) -> impl Iterator<Item = UserId> + '_ {
        self.accounts
            .get(&user)
            .into_iter()
            .flat_map(|a| a.local_followers.keys().copied())
    }

    /// Number of local followers of `user`.
    pub fn local_follower_count(&self, user: UserId) -> usize {
        self.accounts
            .get(&user)
            .map_or(0, |a| a.local_followers.len())
    }

    /// The users `user` follows, ascending.
    pub fn following(&self, user: UserId) -> impl Iterator<Item = UserId> + '_ {
        self.accounts
            .get(&user)
            .into_iter()
            .flat_map(|a| a.following.keys().copied())
    }

    /// The `n` most recent posts of `user`'s timeline, newest first (none if `user` is not
    /// local).
    pub fn recent_timeline(&self, user: UserId, n: usize) -> Vec<Arc<Post>> {
        self.accounts.get(&user).map_or_else(Vec::new, |a| {
            a.timeline.iter().rev().take(n).cloned().collect()
        })
    }

    /// Whether `post` sits in `user`'s timeline (it was fanned out to them).
    pub fn timeline_contains(&self, user: UserId, post: &Post) -> bool {
        self.accounts
            .get(&user)
            .is_some_and(|a| find(&a.timeline, post.order_key()).is_ok())
    }

    /// The highest sequence number applied from `origin` (0 if none).
    pub fn high_water(&self, origin: ClusterId) -> u64 {
        self.high_water.get(&origin).copied().unwrap_or(0)
    }

    /// The latest time of this cluster's own applied events (other clusters' clocks never
    /// move it).
    pub fn latest_time(&self) -> Timestamp {
        self.latest
    }

    /// Every origin cluster with at least one applied event.
    pub fn origins(&self) -> impl Iterator<Item = ClusterId> + '_ {
        self.high_water.keys().copied()
    }

    /// The maximum number of posts a timeline keeps.
    pub fn timeline_cap(&self) -> usize {
        self.config.timeline_cap
    }
}

/// Two ascending iterators of distinct users merged into one ascending iterator.
struct Merged<A: Iterator<Item = UserId>, B: Iterator<Item = UserId>> {
    a: Peekable<A>,
    b: Peekable<B>,
}

impl<A: Iterator<Item = UserId>, B: Iterator<Item = UserId>> Iterator for Merged<A, B> {
    type Item = UserId;

    fn next(&mut self) -> Option<UserId> {
        match (self.a.peek(), self.b.peek()) {
            (Some(a), Some(b)) if b < a => self.b.next(),
            (Some(_), _) => self.a.next(),
            (None, _) => self.b.next(),
        }
    }
}

/// Posts [`find`] looks at from the newest end before it searches the whole list.
const NEAR_THE_END: usize = 4;

/// Where the post with `key` is in `list` (ordered by [`Post::order_key`]): `Ok` with its
/// position, or `Err` with where it would go, as [`VecDeque::binary_search_by`] says. The
/// posts looked for are nearly always the newest or close to them (a post just fanned out, a
/// post of another cluster a few posts late), so the last few are looked at first: each look
/// reads a post, which is rarely in the cache.
fn find(list: &VecDeque<Arc<Post>>, key: (Timestamp, PostId)) -> std::result::Result<usize, usize> {
    for (back, post) in list.iter().rev().take(NEAR_THE_END).enumerate() {
        let at = list.len() - 1 - back;
        match post.order_key().cmp(&key) {
            Ordering::Less => return Err(at + 1),
            Ordering::Equal => return Ok(at),
            Ordering::Greater => {}
        }
    }
    list.binary_search_by(|p| p.order_key().cmp(&key))
}

/// Inserts `post` in order into a list that keeps at most `cap` posts (dropping the oldest).
/// The common case, a post newer than everything held, is a push at the back.
fn insert_capped(list: &mut VecDeque<Arc<Post>>, post: &Arc<Post>, cap: usize) {
    match find(list, post.order_key()) {
        Ok(_) => return,
        Err(at) if at == list.len() => list.push_back(Arc::clone(post)),
        Err(at) => {
            if at == 0 && list.len() >= cap {
                return;
            }
            list.insert(at, Arc::clone(post));
        }
    }
    while list.len() > cap {
        list.pop_front();
    }
}

#[cfg(test)]
mod tests;
