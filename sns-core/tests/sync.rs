//! Synchronizers: users, follow relations and posts cross clusters, over every transport (the
//! RabbitMQ cases with the `amqp` feature and a broker).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use proptest::prelude::*;

#[cfg(feature = "amqp")]
use sns_core::QueueType;
use sns_core::event::OriginImage;
#[cfg(feature = "amqp")]
use sns_core::testing::amqp_broker;
use sns_core::testing::{TestCluster, TestClusterConfig, eventually};
use sns_core::{
    Bus, ClusterId, Error, Event, EventId, EventKind, Role, Server, State, Timestamp, UserId,
};
use std::sync::Arc;

const WAIT: Duration = Duration::from_secs(10);

fn u(id: u32) -> UserId {
    UserId::new(id).expect("valid user")
}

async fn start(bus: Bus) -> TestCluster {
    let mut config = TestClusterConfig::default();
    config.bus = bus;
    // The clients of these cases stay with the server they logged in to: heartbeats slower
    // than the default keep a loaded machine (a broker starting queues on the same two
    // cores) from promoting slaves under them.
    config.heartbeat_interval = Duration::from_millis(500);
    TestCluster::start_with(config).await.expect("start")
}

/// The suite every transport runs: one `#[tokio::test]` per (case, transport) below calls it.
#[tokio::test]
async fn local_users_follows_and_posts_cross_clusters() {
    users_follows_and_posts_cross_clusters(Bus::Local).await;
}

#[tokio::test]
async fn grpc_users_follows_and_posts_cross_clusters() {
    users_follows_and_posts_cross_clusters(Bus::Grpc).await;
}

#[cfg(feature = "amqp")]
#[tokio::test]
async fn amqp_users_follows_and_posts_cross_clusters() {
    let Some(broker) = amqp_broker("amqp_users_follows_and_posts_cross_clusters").await else {
        return;
    };
    users_follows_and_posts_cross_clusters(broker.bus(QueueType::Quorum)).await;
}

#[cfg(feature = "amqp")]
#[tokio::test]
async fn amqp_classic_users_follows_and_posts_cross_clusters() {
    let Some(broker) = amqp_broker("amqp_classic_users_follows_and_posts_cross_clusters").await
    else {
        return;
    };
    users_follows_and_posts_cross_clusters(broker.bus(QueueType::Classic)).await;
}

