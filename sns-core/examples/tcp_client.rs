//! Driving a deployment over TCP with the typed clients: [`CoordinatorClient`] finds each
//! user's server, [`Client`] talks to it. Two users log in, one follows the other, lists the
//! users, and receives the other's post on its timeline.
//!
//! `cargo run -p sns-core --example tcp_client -- --coordinator 127.0.0.1:9000 --clusters 3`
//! talks to a running deployment (e.g. `sns up`); `--clusters` (default 3) says how many
//! clusters it has, only to report where each user lives. With no `--coordinator` the example
//! starts its own deployment of that many clusters over loopback TCP, on ports chosen by the
//! OS, with storage in memory, so it runs anywhere. It exits non-zero if a step fails.

use std::process::ExitCode;
use std::time::Duration;

use sns_core::{
    Client, ClusterId, CoordinatorClient, Data, Deployment, DeploymentConfig, Error, Network,
    Ports, Result, Transport, UserId,
};

/// How long to wait for the deployment to converge (masters, users known across clusters, a
/// post delivered) before giving up.
const PATIENCE: Duration = Duration::from_secs(10);

/// What the command line asks for.
struct Args {
    /// A running deployment's coordinator, or `None` to start one.
    coordinator: Option<String>,
    clusters: u32,
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut args = Args {
        coordinator: None,
        clusters: 3,
    };
    let mut words = std::env::args().skip(1);
    while let Some(word) = words.next() {
        let mut value = |flag: &str| words.next().ok_or(format!("{flag} needs a value"));
        match word.as_str() {
            "--coordinator" => args.coordinator = Some(value("--coordinator")?),
            "--clusters" => {
                args.clusters = value("--clusters")?
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or("--clusters takes a positive number")?;
            }
            other => {
                return Err(format!(
                    "unknown argument {other:?}; usage: tcp_client [--coordinator HOST:PORT] \
                     [--clusters N]"
                ));
            }
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(usage) => {
            eprintln!("{usage}");
            return ExitCode::from(2);
        }
    };
    // Our own deployment, if we start one: kept until the end, then shut down.
    let mut own = None;
    let coordinator = match args.coordinator {
        Some(addr) => addr,
        None => match start_deployment(args.clusters).await {
            Ok(deployment) => own.insert(deployment).coordinator_addr().to_string(),
            Err(e) => {
                eprintln!("could not start a deployment: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let outcome = drive(&coordinator, args.clusters).await;
    if let Some(deployment) = own {
        deployment.shutdown().await;
    }
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A deployment of `clusters` clusters of a master and a slave on 127.0.0.1, ports chosen by
/// the OS, storage in memory; returns once every cluster has a master.
async fn start_deployment(clusters: u32) -> Result<Deployment> {
    let mut config = DeploymentConfig::default();
    config.clusters = clusters;
    config.transport = Transport::Tcp;
    config.ports = Ports::Auto;
    config.data = Data::Memory;
    let deployment = Deployment::start(config).await?;
    deployment.wait_for_masters(PATIENCE).await?;
    println!(
        "started a deployment of {clusters} clusters; coordinator at {}",
        deployment.coordinator_addr()
    );
    Ok(deployment)
}

/// Logs in users 1 and 2 through the coordinator at `coordinator`, and exercises follow, list
/// and the timeline between them.
async fn drive(coordinator: &str, clusters: u32) -> Result<()> {
    let network = Network::tcp();
    let coordinator = CoordinatorClient::connect(&network, coordinator).await?;
    let (alice_id, bob_id) = (user(1)?, user(2)?);
    let alice = login(&coordinator, alice_id, clusters).await?;
    let bob = login(&coordinator, bob_id, clusters).await?;

    // A user of another cluster becomes known here within milliseconds; until then a follow is
    // refused as naming an unknown user.
    retry_while_unknown(|| alice.follow(bob_id)).await?;
    println!("user {alice_id} follows user {bob_id}");
    let listing = alice.list().await?;
    println!(
        "user {alice_id} lists: all users {}; followers {}",
        names(&listing.all_users),
        names(&listing.followers)
    );

    let (_alice_posts, mut alice_timeline) = alice.timeline().await?;
    let (bob_posts, _bob_timeline) = bob.timeline().await?;
    // A unique text, so that posts left by an earlier run on the same deployment (the
    // timeline opens with the latest ones) are told apart.
    let text = format!("hello over TCP from user {bob_id} ({})", std::process::id());
    bob_posts.post(&text).await?;
    println!("user {bob_id} posted: {text}");
    let received = tokio::time::timeout(PATIENCE, async {
        while let Some(post) = alice_timeline.next().await {
            let post = post?;
            if post.author == bob_id && post.text == text {
                return Ok(post);
            }
        }
        Err(Error::ConnectionLost("the timeline ended".into()))
    })
    .await
    .map_err(|_| Error::Unavailable(format!("the post did not arrive within {PATIENCE:?}")))??;
    println!(
        "user {alice_id} received on the timeline: {}",
        received.line()
    );

    // Leave the deployment as found, so the example can run against it again.
    alice.unfollow(bob_id).await?;
    alice.logout().await?;
    bob.logout().await?;
    println!("both users logged out");
    Ok(())
}

/// Logs `user` in through the coordinator, retrying while its cluster has no master yet.
async fn login(coordinator: &CoordinatorClient, user: UserId, clusters: u32) -> Result<Client> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let client = loop {
        match coordinator.login(user).await {
            Err(e) if e.calls_for_reconnect() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            done => break done?,
        }
    };
    let cluster = ClusterId::of_user(user, clusters);
    println!(
        "user {user} (cluster {cluster}) logged in at {}",
        client.addr()
    );
    Ok(client)
}

/// Runs `command` until it stops failing with [`Error::InvalidUsername`], for at most
/// [`PATIENCE`].
async fn retry_while_unknown<F, Fut>(mut command: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match command().await {
            Err(Error::InvalidUsername(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            done => return done,
        }
    }
}

fn names(users: &[UserId]) -> String {
    let names: Vec<String> = users.iter().map(UserId::to_string).collect();
    format!("[{}]", names.join(", "))
}

fn user(id: u32) -> Result<UserId> {
    UserId::new(id).ok_or_else(|| Error::invalid(format!("{id} is not a user id")))
}
