//! Unit and property tests of the pure state machine.

use proptest::prelude::*;

use super::*;
use crate::codec::{Decoder, Encoder};
use crate::event::LogEntry;
use crate::ids::EventId;

fn u(id: u32) -> UserId {
    UserId::new(id).expect("valid test user id")
}

fn c(id: u32) -> ClusterId {
    ClusterId::new(id).expect("valid test cluster id")
}

/// A one-cluster state config (every user local) with timelines capped at `cap`.
fn capped(cap: usize) -> StateConfig {
    StateConfig {
        timeline_cap: cap,
        ..StateConfig::default()
    }
}

/// Builds events for one origin with consecutive sequence numbers and increasing times.
#[derive(Debug)]
struct Origin {
    cluster: ClusterId,
    seq: u64,
}

impl Origin {
    fn new(cluster: u32) -> Self {
        Self {
            cluster: c(cluster),
            seq: 0,
        }
    }

    fn event(&mut self, kind: EventKind) -> Event {
        self.seq += 1;
        Event {
            id: EventId {
                origin: self.cluster,
                seq: self.seq,
            },
            at: Timestamp(self.seq as i64 * 10),
            kind,
        }
    }

    fn join(&mut self, user: u32) -> Event {
        self.event(EventKind::UserJoined { user: u(user) })
    }

    fn follow(&mut self, follower: u32, followee: u32) -> Event {
        self.event(EventKind::Followed {
            follower: u(follower),
            followee: u(followee),
        })
    }

    fn unfollow(&mut self, follower: u32, followee: u32) -> Event {
        self.event(EventKind::Unfollowed {
            follower: u(follower),
            followee: u(followee),
        })
    }

    fn post(&mut self, author: u32, text: &str) -> Event {
        self.event(EventKind::Posted {
            author: u(author),
            text: Arc::from(text),
            key: None,
        })
    }

    fn keyed_post(&mut self, author: u32, key: u64) -> Event {
        self.event(EventKind::Posted {
            author: u(author),
            text: Arc::from(format!("keyed {key}")),
            key: Some(k(key)),
        })
    }
}

fn k(key: u64) -> PostKey {
    PostKey::new(key).expect("a key is not 0")
}

fn texts(state: &State, user: u32) -> Vec<String> {
    state
        .recent_timeline(u(user), 100)
        .iter()
        .map(|p| p.text.to_string())
        .collect()
}

#[test]
fn posts_reach_followers_after_the_follow_only() {
    let mut o = Origin::new(1);
    let mut s = State::default();
    for e in [
        o.join(1),
        o.join(2),
        o.post(2, "before"),
        o.follow(1, 2),
        o.post(2, "after"),
        o.post(1, "own"),
    ] {
        s.apply(&e);
    }
    assert_eq!(texts(&s, 1), ["after"]);
    assert!(texts(&s, 2).is_empty(), "2 follows nobody");
    assert_eq!(s.followers(u(2)).collect::<Vec<_>>(), [u(1)]);
    assert!(s.follows(u(1), u(2)));
    assert!(!s.follows(u(2), u(1)));
}

#[test]
fn unfollow_removes_the_authors_posts() {
    let mut o = Origin::new(1);
    let mut s = State::default();
    for e in [
        o.join(1),
        o.join(2),
        o.join(3),
        o.follow(1, 2),
        o.follow(1, 3),
        o.post(2, "from 2"),
        o.post(3, "from 3"),
        o.unfollow(1, 2),
    ] {
        s.apply(&e);
    }
    assert_eq!(texts(&s, 1), ["from 3"]);
    assert_eq!(s.follower_count(u(2)), 0);
}

#[test]
fn recent_timeline_is_newest_first_and_capped() {
    let mut o = Origin::new(1);
    let mut s = State::new(capped(5));
    s.apply(&o.join(1));
    s.apply(&o.join(2));
    s.apply(&o.follow(1, 2));
    for i in 0..8 {
        s.apply(&o.post(2, &format!("p{i}")));
    }
    assert_eq!(texts(&s, 1), ["p7", "p6", "p5", "p4", "p3"]);
    assert_eq!(s.recent_timeline(u(1), 2).len(), 2);
}

#[test]
fn duplicates_and_gaps_change_nothing() {
    let mut o = Origin::new(2);
    let first = o.join(2);
    let _skipped = o.join(5);
    let third = o.join(8);
    let mut s = cluster_state(1, 3);
    assert_eq!(s.apply(&first), Applied::UserJoined);
    let before = s.clone();
    assert_eq!(s.apply(&first), Applied::Duplicate);
    assert_eq!(s.apply(&third), Applied::Gap { expected: 2 });
    assert_eq!(s, before);
    assert_eq!(s.high_water(c(2)), 1);
}

#[test]
fn late_posts_are_inserted_in_time_order() {
    let mut s = cluster_state(1, 3);
    let mut local = Origin::new(1);
    s.apply(&local.join(1));
    s.apply(&local.join(2));
    s.apply(&local.join(3));
    s.apply(&local.follow(1, 2)); // at 40
    s.apply(&local.follow(1, 3)); // at 50
    let mut remote = Origin::new(3);
    remote.seq = 9; // remote events are stamped later (100+)
    s.apply(&local.post(2, "local"));
    let mut late = remote.post(3, "remote-late");
    late.id.seq = 1;
    late.at = Timestamp(55);
    s.apply(&late);
    assert_eq!(texts(&s, 1), ["local", "remote-late"]);
}

