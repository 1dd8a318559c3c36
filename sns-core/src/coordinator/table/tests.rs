//! Routing table tests with simulated time.

use std::time::Duration;

use super::*;

fn c(id: u32) -> ClusterId {
    ClusterId::new(id).expect("cluster")
}

fn s(id: u32) -> ServerId {
    ServerId::new(id).expect("server")
}

fn addr(port: u16) -> Address {
    Address::parse("127.0.0.1", &port.to_string()).expect("address")
}

fn beat(cluster: u32, server: u32, port: u16) -> Beat {
    Beat {
        cluster: c(cluster),
        server: s(server),
        addr: addr(port),
        claims_master: false,
        epoch: Epoch(0),
        log: Default::default(),
        in_sync: Vec::new(),
        failure: None,
    }
}

/// A table whose coordinator started, and whose clusters' election windows opened, one
/// heartbeat interval before `t0`: the first server to speak at `t0` is named master at once.
fn table(clusters: u32, t0: Instant) -> RoutingTable {
    let mut t = fresh(clusters, t0);
    for k in 1..=clusters {
        t.first_heard.insert(c(k), t0 - SEC);
    }
    t
}

/// A table whose coordinator started one interval before `t0` and has heard no server yet.
fn fresh(clusters: u32, t0: Instant) -> RoutingTable {
    RoutingTable::new(
        RoutingConfig {
            clusters,
            ..RoutingConfig::default()
        },
        t0 - SEC,
    )
}

/// A table whose coordinator starts at `t0` (just restarted).
fn restarted(clusters: u32, t0: Instant) -> RoutingTable {
    RoutingTable::new(
        RoutingConfig {
            clusters,
            ..RoutingConfig::default()
        },
        t0,
    )
}

const SEC: Duration = Duration::from_secs(1);

#[test]
fn users_route_to_their_cluster_for_1_3_and_5_clusters() {
    let t0 = Instant::now();
    for n in [1u32, 3, 5] {
        let mut t = table(n, t0);
        for cluster in 1..=n {
            t.heartbeat(beat(cluster, 1, 10_000 + cluster as u16), t0)
                .expect("registers");
        }
        for user in 1..=20i64 {
            let (cluster, _, a) = t.route(user, t0).expect("routed");
            let expected = ((user as u32 - 1) % n) + 1;
            assert_eq!(cluster.get(), expected, "user {user} with {n} clusters");
            assert_eq!(a.port, 10_000 + expected as u16);
        }
    }
}

#[test]
fn a_lone_server_is_master_after_the_election_window_and_later_ones_slaves() {
    let t0 = Instant::now();
    let mut t = fresh(3, t0);
    // Server 2 alone: it waits out the window (one interval from the cluster's first beat).
    let first = t.heartbeat(beat(2, 2, 20001), t0).expect("ok");
    assert_eq!(first.role, Role::Slave);
    let first = t.heartbeat(beat(2, 2, 20001), t0 + SEC).expect("ok");
    assert_eq!(first.role, Role::Master);
    assert_eq!(first.epoch, Epoch(1));
    // Server 1 comes later: a live master is never replaced because a lower id appears.
    let second = t.heartbeat(beat(2, 1, 20000), t0 + SEC).expect("ok");
    assert_eq!(second.role, Role::Slave);
    // Roles are stable across heartbeats.
    assert_eq!(
        t.heartbeat(beat(2, 2, 20001), t0 + 2 * SEC)
            .expect("ok")
            .role,
        Role::Master
    );
    assert_eq!(
        t.heartbeat(beat(2, 1, 20000), t0 + 2 * SEC)
            .expect("ok")
            .role,
        Role::Slave
    );
    assert_eq!(t.master(c(2), t0 + 2 * SEC).expect("master").1, s(2));
    assert_eq!(t.slave(c(2), t0 + 2 * SEC).expect("slave").1, s(1));
}

