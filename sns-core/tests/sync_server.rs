//! A server's side of synchronization: applying other clusters' events, and reading its own
//! committed events after a sequence number.

use std::sync::Arc;
use std::time::Duration;

use sns_core::Storage;
use sns_core::storage::MemoryStorage;
use sns_core::testing::eventually;
use sns_core::{
    ClusterId, Error, Event, EventId, EventKind, Server, ServerConfig, Timestamp, UserId,
};

const WAIT: Duration = Duration::from_secs(10);

fn u(id: u32) -> UserId {
    UserId::new(id).expect("user")
}

fn c(id: u32) -> ClusterId {
    ClusterId::new(id).expect("cluster")
}

fn event(origin: u32, seq: u64, kind: EventKind) -> Event {
    Event {
        id: EventId {
            origin: c(origin),
            seq,
        },
        at: Timestamp(sns_core::state::EARLIEST_EVENT_TIME.0 + 1_000 + seq as i64),
        kind,
    }
}

fn joined(origin: u32, seq: u64, user: u32) -> Event {
    event(origin, seq, EventKind::UserJoined { user: u(user) })
}

fn posted(origin: u32, seq: u64, author: u32, text: &str) -> Event {
    event(
        origin,
        seq,
        EventKind::Posted {
            author: u(author),
            text: Arc::from(text),
            key: None,
        },
    )
}

/// A standalone master of cluster 1 of 3.
async fn cluster_one(storage: Arc<MemoryStorage>, snapshot_every: u64) -> Server {
    let mut config = ServerConfig::default();
    config.cluster = c(1);
    config.clusters = 3;
    config.snapshot_every = snapshot_every;
    Server::open(config, storage).await.expect("open")
}

/// Settings of a server of cluster `cluster` of 2.
fn server_of_two(cluster: u32, snapshot_every: u64) -> ServerConfig {
    let mut config = ServerConfig::default();
    config.cluster = c(cluster);
    config.clusters = 2;
    config.snapshot_every = snapshot_every;
    config
}

#[tokio::test]
async fn remote_events_apply_once_and_a_gap_changes_nothing() {
    let server = cluster_one(Arc::new(MemoryStorage::new()), 100_000).await;
    server.login(u(1)).await.expect("login");
    let batch = vec![joined(2, 1, 2), posted(2, 2, 2, "first")];
    server.apply_remote(batch.clone()).await.expect("applied");
    server
        .follow(u(1), "2")
        .await
        .expect("a remote user can be followed");
    // The same events again, and overlapping: dropped.
    server
        .apply_remote(batch)
        .await
        .expect("duplicates are fine");
    let overlap = vec![posted(2, 2, 2, "first"), posted(2, 3, 2, "second")];
    server.apply_remote(overlap).await.expect("applied");
    let marks = server.high_water().expect("marks");
    assert_eq!(marks.get(&c(2)), Some(&3));
    let before = server.positions().commit;
    // A batch that skips sequence 4 is refused whole.
    let gap = vec![posted(2, 5, 2, "fifth")];
    assert!(matches!(
        server.apply_remote(gap).await,
        Err(Error::Conflict(_))
    ));
    assert_eq!(server.positions().commit, before, "nothing was written");
    assert_eq!(server.high_water().expect("marks").get(&c(2)), Some(&3));
    // The follow came after both posts (origin times 1002, 1003 are long past): neither shows.
    assert!(server.recent_posts(u(1)).expect("timeline").is_empty());
    server
        .apply_remote(vec![posted(2, 4, 2, "fourth")])
        .await
        .expect("applied");
    let posts = server.recent_posts(u(1)).expect("timeline");
    assert!(
        posts.is_empty(),
        "an old post (by origin time) is not shown: {posts:?}"
    );
    let live = event(
        2,
        5,
        EventKind::Posted {
            author: u(2),
            text: Arc::from("live"),
            key: None,
        },
    );
    let live = Event {
        at: Timestamp::now(),
        ..live
    };
    server.apply_remote(vec![live]).await.expect("applied");
    let posts = server.recent_posts(u(1)).expect("timeline");
    assert_eq!(posts.len(), 1);
    assert_eq!(&*posts[0].text, "live");
    server.close().await;
}