#[test]
fn snapshot_round_trips() {
    let mut o = Origin::new(1);
    let mut s = State::new(capped(3));
    for e in [
        o.join(1),
        o.join(2),
        o.join(3),
        o.follow(1, 2),
        o.follow(3, 2),
        o.post(2, "a"),
        o.post(2, "b"),
        o.post(2, "c"),
        o.post(2, "d"),
        o.follow(2, 1),
    ] {
        s.apply(&e);
    }
    let mut enc = Encoder::default();
    s.encode(&mut enc);
    let mut dec = Decoder::new(&enc.buf);
    let back = State::decode(&mut dec, &capped(3)).expect("decodes");
    dec.finish().expect("nothing left over");
    assert_eq!(back, s);
}

#[test]
fn corrupt_snapshots_are_errors_not_panics() {
    let mut o = Origin::new(1);
    let mut s = State::default();
    s.apply(&o.join(1));
    s.apply(&o.join(2));
    s.apply(&o.follow(1, 2));
    s.apply(&o.post(2, "x"));
    s.apply(&o.keyed_post(2, 7));
    let mut enc = Encoder::default();
    s.encode(&mut enc);
    // The own clock is the last section, the post keys (one user with one key) come before.
    let clock_section = 8;
    let keys_section = 8 + 4 + 8 + 20;
    let without_clock = enc.buf.len() - clock_section;
    let without_keys = without_clock - keys_section;
    for cut in 0..enc.buf.len() {
        let mut dec = Decoder::new(&enc.buf[..cut]);
        let result = State::decode(&mut dec, &capped(10)).and_then(|_| dec.finish());
        if cut == without_keys || cut == without_clock {
            // Exactly a snapshot written before keys, or the own clock, existed: it decodes.
            assert!(result.is_ok(), "{result:?}");
            continue;
        }
        assert!(result.is_err(), "a snapshot cut at {cut} must not decode");
    }
}

#[test]
fn post_keys_are_remembered_per_local_author_newest_first_and_bounded() {
    let mut o = Origin::new(1);
    let mut s = State::default();
    s.apply(&o.join(1));
    s.apply(&o.join(2));
    let first = o.keyed_post(1, 1);
    s.apply(&first);
    assert_eq!(s.post_with_key(u(1), k(1)), Some(first.id));
    assert_eq!(s.post_with_key(u(2), k(1)), None, "keys are per author");
    assert_eq!(s.post_with_key(u(1), k(2)), None);
    // Posts without a key neither need nor evict a remembered key.
    for _ in 0..2 * REMEMBERED_POST_KEYS {
        s.apply(&o.post(1, "no key"));
    }
    assert_eq!(s.post_with_key(u(1), k(1)), Some(first.id));
    // REMEMBERED_POST_KEYS more keyed posts: the first key is forgotten, every later one is
    // still known with its post's id.
    let mut later = Vec::new();
    for key in 2..=REMEMBERED_POST_KEYS as u64 + 1 {
        let event = o.keyed_post(1, key);
        s.apply(&event);
        later.push((key, event.id));
    }
    assert_eq!(s.post_with_key(u(1), k(1)), None);
    for (key, id) in later {
        assert_eq!(s.post_with_key(u(1), k(key)), Some(id));
    }
}

#[test]
fn post_keys_of_authors_of_other_clusters_are_not_kept() {
    let mut s = cluster_state(1, 2);
    let mut o2 = Origin::new(2);
    s.apply(&o2.join(2));
    s.apply(&o2.keyed_post(2, 5));
    assert_eq!(s.post_with_key(u(2), k(5)), None);
    assert_eq!(s, {
        let mut plain = cluster_state(1, 2);
        let mut o2 = Origin::new(2);
        plain.apply(&o2.join(2));
        plain.apply(&o2.post(2, "keyed 5"));
        plain
    });
}

#[test]
fn a_snapshot_keeps_post_keys() {
    let mut o = Origin::new(1);
    let mut s = State::default();
    s.apply(&o.join(1));
    s.apply(&o.join(2));
    let mut keyed = Vec::new();
    for key in [10, 11, 12] {
        let event = o.keyed_post(1, key);
        s.apply(&event);
        keyed.push((key, event.id));
    }
    let by_two = o.keyed_post(2, 10);
    s.apply(&by_two);
    let mut enc = Encoder::default();
    s.encode(&mut enc);
    let mut dec = Decoder::new(&enc.buf);
    let back = State::decode(&mut dec, s.config()).expect("decodes");
    dec.finish().expect("nothing left over");
    assert_eq!(back, s);
    for (key, id) in keyed {
        assert_eq!(back.post_with_key(u(1), k(key)), Some(id));
    }
    assert_eq!(back.post_with_key(u(2), k(10)), Some(by_two.id));
}

