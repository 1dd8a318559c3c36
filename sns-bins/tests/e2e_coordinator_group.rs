//! A group of coordinators on a real etcd, as real processes: the leading coordinator killed
//! while posts flow, a coordinator restarted between a slave falling out of sync and its
//! master's death, and etcd itself stopped.
//!
//! Each test runs its own `etcd` member (Debian's `etcd-server`; skipped without it unless
//! `SNS_REQUIRE_ETCD=1`).

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sns_core::session::{Session, SessionConfig, Target};
use sns_core::{CoordinatorClient, Network, UserId};
use sns_proto::csce438::NodeRole;
use sns_proto::sns_v1::NodeStatus;
use support::group::{Etcd, GroupCoordinator};
use support::{Expect, Heartbeat, Tsd, WAIT, eventually, free_port, status_at};

const HEARTBEAT: Heartbeat = Heartbeat::FAILOVER;

fn failure_timeout() -> Duration {
    Duration::from_millis(HEARTBEAT.interval_ms * u64::from(HEARTBEAT.missed))
}

fn user(id: u32) -> UserId {
    UserId::new(id).expect("a user id")
}

fn group_addr(ports: &[u16]) -> String {
    let members: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    members.join(",")
}

/// The node `server` of `cluster` in the status of the coordinator on `port`, if it answers.
fn node(port: u16, cluster: u32, server: u32) -> Option<NodeStatus> {
    status_at(port).ok()?.nodes.into_iter().find(|n| {
        n.cluster == cluster
            && n.server == server
            && n.node_role != i32::from(NodeRole::Synchronizer)
    })
}

/// Whether the coordinator on `port` has heard server `server` of `cluster` since `at`.
fn heard_since(port: u16, (cluster, server): (u32, u32), at: Instant) -> bool {
    // Measured before asking: a beat younger than this came after `at`.
    let since = at.elapsed();
    node(port, cluster, server)
        .is_some_and(|n| n.alive && Duration::from_millis(n.last_heartbeat_ms) < since)
}

/// Waits until the coordinator on `port` counts `slave` of cluster 1 in sync and alive.
fn wait_in_sync(port: u16, slave: u32) {
    let synced = eventually(WAIT, || {
        node(port, 1, slave).is_some_and(|n| n.alive && n.in_sync)
    });
    assert!(synced, "server 1/{slave} never came in sync");
}

/// Server `id` of cluster `cluster` (of `clusters`), its data directory under `data`.
fn server(
    coordinators: &[u16],
    (clusters, cluster, id): (u32, u32, u32),
    data: &Path,
    expect: Expect,
) -> Tsd {
    let dir = data.join(format!("cluster{cluster}/server{id}"));
    Tsd::in_group(
        coordinators,
        HEARTBEAT,
        (clusters, cluster, id),
        free_port(),
        &dir,
        expect,
    )
}

/// Lines of `tsd`'s log read so far that say its role changed to `role`.
fn changes_to(tsd: &Tsd, role: &str) -> Vec<String> {
    tsd.log
        .drain()
        .into_iter()
        .filter(|l| l.contains("role changed") && l.contains(&format!("to={role}")))
        .collect()
}

/// Posts of user 1, read by user 2, through the group: a poster that posts until stopped and
/// counts what was acknowledged, and a reader.
struct Traffic {
    runtime: tokio::runtime::Runtime,
    stop: Arc<AtomicBool>,
    poster: tokio::task::JoinHandle<(u32, Vec<String>)>,
    acked: Arc<std::sync::atomic::AtomicU32>,
    reader: sns_core::session::SessionTimeline,
}

