//! The commit path of one server, called as a library on tokio's paused clock over a
//! simulated disk: nothing is visible before it is durable, the committed-entry stream yields
//! every committed entry once and in order, writers are held back when too much is in flight,
//! and a master that loses its role discards what it had not committed.

use std::sync::Arc;
use std::time::Duration;

use sns_core::testing::{eventually, settle};
use sns_core::{
    CrashDisk, CrashDiskOptions, Error, EventKind, LogIndex, MemoryStorage, Role, Server,
    ServerConfig, Storage, UserId,
};

const WAIT: Duration = Duration::from_secs(10);
/// How long the simulated disk takes to sync.
const SYNC: Duration = Duration::from_millis(10);

fn u(id: u32) -> UserId {
    UserId::new(id).expect("valid user")
}

fn slow_disk() -> CrashDisk {
    let mut options = CrashDiskOptions::default();
    options.sync_delay = SYNC;
    CrashDisk::with_options(options)
}

async fn open(config: ServerConfig, storage: Arc<dyn Storage>) -> Server {
    Server::open(config, storage).await.expect("server opens")
}

/// One cluster: every user is local and has a timeline.
fn standalone() -> ServerConfig {
    let mut config = ServerConfig::default();
    config.clusters = 1;
    config
}

#[tokio::test(start_paused = true)]
async fn nothing_is_acknowledged_or_visible_before_it_is_durable() {
    let disk = slow_disk();
    let server = open(standalone(), Arc::new(disk.open().expect("open"))).await;
    server.login(u(1)).await.expect("login");
    server.login(u(2)).await.expect("login");
    server.follow(u(2), "1").await.expect("follow");
    let mut feed = server.open_timeline(u(2)).expect("timeline");
    let mut stream = server.committed_after(server.positions().commit);

    let posting = tokio::spawn({
        let server = server.clone();
        async move { server.post(u(1), b"hello\n").await }
    });
    settle().await;
    let positions = server.positions();
    assert_eq!(positions.sequenced, positions.commit.next(), "sequenced");
    assert!(!posting.is_finished(), "not acknowledged before the sync");
    // Half the sync time later, still nothing: not on the stream, the feed, or the timeline.
    let early = tokio::time::timeout(SYNC / 2, stream.next_batch(10)).await;
    assert!(early.is_err(), "the committed stream waits for durability");
    assert!(server.recent_posts(u(2)).expect("known").is_empty());
    // Once synced it is committed, and everything sees it.
    let id = posting.await.expect("task").expect("post").expect("an id");
    let batch = stream.next_batch(10).await.expect("read").expect("running");
    assert!(matches!(
        &batch[..],
        [entry] if entry.event.id == id && matches!(entry.event.kind, EventKind::Posted { .. })
    ));
    let delivered = feed.next().await.expect("open").expect("ok");
    assert_eq!((delivered.id, &*delivered.text), (id, "hello"));
    server.close().await;
}

#[tokio::test]
async fn the_committed_stream_yields_every_entry_once_in_order_then_live() {
    let storage = Arc::new(MemoryStorage::new());
    let mut config = standalone();
    // A tiny window, so early readers must fall back to the log.
    config.recent_entries = 4;
    let server = open(config, storage.clone()).await;
    for user in 1..=3 {
        server.login(u(user)).await.expect("login");
    }
    server.follow(u(2), "1").await.expect("follow");
    for i in 0..10 {
        server
            .post(u(1), format!("p{i}").as_bytes())
            .await
            .expect("post");
    }
    let commit = server.positions().commit;
    assert_eq!(commit, LogIndex(14));
    let logged = storage.read(LogIndex(1), commit).await.expect("log");

    // From the start: everything, in order, in batches of at most 5.
    let mut from_start = server.committed_after(LogIndex(0));
    let mut seen = Vec::new();
    while seen.len() < logged.len() {
        let batch = from_start
            .next_batch(5)
            .await
            .expect("read")
            .expect("running");
        assert!(!batch.is_empty() && batch.len() <= 5);
        seen.extend(batch);
    }
    assert_eq!(seen, logged);
    // From inside the window.
    let mut recent = server.committed_after(LogIndex(12));
    let batch = recent
        .next_batch(100)
        .await
        .expect("read")
        .expect("running");
    assert_eq!(batch, logged[12..]);

    // Live: both readers get the next entry, once.
    let live = tokio::spawn(async move {
        let a = from_start
            .next_batch(100)
            .await
            .expect("read")
            .expect("running");
        let b = recent
            .next_batch(100)
            .await
            .expect("read")
            .expect("running");
        (a, b)
    });
    server.post(u(1), b"live").await.expect("post");
    let (a, b) = tokio::time::timeout(WAIT, live)
        .await
        .expect("in time")
        .expect("task");
    assert_eq!(a, b);
    assert_eq!(
        a.iter().map(|e| e.index).collect::<Vec<_>>(),
        [LogIndex(15)]
    );
    server.close().await;
}

