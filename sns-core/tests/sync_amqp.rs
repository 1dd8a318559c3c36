//! The RabbitMQ transport against a real broker (`SNS_AMQP_URL`; skipped without it): broker
//! connections closed and a synchronizer restarted while posts flow, redelivered and garbage
//! messages, forged messages (unsigned, badly signed, far ahead), a purged queue, a gap, and
//! both queue types.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sns_core::sync::amqp::REPAIR_PATIENCE;
use sns_core::sync::seal::{open_bytes, seal_bytes};
use sns_core::sync::{
    AmqpBus, AmqpStats, CursorStore, RefusalCounts, SyncKey, SyncTransport, encode_batch,
};
use tokio_util::sync::CancellationToken;

use sns_core::deployment::{server_node, synchronizer_node};
use sns_core::testing::{TestCluster, TestClusterConfig, amqp_broker, eventually};
use sns_core::{
    Bus, ClusterId, Data, Error, Event, EventId, EventKind, PostKey, QueueType, Role, Server,
    ServerId, Synchronizer, SynchronizerConfig, Timestamp, UserId,
};

const WAIT: Duration = Duration::from_secs(20);
const TOKEN: &str = "s3cret";
/// Longest wait for one call to a master before asking again (it may have lost its role).
const CALL: Duration = Duration::from_secs(2);

/// `call`'s outcome, or `None` if it took longer than `limit`.
async fn within<T>(limit: Duration, call: impl Future<Output = T>) -> Option<T> {
    tokio::time::timeout(limit, call).await.ok()
}

/// Stops or restarts a synchronizer, which must end promptly.
async fn promptly(step: impl Future<Output = sns_core::Result<()>>) {
    within(WAIT, step)
        .await
        .expect("the synchronizer stops promptly")
        .expect("the synchronizer stops and starts");
}

fn u(id: u32) -> UserId {
    UserId::new(id).expect("valid user")
}

fn c(id: u32) -> ClusterId {
    ClusterId::new(id).expect("valid cluster")
}

async fn start(bus: Bus) -> TestCluster {
    let mut config = TestClusterConfig::default();
    config.bus = bus;
    TestCluster::start_with(config).await.expect("start")
}

/// The servers of cluster `id` (user `id` belongs to it), whichever is master.
fn servers(cluster: &TestCluster, id: u32) -> Vec<Server> {
    (1..=2)
        .filter_map(|s| cluster.server(id, s))
        .cloned()
        .collect()
}

/// The master among `servers`, if one is master now.
fn master_of(servers: &[Server]) -> Option<&Server> {
    servers.iter().find(|server| server.role() == Role::Master)
}

/// The master of cluster `id`, waiting for one (heartbeats are fast in tests, so a loaded
/// machine may see a failover).
async fn master(cluster: &TestCluster, id: u32) -> Server {
    let all = servers(cluster, id);
    assert!(
        eventually(WAIT, || async { master_of(&all).is_some() }).await,
        "cluster {id} has a master"
    );
    master_of(&all).cloned().expect("a master")
}

/// `author` posts `text` on the master among `servers`, under idempotency key `key`, trying
/// again across a failover until the post is committed.
async fn post(servers: &[Server], author: u32, key: u64, text: &str) {
    let key = PostKey::new(key).expect("keys start at 1");
    assert!(
        eventually(WAIT, || async {
            match master_of(servers) {
                Some(master) => within(
                    CALL,
                    master.post_keyed(u(author), text.as_bytes(), Some(key)),
                )
                .await
                .is_some_and(|posted| posted.is_ok()),
                None => false,
            }
        })
        .await,
        "{author} posts {text:?}"
    );
}

/// The texts on `user`'s timeline on its cluster's master, oldest first, duplicates kept
/// (empty while the cluster has no master).
fn timeline(cluster: &TestCluster, user: u32) -> Vec<String> {
    let all = servers(cluster, user);
    let Some(master) = master_of(&all) else {
        return Vec::new();
    };
    let (_, state) = master.committed_state();
    let mut posts = state.recent_timeline(u(user), usize::MAX);
    posts.reverse();
    posts.iter().map(|post| post.text.to_string()).collect()
}

/// Every event cluster `id` committed so far.
async fn own_events(cluster: &TestCluster, id: u32) -> Vec<Event> {
    let master = master(cluster, id).await;
    let high_water = master
        .high_water()
        .expect("high water")
        .get(&c(id))
        .copied()
        .unwrap_or(0);
    let mut own = master.own_events_after(0, None).await.expect("own events");
    let mut events = Vec::new();
    while own.position() < high_water {
        events.extend(own.next_batch(1024).await.expect("read").expect("events"));
    }
    events
}

