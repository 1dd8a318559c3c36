//! The master's bookkeeping of its slaves: when a slave counts for the commit point, when the
//! coordinator hears of it, and when it may stop counting.

use super::*;
use crate::storage::MemoryStorage;

fn s(id: u32) -> ServerId {
    ServerId::new(id).expect("server")
}

#[test]
fn a_catching_slave_does_not_hold_commits_back() {
    let storage = MemoryStorage::new();
    let mut replicas = Replicas::default();
    let session = replicas.attach(s(2), LogIndex(100));
    assert_eq!(replicas.quorum(), None);
    replicas.acked(s(2), session, LogIndex(40), &storage);
    assert_eq!(replicas.quorum(), None, "still catching up");
    assert!(replicas.in_sync().is_empty());
}

#[test]
fn a_slave_counts_once_caught_up_and_is_in_sync_once_it_has_everything_committed() {
    let storage = MemoryStorage::new();
    let mut replicas = Replicas::default();
    let session = replicas.attach(s(2), LogIndex(0));
    replicas.caught_up(s(2), session, LogIndex(100));
    assert_eq!(
        replicas.quorum(),
        Some(LogIndex(0)),
        "commits now wait for it"
    );
    assert!(!replicas.acked(s(2), session, LogIndex(99), &storage));
    assert!(
        replicas.in_sync().is_empty(),
        "entry 100 is committed and not on the slave"
    );
    assert!(replicas.acked(s(2), session, LogIndex(100), &storage));
    assert_eq!(replicas.in_sync(), vec![(s(2), LogIndex(100))]);
    assert_eq!(replicas.quorum(), Some(LogIndex(100)));
}

#[test]
fn an_unannounced_slave_leaves_at_once_an_announced_one_only_after_an_answered_beat() {
    let storage = MemoryStorage::new();
    let mut replicas = Replicas::default();
    let first = replicas.attach(s(2), LogIndex(0));
    replicas.caught_up(s(2), first, LogIndex(0));
    replicas.acked(s(2), first, LogIndex(5), &storage);
    assert!(
        !replicas.detach(s(2), first, &storage),
        "the coordinator never heard of it"
    );
    assert_eq!(replicas.quorum(), None);

    let second = replicas.attach(s(2), LogIndex(5));
    replicas.caught_up(s(2), second, LogIndex(5));
    replicas.acked(s(2), second, LogIndex(7), &storage);
    let (beat, named) = replicas.announce();
    assert_eq!(named, vec![(s(2), LogIndex(7))]);
    assert!(
        replicas.detach(s(2), second, &storage),
        "must leave through the coordinator"
    );
    assert_eq!(
        replicas.quorum(),
        Some(LogIndex(7)),
        "commits past 7 wait until the coordinator knows"
    );
    assert!(
        !replicas.confirmed(beat, &storage),
        "the answered beat was built while it was still in sync"
    );
    let (next, named) = replicas.announce();
    assert!(named.is_empty());
    assert!(replicas.confirmed(next, &storage));
    assert_eq!(replicas.quorum(), None);
}

#[test]
fn a_counted_slave_that_reconnects_stays_counted_and_old_sessions_are_ignored() {
    let storage = MemoryStorage::new();
    let mut replicas = Replicas::default();
    let old = replicas.attach(s(2), LogIndex(0));
    replicas.caught_up(s(2), old, LogIndex(0));
    replicas.acked(s(2), old, LogIndex(10), &storage);
    let new = replicas.attach(s(2), LogIndex(10));
    assert_eq!(
        replicas.quorum(),
        Some(LogIndex(0)),
        "counted from the start"
    );
    assert!(!replicas.is_counted(s(2), old));
    replicas.acked(s(2), old, LogIndex(50), &storage);
    assert_eq!(
        replicas.quorum(),
        Some(LogIndex(0)),
        "the old stream's acks are ignored"
    );
    assert!(!replicas.detach(s(2), old, &storage));
    assert!(
        replicas.is_counted(s(2), new),
        "ending the old stream leaves the new one alone"
    );
}

