//! Synchronizers end to end with real processes over loopback TCP: a coordinator, a master and
//! a slave `tsd` per cluster (three clusters, data directories), one `synchronizer` process per
//! cluster, and `tsc` clients. The course's MP2.2 cases: users of different clusters see each
//! other, follow each other and read each other's posts; a master of one cluster dies and the
//! system carries on; synchronizers die and come back without losing or repeating a post. And
//! `sns up --bus grpc`, the same in one process.
//!
//! Every case takes the `--bus` it runs on, so another transport is one more `#[test]` line.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use sns_proto::csce438::NodeRole;
use support::{
    Coordinator, Heartbeat, SnsUp, Synchronizer, Tsc, Tsd, eventually, free_port, parse_post, run,
    three_clusters,
};

/// How long a change may take to reach the other clusters in the MP2.2 case. The course's
/// synchronizers poll files and ask testers to wait 30-60 s; ours push, so a few seconds is
/// already generous.
const CROSS_CLUSTER: Duration = Duration::from_secs(5);

/// Three clusters, each a master and an in-sync slave with data directories, and one
/// synchronizer per cluster (id = cluster) on `bus`.
struct ThreeClusters {
    // Dropped in this order: synchronizers, servers, coordinator, then the data.
    synchronizers: Vec<Synchronizer>,
    masters: Vec<Tsd>,
    slaves: Vec<Tsd>,
    coordinator: Coordinator,
    bus: String,
    _data: tempfile::TempDir,
}

impl ThreeClusters {
    fn start(bus: &str) -> Self {
        let coordinator = Coordinator::start_with(3, Heartbeat::FAILOVER);
        let data = tempfile::tempdir().expect("temp dir");
        let (masters, slaves) = three_clusters(&coordinator, data.path());
        let synchronizers = (1..=3)
            .map(|id| Synchronizer::start(&coordinator, id, free_port(), bus))
            .collect();
        Self {
            synchronizers,
            masters,
            slaves,
            coordinator,
            bus: bus.to_string(),
            _data: data,
        }
    }

    /// Starts `tsc` for `user` through the coordinator and reads its banner.
    fn login(&self, user: u32) -> Tsc {
        let tsc = Tsc::via(self.coordinator.port, user);
        tsc.expect_banner();
        tsc
    }

    /// Kills synchronizer `id` with SIGKILL.
    fn kill_synchronizer(&mut self, id: u32) {
        self.synchronizers[id as usize - 1].kill();
    }

    /// Starts synchronizer `id` again, on the port it had.
    fn restart_synchronizer(&mut self, id: u32) {
        let port = self.synchronizers[id as usize - 1].port;
        self.synchronizers[id as usize - 1] =
            Synchronizer::start(&self.coordinator, id, port, &self.bus);
    }
}

/// Types LIST until `holds(all users, followers)`, for at most `deadline`; returns how long it
/// took. Fails with the last answer otherwise.
fn list_until(
    tsc: &mut Tsc,
    deadline: Duration,
    holds: impl Fn(&[u32], &[u32]) -> bool,
) -> Duration {
    let start = Instant::now();
    let mut last = (Vec::new(), Vec::new());
    let held = eventually(deadline, || {
        last = tsc.list();
        holds(&last.0, &last.1)
    });
    let (all, followers) = last;
    assert!(
        held,
        "not within {deadline:?}: all users {all:?}, followers {followers:?}"
    );
    start.elapsed()
}

/// The next `n` lines of `tsc`, each a well-formed post, as (author, text).
fn next_posts(tsc: &Tsc, n: usize) -> Vec<(u32, String)> {
    (0..n)
        .map(|_| {
            let line = tsc.next_line();
            parse_post(&line).unwrap_or_else(|| panic!("not a post line: {line:?}"))
        })
        .collect()
}

fn others(user: u32) -> Vec<u32> {
    [1, 2, 3].into_iter().filter(|u| *u != user).collect()
}

