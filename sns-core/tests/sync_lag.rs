//! How far behind its origins a cluster is, in events, as a synchronizer's link measures it
//! (`ClusterLink::probe_origins`): the origin's master's committed mark minus this cluster's
//! master's mark. A cluster whose synchronizer is stopped falls behind by exactly the events
//! its origin committed meanwhile, and catches up to zero once the synchronizer runs again.

use std::time::Duration;

use sns_core::sync::{ClusterLink, OriginStats};
use sns_core::testing::{TestCluster, TestClusterConfig, eventually};
use sns_core::{ClusterId, UserId};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);
const PATIENCE: Duration = Duration::from_secs(2);
const TOKEN: &str = "lag-token";

fn c(id: u32) -> ClusterId {
    ClusterId::new(id).expect("cluster")
}

/// What `link` knows of `origin` after probing (again, if the last probe is too recent).
async fn probed(link: &ClusterLink, origin: ClusterId) -> OriginStats {
    link.probe_origins(PATIENCE).await;
    link.stats().get(&origin).copied().unwrap_or_default()
}

#[tokio::test]
async fn a_cluster_without_its_synchronizer_falls_behind_by_the_events_its_origin_committed() {
    let mut config = TestClusterConfig::default();
    config.clusters = 2;
    config.cluster_token = Some(TOKEN.to_string());
    let mut cluster = TestCluster::start_with(config).await.expect("start");
    cluster.stop_synchronizer(2).await.expect("stop");
    // An observer of cluster 2's progress: a link that applies nothing itself.
    let link = ClusterLink::new(
        c(2),
        2,
        cluster.network(),
        cluster.coordinator_addr(),
        Some(TOKEN),
        CancellationToken::new(),
    )
    .expect("link");

    // Users 1 and 3 join on cluster 1: two events cluster 2 does not get.
    for user in [1, 3] {
        cluster.client(user).await.expect("login");
    }
    let behind = eventually(WAIT, || async {
        let one = probed(&link, c(1)).await;
        one.origin_head == Some(2) && one.behind() == Some(2)
    })
    .await;
    assert!(
        behind,
        "cluster 2 is two events behind cluster 1: {:?}",
        link.stats()
    );
    assert_eq!(link.stats()[&c(1)].high_water, 0);
    assert!(
        !link.stats().contains_key(&c(2)),
        "a cluster is no origin of its own"
    );

    cluster.restart_synchronizer(2).await.expect("restart");
    let caught_up = eventually(WAIT, || async {
        let one = probed(&link, c(1)).await;
        one.high_water == 2 && one.behind() == Some(0)
    })
    .await;
    assert!(caught_up, "cluster 2 catches up: {:?}", link.stats());
    let known = cluster
        .client(2)
        .await
        .expect("login on cluster 2")
        .list()
        .await
        .expect("list")
        .all_users;
    assert!(known.contains(&UserId::new(3).expect("user")), "{known:?}");
    cluster.shutdown().await;
}