#[test]
fn servers_coming_up_together_long_after_the_coordinator_elect_the_lowest_id() {
    let t0 = Instant::now();
    // The coordinator has run for a long time before the cluster's servers come up.
    let mut t = fresh(1, t0);
    let later = t0 + 60 * SEC;
    // Server 2 speaks first, server 1 within the window.
    let two = t.heartbeat(beat(1, 2, 10001), later).expect("ok");
    assert_eq!(two.role, Role::Slave, "no master before the window closes");
    let one = t.heartbeat(beat(1, 1, 10000), later + SEC / 4).expect("ok");
    assert_eq!(one.role, Role::Slave);
    // Once the window closed, server 2's beat names nobody; server 1's names it.
    let closed = later + SEC;
    assert_eq!(
        t.heartbeat(beat(1, 2, 10001), closed).expect("ok").role,
        Role::Slave
    );
    assert_eq!(
        t.heartbeat(beat(1, 1, 10000), closed).expect("ok").role,
        Role::Master
    );
    // And it stays so.
    assert_eq!(
        t.heartbeat(beat(1, 2, 10001), closed + SEC / 2)
            .expect("ok")
            .role,
        Role::Slave
    );
}

#[test]
fn a_server_missing_two_intervals_is_dead_and_not_routed() {
    let t0 = Instant::now();
    let mut t = table(3, t0);
    let timeout = RoutingConfig::default().failure_timeout();
    t.heartbeat(beat(1, 1, 10000), t0).expect("ok");
    assert!(
        t.route(1, t0 + timeout).is_ok(),
        "two intervals: still alive"
    );
    let late = t.route(1, t0 + timeout + Duration::from_millis(1));
    assert!(matches!(late, Err(Error::Unavailable(_))));
    // It comes back by heartbeating again, as master (nobody else took over).
    let back = t.heartbeat(beat(1, 1, 10000), t0 + 5 * SEC).expect("ok");
    assert_eq!(back.role, Role::Master);
    assert!(t.route(4, t0 + 5 * SEC).is_ok());
    let nodes = t.nodes(t0 + 5 * SEC);
    assert!(nodes.iter().all(|n| n.alive));
}

#[test]
fn get_server_returns_only_live_masters() {
    let t0 = Instant::now();
    let mut t = table(1, t0);
    t.heartbeat(beat(1, 1, 10000), t0).expect("master");
    t.heartbeat(beat(1, 2, 10001), t0).expect("slave");
    // The slave keeps beating, the master stops: no master is routed to, and the slave is not
    // promoted without replication telling it is in sync.
    let later = t0 + 3 * SEC;
    let slave = t.heartbeat(beat(1, 2, 10001), later).expect("ok");
    assert_eq!(slave.role, Role::Slave);
    assert!(matches!(t.route(1, later), Err(Error::Unavailable(_))));
}

#[test]
fn a_live_slot_cannot_be_taken_over_from_another_address() {
    let t0 = Instant::now();
    let mut t = table(3, t0);
    t.heartbeat(beat(1, 1, 10000), t0).expect("ok");
    let taken = t.heartbeat(beat(1, 1, 10005), t0 + SEC);
    assert!(matches!(taken, Err(Error::Conflict(_))));
    assert_eq!(t.master(c(1), t0 + SEC).expect("master").2.port, 10000);
    // Once the holder is dead, the slot may move.
    assert!(t.heartbeat(beat(1, 1, 10005), t0 + 3 * SEC).is_ok());
    assert_eq!(t.master(c(1), t0 + 3 * SEC).expect("master").2.port, 10005);
    // The same holds for synchronizers.
    t.register_sync(1, addr(9001), t0).expect("sync");
    assert!(matches!(
        t.register_sync(1, addr(9002), t0),
        Err(Error::Conflict(_))
    ));
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let t0 = Instant::now();
    let mut t = table(3, t0);
    for cluster in [0i64, 4, -1] {
        assert!(t.check_cluster(cluster).is_err());
    }
    assert!(t.heartbeat(beat(4, 1, 10000), t0).is_err());
    for (host, port) in [
        ("", "1"),
        ("a b", "1"),
        ("host", "0"),
        ("host", "65536"),
        ("host", "http"),
        ("host", ""),
        ("host", "-1"),
    ] {
        assert!(Address::parse(host, port).is_err(), "{host:?}:{port:?}");
    }
    assert!(t.route(0, t0).is_err());
    assert!(t.route(-5, t0).is_err());
    assert!(t.register_sync(0, addr(1), t0).is_err());
    assert!(t.nodes(t0).is_empty());
}

#[test]
fn synchronizers_belong_to_clusters_round_robin() {
    let t0 = Instant::now();
    let mut t = table(3, t0);
    for id in 1..=6 {
        t.register_sync(id, addr(9000 + id as u16), t0)
            .expect("sync");
    }
    let others = t.syncs(Some(1), t0);
    assert_eq!(others.len(), 5);
    assert!(others.iter().all(|(id, _, _)| *id != 1));
    let (id, cluster, _) = t.sync_for_user(5, t0).expect("sync for user 5");
    assert_eq!(cluster, c(2));
    assert_eq!((id - 1) % 3 + 1, 2);
}