#[test]
fn a_snapshot_restored_for_another_cluster_drops_foreign_post_keys() {
    let mut s = State::default();
    let mut o = Origin::new(1);
    s.apply(&o.join(1));
    s.apply(&o.join(2));
    s.apply(&o.keyed_post(1, 1));
    let two = o.keyed_post(2, 2);
    s.apply(&two);
    let mut enc = Encoder::default();
    s.encode(&mut enc);
    let mut dec = Decoder::new(&enc.buf);
    let back = State::decode(&mut dec, cluster_state(2, 2).config()).expect("decodes");
    dec.finish().expect("nothing left over");
    assert_eq!(back.post_with_key(u(1), k(1)), None, "user 1 is not local");
    assert_eq!(back.post_with_key(u(2), k(2)), Some(two.id));
}

/// `event`, stamped at `time` instead of its origin's clock.
fn at(mut event: Event, time: i64) -> Event {
    event.at = Timestamp(time);
    event
}

/// The state of `cluster` in a deployment of `clusters`, with room for every post.
fn cluster_state(cluster: u32, clusters: u32) -> State {
    State::new(StateConfig {
        cluster: c(cluster),
        clusters,
        timeline_cap: DEFAULT_TIMELINE_CAP,
    })
}

fn ids(state: &State, user: u32) -> Vec<EventId> {
    let mut posts = state.recent_timeline(u(user), usize::MAX);
    posts.reverse();
    posts.iter().map(|p| p.id).collect()
}

#[test]
fn remote_followers_have_no_timeline_but_their_follows_are_known() {
    // Three clusters; this is cluster 1, which owns users 1 and 4.
    let mut s = cluster_state(1, 3);
    let (mut o1, mut o2, mut o3) = (Origin::new(1), Origin::new(2), Origin::new(3));
    for e in [o1.join(1), o1.join(4), o2.join(2), o3.join(3)] {
        s.apply(&e);
    }
    s.apply(&o2.follow(2, 3));
    s.apply(&o1.follow(4, 3));
    s.apply(&o1.follow(1, 2));
    let Applied::Posted(post) = s.apply(&at(o3.post(3, "hello"), 1000)) else {
        panic!("a post applies as a post");
    };
    // LIST data covers every cluster.
    assert_eq!(s.users().collect::<Vec<_>>(), [u(1), u(2), u(3), u(4)]);
    assert!(s.follows(u(2), u(3)));
    assert_eq!(s.followers(u(3)).collect::<Vec<_>>(), [u(2), u(4)]);
    assert_eq!(s.follower_count(u(3)), 2);
    assert_eq!(s.followers(u(2)).collect::<Vec<_>>(), [u(1)]);
    assert_eq!(s.local_followers(u(3)).collect::<Vec<_>>(), [u(4)]);
    assert_eq!(s.local_follower_count(u(3)), 1);
    // Only the local follower has the post.
    assert!(s.is_local(u(4)) && !s.is_local(u(2)));
    assert!(s.timeline_contains(u(4), &post));
    assert!(!s.timeline_contains(u(2), &post));
    assert!(
        texts(&s, 2).is_empty(),
        "user 2's timeline lives on cluster 2"
    );
    // Unfollowing keeps the relations consistent.
    s.apply(&o2.unfollow(2, 3));
    assert_eq!(s.followers(u(3)).collect::<Vec<_>>(), [u(4)]);
}

#[test]
fn a_one_cluster_state_treats_every_user_as_local() {
    // A standalone server numbered 2 still owns everyone.
    let mut s = cluster_state(2, 1);
    let mut o = Origin::new(2);
    for e in [
        o.join(1),
        o.join(2),
        o.join(3),
        o.follow(1, 3),
        o.follow(2, 3),
    ] {
        s.apply(&e);
    }
    s.apply(&o.post(3, "x"));
    assert_eq!(texts(&s, 1), ["x"]);
    assert_eq!(texts(&s, 2), ["x"]);
}

#[test]
fn a_follow_applied_after_newer_posts_backfills_them_in_either_order() {
    // 4 (cluster 1) follows 3 (cluster 3) at time 100; 3 posts at 99, 100 and 101 by its own
    // clock. Whichever origin's events arrive first, the timeline is the same.
    let mut o1 = Origin::new(1);
    let mut o3 = Origin::new(3);
    let joins = [o1.join(4), o3.join(3)];
    let follow = at(o1.follow(4, 3), 100);
    let posts = [
        at(o3.post(3, "early"), 99),
        at(o3.post(3, "same time"), 100),
        at(o3.post(3, "later"), 101),
    ];
    let mut follow_first = cluster_state(1, 3);
    let mut posts_first = cluster_state(1, 3);
    for e in &joins {
        follow_first.apply(e);
        posts_first.apply(e);
    }
    follow_first.apply(&follow);
    for e in &posts {
        follow_first.apply(e);
        posts_first.apply(e);
    }
    posts_first.apply(&follow);
    assert_eq!(texts(&follow_first, 4), ["later", "same time"]);
    assert_eq!(texts(&posts_first, 4), ["later", "same time"]);
    assert_eq!(follow_first, posts_first);
}

