//! Server semantics through the `Client` API over in-memory pipes: every command's success and
//! error cases (DESIGN §4), sessions, timelines, and the course's wire compatibility rules.
//! One test runs over loopback TCP, to keep the socket path honest.

use std::sync::Arc;
use std::time::Duration;

use sns_core::client::Client;
use sns_core::testing::{TestServer, eventually};
use sns_core::{Error, FileStorage, MemoryStorage, Server, ServerConfig, Storage, UserId};
use sns_proto::csce438::sns_service_client::SnsServiceClient;
use sns_proto::csce438::{Message, Request};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(10);

fn u(id: u32) -> UserId {
    UserId::new(id).expect("valid user")
}

/// A server on its own (one cluster): every user is local and has a timeline.
fn standalone() -> ServerConfig {
    let mut config = ServerConfig::default();
    config.clusters = 1;
    config
}

async fn start() -> TestServer {
    start_with(standalone(), Arc::new(MemoryStorage::new())).await
}

async fn start_with(config: ServerConfig, storage: Arc<dyn Storage>) -> TestServer {
    TestServer::start_in_memory(config, storage)
        .await
        .expect("server starts")
}

async fn login(server: &TestServer, user: u32) -> Client {
    Client::login(&server.network, &server.addr, u(user))
        .await
        .expect("login")
}

async fn raw(server: &TestServer) -> SnsServiceClient<tonic::transport::Channel> {
    SnsServiceClient::new(server.channel().await.expect("connect"))
}

fn request(user: &str, args: &[&str]) -> Request {
    Request {
        username: user.to_string(),
        arguments: args.iter().map(|a| a.to_string()).collect(),
    }
}