#[test]
fn after_a_coordinator_restart_the_claiming_master_with_the_highest_epoch_wins() {
    let t0 = Instant::now();
    let mut t = restarted(1, t0);
    // The old slave speaks first, claiming nothing; it has served before (epoch 3).
    let slave = t
        .heartbeat(
            Beat {
                epoch: Epoch(3),
                ..beat(1, 2, 10001)
            },
            t0,
        )
        .expect("ok");
    assert_eq!(
        slave.role,
        Role::Slave,
        "no master is chosen during the grace period"
    );
    let master = t
        .heartbeat(
            Beat {
                claims_master: true,
                epoch: Epoch(3),
                ..beat(1, 1, 10000)
            },
            t0,
        )
        .expect("ok");
    assert_eq!(
        master,
        Assignment {
            role: Role::Master,
            epoch: Epoch(3)
        }
    );
}

#[test]
fn after_a_restart_only_the_most_recent_log_may_become_master() {
    let t0 = Instant::now();
    let mut t = restarted(1, t0);
    // An empty slave (epoch 0) and a server with epoch 2, both claiming nothing: during the
    // first interval nobody is chosen; then the empty log still waits for the newer one.
    let empty = t.heartbeat(beat(1, 2, 10001), t0).expect("ok");
    assert_eq!(
        empty.role,
        Role::Slave,
        "nobody is chosen before every server spoke"
    );
    let late = t0 + SEC;
    let seasoned = t
        .heartbeat(
            Beat {
                epoch: Epoch(2),
                ..beat(1, 1, 10000)
            },
            late,
        )
        .expect("ok");
    assert_eq!(
        seasoned,
        Assignment {
            role: Role::Master,
            epoch: Epoch(3)
        }
    );
    assert_eq!(
        t.heartbeat(beat(1, 2, 10001), late).expect("ok").role,
        Role::Slave
    );
}

#[test]
fn a_claim_never_displaces_a_live_master_and_huge_epochs_do_not_overflow() {
    let t0 = Instant::now();
    let mut t = table(1, t0);
    assert_eq!(
        t.heartbeat(beat(1, 1, 10000), t0).expect("ok").role,
        Role::Master
    );
    let claim = t
        .heartbeat(
            Beat {
                claims_master: true,
                epoch: Epoch(u64::MAX),
                ..beat(1, 2, 10001)
            },
            t0,
        )
        .expect("answered");
    assert_eq!(claim.role, Role::Slave);
    assert_eq!(t.master(c(1), t0).expect("master").1, s(1));
    // Electing past the largest epoch is refused rather than wrapped.
    let mut fresh = table(1, t0);
    let overflow = fresh.heartbeat(
        Beat {
            epoch: Epoch(u64::MAX),
            ..beat(1, 2, 10001)
        },
        t0,
    );
    assert!(
        matches!(overflow, Err(Error::InvalidInput(_))),
        "{overflow:?}"
    );
}

/// Server 1 master of cluster 1 at `t0`, server 2 its slave; `in_sync` says whether the master
/// reports the slave in sync.
fn master_and_slave(t: &mut RoutingTable, t0: Instant, in_sync: bool) -> Epoch {
    let master = t.heartbeat(beat(1, 1, 10000), t0).expect("ok");
    assert_eq!(master.role, Role::Master);
    assert_eq!(
        t.heartbeat(beat(1, 2, 10001), t0).expect("ok").role,
        Role::Slave
    );
    let claim = Beat {
        claims_master: true,
        epoch: master.epoch,
        in_sync: if in_sync { vec![s(2)] } else { Vec::new() },
        ..beat(1, 1, 10000)
    };
    assert_eq!(t.heartbeat(claim, t0).expect("ok"), master);
    master.epoch
}

