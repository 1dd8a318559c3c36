//! How a downstream crate tests its use of Tiny SNS: an in-process cluster (`TestCluster`, from
//! the `test-util` feature) on tokio's paused clock, so heartbeats and failure detection take no
//! wall-clock time. A follower reads its timeline while the author posts; the cluster's master
//! is crashed (every write not yet synced is lost, as pulling the plug would) in the middle; the
//! slave is promoted; both sessions fail over by themselves; and the follower still gets every
//! post, once and in order.
//!
//! As a test in your crate this is a `#[tokio::test(start_paused = true)]`; here it is a
//! program (`cargo run -p sns-core --example failover_test`) that exits non-zero if a post is
//! missing or repeated.

use std::time::Duration;

use sns_core::session::{Session, SessionConfig, Target};
use sns_core::testing::{TestCluster, TestClusterConfig, eventually};
use sns_core::{Error, Result, Role, UserId};

const POSTS: u32 = 20;

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() -> Result<()> {
    let mut config = TestClusterConfig::default();
    config.clusters = 1;
    config.servers_per_cluster = 2;
    config.simulated_disks = true;
    let mut cluster = TestCluster::start_with(config).await?;
    let coordinator = Target::Coordinator(cluster.coordinator_addr().to_string());
    let connect = |user| {
        let network = cluster.network().clone();
        let coordinator = coordinator.clone();
        async move { Session::connect(&network, coordinator, user, SessionConfig::default()).await }
    };
    let (author_id, reader_id) = (user(1)?, user(2)?);
    let author = connect(author_id).await?;
    let reader = connect(reader_id).await?;
    reader.follow(author_id).await?;
    let mut timeline = reader.timeline().await?;
    let posting = author.timeline().await?;

    // A slave is promoted only if the coordinator knows it is in sync (otherwise the cluster
    // waits for its master rather than lose what it committed): wait until it does.
    let master = master_of(&cluster)?;
    let slave = 3 - master;
    let in_sync = eventually(Duration::from_secs(30), || async {
        let now = tokio::time::Instant::now();
        let nodes = cluster.deployment().coordinator().table().nodes(now);
        nodes.iter().any(|n| n.id == slave && n.in_sync && n.alive)
    })
    .await;
    if !in_sync {
        return Err(Error::Unavailable("the slave never came in sync".into()));
    }
    for n in 1..=POSTS {
        if n == POSTS / 2 {
            println!("crashing server {master}, the master");
            cluster.crash(1, master).await?;
        }
        // Returns once the post is sent; the session keeps it until the server acknowledges
        // it, and re-sends it on the new master after a failover.
        posting.post(&format!("post {n}")).await?;
    }

    for n in 1..=POSTS {
        let post = tokio::time::timeout(Duration::from_secs(60), timeline.next())
            .await
            .map_err(|_| Error::Unavailable(format!("post {n} never arrived")))?
            .ok_or_else(|| Error::ConnectionLost("the timeline ended".into()))??;
        if post.text != format!("post {n}") {
            return Err(Error::Corrupt(format!(
                "expected post {n}, got {:?}",
                post.text
            )));
        }
    }
    println!(
        "all {POSTS} posts arrived once and in order; the master is now server {}",
        master_of(&cluster)?
    );
    drop((timeline, posting));
    cluster.shutdown().await;
    Ok(())
}

/// The server that is master of cluster 1 now.
fn master_of(cluster: &TestCluster) -> Result<u32> {
    (1..=2)
        .find(|&s| {
            cluster
                .server(1, s)
                .is_some_and(|s| s.role() == Role::Master)
        })
        .ok_or_else(|| Error::Unavailable("cluster 1 has no master".into()))
}

fn user(id: u32) -> Result<UserId> {
    UserId::new(id).ok_or_else(|| Error::invalid(format!("{id} is not a user id")))
}
