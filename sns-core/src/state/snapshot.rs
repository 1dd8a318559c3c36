//! The snapshot form of a [`State`]: [`State::encode`] and [`State::decode`].
//!
//! A snapshot holds, in order: the known users; the high-water mark of every origin; the
//! stored clock; a post table in which every post held by some author list or timeline appears
//! once; every account (whom it follows and since when, its own posts and its timeline as
//! indexes into the post table); the post keys of local authors; and the own clock. Followers
//! are never written: decoding rebuilds them from `following`, so the two can never disagree.
//!
//! Older snapshots stay readable. One that ends before the post keys decodes with no keys; one
//! that ends before the own clock was written last (when remote times could still move the
//! stored clock) keeps the stored time only as far as this cluster's own events vouch for it.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;
use std::sync::Arc;

use super::{Account, REMEMBERED_POST_KEYS, State, StateConfig, insert_capped};
use crate::codec::{Decoder, Encoder};
use crate::error::{Error, Result};
use crate::event::Post;
use crate::ids::{ClusterId, EventId, IdHasher, PostKey, Timestamp, UserId};

impl State {
    /// Serializes the state for a snapshot. Posts shared by several timelines and author
    /// lists are written once. Post keys come last, as a section that snapshots written before
    /// keys existed lack (they decode with no keys).
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
        // Post table: every post held by some author list or timeline, once. A post is one
        // allocation shared by every list holding it, so its address names it: building the
        // table reads no post twice (a copy under another address would only be written twice).
        let mut table: HashMap<u64, u64, BuildHasherDefault<IdHasher>> = HashMap::default();
        let mut posts: Vec<&Arc<Post>> = Vec::new();
        let mut refs: Vec<u64> = Vec::new();
        let mut ids: Vec<&UserId> = self.accounts.keys().collect();
        ids.sort();
        for id in &ids {
            let account = &self.accounts[*id];
            for post in account.posts.iter().chain(&account.timeline) {
                let at = *table
                    .entry(Arc::as_ptr(post) as usize as u64)
                    .or_insert_with(|| {
                        posts.push(post);
                        (posts.len() - 1) as u64
                    });
                refs.push(at);
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
        let mut refs = refs.into_iter();
        for id in &ids {
            let account = &self.accounts[*id];
            enc.u32(id.get());
            enc.len(account.following.len());
            for (followee, since) in &account.following {
                enc.u32(followee.get());
                enc.i64(since.0);
            }
            for list in [&account.posts, &account.timeline] {
                enc.len(list.len());
                for at in refs.by_ref().take(list.len()) {
                    enc.u64(at);
                }
            }
        }
        let keyed: Vec<(&UserId, &Account)> = ids
            .iter()
            .map(|id| (*id, &self.accounts[*id]))
            .filter(|(_, account)| !account.post_keys.is_empty())
            .collect();
        enc.len(keyed.len());
        for (id, account) in keyed {
            enc.u32(id.get());
            enc.len(account.post_keys.len());
            for (key, post) in &account.post_keys {
                enc.u64(key.get());
                enc.u32(post.origin.get());
                enc.u64(post.seq);
            }
        }
        // The own clock, last: its presence says the time above counts only this cluster's
        // own events (see `decode`).
        enc.i64(self.latest.0);
    }

    /// Reads a state written by [`State::encode`], for the cluster and cap of `config`.
    /// Followers are rebuilt from `following`; timelines of users not local under `config`
    /// are dropped.
    pub(crate) fn decode(dec: &mut Decoder<'_>, config: &StateConfig) -> Result<Self> {
        let mut state = Self::new(*config);
        for _ in 0..dec.len(4)? {
            state.users.insert(user(dec.u32()?)?);
        }
        for _ in 0..dec.len(12)? {
            let origin = cluster(dec.u32()?)?;
            state.high_water.insert(origin, dec.u64()?);
        }
        state.latest = Timestamp(dec.i64()?);
        let posts = decode_post_table(dec)?;
        state.decode_accounts(dec, &posts)?;
        let stored_latest = state.latest;
        // The post keys: absent from snapshots written before keys existed.
        if !dec.at_end() {
            state.decode_post_keys(dec)?;
        }
        state.latest = if dec.at_end() {
            state.vouched_time(stored_latest)
        } else {
            Timestamp(dec.i64()?)
        };
        state.rebuild_followers();
        Ok(state)
    }

    /// Reads the accounts: whom each follows and since when, and its own posts and timeline as
    /// indexes into `posts` (timelines of users not local here are dropped).
    fn decode_accounts(&mut self, dec: &mut Decoder<'_>, posts: &[Arc<Post>]) -> Result<()> {
        let cap = self.config.timeline_cap;
        for _ in 0..dec.len(28)? {
            let id = user(dec.u32()?)?;
            let mut account = Account::default();
            for _ in 0..dec.len(12)? {
                let followee = user(dec.u32()?)?;
                account.following.insert(followee, Timestamp(dec.i64()?));
            }
            let keep_timeline = self.config.is_local(id);
            for (list, keep) in [
                (&mut account.posts, true),
                (&mut account.timeline, keep_timeline),
            ] {
                for _ in 0..dec.len(8)? {
                    let index = usize::try_from(dec.u64()?).map_err(|_| corrupt("post index"))?;
                    let post = posts.get(index).ok_or_else(|| corrupt("post index"))?;
                    if keep {
                        insert_capped(list, post, cap);
                    }
                }
            }
            self.accounts.insert(id, account);
        }
        Ok(())
    }

    /// Reads the post keys section, keeping those of local authors only (at most
    /// [`REMEMBERED_POST_KEYS`] each, the newest).
    fn decode_post_keys(&mut self, dec: &mut Decoder<'_>) -> Result<()> {
        for _ in 0..dec.len(12)? {
            let id = user(dec.u32()?)?;
            let mut keys = VecDeque::new();
            for _ in 0..dec.len(20)? {
                let key = PostKey::new(dec.u64()?).ok_or_else(|| corrupt("post key 0"))?;
                let origin = cluster(dec.u32()?)?;
                keys.push_back((
                    key,
                    EventId {
                        origin,
                        seq: dec.u64()?,
                    },
                ));
            }
            if self.config.is_local(id) {
                while keys.len() > REMEMBERED_POST_KEYS {
                    keys.pop_front();
                }
                self.accounts.entry(id).or_default().post_keys = keys;
            }
        }
        Ok(())
    }

    /// The clock of a snapshot written before remote times were kept out of it: the stored
    /// time may be another cluster's, so it is kept only as far as this cluster's own posts and
    /// follows vouch for it.
    fn vouched_time(&self, stored: Timestamp) -> Timestamp {
        Timestamp(stored.0.min(self.own_times().max().unwrap_or_default().0))
    }

    /// Rebuilds every account's followers from the `following` of the accounts read.
    fn rebuild_followers(&mut self) {
        let edges: Vec<(UserId, UserId, Timestamp)> = self
            .accounts
            .iter()
            .flat_map(|(f, a)| a.following.iter().map(move |(g, since)| (*f, *g, *since)))
            .collect();
        for (follower, followee, since) in edges {
            let local = self.config.is_local(follower);
            self.accounts
                .entry(followee)
                .or_default()
                .add_follower(follower, local, since);
        }
    }

    /// The times of this cluster's own events that the state still holds: its posts, and the
    /// start of each follow by one of its users.
    fn own_times(&self) -> impl Iterator<Item = Timestamp> + '_ {
        let own = self.config.cluster;
        self.accounts.iter().flat_map(move |(user, account)| {
            let posts = account
                .posts
                .iter()
                .filter(move |post| post.id.origin == own)
                .map(|post| post.at);
            let follows = account
                .following
                .values()
                .copied()
                .filter(move |_| self.config.is_local(*user));
            posts.chain(follows)
        })
    }
}

/// Reads the post table: every post the accounts refer to, once, in index order.
fn decode_post_table(dec: &mut Decoder<'_>) -> Result<Vec<Arc<Post>>> {
    let n_posts = dec.len(28)?;
    let mut posts = Vec::with_capacity(n_posts);
    for _ in 0..n_posts {
        let origin = cluster(dec.u32()?)?;
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
    Ok(posts)
}

/// A snapshot that cannot be read, saying what was wrong.
fn corrupt(what: &str) -> Error {
    Error::Corrupt(format!("snapshot: {what}"))
}

/// A user id read from a snapshot.
fn user(raw: u32) -> Result<UserId> {
    UserId::new(raw).ok_or_else(|| corrupt("user id out of range"))
}

/// A cluster id read from a snapshot.
fn cluster(raw: u32) -> Result<ClusterId> {
    ClusterId::new(raw).ok_or_else(|| corrupt("cluster 0"))
}