/// Logs users `1..=3` in (one per cluster), waits until every cluster knows all three, and
/// makes each `follower` follow each of its `followees`; on the masters directly, so a failover
/// on a loaded machine only makes it try again.
async fn users_and_follows(cluster: &TestCluster, follows: &[(u32, u32)]) {
    for user in 1..=3 {
        let all = servers(cluster, user);
        assert!(
            eventually(WAIT, || async {
                let Some(master) = master_of(&all) else {
                    return false;
                };
                if master.committed_state().1.has_user(u(user)) {
                    return true;
                }
                // A login whose user was discarded by a step-down leaves a session behind.
                let _ = master.logout(u(user));
                within(CALL, master.login(u(user)))
                    .await
                    .is_some_and(|login| login.is_ok())
            })
            .await,
            "user {user} logs in"
        );
    }
    for id in 1..=3 {
        let all = servers(cluster, id);
        assert!(
            eventually(WAIT, || async {
                master_of(&all).is_some_and(|master| {
                    let (_, state) = master.committed_state();
                    (1..=3).all(|user| state.has_user(u(user)))
                })
            })
            .await,
            "cluster {id} learns every user"
        );
    }
    for (follower, followee) in follows {
        let all = servers(cluster, *follower);
        assert!(
            eventually(WAIT, || async {
                match master_of(&all) {
                    Some(master) => matches!(
                        within(CALL, master.follow(u(*follower), &followee.to_string())).await,
                        Some(Ok(()) | Err(Error::AlreadyFollowing))
                    ),
                    None => false,
                }
            })
            .await,
            "{follower} follows {followee}"
        );
    }
}

/// Closes, from the broker's side, every connection of the synchronizers using `prefix`
/// (`rabbitmqctl close_connection`); returns how many it closed.
async fn close_synchronizer_connections(prefix: &str) -> usize {
    let listed = tokio::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_connections",
            "--no-table-headers",
            "pid",
            "client_properties",
        ])
        .output();
    let listed = within(WAIT, listed)
        .await
        .expect("rabbitmqctl answers")
        .expect("rabbitmqctl runs (RabbitMQ's CLI closes connections from the broker's side)");
    assert!(
        listed.status.success(),
        "rabbitmqctl list_connections failed: {}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let needle = format!("{prefix} cluster ");
    let pids: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter(|line| line.contains(&needle))
        .filter_map(|line| line.split_whitespace().next().map(str::to_string))
        .collect();
    let mut closing = tokio::task::JoinSet::new();
    for pid in &pids {
        let pid = pid.clone();
        closing.spawn(async move {
            let closing = tokio::process::Command::new("rabbitmqctl")
                .args(["-q", "close_connection", &pid, "closed by a test"])
                .status();
            within(WAIT, closing)
                .await
                .is_some_and(|status| status.is_ok_and(|s| s.success()))
        });
    }
    let mut closed = 0;
    while let Some(done) = closing.join_next().await {
        if done.unwrap_or(false) {
            closed += 1;
        }
    }
    closed
}