#[test]
fn backfill_and_cap_keep_the_newest_posts() {
    let mut s = State::new(StateConfig {
        clusters: 3,
        ..capped(3)
    });
    let mut o1 = Origin::new(1);
    let mut o2 = Origin::new(2);
    let mut o3 = Origin::new(3);
    for e in [o1.join(1), o2.join(2), o3.join(3), at(o1.follow(1, 2), 0)] {
        s.apply(&e);
    }
    for (time, text) in [(15, "2@15"), (35, "2@35"), (55, "2@55")] {
        s.apply(&at(o2.post(2, text), time));
    }
    // 3's posts arrive before 1's follow of 3 (made at 20): only 20 and later count, and of
    // everything the newest 3 are kept.
    for time in [10, 20, 30, 40, 50] {
        s.apply(&at(o3.post(3, &format!("3@{time}")), time));
    }
    assert_eq!(s.recent_timeline(u(3), 10).len(), 0, "3 follows nobody");
    s.apply(&at(o1.follow(1, 3), 20));
    assert_eq!(texts(&s, 1), ["2@55", "3@50", "3@40"]);
    // Author lists are capped too, and keep the newest.
    let kept: Vec<i64> = s.accounts[&u(3)].posts.iter().map(|p| p.at.0).collect();
    assert_eq!(kept, [30, 40, 50]);
}

#[test]
fn a_refollow_starts_a_new_since() {
    let mut s = cluster_state(1, 2);
    let mut o1 = Origin::new(1);
    let mut o2 = Origin::new(2);
    for e in [o1.join(1), o2.join(2)] {
        s.apply(&e);
    }
    s.apply(&at(o1.follow(1, 2), 10));
    s.apply(&at(o2.post(2, "20"), 20));
    assert_eq!(texts(&s, 1), ["20"]);
    s.apply(&at(o1.unfollow(1, 2), 30));
    assert!(
        texts(&s, 1).is_empty(),
        "unfollow removes the author's posts"
    );
    s.apply(&at(o2.post(2, "40"), 40));
    s.apply(&at(o1.follow(1, 2), 50));
    // Posts from before the new follow stay out, whenever they arrive.
    assert!(texts(&s, 1).is_empty(), "got {:?}", texts(&s, 1));
    s.apply(&at(o2.post(2, "45"), 45));
    s.apply(&at(o2.post(2, "60"), 60));
    assert_eq!(texts(&s, 1), ["60"]);
}

#[test]
fn snapshots_keep_author_posts_for_later_backfills() {
    let mut s = cluster_state(1, 2);
    let mut o1 = Origin::new(1);
    let mut o2 = Origin::new(2);
    for e in [o1.join(1), o2.join(2), at(o2.post(2, "p"), 100)] {
        s.apply(&e);
    }
    let mut enc = Encoder::default();
    s.encode(&mut enc);
    let mut dec = Decoder::new(&enc.buf);
    let mut back = State::decode(&mut dec, s.config()).expect("decodes");
    dec.finish().expect("nothing left over");
    assert_eq!(back, s);
    // The follow (made at 50, applied now) still finds the post.
    back.apply(&at(o1.follow(1, 2), 50));
    assert_eq!(texts(&back, 1), ["p"]);
}

#[test]
fn a_snapshot_restored_for_another_cluster_drops_foreign_timelines() {
    let mut s = State::default();
    let mut o = Origin::new(1);
    for e in [
        o.join(1),
        o.join(2),
        o.follow(1, 2),
        o.follow(2, 1),
        o.post(2, "x"),
    ] {
        s.apply(&e);
    }
    s.apply(&o.post(1, "y"));
    let mut enc = Encoder::default();
    s.encode(&mut enc);
    let mut dec = Decoder::new(&enc.buf);
    let back = State::decode(&mut dec, cluster_state(2, 2).config()).expect("decodes");
    assert!(
        texts(&back, 1).is_empty(),
        "user 1 is not local to cluster 2"
    );
    assert_eq!(texts(&back, 2), ["y"]);
    assert_eq!(back.local_followers(u(1)).collect::<Vec<_>>(), [u(2)]);
    assert_eq!(back.followers(u(2)).collect::<Vec<_>>(), [u(1)]);
}

/// An abstract operation, turned into an event of some origin.
#[derive(Debug, Clone)]
enum Op {
    Join(u32),
    Follow(u32, u32),
    Unfollow(u32, u32),
    Post(u32),
    KeyedPost(u32, u64),
}

fn op() -> impl Strategy<Value = Op> {
    let user = 1u32..6;
    prop_oneof![
        user.clone().prop_map(Op::Join),
        (user.clone(), user.clone()).prop_map(|(a, b)| Op::Follow(a, b)),
        (user.clone(), user.clone()).prop_map(|(a, b)| Op::Unfollow(a, b)),
        user.clone().prop_map(Op::Post),
        (user, 1u64..).prop_map(|(a, key)| Op::KeyedPost(a, key)),
    ]
}

/// Per-origin event sequences (origins 1..=3).
fn histories() -> impl Strategy<Value = Vec<Vec<Event>>> {
    prop::collection::vec(prop::collection::vec(op(), 0..25), 3).prop_map(|per_origin| {
        per_origin
            .into_iter()
            .enumerate()
            .map(|(i, ops)| {
                let mut origin = Origin::new(i as u32 + 1);
                ops.into_iter()
                    .map(|op| match op {
                        Op::Join(a) => origin.join(a),
                        Op::Follow(a, b) => origin.follow(a, b),
                        Op::Unfollow(a, b) => origin.unfollow(a, b),
                        Op::Post(a) => origin.post(a, "text"),
                        Op::KeyedPost(a, key) => origin.keyed_post(a, key),
                    })
                    .collect()
            })
            .collect()
    })
}

