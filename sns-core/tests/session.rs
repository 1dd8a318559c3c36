//! Client failover with [`Session`] on a whole deployment in memory (`TestCluster`): a master
//! killed and restarted on the same storage, a master partitioned from the coordinator and
//! healed, an answer lost on the way back, timelines reopened without repeating a post, posts
//! that are stored exactly once whatever happens between sending and acknowledgement, the
//! heartbeat's lifetime, and direct sessions that report failures instead of failing over.

use std::time::Duration;

use sns_core::deployment::CLIENT_NODE;
use sns_core::session::{Session, SessionConfig, SessionEvent, SessionTimeline, Target};
use sns_core::testing::{TestCluster, TestClusterConfig, eventually};
use sns_core::{
    CoordinatorClient, Error, EventKind, LogIndex, ReceivedPost, Role, Server, TimelinePoster,
    UserId,
};
use tokio::sync::broadcast;

const WAIT: Duration = Duration::from_secs(10);

fn u(id: u32) -> UserId {
    UserId::new(id).expect("valid user")
}

/// One cluster of one server: killing it leaves the cluster without a master until it is
/// restarted on its storage.
async fn one_server() -> TestCluster {
    let mut config = TestClusterConfig::default();
    config.clusters = 1;
    config.servers_per_cluster = 1;
    TestCluster::start_with(config).await.expect("start")
}

fn server_addr(cluster: &TestCluster) -> String {
    cluster.deployment().servers()[0].addr.clone()
}

async fn routed(cluster: &TestCluster, user: u32) -> Session {
    Session::connect(
        cluster.network(),
        Target::Coordinator(cluster.coordinator_addr().to_string()),
        u(user),
        SessionConfig::default(),
    )
    .await
    .expect("session")
}

async fn next_event(events: &mut broadcast::Receiver<SessionEvent>) -> SessionEvent {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("an event in time")
        .expect("the session is alive")
}

/// Waits for one failover's two events; returns the new address.
async fn failover_seen(events: &mut broadcast::Receiver<SessionEvent>) -> String {
    let first = next_event(events).await;
    assert!(
        matches!(first, SessionEvent::Reconnecting { .. }),
        "{first:?}"
    );
    match next_event(events).await {
        SessionEvent::Reconnected { addr } => addr,
        other => panic!("expected Reconnected, got {other:?}"),
    }
}

async fn next_post(timeline: &mut SessionTimeline) -> ReceivedPost {
    tokio::time::timeout(WAIT, timeline.next())
        .await
        .expect("a post in time")
        .expect("the timeline is open")
        .expect("a post")
}