/// MP2.2: users 1, 2 and 3, one per cluster, see each other, follow each other, and each reads
/// exactly the other two's posts.
fn mp2_2_three_clusters(bus: &str) {
    let system = ThreeClusters::start(bus);
    let mut clients: Vec<Tsc> = (1..=3).map(|u| system.login(u)).collect();

    // Every user learns of every other within seconds.
    for tsc in &mut clients {
        let took = list_until(tsc, CROSS_CLUSTER, |all, _| all == [1, 2, 3]);
        eprintln!("all users listed after {took:?}");
    }

    // Each follows the other two; each then lists the other two as followers.
    for (tsc, user) in clients.iter_mut().zip(1..) {
        for other in others(user) {
            tsc.follow(other);
        }
    }
    for (tsc, user) in clients.iter_mut().zip(1..) {
        let expected = others(user);
        let took = list_until(tsc, CROSS_CLUSTER, |all, followers| {
            all == [1, 2, 3] && followers == expected
        });
        eprintln!("followers of {user} listed after {took:?}");
    }

    // Each enters the timeline and posts a line; each sees exactly the other two's.
    for tsc in &mut clients {
        tsc.enter_timeline();
    }
    let posted = Instant::now();
    for (tsc, user) in clients.iter_mut().zip(1..) {
        tsc.send(&format!("hello from {user}"));
    }
    for (tsc, user) in clients.iter().zip(1..) {
        let got: BTreeSet<_> = next_posts(tsc, 2).into_iter().collect();
        let expected: BTreeSet<_> = others(user)
            .into_iter()
            .map(|o| (o, format!("hello from {o}")))
            .collect();
        assert_eq!(got, expected, "user {user}'s timeline");
    }
    let took = posted.elapsed();
    eprintln!("every post on both other clusters after {took:?}");
    assert!(
        took < CROSS_CLUSTER,
        "posts took {took:?} to cross clusters"
    );

    // Nothing of their own, nothing twice: a user's own post would have reached its timeline
    // before the others' second posts (its server committed it first), so the next two lines
    // are exactly those.
    for (tsc, user) in clients.iter_mut().zip(1..) {
        tsc.send(&format!("second from {user}"));
    }
    for (tsc, user) in clients.iter().zip(1..) {
        let got: BTreeSet<_> = next_posts(tsc, 2).into_iter().collect();
        let expected: BTreeSet<_> = others(user)
            .into_iter()
            .map(|o| (o, format!("second from {o}")))
            .collect();
        assert_eq!(got, expected, "user {user}'s timeline");
        assert_eq!(tsc.drain_lines(), Vec::<String>::new());
    }
    for tsc in &clients {
        assert_eq!(tsc.reconnects(), Vec::<String>::new());
    }
}

#[test]
fn mp2_2_three_clusters_see_follow_and_read_each_other_over_grpc() {
    mp2_2_three_clusters("grpc");
}

/// Runs `case` over RabbitMQ, on an exchange and queues of the test's own (deleted after), with
/// the synchronizers' cursors in a temporary directory; skipped without a broker.
fn over_rabbitmq(test: &str, case: fn(&str)) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let Some(broker) = runtime.block_on(sns_core::testing::amqp_broker(test)) else {
        return;
    };
    let cursors = tempfile::tempdir().expect("temp dir");
    let dir = cursors.path().display().to_string();
    support::more_synchronizer_args(&["--amqp-prefix", broker.prefix(), "--data-dir", &dir]);
    case(broker.url());
    drop(broker);
}

#[test]
fn mp2_2_three_clusters_see_follow_and_read_each_other_over_rabbitmq() {
    over_rabbitmq(
        "mp2_2_three_clusters_see_follow_and_read_each_other_over_rabbitmq",
        mp2_2_three_clusters,
    );
}

#[test]
fn a_master_sigkill_on_one_cluster_leaves_the_others_and_new_users_working_over_rabbitmq() {
    over_rabbitmq(
        "a_master_sigkill_on_one_cluster_leaves_the_others_and_new_users_working_over_rabbitmq",
        resilience_across_clusters,
    );
}