proptest! {
    /// Re-delivering events (duplicates, replays of whole prefixes) gives the same state as
    /// applying each event once, in the order it was first delivered, even for histories no
    /// master would originate.
    #[test]
    fn duplicates_and_replays_are_idempotent(
        history in histories(),
        choices in prop::collection::vec((0usize..3, 0usize..4, 0usize..30), 0..200),
    ) {
        // Noisy delivery: advance origins in random order, and at random re-send one earlier
        // event or replay a whole delivered prefix of an origin.
        let mut noisy = cluster_state(1, 3);
        let mut first_delivery: Vec<Event> = Vec::new();
        let mut cursors = [0usize; 3];
        for (origin, action, pick) in choices {
            let events = &history[origin];
            match action {
                0 | 1 => if let Some(e) = events.get(cursors[origin]) {
                    noisy.apply(e);
                    first_delivery.push(e.clone());
                    cursors[origin] += 1;
                },
                2 => if cursors[origin] > 0 {
                    prop_assert_eq!(
                        noisy.apply(&events[pick % cursors[origin]]),
                        Applied::Duplicate
                    );
                },
                _ => for e in &events[..cursors[origin]] {
                    prop_assert_eq!(noisy.apply(e), Applied::Duplicate);
                },
            }
        }
        for (origin, events) in history.iter().enumerate() {
            for e in &events[cursors[origin]..] {
                noisy.apply(e);
                first_delivery.push(e.clone());
            }
        }
        // A full replay at the end changes nothing either.
        for events in &history {
            for e in events {
                prop_assert_eq!(noisy.apply(e), Applied::Duplicate);
            }
        }
        let mut once = cluster_state(1, 3);
        for e in &first_delivery {
            once.apply(e);
        }
        prop_assert_eq!(noisy, once);
    }

    /// Applying the same history twice, with every event duplicated in place, gives exactly the
    /// same state (timelines included) as applying it once.
    #[test]
    fn in_place_duplicates_give_identical_state(history in histories()) {
        let mut once = cluster_state(2, 3);
        let mut twice = cluster_state(2, 3);
        for events in &history {
            for e in events {
                once.apply(e);
                twice.apply(e);
                prop_assert_eq!(twice.apply(e), Applied::Duplicate);
            }
        }
        for events in &history {
            for e in events {
                twice.apply(e);
            }
        }
        prop_assert_eq!(once, twice);
    }

    /// Any state (timelines and author lists full to their cap, local and remote users)
    /// survives a snapshot round trip unchanged.
    #[test]
    fn snapshots_round_trip(history in histories(), clusters in 1u32..=3, pick in 0u32..3) {
        let config = StateConfig {
            cluster: c(pick % clusters + 1),
            clusters,
            timeline_cap: 7,
        };
        let mut s = State::new(config);
        for events in &history {
            for e in events {
                s.apply(e);
            }
        }
        let mut enc = Encoder::default();
        s.encode(&mut enc);
        let mut dec = Decoder::new(&enc.buf);
        let back = State::decode(&mut dec, &config).and_then(|back| dec.finish().map(|()| back));
        prop_assert!(back.is_ok());
        prop_assert_eq!(back.ok(), Some(s));
    }
}

/// Clusters of the convergence property.
const CLUSTERS: u32 = 3;
/// Users of the convergence property (two per cluster).
const USERS: u32 = 6;
/// Large enough that no timeline or author list of the property ever evicts a post.
const NO_EVICTION: usize = 10_000;

/// What a user tries to do; [`History::issue`] turns it into a valid event or nothing.
#[derive(Debug, Clone)]
enum Intent {
    Join(u32),
    Follow(u32, u32),
    Unfollow(u32, u32),
    Post(u32),
}

fn intent() -> impl Strategy<Value = Intent> {
    let user = 1..=USERS;
    prop_oneof![
        1 => user.clone().prop_map(Intent::Join),
        3 => (user.clone(), user.clone()).prop_map(|(a, b)| Intent::Follow(a, b)),
        2 => (user.clone(), user.clone()).prop_map(|(a, b)| Intent::Unfollow(a, b)),
        4 => user.prop_map(Intent::Post),
    ]
}

/// The history of a deployment as its masters would originate it: each user's join and
/// follows on the user's own cluster, each post on its author's cluster, every command valid
/// (a follow only of a known user, an unfollow only when following), each origin stamping
/// events with its own clock (a shared tick plus the origin's skew).
#[derive(Debug)]
struct History {
    origins: Vec<Origin>,
    skew: Vec<i64>,
    events: Vec<Vec<Event>>,
    joined: BTreeSet<u32>,
    /// Current follows and the time each began.
    since: BTreeMap<(u32, u32), Timestamp>,
    posts: Vec<Post>,
}

impl History {
    fn new(skew: Vec<i64>) -> Self {
        Self {
            origins: (1..=CLUSTERS).map(Origin::new).collect(),
            skew,
            events: vec![Vec::new(); CLUSTERS as usize],
            joined: BTreeSet::new(),
            since: BTreeMap::new(),
            posts: Vec::new(),
        }
    }

    fn home(user: u32) -> usize {
        ClusterId::of_user(u(user), CLUSTERS).get() as usize - 1
    }

