//! Who may mirror a master (`TestCluster`, with the cluster token): only the server the
//! coordinator lists as the cluster's slave, from the host it registered with, and never on
//! the strength of an epoch it claims. A fake slave is played by hand over raw gRPC: it holds
//! the token, says hello and would acknowledge everything it is sent.

use std::time::Duration;

use sns_core::deployment::server_node;
use sns_core::testing::{TestCluster, TestClusterConfig, eventually};
use sns_core::{ClusterId, LogEntry, Network, Role, Server, ServerId, UserId};
use sns_proto::sns_v1::replication_client::ReplicationClient;
use sns_proto::sns_v1::slave_message::Kind;
use sns_proto::sns_v1::{MasterMessage, MirrorHello, SlaveMessage, master_message};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Status};

const WAIT: Duration = Duration::from_secs(20);
const TOKEN: &str = "mirror-trust-token";

fn u(id: u32) -> UserId {
    UserId::new(id).expect("valid user")
}

fn config() -> TestClusterConfig {
    let mut config = TestClusterConfig::default();
    config.clusters = 1;
    config.servers_per_cluster = 2;
    config.cluster_token = Some(TOKEN.to_string());
    config
}

fn server(cluster: &TestCluster, s: u32) -> Server {
    cluster.server(1, s).expect("running").clone()
}

fn addr_of(cluster: &TestCluster, s: u32) -> String {
    cluster
        .deployment()
        .servers()
        .into_iter()
        .find(|p| p.server.get() == s)
        .expect("a slot")
        .addr
}

/// The master and its slave, once the coordinator knows the slave is in sync.
async fn master_and_slave_in_sync(cluster: &TestCluster) -> (u32, u32) {
    let mut found = (0, 0);
    let ready = eventually(WAIT, || {
        let masters: Vec<u32> = (1..=2)
            .filter(|s| cluster.server(1, *s).map(Server::role) == Some(Role::Master))
            .collect();
        let now = tokio::time::Instant::now();
        let nodes = cluster.deployment().coordinator().table().nodes(now);
        let ok = masters.len() == 1
            && nodes
                .iter()
                .any(|n| n.id == 3 - masters[0] && n.in_sync && n.alive);
        if ok {
            found = (masters[0], 3 - masters[0]);
        }
        async move { ok }
    })
    .await;
    assert!(ready, "no master with its slave in sync");
    found
}

/// A hello for server `claimed` that says its log is exactly the master's.
fn hello_as(master: &Server, claimed: u32, known_epoch: u64) -> MirrorHello {
    let log = master.positions();
    MirrorHello {
        cluster: 1,
        server: claimed,
        known_epoch,
        last_index: log.sequenced.0,
        last_epoch: log.epoch.0,
        commit: log.commit.0,
    }
}

/// Opens a mirroring session on the master at `addr` with the cluster token, as a slave would,
/// from `network`. Admitted, the fake acknowledges as durable every entry it is sent, and the
/// commit index with every keepalive, without storing anything.
async fn fake_slave(network: &Network, addr: &str, hello: MirrorHello) -> Result<(), Status> {
    let channel = network
        .connect(addr)
        .await
        .expect("the master is reachable");
    let (acks, outbound) = mpsc::channel(64);
    acks.send(SlaveMessage {
        kind: Some(Kind::Hello(hello)),
    })
    .await
    .expect("hello queued");
    let mut request = Request::new(ReceiverStream::new(outbound));
    request
        .metadata_mut()
        .insert("sns-cluster-token", TOKEN.parse().expect("ascii metadata"));
    let mut shipped = ReplicationClient::new(channel)
        .mirror(request)
        .await?
        .into_inner();
    tokio::spawn(async move {
        while let Some(Ok(message)) = shipped.next().await {
            let durable = acknowledged(&message);
            if acks
                .send(SlaveMessage {
                    kind: Some(Kind::Durable(durable)),
                })
                .await
                .is_err()
            {
                return;
            }
        }
    });
    Ok(())
}