#[test]
fn synchronizers_killed_and_restarted_while_posts_flow_lose_and_repeat_nothing_over_rabbitmq() {
    over_rabbitmq(
        "synchronizers_killed_and_restarted_while_posts_flow_lose_and_repeat_nothing_over_rabbitmq",
        synchronizer_restarts_while_posts_flow,
    );
}

#[test]
fn mp2_2_three_clusters_see_follow_and_read_each_other_over_local() {
    mp2_2_three_clusters("local");
}

/// MP2.2 resilience across clusters: cluster 2's master dies; a new user of cluster 2 and
/// user 1 of cluster 1 find, follow and read each other; user 2's client carries on.
fn resilience_across_clusters(bus: &str) {
    let mut system = ThreeClusters::start(bus);
    let mut one = system.login(1);
    let mut two = system.login(2);
    let mut three = system.login(3);
    for tsc in [&mut one, &mut two, &mut three] {
        list_until(tsc, support::WAIT, |all, _| all == [1, 2, 3]);
    }
    two.follow(1);
    list_until(&mut one, support::WAIT, |_, followers| followers == [2]);

    // Cluster 2's master dies.
    system.masters[1].kill();

    // User 2's client carries on, on the promoted slave, with everything it had.
    assert_eq!(two.list(), (vec![1, 2, 3], vec![]));
    let notice = two.notices.until(|l| l.contains("reconnected to"));
    assert!(notice.ends_with(&system.slaves[1].addr()), "{notice:?}");
    system
        .coordinator
        .wait_for_role(&system.slaves[1], NodeRole::Master);

    // User 5 (cluster 2) logs in and follows user 1, who learns of 5 and of the follow.
    let mut five = system.login(5);
    five.follow(1);
    list_until(&mut one, support::WAIT, |all, followers| {
        all == [1, 2, 3, 5] && followers == [2, 5]
    });
    one.follow(5);
    list_until(&mut five, support::WAIT, |all, followers| {
        all == [1, 2, 3, 5] && followers == [1]
    });

    // 5's posts reach 1; 1's reach 2 and 5.
    one.enter_timeline();
    two.enter_timeline();
    five.enter_timeline();
    five.send("hello from 5");
    assert_eq!(next_posts(&one, 1), [(5, "hello from 5".to_string())]);
    one.send("hello from 1");
    assert_eq!(next_posts(&five, 1), [(1, "hello from 1".to_string())]);
    assert_eq!(next_posts(&two, 1), [(1, "hello from 1".to_string())]);

    // Only user 2's client had to move, once.
    for tsc in [&one, &two, &three, &five] {
        assert_eq!(tsc.reconnects(), Vec::<String>::new());
    }
    assert_eq!(three.list(), (vec![1, 2, 3, 5], vec![]));
}

#[test]
fn a_master_sigkill_on_one_cluster_leaves_the_others_and_new_users_working_over_grpc() {
    resilience_across_clusters("grpc");
}

#[test]
fn a_master_sigkill_on_one_cluster_leaves_the_others_and_new_users_working_over_local() {
    resilience_across_clusters("local");
}

/// Types the next `n` numbered posts of user 1 on `one`, adds them to `sent`, and returns them.
fn post(one: &mut Tsc, sent: &mut Vec<(u32, String)>, n: usize) -> Vec<(u32, String)> {
    let first = sent.len() + 1;
    for i in first..first + n {
        let text = format!("post {i}");
        one.send(&text);
        sent.push((1, text));
    }
    sent[first - 1..].to_vec()
}

