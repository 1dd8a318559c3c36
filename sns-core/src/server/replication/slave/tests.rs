//! A real slave against a master played by hand, and against a real master wired to it in
//! process (no sockets): the test holds the master's end of the mirroring stream (through a
//! scripted `Peers`), ships what a master would, decides when the slave's disk syncs, and reads
//! every acknowledgement the slave sends. The clock is paused: the slave has said all it will
//! once it stays silent while nothing else can run.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::Result;
use crate::event::{Event, EventKind, LogEntry};
use crate::ids::{ClusterId, Epoch, EventId, LogIndex, Role, ServerId, Timestamp, UserId};
use crate::server::replication::{FromSlave, Hello, MirrorTarget, Shipment, ToSlave};
use crate::server::{Answer, Assigned, Beat, CoordinatorLink, MasterFeed, Peers};
use crate::server::{Server, ServerConfig};
use crate::storage::{Durable, MemoryStorage, Recovered, Snapshot, Storage};
use crate::testing::eventually;
use crate::transport::MemoryNetwork;

const WAIT: Duration = Duration::from_secs(10);

/// Silence (of the paused clock) after which the slave has nothing more to say.
const QUIET: Duration = Duration::from_secs(1);

/// The master's epoch; the slave's tail was written under an older one.
const MASTER_EPOCH: Epoch = Epoch(2);

/// The master's end of one mirroring stream.
struct Stream {
    from_slave: mpsc::Receiver<FromSlave>,
    to_slave: mpsc::Sender<Result<ToSlave>>,
}

impl Stream {
    async fn ship(&self, commit: u64, body: Shipment) {
        let message = ToSlave {
            epoch: MASTER_EPOCH,
            commit: LogIndex(commit),
            in_sync: false,
            body,
        };
        self.to_slave.send(Ok(message)).await.expect("slave reads");
    }

    async fn next(&mut self) -> FromSlave {
        tokio::time::timeout(WAIT, self.from_slave.recv())
            .await
            .expect("the slave answers")
            .expect("the stream is open")
    }

    /// Every acknowledgement the slave sends until it falls silent with nothing left to do.
    async fn acks(&mut self) -> Vec<LogIndex> {
        let mut acks = Vec::new();
        while let Ok(message) = tokio::time::timeout(QUIET, self.from_slave.recv()).await {
            match message.expect("the stream is open") {
                FromSlave::Durable(index) => acks.push(index),
                other => panic!("expected an acknowledgement, got {other:?}"),
            }
        }
        acks
    }
}

/// A memory disk that syncs only while the test lets it.
struct HeldDisk {
    inner: MemoryStorage,
    syncing: watch::Sender<bool>,
}

impl HeldDisk {
    fn new() -> Self {
        Self {
            inner: MemoryStorage::new(),
            syncing: watch::channel(true).0,
        }
    }
}

#[async_trait::async_trait]
impl Storage for HeldDisk {
    async fn recover(&self) -> Result<Recovered> {
        self.inner.recover().await
    }

    fn append(&self, entries: Vec<LogEntry>) -> Durable {
        let queued = self.inner.append(entries);
        let mut syncing = self.syncing.subscribe();
        Box::pin(async move {
            let _ = syncing.wait_for(|on| *on).await;
            queued.await
        })
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        self.inner.save_snapshot(snapshot).await
    }

    async fn snapshot(&self) -> Result<Option<Snapshot>> {
        self.inner.snapshot().await
    }

    async fn read(&self, from: LogIndex, to: LogIndex) -> Result<Vec<LogEntry>> {
        self.inner.read(from, to).await
    }

    async fn truncate_after(&self, index: LogIndex) -> Result<()> {
        self.inner.truncate_after(index).await
    }

    async fn position(&self, id: EventId) -> Result<Option<LogIndex>> {
        self.inner.position(id).await
    }

    fn set_commit(&self, index: LogIndex) {
        self.inner.set_commit(index);
    }

    fn retain(&self, reader: &str, after: LogIndex) {
        self.inner.retain(reader, after);
    }

    fn release(&self, reader: &str) {
        self.inner.release(reader);
    }
}

struct Feed(mpsc::Receiver<Result<ToSlave>>);

#[async_trait::async_trait]
impl MasterFeed for Feed {
    async fn recv(&mut self) -> Option<Result<ToSlave>> {
        self.0.recv().await
    }
}

/// What a master ships, as a slave reads it.
struct Shipped(mpsc::Receiver<ToSlave>);

#[async_trait::async_trait]
impl MasterFeed for Shipped {
    async fn recv(&mut self) -> Option<Result<ToSlave>> {
        self.0.recv().await.map(Ok)
    }
}