#[tokio::test]
async fn own_and_invalid_events_are_refused() {
    let server = cluster_one(Arc::new(MemoryStorage::new()), 100_000).await;
    let own = server.apply_remote(vec![joined(1, 1, 1)]).await;
    assert!(matches!(own, Err(Error::InvalidInput(_))), "{own:?}");
    let long = "x".repeat(sns_core::MAX_POST_BYTES + 1);
    let too_long = server
        .apply_remote(vec![joined(2, 1, 2), posted(2, 2, 2, &long)])
        .await;
    assert!(
        matches!(too_long, Err(Error::InvalidInput(_))),
        "{too_long:?}"
    );
    let two_lines = server.apply_remote(vec![posted(2, 1, 2, "a\nb")]).await;
    assert!(
        matches!(two_lines, Err(Error::InvalidInput(_))),
        "{two_lines:?}"
    );
    for text in [
        "\x1b[2Jgotcha",
        "\u{9b}2Jgotcha",
        "admin\u{202e}txt",
        "\u{2067}x",
    ] {
        let escape = server
            .apply_remote(vec![joined(2, 1, 2), posted(2, 2, 2, text)])
            .await;
        assert!(
            matches!(&escape, Err(Error::InvalidInput(m)) if m.contains("control character")),
            "{text:?}: {escape:?}"
        );
    }
    let over = sns_core::server::MAX_APPLY_BATCH as u64 + 1;
    let oversized: Vec<Event> = (1..=over).map(|seq| joined(2, seq, 2)).collect();
    let oversized = server.apply_remote(oversized).await;
    assert!(
        matches!(&oversized, Err(Error::InvalidInput(m)) if m.contains("at most")),
        "{oversized:?}"
    );
    assert!(
        server.high_water().expect("marks").is_empty(),
        "nothing applied"
    );
    server.set_role(sns_core::Role::Slave);
    let on_slave = server.apply_remote(vec![joined(2, 1, 2)]).await;
    assert!(matches!(on_slave, Err(Error::NotMaster(_))), "{on_slave:?}");
    server.close().await;
}

#[tokio::test]
async fn own_events_stream_committed_events_after_a_position() {
    let server = cluster_one(Arc::new(MemoryStorage::new()), 100_000).await;
    server.login(u(1)).await.expect("login"); // own 1
    server
        .apply_remote(vec![joined(2, 1, 2)])
        .await
        .expect("remote");
    server.login(u(4)).await.expect("login"); // own 2
    server.post(u(1), b"hello").await.expect("post"); // own 3
    let mut feed = server
        .own_events_after(1, Some("cluster2"))
        .await
        .expect("feed");
    let batch = feed.next_batch(10).await.expect("read").expect("running");
    let seqs: Vec<u64> = batch.iter().map(|e| e.id.seq).collect();
    assert_eq!(
        seqs,
        [2, 3],
        "own events after 1 only, the remote one skipped"
    );
    assert!(batch.iter().all(|e| e.id.origin == c(1)));
    // Live: the next own event arrives as it commits.
    let next = tokio::spawn(async move { feed.next_batch(10).await });
    server.post(u(4), b"later").await.expect("post");
    let later = tokio::time::timeout(WAIT, next)
        .await
        .expect("in time")
        .expect("task")
        .expect("read")
        .expect("running");
    assert_eq!(later.iter().map(|e| e.id.seq).collect::<Vec<_>>(), [4]);
    // From the end, and beyond it.
    assert!(server.own_events_after(4, None).await.is_ok());
    let ahead = server.own_events_after(9, None).await;
    assert!(matches!(ahead, Err(Error::InvalidInput(_))), "{ahead:?}");
    let badly_named = server.own_events_after(0, Some("no spaces")).await;
    assert!(
        matches!(badly_named, Err(Error::InvalidInput(_))),
        "{badly_named:?}"
    );
    server.close().await;
}

