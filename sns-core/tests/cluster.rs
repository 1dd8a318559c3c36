//! Several clusters in one process (`TestCluster`, on in-memory pipes unless a test asks for
//! TCP): routing through the coordinator, roles, failure detection, partitions, restarts, the
//! cluster token, and slaves refusing clients.

use std::time::Duration;

use sns_core::client::{Client, CoordinatorClient, locate};
use sns_core::deployment::Direction;
use sns_core::testing::{TestCluster, TestClusterConfig, eventually};
use sns_core::{Error, Role, UserId};
use sns_proto::csce438::ServerInfo;
use sns_proto::csce438::coord_service_client::CoordServiceClient;
use sns_proto::sns_v1::StatusRequest;
use sns_proto::sns_v1::admin_client::AdminClient;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(10);

fn u(id: u32) -> UserId {
    UserId::new(id).expect("valid user")
}

fn master_of(cluster: &TestCluster, c: u32) -> u32 {
    (1..=2)
        .find(|s| {
            cluster
                .server(c, *s)
                .is_some_and(|server| server.role() == Role::Master)
        })
        .expect("a master")
}

/// Whether `outcome` is a server's refusal because it is not the master of its cluster, and
/// not a refusal for another reason (shutting down, a failed disk, a lost connection).
fn refused_as_not_master<T>(outcome: &Result<T, Error>) -> bool {
    matches!(outcome, Err(Error::NotMaster(_)))
}

