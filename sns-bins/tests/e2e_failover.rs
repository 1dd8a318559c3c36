//! Failover end to end with real processes: a coordinator, `tsd` masters and their mirroring
//! slaves with data directories, and `tsc` clients, all over loopback TCP. A master is killed
//! with SIGKILL; its in-sync slave is promoted, the clients carry on in the same process, no
//! acknowledged change is lost, and the killed server comes back as slave.

mod support;

use sns_proto::csce438::NodeRole;
use support::{
    Coordinator, Expect, Heartbeat, Tsc, Tsd, WAIT, eventually, free_port, three_clusters,
};

/// Starts `tsc` for `user` through the coordinator and reads its banner.
fn login(coordinator: &Coordinator, user: u32) -> Tsc {
    let tsc = Tsc::via(coordinator.port, user);
    tsc.expect_banner();
    tsc
}

/// Waits for the notices `tsc` prints when its server is lost (at once, before the retry) and
/// once it moved to the server at `addr`.
fn expect_moved_to(tsc: &Tsc, addr: &str) {
    let first = tsc
        .notices
        .until(|l| l.contains("server lost") || l.contains("reconnected"));
    assert_eq!(first, "tsc: server lost; finding the new master...");
    let notice = tsc.notices.until(|l| l.contains("reconnected to"));
    assert!(notice.ends_with(addr), "moved elsewhere: {notice:?}");
}

/// Whether every user of `expected` is in `users`.
fn includes(users: &[u32], expected: &[u32]) -> bool {
    expected.iter().all(|u| users.contains(u))
}

#[test]
fn master_sigkill_promotes_the_slave_and_clients_carry_on() {
    let coordinator = Coordinator::start_with(3, Heartbeat::FAILOVER);
    let data = [tempfile::tempdir(), tempfile::tempdir()].map(|d| d.expect("temp dir"));
    let mut master = Tsd::joined(
        &coordinator,
        1,
        1,
        free_port(),
        data[0].path(),
        Expect::Master,
    );
    let slave = Tsd::joined(
        &coordinator,
        1,
        2,
        free_port(),
        data[1].path(),
        Expect::Slave,
    );
    let before = coordinator.wait_for_role(&slave, NodeRole::Slave);

    // Users 1, 4 and 7 of cluster 1 follow each other; 1 and 4 go to their timelines.
    let mut one = login(&coordinator, 1);
    let mut four = login(&coordinator, 4);
    let mut seven = login(&coordinator, 7);
    one.follow(4);
    one.follow(7);
    four.follow(1);
    seven.follow(1);
    seven.follow(4);
    assert_eq!(seven.list(), (vec![1, 4, 7], vec![1]));
    one.enter_timeline();
    four.enter_timeline();
    four.send("before the kill");
    assert!(one.next_line().ends_with(") >> before the kill"));

    master.kill();

    // The same client processes carry on, on the promoted slave, and every change they were
    // told about is there.
    assert_eq!(seven.list(), (vec![1, 4, 7], vec![1]));
    expect_moved_to(&seven, &slave.addr());
    expect_moved_to(&four, &slave.addr());
    expect_moved_to(&one, &slave.addr());
    four.send("after the kill");
    // Shown once: the post from before the kill is not replayed.
    let next = one.next_line();
    assert!(next.ends_with(") >> after the kill"), "{next:?}");
    let promoted = coordinator.wait_for_role(&slave, NodeRole::Master);
    assert!(
        promoted.epoch > before.epoch,
        "{promoted:?} after {before:?}"
    );
    for tsc in [&one, &four, &seven] {
        assert_eq!(tsc.reconnects(), Vec::<String>::new(), "a second failover");
    }

    // The follower lists of users 1 and 4, from fresh clients.
    assert_eq!(one.finish(), Some(0));
    assert_eq!(four.finish(), Some(0));
    let mut one = login(&coordinator, 1);
    assert_eq!(one.list(), (vec![1, 4, 7], vec![4, 7]));
    let mut four = login(&coordinator, 4);
    assert_eq!(four.list(), (vec![1, 4, 7], vec![1, 7]));

    // The killed server comes back on its data as slave of its successor, and catches up.
    let port = master.port;
    drop(master);
    let returned = Tsd::joined(&coordinator, 1, 1, port, data[0].path(), Expect::Slave);
    let rejoined = coordinator.wait_for_role(&returned, NodeRole::Slave);
    assert_eq!(rejoined.epoch, promoted.epoch);
    assert!(rejoined.in_sync, "{rejoined:?}");
    // Changes made now are mirrored to it too.
    seven.send("UNFOLLOW 4");
    seven.expect_line("Command completed successfully");
    assert_eq!(four.list(), (vec![1, 4, 7], vec![1]));
    coordinator.wait_for_role(&returned, NodeRole::Slave);
}