/// What a slave that acknowledges everything says after `message`.
fn acknowledged(message: &MasterMessage) -> u64 {
    match &message.kind {
        Some(master_message::Kind::Entries(batch)) => batch
            .entries
            .iter()
            .filter_map(|bytes| LogEntry::from_bytes(bytes).ok())
            .map(|e| e.index.0)
            .max()
            .unwrap_or(message.commit),
        _ => message.commit,
    }
}

/// Whether the master counts `slave` for its commit point, and the slave knows it.
fn counted(master: &Server, slave: &Server, s: u32) -> bool {
    let id = ServerId::new(s).expect("server");
    master.positions().in_sync.iter().any(|(x, _)| *x == id) && slave.positions().counted_by_master
}

/// Whether the coordinator has server `s` in sync (so would promote it).
fn coordinator_counts(cluster: &TestCluster, s: u32) -> bool {
    let now = tokio::time::Instant::now();
    let nodes = cluster.deployment().coordinator().table().nodes(now);
    nodes.iter().any(|n| n.id == s && n.in_sync)
}

/// The refusal of a fake slave's session, checked: `PERMISSION_DENIED`, with every one of
/// `words` in its message.
fn assert_refused(session: Result<(), Status>, words: &[&str]) {
    let refused = session.expect_err("the fake slave's session was admitted");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    for word in words {
        assert!(
            refused.message().contains(word),
            "the refusal should say {word:?}: {}",
            refused.message()
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_fake_slave_is_refused_and_a_follow_acknowledged_afterwards_is_on_the_real_slave() {
    let mut cluster = TestCluster::start_with(config()).await.expect("start");
    let (m, s) = master_and_slave_in_sync(&cluster).await;
    let master = server(&cluster, m);
    let one = cluster.client(1).await.expect("client 1");
    let _two = cluster.client(2).await.expect("client 2");

    // A process elsewhere holds the token and says it is the slave, or another server the
    // coordinator does not list.
    let memory = cluster.deployment().memory_network().expect("memory");
    let intruder = memory.node("intruder");
    let epoch = master.positions().epoch.0;
    let as_the_slave = fake_slave(
        &intruder,
        &addr_of(&cluster, m),
        hello_as(&master, s, epoch),
    )
    .await;
    let as_another = fake_slave(
        &intruder,
        &addr_of(&cluster, m),
        hello_as(&master, 2 + s, epoch),
    )
    .await;

    // The real slave is still the one counted: what the master acknowledges, it holds.
    one.follow(u(2)).await.expect("acknowledged");
    let acknowledged = master.positions().commit;
    let slave = server(&cluster, s);
    assert!(
        counted(&master, &slave, s),
        "the real slave is still counted"
    );
    assert!(
        slave.positions().durable >= acknowledged,
        "acknowledged at {acknowledged} but the real slave holds {:?}",
        slave.positions()
    );
    let listed = format!("server {s} at {}", addr_of(&cluster, s));
    assert_refused(as_the_slave, &[&listed, "intruder"]);
    assert_refused(as_another, &[&listed, "is not a slave"]);

    // The master dies: the slave takes over with the follow.
    cluster.crash(1, m).await.expect("crash the master");
    let promoted = eventually(WAIT, || {
        let role = cluster.server(1, s).map(Server::role);
        async move { role == Some(Role::Master) }
    })
    .await;
    assert!(promoted, "the in-sync slave was not promoted");
    let (_, state) = server(&cluster, s).committed_state();
    assert!(
        state.follows(u(1), u(2)),
        "the acknowledged follow was lost"
    );
    cluster.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn with_its_slave_cut_off_a_master_acknowledges_nothing_on_a_fake_slaves_word() {
    let cluster = TestCluster::start_with(config()).await.expect("start");
    let (m, s) = master_and_slave_in_sync(&cluster).await;
    let master = server(&cluster, m);
    let slave = server(&cluster, s);
    let one = cluster.client(1).await.expect("client 1");
    let _two = cluster.client(2).await.expect("client 2");

    // The fake would acknowledge everything; then the real slave is cut off from the master.
    let memory = cluster.deployment().memory_network().expect("memory");
    let intruder = memory.node("intruder");
    let epoch = master.positions().epoch.0;
    let session = fake_slave(
        &intruder,
        &addr_of(&cluster, m),
        hello_as(&master, s, epoch),
    )
    .await;
    cluster.isolate(1, m, s, true).expect("cut");

    // The follow is acknowledged only once the coordinator no longer counts the slave, which
    // therefore cannot be promoted without it.
    one.follow(u(2)).await.expect("acknowledged, eventually");
    let acknowledged = master.positions().commit;
    assert!(
        slave.positions().durable >= acknowledged || !coordinator_counts(&cluster, s),
        "acknowledged at {acknowledged} while the coordinator counts slave {s}, which holds {:?}",
        slave.positions()
    );
    assert_refused(
        session,
        &[&format!("server {s} at {}", addr_of(&cluster, s))],
    );

    // Healed, the real slave catches up and is counted again.
    cluster.isolate(1, m, s, false).expect("heal");
    master_and_slave_in_sync(&cluster).await;
    assert!(
        eventually(WAIT, || {
            let ok = counted(&master, &slave, s) && slave.positions().durable >= acknowledged;
            async move { ok }
        })
        .await,
        "the real slave is counted again"
    );
    cluster.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_hello_claiming_epoch_u64_max_is_refused_and_the_master_keeps_its_role_and_its_slave() {
    let cluster = TestCluster::start_with(config()).await.expect("start");
    let (m, s) = master_and_slave_in_sync(&cluster).await;
    let master = server(&cluster, m);
    let slave = server(&cluster, s);
    let one = cluster.client(1).await.expect("client 1");
    let _two = cluster.client(2).await.expect("client 2");
    assert!(
        eventually(WAIT, || {
            let ok = counted(&master, &slave, s);
            async move { ok }
        })
        .await,
        "the slave is counted before the claim"
    );
    let epoch = master.positions().epoch;

    // Even from the slave's own host and under its id, a claim of a newer epoch is no
    // reason to step down: only the coordinator names epochs.
    let memory = cluster.deployment().memory_network().expect("memory");
    let slave_host = memory.node(&server_node(
        ClusterId::new(1).expect("cluster"),
        ServerId::new(s).expect("server"),
    ));
    let claim = hello_as(&master, s, u64::MAX);
    let session = fake_slave(&slave_host, &addr_of(&cluster, m), claim).await;

    // Same role, same epoch, same slave counted, and the coordinator still has it in sync.
    assert_eq!(master.role(), Role::Master, "the master stepped down");
    assert_eq!(master.positions().epoch, epoch, "the master changed epoch");
    assert_eq!(
        master.positions().known_epoch,
        epoch,
        "the claim was believed"
    );
    assert!(
        counted(&master, &slave, s),
        "the real slave is no longer counted"
    );
    one.follow(u(2)).await.expect("acknowledged");
    let acknowledged = master.positions().commit;
    assert!(
        slave.positions().durable >= acknowledged,
        "acknowledged at {acknowledged} but the real slave holds {:?}",
        slave.positions()
    );
    assert!(counted(&master, &slave, s), "the real slave stays counted");
    let now = tokio::time::Instant::now();
    let nodes = cluster.deployment().coordinator().table().nodes(now);
    assert!(
        nodes
            .iter()
            .any(|n| n.id == s && n.in_sync && n.epoch == epoch),
        "the coordinator still has the slave in sync at epoch {epoch:?}: {nodes:?}"
    );
    assert_refused(
        session,
        &[&u64::MAX.to_string(), "only the coordinator names epochs"],
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tcp_the_slave_mirrors_from_its_registered_ip_and_an_unlisted_server_is_refused() {
    let mut config = config();
    config.tcp = true;
    let cluster = TestCluster::start_with(config).await.expect("start");
    // The slave reached the master from 127.0.0.1, the host it registered with.
    let (m, s) = master_and_slave_in_sync(&cluster).await;
    let master = server(&cluster, m);
    let claim = hello_as(&master, 2 + s, master.positions().epoch.0);
    let session = fake_slave(cluster.network(), &addr_of(&cluster, m), claim).await;
    assert_refused(
        session,
        &[&format!("server {s} at {}", addr_of(&cluster, s))],
    );
    let slave = server(&cluster, s);
    assert!(counted(&master, &slave, s), "the real slave stays counted");
    cluster.shutdown().await;
}