async fn users_follows_and_posts_cross_clusters(bus: Bus) {
    let cluster = start(bus).await;
    let one = cluster.client(1).await.expect("client 1");
    let two = cluster.client(2).await.expect("client 2");
    let three = cluster.client(3).await.expect("client 3");
    for (cluster, client) in [(1, &one), (2, &two), (3, &three)] {
        assert!(
            eventually(WAIT, || async {
                client
                    .list()
                    .await
                    .is_ok_and(|l| l.all_users == [u(1), u(2), u(3)])
            })
            .await,
            "cluster {cluster} learns every user"
        );
    }
    one.follow(u(2)).await.expect("cross-cluster follow");
    three.follow(u(2)).await.expect("cross-cluster follow");
    assert!(
        eventually(WAIT, || async {
            two.list().await.is_ok_and(|l| l.followers == [u(1), u(3)])
        })
        .await,
        "cluster 2 learns its user's followers"
    );
    let (_p1, mut feed1) = one.timeline().await.expect("timeline 1");
    let (_p3, mut feed3) = three.timeline().await.expect("timeline 3");
    let (post2, _f2) = two.timeline().await.expect("timeline 2");
    post2.post("hello from cluster 2").await.expect("post");
    for feed in [&mut feed1, &mut feed3] {
        let got = tokio::time::timeout(WAIT, feed.next())
            .await
            .expect("in time")
            .expect("a post")
            .expect("ok");
        assert_eq!(got.text, "hello from cluster 2");
        assert_eq!(got.author, u(2));
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn local_failover_during_sync_loses_nothing() {
    failover_during_sync(Bus::Local).await;
}

#[tokio::test]
async fn grpc_failover_during_sync_loses_nothing() {
    failover_during_sync(Bus::Grpc).await;
}

#[cfg(feature = "amqp")]
#[tokio::test]
async fn amqp_failover_during_sync_loses_nothing() {
    let Some(broker) = amqp_broker("amqp_failover_during_sync_loses_nothing").await else {
        return;
    };
    failover_during_sync(broker.bus(QueueType::Quorum)).await;
}

/// Posts of users 2 (cluster 2) and 3 (cluster 3) stream to their follower, user 1 (cluster 1),
/// while cluster 1's master and then cluster 2's master crash (simulated disks: unsynced writes
/// are lost). Every acknowledged post reaches user 1's timeline on the new master, once.
async fn failover_during_sync(bus: Bus) {
    const POSTS: usize = 120;
    let mut config = TestClusterConfig::default();
    config.bus = bus;
    config.simulated_disks = true;
    let mut cluster = TestCluster::start_with(config).await.expect("start");
    for user in 1..=3 {
        let server = master(&cluster, user).expect("master");
        server.login(u(user)).await.expect("login");
    }
    let one = master(&cluster, 1).expect("master");
    assert!(
        eventually(WAIT, || async {
            one.list(u(1)).is_ok_and(|l| l.all_users.len() == 3)
        })
        .await
    );
    one.follow(u(1), "2").await.expect("follow 2");
    one.follow(u(1), "3").await.expect("follow 3");

    // One writer per author, each posting on whichever server of its cluster is master.
    let writer = |user: u32| {
        let servers: Vec<Server> = (1..=2)
            .filter_map(|s| cluster.server(user, s).cloned())
            .collect();
        tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for n in 0..POSTS {
                let text = format!("{user}:{n}");
                let deadline = tokio::time::Instant::now() + WAIT;
                loop {
                    // A crashed master still says it is master: try every one that does.
                    let mut outcome = Err(Error::Unavailable("no master".into()));
                    for master in servers.iter().filter(|s| s.role() == Role::Master) {
                        outcome = master.post(u(user), text.as_bytes()).await;
                        if outcome.is_ok() {
                            break;
                        }
                    }
                    match outcome {
                        Ok(_) => {
                            acknowledged.push(text);
                            break;
                        }
                        Err(_) if tokio::time::Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Err(e) => panic!("post {text} never accepted: {e}"),
                    }
                }
            }
            acknowledged
        })
    };
    let writers = [writer(2), writer(3)];
    let delivered_count = |cluster: &TestCluster| {
        master(cluster, 1).map_or(0, |m| m.recent_posts(u(1)).map_or(0, |p| p.len()))
    };
    // Crash the receiving cluster's master once posts flow in, then the origin's; each once
    // the coordinator knows its slave is in sync (a slave not known to be in sync is never
    // promoted: the cluster would rightly wait for its crashed master).
    assert!(eventually(WAIT, || async { delivered_count(&cluster) >= 10 }).await);
    let receiver = (1..=2).find(|s| {
        cluster
            .server(1, *s)
            .is_some_and(|x| x.role() == Role::Master)
    });
    slave_in_sync(&cluster, 1).await;
    cluster
        .crash(1, receiver.expect("master of 1"))
        .await
        .expect("crash");
    let origin = (1..=2).find(|s| {
        cluster
            .server(2, *s)
            .is_some_and(|x| x.role() == Role::Master)
    });
    slave_in_sync(&cluster, 2).await;
    cluster
        .crash(2, origin.expect("master of 2"))
        .await
        .expect("crash");
    let mut acknowledged = BTreeSet::new();
    for writer in writers {
        acknowledged.extend(writer.await.expect("writer"));
    }
    assert_eq!(acknowledged.len(), 2 * POSTS);
    let all_in = eventually(WAIT, || async {
        master(&cluster, 1).is_some_and(|m| {
            let (_, state) = m.committed_state();
            let texts: BTreeSet<String> = state
                .recent_timeline(u(1), usize::MAX)
                .iter()
                .map(|p| p.text.to_string())
                .collect();
            acknowledged.is_subset(&texts)
        })
    })
    .await;
    assert!(
        all_in,
        "every acknowledged post reaches the follower after both failovers"
    );
    let m = master(&cluster, 1).expect("master");
    let timeline = m.committed_state().1.recent_timeline(u(1), usize::MAX);
    let ids: BTreeSet<_> = timeline.iter().map(|p| p.id).collect();
    assert_eq!(ids.len(), timeline.len(), "no post twice");
    cluster.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Convergence under random histories (proptest), per transport.

/// Users 1..=6: two per cluster of three.
const USERS: u32 = 6;
const CLUSTERS: u32 = 3;

#[derive(Debug, Clone)]
enum Op {
    Follow(u32, u32),
    Unfollow(u32, u32),
    Post(u32),
    RestartSynchronizer(u32),
    /// Another cluster's event that its origin may not send, offered to `target`'s master as
    /// if `origin` had sent it, with `origin`'s next sequence number there.
    Hostile {
        target: u32,
        origin: u32,
        kind: u8,
    },
}

/// The forged event `kind` (0 to 4) of `origin`, offered to `target` as `origin`'s event `seq`.
fn hostile(target: u32, origin: u32, kind: u8, seq: u64) -> Event {
    let local = u(target);
    let (at, kind) = match kind {
        0 => (
            Timestamp::now(),
            EventKind::Posted {
                author: local,
                text: Arc::from("a post its author never wrote"),
                key: None,
            },
        ),
        1 => (
            Timestamp::now(),
            EventKind::Unfollowed {
                follower: local,
                followee: u(origin),
            },
        ),
        2 => (
            Timestamp::now(),
            EventKind::Followed {
                follower: local,
                followee: u(origin),
            },
        ),
        3 => (
            Timestamp::now(),
            EventKind::Image(Arc::new(OriginImage {
                users: vec![u(origin), local],
                ..OriginImage::default()
            })),
        ),
        // Its own user's post, from a clock a day ahead.
        _ => (
            Timestamp(Timestamp::now().0 + 86_400_000_000),
            EventKind::Posted {
                author: u(origin),
                text: Arc::from("from tomorrow"),
                key: None,
            },
        ),
    };
    Event {
        id: EventId {
            origin: c(origin),
            seq,
        },
        at,
        kind,
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1..=USERS, 1..=USERS).prop_map(|(a, b)| Op::Follow(a, b)),
        2 => (1..=USERS, 1..=USERS).prop_map(|(a, b)| Op::Unfollow(a, b)),
        5 => (1..=USERS).prop_map(Op::Post),
        1 => (1..=CLUSTERS).prop_map(Op::RestartSynchronizer),
        2 => (1..=CLUSTERS, 1..CLUSTERS, 0u8..5).prop_map(|(target, d, kind)| Op::Hostile {
            target,
            origin: (target - 1 + d) % CLUSTERS + 1,
            kind,
        }),
    ]
}