    /// Originates the event `intent` amounts to at time step `tick`, if any.
    fn issue(&mut self, tick: i64, intent: Intent) {
        let known = |user: u32| self.joined.contains(&user);
        let (user, kind) = match intent {
            Intent::Join(a) | Intent::Post(a) if !known(a) => {
                (a, EventKind::UserJoined { user: u(a) })
            }
            Intent::Join(a) | Intent::Post(a) => (
                a,
                EventKind::Posted {
                    author: u(a),
                    text: Arc::from(format!("post of {a} at step {tick}")),
                    key: None,
                },
            ),
            Intent::Follow(a, b) | Intent::Unfollow(a, b) => {
                if !known(a) || !known(b) || a == b {
                    return;
                }
                let (follower, followee) = (u(a), u(b));
                if self.since.contains_key(&(a, b)) {
                    (a, EventKind::Unfollowed { follower, followee })
                } else {
                    (a, EventKind::Followed { follower, followee })
                }
            }
        };
        let origin = Self::home(user);
        let mut event = self.origins[origin].event(kind);
        event.at = Timestamp(tick * 10 + self.skew[origin]);
        match &event.kind {
            EventKind::UserJoined { user } => {
                self.joined.insert(user.get());
            }
            EventKind::Followed { follower, followee } => {
                self.since
                    .insert((follower.get(), followee.get()), event.at);
            }
            EventKind::Unfollowed { follower, followee } => {
                self.since.remove(&(follower.get(), followee.get()));
            }
            EventKind::Posted { author, text, .. } => self.posts.push(Post {
                id: event.id,
                author: *author,
                at: event.at,
                text: Arc::clone(text),
            }),
            EventKind::Image(_) => unreachable!("histories are made of ordinary events"),
        }
        self.events[origin].push(event);
    }

    /// The timeline `user` must have on its own cluster: every post of a current followee
    /// made at or after the follow began, oldest first.
    fn expected_timeline(&self, user: u32) -> Vec<EventId> {
        let mut posts: Vec<&Post> = self
            .posts
            .iter()
            .filter(|p| {
                self.since
                    .get(&(user, p.author.get()))
                    .is_some_and(|since| p.at >= *since)
            })
            .collect();
        posts.sort_by_key(|p| p.order_key());
        posts.iter().map(|p| p.id).collect()
    }
}

/// A deployment's history: intents issued one per time step, and each origin's clock skew.
fn cross_cluster_history() -> impl Strategy<Value = History> {
    (
        prop::collection::vec(intent(), 0..60),
        prop::collection::vec((0i64..=20).prop_map(|k| k * 5), CLUSTERS as usize),
    )
        .prop_map(|(intents, skew)| {
            let mut history = History::new(skew);
            for (tick, intent) in intents.into_iter().enumerate() {
                history.issue(tick as i64, intent);
            }
            history
        })
}

/// Delivery choices for one cluster: (origin, action, pick), see [`deliver`].
fn deliveries() -> impl Strategy<Value = Vec<(usize, u8, usize)>> {
    prop::collection::vec((0..CLUSTERS as usize, 0u8..6, 0usize..64), 0..250)
}

/// Feeds every origin's events to `state` in the interleaving `choices` picks: deliver an
/// origin's next event, re-deliver one of its delivered events, or replay its delivered prefix;
/// then whatever is left, origin by origin. Returns the events in first-delivery order (the
/// log a master would ship to its slave).
fn deliver(
    state: &mut State,
    events: &[Vec<Event>],
    choices: &[(usize, u8, usize)],
) -> std::result::Result<Vec<Event>, TestCaseError> {
    let mut log = Vec::new();
    let mut cursors = vec![0usize; events.len()];
    for &(origin, action, pick) in choices {
        let (sent, next) = (
            &events[origin][..cursors[origin]],
            events[origin].get(cursors[origin]),
        );
        match action {
            0..=3 => {
                if let Some(e) = next {
                    let applied = state.apply(e);
                    let fresh = !matches!(applied, Applied::Duplicate | Applied::Gap { .. });
                    prop_assert!(fresh, "event {} was not applied: {:?}", e.id, applied);
                    log.push(e.clone());
                    cursors[origin] += 1;
                }
            }
            4 => {
                if !sent.is_empty() {
                    prop_assert_eq!(state.apply(&sent[pick % sent.len()]), Applied::Duplicate);
                }
            }
            _ => {
                for e in sent {
                    prop_assert_eq!(state.apply(e), Applied::Duplicate);
                }
            }
        }
    }
    for (origin, events) in events.iter().enumerate() {
        for e in &events[cursors[origin]..] {
            let applied = state.apply(e);
            let fresh = !matches!(applied, Applied::Duplicate | Applied::Gap { .. });
            prop_assert!(fresh, "event {} was not applied: {:?}", e.id, applied);
            log.push(e.clone());
        }
    }
    Ok(log)
}

/// What every cluster must agree on: the users, and each user's follows (with the time each
/// began) and followers.
#[derive(Debug, PartialEq, Eq)]
struct Relations {
    users: Vec<UserId>,
    following: BTreeMap<UserId, Vec<(UserId, Timestamp)>>,
    followers: BTreeMap<UserId, Vec<UserId>>,
}