#[tokio::test]
async fn compaction_keeps_what_a_named_reader_needs_and_drops_the_rest() {
    let storage = Arc::new(MemoryStorage::with_retention(1_000));
    let server = cluster_one(Arc::clone(&storage), 10).await;
    server.login(u(1)).await.expect("login");
    // Cluster 2 registers as a reader at the start, cluster 3 never does.
    let feed = server
        .own_events_after(0, Some("cluster2"))
        .await
        .expect("feed");
    for n in 0..30 {
        server
            .post(u(1), format!("post {n}").as_bytes())
            .await
            .expect("post");
    }
    let compacted = eventually(WAIT, || async {
        storage.snapshot().await.ok().flatten().is_some()
    })
    .await;
    assert!(compacted, "a snapshot was taken");
    // The registered reader can still start from the beginning.
    drop(feed);
    let mut again = server
        .own_events_after(0, Some("cluster2"))
        .await
        .expect("kept");
    let first = again.next_batch(100).await.expect("read").expect("running");
    assert_eq!(first.first().map(|e| e.id.seq), Some(1));
    // Without a reader holding them, the entries go with the next compaction, and a reader
    // that far behind is started with a state transfer instead.
    storage.release("sync-cluster2");
    drop(again);
    for n in 30..60 {
        server
            .post(u(1), format!("post {n}").as_bytes())
            .await
            .expect("post");
    }
    let gone = eventually(WAIT, || async {
        matches!(
            storage
                .read(sns_core::LogIndex(1), sns_core::LogIndex(1))
                .await,
            Err(Error::Compacted { .. })
        )
    })
    .await;
    assert!(gone, "the first entries were compacted away");
    let mut late = server.own_events_after(0, None).await.expect("feed");
    let first = late.next_batch(100).await.expect("read").expect("running");
    assert!(
        matches!(
            first.as_slice(),
            [Event {
                kind: EventKind::Image(_),
                ..
            }]
        ),
        "{first:?}"
    );
    server.close().await;
}

