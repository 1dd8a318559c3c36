//! Post idempotency keys and acknowledgements on one server. As a library: a post re-sent with
//! its key is stored once and answered with the original's id, whether the original is
//! committed, still uncommitted (the retry waits for it), discarded with a lost role (the retry
//! fails with it), or recovered from the log or a snapshot after a restart. On the wire: a
//! structured stream acknowledges each keyed post with its id, in order, before it ends; a
//! course-mode stream never carries an acknowledgement.

use std::sync::Arc;
use std::time::Duration;

use sns_core::testing::{TestServer, eventually, settle};
use sns_core::{
    Client, CrashDisk, CrashDiskOptions, Error, EventKind, LogEntry, LogIndex, MemoryStorage,
    PostKey, Role, Server, ServerConfig, Storage, TimelineMessage, UserId,
};
use sns_proto::csce438::Message;
use sns_proto::csce438::sns_service_client::SnsServiceClient;

const WAIT: Duration = Duration::from_secs(10);
/// How long the simulated disk takes to sync.
const SYNC: Duration = Duration::from_millis(10);

fn u(id: u32) -> UserId {
    UserId::new(id).expect("valid user")
}

fn key(key: u64) -> Option<PostKey> {
    Some(PostKey::new(key).expect("a key is not 0"))
}

/// One cluster: every user is local.
fn standalone() -> ServerConfig {
    let mut config = ServerConfig::default();
    config.clusters = 1;
    config
}

async fn open(config: ServerConfig, storage: Arc<dyn Storage>) -> Server {
    Server::open(config, storage).await.expect("server opens")
}

/// The texts of the posts in the log, in log order.
async fn logged_posts(storage: &dyn Storage) -> Vec<String> {
    let recovered = storage.recover().await.expect("recover");
    posts_of(&recovered.entries)
}

