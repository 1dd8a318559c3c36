//! Unit and property tests of the pure state machine.

use proptest::prelude::*;

use super::*;

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
        })
    }
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
    let first = o.join(5);
    let _skipped = o.join(6);
    let third = o.join(7);
    let mut s = State::default();
    assert_eq!(s.apply(&first), Applied::UserJoined);
    let before = s.clone();
    assert_eq!(s.apply(&first), Applied::Duplicate);
    assert_eq!(s.apply(&third), Applied::Gap { expected: 2 });
    assert_eq!(s, before);
    assert_eq!(s.high_water(c(2)), 1);
}

#[test]
fn late_posts_are_inserted_in_time_order() {
    let mut s = State::default();
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
    let mut enc = Encoder::default();
    s.encode(&mut enc);
    for cut in 0..enc.buf.len() {
        let mut dec = Decoder::new(&enc.buf[..cut]);
        let result = State::decode(&mut dec, &capped(10)).and_then(|_| dec.finish());
        assert!(result.is_err(), "a snapshot cut at {cut} must not decode");
    }
}

/// An abstract operation, turned into an event of some origin.
#[derive(Debug, Clone)]
enum Op {
    Join(u32),
    Follow(u32, u32),
    Unfollow(u32, u32),
    Post(u32),
}

fn op() -> impl Strategy<Value = Op> {
    let user = 1u32..6;
    prop_oneof![
        user.clone().prop_map(Op::Join),
        (user.clone(), user.clone()).prop_map(|(a, b)| Op::Follow(a, b)),
        (user.clone(), user.clone()).prop_map(|(a, b)| Op::Unfollow(a, b)),
        user.prop_map(Op::Post),
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
                    })
                    .collect()
            })
            .collect()
    })
}

proptest! {
    /// Re-delivering events (duplicates, replays of whole prefixes) gives the same state as
    /// applying each event once, in the order it was first delivered.
    #[test]
    fn duplicates_and_replays_are_idempotent(
        history in histories(),
        choices in prop::collection::vec((0usize..3, 0usize..4, 0usize..30), 0..200),
    ) {
        // Noisy delivery: advance origins in random order, and at random re-send one earlier
        // event or replay a whole delivered prefix of an origin.
        let mut noisy = State::default();
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
        let mut once = State::default();
        for e in &first_delivery {
            once.apply(e);
        }
        prop_assert_eq!(noisy, once);
    }

    /// Applying the same history twice, with every event duplicated in place, gives exactly the
    /// same state (timelines included) as applying it once.
    #[test]
    fn in_place_duplicates_give_identical_state(history in histories()) {
        let mut once = State::default();
        let mut twice = State::default();
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

    /// Any state survives a snapshot round trip unchanged.
    #[test]
    fn snapshots_round_trip(history in histories()) {
        let mut s = State::new(capped(7));
        for events in &history {
            for e in events {
                s.apply(e);
            }
        }
        let mut enc = Encoder::default();
        s.encode(&mut enc);
        let mut dec = Decoder::new(&enc.buf);
        let back = State::decode(&mut dec, &capped(7));
        prop_assert!(back.is_ok());
        prop_assert_eq!(back.ok(), Some(s));
    }
}