/// A cluster that fell behind what the origin's log holds gets a state transfer, and ends with
/// the same view of the origin as a cluster that received every event.
#[tokio::test]
async fn a_state_transfer_brings_a_far_behind_cluster_to_the_same_view() {
    let origin_storage = Arc::new(MemoryStorage::with_retention(2));
    let origin = Server::open(
        server_of_two(1, 10),
        Arc::clone(&origin_storage) as Arc<dyn Storage>,
    )
    .await
    .expect("origin");
    let all = Server::open(server_of_two(2, 100_000), Arc::new(MemoryStorage::new()))
        .await
        .expect("receiver of everything");
    let late = Server::open(server_of_two(2, 100_000), Arc::new(MemoryStorage::new()))
        .await
        .expect("late receiver");
    let mut everything = origin.own_events_after(0, None).await.expect("feed");
    // Carries what the origin committed so far to `all`.
    async fn carry(feed: &mut sns_core::server::OwnEvents, origin: &Server, to: &Server) {
        let upto = origin.high_water().expect("marks")[&c(1)];
        while feed.position() < upto {
            let batch = feed.next_batch(64).await.expect("read").expect("running");
            to.apply_remote(batch).await.expect("apply");
        }
    }
    for user in [1, 3, 5] {
        origin.login(u(user)).await.expect("login");
    }
    for receiver in [&all, &late] {
        for user in [2, 4] {
            receiver.login(u(user)).await.expect("login");
        }
    }
    origin.follow(u(1), "3").await.expect("follow");
    origin.follow(u(3), "5").await.expect("follow");
    origin.post(u(3), b"early").await.expect("post");
    carry(&mut everything, &origin, &all).await;
    // The late receiver gets this much, then nothing for a long while.
    let mut start = origin.own_events_after(0, None).await.expect("feed");
    carry(&mut start, &origin, &late).await;
    for receiver in [&all, &late] {
        receiver.follow(u(2), "1").await.expect("follow");
        receiver.follow(u(2), "3").await.expect("follow");
        receiver.follow(u(4), "5").await.expect("follow");
    }
    origin.login(u(7)).await.expect("login");
    origin.unfollow(u(1), "3").await.expect("unfollow");
    origin.follow(u(1), "5").await.expect("follow");
    origin.follow(u(7), "1").await.expect("follow");
    for n in 0..30 {
        let author = [1, 3, 5][n % 3];
        origin
            .post(u(author), format!("post {n}").as_bytes())
            .await
            .expect("post");
        carry(&mut everything, &origin, &all).await;
    }
    let compacted = eventually(WAIT, || async {
        matches!(
            origin_storage
                .read(sns_core::LogIndex(1), sns_core::LogIndex(8))
                .await,
            Err(Error::Compacted { .. })
        )
    })
    .await;
    assert!(
        compacted,
        "the origin compacted what the late receiver lacks"
    );
    let after = late.high_water().expect("marks")[&c(1)];
    let mut resumed = origin
        .own_events_after(after, Some("cluster2"))
        .await
        .expect("feed");
    let upto = origin.high_water().expect("marks")[&c(1)];
    let mut saw_image = false;
    while resumed.position() < upto {
        let batch = resumed
            .next_batch(64)
            .await
            .expect("read")
            .expect("running");
        saw_image |= batch.iter().any(|e| matches!(e.kind, EventKind::Image(_)));
        late.apply_remote(batch).await.expect("apply");
    }
    assert!(saw_image, "the late receiver needed a state transfer");
    // The image again (a redelivery) changes nothing.
    let (_, before) = late.committed_state();
    let mut again = origin.own_events_after(after, None).await.expect("feed");
    let image = again.next_batch(1).await.expect("read").expect("running");
    late.apply_remote(image).await.expect("duplicate");
    assert_eq!(late.committed_state().1, before);

    let (_, want) = all.committed_state();
    let (_, got) = late.committed_state();
    assert_eq!(
        got.users().collect::<Vec<_>>(),
        want.users().collect::<Vec<_>>()
    );
    assert_eq!(got.high_water(c(1)), want.high_water(c(1)));
    for user in 1..=7 {
        assert_eq!(
            got.following(u(user)).collect::<Vec<_>>(),
            want.following(u(user)).collect::<Vec<_>>(),
            "whom {user} follows"
        );
        assert_eq!(
            got.followers(u(user)).collect::<Vec<_>>(),
            want.followers(u(user)).collect::<Vec<_>>(),
            "{user}'s followers"
        );
    }
    for user in [2, 4] {
        let ids = |s: &sns_core::State| {
            s.recent_timeline(u(user), usize::MAX)
                .iter()
                .map(|p| p.id)
                .collect::<Vec<_>>()
        };
        assert!(!ids(&want).is_empty());
        assert_eq!(ids(&got), ids(&want), "{user}'s timeline");
    }
    // And the late receiver follows live events as usual afterwards.
    origin
        .post(u(1), b"after the transfer")
        .await
        .expect("post");
    let batch = tokio::time::timeout(WAIT, resumed.next_batch(64))
        .await
        .expect("in time")
        .expect("read")
        .expect("running");
    late.apply_remote(batch).await.expect("apply");
    let timeline = late.recent_posts(u(2)).expect("timeline");
    assert_eq!(&*timeline[0].text, "after the transfer");
    for server in [origin, all, late] {
        server.close().await;
    }
}

/// The state of `server` that another cluster's refused events must not change.
fn view(server: &Server) -> (sns_core::LogIndex, Vec<UserId>, Vec<UserId>, Vec<String>) {
    let listing = server.list(u(1)).expect("list");
    let timeline = server
        .recent_posts(u(1))
        .expect("timeline")
        .iter()
        .map(|p| p.text.to_string())
        .collect();
    (
        server.positions().commit,
        listing.all_users,
        listing.followers,
        timeline,
    )
}

