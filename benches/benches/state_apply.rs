//! `State::apply`, the fold every server runs for every committed event, and how the cost of
//! one post scales (DESIGN §8: per-post cost must not grow with the number of users or the
//! length of the log).
//!
//! - `post_cost/users/U/followers/F`: one `Posted` event whose author has F local followers,
//!   in a state of U users where every other user also follows 10 others and every follower's
//!   timeline is already full (400 posts), so each measured post is the steady state: one
//!   insert and one eviction per follower. U = 1k, 10k, 100k; F = 10, 100, 1,000 (999 with
//!   1,000 users). If the cost
//!   per post grew with U, the rows of one F would differ; it should only grow with F.
//! - `post_cost_after_log/entries/N`: the same post (100 followers, 10,000 users) after N
//!   posts were already applied (N = 0, 1,000,000): the length of the history must not matter.
//! - `apply/{user_joined,followed_then_unfollowed}`: the other events, in a 10,000-user state.

use criterion::measurement::WallTime;
use criterion::{
    BatchSize, BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main,
};
use sns_benches::{event, origin, post, user};
use sns_core::state::DEFAULT_TIMELINE_CAP;
use sns_core::{EventKind, State, StateConfig};

/// Follows of every user that is not one of the author's followers.
const BACKGROUND_FOLLOWS: u32 = 10;

/// A state of `users` users in which users `2..=followers + 1` follow user 1 and every user
/// follows the next 10 users (wrapping); every follower's timeline is full. Returns the state
/// and the last sequence number used.
fn community(users: u32, followers: u32) -> (State, u64) {
    let mut config = StateConfig::default();
    config.timeline_cap = DEFAULT_TIMELINE_CAP;
    config.clusters = 1;
    let mut state = State::new(config);
    let mut seq = 0;
    let mut apply = |state: &mut State, kind: EventKind| {
        seq += 1;
        state.apply(&event(seq, kind));
    };
    for id in 1..=users {
        apply(&mut state, EventKind::UserJoined { user: user(id) });
    }
    for id in 2..=followers + 1 {
        apply(
            &mut state,
            EventKind::Followed {
                follower: user(id),
                followee: user(1),
            },
        );
    }
    for id in 1..=users {
        for k in 1..=BACKGROUND_FOLLOWS {
            let followee = (id - 1 + k) % users + 1;
            if followee != id && followee != 1 {
                apply(
                    &mut state,
                    EventKind::Followed {
                        follower: user(id),
                        followee: user(followee),
                    },
                );
            }
        }
    }
    // Fill the followers' timelines with the author's posts.
    for _ in 0..DEFAULT_TIMELINE_CAP {
        seq += 1;
        state.apply(&post(seq, user(1)));
    }
    assert_eq!(state.local_follower_count(user(1)), followers as usize);
    (state, seq)
}

/// Times `State::apply` of the next posts of user 1 (sequence numbers after `seq`), then checks
/// that every one was applied.
fn time_posts_of_user_1(
    group: &mut BenchmarkGroup<'_, WallTime>,
    id: BenchmarkId,
    state: &mut State,
    seq: &mut u64,
) {
    group.bench_function(id, |b| {
        b.iter_batched(
            || {
                *seq += 1;
                post(*seq, user(1))
            },
            |event| state.apply(&event),
            BatchSize::SmallInput,
        );
    });
    assert_eq!(state.high_water(origin()), *seq, "a post was not applied");
}

fn post_cost(c: &mut Criterion) {
    let mut group = c.benchmark_group("post_cost");
    group.sample_size(30);
    for users in [1_000u32, 10_000, 100_000] {
        for followers in [10u32, 100, 1_000] {
            // 1,000 users have at most 999 followers each.
            let followers = followers.min(users - 1);
            let (mut state, mut seq) = community(users, followers);
            group.throughput(Throughput::Elements(u64::from(followers)));
            let id = BenchmarkId::new(format!("users/{users}/followers"), followers);
            time_posts_of_user_1(&mut group, id, &mut state, &mut seq);
            let newest = state.recent_timeline(user(followers + 1), 1);
            assert_eq!(newest.first().map(|p| p.id.seq), Some(seq));
        }
    }
    group.finish();
}

fn post_cost_after_log(c: &mut Criterion) {
    let mut group = c.benchmark_group("post_cost_after_log");
    group.sample_size(30);
    for history in [0u64, 1_000_000] {
        let (mut state, mut seq) = community(10_000, 100);
        // The history: posts by the other users, in turn.
        for n in 0..history {
            seq += 1;
            let author = 2 + (n % 9_999) as u32;
            state.apply(&post(seq, user(author)));
        }
        let id = BenchmarkId::new("entries", history);
        time_posts_of_user_1(&mut group, id, &mut state, &mut seq);
    }
    group.finish();
}

fn other_events(c: &mut Criterion) {
    let mut group = c.benchmark_group("apply");
    let (mut state, mut seq) = community(10_000, 100);
    let mut next_user = 10_001u32;
    group.bench_function("user_joined", |b| {
        b.iter_batched(
            || {
                seq += 1;
                next_user += 1;
                event(
                    seq,
                    EventKind::UserJoined {
                        user: user(next_user),
                    },
                )
            },
            |event| state.apply(&event),
            BatchSize::SmallInput,
        );
    });
    // Follow and unfollow in turn (user 5,000 and user 1), so each measured event changes the
    // relation (the follow adds both ends; the unfollow removes them and filters the
    // follower's timeline).
    let mut following = false;
    group.bench_function("followed_then_unfollowed", |b| {
        b.iter_batched(
            || {
                seq += 1;
                following = !following;
                let (follower, followee) = (user(5_000), user(1));
                event(
                    seq,
                    if following {
                        EventKind::Followed { follower, followee }
                    } else {
                        EventKind::Unfollowed { follower, followee }
                    },
                )
            },
            |event| state.apply(&event),
            BatchSize::SmallInput,
        );
    });
    assert_eq!(state.high_water(origin()), seq, "an event was not applied");
    group.finish();
}

criterion_group!(benches, post_cost, post_cost_after_log, other_events);
criterion_main!(benches);