/// Synchronizers are SIGKILLed and restarted while user 1 (cluster 1) posts: the origin's
/// synchronizer, then a consuming cluster's. User 4 (cluster 1, no synchronizer involved) shows
/// when posts are committed at the origin. Followers on clusters 2 and 3 get every post once, in
/// order, including those made while a synchronizer was down; a cluster whose synchronizer runs
/// keeps getting posts while another's is down.
fn synchronizer_restarts_while_posts_flow(bus: &str) {
    let mut system = ThreeClusters::start(bus);
    let mut one = system.login(1);
    let mut two = system.login(2);
    let mut three = system.login(3);
    let mut four = system.login(4);
    for tsc in [&mut two, &mut three] {
        list_until(tsc, support::WAIT, |all, _| all == [1, 2, 3, 4]);
        tsc.follow(1);
    }
    four.follow(1);
    list_until(&mut one, support::WAIT, |_, followers| {
        followers == [2, 3, 4]
    });
    for tsc in [&mut one, &mut two, &mut three, &mut four] {
        tsc.enter_timeline();
    }

    let mut sent = Vec::new();

    // The origin's synchronizer dies while posts flow; more are made while it is down.
    let mut at_origin = post(&mut one, &mut sent, 10);
    system.kill_synchronizer(1);
    at_origin.extend(post(&mut one, &mut sent, 10));
    assert_eq!(next_posts(&four, at_origin.len()), at_origin);
    system.restart_synchronizer(1);

    // Then cluster 2's, which applies cluster 1's posts there; cluster 3 does not wait for it.
    let mut at_origin = post(&mut one, &mut sent, 10);
    system.kill_synchronizer(2);
    at_origin.extend(post(&mut one, &mut sent, 10));
    assert_eq!(next_posts(&four, at_origin.len()), at_origin);
    assert_eq!(next_posts(&three, sent.len()), sent);
    system.restart_synchronizer(2);
    let last = post(&mut one, &mut sent, 10);
    assert_eq!(next_posts(&four, last.len()), last);
    assert_eq!(next_posts(&three, last.len()), last);
    assert_eq!(next_posts(&two, sent.len()), sent);

    // Nothing comes twice: a repeat would arrive before a post made after all of them.
    one.send("the end");
    for tsc in [&two, &three, &four] {
        assert_eq!(next_posts(tsc, 1), [(1, "the end".to_string())]);
        assert_eq!(tsc.drain_lines(), Vec::<String>::new());
    }
    for tsc in [&one, &two, &three, &four] {
        assert_eq!(tsc.reconnects(), Vec::<String>::new());
    }
}

#[test]
fn synchronizers_killed_and_restarted_while_posts_flow_lose_and_repeat_nothing_over_grpc() {
    synchronizer_restarts_while_posts_flow("grpc");
}

#[test]
fn synchronizers_killed_and_restarted_while_posts_flow_lose_and_repeat_nothing_over_local() {
    synchronizer_restarts_while_posts_flow("local");
}

/// `sns up --bus BUS`: prints a row per synchronizer, carries a follow and a post from cluster
/// 2 to cluster 1, and stops with exit code 0 on Ctrl-C.
fn sns_up_with_bus(bus: &str) {
    let data = tempfile::tempdir().expect("temp dir");
    let mut up = SnsUp::start(data.path(), &["--bus", bus]);
    let printed = up.printed.join("\n");
    let header = up
        .printed
        .iter()
        .position(|l| {
            l.split_whitespace().collect::<Vec<_>>() == ["CLUSTER", "SYNC", "BUS", "ADDRESS"]
        })
        .unwrap_or_else(|| panic!("no synchronizer table in\n{printed}"));
    let rows: Vec<Vec<&str>> = up.printed[header + 1..]
        .iter()
        .take_while(|l| !l.is_empty())
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 3, "{printed}");
    for (row, cluster) in rows.iter().zip(1..) {
        assert_eq!(
            row[..3],
            [cluster.to_string(), cluster.to_string(), bus.to_string()]
        );
        if bus == "grpc" {
            let port: u16 = row[3]
                .strip_prefix("127.0.0.1:")
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("no address in {row:?}"));
            assert_ne!(port, 0);
        }
    }

    let mut two = Tsc::via(up.port, 2);
    two.expect_banner();
    let mut one = Tsc::via(up.port, 1);
    one.expect_banner();
    list_until(&mut one, support::WAIT, |all, _| all == [1, 2]);
    one.follow(2);
    one.enter_timeline();
    two.enter_timeline();
    two.send("from cluster 2");
    assert_eq!(next_posts(&one, 1), [(2, "from cluster 2".to_string())]);

    if bus == "grpc" {
        // The coordinator lists each synchronizer alive at the address the table printed.
        let mut stdout = String::new();
        let listed = support::eventually(support::WAIT, || {
            let (code, out, stderr) = run(
                env!("CARGO_BIN_EXE_sns"),
                &[
                    "status",
                    "-h",
                    "127.0.0.1",
                    "-k",
                    &up.port.to_string(),
                    "--data-dir",
                    &data.path().display().to_string(),
                ],
            );
            assert_eq!(code, Some(0), "{stderr}");
            stdout = out;
            rows.iter().all(|row| {
                stdout.lines().any(|l| {
                    let cells: Vec<&str> = l.split_whitespace().collect();
                    cells.len() > 4 && cells[..5] == [row[0], row[1], "synchronizer", row[3], "yes"]
                })
            })
        });
        assert!(listed, "{stdout}");
    }

    drop((one, two));
    assert_eq!(up.signal_and_wait("INT"), Some(0));
}

