//! The coordinator and a server on turmoil's simulated network, deterministic by seed: a master
//! partitioned from the coordinator steps down within the failure timeout (simulated time) and
//! is master again after the partition is repaired.
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

use sns_core::transport::{
    Connection, ConnectionInfo, Connector, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, Listener, Network,
};
use sns_core::{
    Client, Coordinator, CoordinatorConfig, CoordinatorLink, Error, MemoryStorage, Role,
    RoutingConfig, Server, ServerConfig, UserId,
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

/// Polls `check` on simulated time until it holds; returns how long that took.
async fn until<F, Fut>(limit: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() <= limit {
        if check().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(INTERVAL / 10).await;
    }
    None
}

#[test]
fn a_partitioned_master_steps_down_within_the_failure_timeout_and_rejoins_after_repair()
-> turmoil::Result {
    let failure_timeout = INTERVAL * MISSED;
    let mut sim = turmoil::Builder::new()
        .rng_seed(SEED)
        .simulation_duration(Duration::from_secs(120))
        .build();

    sim.host(COORDINATOR, || async {
        let coordinator = Coordinator::new(CoordinatorConfig {
            routing: RoutingConfig {
                clusters: 1,
                heartbeat_interval: INTERVAL,
                missed_heartbeats: MISSED,
                allow_unclean_promotion: false,
            },
            cluster_token: None,
        });
        let listener = bind(COORDINATOR, COORDINATOR_PORT).await?;
        coordinator
            .serve(listener, CancellationToken::new())
            .await?;
        Ok(())
    });

    // The test reads the server's role directly, as well as through its answers.
    let running: Arc<Mutex<Option<Server>>> = Arc::default();
    sim.host(SERVER, {
        let running = Arc::clone(&running);
        move || {
            let running = Arc::clone(&running);
            async move {
                let server =
                    Server::open(ServerConfig::default(), Arc::new(MemoryStorage::new())).await?;
                let listener = bind(SERVER, SERVER_PORT).await?;
                let mut link = CoordinatorLink::new(
                    format!("{COORDINATOR}:{COORDINATOR_PORT}"),
                    SERVER,
                    SERVER_PORT,
                );
                link.interval = INTERVAL;
                link.missed_heartbeats = MISSED;
                server.join(link, Network::new(TurmoilConnector));
                *running.lock().expect("lock") = Some(server.clone());
                server.serve(listener, CancellationToken::new()).await?;
                Ok(())
            }
        }
    });

    sim.client("test", async move {
        let role = || running.lock().expect("lock").as_ref().map(Server::role);
        let network = Network::new(TurmoilConnector);
        let addr = format!("{SERVER}:{SERVER_PORT}");
        let became_master = until(Duration::from_secs(10), || async {
            role() == Some(Role::Master)
        })
        .await;
        assert!(
            became_master.is_some(),
            "the coordinator makes the server master"
        );
        let one = Client::login(&network, &addr, u(1)).await?;
        let two = Client::login(&network, &addr, u(2)).await?;
        one.follow(u(2)).await?;

        turmoil::partition(SERVER, COORDINATOR);
        let stepped_down = until(failure_timeout * 3, || async {
            role() == Some(Role::Slave)
        })
        .await
        .expect("a master cut off from the coordinator steps down");
        // The last beat answered came at most one interval before the cut; the step-down
        // check runs on the next beat after the timeout (each beat may wait an interval).
        assert!(
            stepped_down <= failure_timeout + 2 * INTERVAL,
            "stepped down after {stepped_down:?}, failure timeout {failure_timeout:?}"
        );
        assert!(
            matches!(two.follow(u(1)).await, Err(Error::Unavailable(_))),
            "a stepped-down master refuses writes"
        );

        turmoil::repair(SERVER, COORDINATOR);
        let patience = KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT + failure_timeout * 4;
        let rejoined = until(patience, || async { role() == Some(Role::Master) }).await;
        assert!(
            rejoined.is_some(),
            "a member again within {patience:?} of the repair"
        );
        two.follow(u(1)).await?;
        assert_eq!(one.list().await?.followers, [u(2)]);
        Ok(())
    });

    sim.run()
}
