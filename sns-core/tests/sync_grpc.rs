//! The gRPC synchronizer transport (`Bus::Grpc`): synchronizers register with the coordinator
//! and drop out when they stop, serve `sns.v1.Sync.Subscribe` only for their own cluster and
//! only with the cluster token, and carry every post exactly once across a synchronizer restart
//! and across a failover of the origin cluster's master.

use std::time::Duration;

use prost::Message as _;
use sns_core::session::{SessionConfig, Target};
use sns_core::sync::SyncKey;
use sns_core::sync::seal::{open, seal};
use sns_core::sync::{ClusterLink, GrpcBus, GrpcBusOptions, SyncTransport};
use sns_core::testing::{TestCluster, TestClusterConfig, eventually};
use sns_core::{
    Bus, ClusterId, Data, Deployment, DeploymentConfig, Error, Event, EventId, EventKind,
    MemoryNetwork, Ports, PostKey, Role, Session, Timestamp, Transport, UserId,
};
use sns_proto::csce438::coord_service_client::CoordServiceClient;
use sns_proto::csce438::{Id, NodeRole, ServerInfo};
use sns_proto::sns_v1::sync_client::SyncClient;
use sns_proto::sns_v1::sync_event::Kind;
use sns_proto::sns_v1::sync_server::{Sync as SyncService, SyncServer};
use sns_proto::sns_v1::{SignedBatch, SubscribeRequest, SyncBatch};
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(20);
const TOKEN: &str = "s3cret";

fn u(id: u32) -> UserId {
    UserId::new(id).expect("valid user")
}

fn grpc() -> TestClusterConfig {
    let mut config = TestClusterConfig::default();
    config.bus = Bus::Grpc;
    config
}

/// A synchronizer as `GetSyncServers` lists it: (id, cluster, `host:port`).
type Listed = (i32, i32, String);

/// What `GetSyncServers(except)` answers (nothing if the call fails).
async fn sync_servers(cluster: &TestCluster, except: i32) -> Vec<Listed> {
    let Ok(channel) = cluster.channel(cluster.coordinator_addr()).await else {
        return Vec::new();
    };
    let mut request = tonic::Request::new(Id { id: except });
    if let Some(token) = &cluster.deployment().config().cluster_token {
        request
            .metadata_mut()
            .insert("sns-cluster-token", token.parse().expect("ascii"));
    }
    let Ok(reply) = CoordServiceClient::new(channel)
        .get_sync_servers(request)
        .await
    else {
        return Vec::new();
    };
    let list = reply.into_inner();
    (0..list.server_id.len())
        .map(|i| {
            (
                list.server_id[i],
                list.cluster_id[i],
                format!("{}:{}", list.hostname[i], list.port[i]),
            )
        })
        .collect()
}

/// Waits until `GetSyncServers(except)` lists exactly the synchronizers `ids`, and returns them.
async fn wait_listed(cluster: &TestCluster, except: i32, ids: &[i32]) -> Vec<Listed> {
    let listed = std::sync::Mutex::new(Vec::new());
    let done = eventually(WAIT, || async {
        let now = sync_servers(cluster, except).await;
        let matches = now.iter().map(|(id, _, _)| *id).collect::<Vec<_>>() == ids;
        *listed.lock().expect("lock") = now;
        matches
    })
    .await;
    let listed = listed.into_inner().expect("lock");
    assert!(
        done,
        "GetSyncServers({except}) should list {ids:?}, lists {listed:?}"
    );
    listed
}

/// The server acting as master of cluster `c`.
fn master_of(cluster: &TestCluster, c: u32) -> u32 {
    (1..=2)
        .find(|s| {
            cluster
                .server(c, *s)
                .is_some_and(|server| server.role() == Role::Master)
        })
        .expect("a master")
}

/// A session of `user` that fails over through the coordinator.
async fn session(cluster: &TestCluster, user: u32) -> Session {
    let mut config = SessionConfig::default();
    config.patience = WAIT;
    config.first_retry = Duration::from_millis(20);
    config.max_retry = Duration::from_millis(200);
    Session::connect(
        cluster.network(),
        Target::Coordinator(cluster.coordinator_addr().to_string()),
        u(user),
        config,
    )
    .await
    .expect("session")
}