#[tokio::test]
async fn another_clusters_events_beyond_its_authority_or_clock_are_refused_and_counted() {
    let server = cluster_one(Arc::new(MemoryStorage::new()), 100_000).await;
    server.login(u(1)).await.expect("login");
    server.login(u(4)).await.expect("login");
    server
        .apply_remote(vec![joined(2, 1, 2)])
        .await
        .expect("applied");
    server
        .apply_remote(vec![joined(3, 1, 3)])
        .await
        .expect("applied");
    server.follow(u(1), "4").await.expect("follow");
    server.follow(u(4), "1").await.expect("follow");
    server.follow(u(1), "2").await.expect("follow");
    let before = view(&server);
    let now = Timestamp::now();
    let dated = |mut e: Event, at: i64| {
        e.at = Timestamp(at);
        e
    };
    let image = |origin: u32, seq: u64, users: Vec<u32>| {
        event(
            origin,
            seq,
            EventKind::Image(Arc::new(sns_core::event::OriginImage {
                users: users.into_iter().map(u).collect(),
                ..Default::default()
            })),
        )
    };
    let forged = [
        // An origin the deployment does not have.
        joined(99, 1, 99),
        // A post by this cluster's own user, said by cluster 2.
        posted(2, 2, 1, "I never wrote this"),
        // A follow change of this cluster's own users, said by cluster 2.
        event(
            2,
            2,
            EventKind::Unfollowed {
                follower: u(1),
                followee: u(4),
            },
        ),
        event(
            2,
            2,
            EventKind::Followed {
                follower: u(4),
                followee: u(2),
            },
        ),
        // A state transfer listing this cluster's own user (it would wipe 1's follows).
        image(2, 9, vec![2, 1]),
        // A state transfer far beyond anything an origin reaches.
        image(3, u64::MAX - 1, vec![3]),
    ];
    for event in forged {
        let id = event.id;
        let refused = server.apply_remote(vec![event]).await;
        assert!(
            matches!(refused, Err(Error::InvalidInput(_))),
            "{id}: {refused:?}"
        );
        assert_eq!(view(&server), before, "{id} changed nothing");
    }
    let clock = [
        dated(posted(2, 2, 2, "from 2100"), 4_102_444_800_000_000),
        dated(posted(2, 2, 2, "from before time"), i64::MIN),
        dated(
            posted(2, 2, 2, "eleven minutes ahead"),
            now.0 + 11 * 60 * 1_000_000,
        ),
    ];
    for event in clock {
        let refused = server.apply_remote(vec![event]).await;
        assert!(matches!(refused, Err(Error::InvalidInput(ref m)) if m.contains("clock")));
        assert_eq!(view(&server), before);
    }
    // A state transfer too large for one log record (it should have come in pieces).
    let huge = event(
        2,
        9,
        EventKind::Image(Arc::new(sns_core::event::OriginImage {
            users: (0..400_000).map(|n| u(3 * n + 2)).collect(),
            ..Default::default()
        })),
    );
    let refused = server.apply_remote(vec![huge]).await;
    assert!(
        matches!(&refused, Err(Error::InvalidInput(m)) if m.contains("over the limit")),
        "{refused:?}"
    );
    assert_eq!(view(&server), before);
    // One bad event refuses its whole batch.
    let mixed = vec![posted(2, 2, 2, "fine"), posted(2, 3, 1, "forged")];
    assert!(server.apply_remote(mixed).await.is_err());
    assert_eq!(view(&server), before);
    let refused = server.refused_remote();
    assert_eq!(refused[&c(99)].forged, 1);
    assert_eq!(refused[&c(2)].forged, 5, "{refused:?}");
    assert_eq!(
        refused[&c(2)].invalid,
        1,
        "the oversized transfer: {refused:?}"
    );
    assert_eq!(refused[&c(2)].clock, 3);
    assert_eq!(refused[&c(3)].forged, 1);
    // The origins' next legitimate events still apply.
    let live = dated(posted(2, 2, 2, "real"), Timestamp::now().0);
    server.apply_remote(vec![live]).await.expect("applied");
    assert_eq!(
        server.recent_posts(u(1)).expect("timeline")[0]
            .text
            .as_ref(),
        "real"
    );
    server
        .apply_remote(vec![joined(3, 2, 6)])
        .await
        .expect("applied");
    assert_eq!(server.high_water().expect("marks")[&c(3)], 2);
    server.close().await;
}