#[test]
fn mp2_2_resilience_case() {
    let coordinator = Coordinator::start_with(3, Heartbeat::FAILOVER);
    let data = tempfile::tempdir().expect("temp dir");
    let (mut masters, slaves) = three_clusters(&coordinator, data.path());

    // Users 1..4 log in, each on the master of their cluster (user u on ((u - 1) % 3) + 1).
    // Users 1 and 4 share cluster 1 and follow each other; 2 and 3 are alone in theirs.
    let mut one = login(&coordinator, 1);
    let mut two = login(&coordinator, 2);
    let mut three = login(&coordinator, 3);
    let mut four = login(&coordinator, 4);
    one.follow(4);
    four.follow(1);
    let (all, followers) = one.list();
    assert!(includes(&all, &[1, 4]), "{all:?}");
    assert_eq!(followers, [4]);
    let (all, followers) = two.list();
    assert!(includes(&all, &[2]), "{all:?}");
    assert_eq!(followers, Vec::<u32>::new());
    let (all, _) = three.list();
    assert!(includes(&all, &[3]), "{all:?}");
    one.enter_timeline();
    four.enter_timeline();
    one.send("hello from 1");
    assert!(four.next_line().ends_with(") >> hello from 1"));

    // Cluster 2's master dies.
    masters[1].kill();

    // User 2's client carries on, on cluster 2's promoted slave.
    let (all, followers) = two.list();
    assert!(includes(&all, &[2]), "{all:?}");
    assert_eq!(followers, Vec::<u32>::new());
    expect_moved_to(&two, &slaves[1].addr());
    coordinator.wait_for_role(&slaves[1], NodeRole::Master);

    // The other clusters never noticed.
    let (all, _) = three.list();
    assert!(includes(&all, &[3]), "{all:?}");
    four.send("hello from 4");
    assert!(one.next_line().ends_with(") >> hello from 4"));
    for tsc in [&one, &three, &four] {
        assert_eq!(tsc.reconnects(), Vec::<String>::new());
    }

    // Relaunching user 2's client works too, as the course's client would be relaunched.
    assert_eq!(two.finish(), Some(0));
    let mut two = login(&coordinator, 2);
    let (all, _) = two.list();
    assert!(includes(&all, &[2]), "{all:?}");

    // User 5 of cluster 2 logs in after the failover and works with user 2.
    let mut five = login(&coordinator, 5);
    five.follow(2);
    two.follow(5);
    let (all, followers) = five.list();
    assert!(includes(&all, &[2, 5]), "{all:?}");
    assert_eq!(followers, [2]);
    let (all, followers) = two.list();
    assert!(includes(&all, &[2, 5]), "{all:?}");
    assert_eq!(followers, [5]);
    two.enter_timeline();
    five.enter_timeline();
    five.send("hello from 5");
    assert!(two.next_line().ends_with(") >> hello from 5"));
    two.send("hello from 2");
    assert!(five.next_line().ends_with(") >> hello from 2"));
    for tsc in [&two, &five] {
        assert_eq!(tsc.reconnects(), Vec::<String>::new());
    }
}

#[test]
fn servers_started_together_make_server_1_master_even_if_server_2_spoke_first() {
    // Three-second heartbeats: server 1 starts well within the election window that server 2's
    // first heartbeat opened, even on a loaded machine.
    let heartbeat = Heartbeat {
        interval_ms: 3000,
        missed: 2,
    };
    let coordinator = Coordinator::start_with(2, heartbeat);
    let data = [(); 3].map(|()| tempfile::tempdir().expect("temp dir"));
    // The coordinator has been up for longer than one interval: cluster 2's master was named.
    let _other = Tsd::joined(
        &coordinator,
        2,
        1,
        free_port(),
        data[2].path(),
        Expect::Master,
    );
    let two = Tsd::joined(
        &coordinator,
        1,
        2,
        free_port(),
        data[1].path(),
        Expect::Serving,
    );
    // Server 2 has spoken: the coordinator lists it, has heard nothing of server 1 and named
    // no master of cluster 1 yet.
    let mut cluster_1 = Vec::new();
    let heard_two = eventually(WAIT, || {
        cluster_1 = coordinator
            .status()
            .nodes
            .into_iter()
            .filter(|n| n.cluster == 1)
            .collect();
        cluster_1.iter().any(|n| n.server == 2 && n.alive)
    });
    assert!(
        heard_two,
        "the coordinator never heard server 2: {cluster_1:?}"
    );
    assert!(
        cluster_1
            .iter()
            .all(|n| n.server == 2 && n.node_role != i32::from(NodeRole::Master)),
        "server 2 was not first, or was named master alone: {cluster_1:?}"
    );
    let one = Tsd::joined(
        &coordinator,
        1,
        1,
        free_port(),
        data[0].path(),
        Expect::Master,
    );
    coordinator.wait_for_role(&one, NodeRole::Master);
    coordinator.wait_for_role(&two, NodeRole::Slave);
}

#[test]
fn sns_up_makes_server_1_of_every_cluster_master_every_time() {
    for run in 0..20 {
        let data = tempfile::tempdir().expect("temp dir");
        let up = support::SnsUp::start(data.path(), &[]);
        let masters: Vec<(String, String)> = up
            .printed
            .iter()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|cells| cells.get(2) == Some(&"master"))
            .map(|cells| (cells[0].to_string(), cells[1].to_string()))
            .collect();
        assert_eq!(masters.len(), 3, "run {run}: {:?}", up.printed);
        for (cluster, server) in &masters {
            assert_eq!(
                server, "1",
                "run {run}: cluster {cluster}: {:?}",
                up.printed
            );
        }
    }
}
