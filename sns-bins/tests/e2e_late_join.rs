//! A cluster that joins late, with real processes over loopback TCP: cluster 1 (a master and a
//! slave `tsd` with data directories, and its gRPC synchronizer) takes 100,000 posts of about
//! 700 bytes and snapshots, dropping the start of its log; then cluster 2 starts, receives
//! cluster 1's state as a state transfer (about 28 MB, carried and stored in pieces), and both of
//! its servers are killed and started again: they come back with the same state, and the
//! clusters go on talking to each other.

mod support;

use std::path::Path;
use std::time::Instant;

use sns_core::{Client, Network, PostKey, TimelineMessage, UserId};
use sns_proto::csce438::NodeRole;
use support::{
    Coordinator, Expect, Heartbeat, Synchronizer, Tsc, Tsd, WAIT, eventually, free_port,
};

/// Cluster 1's posting users (ids 1, 4, 7, ...: cluster 1 of 3) and the posts each makes.
const AUTHORS: u32 = 100;
const POSTS_EACH: u64 = 1_000;

fn u(id: u32) -> UserId {
    UserId::new(id).expect("user")
}

/// Every author of cluster 1 posts [`POSTS_EACH`] posts of about 700 bytes through the client
/// library (through the coordinator, as `tsc` does), and waits for every acknowledgement: each
/// post is committed on cluster 1's master and slave.
async fn post_everything(coordinator: String) {
    let network = Network::tcp();
    let mut clients = Vec::new();
    for n in 0..AUTHORS {
        let client = Client::login_via(&network, &coordinator, u(3 * n + 1))
            .await
            .expect("login");
        clients.push(client);
    }
    for pair in clients.windows(2) {
        pair[1].follow(pair[0].user()).await.expect("follow");
    }
    let mut tasks = tokio::task::JoinSet::new();
    for client in clients {
        tasks.spawn(async move {
            let author = client.user();
            let (sender, mut stream) = client.timeline().await.expect("timeline");
            let filler = "x".repeat(680);
            for seq in 1..=POSTS_EACH {
                let key = PostKey::new(seq).expect("key");
                sender
                    .post_keyed(&format!("{author}/{seq} {filler}"), key)
                    .await
                    .expect("post");
            }
            let mut acks = 0;
            while acks < POSTS_EACH {
                match stream.next_message().await {
                    Some(Ok(TimelineMessage::Ack(_))) => acks += 1,
                    Some(Ok(TimelineMessage::Post(_))) => {}
                    Some(Err(e)) => panic!("author {author}: {e}"),
                    None => panic!("author {author}: the stream ended"),
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("an author");
    }
}

/// Whether `dir` holds a snapshot and its log no longer starts at entry 1.
fn compacted(dir: &Path) -> bool {
    let names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.iter().any(|n| n.starts_with("snapshot-"))
        && !names.iter().any(|n| n == "log-00000000000000000001.seg")
}

/// The commit indexes of `cluster`'s master and slave, as the coordinator last heard them.
fn commit_indexes(coordinator: &Coordinator, cluster: u32) -> Vec<(i32, u64)> {
    let mut nodes: Vec<(i32, u64)> = coordinator
        .status()
        .nodes
        .into_iter()
        .filter(|n| n.cluster == cluster && n.role != "synchronizer")
        .map(|n| (n.node_role, n.commit_index))
        .collect();
    nodes.sort();
    nodes
}

/// Waits until `cluster`'s master and in-sync slave report the same commit index.
fn master_and_slave_agree(coordinator: &Coordinator, cluster: u32) -> u64 {
    let mut last = Vec::new();
    let agreed = eventually(WAIT, || {
        let status = coordinator.status();
        let slave_in_sync = status.nodes.iter().any(|n| {
            n.cluster == cluster && n.node_role == i32::from(NodeRole::Slave) && n.in_sync
        });
        last = commit_indexes(coordinator, cluster);
        slave_in_sync && last.len() == 2 && last[0].1 == last[1].1 && last[0].1 > 0
    });
    assert!(agreed, "cluster {cluster}: {last:?}");
    last[0].1
}

#[test]
fn a_cluster_joining_late_gets_a_large_state_transfer_and_restarts_with_it() {
    // Three clusters, as `tsd` and `synchronizer` assume by default; cluster 3 never starts.
    let coordinator = Coordinator::start_with(3, Heartbeat::FAILOVER);
    let data = tempfile::tempdir().expect("temp dir");
    let dir =
        |cluster: u32, server: u32| data.path().join(format!("cluster{cluster}/server{server}"));
    let master1 = Tsd::joined(&coordinator, 1, 1, free_port(), &dir(1, 1), Expect::Master);
    let slave1 = Tsd::joined(&coordinator, 1, 2, free_port(), &dir(1, 2), Expect::Slave);
    coordinator.wait_for_role(&slave1, NodeRole::Slave);
    let _sync1 = Synchronizer::start(&coordinator, 1, free_port(), "grpc");

    let started = Instant::now();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(post_everything(format!("127.0.0.1:{}", coordinator.port)));
    eprintln!(
        "{} posts acknowledged in {:?}",
        u64::from(AUTHORS) * POSTS_EACH,
        started.elapsed()
    );
    assert!(
        eventually(WAIT, || compacted(&dir(1, 1))),
        "cluster 1's master took a snapshot and dropped the start of its log"
    );

    // Cluster 2 joins: it can only get cluster 1's state as a state transfer.
    let port_21 = free_port();
    let port_22 = free_port();
    let mut master2 = Tsd::joined(&coordinator, 2, 1, port_21, &dir(2, 1), Expect::Master);
    let mut slave2 = Tsd::joined(&coordinator, 2, 2, port_22, &dir(2, 2), Expect::Slave);
    let _sync2 = Synchronizer::start(&coordinator, 2, free_port(), "grpc");
    let cluster1_users: Vec<u32> = (0..AUTHORS).map(|n| 3 * n + 1).collect();
    let mut everyone = cluster1_users.clone();
    everyone.push(2);
    everyone.sort();
    let mut two = Tsc::via(coordinator.port, 2);
    two.expect_banner();
    let mut last = Vec::new();
    assert!(
        eventually(WAIT, || {
            last = two.list().0;
            last == everyone
        }),
        "cluster 2 knows every user of cluster 1: {last:?}"
    );
    master1
        .log
        .until(|l| l.contains("sending a state transfer"));
    let before = master_and_slave_agree(&coordinator, 2);
    drop(two);

    // Both of cluster 2's servers die and come back with what they stored.
    master2.kill();
    slave2.kill();
    let _master2 = Tsd::joined(&coordinator, 2, 1, port_21, &dir(2, 1), Expect::Master);
    let slave2 = Tsd::joined(&coordinator, 2, 2, port_22, &dir(2, 2), Expect::Slave);
    coordinator.wait_for_role(&slave2, NodeRole::Slave);
    let after = master_and_slave_agree(&coordinator, 2);
    assert!(
        after >= before,
        "the commit index went from {before} to {after}"
    );
    let mut two = Tsc::via(coordinator.port, 2);
    two.expect_banner();
    assert_eq!(two.list().0, everyone, "the same users after the restart");

    // The clusters go on, both ways: a new user of cluster 1 reaches cluster 2, 2 follows it
    // across clusters, and cluster 1 sees the follow.
    let newcomer = 3 * AUTHORS + 1;
    let mut one = Tsc::via(coordinator.port, newcomer);
    one.expect_banner();
    let mut known = Vec::new();
    assert!(
        eventually(WAIT, || {
            known = two.list().0;
            known.contains(&newcomer)
        }),
        "cluster 2 learns of user {newcomer}: {known:?}"
    );
    two.follow(newcomer);
    let mut followers = Vec::new();
    assert!(
        eventually(WAIT, || {
            followers = one.list().1;
            followers == [2]
        }),
        "user {newcomer}'s followers: {followers:?}"
    );
}
