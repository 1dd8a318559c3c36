//! The conformance suite for [`Storage`] implementations: the checks this crate runs against
//! [`MemoryStorage`](crate::MemoryStorage), [`FileStorage`](crate::FileStorage) and
//! [`CrashDisk`](crate::CrashDisk), for anyone who writes their own storage.
//!
//! Each [`Check`] opens a fresh storage through a [`Harness`], writes to it, "restarts" it (drops
//! it and opens the same data again, as a restarted process would) and verifies what came back
//! against the invariants written on [`Storage`]:
//!
//! - [`Check::AppendRecoverAndSnapshot`]: an empty storage recovers nothing; acknowledged
//!   appends survive a restart; a gap is refused; a snapshot compacts the entries it covers and
//!   restores to the state it was taken of; a snapshot at the very end leaves no entries.
//! - [`Check::Reads`]: [`Storage::read`] at the start, middle and end of the log, clipped to
//!   the last entry, empty ranges; after a snapshot with no reader, reads below the first entry
//!   held fail with [`Error::Compacted`] naming it.
//! - [`Check::Truncation`]: [`Storage::truncate_after`] removes a divergent tail and the log
//!   continues after the cut; truncation below the commit index or the snapshot is refused
//!   with [`Error::Conflict`] and changes nothing; every cut survives a restart.
//! - [`Check::Positions`]: [`Storage::position`] finds the index of every event held (three
//!   origins interleaved), and nothing for unknown, truncated or compacted events.
//! - [`Check::CommitIndex`]: [`Storage::set_commit`] never regresses, is clamped to the last
//!   durable entry and is recovered after a restart.
//! - [`Check::Retention`]: compaction keeps the entries registered readers
//!   ([`Storage::retain`]) still need, at most [`RETENTION`] entries behind the snapshot; a
//!   released reader no longer holds entries back; a restart forgets readers, not entries.
//! - [`Check::SnapshotAheadOfTheLog`]: a snapshot installed from elsewhere, ahead of the log,
//!   empties the log, which continues after it.
//! - [`Check::OversizedRecords`]: a record over
//!   [`MAX_RECORD_BYTES`](crate::event::MAX_RECORD_BYTES) is refused with
//!   [`Error::InvalidInput`] before anything is written (see
//!   [`check_entry_fits`](crate::event::check_entry_fits)), and the storage goes on.
//!
//! What it does not check: crash safety (losing exactly the unsynced writes needs a disk that
//! can lose power, like [`CrashDisk`](crate::CrashDisk)), damage to files, exclusive access to
//! a data directory, or group commit under concurrency. The crate tests those for its own
//! storages separately.
//!
//! ```
//! use sns_core::testing::storage_suite::{self, Harness, RETENTION};
//! use sns_core::{MemoryStorage, Storage};
//!
//! /// Restarting a `MemoryStorage` is opening the same one again.
//! struct Restartable(MemoryStorage);
//!
//! impl Harness for Restartable {
//!     fn open(&mut self) -> sns_core::Result<Box<dyn Storage>> {
//!         Ok(Box::new(self.0.clone()))
//!     }
//! }
//!
//! # #[tokio::main]
//! # async fn main() {
//! storage_suite::run_all(|| Restartable(MemoryStorage::with_retention(RETENTION))).await;
//! # }
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::event::{Event, EventKind, LogEntry};
use crate::ids::{ClusterId, Epoch, EventId, LogIndex, Timestamp, UserId};
use crate::state::State;
use crate::storage::{Recovered, Snapshot, Storage};

/// How many entries, at most, the storages under test keep behind a snapshot for registered
/// readers (their retention option): [`Check::Retention`] counts on exactly this bound.
pub const RETENTION: u64 = 10;