/// The master a slave mirrors.
enum Master {
    /// Played by the test: each stream the slave opens is handed to it.
    Scripted(mpsc::UnboundedSender<Stream>),
    /// A real master, serving each stream the slave opens.
    Wired(Server),
}

/// A coordinator that keeps the server slave of `master`, and the master's mirroring
/// endpoint.
struct Scripted {
    master: Master,
}

#[async_trait::async_trait]
impl Peers for Scripted {
    async fn heartbeat(&self, _beat: Beat, _timeout: Duration) -> Answer<Assigned> {
        Answer::Assigned(
            Role::Slave,
            Assigned {
                epoch: MASTER_EPOCH,
                master: Some(MirrorTarget {
                    server: ServerId::new(1).expect("id"),
                    addr: "master:1".to_string(),
                }),
                slaves: Vec::new(),
            },
        )
    }

    async fn mirror(
        &self,
        _addr: &str,
        mut outbound: mpsc::Receiver<FromSlave>,
    ) -> Result<Box<dyn MasterFeed>> {
        match &self.master {
            Master::Scripted(streams) => {
                let (to_slave, feed) = mpsc::channel(16);
                let _ = streams.send(Stream {
                    from_slave: outbound,
                    to_slave,
                });
                Ok(Box::new(Feed(feed)))
            }
            Master::Wired(master) => {
                let Some(FromSlave::Hello(hello)) = outbound.recv().await else {
                    return Err(crate::Error::invalid("a stream must open with a hello"));
                };
                let admitted = master.attach_slave(hello)?;
                let (out, shipped) = mpsc::channel(16);
                let master = master.clone();
                tokio::spawn(async move {
                    let inbound = ReceiverStream::new(outbound).map(Ok);
                    master.ship_to_slave(admitted, inbound, out).await;
                });
                Ok(Box::new(Shipped(shipped)))
            }
        }
    }
}

fn cluster() -> ClusterId {
    ClusterId::new(1).expect("cluster")
}

/// Entry `index` of epoch `epoch`: user `user` joins (event `index` of this cluster).
fn joined(index: u64, epoch: Epoch, user: u32) -> LogEntry {
    LogEntry {
        index: LogIndex(index),
        epoch,
        event: Event {
            id: EventId {
                origin: cluster(),
                seq: index,
            },
            at: Timestamp(index as i64 * 1000),
            kind: EventKind::UserJoined {
                user: UserId::new(user).expect("user"),
            },
        },
    }
}

/// The server configuration of `server`; nobody's silence ends a stream here (the test's
/// pauses are shorter).
fn config(server: u32) -> ServerConfig {
    ServerConfig {
        cluster: cluster(),
        server_id: ServerId::new(server).expect("id"),
        clusters: 1,
        mirror_timeout: Duration::from_secs(600),
        ..ServerConfig::default()
    }
}

/// A slave whose log holds entries 1–10 of epoch 1, committed up to 5: 6–10 are a tail an
/// old master never committed. It joins, mirroring `master`.
async fn slave_with_a_divergent_tail(master: Master) -> (Server, Arc<HeldDisk>) {
    let storage = Arc::new(HeldDisk::new());
    let old: Vec<LogEntry> = (1..=10).map(|i| joined(i, Epoch(1), i as u32)).collect();
    storage.append(old).await.expect("append");
    storage.set_commit(LogIndex(5));
    let server = Server::open_replica(config(2), Arc::clone(&storage) as Arc<dyn Storage>)
        .await
        .expect("opens");
    let link = CoordinatorLink::new("coordinator:1", "slave", 2);
    let network = MemoryNetwork::new().node("slave");
    server.join_with(link, network, Arc::new(Scripted { master }));
    (server, storage)
}

/// A slave with a divergent tail, mirroring the test; returns the master's end of its stream.
async fn scripted_slave_with_a_divergent_tail() -> (Server, Arc<HeldDisk>, Stream) {
    let (streams, mut opened) = mpsc::unbounded_channel();
    let (server, storage) = slave_with_a_divergent_tail(Master::Scripted(streams)).await;
    let mut stream = tokio::time::timeout(WAIT, opened.recv())
        .await
        .expect("the slave dials")
        .expect("a stream");
    let hello = match stream.next().await {
        FromSlave::Hello(hello) => hello,
        other => panic!("expected a hello, got {other:?}"),
    };
    assert_eq!(
        hello,
        Hello {
            cluster: cluster(),
            server: ServerId::new(2).expect("id"),
            known_epoch: MASTER_EPOCH,
            last_index: LogIndex(10),
            last_epoch: Epoch(1),
            commit: LogIndex(5),
        }
    );
    (server, storage, stream)
}

