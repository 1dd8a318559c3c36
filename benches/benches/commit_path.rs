//! The commit path of a post, durable and end to end (results in `docs/benchmarks.md`,
//! "Commit path (committed-entry stream)").
//!
//! - `server_post_10000_followers_file/online/1000`: `Server::post` by an author with 10,000
//!   followers, 1,000 of them watching their timeline, on a `FileStorage` in a temporary
//!   directory. `post` returns once the entry is durable (`fdatasync`), committed and queued on
//!   every online follower's feed; the feeds are drained (and every delivery counted) between
//!   timed batches. The same as `fanout`'s `server_post_10000_followers/online/1000`, but durable
//!   on a disk instead of in memory.
//! - `end_to_end_memory/online/1000`: the whole path over the in-memory transport, on a
//!   `MemoryStorage` server with the same 10,000 followers. The author posts through a gRPC
//!   timeline stream (`TimelineSender::post`); 1,000 followers each read their own gRPC timeline
//!   stream (`TimelineStream`). One iteration is one post, timed from the `post` call until the
//!   post has arrived on every one of the 1,000 streams. Each reader checks that it receives
//!   the posts in order, none missing; the bench counts every delivery.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use sns_benches::{POST_TEXT, runtime, timed_post_batches, user};
use sns_core::testing::TestServer;
use sns_core::{
    FileStorage, MemoryStorage, Server, ServerConfig, Storage, TimelineFeed, TimelineSender,
};
use tokio::sync::Notify;

/// Followers of the author.
const FOLLOWERS: u32 = 10_000;
/// Followers of the author watching their timeline.
const ONLINE: u32 = 1_000;
/// How long the end-to-end bench waits for one post's deliveries before it calls one missing.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// A one-cluster server configuration: every follower is local and has a timeline.
fn single_cluster() -> ServerConfig {
    let mut config = ServerConfig::default();
    config.clusters = 1;
    config
}

/// Logs in users `first..=last` and makes users `2..=last` (from `first` on) follow user 1,
/// through direct calls on `server`.
async fn star(server: &Server, first: u32, last: u32) {
    for id in first..=last {
        server.login(user(id)).await.expect("login");
    }
    for id in first.max(2)..=last {
        server.follow(user(id), "1").await.expect("follow");
    }
}

/// `Server::post` on a `FileStorage` (every post durable before `post` returns) by an author
/// with 10,000 followers, 1,000 of them online.
fn server_post_file(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("temp dir");
    let server = rt.block_on(async {
        let storage: Arc<dyn Storage> =
            Arc::new(FileStorage::open(dir.path()).expect("open storage"));
        let server = Server::open(single_cluster(), storage)
            .await
            .expect("open server");
        star(&server, 1, FOLLOWERS + 1).await;
        server
    });
    let author = user(1);
    let mut feeds: Vec<TimelineFeed> = (2..=ONLINE + 1)
        .map(|id| server.open_timeline(user(id)).expect("open timeline"))
        .collect();
    let mut delivered = 0u64;
    let mut posted = 0u64;
    let mut group = c.benchmark_group("server_post_10000_followers_file");
    group.bench_function(BenchmarkId::new("online", ONLINE), |b| {
        b.iter_custom(|iters| {
            let (elapsed, got) = timed_post_batches(&rt, &server, author, &mut feeds, iters);
            delivered += got;
            posted += iters;
            elapsed
        });
    });
    group.finish();
    let entries = server.positions().commit;
    eprintln!(
        "server_post_file: {posted} posts with {ONLINE} online followers, {delivered} deliveries \
         checked, log at {entries}"
    );
    drop(feeds);
    rt.block_on(server.close());
}

/// What the follower streams' readers report to the bench.
struct Deliveries {
    /// Deliveries so far, over all readers.
    count: AtomicU64,
    /// Readers whose stream failed, ended or brought a post out of order.
    failed: AtomicU64,
    /// Woken when the deliveries of one post are complete (or a reader failed).
    done: Notify,
}

/// The text of the `n`th post of the end-to-end bench (`n` from 0).
fn numbered(n: u64) -> String {
    format!("{n} {POST_TEXT}")
}

/// One post through a gRPC timeline stream, timed until it arrived on 1,000 follower streams.
fn end_to_end_memory(c: &mut Criterion) {
    let rt = runtime();
    let deliveries = Arc::new(Deliveries {
        count: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        done: Notify::new(),
    });
    let (test, author, kept) = rt.block_on(async {
        let mut config = single_cluster();
        // The per-stream rate limit is a policy, not part of the path measured here.
        config.max_posts_per_second = 1_000_000;
        let test = TestServer::start_in_memory(config, Arc::new(MemoryStorage::new()))
            .await
            .expect("start server");
        // The author and the online followers log in through gRPC clients; the offline
        // followers directly on the server.
        let mut clients = Vec::new();
        for id in 1..=ONLINE + 1 {
            clients.push(test.client(id).await.expect("client login"));
        }
        star(&test.server, ONLINE + 2, FOLLOWERS + 1).await;
        for client in &clients[1..] {
            client.follow(user(1)).await.expect("follow");
        }
        assert_eq!(
            test.server.list(user(1)).expect("list").followers.len(),
            FOLLOWERS as usize
        );
        let (author, own) = clients[0].timeline().await.expect("author's timeline");
        // Kept open until the end: dropping a stream's sender would end the stream.
        let mut senders: Vec<TimelineSender> = Vec::new();
        for client in &clients[1..] {
            let (sender, mut stream) = client.timeline().await.expect("follower's timeline");
            senders.push(sender);
            let deliveries = Arc::clone(&deliveries);
            tokio::spawn(async move {
                let mut expected = 0u64;
                loop {
                    let ok = match stream.next().await {
                        Some(Ok(post)) => post.author == user(1) && post.text == numbered(expected),
                        Some(Err(_)) | None => false,
                    };
                    if !ok {
                        deliveries.failed.fetch_add(1, Ordering::SeqCst);
                        deliveries.done.notify_one();
                        return;
                    }
                    expected += 1;
                    let count = deliveries.count.fetch_add(1, Ordering::SeqCst) + 1;
                    if count.is_multiple_of(u64::from(ONLINE)) {
                        deliveries.done.notify_one();
                    }
                }
            });
        }
        (test, author, (senders, clients, own))
    });
    let mut posted = 0u64;
    let mut group = c.benchmark_group("end_to_end_memory");
    group.bench_function(BenchmarkId::new("online", ONLINE), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut elapsed = Duration::ZERO;
                for _ in 0..iters {
                    let text = numbered(posted);
                    let start = Instant::now();
                    author.post(&text).await.expect("post sent");
                    let expected = (posted + 1) * u64::from(ONLINE);
                    while deliveries.count.load(Ordering::SeqCst) < expected {
                        tokio::time::timeout(DELIVERY_TIMEOUT, deliveries.done.notified())
                            .await
                            .expect("a delivery is missing");
                        assert_eq!(
                            deliveries.failed.load(Ordering::SeqCst),
                            0,
                            "a follower stream failed or received a wrong post"
                        );
                    }
                    elapsed += start.elapsed();
                    posted += 1;
                    assert_eq!(deliveries.count.load(Ordering::SeqCst), expected);
                }
                elapsed
            })
        });
    });
    group.finish();
    eprintln!(
        "end_to_end_memory: {posted} posts, {} deliveries on {ONLINE} gRPC streams checked",
        deliveries.count.load(Ordering::SeqCst)
    );
    drop((author, kept));
    rt.block_on(test.stop()).expect("stop server");
}

criterion_group!(benches, server_post_file, end_to_end_memory);
criterion_main!(benches);
