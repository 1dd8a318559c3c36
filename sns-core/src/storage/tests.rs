//! One test suite, run against every [`Storage`]: appends, recovery after restart, snapshots.
//! File-specific tests (torn tails, bit flips, locking, group commit) follow.

use std::sync::Arc;

use proptest::prelude::*;

use super::file::{frame, list, parse_segment};
use super::*;
use crate::event::{Event, EventKind, LogEntry};
use crate::ids::{ClusterId, EventId, Timestamp, UserId};

/// Opens a storage, and opens it again as a restarted process would.
trait Harness {
    fn open(&mut self) -> Box<dyn Storage>;
}

struct Memory(MemoryStorage);

impl Harness for Memory {
    fn open(&mut self) -> Box<dyn Storage> {
        Box::new(self.0.clone())
    }
}

struct Files(tempfile::TempDir);

impl Harness for Files {
    fn open(&mut self) -> Box<dyn Storage> {
        let options = FileStorageOptions {
            // Small segments so that rotation and compaction across segments are exercised.
            segment_bytes: 512,
            ..FileStorageOptions::default()
        };
        Box::new(FileStorage::open_with(self.0.path(), options).expect("open storage"))
    }
}

fn files() -> Files {
    Files(tempfile::tempdir().expect("temp dir"))
}

fn entry(index: u64) -> LogEntry {
    let user = UserId::new(index as u32 % 7 + 1).expect("valid user");
    let kind = match index % 3 {
        0 => EventKind::UserJoined { user },
        1 => EventKind::Posted {
            author: user,
            text: Arc::from(format!("post number {index}")),
        },
        _ => EventKind::Followed {
            follower: user,
            followee: UserId::new(9).expect("valid user"),
        },
    };
    LogEntry {
        index: LogIndex(index),
        epoch: Epoch(1 + index / 10),
        event: Event {
            id: EventId {
                origin: ClusterId::new(1).expect("valid cluster"),
                seq: index,
            },
            at: Timestamp(index as i64 * 1000),
            kind,
        },
    }
}

fn entries(range: std::ops::RangeInclusive<u64>) -> Vec<LogEntry> {
    range.map(entry).collect()
}

async fn suite(mut harness: impl Harness) {
    // Empty at first.
    {
        let storage = harness.open();
        assert_eq!(
            storage.recover().await.expect("recover"),
            Recovered::default()
        );
        storage.append(entries(1..=3)).await.expect("append");
        storage.append(entries(4..=20)).await.expect("append");
        // A gap is refused and changes nothing.
        assert!(storage.append(entries(22..=23)).await.is_err());
    }
    // Restart: everything acknowledged is back.
    {
        let storage = harness.open();
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
    }
    // Restart after compaction.
    {
        let storage = harness.open();
        let back = storage.recover().await.expect("recover");
        assert_eq!(back.snapshot.as_ref().map(|s| s.index), Some(LogIndex(15)));
        assert_eq!(back.entries, entries(16..=25));
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
        let storage = harness.open();
        let back = storage.recover().await.expect("recover");
        assert_eq!(back.snapshot.as_ref().map(|s| s.index), Some(LogIndex(25)));
        assert_eq!(back.entries, entries(26..=26));
    }
}

#[tokio::test]
async fn memory_storage_passes_the_suite() {
    suite(Memory(MemoryStorage::new())).await;
}

#[tokio::test]
async fn file_storage_passes_the_suite() {
    suite(files()).await;
}

#[tokio::test]
async fn a_directory_in_use_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let first = FileStorage::open(dir.path()).expect("open");
    let second = FileStorage::open(dir.path());
    assert!(matches!(second, Err(crate::Error::Unavailable(_))));
    drop(first);
    assert!(FileStorage::open(dir.path()).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_are_all_durable_in_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let storage = Arc::new(FileStorage::open(dir.path()).expect("open"));
    // 64 writers; a shared counter hands out indexes under a lock so the appends are queued
    // contiguous, as a server's sequencer queues them.
    let next = Arc::new(tokio::sync::Mutex::new(1u64));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let storage = Arc::clone(&storage);
        let next = Arc::clone(&next);
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                let durable = {
                    // Queue under the lock (log order), wait outside it (group commit).
                    let mut next = next.lock().await;
                    let index = *next;
                    *next += 1;
                    storage.append(vec![entry(index)])
                };
                durable.await.expect("append");
            }
        }));
    }
    for task in tasks {
        task.await.expect("join");
    }
    drop(storage);
    let storage = FileStorage::open(dir.path()).expect("reopen");
    let back = storage.recover().await.expect("recover");
    assert_eq!(back.entries.len(), 640);
}

fn write_log(dir: &std::path::Path, n: u64) -> std::path::PathBuf {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let storage = FileStorage::open(dir).expect("open");
        storage.append(entries(1..=n)).await.expect("append");
    });
    list(dir)
        .expect("list")
        .segments
        .pop()
        .expect("a segment")
        .1
}

fn recover_sync(dir: &std::path::Path) -> Result<Recovered> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(async { FileStorage::open(dir)?.recover().await })
}