#[tokio::test]
async fn broker_connections_closed_and_a_synchronizer_restarted_while_posts_flow_lose_and_duplicate_nothing()
 {
    let Some(broker) = amqp_broker("broker_connections_closed_and_a_synchronizer_restarted").await
    else {
        return;
    };
    let mut cluster = start(broker.bus(QueueType::Quorum)).await;
    let follows = [(1, 2), (1, 3), (2, 1), (2, 3), (3, 1), (3, 2)];
    users_and_follows(&cluster, &follows).await;
    let authors: Vec<(u32, Vec<Server>)> = (1..=3).map(|a| (a, servers(&cluster, a))).collect();
    // Each author posts every 20 ms until a phase is over: at most 90 posts each per phase,
    // so the posts of two authors fit a timeline (400 posts). `made` counts the rounds of
    // posts made (committed on every author's cluster).
    const MOST: u64 = 90;
    let made = AtomicU64::new(0);
    let flow = |phase: &'static str, over: CancellationToken| {
        let (authors, made) = (&authors, &made);
        async move {
            made.store(0, Ordering::SeqCst);
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let mut n = 0;
            while !over.is_cancelled() && n < MOST {
                tick.tick().await;
                n += 1;
                for (author, servers) in authors {
                    let key = if phase == "early" { n } else { MOST + n };
                    post(servers, *author, key, &format!("{phase} {n} of {author}")).await;
                }
                made.store(n, Ordering::SeqCst);
            }
            n
        }
    };
    // Waits until cluster 1 shows the latest post of author 2 (made after the call).
    let latest_crosses = |phase: &'static str| {
        let (cluster, made) = (&cluster, &made);
        async move {
            assert!(
                eventually(WAIT, || async { made.load(Ordering::SeqCst) > 0 }).await,
                "posts are made"
            );
            let text = format!("{phase} {} of 2", made.load(Ordering::SeqCst));
            eventually(WAIT, || async { timeline(cluster, 1).contains(&text) }).await
        }
    };

    // 1. The broker closes every connection of the synchronizers while posts flow.
    let over = CancellationToken::new();
    let faults = async {
        assert!(latest_crosses("early").await, "posts flow");
        let closed = close_synchronizer_connections(broker.prefix()).await;
        assert!(
            closed >= 6,
            "a publisher and a consumer per cluster were closed, not {closed}"
        );
        assert!(
            latest_crosses("early").await,
            "posts cross again after the broker closed every connection"
        );
        over.cancel();
    };
    let (early, ()) = tokio::join!(flow("early", over.clone()), faults);

    // 2. The synchronizer of cluster 2 restarts while posts flow.
    let over = CancellationToken::new();
    let restart = async {
        let rounds = |at_least: u64| {
            let made = &made;
            async move { eventually(WAIT, || async { made.load(Ordering::SeqCst) >= at_least }).await }
        };
        assert!(rounds(5).await, "posts flow");
        promptly(cluster.restart_synchronizer(2)).await;
        let now = made.load(Ordering::SeqCst);
        assert!(
            rounds((now + 5).min(MOST)).await,
            "posts flow after the restart"
        );
        over.cancel();
    };
    let (late, ()) = tokio::join!(flow("late", over.clone()), restart);
    assert!(early > 0 && late > 0);

    // Every post made is on every follower's timeline, once.
    for user in 1..=3u32 {
        let mut expected = BTreeSet::new();
        for (author, _) in authors.iter().filter(|(a, _)| *a != user) {
            expected.extend((1..=early).map(|n| format!("early {n} of {author}")));
            expected.extend((1..=late).map(|n| format!("late {n} of {author}")));
        }
        let complete = eventually(WAIT, || async {
            timeline(&cluster, user)
                .iter()
                .cloned()
                .collect::<BTreeSet<_>>()
                == expected
        })
        .await;
        let shown = timeline(&cluster, user);
        assert!(
            complete,
            "user {user} misses {:?}",
            expected
                .difference(&shown.iter().cloned().collect())
                .collect::<Vec<_>>()
        );
        assert_eq!(
            shown.len(),
            expected.len(),
            "user {user} sees no post twice"
        );
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_message_delivered_twice_is_applied_once() {
    let Some(broker) = amqp_broker("a_message_delivered_twice_is_applied_once").await else {
        return;
    };
    let cluster = start(broker.bus(QueueType::Quorum)).await;
    users_and_follows(&cluster, &[(1, 2)]).await;
    let two = servers(&cluster, 2);
    post(&two, 2, 1, "first").await;
    assert!(
        eventually(WAIT, || async { timeline(&cluster, 1) == ["first"] }).await,
        "the post crosses"
    );
    // Every event of cluster 2 so far, published again twice: as a broker redelivers.
    let body = seal_bytes(None, c(2), &own_events(&cluster, 2).await).expect("seal");
    for _ in 0..2 {
        broker
            .publish_raw("origin.2", &body)
            .await
            .expect("publish");
    }
    // Published after the copies, so consumed after them.
    post(&two, 2, 2, "marker").await;
    assert!(
        eventually(WAIT, || async { timeline(&cluster, 1).len() >= 2 }).await,
        "the marker crosses"
    );
    assert_eq!(timeline(&cluster, 1), ["first", "marker"]);
    let mark = |server: Server| server.high_water().expect("high water").get(&c(2)).copied();
    assert_eq!(
        mark(master(&cluster, 1).await),
        mark(master(&cluster, 2).await)
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn garbage_in_a_queue_is_rejected_and_the_consumer_carries_on() {
    let Some(broker) = amqp_broker("garbage_in_a_queue_is_rejected").await else {
        return;
    };
    let mut cluster = start(broker.bus(QueueType::Quorum)).await;
    users_and_follows(&cluster, &[(1, 2)]).await;
    let garbage = b"\xff\x00 not a sync batch".to_vec();
    broker
        .publish_raw("origin.2", &garbage)
        .await
        .expect("publish");
    // A plain `SyncBatch`, as bodies were before they were signed batches.
    let plain = encode_batch(c(2), &own_events(&cluster, 2).await);
    broker
        .publish_raw("origin.2", &plain)
        .await
        .expect("publish");
    // A well-formed batch of cluster 1's own events, routed to cluster 1's queue.
    let own_batch = seal_bytes(None, c(1), &own_events(&cluster, 1).await).expect("seal");
    broker
        .publish_raw("origin.2", &own_batch)
        .await
        .expect("publish");
    // A well-formed batch of a cluster the deployment does not have.
    let foreign = seal_bytes(
        None,
        c(7),
        &[Event {
            id: EventId {
                origin: c(7),
                seq: 1,
            },
            at: Timestamp(0),
            kind: EventKind::UserJoined { user: u(7) },
        }],
    )
    .expect("seal");
    broker
        .publish_raw("origin.2", &foreign)
        .await
        .expect("publish");
    post(&servers(&cluster, 2), 2, 1, "after the garbage").await;
    assert!(
        eventually(WAIT, || async {
            timeline(&cluster, 1) == ["after the garbage"]
        })
        .await,
        "the consumer carries on past the garbage"
    );
    let refused = cluster.refusals(1).expect("a synchronizer").invalid;
    assert_eq!(refused, 4, "every invalid message is counted");
    let one = amqp(&cluster, 1);
    assert_eq!(one.dropped_invalid, 4, "and counted as dropped: {one:?}");
    assert!(one.delivered >= 5, "the four and the post: {one:?}");
    let confirmed = eventually(WAIT, || async {
        let two = amqp(&cluster, 2);
        two.published >= 2 && two.confirmed == two.published
    })
    .await;
    let two = amqp(&cluster, 2);
    assert!(
        confirmed && two.nacked + two.returned == 0,
        "cluster 2 published its users and its post, all confirmed by the broker: {two:?}"
    );
    // None of the messages went back to the queue.
    promptly(cluster.stop_synchronizer(1)).await;
    let left: Vec<Vec<u8>> = broker
        .take_ready(c(1))
        .await
        .expect("read the queue")
        .into_iter()
        .map(|message| message.body)
        .collect();
    assert!(
        !left.contains(&garbage)
            && !left.contains(&plain)
            && !left.contains(&own_batch)
            && !left.contains(&foreign),
        "rejected messages are not requeued"
    );
    let (_, state) = master(&cluster, 1).await.committed_state();
    assert!(
        !state.has_user(u(7)),
        "nothing of the foreign batch was applied"
    );
    cluster.shutdown().await;
}

/// A post by user 2 with cluster 2's sequence number `seq`, as a forger would make it.
fn forged_post(seq: u64, text: &str) -> Event {
    Event {
        id: EventId { origin: c(2), seq },
        // A plausible time: only the MAC, or the origin's mark, tells it from a real post.
        at: Timestamp::now(),
        kind: EventKind::Posted {
            author: u(2),
            text: text.into(),
            key: None,
        },
    }
}

/// Cluster 2's committed high-water mark.
async fn mark_of_two(cluster: &TestCluster) -> u64 {
    let master = master(cluster, 2).await;
    master.high_water().expect("high water")[&c(2)]
}

/// What the synchronizer of cluster `id` refused so far.
fn refusals(cluster: &TestCluster, id: u32) -> RefusalCounts {
    cluster.refusals(id).unwrap_or_default()
}

/// What the RabbitMQ transport of cluster `id`'s synchronizer counted so far.
fn amqp(cluster: &TestCluster, id: u32) -> AmqpStats {
    cluster
        .deployment()
        .synchronizer(c(id))
        .and_then(|s| s.amqp_stats())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_forged_post_never_reaches_a_follower_and_the_real_one_does() {
    let Some(broker) = amqp_broker("a_forged_post_never_reaches_a_follower").await else {
        return;
    };
    let mut config = TestClusterConfig::default();
    config.bus = broker.bus(QueueType::Quorum);
    config.cluster_token = Some(TOKEN.to_string());
    let cluster = TestCluster::start_with(config).await.expect("start");
    users_and_follows(&cluster, &[(1, 2), (3, 2)]).await;
    // The next post of user 2 will have this sequence number: a forger takes it first,
    // publishing straight to the exchange, unsigned and signed with a guessed token.
    let next = mark_of_two(&cluster).await + 1;
    let forged = [forged_post(next, "forged")];
    let unsigned = seal_bytes(None, c(2), &forged).expect("seal");
    let guessed = seal_bytes(Some(&SyncKey::from_token("guess")), c(2), &forged).expect("seal");
    for body in [&unsigned, &guessed] {
        broker.publish_raw("origin.2", body).await.expect("publish");
    }
    assert!(
        eventually(WAIT, || async {
            refusals(&cluster, 1).bad_mac == 2 && refusals(&cluster, 3).bad_mac == 2
        })
        .await,
        "both forgeries are refused and counted by clusters 1 and 3: {:?}, {:?}",
        refusals(&cluster, 1),
        refusals(&cluster, 3)
    );
    for id in [1, 3] {
        let dropped = amqp(&cluster, id);
        assert_eq!(dropped.dropped_forged, 2, "cluster {id}: {dropped:?}");
    }
    post(&servers(&cluster, 2), 2, 1, "real").await;
    for user in [1, 3] {
        assert!(
            eventually(WAIT, || async { timeline(&cluster, user) == ["real"] }).await,
            "user {user} sees the real post, not the forged one: {:?}",
            timeline(&cluster, user)
        );
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_forged_message_far_ahead_is_counted_and_stalls_no_origin() {
    let Some(broker) = amqp_broker("a_forged_message_far_ahead_is_counted").await else {
        return;
    };
    // No cluster token, so no MAC: the forged gap is caught by asking the origin.
    let cluster = start(broker.bus(QueueType::Quorum)).await;
    let everyone = [(1, 2), (1, 3), (2, 1), (2, 3), (3, 1), (3, 2)];
    users_and_follows(&cluster, &everyone).await;
    let ahead = mark_of_two(&cluster).await + 1_000;
    let body = seal_bytes(None, c(2), &[forged_post(ahead, "from the future")]).expect("seal");
    broker
        .publish_raw("origin.2", &body)
        .await
        .expect("publish");
    // Cluster 2's master answers at once, so no repair and no timeout is involved.
    assert!(
        eventually(REPAIR_PATIENCE, || async {
            refusals(&cluster, 1).forged_gap == 1 && refusals(&cluster, 3).forged_gap == 1
        })
        .await,
        "clusters 1 and 3 count a forged gap: {:?}, {:?}",
        refusals(&cluster, 1),
        refusals(&cluster, 3)
    );
    for id in [1, 3] {
        let dropped = amqp(&cluster, id);
        assert_eq!(dropped.dropped_forged, 1, "cluster {id}: {dropped:?}");
    }
    for author in 1..=3 {
        post(
            &servers(&cluster, author),
            author,
            1,
            &format!("next of {author}"),
        )
        .await;
    }
    for user in 1..=3u32 {
        let wanted: BTreeSet<String> = (1..=3u32)
            .filter(|author| *author != user)
            .map(|author| format!("next of {author}"))
            .collect();
        assert!(
            eventually(WAIT, || async {
                timeline(&cluster, user)
                    .into_iter()
                    .collect::<BTreeSet<_>>()
                    == wanted
            })
            .await,
            "user {user} gets the next post of every origin: {:?}",
            timeline(&cluster, user)
        );
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_gap_is_filled_from_the_origin_master_while_its_publisher_is_off() {
    let Some(broker) = amqp_broker("a_gap_is_filled_from_the_origin_master").await else {
        return;
    };
    let mut cluster = start(broker.bus(QueueType::Quorum)).await;
    users_and_follows(&cluster, &[(1, 2), (3, 2)]).await;
    // Cluster 2 publishes nothing while its synchronizer is off.
    promptly(cluster.stop_synchronizer(2)).await;
    let two = servers(&cluster, 2);
    post(&two, 2, 1, "missing").await;
    post(&two, 2, 2, "published").await;
    // Only the last event reaches the queues: the one before it is missing there.
    let events = own_events(&cluster, 2).await;
    let last = events.last().cloned().expect("events");
    let body = seal_bytes(None, c(2), &[last]).expect("seal");
    broker
        .publish_raw("origin.2", &body)
        .await
        .expect("publish");
    for user in [1, 3] {
        assert!(
            eventually(WAIT, || async {
                timeline(&cluster, user) == ["missing", "published"]
            })
            .await,
            "user {user} gets the missing post from cluster 2's master: {:?}",
            timeline(&cluster, user)
        );
    }
    assert_eq!(refusals(&cluster, 1), RefusalCounts::default());
    cluster.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_origin_holds_up_only_its_own_events() {
    let Some(broker) = amqp_broker("an_unreachable_origin_holds_up_only_its_own_events").await
    else {
        return;
    };
    let mut cluster = start(broker.bus(QueueType::Quorum)).await;
    users_and_follows(&cluster, &[(1, 2), (1, 3)]).await;
    // Cluster 2 publishes nothing while its synchronizer is off; the queue will get only its
    // last event, so cluster 1 must read the one before from cluster 2's master...
    promptly(cluster.stop_synchronizer(2)).await;
    let two = servers(&cluster, 2);
    post(&two, 2, 1, "missing").await;
    post(&two, 2, 2, "published").await;
    let last = own_events(&cluster, 2)
        .await
        .last()
        .cloned()
        .expect("events");
    // ... which cluster 1's synchronizer cannot reach.
    let network = cluster
        .deployment()
        .memory_network()
        .expect("the memory transport")
        .clone();
    let sync_one = synchronizer_node(c(1));
    let masters_of_two: Vec<String> = (1..=2)
        .map(|s| server_node(c(2), ServerId::new(s).expect("server")))
        .collect();
    for node in &masters_of_two {
        network.partition(&sync_one, node);
    }
    let body = seal_bytes(None, c(2), &[last]).expect("seal");
    // Timed from before the message is published: the consumer may take it (and start its
    // patience) before the broker's confirmation of the publish comes back.
    let since = tokio::time::Instant::now();
    broker
        .publish_raw("origin.2", &body)
        .await
        .expect("publish");
    post(&servers(&cluster, 3), 3, 1, "from 3").await;
    assert!(
        eventually(WAIT, || async {
            timeline(&cluster, 1).contains(&"from 3".to_string())
        })
        .await,
        "cluster 3's post crosses while cluster 2's events wait"
    );
    assert!(
        since.elapsed() < REPAIR_PATIENCE,
        "cluster 3's post was not held up by the repair of cluster 2's events ({:?})",
        since.elapsed()
    );
    // The repair gives up after REPAIR_PATIENCE: the message leaves the queue (acknowledged)
    // rather than holding up cluster 2's later messages.
    assert!(
        eventually(WAIT, || async { refusals(&cluster, 1).postponed == 1 }).await,
        "the message whose gap cannot be repaired is dropped for now"
    );
    let waited = since.elapsed();
    assert!(
        waited >= REPAIR_PATIENCE,
        "dropped only after waiting for cluster 2's master (dropped {waited:?} after it was published)"
    );
    assert!(!timeline(&cluster, 1).contains(&"published".to_string()));
    // Once cluster 2 is reachable again, its events are read from its master, though the
    // message was dropped meanwhile and cluster 2 still publishes nothing.
    for node in &masters_of_two {
        network.repair(&sync_one, node);
    }
    let wanted: BTreeSet<String> = ["missing", "published", "from 3"].map(String::from).into();
    assert!(
        eventually(WAIT, || async {
            timeline(&cluster, 1).into_iter().collect::<BTreeSet<_>>() == wanted
        })
        .await,
        "cluster 2's events arrive once its master is reachable: {:?}",
        timeline(&cluster, 1)
    );
    assert_eq!(timeline(&cluster, 1).len(), 3, "no post twice");
    cluster.shutdown().await;
}

#[tokio::test]
async fn events_missing_from_a_queue_are_read_from_their_origin() {
    let Some(broker) = amqp_broker("events_missing_from_a_queue_are_read_from_their_origin").await
    else {
        return;
    };
    let mut cluster = start(broker.bus(QueueType::Quorum)).await;
    users_and_follows(&cluster, &[(1, 2), (3, 2)]).await;
    let two = servers(&cluster, 2);
    post(&two, 2, 1, "before").await;
    assert!(
        eventually(WAIT, || async { timeline(&cluster, 1) == ["before"] }).await,
        "the first post crosses"
    );
    promptly(cluster.stop_synchronizer(1)).await;
    for i in 0..5 {
        post(&two, 2, 2 + i, &format!("lost {i}")).await;
    }
    // Cluster 3 got them, so they were published, to cluster 1's queue as well; then they go.
    assert!(
        eventually(WAIT, || async { timeline(&cluster, 3).len() == 6 }).await,
        "cluster 3 gets the posts"
    );
    let taken = broker.take_ready(c(1)).await.expect("empty the queue");
    assert!(!taken.is_empty(), "the posts were in cluster 1's queue");
    promptly(cluster.restart_synchronizer(1)).await;
    post(&two, 2, 7, "after").await;
    let expected = [
        "before", "lost 0", "lost 1", "lost 2", "lost 3", "lost 4", "after",
    ];
    assert!(
        eventually(WAIT, || async { timeline(&cluster, 1) == expected }).await,
        "the missing posts are read from cluster 2: {:?}",
        timeline(&cluster, 1)
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn quorum_and_classic_queues_both_carry_events() {
    for (queue_type, other) in [
        (QueueType::Quorum, QueueType::Classic),
        (QueueType::Classic, QueueType::Quorum),
    ] {
        let Some(broker) = amqp_broker("quorum_and_classic_queues_both_carry_events").await else {
            return;
        };
        let cluster = start(broker.bus(queue_type)).await;
        users_and_follows(&cluster, &[(1, 2)]).await;
        post(&servers(&cluster, 2), 2, 1, "hello").await;
        assert!(
            eventually(WAIT, || async { timeline(&cluster, 1) == ["hello"] }).await,
            "a post crosses over {queue_type:?} queues"
        );
        for id in 1..=3 {
            broker
                .declare_queue(c(id), queue_type)
                .await
                .expect("the queue is of the configured type");
            let refused = broker.declare_queue(c(id), other).await;
            assert!(
                refused.is_err(),
                "queue {id} is {queue_type:?}, so declaring it {other:?} is refused"
            );
        }
        cluster.shutdown().await;
    }
}

#[tokio::test]
async fn a_queue_of_another_type_stops_the_synchronizer_with_a_configuration_error() {
    let Some(broker) = amqp_broker("a_queue_of_another_type_stops_the_synchronizer").await else {
        return;
    };
    broker
        .declare_queue(c(1), QueueType::Classic)
        .await
        .expect("declare a classic queue");
    let cluster = start(Bus::None).await;
    let synchronizer = Synchronizer::new(
        &SynchronizerConfig::new(c(1), 3, cluster.coordinator_addr()),
        cluster.network(),
        Arc::new(AmqpBus::new(
            broker.options(QueueType::Quorum),
            CursorStore::memory(),
        )) as Arc<dyn SyncTransport>,
    )
    .expect("synchronizer");
    let ended = tokio::time::timeout(WAIT, synchronizer.run())
        .await
        .expect("gives up at once");
    assert!(
        matches!(ended, Err(Error::InvalidInput(ref m)) if m.contains("refused")),
        "{ended:?}"
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_restarted_publisher_resumes_after_its_cursor_file() {
    let Some(broker) = amqp_broker("a_restarted_publisher_resumes_after_its_cursor_file").await
    else {
        return;
    };
    let mut config = TestClusterConfig::default();
    config.bus = broker.bus(QueueType::Quorum);
    config.files = true;
    let mut cluster = TestCluster::start_with(config).await.expect("start");
    let Data::Dir(root) = cluster.deployment().config().data.clone() else {
        panic!("a deployment with files has a data directory");
    };
    let cursor_file = root.join(format!(
        "cluster2/synchronizer/amqp-{}.cursor",
        broker.prefix()
    ));
    let cursor = || {
        std::fs::read_to_string(&cursor_file)
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
    };
    users_and_follows(&cluster, &[(1, 2), (3, 2)]).await;
    let two = servers(&cluster, 2);
    post(&two, 2, 1, "first").await;
    assert!(
        eventually(WAIT, || async {
            timeline(&cluster, 1) == ["first"] && timeline(&cluster, 3) == ["first"]
        })
        .await,
        "the post crosses"
    );
    let published = own_events(&cluster, 2).await.len() as u64;
    assert!(
        eventually(WAIT, || async { cursor() == Some(published) }).await,
        "the cursor file reaches {published}, holds {:?}",
        cursor()
    );

    // Cluster 1's queue fills while its consumer is off; cluster 2's publisher restarts.
    promptly(cluster.stop_synchronizer(1)).await;
    promptly(cluster.restart_synchronizer(2)).await;
    post(&two, 2, 2, "second").await;
    assert!(
        eventually(WAIT, || async {
            timeline(&cluster, 3) == ["first", "second"]
        })
        .await,
        "the next post crosses"
    );
    // A message cluster 1's consumer had applied but not yet acknowledged when it stopped goes
    // back to the queue marked redelivered: that is the broker's requeue, not a publication.
    let queued = broker.take_ready(c(1)).await.expect("read the queue");
    let published_again: Vec<_> = queued.iter().filter(|m| !m.redelivered).collect();
    assert!(!published_again.is_empty(), "the new post was published");
    for message in published_again {
        let (origin, events) = open_bytes(None, &message.body).expect("a batch");
        assert_eq!(origin, c(2));
        assert!(
            events.iter().all(|e| e.id.seq > published),
            "the restarted publisher sends only events after its cursor ({published}), not {:?}",
            events.iter().map(|e| e.id.seq).collect::<Vec<_>>()
        );
    }
    assert!(
        eventually(WAIT, || async { cursor() > Some(published) }).await,
        "the cursor file moves on"
    );
    cluster.shutdown().await;
}

/// A TCP proxy in front of the broker that can play a broker outage: `cut` drops every
/// connection through it and refuses new ones (accepted and closed at once) until `heal`.
struct BrokerProxy {
    port: u16,
    open: Arc<std::sync::atomic::AtomicBool>,
    refused: Arc<AtomicU64>,
    /// Cancelled to drop the connections of the current period; replaced by `heal`.
    period: Arc<std::sync::Mutex<CancellationToken>>,
    closed: CancellationToken,
}

impl BrokerProxy {
    async fn start(upstream: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("address").port();
        let proxy = Self {
            port,
            open: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            refused: Arc::new(AtomicU64::new(0)),
            period: Arc::new(std::sync::Mutex::new(CancellationToken::new())),
            closed: CancellationToken::new(),
        };
        let (open, refused, period, closed) = (
            proxy.open.clone(),
            proxy.refused.clone(),
            proxy.period.clone(),
            proxy.closed.clone(),
        );
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = closed.cancelled() => return,
                };
                let Ok((mut inbound, _)) = accepted else {
                    continue;
                };
                if !open.load(Ordering::SeqCst) {
                    refused.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                let cut = period.lock().expect("lock").clone();
                let upstream = upstream.clone();
                let closed = closed.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        () = cut.cancelled() => {}
                        () = closed.cancelled() => {}
                    }
                });
            }
        });
        proxy
    }

    /// `url` with its host and port replaced by the proxy's.
    fn url(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").expect("a URL");
        let end = rest.find('/').unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        let user = authority
            .rsplit_once('@')
            .map_or(String::new(), |(user, _)| format!("{user}@"));
        format!("{scheme}://{user}127.0.0.1:{}{path}", self.port)
    }

    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.period.lock().expect("lock").cancel();
    }

    fn heal(&self) {
        *self.period.lock().expect("lock") = CancellationToken::new();
        self.open.store(true, Ordering::SeqCst);
    }

    fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }
}

impl Drop for BrokerProxy {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

/// The `host:port` of an `amqp://` URL.
fn authority_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:5672")
    }
}

#[tokio::test]
async fn a_broker_outage_while_posts_are_made_loses_and_duplicates_nothing() {
    let Some(broker) = amqp_broker("a_broker_outage_while_posts_are_made").await else {
        return;
    };
    let proxy = BrokerProxy::start(authority_of(broker.url())).await;
    let mut options = broker.options(QueueType::Quorum);
    options.url = proxy.url(broker.url());
    let cluster = start(Bus::Amqp(options)).await;
    users_and_follows(&cluster, &[(1, 2), (2, 1), (3, 1), (3, 2)]).await;
    let authors = [(1, servers(&cluster, 1)), (2, servers(&cluster, 2))];
    let mut made: Vec<String> = Vec::new();
    let mut round = 0;
    let mut post_rounds = async |phase: &str, rounds: u64, made: &mut Vec<String>| {
        for _ in 0..rounds {
            round += 1;
            for (author, servers) in &authors {
                let text = format!("{phase} {round} of {author}");
                post(servers, *author, round, &text).await;
                made.push(text);
            }
        }
    };
    post_rounds("before", 10, &mut made).await;
    assert!(
        eventually(WAIT, || async { timeline(&cluster, 3).len() == 20 }).await,
        "posts cross before the outage"
    );

    // The broker is gone: connections drop, attempts are refused, posts go on.
    proxy.cut();
    post_rounds("during", 10, &mut made).await;
    assert!(
        eventually(WAIT, || async { proxy.refused() >= 12 }).await,
        "the six connections are tried again and again while the broker is gone"
    );
    proxy.heal();
    post_rounds("after", 10, &mut made).await;

    for (user, followees) in [(1, vec![2]), (2, vec![1]), (3, vec![1, 2])] {
        let wanted: BTreeSet<String> = made
            .iter()
            .filter(|text| {
                followees
                    .iter()
                    .any(|f| text.ends_with(&format!(" of {f}")))
            })
            .cloned()
            .collect();
        assert!(
            eventually(WAIT, || async {
                timeline(&cluster, user)
                    .iter()
                    .cloned()
                    .collect::<BTreeSet<_>>()
                    == wanted
            })
            .await,
            "user {user} gets every post after the outage: has {}, wants {}",
            timeline(&cluster, user).len(),
            wanted.len()
        );
        assert_eq!(
            timeline(&cluster, user).len(),
            wanted.len(),
            "user {user} sees no post twice"
        );
    }
    cluster.shutdown().await;
}