#[tokio::test]
async fn a_follow_issued_while_the_master_is_down_succeeds_once_it_is_back() {
    let mut cluster = one_server().await;
    let _two = cluster.client(2).await.expect("user 2 exists");
    let session = routed(&cluster, 1).await;
    let mut events = session.subscribe();
    cluster.stop(1, 1).await.expect("stop");

    let recover = async {
        // The user is told at once that a retry started...
        let first = next_event(&mut events).await;
        assert!(
            matches!(first, SessionEvent::Reconnecting { .. }),
            "{first:?}"
        );
        cluster.restart(1, 1).await.expect("restart");
        // ...and where the session landed.
        next_event(&mut events).await
    };
    let (followed, landed) = tokio::join!(session.follow(u(2)), recover);
    followed.expect("the follow succeeds once the master is back");
    assert_eq!(
        landed,
        SessionEvent::Reconnected {
            addr: server_addr(&cluster)
        }
    );
    assert_eq!(session.addr(), server_addr(&cluster));

    let listing = session.list().await.expect("list");
    assert_eq!(listing.all_users, [u(1), u(2)]);
    let server = cluster.server(1, 1).expect("running").clone();
    assert_eq!(server.list(u(2)).expect("list").followers, [u(1)]);
    // Made exactly once: a new FOLLOW (not a retry) is refused as usual.
    assert!(matches!(
        session.follow(u(2)).await,
        Err(Error::AlreadyFollowing)
    ));
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_follow_during_a_partition_of_the_master_lands_once_after_the_heal() {
    let cluster = one_server().await;
    let _two = cluster.client(2).await.expect("user 2 exists");
    let session = routed(&cluster, 1).await;
    let mut events = session.subscribe();
    let server = cluster.server(1, 1).expect("running").clone();
    cluster.partition(1, 1, true).expect("partition");
    assert!(
        eventually(WAIT, || async { server.role() == Role::Slave }).await,
        "the cut-off master steps down"
    );

    let heal = async {
        let first = next_event(&mut events).await;
        assert!(
            matches!(first, SessionEvent::Reconnecting { .. }),
            "{first:?}"
        );
        cluster.partition(1, 1, false).expect("heal");
        next_event(&mut events).await
    };
    let (followed, landed) = tokio::join!(session.follow(u(2)), heal);
    followed.expect("the follow succeeds after the heal");
    assert_eq!(
        landed,
        SessionEvent::Reconnected {
            addr: server_addr(&cluster)
        }
    );
    assert_eq!(server.list(u(2)).expect("list").followers, [u(1)]);
    assert_eq!(session.list().await.expect("list").all_users, [u(1), u(2)]);
    cluster.shutdown().await;
}

/// The server applies the follow but its answer never reaches the client (the server's
/// direction to the client is cut): the client's keepalive gives up on the connection, the
/// session reconnects after the heal, and its retry finds the follow made. That counts as
/// success, not as "already following".
#[tokio::test(start_paused = true)]
async fn a_follow_whose_answer_was_lost_is_not_reported_as_a_failure() {
    let cluster = one_server().await;
    let _two = cluster.client(2).await.expect("user 2 exists");
    let session = routed(&cluster, 1).await;
    let mut events = session.subscribe();
    let server = cluster.server(1, 1).expect("running").clone();
    let memory = cluster
        .deployment()
        .memory_network()
        .expect("memory network")
        .clone();
    let server_node = sns_core::deployment::server_node(
        sns_core::ClusterId::new(1).expect("cluster"),
        sns_core::ServerId::new(1).expect("server"),
    );
    memory.cut(&server_node, CLIENT_NODE);

    let lose_the_answer = async {
        assert!(
            eventually(WAIT, || async {
                server
                    .list(u(2))
                    .is_ok_and(|listing| listing.followers == [u(1)])
            })
            .await,
            "the follow is applied on the server"
        );
        let first = tokio::time::timeout(Duration::from_secs(60), events.recv())
            .await
            .expect("the lost connection is noticed")
            .expect("alive");
        assert!(
            matches!(first, SessionEvent::Reconnecting { .. }),
            "{first:?}"
        );
        memory.heal(&server_node, CLIENT_NODE);
        next_event(&mut events).await
    };
    let (followed, landed) = tokio::join!(session.follow(u(2)), lose_the_answer);
    followed.expect("applied before the answer was lost: success");
    assert!(
        matches!(landed, SessionEvent::Reconnected { .. }),
        "{landed:?}"
    );
    assert_eq!(server.list(u(2)).expect("list").followers, [u(1)]);
    cluster.shutdown().await;
}

#[tokio::test]
async fn an_open_timeline_keeps_delivering_after_a_restart_without_repeating_a_post() {
    let mut cluster = one_server().await;
    let one = routed(&cluster, 1).await;
    let two = routed(&cluster, 2).await;
    one.follow(u(2)).await.expect("1 follows 2");
    two.follow(u(1)).await.expect("2 follows 1");
    let mut events1 = one.subscribe();
    let mut events2 = two.subscribe();
    let mut feed1 = one.timeline().await.expect("timeline 1");
    let mut feed2 = two.timeline().await.expect("timeline 2");

    for text in ["before 1", "before 2"] {
        feed2.post(text).await.expect("post");
    }
    let first = next_post(&mut feed1).await;
    let second = next_post(&mut feed1).await;
    assert_eq!(
        (first.text.as_str(), second.text.as_str()),
        ("before 1", "before 2")
    );
    assert!(
        first.id.is_some() && first.id != second.id,
        "posts carry ids"
    );

    cluster.stop(1, 1).await.expect("stop");
    cluster.restart(1, 1).await.expect("restart");
    assert_eq!(failover_seen(&mut events1).await, server_addr(&cluster));
    assert_eq!(failover_seen(&mut events2).await, server_addr(&cluster));

    // The reopened timeline replays "before 1" and "before 2": suppressed. What comes next is
    // the first post made after the restart, whether the replay or the live feed carries it.
    feed2.post("after the restart").await.expect("post");
    assert_eq!(next_post(&mut feed1).await.text, "after the restart");
    // Posting works on the reopened stream in the other direction too.
    feed1.post("one after the restart").await.expect("post");
    assert_eq!(next_post(&mut feed2).await.text, "one after the restart");
    // Nothing else was pending: the next post is the next one made.
    feed2.post("last").await.expect("post");
    assert_eq!(next_post(&mut feed1).await.text, "last");

    // Closing the sending side ends the stream cleanly.
    feed1.close_sending();
    let end = tokio::time::timeout(WAIT, feed1.next())
        .await
        .expect("ends in time");
    assert!(end.is_none(), "{end:?}");
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_direct_session_reports_a_lost_server_instead_of_failing_over() {
    let mut cluster = one_server().await;
    let _two = cluster.client(2).await.expect("user 2 exists");
    let session = Session::connect(
        cluster.network(),
        Target::Direct(server_addr(&cluster)),
        u(1),
        SessionConfig::default(),
    )
    .await
    .expect("session");
    let mut events = session.subscribe();
    let mut feed = session.timeline().await.expect("timeline");
    cluster.stop(1, 1).await.expect("stop");

    let failed = session.follow(u(2)).await;
    assert!(
        matches!(&failed, Err(e) if e.calls_for_reconnect()),
        "{failed:?}"
    );
    let broken = tokio::time::timeout(WAIT, feed.next())
        .await
        .expect("the timeline reports in time");
    assert!(
        matches!(
            broken,
            Some(Err(ref e)) if e.calls_for_reconnect()
        ),
        "{broken:?}"
    );
    // Both failures are known: had either tried a failover, its event would be here.
    assert!(matches!(
        events.try_recv(),
        Err(broadcast::error::TryRecvError::Empty)
    ));
    cluster.shutdown().await;
}

#[tokio::test]
async fn first_login_errors_are_returned_as_they_are() {
    let mut cluster = one_server().await;
    let _one = cluster.client(1).await.expect("user 1 logged in");
    let twice = Session::connect(
        cluster.network(),
        Target::Direct(server_addr(&cluster)),
        u(1),
        SessionConfig::default(),
    )
    .await;
    assert!(
        matches!(twice, Err(Error::AlreadyLoggedIn(user)) if user == u(1)),
        "{twice:?}"
    );

    cluster.stop(1, 1).await.expect("stop");
    let coordinator =
        CoordinatorClient::new(cluster.network(), cluster.coordinator_addr()).expect("handle");
    assert!(
        eventually(WAIT, || async {
            matches!(coordinator.locate(u(2)).await, Err(Error::Unavailable(_)))
        })
        .await
    );
    let started = tokio::time::Instant::now();
    let no_master = Session::connect(
        cluster.network(),
        Target::Coordinator(cluster.coordinator_addr().to_string()),
        u(2),
        SessionConfig::default(),
    )
    .await;
    assert!(
        matches!(no_master, Err(Error::Unavailable(_))),
        "{no_master:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no failover wait"
    );
    cluster.shutdown().await;
}

/// Server sessions expire after 6 s without a heartbeat; on the paused clock, 30 s pass in an
/// instant.
#[tokio::test(start_paused = true)]
async fn the_heartbeat_keeps_an_idle_session_alive_until_logout_or_close() {
    let cluster = one_server().await;
    let server = cluster.server(1, 1).expect("running").clone();
    let one = routed(&cluster, 1).await;
    let two = routed(&cluster, 2).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(server.is_logged_in(u(1)) && server.is_logged_in(u(2)));

    one.logout().await.expect("logout");
    one.logout().await.expect("a second logout does nothing");
    assert!(!server.is_logged_in(u(1)), "logged out at once");
    two.close().await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    // A heartbeat still running would have revived user 1's session and kept user 2's.
    assert!(!server.is_logged_in(u(1)), "no heartbeat after logout");
    assert!(!server.is_logged_in(u(2)), "no heartbeat after close");
    assert!(matches!(
        one.follow(u(2)).await,
        Err(Error::NotLoggedIn(user)) if user == u(1)
    ));
    // Both may log in again right away.
    let _again = routed(&cluster, 1).await;
    let _again = routed(&cluster, 2).await;
    cluster.shutdown().await;
}

#[tokio::test]
async fn course_mode_timeline_messages_carry_the_post_id_too() {
    use sns_proto::csce438::Message;
    use sns_proto::csce438::sns_service_client::SnsServiceClient;

    let cluster = one_server().await;
    let one = routed(&cluster, 1).await;
    let two = routed(&cluster, 2).await;
    one.follow(u(2)).await.expect("follow");
    let feed2 = two.timeline().await.expect("timeline");
    feed2.post("hello").await.expect("post");
    one.logout().await.expect("logout");

    let channel = cluster
        .channel(&server_addr(&cluster))
        .await
        .expect("connect");
    let mut rpc = SnsServiceClient::new(channel);
    // The course client logs in, then opens its timeline.
    rpc.login(sns_proto::csce438::Request {
        username: "1".into(),
        arguments: Vec::new(),
    })
    .await
    .expect("login");
    let (tx, rx) = tokio::sync::mpsc::channel::<Message>(1);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("username", "1".parse().expect("ascii"));
    let mut inbound = rpc.timeline(request).await.expect("timeline").into_inner();
    let message = tokio::time::timeout(WAIT, inbound.message())
        .await
        .expect("in time")
        .expect("ok")
        .expect("the replayed post");
    assert!(message.msg.ends_with(b") >> hello"), "pre-formatted");
    assert_eq!(message.post_origin, 1);
    assert!(message.post_seq > 0);
    drop(tx);
    cluster.shutdown().await;
}

/// The master is killed for good: the session tries for its patience (10 s by default, an
/// instant on the paused clock), says so, and returns the last error.
#[tokio::test(start_paused = true)]
async fn a_session_gives_up_after_its_patience_with_the_last_error() {
    let mut cluster = one_server().await;
    let _two = cluster.client(2).await.expect("user 2 exists");
    let session = routed(&cluster, 1).await;
    let mut events = session.subscribe();
    let mut feed = session.timeline().await.expect("timeline");
    cluster.stop(1, 1).await.expect("stop");

    let started = tokio::time::Instant::now();
    let failed = session.follow(u(2)).await;
    let waited = started.elapsed();
    assert!(
        matches!(&failed, Err(e) if e.calls_for_reconnect()),
        "{failed:?}"
    );
    let patience = SessionConfig::default().patience;
    assert!(
        waited >= patience && waited < patience + Duration::from_secs(5),
        "gave up after {waited:?}"
    );
    // The command and the timeline's reader shared one failover, or tried one each: every
    // attempt is announced and ends in giving up, never in a reconnect.
    let mut gave_up = 0;
    while let Ok(event) = events.try_recv() {
        match event {
            SessionEvent::Reconnecting { .. } => {}
            SessionEvent::GaveUp { .. } => gave_up += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(gave_up >= 1);
    // The timeline ends with the error once its own failover gives up.
    let ended = tokio::time::timeout(Duration::from_secs(30), feed.next())
        .await
        .expect("the timeline reports in time");
    assert!(
        matches!(
            ended,
            Some(Err(ref e)) if e.calls_for_reconnect()
        ),
        "{ended:?}"
    );
    cluster.shutdown().await;
}

/// The texts `author` has posted, as the server's committed log holds them, in log order.
async fn committed_posts(server: &Server, author: UserId) -> Vec<String> {
    let commit = server.positions().commit;
    let mut entries = server.committed_after(LogIndex(0));
    let mut texts = Vec::new();
    while entries.position() <= commit {
        let batch = entries
            .next_batch(1024)
            .await
            .expect("read")
            .expect("running");
        for entry in batch {
            if let EventKind::Posted {
                author: by, text, ..
            } = &entry.event.kind
                && *by == author
            {
                texts.push(text.to_string());
            }
        }
    }
    texts
}

/// Waits until the server has acknowledged every post made on `poster`.
async fn all_acknowledged(poster: &TimelinePoster) {
    assert!(
        eventually(WAIT, || async { poster.unacknowledged() == 0 }).await,
        "{} posts still unacknowledged",
        poster.unacknowledged()
    );
}

fn texts(prefix: &str, count: usize) -> Vec<String> {
    (1..=count).map(|i| format!("{prefix} {i}")).collect()
}

#[tokio::test]
async fn posts_typed_while_the_master_is_down_are_stored_once_in_order_when_it_is_back() {
    let mut cluster = one_server().await;
    let one = routed(&cluster, 1).await;
    let two = routed(&cluster, 2).await;
    two.follow(u(1)).await.expect("2 follows 1");
    let mut events = one.subscribe();
    let feed1 = one.timeline().await.expect("timeline 1");
    let mut feed2 = two.timeline().await.expect("timeline 2");
    let poster = feed1.poster();
    let before = texts("before", 2);
    for text in &before {
        poster.post(text).await.expect("post");
    }
    all_acknowledged(&poster).await;

    cluster.stop(1, 1).await.expect("stop");
    // Typed while no master is up: each post returns at once, kept until acknowledged.
    let during = texts("while down", 3);
    for text in &during {
        poster.post(text).await.expect("queued");
    }
    assert_eq!(poster.unacknowledged(), during.len());
    cluster.restart(1, 1).await.expect("restart");
    failover_seen(&mut events).await;
    all_acknowledged(&poster).await;
    let after = texts("after", 2);
    for text in &after {
        poster.post(text).await.expect("post");
    }
    all_acknowledged(&poster).await;

    let expected: Vec<String> = [before, during, after].concat();
    let server = cluster.server(1, 1).expect("running").clone();
    assert_eq!(committed_posts(&server, u(1)).await, expected);
    // The follower sees each once, in order.
    for text in &expected {
        assert_eq!(&next_post(&mut feed2).await.text, text);
    }
    cluster.shutdown().await;
}

/// The server stores the posts but their acknowledgements never reach the client (the
/// server's direction to the client is cut): after the heal the session re-sends them with
/// their keys, and the server answers with the stored posts instead of storing them again.
#[tokio::test(start_paused = true)]
async fn posts_whose_acknowledgements_were_lost_are_not_stored_twice() {
    let cluster = one_server().await;
    let one = routed(&cluster, 1).await;
    let mut events = one.subscribe();
    let feed = one.timeline().await.expect("timeline");
    let poster = feed.poster();
    poster.post("acknowledged").await.expect("post");
    all_acknowledged(&poster).await;
    let server = cluster.server(1, 1).expect("running").clone();
    let memory = cluster
        .deployment()
        .memory_network()
        .expect("memory network")
        .clone();
    let server_node = sns_core::deployment::server_node(
        sns_core::ClusterId::new(1).expect("cluster"),
        sns_core::ServerId::new(1).expect("server"),
    );
    memory.cut(&server_node, CLIENT_NODE);

    let unanswered = texts("unanswered", 3);
    for text in &unanswered {
        poster.post(text).await.expect("sent");
    }
    let expected: Vec<String> = [vec!["acknowledged".to_string()], unanswered].concat();
    assert!(
        eventually(WAIT, || async {
            committed_posts(&server, u(1)).await == expected
        })
        .await,
        "the server stores the posts"
    );
    assert_eq!(poster.unacknowledged(), 3, "no acknowledgement arrived");
    let first = tokio::time::timeout(Duration::from_secs(60), events.recv())
        .await
        .expect("the lost connection is noticed")
        .expect("alive");
    assert!(
        matches!(first, SessionEvent::Reconnecting { .. }),
        "{first:?}"
    );
    memory.heal(&server_node, CLIENT_NODE);
    assert!(matches!(
        next_event(&mut events).await,
        SessionEvent::Reconnected { .. }
    ));
    all_acknowledged(&poster).await;
    assert_eq!(committed_posts(&server, u(1)).await, expected);
    cluster.shutdown().await;
}

/// The master stores posts whose acknowledgements are lost (its direction to the client is
/// cut, until the client gives the connection up), then takes a burst of posts and the plug is
/// pulled on its simulated disk: of the burst some may be durable, the rest is lost with the
/// disk's cache. After the restart and the heal, the session re-sends everything
/// unacknowledged: the posts the recovered log holds are recognised by their keys, the lost ones
/// are stored, and every post is there exactly once, in the order typed.
#[tokio::test(start_paused = true)]
async fn a_master_crash_between_sending_and_acknowledging_loses_and_repeats_nothing() {
    let mut config = TestClusterConfig::default();
    config.clusters = 1;
    config.servers_per_cluster = 1;
    config.simulated_disks = true;
    let mut cluster = TestCluster::start_with(config).await.expect("start");
    let one = routed(&cluster, 1).await;
    let mut events = one.subscribe();
    let feed = one.timeline().await.expect("timeline");
    let poster = feed.poster();
    let memory = cluster
        .deployment()
        .memory_network()
        .expect("memory network")
        .clone();
    let server_node = sns_core::deployment::server_node(
        sns_core::ClusterId::new(1).expect("cluster"),
        sns_core::ServerId::new(1).expect("server"),
    );
    memory.cut(&server_node, CLIENT_NODE);
    let unanswered = texts("unanswered", 3);
    for text in &unanswered {
        poster.post(text).await.expect("sent");
    }
    let server = cluster.server(1, 1).expect("running").clone();
    assert!(
        eventually(WAIT, || async {
            committed_posts(&server, u(1)).await == unanswered
        })
        .await,
        "committed, so durable"
    );
    assert_eq!(poster.unacknowledged(), unanswered.len(), "no ack arrived");
    let burst = texts("burst", 20);
    for text in &burst {
        poster.post(text).await.expect("sent");
    }
    cluster.crash(1, 1).await.expect("crash");
    let typed_while_down = texts("while down", 2);
    for text in &typed_while_down {
        poster.post(text).await.expect("queued");
    }
    // The client gives the silent connection up (keepalive), so the acknowledgements held
    // back by the cut are gone with it.
    let first = tokio::time::timeout(Duration::from_secs(60), events.recv())
        .await
        .expect("the lost connection is noticed")
        .expect("alive");
    assert!(
        matches!(first, SessionEvent::Reconnecting { .. }),
        "{first:?}"
    );
    cluster.restart(1, 1).await.expect("restart");
    memory.heal(&server_node, CLIENT_NODE);
    assert!(matches!(
        next_event(&mut events).await,
        SessionEvent::Reconnected { .. }
    ));
    all_acknowledged(&poster).await;

    let server = cluster.server(1, 1).expect("running").clone();
    assert_eq!(
        committed_posts(&server, u(1)).await,
        [unanswered, burst, typed_while_down].concat()
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_direct_session_timeline_refuses_posts_once_it_has_ended() {
    let mut cluster = one_server().await;
    let session = Session::connect(
        cluster.network(),
        Target::Direct(server_addr(&cluster)),
        u(1),
        SessionConfig::default(),
    )
    .await
    .expect("session");
    let mut feed = session.timeline().await.expect("timeline");
    let poster = feed.poster();
    poster.post("stored").await.expect("post");
    all_acknowledged(&poster).await;
    cluster.stop(1, 1).await.expect("stop");
    let broken = tokio::time::timeout(WAIT, feed.next())
        .await
        .expect("the timeline reports in time");
    assert!(matches!(broken, Some(Err(_))), "{broken:?}");
    // The timeline has ended: posting fails instead of waiting for a stream that never comes.
    assert!(matches!(
        poster.post("too late").await,
        Err(Error::ConnectionLost(_))
    ));
    assert_eq!(poster.unacknowledged(), 0);
    cluster.shutdown().await;
}

/// The texts of the next `count` posts on `stream`.
async fn next_texts(stream: &mut sns_core::TimelineStream, count: usize) -> Vec<String> {
    sns_core::testing::next_texts(stream, count, WAIT).await
}

#[tokio::test]
async fn a_resumed_timeline_replays_every_recent_post_oldest_first_then_goes_live() {
    let cluster = one_server().await;
    let addr = server_addr(&cluster);
    let reader = sns_core::Client::login(cluster.network(), &addr, u(1))
        .await
        .expect("login 1");
    let author = sns_core::Client::login(cluster.network(), &addr, u(2))
        .await
        .expect("login 2");
    reader.follow(u(2)).await.expect("1 follows 2");
    let (poster, _own) = author.timeline().await.expect("author's timeline");
    let posted = texts("missed", 50);
    for text in &posted {
        poster.post(text).await.expect("post");
    }
    let server = cluster.deployment().server(
        sns_core::ClusterId::new(1).expect("cluster"),
        sns_core::ServerId::new(1).expect("server"),
    );
    let server = server.expect("the server").clone();
    let last = posted.last().expect("posts").clone();
    assert!(
        eventually(WAIT, || {
            let server = server.clone();
            let last = last.clone();
            async move { committed_posts(&server, u(2)).await.last() == Some(&last) }
        })
        .await,
        "every post committed"
    );

    // A plain open shows the newest 20, newest first (the course's behaviour)...
    let (_keep, mut plain) = reader.timeline().await.expect("timeline");
    let mut newest: Vec<String> = posted[30..].to_vec();
    newest.reverse();
    assert_eq!(next_texts(&mut plain, 20).await, newest);

    // ...a resumed one as many as asked for (here all 50), oldest first, then live posts.
    let (_keep, mut resumed) = reader.resume_timeline(100).await.expect("resume");
    assert_eq!(next_texts(&mut resumed, 50).await, posted);
    poster.post("live").await.expect("post");
    assert_eq!(next_texts(&mut resumed, 1).await, ["live"]);
    // A shorter replay takes the newest ones, still oldest first.
    let (_keep, mut short) = reader.resume_timeline(5).await.expect("resume");
    let mut expected = posted[46..].to_vec();
    expected.push("live".to_string());
    assert_eq!(next_texts(&mut short, 5).await, expected);
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_user_over_the_stream_limit_is_told_the_limit_and_no_failover_starts() {
    let cluster = one_server().await;
    let session = routed(&cluster, 1).await;
    let mut events = session.subscribe();
    // The default limit: 4 timeline streams per user.
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(session.timeline().await.expect("a stream within the limit"));
    }
    let refused = tokio::time::timeout(WAIT, session.timeline())
        .await
        .expect("answered at once");
    match refused {
        Err(Error::OverLimit(limit)) => {
            assert!(limit.contains("at most 4"), "{limit}");
        }
        Err(other) => panic!("expected the limit, got {other:?}"),
        Ok(_) => panic!("a fifth stream was opened"),
    }
    // The refusal came back as the call's answer: had the session taken it for a lost
    // server, it would have announced a failover before that answer.
    assert!(
        matches!(
            events.try_recv(),
            Err(broadcast::error::TryRecvError::Empty)
        ),
        "no failover for a limit"
    );
    // The session goes on: commands work, and a stream closed frees a slot.
    session.list().await.expect("list");
    drop(open.pop());
    assert!(
        eventually(WAIT, || async { session.timeline().await.is_ok() }).await,
        "a slot freed by a closed stream is usable"
    );
}