#[test]
fn a_dead_master_is_replaced_by_its_in_sync_slave_under_a_new_epoch() {
    let t0 = Instant::now();
    let mut t = table(1, t0);
    let epoch = master_and_slave(&mut t, t0, true);
    let later = t0 + RoutingConfig::default().failure_timeout() + Duration::from_millis(1);
    let promoted = t.heartbeat(beat(1, 2, 10001), later).expect("ok");
    assert_eq!(promoted.role, Role::Master);
    assert!(promoted.epoch > epoch);
    assert_eq!(t.mirror_source(c(1), later).map(|(s, _)| s), Some(s(2)));
    // The old master, back without a claim, is now a slave of its successor.
    assert_eq!(
        t.heartbeat(beat(1, 1, 10000), later).expect("ok").role,
        Role::Slave
    );
}

#[test]
fn a_master_is_told_its_slaves_at_their_registered_addresses_and_the_list_follows_a_promotion() {
    let t0 = Instant::now();
    let mut t = table(2, t0);
    master_and_slave(&mut t, t0, true);
    t.heartbeat(beat(2, 1, 20000), t0).expect("another cluster");
    assert_eq!(t.slaves_of(c(1)), vec![(s(2), addr(10001))]);
    assert!(t.slaves_of(c(2)).is_empty(), "cluster 2 has no slave");
    // The slave is promoted: the old master, back, is the slave now.
    let later = t0 + RoutingConfig::default().failure_timeout() + Duration::from_millis(1);
    assert_eq!(
        t.heartbeat(beat(1, 2, 10001), later).expect("ok").role,
        Role::Master
    );
    assert_eq!(t.slaves_of(c(1)), vec![(s(1), addr(10000))]);
}

#[test]
fn a_slave_not_in_sync_is_not_promoted_unless_unclean_promotion_is_allowed() {
    let t0 = Instant::now();
    let later = t0 + RoutingConfig::default().failure_timeout() + Duration::from_millis(1);
    let mut t = table(1, t0);
    master_and_slave(&mut t, t0, false);
    assert_eq!(
        t.heartbeat(beat(1, 2, 10001), later).expect("ok").role,
        Role::Slave
    );
    assert!(matches!(t.route(1, later), Err(Error::Unavailable(_))));

    let mut unclean = RoutingTable::new(
        RoutingConfig {
            clusters: 1,
            allow_unclean_promotion: true,
            ..RoutingConfig::default()
        },
        t0 - SEC,
    );
    unclean.first_heard.insert(c(1), t0 - SEC);
    master_and_slave(&mut unclean, t0, false);
    assert_eq!(
        unclean
            .heartbeat(beat(1, 2, 10001), later)
            .expect("ok")
            .role,
        Role::Master
    );
}

#[test]
fn a_master_that_restarted_or_stepped_down_is_named_again_under_a_new_epoch() {
    let t0 = Instant::now();
    let mut t = table(1, t0);
    let epoch = master_and_slave(&mut t, t0, true);
    // It beats again without claiming (a new process, or it stepped down): same server, new
    // epoch, so entries it writes now can never be confused with those of its old process.
    let again = t.heartbeat(beat(1, 1, 10000), t0 + SEC / 10).expect("ok");
    assert_eq!(again.role, Role::Master);
    assert!(again.epoch > epoch);
    // ...and the in-sync set starts empty for the new epoch.
    let later = t0 + RoutingConfig::default().failure_timeout() + SEC;
    assert_eq!(
        t.heartbeat(beat(1, 2, 10001), later).expect("ok").role,
        Role::Slave
    );
}

#[test]
fn among_equal_fresh_logs_the_lowest_server_id_becomes_master() {
    let t0 = Instant::now();
    let mut t = restarted(1, t0);
    assert_eq!(
        t.heartbeat(beat(1, 2, 10001), t0).expect("ok").role,
        Role::Slave
    );
    assert_eq!(
        t.heartbeat(beat(1, 1, 10000), t0).expect("ok").role,
        Role::Slave
    );
    let window = t0 + SEC;
    assert_eq!(
        t.heartbeat(beat(1, 2, 10001), window).expect("ok").role,
        Role::Slave
    );
    assert_eq!(
        t.heartbeat(beat(1, 1, 10000), window).expect("ok").role,
        Role::Master
    );
}