#[tokio::test(start_paused = true)]
async fn writers_wait_while_the_commit_path_is_full() {
    let disk = slow_disk();
    let mut config = standalone();
    config.max_inflight = 3;
    let server = open(config, Arc::new(disk.open().expect("open"))).await;
    server.login(u(1)).await.expect("login");
    let base = server.positions().commit;
    let posts: Vec<_> = (0..10)
        .map(|i| {
            let server = server.clone();
            tokio::spawn(async move { server.post(u(1), format!("p{i}").as_bytes()).await })
        })
        .collect();
    settle().await;
    let positions = server.positions();
    assert_eq!(positions.commit, base);
    assert_eq!(
        positions.sequenced.0 - base.0,
        3,
        "only as many entries as there are in-flight slots are sequenced"
    );
    for post in posts {
        post.await.expect("task").expect("post");
    }
    assert_eq!(server.positions().commit.0 - base.0, 10);
    server.close().await;
}

#[tokio::test(start_paused = true)]
async fn a_master_that_loses_its_role_discards_what_it_had_not_committed() {
    let disk = slow_disk();
    let server = open(standalone(), Arc::new(disk.open().expect("open"))).await;
    server.login(u(1)).await.expect("login");
    server.login(u(2)).await.expect("login");
    let committed = server.positions().commit;

    let follow = tokio::spawn({
        let server = server.clone();
        async move { server.follow(u(1), "2").await }
    });
    let post = tokio::spawn({
        let server = server.clone();
        async move { server.post(u(2), b"never seen").await }
    });
    settle().await;
    assert_eq!(server.positions().sequenced.0, committed.0 + 2);
    server.set_role(Role::Slave);
    assert!(matches!(
        follow.await.expect("task"),
        Err(Error::NotMaster(_))
    ));
    assert!(matches!(
        post.await.expect("task"),
        Err(Error::NotMaster(_))
    ));
    let positions = server.positions();
    assert_eq!(
        (positions.sequenced, positions.commit),
        (committed, committed)
    );

    // Master again: the discarded follow is not there, so following works (not "already
    // following"), and it takes the index the discarded entry had.
    server.set_role(Role::Master);
    assert!(
        eventually(WAIT, || {
            let server = server.clone();
            async move { server.follow(u(1), "2").await.is_ok() }
        })
        .await
    );
    assert!(server.recent_posts(u(1)).expect("known").is_empty());
    server.close().await;
    drop(server);

    // The log holds the committed entries and the new follow, nothing discarded.
    let storage = disk.open().expect("reopen");
    let log = storage.recover().await.expect("recover").entries;
    let kinds: Vec<_> = log.iter().map(|e| &e.event.kind).collect();
    assert_eq!(log.len() as u64, committed.0 + 1, "{kinds:?}");
    assert!(matches!(
        kinds.last(),
        Some(EventKind::Followed { follower, followee }) if *follower == u(1) && *followee == u(2)
    ));
}