fn relations(state: &State) -> Relations {
    Relations {
        users: state.users().collect(),
        following: state
            .accounts
            .iter()
            .map(|(user, account)| (*user, account.following.clone().into_iter().collect()))
            .collect(),
        followers: state
            .accounts
            .keys()
            .map(|user| (*user, state.followers(*user).collect()))
            .collect(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// DESIGN §9: a history issued on several clusters (follows on the follower's cluster,
    /// posts on the author's, origin clocks skewed), delivered to every cluster in any
    /// interleaving that keeps each origin's order, with duplicates and replays: every cluster
    /// ends with the same users and follow relations, a master and its slave end identical,
    /// and each user's timeline on its own cluster is exactly the posts of its current
    /// followees made since each follow began, in order, each once. Other clusters hold no
    /// timeline for that user.
    #[test]
    fn clusters_converge_and_own_timelines_are_exact(
        history in cross_cluster_history(),
        choices in prop::collection::vec(deliveries(), CLUSTERS as usize),
    ) {
        let mut masters = Vec::new();
        for (cluster, choices) in (1..=CLUSTERS).zip(&choices) {
            let config = StateConfig { cluster: c(cluster), clusters: CLUSTERS, timeline_cap: NO_EVICTION };
            let mut master = State::new(config);
            let log = deliver(&mut master, &history.events, choices)?;
            // The slave applies the master's log in order, and again in full (re-shipping).
            let mut slave = State::new(config);
            for e in log.iter().chain(&log) {
                slave.apply(e);
            }
            prop_assert_eq!(&slave, &master);
            masters.push(master);
        }
        let agreed = relations(&masters[0]);
        for master in &masters[1..] {
            prop_assert_eq!(&relations(master), &agreed);
        }
        for user in history.joined.iter().copied() {
            let home = History::home(user);
            for (i, master) in masters.iter().enumerate() {
                if i == home {
                    prop_assert_eq!(
                        ids(master, user),
                        history.expected_timeline(user),
                        "timeline of user {} on its cluster {}", user, i + 1
                    );
                } else {
                    prop_assert!(ids(master, user).is_empty(), "user {} has a timeline on cluster {}", user, i + 1);
                }
            }
        }
    }
}

#[test]
fn a_remote_event_beyond_its_origins_authority_takes_its_place_and_changes_nothing_else() {
    // Cluster 1 of 3: users 1, 4 are local; 2, 5 belong to cluster 2.
    let mut s = cluster_state(1, 3);
    let mut local = Origin::new(1);
    let mut two = Origin::new(2);
    s.apply(&local.join(1));
    s.apply(&local.join(4));
    s.apply(&two.join(2));
    s.apply(&local.follow(1, 2));
    s.apply(&local.follow(1, 4));
    let before = s.clone();
    let forged = [
        two.post(4, "a post of a local user, said by cluster 2"),
        two.unfollow(1, 2),
        two.join(3),
    ];
    for (n, event) in forged.iter().enumerate() {
        let applied = s.apply(event);
        assert!(
            matches!(applied, Applied::Refused(Refusal::NotItsUser { .. })),
            "{applied:?}"
        );
        assert_eq!(s.high_water(c(2)), 2 + n as u64, "the place is taken");
    }
    assert!(s.follows(u(1), u(2)), "the forged unfollow changed nothing");
    assert!(!s.has_user(u(3)));
    assert_eq!(
        s.recent_timeline(u(1), 10),
        before.recent_timeline(u(1), 10)
    );
    // The next legitimate event of the origin applies as usual.
    assert!(matches!(s.apply(&two.post(2, "real")), Applied::Posted(_)));
    assert_eq!(texts(&s, 1), ["real"]);
}

#[test]
fn other_clusters_times_never_move_the_local_clock() {
    let mut s = cluster_state(1, 3);
    let mut local = Origin::new(1);
    let mut two = Origin::new(2);
    s.apply(&at(local.join(1), 100));
    s.apply(&at(two.join(2), 5_000));
    s.apply(&at(two.post(2, "from the future"), i64::MAX));
    assert_eq!(s.latest_time(), Timestamp(100));
    s.apply(&at(local.follow(1, 2), 200));
    assert_eq!(s.latest_time(), Timestamp(200));
    // Through a snapshot too.
    let mut enc = Encoder::default();
    s.encode(&mut enc);
    let mut dec = Decoder::new(&enc.buf);
    let back = State::decode(&mut dec, s.config()).expect("decodes");
    assert_eq!(back.latest_time(), Timestamp(200));
}

#[test]
fn a_snapshot_written_before_the_own_clock_keeps_only_the_times_its_own_events_vouch_for() {
    let mut s = cluster_state(1, 3);
    let mut local = Origin::new(1);
    let mut two = Origin::new(2);
    s.apply(&at(local.join(1), 100));
    s.apply(&at(local.post(1, "mine"), 300));
    s.apply(&at(two.join(2), 400));
    // What an earlier version kept: the latest time of any origin.
    s.latest = Timestamp(i64::MAX);
    let mut enc = Encoder::default();
    s.encode(&mut enc);
    let old_format = &enc.buf[..enc.buf.len() - 8];
    let mut dec = Decoder::new(old_format);
    let back = State::decode(&mut dec, s.config()).expect("decodes");
    dec.finish().expect("nothing left over");
    assert_eq!(back.latest_time(), Timestamp(300));
}

/// The state of cluster 2 of 2 after `events` of cluster 1, and its image as of the last.
fn origin_with(events: &[Event]) -> (State, crate::event::OriginImage) {
    let mut origin = cluster_state(1, 2);
    for e in events {
        origin.apply(e);
    }
    let image = origin.image();
    (origin, image)
}

/// An image event of cluster 1 at `seq` holding `image`.
fn image_event(seq: u64, image: crate::event::OriginImage) -> Event {
    Event {
        id: EventId { origin: c(1), seq },
        at: Timestamp(1),
        kind: EventKind::Image(Arc::new(image)),
    }
}

#[test]
fn a_state_transfer_in_pieces_has_the_effect_of_the_whole_and_each_piece_fits_a_record() {
    // Cluster 1 of 2: users 1, 3, 5, ...; user 1 follows 30,000 users (a list too long for
    // one piece), six authors have 400 posts of 700 bytes each (1.7 MB of posts).
    let mut o = Origin::new(1);
    let mut events = Vec::new();
    for user in (1..60_000).step_by(2) {
        events.push(o.join(user));
    }
    for followee in (2..60_002).step_by(2) {
        events.push(o.follow(1, followee));
    }
    for author in [3, 5, 7, 9, 11, 13] {
        for n in 0..400 {
            events.push(o.post(author, &format!("{author}/{n} {}", "x".repeat(690))));
        }
    }
    events.push(o.follow(3, 2));
    let (_, image) = origin_with(&events);
    let seq = o.seq;
    let whole = image_event(seq, image.clone());
    assert!(whole.record_len() > crate::event::MAX_RECORD_BYTES);
    let pieces = image.into_pieces(crate::event::IMAGE_PIECE_BYTES);
    assert!(pieces.len() > 4, "{} pieces", pieces.len());
    let pieces: Vec<Event> = pieces.into_iter().map(|p| image_event(seq, p)).collect();
    for (n, piece) in pieces.iter().enumerate() {
        assert!(piece.record_len() <= crate::event::MAX_RECORD_BYTES);
        assert_eq!(piece.completes(), n + 1 == pieces.len());
        if n > 0 {
            assert!(piece.follows_event(&pieces[n - 1]));
        }
    }
    // The receiver (cluster 2) knew something of cluster 1 already, some of it stale.
    let mut prior = Origin::new(1);
    let stale = [
        prior.join(1),
        prior.join(3),
        prior.follow(3, 4),
        prior.follow(1, 9),
    ];
    let mut by_whole = cluster_state(2, 2);
    for e in &stale {
        by_whole.apply(e);
    }
    let mut by_pieces = by_whole.clone();
    assert_eq!(by_whole.apply(&whole), Applied::Imaged);
    for (n, piece) in pieces.iter().enumerate() {
        by_pieces.apply(piece);
        let expected = if piece.completes() {
            seq
        } else {
            stale.len() as u64
        };
        assert_eq!(by_pieces.high_water(c(1)), expected, "after piece {n}");
    }
    assert_eq!(by_pieces, by_whole);
    assert!(!by_pieces.follows(u(3), u(4)), "the stale follow is gone");
    assert!(by_pieces.follows(u(3), u(2)));
    assert_eq!(by_pieces.following(u(1)).count(), 30_000);
    // A piece delivered again changes nothing.
    let again = by_pieces.clone();
    assert_eq!(by_pieces.apply(&pieces[1]), Applied::Duplicate);
    assert_eq!(by_pieces, again);
}

#[test]
fn state_transfer_pieces_round_trip_through_the_log_and_whole_ones_keep_their_old_form() {
    let mut o = Origin::new(1);
    let events = [o.join(1), o.join(3), o.follow(1, 2), o.follow(1, 4)];
    let (_, image) = origin_with(&events);
    let whole = LogEntry {
        index: crate::ids::LogIndex(7),
        epoch: crate::ids::Epoch(2),
        event: image_event(4, image.clone()),
    };
    let bytes = whole.to_bytes();
    assert_eq!(
        bytes[16 + 4 + 8 + 8],
        6,
        "a whole transfer keeps the original tag"
    );
    assert_eq!(LogEntry::from_bytes(&bytes).expect("decodes"), whole);
    for piece in image.into_pieces(40) {
        let entry = LogEntry {
            event: image_event(4, piece),
            ..whole.clone()
        };
        assert_eq!(
            LogEntry::from_bytes(&entry.to_bytes()).expect("decodes"),
            entry
        );
    }
}

#[test]
fn finding_a_post_near_the_end_or_far_from_it_agrees_with_a_binary_search() {
    let post = |at: i64, seq: u64| {
        Arc::new(Post {
            id: EventId { origin: c(1), seq },
            author: u(1),
            at: Timestamp(at),
            text: Arc::from("x"),
        })
    };
    // Times 10, 20, …: every key held, and every gap (before, between, after), for lists
    // shorter and longer than the stretch looked at from the end.
    for len in 0..12u64 {
        let list: VecDeque<Arc<Post>> = (1..=len).map(|i| post(i as i64 * 10, i)).collect();
        for at in 0..=(len as i64 + 1) * 10 {
            for seq in [0, at as u64 / 10, u64::MAX] {
                let key = (Timestamp(at), EventId { origin: c(1), seq });
                assert_eq!(
                    find(&list, key),
                    list.binary_search_by(|p| p.order_key().cmp(&key)),
                    "length {len}, key {key:?}"
                );
            }
        }
    }
}