/// Clock offsets per cluster: none half of the time, else up to ±2 s each.
fn skew() -> impl Strategy<Value = Vec<i64>> {
    prop_oneof![
        Just(vec![0; CLUSTERS as usize]),
        proptest::collection::vec(-2_000_000i64..2_000_000, CLUSTERS as usize),
    ]
}

/// The server of cluster `c` that acts as master, if any.
/// Waits until the coordinator knows a live slave of cluster `c` in sync with its master.
async fn slave_in_sync(cluster: &TestCluster, c: u32) {
    let known = eventually(WAIT, || {
        let now = tokio::time::Instant::now();
        let nodes = cluster.deployment().coordinator().table().nodes(now);
        let ok = nodes
            .iter()
            .any(|n| n.cluster.get() == c && n.in_sync && n.alive && n.role == Some(Role::Slave));
        async move { ok }
    })
    .await;
    assert!(known, "cluster {c} has no slave in sync");
}

fn master(cluster: &TestCluster, c: u32) -> Option<Server> {
    (1..=2)
        .filter_map(|s| cluster.server(c, s))
        .find(|s| s.role() == Role::Master)
        .cloned()
}

fn home(user: u32) -> u32 {
    (user - 1) % CLUSTERS + 1
}

fn c(id: u32) -> ClusterId {
    ClusterId::new(id).expect("cluster")
}