/// Opens the storage under test, and opens it again as a restarted process would.
///
/// Each check gets a harness of its own (from the `make` closure of [`run_all`]). The first
/// [`open`](Harness::open) must give an empty storage that keeps [`RETENTION`] entries behind a
/// snapshot for readers; every later one is called after the previous instance was dropped and
/// must give a storage over the same data, holding everything that was durable.
pub trait Harness: Send + 'static {
    /// Opens the storage (again).
    fn open(&mut self) -> Result<Box<dyn Storage>>;
}

/// One check of the suite; [`Check::ALL`] lists them in the order [`run_all`] runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Check {
    /// Appends, recovery after a restart, snapshots and the compaction they allow.
    AppendRecoverAndSnapshot,
    /// Reads of ranges of the log, before and after compaction and restarts.
    Reads,
    /// Truncation of a divergent tail, and its refusal below the commit index or snapshot.
    Truncation,
    /// Positions of events in the log, through truncation, compaction and restarts.
    Positions,
    /// The commit index: monotonic, clamped to durable entries, persisted.
    CommitIndex,
    /// Entries kept for registered readers, within the retention bound.
    Retention,
    /// A snapshot installed ahead of the log.
    SnapshotAheadOfTheLog,
    /// A record over the size limit is refused and changes nothing.
    OversizedRecords,
}

impl Check {
    /// Every check, in the order [`run_all`] runs them.
    pub const ALL: [Check; 8] = [
        Check::AppendRecoverAndSnapshot,
        Check::Reads,
        Check::Truncation,
        Check::Positions,
        Check::CommitIndex,
        Check::Retention,
        Check::SnapshotAheadOfTheLog,
        Check::OversizedRecords,
    ];

    /// The check's name, as failures report it.
    pub fn name(self) -> &'static str {
        match self {
            Check::AppendRecoverAndSnapshot => "append_recover_and_snapshot",
            Check::Reads => "reads",
            Check::Truncation => "truncation",
            Check::Positions => "positions",
            Check::CommitIndex => "commit_index",
            Check::Retention => "retention",
            Check::SnapshotAheadOfTheLog => "snapshot_ahead_of_the_log",
            Check::OversizedRecords => "oversized_records",
        }
    }

    /// Runs this check against the storage `harness` opens, on a task of the current tokio
    /// runtime. Panics, naming the check and saying what went wrong, if the storage fails it.
    pub async fn run<H: Harness>(self, harness: H) {
        let running = match self {
            Check::AppendRecoverAndSnapshot => tokio::spawn(append_recover_and_snapshot(harness)),
            Check::Reads => tokio::spawn(reads(harness)),
            Check::Truncation => tokio::spawn(truncation(harness)),
            Check::Positions => tokio::spawn(positions(harness)),
            Check::CommitIndex => tokio::spawn(commit_index(harness)),
            Check::Retention => tokio::spawn(retention(harness)),
            Check::SnapshotAheadOfTheLog => tokio::spawn(snapshot_ahead_of_the_log(harness)),
            Check::OversizedRecords => tokio::spawn(oversized_records(harness)),
        };
        if let Err(failed) = running.await {
            let reason = if failed.is_panic() {
                let payload = failed.into_panic();
                payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "a panic without a message".to_string())
            } else {
                "the check's task was cancelled".to_string()
            };
            panic!("storage suite: check `{}` failed: {reason}", self.name());
        }
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Runs every check of [`Check::ALL`], each on a fresh harness from `make`, and stops at the
/// first failure with a panic naming the check.
pub async fn run_all<H: Harness>(make: impl Fn() -> H) {
    for check in Check::ALL {
        check.run(make()).await;
    }
}

/// Opens the storage through `harness`, failing the check if it cannot.
fn open(harness: &mut impl Harness) -> Box<dyn Storage> {
    harness
        .open()
        .unwrap_or_else(|e| panic!("the harness could not open the storage: {e}"))
}

fn cluster(id: u32) -> ClusterId {
    ClusterId::new(id).expect("valid cluster")
}

