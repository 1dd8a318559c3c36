//! Synchronizers: users, follow relations and posts cross clusters, over every transport.

use std::time::Duration;

use sns_core::testing::{TestCluster, TestClusterConfig, amqp_broker, eventually};
use sns_core::{Bus, QueueType, UserId};

const WAIT: Duration = Duration::from_secs(10);

fn u(id: u32) -> UserId {
    UserId::new(id).expect("valid user")
}

async fn start(bus: Bus) -> TestCluster {
    TestCluster::start_with(TestClusterConfig {
        bus,
        // The clients of these cases stay with the server they logged in to: heartbeats slower
        // than the default keep a loaded machine (a broker starting queues on the same two
        // cores) from promoting slaves under them.
        heartbeat_interval: Duration::from_millis(500),
        ..TestClusterConfig::default()
    })
    .await
    .expect("start")
}

/// The suite every transport runs: one `#[tokio::test]` per (case, transport) below calls it.
#[tokio::test]
async fn local_users_follows_and_posts_cross_clusters() {
    users_follows_and_posts_cross_clusters(Bus::Local).await;
}

#[tokio::test]
async fn amqp_users_follows_and_posts_cross_clusters() {
    let Some(broker) = amqp_broker("amqp_users_follows_and_posts_cross_clusters").await else {
        return;
    };
    users_follows_and_posts_cross_clusters(broker.bus(QueueType::Quorum)).await;
}

#[tokio::test]
async fn amqp_classic_users_follows_and_posts_cross_clusters() {
    let Some(broker) = amqp_broker("amqp_classic_users_follows_and_posts_cross_clusters").await
    else {
        return;
    };
    users_follows_and_posts_cross_clusters(broker.bus(QueueType::Classic)).await;
}

async fn users_follows_and_posts_cross_clusters(bus: Bus) {
    let cluster = start(bus).await;
    let one = cluster.client(1).await.expect("client 1");
    let two = cluster.client(2).await.expect("client 2");
    let three = cluster.client(3).await.expect("client 3");
    for (cluster, client) in [(1, &one), (2, &two), (3, &three)] {
        assert!(
            eventually(WAIT, || async {
                client
                    .list()
                    .await
                    .is_ok_and(|l| l.all_users == [u(1), u(2), u(3)])
            })
            .await,
            "cluster {cluster} learns every user"
        );
    }
    one.follow(u(2)).await.expect("cross-cluster follow");
    three.follow(u(2)).await.expect("cross-cluster follow");
    assert!(
        eventually(WAIT, || async {
            two.list().await.is_ok_and(|l| l.followers == [u(1), u(3)])
        })
        .await,
        "cluster 2 learns its user's followers"
    );
    let (_p1, mut feed1) = one.timeline().await.expect("timeline 1");
    let (_p3, mut feed3) = three.timeline().await.expect("timeline 3");
    let (post2, _f2) = two.timeline().await.expect("timeline 2");
    post2.post("hello from cluster 2").await.expect("post");
    for feed in [&mut feed1, &mut feed3] {
        let got = tokio::time::timeout(WAIT, feed.next())
            .await
            .expect("in time")
            .expect("a post")
            .expect("ok");
        assert_eq!(got.text, "hello from cluster 2");
        assert_eq!(got.author, u(2));
    }
    cluster.shutdown().await;
}