#[test]
fn a_master_reporting_a_failure_is_made_slave_shown_with_why_and_its_in_sync_slave_promoted() {
    let t0 = Instant::now();
    let mut t = table(1, t0);
    let epoch = master_and_slave(&mut t, t0, true);
    let failing = Beat {
        claims_master: false,
        epoch,
        failure: Some("storage failed: no space left on device".to_string()),
        ..beat(1, 1, 10000)
    };
    assert_eq!(
        t.heartbeat(failing.clone(), t0).expect("ok").role,
        Role::Slave
    );
    assert!(t.route(1, t0).is_err(), "nobody is routed to it");
    let view = t.nodes(t0);
    let one = view.iter().find(|n| n.id == 1).expect("listed");
    assert!(!one.alive);
    assert_eq!(
        one.failure.as_deref(),
        Some("storage failed: no space left on device")
    );
    // Its in-sync slave is promoted at its next beat, well before any failure timeout.
    let promoted = t.heartbeat(beat(1, 2, 10001), t0).expect("ok");
    assert_eq!(promoted.role, Role::Master);
    assert!(promoted.epoch > epoch);
    // The failed server keeps being a slave while it reports the failure.
    assert_eq!(t.heartbeat(failing, t0).expect("ok").role, Role::Slave);
    assert_eq!(t.route(1, t0).map(|(_, s, _)| s).ok(), Some(s(2)));
}

#[test]
fn servers_register_only_in_configured_slots_so_a_flood_cannot_grow_the_table() {
    let t0 = Instant::now();
    let mut t = table(2, t0);
    assert_eq!(t.config().servers, 2, "the default: a master and a slave");
    for (cluster, server) in [(1, 3), (2, 1000), (3, 1)] {
        let refused = t.heartbeat(beat(cluster, server, 10000), t0);
        assert!(
            matches!(refused, Err(Error::InvalidInput(_))),
            "{cluster}/{server}: {refused:?}"
        );
    }
    assert!(t.nodes(t0).is_empty(), "nothing registered");
    // A flood of registrations under every id lands in the four configured slots at most.
    for server in 1..=10_000 {
        for cluster in 1..=3 {
            let _ = t.heartbeat(beat(cluster, server, 10000 + server as u16), t0);
        }
    }
    let nodes = t.nodes(t0);
    assert_eq!(nodes.len(), 4, "{nodes:?}");
    assert!(nodes.iter().all(|n| n.cluster.get() <= 2 && n.id <= 2));

    let wider = RoutingTable::new(
        RoutingConfig {
            clusters: 1,
            servers: 3,
            ..RoutingConfig::default()
        },
        t0,
    );
    let mut wider = wider;
    assert!(wider.heartbeat(beat(1, 3, 10002), t0).is_ok());
    assert!(wider.heartbeat(beat(1, 4, 10003), t0).is_err());
}

#[test]
fn a_cluster_keeps_at_most_four_synchronizers_and_a_dead_one_makes_room() {
    let t0 = Instant::now();
    let mut t = table(3, t0);
    // Cluster 1's synchronizers are 1, 4, 7, 10, 13...
    for id in [1, 4, 7, 10] {
        t.register_sync(id, addr(9000 + id as u16), t0)
            .expect("registered");
    }
    let full = t.register_sync(13, addr(9013), t0);
    assert!(matches!(full, Err(Error::Full(_))), "{full:?}");
    // Other clusters are not affected, and a known one beats on.
    t.register_sync(2, addr(9002), t0).expect("cluster 2");
    t.register_sync(10, addr(9010), t0).expect("a known one");
    // Once 10 is dead (the others beat on), 13 takes its place.
    let later = t0 + RoutingConfig::default().failure_timeout() + Duration::from_millis(1);
    for id in [1, 4, 7] {
        t.register_sync(id, addr(9000 + id as u16), later)
            .expect("beats on");
    }
    t.register_sync(13, addr(9013), later).expect("room made");
    let ids: Vec<u32> = t.nodes(later).iter().map(|n| n.id).collect();
    assert_eq!(ids, [1, 2, 4, 7, 13]);
    // A flood of ids stays within the caps: four per cluster.
    for id in 100..10_100 {
        let _ = t.register_sync(id, addr(9999), later);
    }
    assert_eq!(t.nodes(later).len(), 3 * SYNCHRONIZERS_PER_CLUSTER);
}