#[tokio::test]
async fn login_creates_users_and_list_shows_them_in_order() {
    let server = start().await;
    let c4 = login(&server, 4).await;
    let c1 = login(&server, 1).await;
    let c12 = login(&server, 12).await;
    let listing = c1.list().await.expect("list");
    assert_eq!(listing.all_users, [u(1), u(4), u(12)]);
    assert!(listing.followers.is_empty());
    c4.follow(u(1)).await.expect("4 follows 1");
    c12.follow(u(1)).await.expect("12 follows 1");
    assert_eq!(c1.list().await.expect("list").followers, [u(4), u(12)]);
    assert_eq!(c4.list().await.expect("list").followers, []);
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn follow_and_unfollow_report_every_error_case() {
    let server = start().await;
    let c1 = login(&server, 1).await;
    let _c2 = login(&server, 2).await;

    assert!(matches!(
        c1.follow(u(99)).await,
        Err(Error::InvalidUsername(_))
    ));
    assert!(matches!(c1.follow(u(1)).await, Err(Error::SameClient)));
    c1.follow(u(2)).await.expect("follow");
    assert!(matches!(
        c1.follow(u(2)).await,
        Err(Error::AlreadyFollowing)
    ));

    assert!(matches!(
        c1.unfollow(u(99)).await,
        Err(Error::InvalidUsername(_))
    ));
    assert!(matches!(c1.unfollow(u(1)).await, Err(Error::SameClient)));
    c1.unfollow(u(2)).await.expect("unfollow");
    assert!(matches!(c1.unfollow(u(2)).await, Err(Error::NotFollowing)));
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn statuses_carry_the_course_strings_and_codes() {
    let server = start().await;
    let _c1 = login(&server, 1).await;
    let _c2 = login(&server, 2).await;
    let mut rpc = raw(&server).await;
    let cases: [(Request, bool, Code, &str); 8] = [
        (
            request("1", &["99"]),
            true,
            Code::InvalidArgument,
            "invalid username",
        ),
        (
            request("1", &["abc"]),
            true,
            Code::InvalidArgument,
            "invalid username",
        ),
        (
            request("1", &["-3"]),
            true,
            Code::InvalidArgument,
            "invalid username",
        ),
        (
            request("1", &[]),
            true,
            Code::InvalidArgument,
            "invalid username",
        ),
        (
            request("1", &["1"]),
            true,
            Code::AlreadyExists,
            "same client",
        ),
        (
            request("1", &["2"]),
            false,
            Code::FailedPrecondition,
            "not following",
        ),
        (
            request("1", &["1"]),
            false,
            Code::AlreadyExists,
            "same client",
        ),
        (
            request("1", &["7"]),
            false,
            Code::InvalidArgument,
            "invalid username",
        ),
    ];
    for (req, is_follow, code, message) in cases {
        let result = if is_follow {
            rpc.follow(req.clone()).await.map(|_| ())
        } else {
            rpc.un_follow(req.clone()).await.map(|_| ())
        };
        let status = result.expect_err("must fail");
        assert_eq!(
            (status.code(), status.message()),
            (code, message),
            "{req:?}"
        );
    }
    rpc.follow(request("1", &["2"])).await.expect("follow");
    let status = rpc
        .follow(request("1", &["2"]))
        .await
        .expect_err("second follow");
    assert_eq!(
        (status.code(), status.message()),
        (Code::AlreadyExists, "already following")
    );
    // Malformed callers are invalid usernames too.
    for bad in ["", "0", "1.5", "+1", "2147483648", " 1"] {
        let status = rpc.login(request(bad, &[])).await.expect_err("bad login");
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
    }
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn the_same_commands_work_over_loopback_tcp() {
    let server = TestServer::start(standalone(), Arc::new(MemoryStorage::new()))
        .await
        .expect("server starts");
    assert!(server.addr.starts_with("127.0.0.1:"));
    let c1 = login(&server, 1).await;
    let c2 = login(&server, 2).await;
    c2.follow(u(1)).await.expect("follow");
    assert_eq!(c1.list().await.expect("list").followers, [u(2)]);
    let (post1, _) = c1.timeline().await.expect("timeline");
    let (_p, mut feed2) = c2.timeline().await.expect("timeline");
    post1.post("over tcp").await.expect("post");
    let got = tokio::time::timeout(WAIT, feed2.next())
        .await
        .expect("in time")
        .expect("a post")
        .expect("ok");
    assert_eq!(got.text, "over tcp");
    server.stop().await.expect("stop");
}

/// A server without a listener, for calling the library directly on tokio's paused clock.
async fn open_paused(config: ServerConfig) -> Server {
    Server::open(config, Arc::new(MemoryStorage::new()))
        .await
        .expect("server opens")
}

#[tokio::test(start_paused = true)]
async fn a_second_login_is_refused_until_the_session_expires() {
    let server = open_paused(standalone()).await;
    let timeout = ServerConfig::default().session_timeout;
    server.login(u(1)).await.expect("login");
    assert!(matches!(
        server.login(u(1)).await,
        Err(Error::AlreadyLoggedIn(_))
    ));
    // A heartbeat two thirds into the timeout keeps the session alive past the original expiry...
    tokio::time::advance(timeout * 2 / 3).await;
    server.heartbeat(u(1)).expect("heartbeat");
    tokio::time::advance(timeout * 2 / 3).await;
    assert!(matches!(
        server.login(u(1)).await,
        Err(Error::AlreadyLoggedIn(_))
    ));
    // ...and once a whole timeout passes without one, the session has expired.
    tokio::time::advance(timeout / 3 + Duration::from_millis(1)).await;
    server.login(u(1)).await.expect("login after expiry");
    server.close().await;
}

#[tokio::test]
async fn terminated_unfollow_logs_out_at_once() {
    let server = start().await;
    let first = login(&server, 3).await;
    assert!(
        Client::login(&server.network, &server.addr, u(3))
            .await
            .is_err()
    );
    first.logout().await.expect("logout");
    Client::login(&server.network, &server.addr, u(3))
        .await
        .expect("login after logout");
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn nobody_can_squat_a_session_by_heartbeating_or_streaming_as_a_user_not_logged_in() {
    let server = start().await;
    // User 3 exists but is logged out.
    login(&server, 3).await.logout().await.expect("logout");
    let mut rpc = raw(&server).await;

    let beat = rpc.client_heartbeat(request("3", &[])).await;
    assert_eq!(
        beat.expect_err("a heartbeat without a session").code(),
        Code::Unauthenticated
    );
    // A course-style stream naming user 3, holding its side open.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(Message {
        username: "3".into(),
        msg: b"Set Stream".to_vec(),
        ..Message::default()
    })
    .await
    .expect("send");
    let stream = rpc
        .timeline(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let refused = match stream {
        Err(status) => status,
        Ok(response) => {
            let mut inbound = response.into_inner();
            match inbound.message().await {
                Err(status) => status,
                Ok(message) => panic!("the stream of a user not logged in was served: {message:?}"),
            }
        }
    };
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    // Both were answered, and user 3 was not locked out by them.
    let three = Client::login(&server.network, &server.addr, u(3))
        .await
        .expect("user 3 logs in");
    drop(tx);
    // A logged-in user's heartbeat is fine.
    three
        .heartbeat()
        .await
        .expect("heartbeat of a live session");

    // Logging out a user nobody ever created is an error, and creates nobody.
    let mut logout = tonic::Request::new(request("77", &[]));
    logout
        .metadata_mut()
        .insert("terminated", "true".parse().expect("metadata"));
    let status = rpc.un_follow(logout).await.expect_err("unknown user");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let listed = three.list().await.expect("list");
    assert_eq!(listed.all_users, vec![u(3)]);
    server.stop().await.expect("stop");
}

#[tokio::test(start_paused = true)]
async fn an_open_timeline_keeps_the_session_alive() {
    let server = open_paused(standalone()).await;
    let timeout = ServerConfig::default().session_timeout;
    server.login(u(1)).await.expect("login");
    let feed = server.open_timeline(u(1)).expect("timeline");
    tokio::time::advance(timeout * 10).await;
    assert!(server.is_logged_in(u(1)), "the stream holds the session");
    // Closing the stream counts as the last sign of life: the session then expires.
    drop(feed);
    tokio::time::advance(timeout - Duration::from_millis(1)).await;
    assert!(server.is_logged_in(u(1)));
    tokio::time::advance(Duration::from_millis(2)).await;
    assert!(!server.is_logged_in(u(1)));
    server.close().await;
}

/// The texts `user` is shown on opening the timeline (newest first), read from the server.
fn shown(server: &TestServer, user: u32) -> Vec<String> {
    server
        .server
        .recent_posts(u(user))
        .expect("known user")
        .iter()
        .map(|p| p.text.to_string())
        .collect()
}

/// Waits until `newest` is the newest post `user` is shown, then returns everything shown.
async fn shown_once(server: &TestServer, user: u32, newest: &str) -> Vec<String> {
    assert!(
        eventually(WAIT, || {
            let first = shown(server, user).first().cloned();
            async move { first.as_deref() == Some(newest) }
        })
        .await,
        "{newest:?} never reached user {user}'s timeline"
    );
    shown(server, user)
}

/// Reads `n` posts from a feed, failing the test if they do not arrive in time.
async fn read_texts(feed: &mut sns_core::TimelineStream, n: usize) -> Vec<String> {
    sns_core::testing::next_texts(feed, n, WAIT).await
}

#[tokio::test]
async fn timeline_shows_the_last_20_newest_first_and_only_posts_after_the_follow() {
    let server = start().await;
    let c1 = login(&server, 1).await;
    let c4 = login(&server, 4).await;
    let c9 = login(&server, 9).await;
    c9.follow(u(4)).await.expect("9 follows 4");
    let (_s9, mut watcher) = c9.timeline().await.expect("timeline of 9");
    let (post4, _) = c4.timeline().await.expect("timeline of 4");
    post4.post("before the follow").await.expect("post");
    assert_eq!(read_texts(&mut watcher, 1).await, ["before the follow"]);
    c1.follow(u(4)).await.expect("follow");
    for i in 0..3 {
        post4.post(&format!("p{i}")).await.expect("post");
    }
    // Once 9 saw them live, they are committed.
    assert_eq!(read_texts(&mut watcher, 3).await, ["p0", "p1", "p2"]);
    // Few enough posts that the cap cannot hide the one from before the follow: it is absent
    // because 1 followed later, and the stream replays exactly what is shown, then goes live.
    assert_eq!(shown(&server, 1), ["p2", "p1", "p0"]);
    let (_s, mut feed) = c1.timeline().await.expect("timeline of 1");
    post4.post("live").await.expect("post");
    assert_eq!(read_texts(&mut feed, 4).await, ["p2", "p1", "p0", "live"]);

    for i in 3..25 {
        post4.post(&format!("p{i}")).await.expect("post");
    }
    assert_eq!(read_texts(&mut watcher, 23).await.len(), 23);
    let (_s, mut reopened) = c1.timeline().await.expect("timeline of 1");
    let mut expected: Vec<String> = (5..25).rev().map(|i| format!("p{i}")).collect();
    assert_eq!(shown(&server, 1), expected);
    // The next thing on the stream after the 20 replayed posts is the next live post: the
    // 21st and older are not replayed.
    post4.post("after").await.expect("post");
    expected.push("after".to_string());
    assert_eq!(read_texts(&mut reopened, 21).await, expected);
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn live_posts_reach_followers_and_are_not_echoed() {
    let server = start().await;
    let c1 = login(&server, 1).await;
    let c4 = login(&server, 4).await;
    let c7 = login(&server, 7).await;
    let c10 = login(&server, 10).await;
    c1.follow(u(4)).await.expect("1 follows 4");
    c4.follow(u(1)).await.expect("4 follows 1");
    c1.follow(u(7)).await.expect("1 follows 7");
    c10.follow(u(4)).await.expect("10 follows 4");
    let (_s10, mut feed10) = c10.timeline().await.expect("timeline 10");
    let (post7, _) = c7.timeline().await.expect("timeline 7");
    let (post1, mut feed1) = c1.timeline().await.expect("timeline 1");
    let (post4, mut feed4) = c4.timeline().await.expect("timeline 4");
    post1.post("from one\n").await.expect("post");
    post4.post("from four").await.expect("post");
    let at1 = tokio::time::timeout(WAIT, feed1.next())
        .await
        .expect("in time");
    let got1 = at1.expect("a post").expect("ok");
    assert_eq!((got1.author, got1.text.as_str()), (u(4), "from four"));
    let got4 = tokio::time::timeout(WAIT, feed4.next())
        .await
        .expect("in time")
        .expect("a post")
        .expect("ok");
    assert_eq!((got4.author, got4.text.as_str()), (u(1), "from one"));
    assert!(got4.line().starts_with("1 ("));
    assert!(got4.line().ends_with(") >> from one"));
    assert_eq!(read_texts(&mut feed10, 1).await, ["from four"]);
    // After unfollowing, 4's posts stop reaching 1, and leave 1's timeline.
    c1.unfollow(u(4)).await.expect("unfollow");
    assert_eq!(shown(&server, 1), Vec::<String>::new());
    post4.post("unseen").await.expect("post");
    // 10 sees it, so it is committed (and was fanned out) before 7's marker is posted.
    assert_eq!(read_texts(&mut feed10, 1).await, ["unseen"]);
    post7.post("marker").await.expect("post");
    assert_eq!(read_texts(&mut feed1, 1).await, ["marker"]);
    assert_eq!(shown(&server, 1), ["marker"]);
    drop((post1, feed1));
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn a_stream_cannot_post_as_another_user() {
    let server = start().await;
    let c1 = login(&server, 1).await;
    let c4 = login(&server, 4).await;
    let c7 = login(&server, 7).await;
    c7.follow(u(4)).await.expect("follow");
    c7.follow(u(1)).await.expect("follow");
    let (post1, mut feed1) = c1.timeline().await.expect("timeline");
    post1
        .send_raw("4".to_string(), b"impersonated".to_vec())
        .await
        .expect("sent");
    let end = tokio::time::timeout(WAIT, feed1.next())
        .await
        .expect("in time");
    assert!(
        matches!(end, Some(Err(Error::PermissionDenied(_)))),
        "{end:?}"
    );
    // Nothing was stored under 4's (or 1's) name: 7's timeline holds only the marker.
    let (post4, _f) = c4.timeline().await.expect("timeline");
    post4.post("marker").await.expect("post");
    assert_eq!(shown_once(&server, 7, "marker").await, ["marker"]);
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn oversize_and_invalid_utf8_posts_are_rejected_and_not_stored() {
    let server = start().await;
    let c1 = login(&server, 1).await;
    let c2 = login(&server, 2).await;
    c2.follow(u(1)).await.expect("follow");

    // The client checks locally...
    let (post1, _) = c1.timeline().await.expect("timeline");
    let long = "x".repeat(sns_core::MAX_POST_BYTES + 1);
    assert!(matches!(
        post1.post(&long).await,
        Err(Error::InvalidInput(_))
    ));
    // ...and the server checks too, with a clear error on the stream.
    for bad in [long.into_bytes(), vec![b'o', b'k', 0xff, 0xfe]] {
        let (raw1, mut feed1) = c1.timeline().await.expect("timeline");
        raw1.send_raw("1".to_string(), bad).await.expect("sent");
        let end = tokio::time::timeout(WAIT, feed1.next())
            .await
            .expect("in time");
        match end {
            Some(Err(Error::InvalidInput(message))) => {
                assert!(
                    message.contains("4096") || message.contains("UTF-8"),
                    "{message}"
                )
            }
            other => panic!("expected a clear error, got {other:?}"),
        }
    }
    // The largest allowed post is accepted, and is the only one 2 sees.
    let (post1, _) = c1.timeline().await.expect("timeline");
    let max = "y".repeat(sns_core::MAX_POST_BYTES);
    post1.post(&max).await.expect("post");
    assert_eq!(shown_once(&server, 2, &max).await, vec![max]);
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn posts_with_terminal_control_characters_are_refused_and_not_stored() {
    let server = start().await;
    let c1 = login(&server, 1).await;
    let c2 = login(&server, 2).await;
    c2.follow(u(1)).await.expect("follow");
    // Each on a course-style stream of its own, as the course's client sends posts (with the
    // trailing newline): the stream ends with INVALID_ARGUMENT naming the character.
    for bad in [
        "\x1b[2J\x1b[Hall clear\n",
        "\x1b]0;owned\x07\n",
        "bell\x07",
        "nul\x00byte\n",
        "del\x7f\n",
        "carriage\rreturn\n",
        // C1 controls: U+009B is a CSI on many terminals.
        "\u{9b}31mred\n",
        "\u{85}next line\n",
        // Bidirectional overrides and isolates ("Trojan Source").
        "invoice\u{202e}fdp.exe\n",
        "\u{2066}isolated\u{2069}\n",
    ] {
        let (_tx, mut inbound) = course_stream(&server, "1", &[bad]).await;
        let end = tokio::time::timeout(WAIT, inbound.message())
            .await
            .expect("in time");
        match end {
            Err(status) => {
                assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}: {status:?}");
                assert!(
                    status.message().contains("control character")
                        || status.message().contains("single line"),
                    "{bad:?}: {status:?}"
                );
            }
            Ok(other) => panic!("{bad:?}: expected an error status, got {other:?}"),
        }
    }
    // Our client refuses them before sending.
    let (post1, _) = c1.timeline().await.expect("timeline");
    let refused = post1.post("\x1b[31mred").await;
    assert!(
        matches!(&refused, Err(Error::InvalidInput(m)) if m.contains("control character")),
        "{refused:?}"
    );
    // A tab is fine, and the trailing newline is stripped; it is the only post 2 ever sees.
    let (_tx, _inbound) = course_stream(&server, "1", &["col1\tcol2\n"]).await;
    assert_eq!(shown_once(&server, 2, "col1\tcol2").await, ["col1\tcol2"]);
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn course_clients_get_preformatted_posts_and_may_name_themselves_in_the_first_message() {
    let server = start().await;
    let c1 = login(&server, 1).await;
    let c4 = login(&server, 4).await;
    c1.follow(u(4)).await.expect("follow");
    let mut rpc = raw(&server).await;
    // No metadata: the first message names the user (and carries no post).
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(Message {
        username: "1".into(),
        msg: Vec::new(),
        timestamp: None,
        ..Message::default()
    })
    .await
    .expect("send");
    let mut inbound = rpc
        .timeline(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("timeline")
        .into_inner();
    let (post4, _) = c4.timeline().await.expect("timeline");
    post4.post("hello\n").await.expect("post");
    let message = tokio::time::timeout(WAIT, inbound.message())
        .await
        .expect("in time")
        .expect("ok")
        .expect("a message");
    let at = sns_core::Timestamp::from_proto(&message.timestamp.expect("timestamp"));
    assert_eq!(message.username, "4");
    assert_eq!(
        String::from_utf8(message.msg).expect("utf8"),
        format!("4 ({}) >> hello", at.ctime())
    );
    drop(tx);
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn the_service_is_also_served_as_csce662() {
    let server = start().await;
    let channel = server.channel().await.expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/csce662.SNSService/Login");
    let codec = tonic_prost::ProstCodec::<Request, sns_proto::csce438::Reply>::default();
    let reply = grpc
        .unary(tonic::Request::new(request("5", &[])), path, codec)
        .await
        .expect("login via csce662");
    assert!(!reply.get_ref().msg.is_empty());
    let listing = login(&server, 6).await.list().await.expect("list");
    assert_eq!(listing.all_users, [u(5), u(6)]);
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn everything_survives_a_restart_on_file_storage() {
    let dir = tempfile::tempdir().expect("temp dir");
    let open = || -> Arc<dyn Storage> { Arc::new(FileStorage::open(dir.path()).expect("open")) };
    let server = start_with(standalone(), open()).await;
    let c1 = login(&server, 1).await;
    let c2 = login(&server, 2).await;
    c1.follow(u(2)).await.expect("follow");
    let (_s1, mut watcher) = c1.timeline().await.expect("timeline");
    let (post2, _) = c2.timeline().await.expect("timeline");
    post2.post("durable").await.expect("post");
    assert_eq!(read_texts(&mut watcher, 1).await, ["durable"]);
    server.stop().await.expect("stop");

    let server = start_with(standalone(), open()).await;
    let c1 = login(&server, 1).await;
    let listing = c1.list().await.expect("list");
    assert_eq!(listing.all_users, [u(1), u(2)]);
    assert!(matches!(
        c1.follow(u(2)).await,
        Err(Error::AlreadyFollowing)
    ));
    assert_eq!(shown(&server, 1), ["durable"]);
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn snapshots_compact_the_log_and_restarts_still_recover_everything() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = standalone();
    config.snapshot_every = 10;
    let open = || -> Arc<dyn Storage> { Arc::new(FileStorage::open(dir.path()).expect("open")) };
    let server = start_with(config.clone(), open()).await;
    let c1 = login(&server, 1).await;
    let c2 = login(&server, 2).await;
    c1.follow(u(2)).await.expect("follow");
    let (_s1, mut watcher) = c1.timeline().await.expect("timeline");
    let (post2, _) = c2.timeline().await.expect("timeline");
    for i in 0..35 {
        post2.post(&format!("n{i}")).await.expect("post");
    }
    assert_eq!(read_texts(&mut watcher, 35).await.len(), 35);
    let snapshots = || {
        std::fs::read_dir(dir.path())
            .expect("list")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".snap"))
            })
            .count()
    };
    // Snapshots are built in the background; wait for one to land.
    assert!(eventually(WAIT, || std::future::ready(snapshots() >= 1)).await);
    server.stop().await.expect("stop");
    assert_eq!(snapshots(), 1, "one snapshot is kept");

    let server = start_with(config, open()).await;
    let c1 = login(&server, 1).await;
    let expected: Vec<String> = (15..35).rev().map(|i| format!("n{i}")).collect();
    assert_eq!(shown(&server, 1), expected);
    let (_s, mut feed) = c1.timeline().await.expect("timeline");
    assert_eq!(read_texts(&mut feed, 20).await, expected);
    server.stop().await.expect("stop");
}

/// Snapshots are taken from a copy of the committed state that follows the committed entries
/// in the background: the snapshot at an index must hold exactly the live state at that index.
#[tokio::test]
async fn a_snapshot_holds_the_committed_state_at_its_index() {
    let storage = Arc::new(MemoryStorage::new());
    let mut config = standalone();
    config.snapshot_every = 10;
    let server = Server::open(config.clone(), storage.clone())
        .await
        .expect("open");
    // Ten entries: three users join, two follows, four posts, one unfollow.
    for user in 1..=3 {
        server.login(u(user)).await.expect("login");
    }
    server.follow(u(1), "2").await.expect("follow");
    server.follow(u(3), "2").await.expect("follow");
    for i in 0..4 {
        server
            .post(u(2), format!("post {i}").as_bytes())
            .await
            .expect("post");
    }
    server.unfollow(u(3), "2").await.expect("unfollow");
    let (commit, live) = server.committed_state();
    assert_eq!(commit, sns_core::LogIndex(10));
    assert!(
        eventually(WAIT, || async {
            storage.snapshot().await.expect("read").is_some()
        })
        .await,
        "no snapshot was taken"
    );
    let snapshot = storage.snapshot().await.expect("read").expect("held");
    assert_eq!(snapshot.index, commit);
    let restored = snapshot
        .restore(&config.state_config())
        .expect("the snapshot decodes");
    assert_eq!(restored, live);
    assert_eq!(restored.recent_timeline(u(1), 20).len(), 4);
    server.close().await;
}

#[tokio::test]
async fn shutdown_ends_open_timelines_and_leaves_no_task_behind() {
    let server = start().await;
    let handle = server.server.clone();
    let c1 = login(&server, 1).await;
    let before = handle.running_tasks();
    let (_tx, mut feed) = c1.timeline().await.expect("timeline");
    assert_eq!(handle.open_timelines(), 1, "the stream holds its slot");
    assert_eq!(
        handle.running_tasks(),
        before + 1,
        "the stream's poster runs"
    );
    tokio::time::timeout(WAIT, server.stop())
        .await
        .expect("stops in time")
        .expect("stop");
    let end = tokio::time::timeout(WAIT, feed.next())
        .await
        .expect("in time");
    assert!(!matches!(end, Some(Ok(_))), "{end:?}");
    // The stream's poster was tracked and has finished; its outbound half (which holds the
    // slot) was dropped with the connection.
    assert_eq!(handle.running_tasks(), 0, "a task outlived the server");
    assert!(
        eventually(WAIT, || async { handle.open_timelines() == 0 }).await,
        "the timeline stream is still open on the stopped server: {} open",
        handle.open_timelines()
    );
}

/// A course-style timeline stream (no metadata: the first message names the user) of `user`
/// that has sent `texts`; the sender keeps the client's side open.
async fn course_stream(
    server: &TestServer,
    user: &str,
    texts: &[&str],
) -> (
    tokio::sync::mpsc::Sender<Message>,
    tonic::Streaming<Message>,
) {
    let mut rpc = raw(server).await;
    let (tx, rx) = tokio::sync::mpsc::channel(texts.len().max(1));
    // Queued first: the stream names its user in its first message, which the server reads
    // before it answers the call.
    for text in texts {
        tx.send(Message {
            username: user.into(),
            msg: text.as_bytes().to_vec(),
            ..Message::default()
        })
        .await
        .expect("send");
    }
    let inbound = rpc
        .timeline(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("timeline")
        .into_inner();
    (tx, inbound)
}

#[tokio::test]
async fn the_course_clients_set_stream_greeting_is_not_a_post() {
    let server = start().await;
    let _c2 = login(&server, 2).await;
    let c1 = login(&server, 1).await;
    c1.follow(u(2)).await.expect("follow");
    let (_s1, mut feed1) = c1.timeline().await.expect("timeline");
    let (_tx, _inbound) = course_stream(&server, "2", &["Set Stream", "a real post\n"]).await;
    assert_eq!(read_texts(&mut feed1, 1).await, ["a real post"]);
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn a_silent_timeline_stream_does_not_hold_up_shutdown() {
    let server = start().await;
    let rpc = raw(&server).await;
    let (_tx, rx) = tokio::sync::mpsc::channel::<Message>(1);
    // No metadata and no message: the server waits for the stream to name its user.
    let mut silent = rpc.clone();
    let pending = tokio::spawn(async move {
        silent
            .timeline(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    // A later call on the same connection is answered after the stream's headers were read.
    rpc.clone()
        .login(request("9", &[]))
        .await
        .expect("login on the same connection");
    // Well within the grace given to connections that never finish: the waiting handler
    // itself gives up when the server stops.
    let within = sns_core::SHUTDOWN_GRACE / 2;
    tokio::time::timeout(within, server.stop())
        .await
        .expect("stops without waiting out the grace period")
        .expect("stop");
    let answer = tokio::time::timeout(WAIT, pending).await.expect("answered");
    assert!(!matches!(answer, Ok(Ok(_))), "{answer:?}");
}

#[tokio::test]
async fn a_resume_request_needs_a_structured_stream_and_a_count() {
    let server = start().await;
    let _c1 = login(&server, 1).await;
    for (metadata, says) in [
        (&[("sns-timeline-resume", "20")][..], "structured"),
        (
            &[
                ("sns-timeline", "structured"),
                ("sns-timeline-resume", "many"),
            ][..],
            "count",
        ),
    ] {
        let mut rpc = raw(&server).await;
        let (_keep, outbound) = tokio::sync::mpsc::channel::<Message>(1);
        let mut request =
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(outbound));
        request
            .metadata_mut()
            .insert("username", "1".parse().expect("metadata"));
        for (key, value) in metadata {
            request
                .metadata_mut()
                .insert(*key, value.parse().expect("metadata"));
        }
        let status = rpc.timeline(request).await.expect_err("refused");
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{metadata:?}: {status:?}"
        );
        assert!(status.message().contains(says), "{metadata:?}: {status:?}");
    }
    // Nothing was opened: the user can still open a timeline.
    let c1 = Client::attach(&server.network, &server.addr, u(1))
        .await
        .expect("attach");
    c1.resume_timeline(5)
        .await
        .expect("a structured resume opens");
}

#[tokio::test]
async fn a_course_clients_quit_ends_its_stream_and_session_and_is_not_posted() {
    let server = start().await;
    let c1 = login(&server, 1).await;
    let c2 = login(&server, 2).await;
    c1.follow(u(2)).await.expect("follow");
    let (_s1, mut feed1) = c1.timeline().await.expect("timeline");
    // User 2 on a course-style stream (no structured mode): a post, then `quit`.
    let (tx, mut inbound) =
        course_stream(&server, "2", &["Set Stream", "before quitting\n", "quit\n"]).await;
    // The stream ends (cleanly) although the client keeps its side open...
    let end = tokio::time::timeout(WAIT, inbound.message())
        .await
        .expect("ends in time");
    assert!(matches!(end, Ok(None)), "{end:?}");
    // ...the session is over, so user 2 logs in again at once...
    assert!(!server.server.is_logged_in(u(2)));
    drop(c2);
    let again = login(&server, 2).await;
    // ...and `quit` was no post: the next post user 1 sees is the one after it.
    let (post2, _) = again.timeline().await.expect("timeline");
    post2.post("after").await.expect("post");
    assert_eq!(
        read_texts(&mut feed1, 2).await,
        ["before quitting", "after"]
    );

    // Our client (structured mode) may post the word like any other.
    post2.post("quit").await.expect("post");
    assert_eq!(read_texts(&mut feed1, 1).await, ["quit"]);
    drop(tx);
    server.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_of_600000_users_reaches_the_client_whole() {
    // Cluster 1 of 2; cluster 2 announced 600,000 users: a LIST reply of about 5.4 MB, over
    // the 4 MiB a gRPC client accepts by default.
    let mut config = ServerConfig::default();
    config.clusters = 2;
    let server = start_with(config, Arc::new(MemoryStorage::new())).await;
    let origin = sns_core::ClusterId::new(2).expect("cluster");
    let at = sns_core::Timestamp::now();
    let joined: Vec<sns_core::Event> = (1..=600_000u32)
        .map(|n| sns_core::Event {
            id: sns_core::EventId {
                origin,
                seq: u64::from(n),
            },
            at,
            kind: sns_core::EventKind::UserJoined { user: u(2 * n) },
        })
        .collect();
    for batch in joined.chunks(sns_core::server::MAX_APPLY_BATCH) {
        server
            .server
            .apply_remote(batch.to_vec())
            .await
            .expect("apply");
    }
    let one = login(&server, 1).await;
    let listing = one.list().await.expect("a large LIST arrives");
    assert_eq!(listing.all_users.len(), 600_001);
    assert_eq!(listing.all_users.last().copied(), Some(u(1_200_000)));
}