#[tokio::test]
async fn another_clusters_clock_never_moves_the_local_one_not_even_across_a_restart() {
    let storage = Arc::new(MemoryStorage::new());
    let server = cluster_one(Arc::clone(&storage), 100_000).await;
    server.login(u(1)).await.expect("login");
    server.login(u(4)).await.expect("login");
    server.follow(u(4), "1").await.expect("follow");
    // Nine minutes ahead: within the allowed skew, so believed, but only as that post's time.
    let ahead = Timestamp::now().0 + 9 * 60 * 1_000_000;
    let mut remote = posted(2, 2, 2, "ahead");
    remote.at = Timestamp(ahead);
    server
        .apply_remote(vec![joined(2, 1, 2), remote])
        .await
        .expect("applied");
    server.post(u(1), b"local before").await.expect("post");
    server.close().await;
    let server = cluster_one(storage, 100_000).await;
    server.login(u(1)).await.expect("login");
    server.post(u(1), b"local after").await.expect("post");
    let posts = server.recent_posts(u(4)).expect("timeline");
    assert_eq!(posts.len(), 2);
    for post in posts {
        assert!(
            post.at.0 < ahead - 8 * 60 * 1_000_000,
            "{} is stamped with the local clock",
            post.text
        );
    }
    server.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_cluster_stores_a_large_state_transfer_in_pieces_and_restarts_with_it() {
    let files = |dir: &std::path::Path| {
        let mut options = sns_core::FileStorageOptions::default();
        options.retention = 16;
        options.segment_bytes = 256 << 10;
        Arc::new(sns_core::FileStorage::open_with(dir, options).expect("open storage"))
    };
    let origin_dir = tempfile::tempdir().expect("temp dir");
    let late_dir = tempfile::tempdir().expect("temp dir");
    let origin_storage = files(origin_dir.path());
    let origin = Server::open(
        server_of_two(1, 1_000),
        Arc::clone(&origin_storage) as Arc<dyn Storage>,
    )
    .await
    .expect("origin");
    // Eight authors of cluster 1, each with a full author list of 400 posts of ~700 bytes:
    // a state transfer of about 2.3 MB, over twice what one log record may hold.
    let authors: Vec<u32> = (0..8).map(|n| 2 * n + 1).collect();
    for author in &authors {
        origin.login(u(*author)).await.expect("login");
    }
    origin.follow(u(1), "3").await.expect("follow");
    let posting = authors.iter().map(|author| {
        let origin = origin.clone();
        let author = *author;
        async move {
            for n in 0..400 {
                let text = format!("{author}/{n} {}", "p".repeat(690));
                origin.post(u(author), text.as_bytes()).await.expect("post");
            }
        }
    });
    futures_join_all(posting).await;
    let compacted = eventually(WAIT, || async {
        matches!(
            origin_storage
                .read(sns_core::LogIndex(1), sns_core::LogIndex(8))
                .await,
            Err(Error::Compacted { .. })
        )
    })
    .await;
    assert!(
        compacted,
        "the origin took a snapshot and compacted its log"
    );

    let late = Server::open(server_of_two(2, 100_000), files(late_dir.path()))
        .await
        .expect("late cluster");
    late.login(u(2)).await.expect("login");
    let upto = origin.high_water().expect("marks")[&c(1)];
    let mut feed = origin.own_events_after(0, None).await.expect("feed");
    let mut pieces = 0;
    while feed.position() < upto {
        let batch = feed.next_batch(64).await.expect("read").expect("running");
        for event in &batch {
            if matches!(&event.kind, EventKind::Image(_)) {
                pieces += 1;
                assert!(event.record_len() <= sns_core::event::MAX_RECORD_BYTES);
            }
        }
        late.apply_remote(batch).await.expect("apply");
    }
    assert!(pieces >= 3, "the transfer came in {pieces} pieces");
    late.follow(u(2), "3")
        .await
        .expect("cluster 1's users are known");
    let (_, before) = late.committed_state();
    assert_eq!(before.high_water(c(1)), upto);
    assert_eq!(before.user_count(), authors.len() + 1);
    assert!(before.follows(u(1), u(3)));
    assert_eq!(before.follower_count(u(3)), 2);
    late.close().await;
    drop(late);
    let late = Server::open(server_of_two(2, 100_000), files(late_dir.path()))
        .await
        .expect("the late cluster restarts with what it stored");
    let (_, after) = late.committed_state();
    assert_eq!(after, before);
    late.close().await;
    origin.close().await;
}

/// Runs every future to completion, concurrently.
async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(
    futures: impl Iterator<Item = F>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for future in futures {
        tasks.spawn(future);
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("task");
    }
}