#[tokio::test]
async fn users_are_routed_to_the_master_of_their_cluster() {
    let cluster = TestCluster::start(3).await.expect("start");
    for user in 1..=6u32 {
        let c = (user - 1) % 3 + 1;
        let master = master_of(&cluster, c);
        let addr = locate(cluster.network(), cluster.coordinator_addr(), u(user))
            .await
            .expect("routed");
        let places = cluster.deployment().servers();
        let place = places
            .iter()
            .find(|p| p.cluster.get() == c && p.server.get() == master)
            .expect("place");
        assert_eq!(addr, place.addr, "user {user}");
    }
    // Exactly one master and one slave per cluster.
    for c in 1..=3 {
        let roles: Vec<Role> = (1..=2)
            .map(|s| cluster.server(c, s).expect("running").role())
            .collect();
        assert!(roles.contains(&Role::Master) && roles.contains(&Role::Slave));
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn without_synchronizers_clients_on_one_cluster_follow_each_other_but_no_other_cluster() {
    let mut config = TestClusterConfig::default();
    config.bus = sns_core::Bus::None;
    let cluster = TestCluster::start_with(config).await.expect("start");
    let one = cluster.client(1).await.expect("client 1");
    let four = cluster.client(4).await.expect("client 4");
    let two = cluster.client(2).await.expect("client 2");
    one.follow(u(4)).await.expect("same cluster");
    assert_eq!(four.list().await.expect("list").followers, [u(1)]);
    // User 2 lives on cluster 2; without synchronizers cluster 1 has never heard of them.
    assert!(matches!(
        one.follow(u(2)).await,
        Err(Error::InvalidUsername(_))
    ));
    assert_eq!(two.list().await.expect("list").all_users, [u(2)]);
    let (post4, _) = four.timeline().await.expect("timeline");
    let (_p, mut feed1) = one.timeline().await.expect("timeline");
    post4.post("same cluster post").await.expect("post");
    let got = tokio::time::timeout(WAIT, feed1.next())
        .await
        .expect("in time")
        .expect("a post")
        .expect("ok");
    assert_eq!(got.text, "same cluster post");
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_slave_refuses_clients_as_not_the_master() {
    let cluster = TestCluster::start(1).await.expect("start");
    let master = master_of(&cluster, 1);
    let slave = 3 - master;
    let places = cluster.deployment().servers();
    let slave_addr = &places
        .iter()
        .find(|p| p.server.get() == slave)
        .expect("slave")
        .addr;
    let refused = Client::login(cluster.network(), slave_addr, u(1)).await;
    assert!(refused_as_not_master(&refused), "{refused:?}");
    cluster.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_dead_master_is_not_routed_to_and_a_restart_brings_the_cluster_back() {
    let mut config = TestClusterConfig::default();
    config.clusters = 1;
    config.servers_per_cluster = 1;
    let mut cluster = TestCluster::start_with(config).await.expect("start");
    let one = cluster.client(1).await.expect("client");
    one.logout().await.expect("logout");
    cluster.stop(1, 1).await.expect("stop");
    let coordinator =
        CoordinatorClient::new(cluster.network(), cluster.coordinator_addr()).expect("handle");
    assert!(
        eventually(WAIT, || async {
            matches!(coordinator.locate(u(1)).await, Err(Error::Unavailable(_)))
        })
        .await,
        "the coordinator stops routing to the dead server"
    );
    cluster.restart(1, 1).await.expect("restart");
    let again = cluster.client(1).await.expect("client after restart");
    assert_eq!(again.list().await.expect("list").all_users, [u(1)]);
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_crashed_server_restarts_with_every_acknowledged_and_seen_change() {
    let mut config = TestClusterConfig::default();
    config.clusters = 1;
    config.servers_per_cluster = 1;
    config.simulated_disks = true;
    let mut cluster = TestCluster::start_with(config).await.expect("start");
    let one = cluster.client(1).await.expect("client 1");
    let four = cluster.client(4).await.expect("client 4");
    four.follow(u(1)).await.expect("follow is acknowledged");
    let (_s4, mut feed4) = four.timeline().await.expect("timeline of 4");
    let (post1, _f1) = one.timeline().await.expect("timeline of 1");
    for i in 0..5 {
        post1.post(&format!("seen {i}")).await.expect("post");
    }
    for i in 0..5 {
        let got = tokio::time::timeout(WAIT, feed4.next())
            .await
            .expect("in time")
            .expect("a post")
            .expect("ok");
        assert_eq!(got.text, format!("seen {i}"));
    }
    // More posts in flight as the plug is pulled: they may or may not survive.
    for i in 0..20 {
        let _ = post1.post(&format!("in flight {i}")).await;
    }
    cluster.crash(1, 1).await.expect("crash");
    cluster.restart(1, 1).await.expect("restart");
    let server = cluster.server(1, 1).expect("running");
    assert!(eventually(WAIT, || std::future::ready(server.role() == Role::Master)).await);
    let shown: Vec<String> = server
        .recent_posts(u(4))
        .expect("4 is known")
        .iter()
        .map(|p| p.text.to_string())
        .collect();
    let survived: Vec<&String> = shown.iter().filter(|t| t.starts_with("seen")).collect();
    let in_flight = shown.iter().filter(|t| t.starts_with("in flight")).count();
    assert_eq!(survived.len() + in_flight, shown.len(), "{shown:?}");
    if in_flight <= 15 {
        // Every seen post is among the newest 20 unless many in-flight ones survived.
        assert_eq!(survived.len(), 5, "{shown:?}");
    }
    let four = cluster.client(4).await.expect("client 4 after the crash");
    assert!(matches!(
        four.follow(u(1)).await,
        Err(Error::AlreadyFollowing)
    ));
    cluster.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_partitioned_master_steps_down_and_is_no_longer_routed() {
    let mut config = TestClusterConfig::default();
    config.clusters = 1;
    config.servers_per_cluster = 1;
    let cluster = TestCluster::start_with(config).await.expect("start");
    let client = cluster.client(1).await.expect("client");
    let coordinator =
        CoordinatorClient::new(cluster.network(), cluster.coordinator_addr()).expect("handle");
    cluster.partition(1, 1, true).expect("partition");
    let server = cluster.server(1, 1).expect("running").clone();
    assert!(
        eventually(WAIT, || async { server.role() == Role::Slave }).await,
        "a master cut off from the coordinator stops accepting writes"
    );
    // The client is not cut off from the server: the refusal comes from the server itself.
    let refused = client.follow(u(4)).await;
    assert!(
        refused_as_not_master(&refused),
        "writes are refused: {refused:?}"
    );
    assert!(
        eventually(WAIT, || async {
            matches!(coordinator.locate(u(1)).await, Err(Error::Unavailable(_)))
        })
        .await,
        "the coordinator stops routing to a server it does not hear"
    );
    cluster.partition(1, 1, false).expect("heal");
    assert!(eventually(WAIT, || async { server.role() == Role::Master }).await);
    assert!(
        eventually(WAIT, || async { coordinator.locate(u(1)).await.is_ok() }).await,
        "routed again after the heal"
    );
    cluster.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_master_that_hears_no_replies_steps_down_though_the_coordinator_hears_it() {
    let mut config = TestClusterConfig::default();
    config.clusters = 1;
    config.servers_per_cluster = 1;
    let cluster = TestCluster::start_with(config).await.expect("start");
    cluster
        .partition_oneway(1, 1, Direction::FromCoordinator, true)
        .expect("cut the replies");
    let server = cluster.server(1, 1).expect("running").clone();
    assert!(
        eventually(WAIT, || async { server.role() == Role::Slave }).await,
        "no replies for a failure timeout: step down"
    );
    let alive = cluster
        .deployment()
        .coordinator()
        .table()
        .nodes(tokio::time::Instant::now())
        .iter()
        .any(|n| n.alive);
    assert!(alive, "its heartbeats still arrive: the cut is one way");
    cluster
        .partition_oneway(1, 1, Direction::FromCoordinator, false)
        .expect("heal");
    assert!(eventually(WAIT, || async { server.role() == Role::Master }).await);
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_deployment_also_runs_over_loopback_tcp() {
    let mut config = TestClusterConfig::default();
    config.clusters = 2;
    config.tcp = true;
    let cluster = TestCluster::start_with(config).await.expect("start");
    assert!(cluster.coordinator_addr().starts_with("127.0.0.1:"));
    let one = cluster.client(1).await.expect("client 1");
    let three = cluster.client(3).await.expect("client 3");
    three.follow(u(1)).await.expect("same cluster");
    assert_eq!(one.list().await.expect("list").followers, [u(3)]);
    assert!(
        cluster.partition(1, 1, true).is_err(),
        "partitions need the memory network"
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn internal_calls_need_the_cluster_token_when_one_is_set() {
    let mut config = TestClusterConfig::default();
    config.clusters = 1;
    config.servers_per_cluster = 1;
    config.cluster_token = Some("s3cret".into());
    let cluster = TestCluster::start_with(config)
        .await
        .expect("start: servers present the token");
    let channel = cluster
        .channel(cluster.coordinator_addr())
        .await
        .expect("connect");
    let mut coord = CoordServiceClient::new(channel.clone());
    let info = ServerInfo {
        server_id: 9,
        hostname: "127.0.0.1".into(),
        port: "1".into(),
        cluster_id: 1,
        ..ServerInfo::default()
    };
    let refused = coord.heartbeat(info.clone()).await.expect_err("no token");
    assert_eq!(refused.code(), Code::Unauthenticated);
    let mut admin = AdminClient::new(channel);
    let refused = admin.status(StatusRequest {}).await.expect_err("no token");
    assert_eq!(refused.code(), Code::Unauthenticated);
    let mut request = tonic::Request::new(StatusRequest {});
    request
        .metadata_mut()
        .insert("sns-cluster-token", "s3cret".parse().expect("ascii"));
    let status = admin
        .status(request)
        .await
        .expect("with token")
        .into_inner();
    assert_eq!(status.nodes.len(), 1);
    // Client routing needs no token.
    assert!(cluster.client(1).await.is_ok());
    cluster.shutdown().await;
}

#[tokio::test]
async fn bad_registrations_are_invalid_arguments_and_change_nothing() {
    let cluster = TestCluster::start(3).await.expect("start");
    let channel = cluster
        .channel(cluster.coordinator_addr())
        .await
        .expect("connect");
    let mut coord = CoordServiceClient::new(channel.clone());
    let good = ServerInfo {
        server_id: 5,
        hostname: "127.0.0.1".into(),
        port: "12345".into(),
        cluster_id: 1,
        ..ServerInfo::default()
    };
    let bad = [
        ServerInfo {
            cluster_id: 0,
            ..good.clone()
        },
        ServerInfo {
            cluster_id: 4,
            ..good.clone()
        },
        ServerInfo {
            server_id: 0,
            ..good.clone()
        },
        ServerInfo {
            server_id: -2,
            ..good.clone()
        },
        ServerInfo {
            hostname: String::new(),
            ..good.clone()
        },
        ServerInfo {
            hostname: "bad host".into(),
            ..good.clone()
        },
        ServerInfo {
            port: "0".into(),
            ..good.clone()
        },
        ServerInfo {
            port: "70000".into(),
            ..good.clone()
        },
        ServerInfo {
            port: "http".into(),
            ..good.clone()
        },
    ];
    let before = cluster
        .deployment()
        .coordinator()
        .table()
        .nodes(tokio::time::Instant::now())
        .len();
    for info in bad {
        let status = coord.heartbeat(info.clone()).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{info:?}");
        assert!(!status.message().is_empty());
    }
    for id in [0, -1] {
        let status = coord
            .get_server(sns_proto::csce438::Id { id })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument);
        let status = coord
            .register_sync_server(ServerInfo {
                server_id: id,
                ..good.clone()
            })
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    let after = cluster
        .deployment()
        .coordinator()
        .table()
        .nodes(tokio::time::Instant::now())
        .len();
    assert_eq!(before, after);
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_clustered_server_refuses_logins_of_other_clusters_users() {
    let cluster = TestCluster::start(3).await.expect("start");
    let coordinator =
        CoordinatorClient::new(cluster.network(), cluster.coordinator_addr()).expect("handle");
    let first = coordinator.locate(u(1)).await.expect("cluster 1's master");
    // User 2 is cluster 2's: cluster 1's master refuses it and creates nobody.
    match Client::login(cluster.network(), &first, u(2)).await {
        Err(Error::InvalidInput(why)) => assert!(
            why.contains("user 2 belongs to cluster 2; this server serves cluster 1"),
            "{why}"
        ),
        other => panic!("user 2 logged in on cluster 1: {other:?}"),
    }
    let one = Client::login(cluster.network(), &first, u(1))
        .await
        .expect("its own user");
    assert_eq!(one.list().await.expect("list").all_users, vec![u(1)]);
    cluster.shutdown().await;
}
