//! Fan-out of one post (DESIGN §8: "fan-out of one post to 10,000 local followers ≤ 1 ms",
//! cost linear in the number of followers).
//!
//! - `fanout_offline/followers/N`: `State::apply` of one `Posted` event whose author has N
//!   followers, none online (the pure fold: the post lands in N materialized timelines, each
//!   already full at its 400-post cap, so the oldest post of each is evicted).
//! - `server_post_10000_followers/online/{0,1000}`: `Server::post` on a `MemoryStorage` server
//!   whose author has 10,000 followers, with none or 1,000 of them watching their timeline. The
//!   call returns once the post is committed and queued to every online follower; the feeds are
//!   drained (and every delivery counted) between timed batches.

use std::sync::Arc;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sns_benches::{
    drain_ready, origin, post, runtime, star_state, timed_post_batches, timed_posts, user,
};
use sns_core::state::DEFAULT_TIMELINE_CAP;
use sns_core::{MemoryStorage, Server, ServerConfig, TimelineFeed};

/// Followers of the author in the server benchmark (and the §8 target).
const FOLLOWERS: u32 = 10_000;
/// Followers of the author watching their timeline in the server benchmark.
const ONLINE: u32 = 1_000;

/// `State::apply` of one post, for 1,000 / 10,000 / 100,000 offline followers.
fn fanout_offline(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout_offline");
    // Twenty samples keep the 100,000-follower case (tens of ms a post) to a few seconds.
    group.sample_size(20);
    for followers in [1_000u32, 10_000, 100_000] {
        let (mut state, mut seq) = star_state(followers, DEFAULT_TIMELINE_CAP);
        let author = user(1);
        // Fill every timeline to its cap first, so that each measured post is the steady
        // state (append one, evict the oldest) rather than a timeline still growing.
        for _ in 0..DEFAULT_TIMELINE_CAP {
            seq += 1;
            state.apply(&post(seq, author));
        }
        // One timeline insert per follower: elements/s is timeline inserts per second.
        group.throughput(Throughput::Elements(u64::from(followers)));
        group.bench_with_input(
            BenchmarkId::new("followers", followers),
            &followers,
            |b, _| {
                b.iter_batched(
                    || {
                        seq += 1;
                        post(seq, author)
                    },
                    |event| state.apply(&event),
                    BatchSize::SmallInput,
                );
            },
        );
        // Every measured post was applied, none dropped as a duplicate or refused as a gap,
        // and it reached the followers' timelines.
        assert_eq!(state.high_water(origin()), seq, "a post was not applied");
        let last = state.recent_timeline(user(followers + 1), 1);
        assert_eq!(last.first().map(|p| p.id.seq), Some(seq));
    }
    group.finish();
}

/// `Server::post` by an author with 10,000 followers, none or 1,000 of them online.
fn server_post(c: &mut Criterion) {
    let rt = runtime();
    let server = rt.block_on(async {
        let storage = Arc::new(MemoryStorage::new());
        // One cluster: every follower is local and has a timeline.
        let mut config = ServerConfig::default();
        config.clusters = 1;
        let server = Server::open(config, storage).await.expect("open server");
        for id in 1..=FOLLOWERS + 1 {
            server.login(user(id)).await.expect("login");
        }
        for id in 2..=FOLLOWERS + 1 {
            server.follow(user(id), "1").await.expect("follow");
        }
        server
    });
    let author = user(1);
    let mut group = c.benchmark_group("server_post_10000_followers");

    group.bench_function(BenchmarkId::new("online", 0), |b| {
        b.iter_custom(|iters| rt.block_on(timed_posts(&server, author, iters)));
    });

    // The followers' sessions may have expired while the benchmark above ran: log the ones
    // coming online in again.
    rt.block_on(async {
        for id in 2..=ONLINE + 1 {
            match server.login(user(id)).await {
                Ok(_) | Err(sns_core::Error::AlreadyLoggedIn(_)) => {}
                Err(e) => panic!("login: {e}"),
            }
        }
    });
    let mut feeds: Vec<TimelineFeed> = (2..=ONLINE + 1)
        .map(|id| server.open_timeline(user(id)).expect("open timeline"))
        .collect();
    // The last 20 posts of the previous benchmark come first; they are not deliveries.
    for feed in &mut feeds {
        drain_ready(feed);
    }
    let mut delivered = 0u64;
    let mut posted = 0u64;
    group.bench_function(BenchmarkId::new("online", ONLINE), |b| {
        b.iter_custom(|iters| {
            let (elapsed, got) = timed_post_batches(&rt, &server, author, &mut feeds, iters);
            delivered += got;
            posted += iters;
            elapsed
        });
    });
    group.finish();
    eprintln!(
        "server_post: {posted} posts with {ONLINE} online followers, {delivered} deliveries checked"
    );
    drop(feeds);
    rt.block_on(server.close());
}

criterion_group!(benches, fanout_offline, server_post);
criterion_main!(benches);