/// The master wrote its own entries 6 and 7 (epoch 2) where the slave's tail lies, and
/// committed them alone (no slave counted). It tells the slave to drop its tail, then ships
/// its entries. A master keeps the highest index a slave acknowledged: had the slave said 10
/// (its durable index before the truncation), or 7 before 6 and 7 were durable, the master
/// would count it for entries the slave does not hold, and commit them on its word.
#[tokio::test(start_paused = true)]
async fn a_slave_acknowledges_only_what_it_holds_in_agreement_with_the_master() {
    let (server, disk, mut stream) = scripted_slave_with_a_divergent_tail().await;
    let held = |acks: &[LogIndex], upto: u64, when: &str| {
        if let Some(ack) = acks.iter().find(|a| **a > LogIndex(upto)) {
            panic!("{when}, the slave acknowledged {ack} (all: {acks:?}) but holds {upto}");
        }
    };

    held(&stream.acks().await, 5, "before the master's first message");

    stream.ship(7, Shipment::TruncateAfter(LogIndex(5))).await;
    stream.ship(7, Shipment::KeepAlive).await;
    held(&stream.acks().await, 5, "once the tail is dropped");
    assert_eq!(
        server.positions().sequenced,
        LogIndex(5),
        "the tail is gone"
    );

    // The master's entries arrive, but the disk has not synced them yet.
    disk.syncing.send_replace(false);
    let ours = vec![joined(6, MASTER_EPOCH, 106), joined(7, MASTER_EPOCH, 107)];
    stream.ship(7, Shipment::Entries(ours)).await;
    stream.ship(7, Shipment::KeepAlive).await;
    held(&stream.acks().await, 5, "with 6 and 7 not yet durable");
    assert_eq!(server.positions().sequenced, LogIndex(7));

    disk.syncing.send_replace(true);
    let acks = stream.acks().await;
    held(&acks, 7, "once 6 and 7 are durable");
    assert_eq!(acks.last(), Some(&LogIndex(7)), "the slave acknowledges 7");
    let committed = eventually(WAIT, || {
        let commit = server.positions().commit;
        async move { commit == LogIndex(7) }
    })
    .await;
    assert!(committed, "the slave commits what the master committed");
    let (_, state) = server.committed_state();
    for (user, holds) in [(106, true), (107, true), (6, false), (7, false)] {
        let user = UserId::new(user).expect("user");
        assert_eq!(state.has_user(user), holds, "{user}");
    }
    server.close().await;
}

/// The same, end to end: the new master (epoch 2) holds entries 1–5 and its own 6–7, all
/// committed; the slave holding the old master's tail 6–10 joins it, catches up and is counted.
/// Had the slave acknowledged 10 for its old tail, the master would acknowledge a new write
/// (entry 8) on its own disk alone, counting the slave for it: if the master then died, the
/// promoted slave would lack an acknowledged write.
#[tokio::test(start_paused = true)]
async fn a_master_acknowledges_no_write_its_slave_with_an_old_tail_has_not_made_durable() {
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let ours: Vec<LogEntry> = (1..=5)
        .map(|i| joined(i, Epoch(1), i as u32))
        .chain([joined(6, MASTER_EPOCH, 106), joined(7, MASTER_EPOCH, 107)])
        .collect();
    storage.append(ours).await.expect("append");
    let master = Server::open(config(1), storage).await.expect("opens");
    let (slave, disk) = slave_with_a_divergent_tail(Master::Wired(master.clone())).await;
    let slave_id = ServerId::new(2).expect("id");
    let counted = eventually(WAIT, || {
        let in_sync = master.positions().in_sync;
        let slave = slave.positions();
        async move {
            in_sync.iter().any(|(s, _)| *s == slave_id)
                && slave.durable == LogIndex(7)
                && slave.commit == LogIndex(7)
        }
    })
    .await;
    assert!(
        counted,
        "the slave never caught up: {:?} / {:?}",
        master.positions(),
        slave.positions()
    );

    // The slave's disk stops syncing: a write on the master waits for it.
    disk.syncing.send_replace(false);
    let mut write = tokio::spawn({
        let master = master.clone();
        async move { master.login(UserId::new(108).expect("user")).await }
    });
    let shipped = eventually(WAIT, || {
        let sequenced = slave.positions().sequenced;
        async move { sequenced == LogIndex(8) }
    })
    .await;
    assert!(shipped, "entry 8 reached the slave");
    let early = tokio::time::timeout(QUIET, &mut write).await;
    assert!(
        early.is_err(),
        "the master acknowledged entry 8, which its slave has not made durable ({:?}; the \
         master counts the slave at {:?})",
        slave.positions(),
        master.positions().in_sync
    );

    disk.syncing.send_replace(true);
    tokio::time::timeout(WAIT, write)
        .await
        .expect("the write completes once the slave holds it")
        .expect("task")
        .expect("login");
    assert!(slave.positions().durable >= LogIndex(8));
    slave.close().await;
    master.close().await;
}
