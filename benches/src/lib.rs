//! Shared fixtures for the criterion benchmarks in `benches/benches/` (run them with
//! `cargo bench -p sns-benches --bench <fanout|storage|recovery|commit_path>`; results in
//! `docs/benchmarks.md`). Two measurements are plain binaries instead: `failover` (time from
//! SIGKILL of a master to the first successful client call, with the real binaries as
//! processes), `mirroring` (posts/s and commit latency with and without a slave) and `hold`
//! (connections and timeline streams one running `tsd` holds, and its memory per each).
//!
//! Everything here builds events the way one cluster's master would: origin cluster 1,
//! gap-free sequence numbers from 1, strictly increasing timestamps, so [`State::apply`] never
//! drops an event as a duplicate or refuses it as a gap.

use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use sns_core::{
    ClusterId, Epoch, Event, EventId, EventKind, LogEntry, LogIndex, Server, State, StateConfig,
    TimelineFeed, Timestamp, UserId,
};

/// Time of sequence number 0: events are stamped `BASE_TIME + seq` microseconds.
pub const BASE_TIME: i64 = 1_700_000_000_000_000;

/// The text of every benchmark post (a typical short post).
pub const POST_TEXT: &str = "a post of a typical length, about sixty bytes of UTF-8 text";

/// The origin cluster of every benchmark event.
pub fn origin() -> ClusterId {
    ClusterId::new(1).expect("cluster 1 is a valid cluster id")
}

/// User `id` (must be in `1..=2^31-1`).
pub fn user(id: u32) -> UserId {
    UserId::new(id).expect("benchmark user ids are in range")
}

/// The event with sequence number `seq` of origin 1, stamped `BASE_TIME + seq`.
pub fn event(seq: u64, kind: EventKind) -> Event {
    let offset = i64::try_from(seq).expect("sequence numbers fit in i64");
    Event {
        id: EventId {
            origin: origin(),
            seq,
        },
        at: Timestamp(BASE_TIME + offset),
        kind,
    }
}

/// A `Posted` event of `author` with sequence number `seq` and a freshly allocated text.
pub fn post(seq: u64, author: UserId) -> Event {
    event(
        seq,
        EventKind::Posted {
            author,
            text: Arc::from(POST_TEXT),
            key: None,
        },
    )
}

/// A state in which users `2..=followers + 1` follow user 1: every user joins (users in
/// order), then every follow, one event each. Returns the state and the last sequence number
/// used, so the next event must use `last + 1`.
pub fn star_state(followers: u32, timeline_cap: usize) -> (State, u64) {
    let mut config = StateConfig::default();
    config.timeline_cap = timeline_cap;
    let mut state = State::new(config);
    let mut seq = 0;
    let mut apply = |kind: EventKind| {
        seq += 1;
        let applied = state.apply(&event(seq, kind));
        assert!(
            !matches!(
                applied,
                sns_core::Applied::Duplicate | sns_core::Applied::Gap { .. }
            ),
            "setup event {seq} was not applied: {applied:?}"
        );
    };
    for id in 1..=followers + 1 {
        apply(EventKind::UserJoined { user: user(id) });
    }
    for id in 2..=followers + 1 {
        apply(EventKind::Followed {
            follower: user(id),
            followee: user(1),
        });
    }
    assert_eq!(state.follower_count(user(1)), followers as usize);
    (state, seq)
}

/// The log entry at `index`, written under epoch 1, carrying the event of sequence number
/// `index` (a server's own log: index and sequence number advance together).
pub fn log_entry(index: u64, kind: EventKind) -> LogEntry {
    LogEntry {
        index: LogIndex(index),
        epoch: Epoch(1),
        event: event(index, kind),
    }
}

/// The log entry at `index` holding a post of `author`.
pub fn post_entry(index: u64, author: UserId) -> LogEntry {
    LogEntry {
        index: LogIndex(index),
        epoch: Epoch(1),
        event: post(index, author),
    }
}

/// A realistic log of `len` entries (indexes `1..=len`): `users` users join, each follows the
/// next `follows_each` users (wrapping around), and every remaining entry is a post by the users
/// in turn, so replaying each post fans it out to `follows_each` timelines.
pub fn community_log(len: u64, users: u32, follows_each: u32) -> impl Iterator<Item = LogEntry> {
    let joins = (1..=users).map(|id| EventKind::UserJoined { user: user(id) });
    let follows = (1..=users).flat_map(move |id| {
        (1..=follows_each).map(move |k| EventKind::Followed {
            follower: user(id),
            followee: user((id - 1 + k) % users + 1),
        })
    });
    let setup = joins.chain(follows);
    let posts = (0..).map(move |n: u64| {
        let author = u32::try_from(n % u64::from(users)).expect("fits: below users") + 1;
        EventKind::Posted {
            author: user(author),
            text: Arc::from(POST_TEXT),
            key: None,
        }
    });
    setup
        .chain(posts)
        .zip(1..=len)
        .map(|(kind, index)| log_entry(index, kind))
}

/// Takes every post already queued on `feed` without waiting, and returns how many there were.
/// Panics if the feed reports that its reader fell behind (posts were dropped) or was closed.
pub fn drain_ready(feed: &mut TimelineFeed) -> u64 {
    let mut cx = Context::from_waker(Waker::noop());
    let mut taken = 0;
    loop {
        match feed.poll_next_post(&mut cx) {
            Poll::Ready(Some(Ok(_post))) => taken += 1,
            Poll::Ready(Some(Err(e))) => panic!("timeline feed of {} failed: {e}", feed.user()),
            Poll::Ready(None) => panic!("timeline feed of {} was closed", feed.user()),
            Poll::Pending => return taken,
        }
    }
}

/// Posts per timed batch in the `Server::post` benches; below the default stream queue (1,024),
/// so no feed ever overflows.
pub const POST_BATCH: u64 = 500;

/// Posts `count` times as `author` and returns the time it took.
pub async fn timed_posts(server: &Server, author: UserId, count: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..count {
        let id = server
            .post(author, POST_TEXT.as_bytes())
            .await
            .expect("post accepted");
        std::hint::black_box(id);
    }
    start.elapsed()
}

/// Times `iters` posts by `author` in batches of [`POST_BATCH`]. Between batches (outside the
/// timed part) every feed is drained and checked to hold the whole batch: `post` returns only
/// after queueing to every online follower, so nothing is waited for. Returns the time taken
/// and the deliveries counted.
pub fn timed_post_batches(
    rt: &tokio::runtime::Runtime,
    server: &Server,
    author: UserId,
    feeds: &mut [TimelineFeed],
    iters: u64,
) -> (Duration, u64) {
    let mut elapsed = Duration::ZERO;
    let mut delivered = 0;
    let mut left = iters;
    while left > 0 {
        let batch = left.min(POST_BATCH);
        elapsed += rt.block_on(timed_posts(server, author, batch));
        let got: u64 = feeds.iter_mut().map(drain_ready).sum();
        assert_eq!(got, batch * feeds.len() as u64, "a delivery is missing");
        delivered += got;
        left -= batch;
    }
    (elapsed, delivered)
}

/// A multi-threaded tokio runtime like the server binary's (one worker per core).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("build the tokio runtime")
}