fn posts_of(entries: &[LogEntry]) -> Vec<String> {
    entries
        .iter()
        .filter_map(|entry| match &entry.event.kind {
            EventKind::Posted { text, .. } => Some(text.to_string()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_post_resent_with_its_key_is_stored_once_and_answered_with_the_same_id() {
    let storage = Arc::new(MemoryStorage::new());
    let server = open(standalone(), storage.clone()).await;
    server.login(u(1)).await.expect("login");
    server.login(u(2)).await.expect("login");
    server.follow(u(2), "1").await.expect("follow");

    let first = server
        .post_keyed(u(1), b"once\n", key(7))
        .await
        .expect("post")
        .expect("an id");
    let commit = server.positions().commit;
    let again = server
        .post_keyed(u(1), b"once\n", key(7))
        .await
        .expect("retry");
    assert_eq!(
        again,
        Some(first),
        "the retry is answered with the original"
    );
    assert_eq!(server.positions().commit, commit, "nothing new was logged");
    // The key is the user's: another user's post with the same key is a post of its own, and
    // so is the same user's post under another key or with none.
    let other = server
        .post_keyed(u(2), b"once\n", key(7))
        .await
        .expect("post");
    assert!(other.is_some_and(|id| id != first));
    server
        .post_keyed(u(1), b"twice", key(8))
        .await
        .expect("post");
    server.post(u(1), b"no key").await.expect("post");
    let timeline: Vec<String> = server
        .recent_posts(u(2))
        .expect("known")
        .iter()
        .rev()
        .map(|post| post.text.to_string())
        .collect();
    assert_eq!(timeline, ["once", "twice", "no key"]);
    server.close().await;
}

#[tokio::test(start_paused = true)]
async fn a_retry_racing_its_uncommitted_original_waits_for_it_and_stores_nothing() {
    let mut options = CrashDiskOptions::default();
    options.sync_delay = SYNC;
    let disk = CrashDisk::with_options(options);
    let storage = Arc::new(disk.open().expect("open"));
    let server = open(standalone(), storage.clone()).await;
    server.login(u(1)).await.expect("login");
    let committed = server.positions().commit;

    let post = |text: &'static [u8]| {
        let server = server.clone();
        tokio::spawn(async move { server.post_keyed(u(1), text, key(3)).await })
    };
    let original = post(b"raced");
    settle().await;
    let retry = post(b"raced");
    settle().await;
    let positions = server.positions();
    assert_eq!(positions.sequenced, committed.next(), "only the original");
    assert_eq!(positions.commit, committed, "not committed yet");
    assert!(!retry.is_finished(), "the retry waits for the original");

    let original = original.await.expect("task").expect("post").expect("id");
    let retry = retry.await.expect("task").expect("retry");
    assert_eq!(retry, Some(original));
    assert_eq!(server.positions().commit, committed.next());
    server.close().await;
    drop(server);
    assert_eq!(logged_posts(&*storage).await, ["raced"]);
}

#[tokio::test(start_paused = true)]
async fn a_retry_of_a_discarded_original_fails_with_it_and_the_next_try_stores_it() {
    let mut options = CrashDiskOptions::default();
    options.sync_delay = SYNC;
    let disk = CrashDisk::with_options(options);
    let server = open(standalone(), Arc::new(disk.open().expect("open"))).await;
    server.login(u(1)).await.expect("login");
    let post = || {
        let server = server.clone();
        tokio::spawn(async move { server.post_keyed(u(1), b"again", key(4)).await })
    };
    let original = post();
    settle().await;
    let retry = post();
    settle().await;
    server.set_role(Role::Slave);
    for attempt in [original, retry] {
        assert!(matches!(
            attempt.await.expect("task"),
            Err(Error::NotMaster(_))
        ));
    }

    // Master again: the key is free, the next try stores the post, and only once.
    server.set_role(Role::Master);
    let stored = tokio::spawn({
        let server = server.clone();
        async move {
            loop {
                match server.post_keyed(u(1), b"again", key(4)).await {
                    Err(Error::NotMaster(_)) => tokio::time::sleep(SYNC).await,
                    other => return other,
                }
            }
        }
    });
    let id = tokio::time::timeout(WAIT, stored)
        .await
        .expect("in time")
        .expect("task")
        .expect("post")
        .expect("id");
    let again = server
        .post_keyed(u(1), b"again", key(4))
        .await
        .expect("retry");
    assert_eq!(again, Some(id));
    server.close().await;
    drop(server);
    let storage = disk.open().expect("reopen");
    assert_eq!(logged_posts(&storage).await, ["again"]);
}

/// The key is in the log and in snapshots, so a server recovered from either (as a restarted
/// master, or one that replays the same log) still recognises the retry.
#[tokio::test]
async fn keys_survive_a_restart_from_the_log_and_from_a_snapshot() {
    for snapshot_every in [u64::MAX, 1] {
        let storage = Arc::new(MemoryStorage::new());
        let mut config = standalone();
        config.snapshot_every = snapshot_every;
        let server = open(config.clone(), storage.clone()).await;
        server.login(u(1)).await.expect("login");
        let id = server
            .post_keyed(u(1), b"kept", key(11))
            .await
            .expect("post")
            .expect("id");
        if snapshot_every == 1 {
            // One snapshot is built at a time: once the first is saved, the next write starts
            // one that holds the post.
            let snapshot_at = |index: u64| {
                let storage = storage.clone();
                eventually(WAIT, move || {
                    let storage = storage.clone();
                    async move {
                        let snapshot = storage.snapshot().await.expect("read");
                        snapshot.is_some_and(|s| s.index >= LogIndex(index))
                    }
                })
            };
            assert!(snapshot_at(1).await);
            server.login(u(2)).await.expect("login");
            assert!(snapshot_at(3).await, "a snapshot holds the post");
            let log = storage.recover().await.expect("recover").entries;
            assert!(
                posts_of(&log).is_empty(),
                "compacted: only the snapshot has it"
            );
        }
        server.close().await;
        drop(server);

        let server = open(config, storage.clone()).await;
        let commit = server.positions().commit;
        let again = server
            .post_keyed(u(1), b"kept", key(11))
            .await
            .expect("retry");
        assert_eq!(again, Some(id), "snapshot_every {snapshot_every}");
        assert_eq!(server.positions().commit, commit, "nothing new was logged");
        server.close().await;
    }
}

async fn serve() -> TestServer {
    TestServer::start_in_memory(standalone(), Arc::new(MemoryStorage::new()))
        .await
        .expect("server starts")
}

async fn login(server: &TestServer, user: u32) -> Client {
    Client::login(&server.network, &server.addr, u(user))
        .await
        .expect("login")
}

fn texts(server: &Server, user: u32) -> Vec<String> {
    let mut posts = server.recent_posts(u(user)).expect("known");
    posts.reverse();
    posts.iter().map(|post| post.text.to_string()).collect()
}

#[tokio::test]
async fn a_structured_stream_acknowledges_each_keyed_post_in_order_before_it_ends() {
    let server = serve().await;
    let one = login(&server, 1).await;
    let two = login(&server, 2).await;
    two.follow(u(1)).await.expect("2 follows 1");
    let (sender, mut stream) = one.timeline().await.expect("timeline");
    let k = |key| PostKey::new(key).expect("a key is not 0");

    sender.post_keyed("first", k(1)).await.expect("send");
    sender.post_keyed("second", k(2)).await.expect("send");
    // The same post again (a retry): acknowledged again, with the first one's id.
    sender.post_keyed("first", k(1)).await.expect("send");
    // A post without a key is stored but not acknowledged.
    sender.post("no key").await.expect("send");
    sender.post_keyed("third", k(3)).await.expect("send");
    // Closing the sending side ends the stream once every post is handled; every ack comes
    // before the end.
    drop(sender);
    let mut acks = Vec::new();
    loop {
        let next = tokio::time::timeout(WAIT, stream.next_message())
            .await
            .expect("in time");
        match next {
            Some(Ok(TimelineMessage::Ack(ack))) => acks.push(ack),
            Some(other) => panic!("user 1 follows nobody: only acks, got {other:?}"),
            None => break,
        }
    }
    let keys: Vec<u64> = acks.iter().map(|ack| ack.key.get()).collect();
    assert_eq!(keys, [1, 2, 1, 3]);
    let ids: Vec<_> = acks.iter().map(|ack| ack.id.expect("stored")).collect();
    assert_eq!(
        ids[2], ids[0],
        "the retry is answered with the original's id"
    );
    assert!(
        ids[0] < ids[1] && ids[1] < ids[3],
        "distinct posts, in order"
    );
    assert_eq!(
        texts(&server.server, 2),
        ["first", "second", "no key", "third"]
    );
    // The ids are the stored posts' ids.
    let stored: Vec<_> = server
        .server
        .recent_posts(u(2))
        .expect("known")
        .iter()
        .rev()
        .map(|post| post.id)
        .collect();
    assert_eq!([stored[0], stored[1], stored[3]], [ids[0], ids[1], ids[3]]);
    server.stop().await.expect("stop");
}

/// The course client never asks for structured mode: even a message that carries a key (which
/// it never sends) is posted without an acknowledgement, and what it receives has none of the
/// added acknowledgement fields set.
#[tokio::test]
async fn a_course_mode_stream_gets_no_acknowledgements() {
    let server = serve().await;
    let two = login(&server, 2).await;
    let one = login(&server, 1).await;
    one.follow(u(2)).await.expect("1 follows 2");
    two.follow(u(1)).await.expect("2 follows 1");
    one.logout()
        .await
        .expect("the course client logs in on its own");

    let channel = server.channel().await.expect("connect");
    let mut rpc = SnsServiceClient::new(channel);
    rpc.login(sns_proto::csce438::Request {
        username: "1".into(),
        arguments: Vec::new(),
    })
    .await
    .expect("the course client's login");
    let (tx, rx) = tokio::sync::mpsc::channel::<Message>(4);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("username", "1".parse().expect("ascii"));
    let mut inbound = rpc.timeline(request).await.expect("timeline").into_inner();
    let key = PostKey::new(5).expect("a key is not 0");
    for (text, post_key) in [("plain", 0), ("keyed", key.get())] {
        tx.send(Message {
            username: "1".into(),
            msg: text.as_bytes().to_vec(),
            post_key,
            ..Message::default()
        })
        .await
        .expect("send");
    }
    assert!(
        eventually(WAIT, || async {
            texts(&server.server, 2) == ["plain", "keyed"]
        })
        .await,
        "both are stored"
    );
    server.server.post(u(2), b"from two").await.expect("post");
    // The stream ends once the server has handled everything sent: an ack, had there been
    // one, would come before the end.
    drop(tx);
    let mut received = Vec::new();
    while let Some(message) = tokio::time::timeout(WAIT, inbound.message())
        .await
        .expect("in time")
        .expect("no error")
    {
        received.push(message);
    }
    assert_eq!(received.len(), 1, "only the post of user 2: {received:?}");
    let post = &received[0];
    assert!(post.msg.ends_with(b") >> from two"), "pre-formatted");
    assert!(!post.ack && post.post_key == 0, "{post:?}");
    server.stop().await.expect("stop");
}