/// The entry at `index` carrying event `origin:seq`, written under `epoch`.
pub(crate) fn entry_of(index: u64, epoch: u64, origin: u32, seq: u64) -> LogEntry {
    let user = UserId::new(index as u32 % 7 + 1).expect("valid user");
    let kind = match index % 3 {
        0 => EventKind::UserJoined { user },
        1 => EventKind::Posted {
            author: user,
            text: Arc::from(format!("post number {index}")),
            key: None,
        },
        _ => EventKind::Followed {
            follower: user,
            followee: UserId::new(9).expect("valid user"),
        },
    };
    LogEntry {
        index: LogIndex(index),
        epoch: Epoch(epoch),
        event: Event {
            id: EventId {
                origin: cluster(origin),
                seq,
            },
            at: Timestamp(index as i64 * 1000),
            kind,
        },
    }
}

/// The standard entry at `index`: origin 1's event `index`.
pub(crate) fn entry(index: u64) -> LogEntry {
    entry_of(index, 1 + index / 10, 1, index)
}

pub(crate) fn entries(range: std::ops::RangeInclusive<u64>) -> Vec<LogEntry> {
    range.map(entry).collect()
}

/// Entries that differ from [`entries`] at the same indexes (another origin, a later epoch), as
/// a new master would have written them.
pub(crate) fn divergent(range: std::ops::RangeInclusive<u64>) -> Vec<LogEntry> {
    range.map(|i| entry_of(i, 99, 2, i)).collect()
}

/// A snapshot at `index` (its state is irrelevant to the storage).
pub(crate) fn snapshot_at(index: u64) -> Snapshot {
    Snapshot::of(&State::default(), LogIndex(index), Epoch(1))
}

pub(crate) async fn read_all(storage: &dyn Storage) -> Vec<LogEntry> {
    storage
        .read(LogIndex(0), LogIndex(u64::MAX))
        .await
        .expect("read the whole log")
}

/// The first index the storage still holds, as a read from 1 reports it.
pub(crate) async fn first_held(storage: &dyn Storage) -> u64 {
    match storage.read(LogIndex(1), LogIndex(1)).await {
        Ok(_) => 1,
        Err(Error::Compacted { first }) => first.0,
        Err(e) => panic!("unexpected read error: {e}"),
    }
}

/// Reads `from..=to`, which must fail as compacted; returns the first index still held.
pub(crate) async fn compacted(storage: &dyn Storage, from: u64, to: u64) -> u64 {
    match storage.read(LogIndex(from), LogIndex(to)).await {
        Err(Error::Compacted { first }) => first.0,
        other => panic!("a read of compacted entries {from}..={to} gave {other:?}"),
    }
}

