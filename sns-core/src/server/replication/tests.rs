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