/// Byte offsets where each record of `entries(1..=n)` ends.
fn record_ends(n: u64) -> Vec<usize> {
    let mut buf = Vec::new();
    let mut ends = Vec::new();
    for e in entries(1..=n) {
        frame(&mut buf, &e);
        ends.push(buf.len());
    }
    ends
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any entry survives encode/decode unchanged.
    #[test]
    fn entries_round_trip(
        index in 1u64..u64::MAX,
        epoch in any::<u64>(),
        origin in 1u32..,
        seq in 1u64..,
        at in any::<i64>(),
        user in 1u32..=UserId::MAX,
        other in 1u32..=UserId::MAX,
        text in ".{0,64}",
        tag in 0u8..4,
    ) {
        let u = UserId::new(user).expect("in range");
        let v = UserId::new(other).expect("in range");
        let kind = match tag {
            0 => EventKind::UserJoined { user: u },
            1 => EventKind::Followed { follower: u, followee: v },
            2 => EventKind::Unfollowed { follower: u, followee: v },
            _ => EventKind::Posted { author: u, text: Arc::from(text.as_str()) },
        };
        let e = LogEntry {
            index: LogIndex(index),
            epoch: Epoch(epoch),
            event: Event {
                id: EventId { origin: ClusterId::new(origin).expect("nonzero"), seq },
                at: Timestamp(at),
                kind,
            },
        };
        prop_assert_eq!(LogEntry::from_bytes(&e.to_bytes()).ok(), Some(e.clone()));
        let mut framed = Vec::new();
        frame(&mut framed, &e);
        let (parsed, valid, damage) = parse_segment(&framed, LogIndex(index));
        prop_assert_eq!(parsed, vec![e]);
        prop_assert_eq!(valid, framed.len());
        prop_assert!(damage.is_none());
    }

    /// Truncating the log at any byte never panics on open and keeps every complete record.
    #[test]
    fn truncation_keeps_every_complete_record(cut_fraction in 0.0f64..1.0) {
        let dir = tempfile::tempdir().expect("temp dir");
        let n = 30;
        let segment = write_log(dir.path(), n);
        let len = std::fs::metadata(&segment).expect("metadata").len();
        let cut = (len as f64 * cut_fraction) as u64;
        std::fs::OpenOptions::new().write(true).open(&segment).expect("open")
            .set_len(cut).expect("truncate");
        let complete = record_ends(n).iter().filter(|end| **end as u64 <= cut).count();
        let back = recover_sync(dir.path()).expect("recover after truncation");
        prop_assert_eq!(back.entries, entries(1..=n).into_iter().take(complete).collect::<Vec<_>>());
        // And the repaired log accepts the next append where it left off.
        let again = recover_sync(dir.path()).expect("recover twice");
        prop_assert_eq!(again.entries.len(), complete);
    }

    /// Flipping any byte never panics on open and keeps every record before the damaged one.
    #[test]
    fn bit_flips_keep_every_record_before_the_damage(at_fraction in 0.0f64..1.0, bit in 0u8..8) {
        let dir = tempfile::tempdir().expect("temp dir");
        let n = 30;
        let segment = write_log(dir.path(), n);
        let mut bytes = std::fs::read(&segment).expect("read");
        let at = ((bytes.len() as f64 * at_fraction) as usize).min(bytes.len() - 1);
        bytes[at] ^= 1 << bit;
        std::fs::write(&segment, &bytes).expect("write");
        let before = record_ends(n).iter().filter(|end| **end <= at).count();
        let back = recover_sync(dir.path()).expect("recover after a flip");
        prop_assert!(back.entries.len() >= before, "lost records before the damage");
        prop_assert_eq!(
            &back.entries[..before],
            &entries(1..=n)[..before]
        );
    }
}

#[test]
fn appends_continue_after_a_repaired_tail() {
    let dir = tempfile::tempdir().expect("temp dir");
    let segment = write_log(dir.path(), 10);
    let len = std::fs::metadata(&segment).expect("metadata").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .expect("open")
        .set_len(len - 3)
        .expect("truncate");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let storage = FileStorage::open(dir.path()).expect("open");
        let back = storage.recover().await.expect("recover");
        assert_eq!(back.entries, entries(1..=9));
        storage.append(entries(10..=12)).await.expect("append");
        drop(storage);
        let storage = FileStorage::open(dir.path()).expect("reopen");
        assert_eq!(
            storage.recover().await.expect("recover").entries,
            entries(1..=12)
        );
    });
}

#[test]
fn damage_before_the_last_segment_refuses_to_open_and_deletes_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let options = FileStorageOptions {
        segment_bytes: 256,
        ..FileStorageOptions::default()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let storage = FileStorage::open_with(dir.path(), options.clone()).expect("open");
        for i in 1..=40 {
            storage.append(entries(i..=i)).await.expect("append");
        }
    });
    let segments = list(dir.path()).expect("list").segments;
    assert!(segments.len() > 2, "several segments were written");
    let first = &segments[0].1;
    let mut bytes = std::fs::read(first).expect("read");
    bytes[20] ^= 0x10;
    std::fs::write(first, &bytes).expect("write");
    let opened = FileStorage::open_with(dir.path(), options);
    assert!(
        matches!(opened, Err(crate::Error::Corrupt(_))),
        "{opened:?}"
    );
    assert_eq!(
        list(dir.path()).expect("list").segments.len(),
        segments.len()
    );
}

#[tokio::test]
async fn a_snapshot_ahead_of_the_log_restarts_the_log_after_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let storage = FileStorage::open(dir.path()).expect("open");
        storage.append(entries(1..=5)).await.expect("append");
        let snapshot = Snapshot::of(&crate::state::State::default(), LogIndex(10), Epoch(2));
        storage.save_snapshot(snapshot).await.expect("snapshot");
        storage
            .append(entries(11..=12))
            .await
            .expect("append after");
    }
    {
        let storage = FileStorage::open(dir.path()).expect("reopen");
        let back = storage.recover().await.expect("recover");
        assert_eq!(back.last_index(), LogIndex(12));
        assert_eq!(back.entries, entries(11..=12));
        storage.append(entries(13..=13)).await.expect("append");
    }
    let storage = FileStorage::open(dir.path()).expect("reopen");
    assert_eq!(
        storage.recover().await.expect("recover").entries,
        entries(11..=13)
    );
}