async fn append_recover_and_snapshot(mut harness: impl Harness) {
    // Empty at first.
    {
        let storage = open(&mut harness);
        assert_eq!(
            storage.recover().await.expect("recover"),
            Recovered::default()
        );
        storage.append(entries(1..=3)).await.expect("append");
        storage.append(entries(4..=20)).await.expect("append");
        // A gap is refused and changes nothing.
        assert!(
            storage.append(entries(22..=23)).await.is_err(),
            "an append after a gap (22 after 20) must be refused"
        );
    }
    // Restart: everything acknowledged is back.
    {
        let storage = open(&mut harness);
        let back = storage.recover().await.expect("recover");
        assert_eq!(back.snapshot, None);
        assert_eq!(back.entries, entries(1..=20));
        assert_eq!(back.last_index(), LogIndex(20));
        // Snapshot at 15: entries up to 15 may go, 16.. stay.
        let mut state = crate::state::State::default();
        for e in &back.entries[..15] {
            state.apply(&e.event);
        }
        let snapshot = Snapshot::of(&state, LogIndex(15), Epoch(2));
        storage
            .save_snapshot(snapshot.clone())
            .await
            .expect("snapshot");
        storage.append(entries(21..=25)).await.expect("append");
        let now = storage.recover().await.expect("recover");
        assert_eq!(now.snapshot.as_ref(), Some(&snapshot));
        assert_eq!(now.entries, entries(16..=25));
        assert_eq!(storage.snapshot().await.expect("snapshot"), Some(snapshot));
    }
    // Restart after compaction.
    {
        let storage = open(&mut harness);
        let back = storage.recover().await.expect("recover");
        assert_eq!(back.snapshot.as_ref().map(|s| s.index), Some(LogIndex(15)));
        assert_eq!(back.entries, entries(16..=25));
        assert_eq!(storage.snapshot().await.expect("snapshot"), back.snapshot);
        assert_eq!(back.last_index(), LogIndex(25));
        // The snapshot restores to a state equal to replaying the first 15 entries.
        let mut expected = crate::state::State::default();
        for e in entries(1..=15) {
            expected.apply(&e.event);
        }
        let restored = back.snapshot.as_ref().map(|s| {
            s.restore(&crate::state::StateConfig::default())
                .expect("restore")
        });
        assert_eq!(restored, Some(expected));
        // A snapshot at the very end leaves no entries.
        let state = back
            .replay(&crate::state::StateConfig::default())
            .expect("replay");
        storage
            .save_snapshot(Snapshot::of(&state, LogIndex(25), Epoch(3)))
            .await
            .expect("snapshot");
        storage.append(entries(26..=26)).await.expect("append");
    }
    {
        let storage = open(&mut harness);
        let back = storage.recover().await.expect("recover");
        assert_eq!(back.snapshot.as_ref().map(|s| s.index), Some(LogIndex(25)));
        assert_eq!(back.entries, entries(26..=26));
    }
}

async fn reads(mut harness: impl Harness) {
    {
        let storage = open(&mut harness);
        storage.append(entries(1..=10)).await.expect("append");
        for i in 11..=30 {
            storage.append(entries(i..=i)).await.expect("append");
        }
        let read = |from, to| storage.read(LogIndex(from), LogIndex(to));
        assert_eq!(read(1, 30).await.expect("read"), entries(1..=30));
        assert_eq!(read(1, 1).await.expect("start"), entries(1..=1));
        assert_eq!(read(12, 17).await.expect("middle"), entries(12..=17));
        assert_eq!(read(30, 30).await.expect("end"), entries(30..=30));
        assert_eq!(read(25, 1000).await.expect("clipped"), entries(25..=30));
        assert_eq!(read(0, 2).await.expect("from 0"), entries(1..=2));
        assert_eq!(read(31, 40).await.expect("after the end"), vec![]);
        assert_eq!(read(20, 10).await.expect("empty range"), vec![]);
    }
    {
        let storage = open(&mut harness);
        assert_eq!(read_all(&*storage).await, entries(1..=30));
        assert_eq!(
            storage
                .read(LogIndex(12), LogIndex(17))
                .await
                .expect("read"),
            entries(12..=17)
        );
        // No reader: a snapshot at 20 compacts what it covers (files: whole segments).
        storage
            .save_snapshot(snapshot_at(20))
            .await
            .expect("snapshot");
        let first = first_held(&*storage).await;
        assert!(
            (2..=21).contains(&first),
            "a snapshot at 20 with no reader must compact the log (first held {first})"
        );
        assert_eq!(compacted(&*storage, 1, 30).await, first);
        assert_eq!(
            storage
                .read(LogIndex(first), LogIndex(30))
                .await
                .expect("read"),
            entries(first..=30)
        );
        storage.append(entries(31..=32)).await.expect("append");
        assert_eq!(
            storage
                .read(LogIndex(29), LogIndex(40))
                .await
                .expect("read"),
            entries(29..=32)
        );
    }
    {
        let storage = open(&mut harness);
        let back = storage.recover().await.expect("recover");
        assert_eq!(back.entries, entries(21..=32));
        let first = first_held(&*storage).await;
        assert!(
            (2..=21).contains(&first),
            "a snapshot at 20 with no reader must compact the log (first held {first})"
        );
        assert_eq!(read_all_from(&*storage, first).await, entries(first..=32));
    }
}

