//! The coordinator and servers on turmoil's simulated network, deterministic by seed: a master
//! partitioned from the coordinator steps down within the failure timeout (simulated time) and
//! is master again after the partition is repaired; with a slave, the slave is promoted and the
//! old master, still reachable by its clients, acknowledges nothing after the promotion while
//! every write it acknowledged before is on the new master.
//!
//! The turmoil listener and connector below use only the public transport API
//! (`Listener::new`, `Connection::new`, `Connector`): the same injection the binaries and the
//! in-memory network use.
//!
//! turmoil drops the segments a partition catches and does not retransmit, so a connection that
//! carried traffic during the partition is stuck after the repair; the HTTP/2 keepalive
//! (`transport::KEEPALIVE_INTERVAL` + `KEEPALIVE_TIMEOUT`) closes it and the heartbeat channel
//! reconnects. Rejoining therefore takes up to that long on simulated time.

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use sns_core::testing::eventually;
use sns_core::transport::{
    Connection, ConnectionInfo, Connector, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, Listener, Network,
};
use sns_core::{
    Client, Coordinator, CoordinatorConfig, CoordinatorLink, Error, MemoryStorage, Role, Server,
    ServerConfig, UserId,
};
use tokio::time::Instant;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use turmoil::net::{TcpListener, TcpStream};

const SEED: u64 = 438;
const INTERVAL: Duration = Duration::from_millis(500);
const MISSED: u32 = 2;
const COORDINATOR: &str = "coordinator";
const SERVER: &str = "server";
const COORDINATOR_PORT: u16 = 9090;
const SERVER_PORT: u16 = 10000;
/// Users the partitioned master's client may follow, one per write, before the promotion.
const FOLLOWEES: u32 = 200;

/// Dials turmoil addresses (`host:port`, resolved by the simulation).
struct TurmoilConnector;

#[async_trait::async_trait]
impl Connector for TurmoilConnector {
    async fn dial(&self, addr: &str) -> io::Result<Connection> {
        let stream = TcpStream::connect(addr).await?;
        let info = ConnectionInfo {
            local: stream.local_addr()?.to_string(),
            peer: addr.to_string(),
            nodelay: None,
        };
        Ok(Connection::new(stream, info))
    }
}

type Accept =
    Pin<Box<dyn Future<Output = (TcpListener, io::Result<(TcpStream, SocketAddr)>)> + Send>>;

/// A turmoil listener as a stream of connections.
struct Accepting {
    local: String,
    next: Accept,
}

fn accept(listener: TcpListener) -> Accept {
    Box::pin(async move {
        let accepted = listener.accept().await;
        (listener, accepted)
    })
}

impl Stream for Accepting {
    type Item = io::Result<Connection>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let (listener, accepted) = std::task::ready!(self.next.as_mut().poll(cx));
        self.next = accept(listener);
        let connection = accepted.map(|(stream, peer)| {
            let info = ConnectionInfo {
                local: self.local.clone(),
                peer: peer.to_string(),
                nodelay: None,
            };
            Connection::new(stream, info)
        });
        Poll::Ready(Some(connection))
    }
}

/// Binds `port` on the current simulated host; peers dial `host:port`.
async fn bind(host: &str, port: u16) -> io::Result<Listener> {
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).await?;
    let local = format!("{host}:{port}");
    let incoming = Accepting {
        local: local.clone(),
        next: accept(listener),
    };
    Ok(Listener::new(local, incoming))
}

fn u(id: u32) -> UserId {
    UserId::new(id).expect("valid user")
}

#[test]
fn a_partitioned_master_steps_down_within_the_failure_timeout_and_rejoins_after_repair()
-> turmoil::Result {
    let failure_timeout = INTERVAL * MISSED;
    let mut sim = turmoil::Builder::new()
        .rng_seed(SEED)
        .simulation_duration(Duration::from_secs(120))
        .build();

    coordinator_host(&mut sim, coordinator());

    // The test reads the server's role directly, as well as through its answers.
    let running: Arc<Mutex<Option<Server>>> = Arc::default();
    server_host(&mut sim, SERVER, 1, Arc::clone(&running));

    sim.client("test", async move {
        let role = || running.lock().expect("lock").as_ref().map(Server::role);
        let network = Network::new(TurmoilConnector);
        let addr = format!("{SERVER}:{SERVER_PORT}");
        assert!(
            eventually(Duration::from_secs(10), || async {
                role() == Some(Role::Master)
            })
            .await,
            "the coordinator makes the server master"
        );
        let one = Client::login(&network, &addr, u(1)).await?;
        let two = Client::login(&network, &addr, u(2)).await?;
        one.follow(u(2)).await?;

        turmoil::partition(SERVER, COORDINATOR);
        let cut = Instant::now();
        assert!(
            eventually(failure_timeout * 3, || async {
                role() == Some(Role::Slave)
            })
            .await,
            "a master cut off from the coordinator steps down"
        );
        let stepped_down = cut.elapsed();
        // The last beat answered came at most one interval before the cut; the step-down
        // check runs on the next beat after the timeout (each beat may wait an interval).
        assert!(
            stepped_down <= failure_timeout + 2 * INTERVAL,
            "stepped down after {stepped_down:?}, failure timeout {failure_timeout:?}"
        );
        assert!(
            matches!(two.follow(u(1)).await, Err(Error::NotMaster(_))),
            "a stepped-down master refuses writes"
        );

        turmoil::repair(SERVER, COORDINATOR);
        let patience = KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT + failure_timeout * 4;
        assert!(
            eventually(patience, || async { role() == Some(Role::Master) }).await,
            "a member again within {patience:?} of the repair"
        );
        two.follow(u(1)).await?;
        assert_eq!(one.list().await?.followers, [u(2)]);
        Ok(())
    });

    sim.run()
}