#[test]
fn sns_up_with_the_grpc_bus_lists_its_synchronizers_and_syncs_clusters() {
    sns_up_with_bus("grpc");
}

#[test]
fn sns_up_with_the_local_bus_lists_its_synchronizers_and_syncs_clusters() {
    sns_up_with_bus("local");
}

#[test]
fn a_synchronizer_serves_its_cluster_and_stops_cleanly_on_a_signal() {
    let coordinator = Coordinator::start(3);
    for (id, signal) in [(5, "INT"), (3, "TERM")] {
        let mut synchronizer = Synchronizer::start(&coordinator, id, free_port(), "grpc");
        let cluster = (id - 1) % 3 + 1;
        // One log line says what it serves and where.
        let serving = &synchronizer.serving;
        let says = format!(
            "synchronizer serving cluster {cluster}: sns.v1.Sync on 127.0.0.1:{}",
            synchronizer.port
        );
        assert!(serving.contains(&says), "{serving}");
        let listed = support::eventually(support::WAIT, || {
            coordinator.status().nodes.iter().any(|n| {
                n.node_role == i32::from(NodeRole::Synchronizer)
                    && n.server == id
                    && n.cluster == cluster
                    && n.alive
                    && n.port == synchronizer.port.to_string()
            })
        });
        assert!(listed, "synchronizer {id} not listed alive");
        assert_eq!(synchronizer.signal_and_wait(signal), Some(0));
    }
}

#[test]
fn synchronizer_flags_are_checked_with_one_clear_error() {
    let synchronizer = env!("CARGO_BIN_EXE_synchronizer");
    // A RabbitMQ URL over TLS: not supported; the password is not repeated.
    let (code, _, stderr) = run(
        synchronizer,
        &[
            "-i",
            "1",
            "-p",
            "0",
            "--bus",
            "amqps://guest:s3cret@127.0.0.1:5671/%2f",
        ],
    );
    assert_eq!(code, Some(2));
    assert!(stderr.contains("only amqp://"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "{stderr}");
    // The gRPC bus needs a port; ids start at 1; buses have names.
    for (args, says) in [
        (&["-i", "1"][..], "-p PORT"),
        (&["-i", "0", "-p", "0"][..], "0 is not in 1.."),
        (
            &["-i", "1", "-p", "0", "--bus", "carrier-pigeon"][..],
            "unknown bus",
        ),
        (&["-i", "x", "-p", "0"][..], "invalid digit"),
    ] {
        let (code, stdout, stderr) = run(synchronizer, args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stdout.is_empty());
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert!(
            stderr.lines().next().is_some_and(|l| l.contains(says)),
            "{stderr}"
        );
    }
    // A port in use: one line naming it, exit code 1.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port().to_string();
    let (code, _, stderr) = run(
        synchronizer,
        &["-i", "1", "-p", &port, "--bind", "127.0.0.1", "-k", "1"],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.lines().any(|l| l.starts_with("synchronizer: ")
            && l.ends_with(&format!("port {port} is already in use"))),
        "{stderr}"
    );
}