pub(crate) async fn read_all_from(storage: &dyn Storage, first: u64) -> Vec<LogEntry> {
    storage
        .read(LogIndex(first), LogIndex(u64::MAX))
        .await
        .expect("read")
}

async fn truncation(mut harness: impl Harness) {
    {
        let storage = open(&mut harness);
        for i in 1..=30 {
            storage.append(entries(i..=i)).await.expect("append");
        }
        storage.set_commit(LogIndex(10));
        // Below the commit index: refused, nothing changes.
        let refused = storage.truncate_after(LogIndex(9)).await;
        assert!(
            matches!(refused, Err(Error::Conflict(_))),
            "a truncation after 9 with entries up to 10 committed must be refused with \
             Error::Conflict, got {refused:?}"
        );
        assert_eq!(read_all(&*storage).await, entries(1..=30));
        // A divergent tail goes; the next append continues after the cut.
        storage
            .truncate_after(LogIndex(20))
            .await
            .expect("truncate");
        assert_eq!(read_all(&*storage).await, entries(1..=20));
        assert!(
            storage.append(entries(25..=25)).await.is_err(),
            "after a truncation after 20, an append at 25 must be refused"
        );
        storage.append(divergent(21..=23)).await.expect("append");
        let mut expected = entries(1..=20);
        expected.extend(divergent(21..=23));
        assert_eq!(read_all(&*storage).await, expected);
        // Truncating after the last entry changes nothing.
        storage.truncate_after(LogIndex(23)).await.expect("no-op");
        storage.truncate_after(LogIndex(40)).await.expect("no-op");
        assert_eq!(read_all(&*storage).await, expected);
    }
    {
        let storage = open(&mut harness);
        let back = storage.recover().await.expect("recover");
        let mut expected = entries(1..=20);
        expected.extend(divergent(21..=23));
        assert_eq!(back.entries, expected);
        assert_eq!(back.commit, LogIndex(10));
        assert!(
            storage.truncate_after(LogIndex(9)).await.is_err(),
            "a truncation below the recovered commit index (10) must be refused"
        );
        // Every cut from the end down to the commit index, each followed by a check.
        for cut in (10..=22).rev() {
            storage
                .truncate_after(LogIndex(cut))
                .await
                .expect("truncate");
            assert_eq!(
                read_all(&*storage).await,
                expected[..cut as usize],
                "cut {cut}"
            );
        }
        // Below the snapshot: refused.
        storage
            .save_snapshot(snapshot_at(8))
            .await
            .expect("snapshot");
        storage.append(entries(11..=14)).await.expect("append");
        storage.set_commit(LogIndex(12));
        assert!(
            storage.truncate_after(LogIndex(11)).await.is_err(),
            "a truncation below the commit index (12) must be refused"
        );
        storage
            .truncate_after(LogIndex(12))
            .await
            .expect("truncate");
        storage.append(divergent(13..=13)).await.expect("append");
    }
    {
        let storage = open(&mut harness);
        let back = storage.recover().await.expect("recover");
        let mut expected = entries(9..=12);
        expected.extend(divergent(13..=13));
        assert_eq!(back.entries, expected);
        assert_eq!(back.commit, LogIndex(12));
        assert_eq!(back.snapshot.map(|s| s.index), Some(LogIndex(8)));
    }
}