impl Traffic {
    fn start(coordinators: &[u16]) -> Self {
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        let target = Target::Coordinator(group_addr(coordinators));
        let connect = |id| {
            let target = target.clone();
            async move {
                Session::connect(&Network::tcp(), target, user(id), SessionConfig::default())
                    .await
                    .expect("log in through the group")
            }
        };
        let (author, reader) = runtime.block_on(async {
            let author = connect(1).await;
            let reader = connect(2).await;
            reader.follow(user(1)).await.expect("follow");
            (author, reader)
        });
        let reader = runtime
            .block_on(reader.timeline())
            .expect("the reader's timeline");
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let poster = runtime.spawn({
            let (stop, acked) = (Arc::clone(&stop), Arc::clone(&acked));
            async move {
                let posting = author.timeline().await.expect("the author's timeline");
                let mut errors = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    match posting.post(&format!("post {n}")).await {
                        Ok(()) => {
                            acked.store(n, Ordering::Relaxed);
                        }
                        Err(e) => errors.push(format!("post {n}: {e}")),
                    }
                    // The pace of the load (about 50 posts a second), not a wait.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                (n, errors)
            }
        });
        Self {
            runtime,
            stop,
            poster,
            acked,
            reader,
        }
    }

    /// Waits until `more` posts beyond those acknowledged now are acknowledged.
    fn wait_for_more(&self, more: u32) {
        let target = self.acked.load(Ordering::Relaxed) + more;
        let went_on = eventually(WAIT, || self.acked.load(Ordering::Relaxed) >= target);
        assert!(went_on, "posting stalled before post {target}");
    }

    /// Stops posting; checks that every post was acknowledged without an error and arrived
    /// exactly once, in order.
    fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        let (sent, errors) = self.runtime.block_on(self.poster).expect("the poster");
        assert!(errors.is_empty(), "posts failed: {errors:?}");
        let mut reader = self.reader;
        let mut seen = BTreeMap::new();
        self.runtime.block_on(async {
            for n in 1..=sent {
                let post = tokio::time::timeout(WAIT, reader.next())
                    .await
                    .unwrap_or_else(|_| panic!("post {n} of {sent} did not arrive"))
                    .expect("the timeline goes on")
                    .expect("a post");
                assert_eq!(
                    post.text,
                    format!("post {n}"),
                    "posts arrive once and in order"
                );
                *seen.entry(post.text).or_insert(0) += 1;
            }
        });
        assert_eq!(seen.len(), sent as usize);
    }
}

#[test]
fn the_leading_coordinator_dies_while_posts_flow_and_no_server_changes_role() {
    let Some(etcd) = Etcd::start("leader_dies") else {
        return;
    };
    let data = tempfile::tempdir().expect("a data directory");
    let mut a = GroupCoordinator::start(&etcd, "/leader-dies", 1, HEARTBEAT);
    a.wait_until_leading();
    let mut b = GroupCoordinator::start(&etcd, "/leader-dies", 1, HEARTBEAT);
    let group = [a.port, b.port];
    let master = server(&group, (1, 1, 1), data.path(), Expect::Master);
    let slave = server(&group, (1, 1, 2), data.path(), Expect::Slave);
    wait_in_sync(b.port, 2);
    let epoch = node(b.port, 1, 1).expect("the master").epoch;

    let traffic = Traffic::start(&group);
    traffic.wait_for_more(10);
    a.kill();
    b.wait_until_leading();
    traffic.wait_for_more(10);
    // A client routed by the survivor (the dead member listed first) logs in.
    let routed = traffic.runtime.block_on(async {
        let coordinator = CoordinatorClient::new(&Network::tcp(), &group_addr(&group))?;
        coordinator
            .login(user(3))
            .await
            .map(|c| c.addr().to_string())
    });
    assert_eq!(routed.ok(), Some(master.addr()));

    // The first coordinator comes back and the second dies: the first leads again.
    a.restart();
    b.kill();
    a.wait_until_leading();
    traffic.wait_for_more(10);
    traffic.finish();

    assert_eq!(changes_to(&master, "Slave"), Vec::<String>::new());
    assert_eq!(changes_to(&slave, "Master"), Vec::<String>::new());
    let now = node(a.port, 1, 1).expect("the master");
    assert_eq!(
        (now.epoch, now.node_role),
        (epoch, i32::from(NodeRole::Master))
    );
}