/// Users 1..=6 on three clusters; 1, 3, 4 and 6 (clusters 1 and 3) follow 2 (cluster 2).
async fn follow_user_two(cluster: &TestCluster) {
    let two = cluster.client(2).await.expect("user 2 joins");
    two.logout().await.expect("logout");
    for follower in [1, 3, 4, 6] {
        let client = cluster.client(follower).await.expect("client");
        let known = eventually(WAIT, || async {
            client
                .list()
                .await
                .is_ok_and(|l| l.all_users.contains(&u(2)))
        })
        .await;
        assert!(known, "user {follower} learns of user 2");
        client.follow(u(2)).await.expect("follow across clusters");
        client.logout().await.expect("logout");
    }
}

/// Waits until every follower of user 2 on clusters 1 and 3 has exactly `posts` in its
/// timeline, oldest first, and their clusters have applied every event cluster 2 committed
/// (so nothing else is on its way to them); then checks the timelines again.
async fn every_follower_has_exactly(cluster: &TestCluster, posts: &[String]) {
    let timeline = |c: u32, user: u32| {
        let server = cluster.server(c, master_of(cluster, c)).expect("master");
        let (_, state) = server.committed_state();
        let mut texts: Vec<String> = state
            .recent_timeline(u(user), state.timeline_cap())
            .iter()
            .map(|p| p.text.to_string())
            .collect();
        texts.reverse();
        texts
    };
    let origin = ClusterId::new(2).expect("cluster 2");
    let caught_up = || {
        let committed = cluster
            .server(2, master_of(cluster, 2))
            .expect("master of 2")
            .high_water()
            .expect("marks")[&origin];
        [1, 3].iter().all(|c| {
            let applied = cluster
                .server(*c, master_of(cluster, *c))
                .and_then(|s| s.high_water().ok())
                .and_then(|marks| marks.get(&origin).copied());
            applied == Some(committed)
        })
    };
    for (c, user) in [(1, 1), (1, 4), (3, 3), (3, 6)] {
        let mut got = Vec::new();
        let done = eventually(WAIT, || {
            got = timeline(c, user);
            std::future::ready(got == posts)
        })
        .await;
        assert!(
            done,
            "user {user} on cluster {c} should have {} posts once each, in order; has {} ({:?}..)",
            posts.len(),
            got.len(),
            got.iter().take(5).collect::<Vec<_>>()
        );
    }
    assert!(
        eventually(WAIT, || std::future::ready(caught_up())).await,
        "clusters 1 and 3 apply every event of cluster 2"
    );
    for (c, user) in [(1, 1), (1, 4), (3, 3), (3, 6)] {
        assert_eq!(timeline(c, user), posts, "user {user} on cluster {c}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_coordinator_lists_live_synchronizers_and_drops_a_stopped_one_after_the_failure_timeout()
 {
    let mut cluster = TestCluster::start_with(grpc()).await.expect("start");
    let listed = wait_listed(&cluster, 1, &[2, 3]).await;
    assert_eq!(listed[0].1, 2, "synchronizer 2 serves cluster 2");
    assert_eq!(listed[1].1, 3, "synchronizer 3 serves cluster 3");
    assert!(listed[0].0 == 2 && listed[0].2.starts_with("cluster2-sync:"));
    assert!(listed[1].2.starts_with("cluster3-sync:"));
    wait_listed(&cluster, 3, &[1, 2]).await;
    // The deployment says where each synchronizer serves, as the coordinator lists it.
    let places = cluster.deployment().synchronizers();
    assert_eq!(places.len(), 3);
    for (id, _, addr) in &listed {
        let place = &places[*id as usize - 1];
        assert_eq!(place.cluster.get(), *id as u32);
        assert_eq!(place.addr.as_ref(), Some(addr));
        assert!(place.running);
    }

    let interval = cluster.deployment().config().heartbeat_interval;
    let failure_timeout = interval * cluster.deployment().config().missed_heartbeats;
    cluster.stop_synchronizer(2).await.expect("stop");
    let stopped = tokio::time::Instant::now();
    assert!(!cluster.deployment().synchronizers()[1].running);
    let since_beat = cluster
        .deployment()
        .coordinator()
        .table()
        .nodes(stopped)
        .into_iter()
        .find(|n| n.role.is_none() && n.id == 2)
        .expect("synchronizer 2 is registered")
        .since_heartbeat;
    assert!(since_beat <= interval, "it heartbeat every interval");
    let still = sync_servers(&cluster, 1).await;
    assert!(
        still.iter().any(|(id, _, _)| *id == 2),
        "listed until the failure timeout passes: {still:?}"
    );

    wait_listed(&cluster, 1, &[3]).await;
    let gone_after = stopped.elapsed();
    assert!(
        gone_after >= failure_timeout.saturating_sub(since_beat),
        "dropped {gone_after:?} after the stop, {since_beat:?} after its last beat"
    );
    assert!(
        gone_after <= failure_timeout + interval,
        "dropped only {gone_after:?} after the stop"
    );

    cluster.restart_synchronizer(2).await.expect("restart");
    let back = wait_listed(&cluster, 1, &[2, 3]).await;
    assert_eq!(back[0], listed[0], "back at the same address");
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_subscription_for_another_cluster_or_without_the_token_is_refused() {
    let mut config = grpc();
    config.cluster_token = Some(TOKEN.into());
    let cluster = TestCluster::start_with(config).await.expect("start");
    cluster.client(2).await.expect("user 2 joins cluster 2");
    let listed = wait_listed(&cluster, 1, &[2, 3]).await;
    let channel = cluster.channel(&listed[0].2).await.expect("connect");
    let mut sync = SyncClient::new(channel);
    let ask = |origin: u32, token: Option<&str>| {
        let mut request = tonic::Request::new(SubscribeRequest {
            origin,
            after: 0,
            subscriber_cluster: 1,
        });
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("sns-cluster-token", token.parse().expect("ascii"));
        }
        request
    };

    let refused = sync.subscribe(ask(2, None)).await.expect_err("no token");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let refused = sync
        .subscribe(ask(2, Some("guess")))
        .await
        .expect_err("wrong token");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    let refused = sync
        .subscribe(ask(3, Some(TOKEN)))
        .await
        .expect_err("another cluster's events");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("cluster 2") && refused.message().contains("cluster 3"),
        "says whose events it serves and where to ask: {}",
        refused.message()
    );
    for origin in [0, 4] {
        let refused = sync
            .subscribe(ask(origin, Some(TOKEN)))
            .await
            .expect_err("no such cluster");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains("does not exist"), "{refused:?}");
    }

    let mut stream = sync
        .subscribe(ask(2, Some(TOKEN)))
        .await
        .expect("own cluster, with the token")
        .into_inner();
    let signed = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("in time")
        .expect("a batch")
        .expect("not the end");
    assert_eq!((signed.origin, signed.first), (2, 1));
    assert_eq!(signed.mac.len(), 32, "signed with the deployment's key");
    let batch = SyncBatch::decode(signed.batch.as_slice()).expect("a sync batch");
    assert_eq!(batch.origin, 2);
    let first = batch.events.first().expect("an event");
    assert_eq!((first.origin, first.seq), (2, 1));
    assert_eq!(first.kind, Some(Kind::UserJoined(2)));
    let (_, events) = open(Some(&SyncKey::from_token(TOKEN)), signed.clone()).expect("opens");
    assert_eq!(events.len() as u64, signed.last - signed.first + 1);
    assert!(
        open(Some(&SyncKey::from_token("guess")), signed).is_err(),
        "another deployment's key does not open it"
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn synchronizer_restarts_while_posts_flow_lose_and_duplicate_nothing() {
    let mut cluster = TestCluster::start_with(grpc()).await.expect("start");
    follow_user_two(&cluster).await;
    let two = session(&cluster, 2).await;
    let mut timeline = two.timeline().await.expect("timeline of 2");
    let poster = timeline.poster();
    let posts: Vec<String> = (0..300).map(|i| format!("post {i}")).collect();
    let (restart_tx, mut restart_rx) = tokio::sync::mpsc::unbounded_channel();
    let posting = tokio::spawn({
        let posts = posts.clone();
        async move {
            for (i, text) in posts.iter().enumerate() {
                poster.post(text).await.expect("post");
                // Ask for a restart and carry on posting while it happens.
                if i % 75 == 74 {
                    let _ = restart_tx.send(());
                }
            }
            poster.close();
        }
    });
    // The origin's synchronizer (which serves both subscriptions), then each subscriber's.
    for c in [2, 1, 3, 2] {
        restart_rx.recv().await.expect("a restart is due");
        cluster.restart_synchronizer(c).await.expect("restart");
    }
    posting.await.expect("poster");
    let ended = tokio::time::timeout(WAIT, timeline.next())
        .await
        .expect("every post acknowledged in time");
    assert!(ended.is_none(), "every post stored: {ended:?}");
    every_follower_has_exactly(&cluster, &posts).await;
    two.close().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_of_the_origin_master_while_its_posts_stream_loses_nothing() {
    let mut config = grpc();
    config.simulated_disks = true;
    let mut cluster = TestCluster::start_with(config).await.expect("start");
    let old = master_of(&cluster, 2);
    let slave = 3 - old;
    let in_sync = eventually(WAIT, || {
        let now = tokio::time::Instant::now();
        let nodes = cluster.deployment().coordinator().table().nodes(now);
        let ok = nodes
            .iter()
            .any(|n| n.cluster.get() == 2 && n.id == slave && n.role.is_some() && n.in_sync);
        std::future::ready(ok)
    })
    .await;
    assert!(in_sync, "the slave of cluster 2 is in sync");
    follow_user_two(&cluster).await;
    let two = session(&cluster, 2).await;
    let mut timeline = two.timeline().await.expect("timeline of 2");
    let poster = timeline.poster();
    let posts: Vec<String> = (0..200).map(|i| format!("post {i}")).collect();
    let (crash_tx, crash_rx) = tokio::sync::oneshot::channel();
    let posting = tokio::spawn({
        let posts = posts.clone();
        async move {
            let mut crash_tx = Some(crash_tx);
            for (i, text) in posts.iter().enumerate() {
                poster.post(text).await.expect("post");
                if i == 80
                    && let Some(tx) = crash_tx.take()
                {
                    let _ = tx.send(());
                }
            }
            poster.close();
        }
    });
    crash_rx.await.expect("the crash is due");
    // Some posts have crossed already: the streams to clusters 1 and 3 are live.
    let origin = ClusterId::new(2).expect("cluster 2");
    let flowing = eventually(WAIT, || {
        let applied = cluster
            .server(1, master_of(&cluster, 1))
            .and_then(|s| s.high_water().ok())
            .and_then(|marks| marks.get(&origin).copied())
            .unwrap_or(0);
        // 6 joins and 4 follows come before the posts.
        std::future::ready(applied > 10)
    })
    .await;
    assert!(flowing, "posts reach cluster 1 before the crash");
    cluster.crash(2, old).await.expect("crash the master of 2");
    let promoted = eventually(WAIT, || {
        std::future::ready(cluster.server(2, slave).map(|s| s.role()) == Some(Role::Master))
    })
    .await;
    assert!(promoted, "the slave of cluster 2 is promoted");
    posting.await.expect("poster");
    let ended = tokio::time::timeout(WAIT, timeline.next())
        .await
        .expect("every post acknowledged in time");
    assert!(ended.is_none(), "every post stored: {ended:?}");
    every_follower_has_exactly(&cluster, &posts).await;
    two.close().await;
    cluster.shutdown().await;
}

#[tokio::test]
async fn grpc_synchronizers_also_run_over_loopback_tcp() {
    let mut config = grpc();
    config.clusters = 2;
    config.tcp = true;
    let cluster = TestCluster::start_with(config).await.expect("start");
    let listed = wait_listed(&cluster, 1, &[2]).await;
    assert!(listed[0].2.starts_with("127.0.0.1:"), "{listed:?}");
    let one = cluster.client(1).await.expect("client 1");
    let two = cluster.client(2).await.expect("client 2");
    assert!(
        eventually(WAIT, || async {
            one.list().await.is_ok_and(|l| l.all_users == [u(1), u(2)])
        })
        .await,
        "cluster 1 learns of user 2"
    );
    one.follow(u(2)).await.expect("follow");
    let (_p1, mut feed1) = one.timeline().await.expect("timeline 1");
    let (post2, _f2) = two.timeline().await.expect("timeline 2");
    post2.post("over tcp").await.expect("post");
    let got = tokio::time::timeout(WAIT, feed1.next())
        .await
        .expect("in time")
        .expect("a post")
        .expect("ok");
    assert_eq!(got.text, "over tcp");
    cluster.shutdown().await;
}

#[tokio::test]
async fn course_ports_refuse_a_coordinator_on_a_synchronizer_port() {
    let mut config = DeploymentConfig::default();
    config.transport = Transport::Memory(MemoryNetwork::new());
    config.ports = Ports::Course { coordinator: 9002 };
    config.data = Data::Memory;
    config.bus = Bus::Grpc;
    let refused = Deployment::start(config)
        .await
        .expect_err("port 9002 is cluster 2's synchronizer");
    assert!(
        matches!(&refused, Error::InvalidInput(m) if m.contains("9002")),
        "{refused}"
    );
}

#[tokio::test]
async fn a_grpc_bus_runs_once_and_only_for_its_own_cluster() {
    let network = MemoryNetwork::new();
    let link = |cluster: u32| {
        ClusterLink::new(
            ClusterId::new(cluster).expect("cluster"),
            3,
            &network.node("sync"),
            "coordinator:1",
            None,
            CancellationToken::new(),
        )
        .expect("link")
    };
    let bus = || {
        GrpcBus::new(
            network.bind("sync:0").expect("bind"),
            GrpcBusOptions::new(2, "sync"),
        )
    };

    let wrong = bus();
    let refused = wrong
        .run(link(1))
        .await
        .expect_err("synchronizer 2 is cluster 2's");
    assert!(
        matches!(&refused, Error::InvalidInput(m) if m.contains("serves cluster 2")),
        "{refused}"
    );

    let once = bus();
    let stopped = link(2);
    stopped.shutdown().cancel();
    once.run(stopped).await.expect("runs until stopped");
    let again = link(2);
    again.shutdown().cancel();
    let refused = once.run(again).await.expect_err("a second run");
    assert!(
        matches!(&refused, Error::InvalidInput(m) if m.contains("already ran")),
        "{refused}"
    );
}

/// A synchronizer that serves `Sync.Subscribe` with the same forged batches to every
/// subscriber, then holds the stream open.
struct ForgingSynchronizer {
    batches: Vec<SignedBatch>,
}

#[tonic::async_trait]
impl SyncService for ForgingSynchronizer {
    type SubscribeStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<SignedBatch, tonic::Status>> + Send>,
    >;

    async fn subscribe(
        &self,
        _request: tonic::Request<SubscribeRequest>,
    ) -> Result<tonic::Response<Self::SubscribeStream>, tonic::Status> {
        let forged = tokio_stream::iter(self.batches.clone().into_iter().map(Ok));
        let open = tokio_stream::pending();
        Ok(tonic::Response::new(Box::pin(forged.chain(open))))
    }
}

/// The texts on `user`'s timeline on the master of `c`, oldest first.
fn timeline_of(cluster: &TestCluster, c: u32, user: u32) -> Vec<String> {
    let Some(server) = (1..=2)
        .filter_map(|s| cluster.server(c, s))
        .find(|server| server.role() == Role::Master)
    else {
        return Vec::new();
    };
    let (_, state) = server.committed_state();
    let mut texts: Vec<String> = state
        .recent_timeline(u(user), usize::MAX)
        .iter()
        .map(|p| p.text.to_string())
        .collect();
    texts.reverse();
    texts
}

#[tokio::test]
async fn a_batch_with_a_bad_mac_from_a_synchronizer_is_refused_and_counted() {
    let mut config = grpc();
    config.cluster_token = Some(TOKEN.into());
    let mut cluster = TestCluster::start_with(config).await.expect("start");
    follow_user_two(&cluster).await;
    let two = cluster
        .server(2, master_of(&cluster, 2))
        .expect("master of 2")
        .clone();
    let next = two.high_water().expect("marks")[&ClusterId::new(2).expect("cluster 2")] + 1;
    let forged_post = Event {
        id: EventId {
            origin: ClusterId::new(2).expect("cluster 2"),
            seq: next,
        },
        // A plausible time: only the MAC tells it from a real post.
        at: Timestamp::now(),
        kind: EventKind::Posted {
            author: u(2),
            text: "forged".into(),
            key: None,
        },
    };
    let two_id = ClusterId::new(2).expect("cluster 2");
    let unsigned = seal(None, two_id, std::slice::from_ref(&forged_post)).expect("seal");
    let other_key = SyncKey::from_token("guess");
    let wrong_key =
        seal(Some(&other_key), two_id, std::slice::from_ref(&forged_post)).expect("seal");

    // Cluster 2's only live synchronizer serves forged batches: one with a MAC of another
    // key, and an unsigned one.
    cluster.stop_synchronizer(2).await.expect("stop");
    let network = cluster
        .deployment()
        .memory_network()
        .expect("memory transport")
        .clone();
    let listener = network.bind("forger:0").expect("bind");
    let port = listener.port().expect("a port");
    let stop = CancellationToken::new();
    let serving = tokio::spawn(
        sns_core::transport::server_builder()
            .add_service(SyncServer::new(ForgingSynchronizer {
                batches: vec![wrong_key, unsigned],
            }))
            .serve_with_incoming_shutdown(listener, stop.clone().cancelled_owned()),
    );
    let coordinator = CoordServiceClient::new(
        cluster
            .channel(cluster.coordinator_addr())
            .await
            .expect("coordinator"),
    );
    let info = ServerInfo {
        server_id: 5, // serves cluster ((5 - 1) % 3) + 1 = 2
        hostname: "forger".to_string(),
        port: port.to_string(),
        r#type: "synchronizer".to_string(),
        cluster_id: 2,
        node_role: NodeRole::Synchronizer.into(),
        ..ServerInfo::default()
    };
    let with_token = |info: ServerInfo| {
        let mut request = tonic::Request::new(info);
        request
            .metadata_mut()
            .insert("sns-cluster-token", TOKEN.parse().expect("ascii"));
        request
    };
    coordinator
        .clone()
        .register_sync_server(with_token(info.clone()))
        .await
        .expect("the forger registers");
    let beating = tokio::spawn({
        let (stop, mut coordinator) = (stop.clone(), coordinator.clone());
        async move {
            let mut beats = tokio::time::interval(Duration::from_millis(100));
            while !stop.is_cancelled() {
                beats.tick().await;
                let _ = coordinator.heartbeat(with_token(info.clone())).await;
            }
        }
    });

    let refused = |c: u32| cluster.refusals(c).map_or(0, |r| r.bad_mac);
    assert!(
        eventually(WAIT, || std::future::ready(
            refused(1) >= 2 && refused(3) >= 2
        ))
        .await,
        "clusters 1 and 3 refuse the forged batches: {:?}, {:?}",
        cluster.refusals(1),
        cluster.refusals(3)
    );
    stop.cancel();
    let _ = serving.await;
    let _ = beating.await;

    // The real synchronizer is back; the post with that sequence number is the real one.
    cluster.restart_synchronizer(2).await.expect("restart");
    let master = cluster
        .server(2, master_of(&cluster, 2))
        .expect("master of 2")
        .clone();
    master
        .post_keyed(u(2), b"real", PostKey::new(1))
        .await
        .expect("post");
    for (c, user) in [(1, 1), (1, 4), (3, 3), (3, 6)] {
        assert!(
            eventually(WAIT, || std::future::ready(
                timeline_of(&cluster, c, user) == ["real"]
            ))
            .await,
            "user {user} on cluster {c} sees the real post only: {:?}",
            timeline_of(&cluster, c, user)
        );
    }
    cluster.shutdown().await;
}