async fn positions(mut harness: impl Harness) {
    // Three origins interleaved; each origin's sequence numbers increase along the log.
    let mut seqs = BTreeMap::new();
    let log: Vec<LogEntry> = (1..=24)
        .map(|i| {
            let origin = 1 + (i as u32 * 7 % 3);
            let seq = seqs.entry(origin).or_insert(0u64);
            *seq += 1;
            entry_of(i, 1, origin, *seq)
        })
        .collect();
    let id_of = |i: u64| log[i as usize - 1].event.id;
    let check = async |storage: &dyn Storage, held: std::ops::RangeInclusive<u64>| {
        for i in 1..=24 {
            let found = storage.position(id_of(i)).await.expect("position");
            let expected = held.contains(&i).then_some(LogIndex(i));
            assert_eq!(found, expected, "position of {} (index {i})", id_of(i));
        }
        let unknown_seq = EventId {
            origin: cluster(1),
            seq: 1000,
        };
        assert_eq!(storage.position(unknown_seq).await.expect("position"), None);
        let unknown_origin = EventId {
            origin: cluster(9),
            seq: 1,
        };
        assert_eq!(
            storage.position(unknown_origin).await.expect("position"),
            None
        );
    };
    {
        let storage = open(&mut harness);
        storage.append(log[..10].to_vec()).await.expect("append");
        for entry in &log[10..] {
            storage.append(vec![entry.clone()]).await.expect("append");
        }
        check(&*storage, 1..=24).await;
    }
    {
        let storage = open(&mut harness);
        check(&*storage, 1..=24).await;
        storage
            .truncate_after(LogIndex(18))
            .await
            .expect("truncate");
        check(&*storage, 1..=18).await;
        storage
            .save_snapshot(snapshot_at(12))
            .await
            .expect("snapshot");
        let first = first_held(&*storage).await;
        check(&*storage, first..=18).await;
    }
    {
        let storage = open(&mut harness);
        let first = first_held(&*storage).await;
        assert!(first > 1, "a snapshot at 12 must have compacted the log");
        check(&*storage, first..=18).await;
        storage.append(log[18..20].to_vec()).await.expect("append");
        check(&*storage, first..=20).await;
    }
}

async fn commit_index(mut harness: impl Harness) {
    {
        let storage = open(&mut harness);
        assert_eq!(
            storage.recover().await.expect("recover").commit,
            LogIndex(0)
        );
        storage.append(entries(1..=10)).await.expect("append");
        storage.set_commit(LogIndex(5));
        storage.set_commit(LogIndex(3)); // never regresses
    }
    {
        let storage = open(&mut harness);
        assert_eq!(
            storage.recover().await.expect("recover").commit,
            LogIndex(5)
        );
        // Never beyond the durable entries.
        storage.set_commit(LogIndex(100));
        storage.append(entries(11..=12)).await.expect("append");
    }
    {
        let storage = open(&mut harness);
        let back = storage.recover().await.expect("recover");
        assert_eq!(back.commit, LogIndex(10));
        assert!(
            storage.truncate_after(LogIndex(9)).await.is_err(),
            "a truncation below the recovered commit index (10) must be refused"
        );
        storage.set_commit(LogIndex(12));
        storage.set_commit(LogIndex(11));
    }
    {
        let storage = open(&mut harness);
        assert_eq!(
            storage.recover().await.expect("recover").commit,
            LogIndex(12)
        );
    }
}