#[test]
fn dead_nodes_are_forgotten_after_ten_failure_timeouts_but_their_clusters_epoch_and_master_stay() {
    let t0 = Instant::now();
    let config = RoutingConfig::default();
    assert_eq!(config.forget_after(), config.failure_timeout() * 10);
    let mut t = table(2, t0);
    let epoch = master_and_slave(&mut t, t0, false);
    t.register_sync(1, addr(9001), t0).expect("sync");
    // Cluster 2's server beats on; cluster 1's master, slave and synchronizer fall silent.
    let mut now = t0;
    while now <= t0 + config.forget_after() {
        t.heartbeat(beat(2, 1, 20000), now).expect("beats on");
        let shown: Vec<_> = t.nodes(now).iter().map(|n| (n.cluster, n.id)).collect();
        assert_eq!(shown.len(), 4, "not forgotten before the bound: {shown:?}");
        now += config.heartbeat_interval;
    }
    t.heartbeat(beat(2, 1, 20000), now).expect("beats on");
    let shown: Vec<_> = t.nodes(now).iter().map(|n| (n.cluster, n.id)).collect();
    assert_eq!(shown, [(c(2), 1)], "the dead are forgotten");

    // A server with an empty log coming up in the forgotten master's cluster is not made
    // master: the cluster still knows its master and epoch, and waits for it (or an in-sync
    // slave).
    let empty = t.heartbeat(beat(1, 2, 10001), now).expect("ok");
    assert_eq!(empty.role, Role::Slave);
    assert_eq!(empty.epoch, epoch);
    let later = now + 3 * SEC;
    assert_eq!(
        t.heartbeat(beat(1, 2, 10001), later).expect("ok").role,
        Role::Slave
    );
    assert!(matches!(t.route(1, later), Err(Error::Unavailable(_))));
    // The old master returns claiming its epoch: it is master again, under the same epoch.
    let back = t
        .heartbeat(
            Beat {
                claims_master: true,
                epoch,
                ..beat(1, 1, 10000)
            },
            later,
        )
        .expect("ok");
    assert_eq!(
        back,
        Assignment {
            role: Role::Master,
            epoch
        }
    );
    assert_eq!(t.route(1, later).expect("routed").1, s(1));
}

#[test]
fn an_in_sync_slave_replaces_a_forgotten_master_under_a_new_epoch() {
    let t0 = Instant::now();
    let config = RoutingConfig::default();
    let mut t = table(1, t0);
    let epoch = master_and_slave(&mut t, t0, true);
    // The whole cluster was down past the bound; the slave returns first.
    let later = t0 + config.forget_after() + 2 * config.heartbeat_interval;
    let promoted = t.heartbeat(beat(1, 2, 10001), later).expect("ok");
    assert_eq!(promoted.role, Role::Master);
    assert_eq!(promoted.epoch, Epoch(epoch.0 + 1));
    assert!(
        t.nodes(later).iter().all(|n| n.id == 2),
        "the old master's entry is forgotten"
    );
    // The old master, back with its stale claim, is a slave of its successor.
    let stale = Beat {
        claims_master: true,
        epoch,
        ..beat(1, 1, 10000)
    };
    assert_eq!(t.heartbeat(stale, later).expect("ok").role, Role::Slave);
}

/// The record of `t`'s cluster 1 as stored.
fn stored(t: &RoutingTable) -> (RolesRecord, Revision) {
    let roles = t.roles.get(&c(1)).expect("cluster 1 has roles");
    (roles.record(), roles.revision)
}

#[test]
fn a_coordinator_that_does_not_lead_changes_no_role() {
    let t0 = Instant::now();
    let mut t = table(1, t0);
    let epoch = master_and_slave(&mut t, t0, true);
    let before = stored(&t);
    let later = t0 + RoutingConfig::default().failure_timeout() + Duration::from_millis(1);
    // The master is dead, its slave in sync: a leader would promote it; a follower does not.
    let answer = t.judge(beat(1, 2, 10001), later, false).expect("answered");
    assert_eq!(
        answer,
        Verdict::Answer(Assignment {
            role: Role::Slave,
            epoch
        })
    );
    assert_eq!(stored(&t), before, "the roles are as recorded");
    // The leader's verdict is a write from the recorded revision, not yet applied.
    let Verdict::Write {
        cluster,
        expected,
        record,
        assignment,
    } = t.judge(beat(1, 2, 10001), later, true).expect("judged")
    else {
        panic!("a promotion is a write");
    };
    assert_eq!((cluster, expected), (c(1), before.1));
    assert_eq!(record.master, Some(s(2)));
    assert_eq!(assignment.role, Role::Master);
    assert_eq!(
        stored(&t),
        before,
        "nothing changes before the write is installed"
    );
    t.install(StoredRoles {
        cluster,
        record: record.clone(),
        revision: expected + 1,
    });
    assert_eq!(stored(&t), (record, expected + 1));
}