mod sessions {
    //! A master's shipping session, driven by hand: the test plays the slave.

    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;

    use super::super::{FromSlave, Hello, Shipment, ToSlave};
    use crate::error::Result;
    use crate::ids::{LogIndex, ServerId, UserId};
    use crate::server::{Role, Server, ServerConfig};
    use crate::storage::MemoryStorage;

    fn u(id: u32) -> UserId {
        UserId::new(id).expect("user")
    }

    /// The next entries shipped (or `None` once the session is over), answering keep-alives
    /// with `acked`.
    async fn next_entries(
        shipped: &mut mpsc::Receiver<ToSlave>,
        acks: &mpsc::Sender<Result<FromSlave>>,
        acked: LogIndex,
    ) -> Option<Vec<crate::event::LogEntry>> {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), shipped.recv())
                .await
                .expect("the master ships or ends the session within 10 s")?;
            match message.body {
                Shipment::Entries(entries) => return Some(entries),
                Shipment::KeepAlive => {
                    let _ = acks.send(Ok(FromSlave::Durable(acked))).await;
                }
                other => panic!("unexpected shipment {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_master_that_stepped_down_and_is_master_again_ships_nothing_more_in_an_old_session() {
        let config = ServerConfig {
            clusters: 1,
            ..ServerConfig::default()
        };
        let server = Server::open(config, Arc::new(MemoryStorage::new()))
            .await
            .expect("open");
        server.login(u(1)).await.expect("login 1");
        server.login(u(2)).await.expect("login 2");
        let before = server.positions();

        let (acks, inbound) = mpsc::channel(16);
        let (out, mut shipped) = mpsc::channel(16);
        let hello = Hello {
            cluster: server.config().cluster,
            server: ServerId::new(2).expect("server"),
            known_epoch: before.known_epoch,
            last_index: LogIndex(0),
            last_epoch: before.epoch,
            commit: LogIndex(0),
        };
        let admitted = server.attach_slave(hello).expect("attached");
        let session = tokio::spawn({
            let server = server.clone();
            async move {
                server
                    .ship_to_slave(admitted, ReceiverStream::new(inbound), out)
                    .await;
            }
        });
        // The slave catches up and acknowledges: from now on commits wait for it.
        let mut held = LogIndex(0);
        while held < before.sequenced {
            let entries = next_entries(&mut shipped, &acks, held)
                .await
                .expect("entries");
            held = entries.last().expect("an entry").index;
        }
        acks.send(Ok(FromSlave::Durable(held))).await.expect("ack");

        // A change reaches the slave, which does not acknowledge it: it stays uncommitted.
        let pending = tokio::spawn({
            let server = server.clone();
            async move { server.follow(u(1), "2").await }
        });
        let uncommitted = next_entries(&mut shipped, &acks, held)
            .await
            .expect("entries");
        assert_eq!(uncommitted[0].index, held.next());

        // The master steps down (discarding that change) and is made master again before the
        // session noticed.
        server.set_role(Role::Slave);
        server.set_role(Role::Master);
        assert!(
            pending.await.expect("task").is_err(),
            "the change was discarded"
        );
        // New changes take the discarded one's index and the next.
        server.follow(u(2), "1").await.expect("follow 2 -> 1");
        server.follow(u(1), "2").await.expect("follow 1 -> 2");
        assert_eq!(server.positions().commit, LogIndex(held.0 + 2));

        // The slave holds the discarded change at `held + 1`: shipping `held + 2` after it
        // would make it commit a change the master dropped. The session must end instead, so
        // the slave dials again and its log is repaired.
        let more = next_entries(&mut shipped, &acks, held).await;
        assert!(
            more.is_none(),
            "the old session shipped {more:?} after the master discarded entries"
        );
        tokio::time::timeout(Duration::from_secs(10), session)
            .await
            .expect("the session ends")
            .expect("task");
    }
}
