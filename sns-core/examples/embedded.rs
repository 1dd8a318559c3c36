//! A whole deployment inside one process: a coordinator and 3 clusters of a master and a slave,
//! in memory, with the in-process synchronizers. Two users of different clusters log in; one
//! follows the other across clusters, and receives the other's post.
//!
//! Run it with `cargo run -p sns-core --example embedded`.

use std::time::Duration;

use sns_core::deployment::{Deployment, DeploymentConfig};
use sns_core::session::{Session, SessionConfig, Target};
use sns_core::{Error, Result, UserId};

#[tokio::main]
async fn main() -> Result<()> {
    let deployment = Deployment::start(DeploymentConfig::in_memory()).await?;
    deployment.wait_for_masters(Duration::from_secs(10)).await?;

    // User u lives on cluster ((u - 1) % 3) + 1: alice on cluster 1, bob on cluster 2.
    let (alice_id, bob_id) = (user(1)?, user(2)?);
    let coordinator = Target::Coordinator(deployment.coordinator_addr().to_string());
    let connect = |user| {
        Session::connect(
            deployment.network(),
            coordinator.clone(),
            user,
            SessionConfig::default(),
        )
    };
    let alice = connect(alice_id).await?;
    let bob = connect(bob_id).await?;

    // Bob's cluster tells alice's that bob exists within milliseconds; until then, bob is
    // unknown there.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match alice.follow(bob_id).await {
            Err(Error::InvalidUsername(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            followed => break followed?,
        }
    }

    let mut timeline = alice.timeline().await?;
    let bobs = bob.timeline().await?;
    bobs.post("hello from cluster 2").await?;
    let post = tokio::time::timeout(Duration::from_secs(10), timeline.next())
        .await
        .map_err(|_| Error::Unavailable("no post within 10 s".into()))?
        .ok_or_else(|| Error::ConnectionLost("the timeline ended".into()))??;
    println!(
        "user {} received from user {}: {}",
        alice_id, post.author, post.text
    );

    drop((timeline, bobs));
    alice.close().await;
    bob.close().await;
    deployment.shutdown().await;
    Ok(())
}

fn user(id: u32) -> Result<UserId> {
    UserId::new(id).ok_or_else(|| Error::invalid(format!("{id} is not a user id")))
}