async fn retention(mut harness: impl Harness) {
    {
        let storage = open(&mut harness);
        for i in 1..=40 {
            storage.append(entries(i..=i)).await.expect("append");
        }
        // A slave needs everything after 30: a snapshot at 35 keeps 31..=35 for it. A reader
        // further behind than the retention bound (10 entries) loses its entries.
        storage.retain("slave", LogIndex(30));
        storage.retain("far", LogIndex(2));
        storage
            .save_snapshot(snapshot_at(35))
            .await
            .expect("snapshot");
        assert_eq!(read_all_from(&*storage, 31).await, entries(31..=40));
        let first = compacted(&*storage, 3, 40).await;
        assert!(
            (4..=26).contains(&first),
            "a reader 33 entries behind the snapshot must lose all but {RETENTION} of them \
             (first held {first})"
        );
        assert_eq!(
            storage.recover().await.expect("recover").entries,
            entries(36..=40)
        );
        // The next snapshot still keeps the slave's entries.
        storage.release("far");
        storage
            .save_snapshot(snapshot_at(38))
            .await
            .expect("snapshot");
        assert_eq!(read_all_from(&*storage, 31).await, entries(31..=40));
        assert_eq!(
            storage.recover().await.expect("recover").entries,
            entries(39..=40)
        );
    }
    {
        // A restart forgets the readers but not the entries kept for them.
        let storage = open(&mut harness);
        let back = storage.recover().await.expect("recover");
        assert_eq!(back.snapshot.map(|s| s.index), Some(LogIndex(38)));
        assert_eq!(back.entries, entries(39..=40));
        assert_eq!(read_all_from(&*storage, 31).await, entries(31..=40));
        // With no reader left, the next snapshot drops everything it covers.
        storage.retain("slave", LogIndex(35));
        storage.release("slave");
        storage
            .save_snapshot(snapshot_at(40))
            .await
            .expect("snapshot");
        assert_eq!(compacted(&*storage, 31, 40).await, 41);
        storage.append(entries(41..=42)).await.expect("append");
    }
    {
        let storage = open(&mut harness);
        let back = storage.recover().await.expect("recover");
        assert_eq!(back.snapshot.map(|s| s.index), Some(LogIndex(40)));
        assert_eq!(back.entries, entries(41..=42));
        assert_eq!(read_all_from(&*storage, 41).await, entries(41..=42));
    }
}

async fn snapshot_ahead_of_the_log(mut harness: impl Harness) {
    {
        let storage = open(&mut harness);
        storage.retain("slave", LogIndex(0));
        storage.append(entries(1..=5)).await.expect("append");
        // Installed from elsewhere: the log restarts after it.
        storage
            .save_snapshot(snapshot_at(10))
            .await
            .expect("snapshot");
        assert_eq!(compacted(&*storage, 1, 10).await, 11);
        assert!(
            storage.append(entries(6..=6)).await.is_err(),
            "after a snapshot at 10, an append at 6 must be refused"
        );
        storage
            .append(entries(11..=12))
            .await
            .expect("append after");
    }
    {
        let storage = open(&mut harness);
        let back = storage.recover().await.expect("recover");
        assert_eq!(back.last_index(), LogIndex(12));
        assert_eq!(back.entries, entries(11..=12));
        storage.append(entries(13..=13)).await.expect("append");
    }
    let storage = open(&mut harness);
    assert_eq!(
        storage.recover().await.expect("recover").entries,
        entries(11..=13)
    );
    assert_eq!(read_all_from(&*storage, 11).await, entries(11..=13));
}

/// Runs every scenario above against each harness.
/// A record over the limit is refused before anything is written, and the storage goes on.
async fn oversized_records(mut harness: impl Harness) {
    let storage = open(&mut harness);
    storage.append(entries(1..=2)).await.expect("append");
    let mut huge = entry_of(3, 1, 1, 3);
    huge.event.kind = EventKind::Image(Arc::new(crate::event::OriginImage {
        posts: (1..=400)
            .map(|seq| crate::event::Post {
                id: EventId {
                    origin: cluster(1),
                    seq,
                },
                author: UserId::new(1).expect("valid user"),
                at: Timestamp(1),
                text: Arc::from("y".repeat(4000)),
            })
            .collect(),
        ..crate::event::OriginImage::default()
    }));
    let refused = storage.append(vec![huge]).await;
    assert!(
        matches!(&refused, Err(Error::InvalidInput(m)) if m.contains("over the limit")),
        "{refused:?}"
    );
    storage.append(entries(3..=4)).await.expect("append");
    drop(storage);
    let storage = open(&mut harness);
    assert_eq!(
        storage.recover().await.expect("recover").entries,
        entries(1..=4)
    );
}
