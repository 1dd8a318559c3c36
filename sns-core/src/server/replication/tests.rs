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

    use super::super::master::COMMIT_LINGER;
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
        // The slave catches up and acknowledges: from now on commits wait for it.
        let (server, mut shipped, acks, session) = caught_up_session().await;
        let held = server.positions().commit;

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

    /// A master with two users logged in and a slave session that has caught up, acknowledged
    /// everything and been told it is committed: the master, the shipments, the slave's
    /// acknowledgements and the session's task.
    async fn caught_up_session() -> (
        Server,
        mpsc::Receiver<ToSlave>,
        mpsc::Sender<Result<FromSlave>>,
        tokio::task::JoinHandle<()>,
    ) {
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
        let mut held = LogIndex(0);
        while held < before.sequenced {
            let entries = next_entries(&mut shipped, &acks, held)
                .await
                .expect("entries");
            held = entries.last().expect("an entry").index;
        }
        acks.send(Ok(FromSlave::Durable(held))).await.expect("ack");
        // The slave is told that what it holds is committed.
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), shipped.recv())
                .await
                .expect("the master tells the commit within 10 s")
                .expect("the session goes on");
            if message.commit == held {
                break;
            }
        }
        (server, shipped, acks, session)
    }

    /// Makes one change and lets the slave acknowledge it: returns once it is committed,
    /// with the shipment that carried it.
    async fn commit_one_change(
        server: &Server,
        shipped: &mut mpsc::Receiver<ToSlave>,
        acks: &mpsc::Sender<Result<FromSlave>>,
        follower: u32,
        followee: &'static str,
    ) -> ToSlave {
        let pending = tokio::spawn({
            let server = server.clone();
            async move { server.follow(u(follower), followee).await }
        });
        let message = tokio::time::timeout(Duration::from_secs(10), shipped.recv())
            .await
            .expect("the change is shipped within 10 s")
            .expect("the session goes on");
        let Shipment::Entries(entries) = &message.body else {
            panic!("the change came as {:?}, not as entries", message.body);
        };
        let last = entries.last().expect("an entry").index;
        acks.send(Ok(FromSlave::Durable(last))).await.expect("ack");
        pending.await.expect("task").expect("the change commits");
        assert_eq!(server.positions().commit, last);
        message
    }

    #[tokio::test(start_paused = true)]
    async fn a_commit_with_no_shipment_after_it_is_told_alone_after_the_linger() {
        let (server, mut shipped, acks, session) = caught_up_session().await;
        commit_one_change(&server, &mut shipped, &acks, 1, "2").await;
        let commit = server.positions().commit;
        // The shipping session notices the commit before the paused clock moves on.
        let committed_at = tokio::time::Instant::now();

        let told = tokio::time::timeout(COMMIT_LINGER * 2, shipped.recv())
            .await
            .expect("the commit is told once the linger is over")
            .expect("the session goes on");
        assert_eq!(told.body, Shipment::KeepAlive);
        assert_eq!(told.commit, commit);
        let waited = committed_at.elapsed();
        assert!(
            (COMMIT_LINGER..COMMIT_LINGER + Duration::from_millis(2)).contains(&waited),
            "the commit was told {waited:?} after it was made, not after the linger"
        );
        session.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_commit_rides_on_the_next_shipment_and_costs_no_message_of_its_own() {
        let (server, mut shipped, acks, session) = caught_up_session().await;
        commit_one_change(&server, &mut shipped, &acks, 1, "2").await;
        let first = server.positions().commit;

        // The next change is shipped within the linger: it carries the commit.
        let next = commit_one_change(&server, &mut shipped, &acks, 2, "1").await;
        assert_eq!(
            next.commit, first,
            "the shipment carries the commit before it"
        );
        let second = server.positions().commit;

        // And a third right after the second commit: it carries the second.
        let pending = tokio::spawn({
            let server = server.clone();
            async move { server.unfollow(u(1), "2").await }
        });
        let third = tokio::time::timeout(Duration::from_secs(10), shipped.recv())
            .await
            .expect("the change is shipped within 10 s")
            .expect("the session goes on");
        assert!(
            matches!(third.body, Shipment::Entries(_)),
            "the commit was told alone before the next shipment: {third:?}"
        );
        assert_eq!(third.commit, second);

        // Nothing further: the second commit was told, and the third change is not acknowledged.
        let silent = tokio::time::timeout(COMMIT_LINGER * 4, shipped.recv()).await;
        assert!(
            silent.is_err(),
            "a commit already told was told again: {silent:?}"
        );
        pending.abort();
        session.abort();
    }
}
