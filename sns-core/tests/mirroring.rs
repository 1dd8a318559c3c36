//! Mirroring and failover inside one cluster (`TestCluster` on in-memory pipes): the slave
//! holds every acknowledged change, is promoted when the master dies, and a returning server
//! rejoins as slave and converges to the master's state, tail or no tail.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sns_core::session::{SessionConfig, Target};
use sns_core::testing::{TestCluster, TestClusterConfig, eventually};
use sns_core::{Error, Role, Server, Session, UserId};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

fn u(id: u32) -> UserId {
    UserId::new(id).expect("valid user")
}

fn config() -> TestClusterConfig {
    let mut config = TestClusterConfig::default();
    config.clusters = 1;
    config.servers_per_cluster = 2;
    config.simulated_disks = true;
    config
}

fn server(cluster: &TestCluster, s: u32) -> Server {
    cluster.server(1, s).expect("running").clone()
}

/// The server acting as master, once there is exactly one.
async fn master(cluster: &TestCluster) -> u32 {
    let mut found = 0;
    let one = eventually(WAIT, || {
        let masters: Vec<u32> = (1..=2)
            .filter(|s| {
                cluster
                    .server(1, *s)
                    .is_some_and(|server| server.role() == Role::Master)
            })
            .collect();
        found = masters.first().copied().unwrap_or(0);
        async move { masters.len() == 1 }
    })
    .await;
    assert!(one, "no single master");
    found
}

/// Waits until the master counts its slave and the coordinator knows it is in sync.
async fn in_sync(cluster: &TestCluster, slave: u32) {
    let known = eventually(WAIT, || {
        let now = tokio::time::Instant::now();
        let nodes = cluster.deployment().coordinator().table().nodes(now);
        let ok = nodes.iter().any(|n| n.id == slave && n.in_sync && n.alive);
        async move { ok }
    })
    .await;
    assert!(known, "slave {slave} never became in sync");
}

/// Waits until both servers hold the same committed state at the same commit index.
async fn converged(cluster: &TestCluster) {
    let same = eventually(WAIT, || {
        let a = cluster.server(1, 1).map(Server::committed_state);
        let b = cluster.server(1, 2).map(Server::committed_state);
        async move { a.is_some() && a == b }
    })
    .await;
    if !same {
        let a = server(cluster, 1).positions();
        let b = server(cluster, 2).positions();
        panic!("master and slave did not converge:\n{a:?}\n{b:?}");
    }
}

/// What the clients were told: per (follower, followee), the outcome of the last follow or
/// unfollow answered, or `None` once an answer was lost (the change may or may not be there).
type Acknowledged = Arc<Mutex<BTreeMap<(u32, u32), Option<bool>>>>;

/// Users 1..=n follow and unfollow each other in a loop through sessions (which carry them over
/// failovers), recording every acknowledged change, until `stop`.
async fn churn(
    cluster: &TestCluster,
    n: u32,
    stop: CancellationToken,
) -> (Acknowledged, Vec<tokio::task::JoinHandle<usize>>) {
    let acked: Acknowledged = Arc::default();
    let mut workers = Vec::new();
    for user in 1..=n {
        let mut config = SessionConfig::default();
        config.patience = WAIT;
        config.first_retry = Duration::from_millis(20);
        config.max_retry = Duration::from_millis(200);
        let session = Session::connect(
            cluster.network(),
            Target::Coordinator(cluster.coordinator_addr().to_string()),
            u(user),
            config,
        )
        .await
        .expect("session");
        let acked = Arc::clone(&acked);
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let mut done = 0;
            let mut round = 0u32;
            while !stop.is_cancelled() {
                let target = (user + round % (n - 1)) % n + 1;
                round += 1;
                let key = (user, target);
                let following = acked.lock().expect("lock").get(&key).copied().flatten();
                let result = if following == Some(true) {
                    session.unfollow(u(target)).await.map(|()| false)
                } else {
                    session.follow(u(target)).await.map(|()| true)
                };
                let outcome = match result {
                    Ok(now) => Some(now),
                    Err(Error::AlreadyFollowing) => Some(true),
                    Err(Error::NotFollowing) => Some(false),
                    Err(_) => None,
                };
                acked.lock().expect("lock").insert(key, outcome);
                done += usize::from(outcome.is_some());
            }
            session.close().await;
            done
        }));
    }
    (acked, workers)
}