#[test]
fn a_follower_vouches_for_a_master_only_with_every_recorded_in_sync_slave() {
    let t0 = Instant::now();
    let mut t = table(1, t0);
    let epoch = master_and_slave(&mut t, t0, true);
    let claim = |in_sync: Vec<ServerId>| Beat {
        claims_master: true,
        epoch,
        in_sync,
        ..beat(1, 1, 10000)
    };
    let master = Verdict::Answer(Assignment {
        role: Role::Master,
        epoch,
    });
    assert_eq!(t.judge(claim(vec![s(2)]), t0, false).expect("ok"), master);
    // Dropping its slave from the in-sync set is a change only the leader may record: a
    // follower's answer would tell the master the coordinators know, and they do not.
    let dropped = t.judge(claim(Vec::new()), t0, false);
    assert!(matches!(dropped, Err(Error::Unavailable(_))), "{dropped:?}");
    assert_eq!(stored(&t).0.in_sync, [s(2)].into());
    // A master that stopped claiming is named again under a new epoch by the leader only.
    let unclaimed = t.judge(beat(1, 1, 10000), t0, false);
    assert!(matches!(unclaimed, Err(Error::Unavailable(_))));
}

#[test]
fn a_restarted_coordinator_waits_a_failure_timeout_for_a_recorded_master_it_never_heard() {
    let t0 = Instant::now();
    let mut t = restarted(1, t0);
    let record = RolesRecord {
        epoch: Epoch(4),
        master: Some(s(1)),
        in_sync: [s(2)].into(),
        promotions: 0,
    };
    t.install(StoredRoles {
        cluster: c(1),
        record: record.clone(),
        revision: 9,
    });
    let timeout = RoutingConfig::default().failure_timeout();
    let slave = Beat {
        epoch: Epoch(4),
        ..beat(1, 2, 10001)
    };
    let answer = t.judge(slave.clone(), t0 + timeout, true).expect("ok");
    assert_eq!(
        answer,
        Verdict::Answer(Assignment {
            role: Role::Slave,
            epoch: Epoch(4)
        }),
        "the master had no time to beat to this coordinator yet"
    );
    let later = t0 + timeout + Duration::from_millis(1);
    let verdict = t.judge(slave, later, true).expect("ok");
    assert!(
        matches!(&verdict, Verdict::Write { record, .. } if record.master == Some(s(2))),
        "{verdict:?}"
    );
}

#[test]
fn an_older_record_does_not_replace_a_newer_one() {
    let t0 = Instant::now();
    let mut t = table(1, t0);
    let newer = RolesRecord {
        epoch: Epoch(3),
        master: Some(s(2)),
        ..RolesRecord::default()
    };
    t.install(StoredRoles {
        cluster: c(1),
        record: newer.clone(),
        revision: 7,
    });
    t.install(StoredRoles {
        cluster: c(1),
        record: RolesRecord::default(),
        revision: 5,
    });
    assert_eq!(stored(&t), (newer, 7));
}

#[test]
fn a_beat_naming_impossible_in_sync_slaves_is_refused_and_changes_nothing() {
    let t0 = Instant::now();
    let mut t = table(1, t0);
    let epoch = master_and_slave(&mut t, t0, true);
    let before = stored(&t);
    for in_sync in [vec![s(9)], vec![s(1)]] {
        let claim = Beat {
            claims_master: true,
            epoch,
            in_sync,
            ..beat(1, 1, 10000)
        };
        let refused = t.judge(claim, t0, true);
        assert!(
            matches!(refused, Err(Error::InvalidInput(_))),
            "{refused:?}"
        );
        assert_eq!(stored(&t), before);
    }
}

#[test]
fn with_a_stored_record_a_claim_of_a_newer_epoch_is_not_taken() {
    let t0 = Instant::now();
    let mut t = table(1, t0);
    let epoch = master_and_slave(&mut t, t0, true);
    let before = stored(&t);
    let claim = Beat {
        claims_master: true,
        epoch: Epoch(u64::MAX),
        in_sync: vec![s(2)],
        ..beat(1, 1, 10000)
    };
    let refused = t.judge(claim, t0, true);
    assert!(matches!(refused, Err(Error::Unavailable(_))), "{refused:?}");
    assert_eq!(stored(&t), before);
    assert!(before.0.epoch == epoch);
}