/// The coordinator of the simulated deployment (one cluster).
fn coordinator() -> Coordinator {
    let mut config = CoordinatorConfig::default();
    config.routing.clusters = 1;
    config.routing.heartbeat_interval = INTERVAL;
    config.routing.missed_heartbeats = MISSED;
    Coordinator::new(config)
}

/// Serves `coordinator` on the simulated host `coordinator`.
fn coordinator_host(sim: &mut turmoil::Sim<'_>, coordinator: Coordinator) {
    sim.host(COORDINATOR, move || {
        let coordinator = coordinator.clone();
        async move {
            let listener = bind(COORDINATOR, COORDINATOR_PORT).await?;
            coordinator
                .serve(listener, CancellationToken::new())
                .await?;
            Ok(())
        }
    });
}

/// Starts a joined server of cluster 1 on simulated host `name`, and publishes it in `slot`.
fn server_host(
    sim: &mut turmoil::Sim<'_>,
    name: &'static str,
    id: u32,
    slot: Arc<Mutex<Option<Server>>>,
) {
    sim.host(name, move || {
        let slot = Arc::clone(&slot);
        async move {
            let mut config = ServerConfig::default();
            config.server_id = sns_core::ServerId::new(id).expect("server id");
            config.clusters = 1;
            config.mirror_timeout = INTERVAL * MISSED;
            let server = Server::open_replica(config, Arc::new(MemoryStorage::new())).await?;
            let listener = bind(name, SERVER_PORT).await?;
            let mut link = CoordinatorLink::new(
                format!("{COORDINATOR}:{COORDINATOR_PORT}"),
                name,
                SERVER_PORT,
            );
            link.interval = INTERVAL;
            link.missed_heartbeats = MISSED;
            server.join(link, Network::new(TurmoilConnector));
            *slot.lock().expect("lock") = Some(server.clone());
            server.serve(listener, CancellationToken::new()).await?;
            Ok(())
        }
    });
}

#[test]
fn a_master_cut_off_from_the_coordinator_is_replaced_and_acknowledges_nothing_afterwards()
-> turmoil::Result {
    let mut sim = turmoil::Builder::new()
        .rng_seed(SEED)
        .simulation_duration(Duration::from_secs(120))
        .build();
    let coordinator = coordinator();
    coordinator_host(&mut sim, coordinator.clone());
    let names = ["server1", "server2"];
    let slots: [Arc<Mutex<Option<Server>>>; 2] = [Arc::default(), Arc::default()];
    for (i, name) in names.iter().enumerate() {
        server_host(&mut sim, name, i as u32 + 1, Arc::clone(&slots[i]));
    }

    sim.client("test", async move {
        let role = |i: usize| slots[i].lock().expect("lock").as_ref().map(Server::role);
        let state = |i: usize| {
            slots[i]
                .lock()
                .expect("lock")
                .as_ref()
                .map(Server::committed_state)
        };
        let network = Network::new(TurmoilConnector);
        assert!(
            eventually(Duration::from_secs(10), || async {
                role(0) == Some(Role::Master) || role(1) == Some(Role::Master)
            })
            .await,
            "a master is named"
        );
        let (old, slave) = if role(0) == Some(Role::Master) {
            (0, 1)
        } else {
            (1, 0)
        };
        let addr = format!("{}:{SERVER_PORT}", names[old]);
        let one = Client::login(&network, &addr, u(1)).await?;
        // Each write follows a new user, so the new master's state tells exactly which
        // acknowledged writes it holds. (Toggling one follow could not: a write that failed
        // may still commit on the new master, as any unacknowledged write may.)
        for user in 2..=FOLLOWEES + 1 {
            Client::login(&network, &addr, u(user))
                .await?
                .logout()
                .await?;
        }
        assert!(
            eventually(Duration::from_secs(10), || async {
                let nodes = coordinator.table().nodes(Instant::now());
                nodes.iter().any(|n| n.id == slave as u32 + 1 && n.in_sync)
            })
            .await,
            "the slave is in sync"
        );

        // The master loses the coordinator but keeps its clients and its slave.
        turmoil::partition(names[old], COORDINATOR);
        let mut next = 2;
        let mut acknowledged = Vec::new();
        let mut refused_after_promotion = 0;
        while refused_after_promotion < 5 {
            assert!(
                next <= FOLLOWEES + 1,
                "no promotion after {FOLLOWEES} writes; raise FOLLOWEES"
            );
            let promoted = role(slave) == Some(Role::Master);
            match one.follow(u(next)).await {
                Ok(()) => {
                    assert!(
                        !promoted,
                        "the old master acknowledged a write after the promotion"
                    );
                    acknowledged.push(next);
                    next += 1;
                }
                Err(_) if promoted => refused_after_promotion += 1,
                Err(_) => tokio::time::sleep(INTERVAL / 10).await,
            }
        }
        assert!(
            !acknowledged.is_empty(),
            "writes went through before the promotion"
        );
        // Every write the old master acknowledged is on the new master (which commits what
        // it inherited once promoted).
        let holds_all = || async {
            let (_, promoted) = state(slave).expect("running");
            acknowledged
                .iter()
                .all(|&user| promoted.follows(u(1), u(user)))
        };
        assert!(
            eventually(INTERVAL * MISSED, holds_all).await,
            "the new master lacks an acknowledged write of {acknowledged:?}"
        );
        assert!(
            eventually(INTERVAL * MISSED * 3, || async {
                role(old) == Some(Role::Slave)
            })
            .await,
            "the old master steps down"
        );
        Ok(())
    });

    sim.run()
}