fn acked_count(acked: &Acknowledged) -> usize {
    acked.lock().expect("lock").len()
}

/// Every acknowledged follow state is what `server` holds.
fn holds_every_acknowledged_change(server: &Server, acked: &Acknowledged) {
    let (_, state) = server.committed_state();
    for ((follower, followee), outcome) in acked.lock().expect("lock").iter() {
        if let Some(following) = outcome {
            assert_eq!(
                state.follows(u(*follower), u(*followee)),
                *following,
                "{follower} -> {followee} was acknowledged as {following}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_whose_disk_fails_refuses_everything_reports_why_and_its_slave_takes_over() {
    let cluster = TestCluster::start_with(config()).await.expect("start");
    let old = master(&cluster).await;
    let slave = 3 - old;
    in_sync(&cluster, slave).await;
    let one = cluster.client(1).await.expect("login 1");
    let two = cluster.client(2).await.expect("login 2");
    one.follow(u(2))
        .await
        .expect("acknowledged before the failure");

    // The disk fills up: the next change cannot be made durable here and is refused (it may
    // still take effect: it reached the slave, which may commit it once promoted).
    cluster.fail_disk(1, old).expect("fail the disk");
    assert!(two.follow(u(1)).await.is_err(), "a change on a full disk");
    let failed = server(&cluster, old);
    let why = failed.failed().expect("the server gave up");
    assert!(why.contains("no space left on device"), "{why}");
    // It serves nothing from memory any more, reads included.
    assert!(matches!(one.list().await, Err(Error::StorageFailed(_))));

    // Its heartbeat reports the failure: the coordinator shows why and promotes the slave.
    let reported = eventually(WAIT, || {
        let nodes = cluster
            .deployment()
            .coordinator()
            .table()
            .nodes(tokio::time::Instant::now());
        let ok = nodes.iter().any(|n| {
            n.id == old && !n.alive && n.failure.as_deref().is_some_and(|f| f.contains("no space"))
        });
        async move { ok }
    })
    .await;
    assert!(reported, "the coordinator shows the failure");
    let promoted = eventually(WAIT, || {
        let role = server(&cluster, slave).role();
        async move { role == Role::Master }
    })
    .await;
    assert!(promoted, "the slave took over");
    assert_eq!(
        failed.role(),
        Role::Slave,
        "the failed server is master no more"
    );
    // The acknowledged change is there, and the cluster serves again.
    let three = cluster.client(3).await.expect("login on the new master");
    three
        .follow(u(1))
        .await
        .expect("a change on the new master");
    let (_, state) = server(&cluster, slave).committed_state();
    assert!(state.follows(u(1), u(2)));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_crash_promotes_the_slave_and_the_old_master_rejoins_as_slave() {
    let mut cluster = TestCluster::start_with(config()).await.expect("start");
    let old = master(&cluster).await;
    let slave = 3 - old;
    in_sync(&cluster, slave).await;
    let stop = CancellationToken::new();
    let (acked, workers) = churn(&cluster, 4, stop.clone()).await;
    assert!(
        eventually(WAIT, || {
            let n = acked_count(&acked);
            async move { n >= 8 }
        })
        .await
    );
    let before = server(&cluster, old).positions().commit;

    cluster.crash(1, old).await.expect("crash");
    let promoted = eventually(WAIT, || {
        let role = cluster.server(1, slave).map(Server::role);
        async move { role == Some(Role::Master) }
    })
    .await;
    assert!(promoted, "the in-sync slave was not promoted");
    // The clients carry on by themselves: more changes are acknowledged after the failover.
    let mark = server(&cluster, slave).positions().commit;
    assert!(mark >= before, "the promoted slave lacks committed entries");
    let carried_on = eventually(WAIT, || {
        let commit = cluster.server(1, slave).map(|s| s.positions().commit);
        async move { commit.is_some_and(|c| c.0 >= mark.0 + 8) }
    })
    .await;
    assert!(carried_on, "clients did not continue on the new master");
    stop.cancel();
    for worker in workers {
        assert!(worker.await.expect("worker") > 0);
    }
    holds_every_acknowledged_change(&server(&cluster, slave), &acked);

    // The old master comes back as slave of its successor and ends with the same state.
    cluster.restart(1, old).await.expect("restart");
    in_sync(&cluster, old).await;
    assert_eq!(server(&cluster, old).role(), Role::Slave);
    converged(&cluster).await;
    holds_every_acknowledged_change(&server(&cluster, old), &acked);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_master_drops_the_tail_its_successor_never_committed() {
    let mut config = config();
    // Memory storage keeps every append, so the uncommitted tail survives the crash.
    config.simulated_disks = false;
    let mut cluster = TestCluster::start_with(config).await.expect("start");
    let old = master(&cluster).await;
    let slave = 3 - old;
    let one = cluster.client(1).await.expect("client 1");
    let _two = cluster.client(2).await.expect("client 2");
    in_sync(&cluster, slave).await;

    // The master can no longer ship to its slave: its next change is durable on the master
    // alone and cannot commit.
    cluster.isolate(1, old, slave, true).expect("cut");
    let pending = tokio::spawn(async move { one.follow(u(2)).await });
    let tail = eventually(WAIT, || {
        let p = cluster.server(1, old).map(Server::positions);
        async move { p.is_some_and(|p| p.durable > p.commit) }
    })
    .await;
    assert!(tail, "the master never wrote the change");
    cluster.crash(1, old).await.expect("crash");
    let _ = pending.await;
    let promoted = eventually(WAIT, || {
        let role = cluster.server(1, slave).map(Server::role);
        async move { role == Some(Role::Master) }
    })
    .await;
    if !promoted {
        let now = tokio::time::Instant::now();
        let nodes = cluster.deployment().coordinator().table().nodes(now);
        panic!(
            "not promoted: {nodes:#?}\n{:?}",
            server(&cluster, slave).positions()
        );
    }
    // Healed only now: bytes the cut held back reach a slave that already knows it replaced
    // the old master (a message of the old epoch is refused).
    cluster.isolate(1, old, slave, false).expect("heal");
    // The new master writes entries where the old master's tail lies.
    let three = cluster.client(3).await.expect("client 3");
    three.follow(u(1)).await.expect("follow on the new master");

    cluster.restart(1, old).await.expect("restart");
    in_sync(&cluster, old).await;
    converged(&cluster).await;
    let (_, state) = server(&cluster, old).committed_state();
    assert!(state.follows(u(3), u(1)));
    assert!(
        !state.follows(u(1), u(2)),
        "the uncommitted follow must be gone from the old master"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_its_slave_down_the_master_serves_alone_and_the_slave_catches_up_but_is_not_promoted_while_behind()
 {
    let mut cluster = TestCluster::start_with(config()).await.expect("start");
    let m = master(&cluster).await;
    let s = 3 - m;
    let one = cluster.client(1).await.expect("client 1");
    let _two = cluster.client(2).await.expect("client 2");
    in_sync(&cluster, s).await;

    cluster.crash(1, s).await.expect("crash the slave");
    // Writes go on: the master drops the slave (through the coordinator) and commits alone.
    for _ in 0..3 {
        one.follow(u(2)).await.expect("follow alone");
        one.unfollow(u(2)).await.expect("unfollow alone");
    }
    one.follow(u(2)).await.expect("follow alone");
    let now = tokio::time::Instant::now();
    let nodes = cluster.deployment().coordinator().table().nodes(now);
    assert!(
        !nodes.iter().any(|n| n.id == s && n.in_sync),
        "the coordinator must not count the dead slave"
    );

    // The slave returns but cannot reach the master: it stays behind...
    cluster.isolate(1, m, s, true).expect("cut");
    cluster.restart(1, s).await.expect("restart the slave");
    let behind = server(&cluster, s).positions().commit;
    assert!(behind < server(&cluster, m).positions().commit);
    // ...and when the master dies it is not promoted: the cluster waits rather than lose the
    // follow it never received.
    cluster.crash(1, m).await.expect("crash the master");
    let coordinator = cluster.deployment().coordinator().clone();
    let failure = cluster.deployment().config().heartbeat_interval * 2;
    // Once the master is dead, the slave's next heartbeats are answered: it stays slave.
    let dead_at = tokio::time::Instant::now();
    let heard = eventually(WAIT, || {
        let now = tokio::time::Instant::now();
        let nodes = coordinator.table().nodes(now);
        let master_dead = nodes.iter().any(|n| n.id == m && !n.alive);
        let slave_spoke_since = nodes
            .iter()
            .any(|n| n.id == s && n.alive && now - n.since_heartbeat > dead_at + failure);
        async move { master_dead && slave_spoke_since }
    })
    .await;
    assert!(
        heard,
        "the coordinator never heard the slave after the master died"
    );
    assert_eq!(
        server(&cluster, s).role(),
        Role::Slave,
        "promoted while behind"
    );
    assert!(matches!(
        sns_core::client::locate(cluster.network(), cluster.coordinator_addr(), u(1)).await,
        Err(Error::Unavailable(_))
    ));

    // The old master returns and the cluster works again; the slave catches up.
    cluster.isolate(1, m, s, false).expect("heal");
    cluster.restart(1, m).await.expect("restart the master");
    assert_eq!(master(&cluster).await, m);
    in_sync(&cluster, s).await;
    converged(&cluster).await;
    let (_, state) = server(&cluster, s).committed_state();
    assert!(state.follows(u(1), u(2)));
    let three = cluster.client(3).await.expect("the cluster serves again");
    three.follow(u(1)).await.expect("follow");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_commits_on_the_slave_too_or_only_once_the_coordinator_stopped_counting_it() {
    let cluster = TestCluster::start_with(config()).await.expect("start");
    let m = master(&cluster).await;
    let s = 3 - m;
    let one = cluster.client(1).await.expect("client 1");
    let _two = cluster.client(2).await.expect("client 2");
    in_sync(&cluster, s).await;
    cluster.isolate(1, m, s, true).expect("cut");
    // The slave cannot acknowledge: the follow commits only after the master told the
    // coordinator the slave is out of sync (so it can never be promoted without it).
    one.follow(u(2))
        .await
        .expect("commits without the slave, eventually");
    let now = tokio::time::Instant::now();
    let nodes = cluster.deployment().coordinator().table().nodes(now);
    assert!(
        nodes.iter().all(|n| !(n.id == s && n.in_sync)),
        "acknowledged while the coordinator still counts the slave: {nodes:?}"
    );
    assert!(!server(&cluster, s).committed_state().1.follows(u(1), u(2)));
    cluster.isolate(1, m, s, false).expect("heal");
    in_sync(&cluster, s).await;
    converged(&cluster).await;
    cluster.shutdown().await;
}

/// A crash of one server of the cluster, and how long until it restarts. Faults overlap: the
/// next one comes `gap_ms` after this crash, whether or not this server is back.
#[derive(Debug, Clone, Copy)]
struct Fault {
    /// Crash the master (`true`) or the slave.
    master: bool,
    /// Crash both at once (a power loss): the slave restarts first, the master 100 ms later.
    both: bool,
    /// Time to the next fault, and downtime, in milliseconds.
    gap_ms: u64,
    down_ms: u64,
}

fn fault() -> impl proptest::strategy::Strategy<Value = Fault> {
    use proptest::prelude::*;
    (any::<bool>(), any::<bool>(), 0u64..200, 0u64..400).prop_map(
        |(master, both, gap_ms, down_ms)| Fault {
            master,
            both,
            gap_ms,
            down_ms,
        },
    )
}

/// What happens at a moment of a fault plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    /// Crash the server in this role (if one runs in it; else the other running one).
    Crash { master: bool },
    /// Restart the server crashed by the crash step of this number.
    Restart { crash: usize },
}

/// Runs `faults` under continuous follows and unfollows, then checks that the master holds
/// every acknowledged change and that master and slave end identical.
async fn survive(faults: Vec<Fault>) {
    let mut cluster = TestCluster::start_with(config()).await.expect("start");
    in_sync(&cluster, 3 - master(&cluster).await).await;
    let stop = CancellationToken::new();
    let (acked, workers) = churn(&cluster, 4, stop.clone()).await;
    let mut plan = Vec::new();
    let mut at = 0;
    let mut crashes = 0;
    for fault in &faults {
        if fault.both {
            plan.push((at, Step::Crash { master: false }));
            plan.push((at, Step::Crash { master: true }));
            plan.push((at + fault.down_ms, Step::Restart { crash: crashes }));
            plan.push((
                at + fault.down_ms + 100,
                Step::Restart { crash: crashes + 1 },
            ));
            crashes += 2;
        } else {
            plan.push((
                at,
                Step::Crash {
                    master: fault.master,
                },
            ));
            plan.push((at + fault.down_ms, Step::Restart { crash: crashes }));
            crashes += 1;
        }
        at += fault.gap_ms;
    }
    // Stable: a power loss crashes the slave, then the master.
    plan.sort_by_key(|(at, _)| *at);
    let start = tokio::time::Instant::now();
    let mut crashed: Vec<Option<u32>> = vec![None; crashes];
    let mut crashes = 0;
    for (at, step) in plan {
        // The fault schedule itself: crashing at these moments is what the test varies.
        tokio::time::sleep_until(start + Duration::from_millis(at)).await;
        match step {
            Step::Crash { master } => {
                let running: Vec<u32> = (1..=2)
                    .filter(|s| cluster.server(1, *s).is_some())
                    .collect();
                let wanted = if master { Role::Master } else { Role::Slave };
                let victim = running
                    .iter()
                    .copied()
                    .find(|s| cluster.server(1, *s).map(Server::role) == Some(wanted))
                    .or(running.first().copied());
                if let Some(victim) = victim {
                    cluster.crash(1, victim).await.expect("crash");
                }
                crashed[crashes] = victim;
                crashes += 1;
            }
            Step::Restart { crash } => {
                if let Some(victim) = crashed[crash].take()
                    && cluster.server(1, victim).is_none()
                {
                    cluster.restart(1, victim).await.expect("restart");
                }
            }
        }
    }
    for s in 1..=2 {
        if cluster.server(1, s).is_none() {
            cluster.restart(1, s).await.expect("restart");
        }
    }
    // The cluster is whole again: the clients carry on, then stop.
    let m = master(&cluster).await;
    in_sync(&cluster, 3 - m).await;
    let mark = server(&cluster, m).positions().commit;
    let resumed = eventually(WAIT, || {
        let commit = cluster.server(1, m).map(|s| s.positions().commit);
        async move { commit.is_some_and(|c| c.0 >= mark.0 + 4) }
    })
    .await;
    assert!(resumed, "the clients did not carry on");
    stop.cancel();
    for worker in workers {
        worker.await.expect("worker");
    }
    let m = master(&cluster).await;
    holds_every_acknowledged_change(&server(&cluster, m), &acked);
    converged(&cluster).await;
    cluster.shutdown().await;
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config { cases: 12, ..proptest::test_runner::Config::default() })]

    #[test]
    fn random_crashes_of_master_and_slave_lose_no_acknowledged_change(
        faults in proptest::collection::vec(fault(), 1..4)
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(survive(faults));
    }
}