/// Runs `ops` on a fresh three-cluster deployment over `bus` and checks that every server
/// converges to the model's users and follows, that masters and slaves are identical, and that
/// every timeline holds exactly the posts it should.
async fn converges(bus: Bus, ops: Vec<Op>, offsets: Vec<i64>) {
    let mut config = TestClusterConfig::default();
    config.bus = bus;
    config.clock_offsets_micros = offsets.clone();
    let mut cluster = TestCluster::start_with(config).await.expect("start");
    for user in 1..=USERS {
        let server = master(&cluster, home(user)).expect("master");
        server.login(u(user)).await.expect("login");
    }
    let everyone: Vec<UserId> = (1..=USERS).map(u).collect();
    assert!(
        eventually(WAIT, || async {
            (1..=CLUSTERS).all(|k| {
                master(&cluster, k)
                    .is_some_and(|m| m.list(u(k)).is_ok_and(|l| l.all_users == everyone))
            })
        })
        .await,
        "every cluster learns every user"
    );

    let mut follows: BTreeSet<(u32, u32)> = BTreeSet::new();
    // Per follower, the posts an exact model expects (clock skew aside): by followed authors,
    // made after the follow began.
    let mut expected: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
    for (n, op) in ops.into_iter().enumerate() {
        match op {
            Op::Follow(a, b) => {
                let server = master(&cluster, home(a)).expect("master");
                let result = server.follow(u(a), &b.to_string()).await;
                match () {
                    () if a == b => assert!(matches!(result, Err(Error::SameClient)), "{result:?}"),
                    () if follows.contains(&(a, b)) => {
                        assert!(matches!(result, Err(Error::AlreadyFollowing)), "{result:?}");
                    }
                    () => {
                        result.expect("follow");
                        follows.insert((a, b));
                    }
                }
            }
            Op::Unfollow(a, b) => {
                let server = master(&cluster, home(a)).expect("master");
                let result = server.unfollow(u(a), &b.to_string()).await;
                match () {
                    () if a == b => assert!(matches!(result, Err(Error::SameClient)), "{result:?}"),
                    () if !follows.contains(&(a, b)) => {
                        assert!(matches!(result, Err(Error::NotFollowing)), "{result:?}");
                    }
                    () => {
                        result.expect("unfollow");
                        follows.remove(&(a, b));
                        // Unfollowing removes the author's posts from the timeline.
                        if let Some(posts) = expected.get_mut(&a) {
                            posts.retain(|text| !text.starts_with(&format!("{b}:")));
                        }
                    }
                }
            }
            Op::Post(a) => {
                let text = format!("{a}:post {n}");
                let server = master(&cluster, home(a)).expect("master");
                server.post(u(a), text.as_bytes()).await.expect("post");
                for (follower, _) in follows.iter().filter(|(_, b)| *b == a) {
                    expected.entry(*follower).or_default().insert(text.clone());
                }
            }
            Op::RestartSynchronizer(k) => {
                cluster
                    .restart_synchronizer(k)
                    .await
                    .expect("restart synchronizer");
            }
            Op::Hostile {
                target,
                origin,
                kind,
            } => {
                let server = master(&cluster, target).expect("master");
                let next = server
                    .high_water()
                    .expect("marks")
                    .get(&c(origin))
                    .copied()
                    .unwrap_or(0)
                    + 1;
                let forged = hostile(target, origin, kind, next);
                let refused = server.apply_remote(vec![forged.clone()]).await;
                assert!(
                    matches!(refused, Err(Error::InvalidInput(_))),
                    "{forged:?}: {refused:?}"
                );
            }
        }
    }

    // Converged: every master has every origin's events, every slave has its master's.
    let converged = eventually(WAIT, || async {
        let masters: Vec<Server> = (1..=CLUSTERS).filter_map(|k| master(&cluster, k)).collect();
        if masters.len() != CLUSTERS as usize {
            return false;
        }
        let own: Vec<u64> = masters
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.high_water()
                    .expect("marks")
                    .get(&c(i as u32 + 1))
                    .copied()
                    .unwrap_or(0)
            })
            .collect();
        masters.iter().enumerate().all(|(i, m)| {
            let marks = m.high_water().expect("marks");
            let commit = m.positions().commit;
            let k = i as u32 + 1;
            own.iter()
                .enumerate()
                .all(|(o, seq)| marks.get(&c(o as u32 + 1)).copied().unwrap_or(0) == *seq)
                && (1..=2).all(|s| {
                    cluster
                        .server(k, s)
                        .is_some_and(|x| x.positions().commit == commit)
                })
        })
    })
    .await;
    assert!(converged, "clusters converge");

    // Every origin's own events, from its master: the reference every cluster must fold to.
    let mut origins = Vec::new();
    for k in 1..=CLUSTERS {
        let m = master(&cluster, k).expect("master");
        let last = m
            .high_water()
            .expect("marks")
            .get(&c(k))
            .copied()
            .unwrap_or(0);
        let mut feed = m.own_events_after(0, None).await.expect("own events");
        let mut events = Vec::new();
        while (events.len() as u64) < last {
            let batch = tokio::time::timeout(WAIT, feed.next_batch(256))
                .await
                .expect("in time")
                .expect("read")
                .expect("running");
            events.extend(batch);
        }
        origins.push(events);
    }

    let model_following = |a: u32| -> Vec<UserId> {
        follows
            .iter()
            .filter(|(f, _)| *f == a)
            .map(|(_, b)| u(*b))
            .collect()
    };
    let no_skew = offsets.iter().all(|o| *o == 0);
    for k in 1..=CLUSTERS {
        let m = master(&cluster, k).expect("master");
        let (_, state) = m.committed_state();
        let mut reference = State::new(m.config().state_config());
        for events in &origins {
            for event in events {
                reference.apply(event);
            }
        }
        for s in 1..=2 {
            let server = cluster.server(k, s).expect("running");
            let (_, other) = server.committed_state();
            assert_eq!(
                other, state,
                "cluster {k}: master and slave hold the same state"
            );
            assert_eq!(
                other.users().collect::<Vec<_>>(),
                everyone,
                "cluster {k} server {s} users"
            );
            for a in 1..=USERS {
                assert_eq!(
                    other.following(u(a)).collect::<Vec<_>>(),
                    model_following(a),
                    "cluster {k} server {s}: whom {a} follows"
                );
            }
        }
        for a in (1..=USERS).filter(|a| home(*a) == k) {
            let timeline = state.recent_timeline(u(a), usize::MAX);
            let ids: BTreeSet<_> = timeline.iter().map(|p| p.id).collect();
            assert_eq!(ids.len(), timeline.len(), "user {a}: no post twice");
            assert_eq!(
                timeline,
                reference.recent_timeline(u(a), usize::MAX),
                "user {a}: the timeline its cluster should hold"
            );
            if no_skew {
                let texts: BTreeSet<String> = timeline.iter().map(|p| p.text.to_string()).collect();
                assert_eq!(
                    texts,
                    expected.remove(&a).unwrap_or_default(),
                    "user {a}'s posts"
                );
            }
        }
    }
    cluster.shutdown().await;
}

/// A runtime for one proptest case.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// [`converges`] over RabbitMQ, on queues of their own (skipped without a broker).
#[cfg(feature = "amqp")]
fn run_converges_amqp(ops: Vec<Op>, offsets: Vec<i64>) {
    runtime().block_on(async {
        let Some(broker) = amqp_broker("amqp_random_histories_converge").await else {
            return;
        };
        converges(broker.bus(QueueType::Quorum), ops, offsets).await;
    });
}

fn run_converges(bus: Bus, ops: Vec<Op>, offsets: Vec<i64>) {
    runtime().block_on(converges(bus, ops, offsets));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn local_random_histories_converge(ops in proptest::collection::vec(op(), 1..40), offsets in skew()) {
        run_converges(Bus::Local, ops, offsets);
    }

    #[test]
    fn grpc_random_histories_converge(ops in proptest::collection::vec(op(), 1..40), offsets in skew()) {
        run_converges(Bus::Grpc, ops, offsets);
    }

    #[cfg(feature = "amqp")]
    #[test]
    fn amqp_random_histories_converge(ops in proptest::collection::vec(op(), 1..40), offsets in skew()) {
        run_converges_amqp(ops, offsets);
    }
}