#[test]
fn a_restarted_coordinator_keeps_the_in_sync_sets_and_promotes_no_stale_slave() {
    let Some(etcd) = Etcd::start("restart_keeps_in_sync") else {
        return;
    };
    let data = tempfile::tempdir().expect("a data directory");
    let mut coordinator = GroupCoordinator::start(&etcd, "/in-sync", 1, HEARTBEAT);
    coordinator.wait_until_leading();
    let group = [coordinator.port];
    let mut master = server(&group, (1, 1, 1), data.path(), Expect::Master);
    let mut slave = server(&group, (1, 1, 2), data.path(), Expect::Slave);
    wait_in_sync(coordinator.port, 2);
    let epoch = node(coordinator.port, 1, 1).expect("the master").epoch;

    // The slave dies; the master counts it out of sync, and the leader records that.
    slave.kill();
    let out = eventually(WAIT, || {
        node(coordinator.port, 1, 2).is_some_and(|n| !n.in_sync)
    });
    assert!(out, "the dead slave is still counted in sync");

    // The master dies too, the coordinator restarts, the stale slave comes back.
    master.kill();
    coordinator.restart();
    let restarted = Instant::now();
    let slave = server(&group, (1, 1, 2), data.path(), Expect::Serving);
    // A beat is judged against the recorded master once the coordinator had a failure timeout
    // to hear that master (which it never does): wait for a beat of the slave after that.
    let listened = restarted + failure_timeout();
    let judged = eventually(WAIT, || {
        Instant::now() > listened && heard_since(coordinator.port, (1, 2), listened)
    });
    assert!(judged, "the slave never beat to the restarted coordinator");
    assert_eq!(changes_to(&slave, "Master"), Vec::<String>::new());
    let seen = node(coordinator.port, 1, 2).expect("the slave");
    assert_eq!(seen.node_role, i32::from(NodeRole::Slave), "{seen:?}");

    // The master returns and is master again, under a new epoch.
    let master = server(&group, (1, 1, 1), data.path(), Expect::Master);
    let again = node(coordinator.port, 1, 1).expect("the master");
    assert!(again.epoch > epoch, "{again:?}");
    drop((master, slave));
}

#[test]
fn with_etcd_stopped_nobody_is_promoted_masters_step_down_and_service_resumes() {
    let Some(mut etcd) = Etcd::start("etcd_stopped") else {
        return;
    };
    let data = tempfile::tempdir().expect("a data directory");
    let a = GroupCoordinator::start(&etcd, "/etcd-stopped", 2, HEARTBEAT);
    a.wait_until_leading();
    let b = GroupCoordinator::start(&etcd, "/etcd-stopped", 2, HEARTBEAT);
    let group = [a.port, b.port];
    let mut master = server(&group, (2, 1, 1), data.path(), Expect::Master);
    let slave = server(&group, (2, 1, 2), data.path(), Expect::Slave);
    let other = server(&group, (2, 2, 1), data.path(), Expect::Master);
    wait_in_sync(b.port, 2);

    etcd.kill();
    // Cluster 2's master hears from no coordinator that can vouch for it: it steps down.
    other.log.until(|l| l.contains("stepping down"));
    // Cluster 1's master dies; its in-sync slave goes on beating, but nobody may promote it.
    master.kill();
    let master_dead = eventually(WAIT, || {
        [a.port, b.port].iter().all(|p| {
            node(*p, 1, 1).is_some_and(|n| !n.alive) && node(*p, 1, 2).is_some_and(|n| n.alive)
        })
    });
    assert!(
        master_dead,
        "the coordinators never saw the master dead and the slave alive"
    );
    // A beat of the slave after that, at every coordinator: each judged it with the master dead.
    let seen_dead = Instant::now();
    let judged = eventually(WAIT, || {
        group.iter().all(|p| heard_since(*p, (1, 2), seen_dead))
    });
    assert!(
        judged,
        "the slave's beats stopped reaching the coordinators"
    );
    assert_eq!(changes_to(&slave, "Master"), Vec::<String>::new());

    // etcd returns: the slave (in sync) is promoted, cluster 2's master named again.
    etcd.restart();
    slave
        .log
        .until(|l| l.contains("role changed") && l.contains("to=Master"));
    other
        .log
        .until(|l| l.contains("role changed") && l.contains("to=Master"));
}
