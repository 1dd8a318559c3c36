//! The storage tests: the shared suite ([`crate::testing::storage_suite`]: appends, recovery
//! after restart, snapshots, and the log API) against every [`Storage`] of the crate (memory,
//! files, the crash disk); then crash-disk tests (losing exactly the unsynced changes) and
//! file-specific tests (group commit, torn tails and bit flips at every byte, locking).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use super::file::{frame, list, parse_segment};
use super::*;
use crate::error::Error;
use crate::event::{Event, EventKind, LogEntry};
use crate::ids::{ClusterId, EventId, PostKey, Timestamp, UserId};
use crate::testing::storage_suite::{
    Check, Harness, RETENTION, divergent, entries, entry, entry_of, first_held, read_all,
    read_all_from, snapshot_at,
};

mod damage;

struct Memory(MemoryStorage);

impl Harness for Memory {
    fn open(&mut self) -> Result<Box<dyn Storage>> {
        Ok(Box::new(self.0.clone()))
    }
}

fn memory() -> Memory {
    Memory(MemoryStorage::with_retention(RETENTION))
}

struct Files(tempfile::TempDir);

impl Harness for Files {
    fn open(&mut self) -> Result<Box<dyn Storage>> {
        Ok(Box::new(FileStorage::open_with(
            self.0.path(),
            small_segments(),
        )?))
    }
}

/// Small segments, so that rotation, compaction and truncation across segments are exercised.
fn small_segments() -> FileStorageOptions {
    FileStorageOptions {
        segment_bytes: 512,
        retention: RETENTION,
        ..FileStorageOptions::default()
    }
}

fn files() -> Files {
    Files(tempfile::tempdir().expect("temp dir"))
}

struct Crash(CrashDisk);

impl Harness for Crash {
    fn open(&mut self) -> Result<Box<dyn Storage>> {
        Ok(Box::new(self.0.open()?))
    }
}

fn crash() -> Crash {
    Crash(CrashDisk::with_options(CrashDiskOptions {
        retention: RETENTION,
        ..CrashDiskOptions::default()
    }))
}

fn cluster(id: u32) -> ClusterId {
    ClusterId::new(id).expect("valid cluster")
}

/// Runs every check of the suite against each harness, one test per check and storage.
macro_rules! storage_suite {
    ($($scenario:ident => $check:ident),* $(,)?) => {
        /// The checks that have a test per storage.
        const SUITE: &[Check] = &[$(Check::$check),*];

        mod memory_storage {
            use super::Check;
            $(#[tokio::test]
            async fn $scenario() {
                Check::$check.run(super::memory()).await;
            })*
        }
        mod file_storage {
            use super::Check;
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                Check::$check.run(super::files()).await;
            })*
        }
        mod crash_disk {
            use super::Check;
            $(#[tokio::test(start_paused = true)]
            async fn $scenario() {
                Check::$check.run(super::crash()).await;
            })*
        }
    };
}

storage_suite!(
    oversized_records => OversizedRecords,
    append_recover_and_snapshot => AppendRecoverAndSnapshot,
    reads => Reads,
    truncation => Truncation,
    positions => Positions,
    commit_index => CommitIndex,
    retention => Retention,
    snapshot_ahead_of_the_log => SnapshotAheadOfTheLog,
);

/// Every check of the suite has a test per storage above.
#[test]
fn every_check_of_the_suite_runs_on_every_storage() {
    for check in Check::ALL {
        assert!(SUITE.contains(&check), "add `{check}` to `storage_suite!`");
    }
}

// ---------------------------------------------------------------------------------------------
// The crash disk.

/// Appends entries 1..=200 one by one, as a server's sequencer does, pausing now and then so
/// the flusher syncs some of them, and pulls the plug after the `plug_at`th append.
async fn append_until_the_plug_is_pulled(
    disk: &CrashDisk,
    storage: &CrashStorage,
    plug_at: u64,
) -> Vec<Result<()>> {
    let mut pending = Vec::new();
    for i in 1..=200 {
        pending.push(storage.append(entries(i..=i)));
        if i % 7 == 0 {
            tokio::time::sleep(Duration::from_micros(300)).await;
        }
        if i == plug_at {
            disk.pull_plug();
        }
    }
    let mut results = Vec::new();
    for durable in pending {
        results.push(durable.await);
    }
    results
}

#[tokio::test(start_paused = true)]
async fn a_crash_loses_exactly_the_unsynced_appends() {
    for plug_at in [1, 6, 7, 23, 64, 99, 150] {
        let disk = CrashDisk::new();
        let storage = disk.open().expect("open");
        let results = append_until_the_plug_is_pulled(&disk, &storage, plug_at).await;
        let acked = results.iter().take_while(|r| r.is_ok()).count() as u64;
        assert!(
            results[acked as usize..]
                .iter()
                .all(|r| matches!(r, Err(Error::StorageFailed(_)))),
            "after the first lost append, every later one is lost too (plug at {plug_at})"
        );
        assert!(
            acked < plug_at,
            "some appends were not yet synced at {plug_at}"
        );
        if plug_at > 7 {
            assert!(acked > 0, "the flusher synced something before {plug_at}");
            assert!(
                disk.syncs() < acked,
                "group commit: {} syncs for {acked} appends",
                disk.syncs()
            );
        }
        // The instance that lost power refuses everything.
        assert!(storage.append(entries(201..=201)).await.is_err());
        assert!(storage.recover().await.is_err());
        assert!(storage.read(LogIndex(1), LogIndex(1)).await.is_err());
        assert!(storage.truncate_after(LogIndex(200)).await.is_err());
        drop(storage);
        // What was acknowledged is all there, and nothing else.
        let storage = disk.open().expect("reopen");
        let back = storage.recover().await.expect("recover");
        assert_eq!(back.entries, entries(1..=acked), "plug at {plug_at}");
        storage
            .append(entries(acked + 1..=acked + 1))
            .await
            .expect("the log continues after the last synced entry");
    }
}

#[tokio::test(start_paused = true)]
async fn a_crash_keeps_only_synced_truncations_snapshots_and_commits() {
    let disk = CrashDisk::new();
    let storage = Arc::new(disk.open().expect("open"));
    storage.append(entries(1..=10)).await.expect("append");
    storage.set_commit(LogIndex(4));
    storage.truncate_after(LogIndex(8)).await.expect("truncate");
    storage
        .save_snapshot(snapshot_at(5))
        .await
        .expect("snapshot");
    // Queued, not synced: lost with the plug.
    storage.set_commit(LogIndex(7));
    let truncation = tokio::spawn({
        let storage = Arc::clone(&storage);
        async move { storage.truncate_after(LogIndex(7)).await }
    });
    let snapshot = tokio::spawn({
        let storage = Arc::clone(&storage);
        async move { storage.save_snapshot(snapshot_at(7)).await }
    });
    tokio::task::yield_now().await;
    disk.pull_plug();
    assert!(matches!(
        truncation.await.expect("join"),
        Err(Error::StorageFailed(_))
    ));
    assert!(matches!(
        snapshot.await.expect("join"),
        Err(Error::StorageFailed(_))
    ));
    drop(storage);

    let storage = disk.open().expect("reopen");
    let back = storage.recover().await.expect("recover");
    assert_eq!(back.snapshot.map(|s| s.index), Some(LogIndex(5)));
    assert_eq!(back.entries, entries(6..=8));
    assert_eq!(back.commit, LogIndex(4));
    // A commit followed by a barrier (recover syncs what is queued) survives the plug.
    storage.set_commit(LogIndex(7));
    storage.recover().await.expect("sync");
    disk.pull_plug();
    let storage = disk.open().expect("reopen");
    assert_eq!(
        storage.recover().await.expect("recover").commit,
        LogIndex(7)
    );
    assert_eq!(read_all_from(&storage, 6).await, entries(6..=8));
}

#[tokio::test(start_paused = true)]
async fn a_second_instance_is_refused_while_one_is_open() {
    let disk = CrashDisk::new();
    let first = disk.open().expect("open");
    assert!(matches!(disk.open(), Err(Error::Unavailable(_))));
    drop(first);
    let second = disk.open().expect("open after a graceful close");
    disk.pull_plug();
    drop(second);
    disk.open().expect("open after a crash");
}

// ---------------------------------------------------------------------------------------------
// File storage.

#[tokio::test]
async fn a_directory_in_use_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let first = FileStorage::open(dir.path()).expect("open");
    let second = FileStorage::open(dir.path());
    assert!(matches!(second, Err(Error::Unavailable(_))));
    drop(first);
    assert!(FileStorage::open(dir.path()).is_ok());
}

/// Snapshots are written off the writer thread, so two can be saved at once (a slave taking
/// its own while it installs its master's): the newer one wins whatever order they land in,
/// and the older one's file does not stay behind.
#[tokio::test]
async fn a_snapshot_older_than_the_one_held_is_dropped() {
    let dir = tempfile::tempdir().expect("temp dir");
    let storage = FileStorage::open(dir.path()).expect("open");
    storage.append(entries(1..=10)).await.expect("append");
    storage.set_commit(LogIndex(10));
    storage
        .save_snapshot(snapshot_at(8))
        .await
        .expect("newer snapshot");
    storage
        .save_snapshot(snapshot_at(5))
        .await
        .expect("older snapshot");
    assert_eq!(
        storage.snapshot().await.expect("read").map(|s| s.index),
        Some(LogIndex(8))
    );
    let files: Vec<String> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("snapshot-"))
        .collect();
    assert_eq!(files, ["snapshot-00000000000000000008.snap"]);
    drop(storage);
    let storage = FileStorage::open(dir.path()).expect("reopen");
    let back = storage.recover().await.expect("recover");
    assert_eq!(back.snapshot.map(|s| s.index), Some(LogIndex(8)));
    assert_eq!(back.entries, entries(9..=10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_are_durable_in_order_with_group_commit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let options = FileStorageOptions {
        // A small queue: appends block while it is full, and still all complete.
        queue_capacity: 4,
        ..FileStorageOptions::default()
    };
    let storage = Arc::new(FileStorage::open_with(dir.path(), options.clone()).expect("open"));
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
    let syncs = storage.syncs();
    assert!(
        syncs < 640,
        "group commit: {syncs} syncs for 640 concurrent appends"
    );
    assert_eq!(read_all(&*storage).await, entries(1..=640));
    drop(storage);
    let storage = FileStorage::open_with(dir.path(), options).expect("reopen");
    let back = storage.recover().await.expect("recover");
    assert_eq!(back.entries, entries(1..=640));
}

/// Readers race a writer that appends, truncates and compacts: every read gives contiguous
/// entries from where it asked (the original or the rewritten version of each), or reports
/// that they were compacted; never an error. (A smoke test: the window in which a read planned
/// before a truncation meets the cut file is too narrow to hit on demand.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_race_appends_truncations_and_compactions() {
    let dir = tempfile::tempdir().expect("temp dir");
    let storage = Arc::new(FileStorage::open_with(dir.path(), small_segments()).expect("open"));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = tokio::spawn({
        let storage = Arc::clone(&storage);
        let done = Arc::clone(&done);
        async move {
            let mut last = 0;
            for round in 1..=30u64 {
                for i in last + 1..=last + 10 {
                    storage.append(entries(i..=i)).await.expect("append");
                }
                last += 10;
                storage
                    .truncate_after(LogIndex(last - 4))
                    .await
                    .expect("truncate");
                storage
                    .append(divergent(last - 3..=last))
                    .await
                    .expect("append");
                if round % 5 == 0 {
                    storage
                        .save_snapshot(snapshot_at(last - 25))
                        .await
                        .expect("snapshot");
                }
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let mut readers = Vec::new();
    for reader in 0..2u64 {
        let storage = Arc::clone(&storage);
        let done = Arc::clone(&done);
        readers.push(tokio::spawn(async move {
            let mut reads = 0u64;
            let mut from = 1 + reader * 7;
            while !done.load(std::sync::atomic::Ordering::SeqCst) || reads < 50 {
                match storage.read(LogIndex(from), LogIndex(from + 40)).await {
                    Ok(found) => {
                        for (k, e) in found.iter().enumerate() {
                            let i = from + k as u64;
                            assert!(e == &entry(i) || e == &divergent(i..=i)[0], "{e:?}");
                        }
                    }
                    Err(Error::Compacted { first }) => from = first.0,
                    Err(e) => panic!("read failed: {e}"),
                }
                reads += 1;
                from += 13;
                if from > 300 {
                    from = 1;
                }
            }
        }));
    }
    writer.await.expect("writer");
    for reader in readers {
        reader.await.expect("reader");
    }
}

#[tokio::test]
async fn the_commit_index_survives_a_torn_slot() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let storage = FileStorage::open(dir.path()).expect("open");
        storage.append(entries(1..=10)).await.expect("append");
        storage.set_commit(LogIndex(5));
        storage.recover().await.expect("barrier");
    }
    {
        let storage = FileStorage::open(dir.path()).expect("open");
        storage.set_commit(LogIndex(8));
    }
    let path = dir.path().join("commit");
    let pristine = std::fs::read(&path).expect("read");
    assert_eq!(pristine.len(), 32, "two slots");
    for slot in 0..2 {
        // Tear one slot at a time: the other holds the newest or the previous value.
        let mut torn = pristine.clone();
        torn[slot * 16 + 3] ^= 0x40;
        std::fs::write(&path, &torn).expect("write");
        let storage = FileStorage::open(dir.path()).expect("open");
        let commit = storage.recover().await.expect("recover").commit;
        assert!(
            commit == LogIndex(5) || commit == LogIndex(8),
            "slot {slot}: {commit}"
        );
        drop(storage);
        std::fs::write(&path, &pristine).expect("restore");
    }
    let storage = FileStorage::open(dir.path()).expect("open");
    assert_eq!(
        storage.recover().await.expect("recover").commit,
        LogIndex(8)
    );
}

/// The commit index the `commit` file of `dir` holds now, read while the storage is open.
fn commit_on_disk(dir: &Path) -> u64 {
    super::file::read_commit(dir)
        .expect("read the commit file")
        .0
}

/// Waits (at most 10 s) until the `commit` file of `dir` holds `index`.
async fn commit_reaches(dir: &Path, index: u64) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        if commit_on_disk(dir) == index {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

/// The writer persists the commit index without being woken for every commit: a commit made
/// while it sleeps with nothing to persist wakes it, one made between appends is found by the
/// next append or the idle timeout, and under a stream of appends the file lags by at most
/// `COMMIT_EVERY_BATCHES` batches. Checked on the file while the storage is open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commit_index_reaches_the_file_without_a_wake_up_per_commit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let storage = FileStorage::open(dir.path()).expect("open");
    storage.append(entries(1..=5)).await.expect("append");
    // Nothing to persist: the writer goes to sleep; this commit has to wake it.
    storage.set_commit(LogIndex(3));
    assert!(
        commit_reaches(dir.path(), 3).await,
        "a commit reaches a sleeping writer: the file holds {}",
        commit_on_disk(dir.path())
    );
    // A stream of appends, each committed right after it is synced: the file keeps up within
    // the bound while the stream lasts.
    let batches = 3 * u64::from(super::file::COMMIT_EVERY_BATCHES);
    for i in 6..6 + batches {
        storage.append(entries(i..=i)).await.expect("append");
        storage.set_commit(LogIndex(i));
        let behind = i - commit_on_disk(dir.path());
        assert!(
            behind <= u64::from(super::file::COMMIT_EVERY_BATCHES) + 1,
            "after committing {i} the file is {behind} behind"
        );
    }
    let last = 5 + batches;
    assert!(
        commit_reaches(dir.path(), last).await,
        "the last commit reaches the file once the writer is idle: it holds {}",
        commit_on_disk(dir.path())
    );
}

/// A multi-segment log with a snapshot, built once, whose files tests damage one at a time.
struct DamageFixture {
    dir: tempfile::TempDir,
    /// Every file of the intact directory (LOCK aside), by name.
    pristine: BTreeMap<String, Vec<u8>>,
    /// The segments, by first index.
    segments: Vec<(u64, PathBuf)>,
    /// The last entry.
    last: u64,
    snapshot: u64,
}

const FIXTURE_ENTRIES: u64 = 22;
const FIXTURE_SNAPSHOT: u64 = 6;

/// Files written without room ahead, as earlier versions wrote them: every segment is exactly
/// its records, which the byte-by-byte damage tests rely on. The room ahead has its own tests.
fn without_room() -> FileStorageOptions {
    FileStorageOptions {
        preallocate_bytes: 0,
        ..FileStorageOptions::default()
    }
}

fn fixture_options() -> FileStorageOptions {
    FileStorageOptions {
        segment_bytes: 200,
        ..without_room()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

impl DamageFixture {
    fn new(runtime: &tokio::runtime::Runtime) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        runtime.block_on(async {
            let storage = FileStorage::open_with(dir.path(), fixture_options()).expect("open");
            // A reader at 0 keeps every segment through the snapshot.
            storage.retain("reader", LogIndex(0));
            for i in 1..=FIXTURE_ENTRIES {
                storage.append(entries(i..=i)).await.expect("append");
                if i == 10 {
                    storage
                        .save_snapshot(snapshot_at(FIXTURE_SNAPSHOT))
                        .await
                        .expect("snapshot");
                }
            }
        });
        let segments: Vec<(u64, PathBuf)> = list(dir.path())
            .expect("list")
            .segments
            .into_iter()
            .map(|(first, path)| (first.0, path))
            .collect();
        assert!(segments.len() >= 5, "{segments:?}");
        let last_first = segments.last().map(|s| s.0).expect("a segment");
        assert!(
            last_first > FIXTURE_SNAPSHOT + 1 && last_first < FIXTURE_ENTRIES,
            "the snapshot lies before a non-empty last segment: {segments:?}"
        );
        let pristine = files_of(dir.path());
        Self {
            dir,
            pristine,
            segments,
            last: FIXTURE_ENTRIES,
            snapshot: FIXTURE_SNAPSHOT,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Puts every file back as it was, removing any other.
    fn restore(&self) {
        let now = files_of(self.path());
        for name in now.keys() {
            if !self.pristine.contains_key(name) {
                std::fs::remove_file(self.path().join(name)).expect("remove");
            }
        }
        for (name, bytes) in &self.pristine {
            if now.get(name) != Some(bytes) {
                std::fs::write(self.path().join(name), bytes).expect("restore");
            }
        }
    }

    /// Byte offsets where each record of the segment starting at `first` ends.
    fn record_ends(&self, position: usize) -> Vec<usize> {
        let first = self.segments[position].0;
        let next = self
            .segments
            .get(position + 1)
            .map_or(self.last + 1, |s| s.0);
        let mut buf = Vec::new();
        let mut ends = Vec::new();
        for e in entries(first..=next - 1) {
            frame(&mut buf, &e);
            ends.push(buf.len());
        }
        assert_eq!(
            buf,
            self.pristine[&name_of(&self.segments[position].1)],
            "segment {first} holds the framed entries"
        );
        ends
    }

    /// Opens the damaged directory. On success checks that exactly the entries up to `kept`
    /// are back (and that the log continues after them); a refusal gives its message.
    fn open_expecting(
        &self,
        runtime: &tokio::runtime::Runtime,
        kept: u64,
        what: &str,
    ) -> Result<(), String> {
        let opened = FileStorage::open_with(self.path(), fixture_options());
        let storage = match opened {
            Ok(storage) => storage,
            Err(Error::Corrupt(message)) => return Err(message),
            Err(e) => panic!("{what}: unexpected error {e}"),
        };
        runtime.block_on(async {
            let back = storage.recover().await.expect("recover");
            assert_eq!(
                back.snapshot.map(|s| s.index.0),
                Some(self.snapshot),
                "{what}"
            );
            assert_eq!(back.entries, entries(self.snapshot + 1..=kept), "{what}");
            assert_eq!(read_all(&storage).await, entries(1..=kept), "{what}");
            storage
                .append(entries(kept + 1..=kept + 1))
                .await
                .expect("append after repair");
            assert_eq!(
                storage
                    .read(LogIndex(kept), LogIndex(kept + 1))
                    .await
                    .expect("read"),
                entries(kept..=kept + 1),
                "{what}"
            );
        });
        Ok(())
    }
}

fn name_of(path: &Path) -> String {
    path.file_name()
        .and_then(|n| n.to_str())
        .expect("file name")
        .to_string()
}

fn files_of(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .map(|item| item.expect("dir entry").path())
        .filter(|path| name_of(path) != "LOCK")
        .map(|path| (name_of(&path), std::fs::read(&path).expect("read")))
        .collect()
}

/// Cutting the log at every byte: a cut in the last segment keeps every complete record
/// before it (the torn record and nothing else goes); a cut in an earlier segment fails the
/// open and changes no file (those records were synced before the next segment began).
#[test]
fn truncation_at_every_byte_keeps_every_complete_record() {
    let runtime = runtime();
    let fixture = DamageFixture::new(&runtime);
    let last = fixture.segments.len() - 1;
    for (position, (first, path)) in fixture.segments.iter().enumerate() {
        let ends = fixture.record_ends(position);
        let len = ends.last().copied().unwrap_or(0);
        let name = name_of(path);
        for cut in 0..len {
            let bytes = &fixture.pristine[&name][..cut];
            std::fs::write(path, bytes).expect("cut");
            let what = format!("segment {first} cut at byte {cut}");
            let complete = ends.iter().filter(|end| **end <= cut).count() as u64;
            let opened = fixture.open_expecting(&runtime, first + complete - 1, &what);
            if position == last {
                assert_eq!(opened, Ok(()), "{what}: the open must repair the tail");
            } else {
                let message = opened.expect_err("the open must refuse");
                assert!(message.contains(&name), "{what}: {message}");
                assert_eq!(
                    files_of(fixture.path()),
                    fixture.pristine_with(&name, bytes)
                );
            }
            fixture.restore();
        }
    }
}

/// Flipping a bit in every byte of every segment. In the newest segment's last record that
/// looks like a torn tail: every record before it is kept. Anywhere else, valid records (or
/// later segments) follow the damaged record: the open refuses, naming the segment and the
/// damaged record's byte offset, and changes no file.
#[test]
fn bit_flips_at_every_byte_are_refused_unless_they_hit_the_last_record() {
    let runtime = runtime();
    let fixture = DamageFixture::new(&runtime);
    let last = fixture.segments.len() - 1;
    for (position, (first, path)) in fixture.segments.iter().enumerate() {
        let ends = fixture.record_ends(position);
        let name = name_of(path);
        let pristine = &fixture.pristine[&name];
        for at in 0..pristine.len() {
            let mut bytes = pristine.clone();
            bytes[at] ^= 1 << (at % 8);
            std::fs::write(path, &bytes).expect("flip");
            let what = format!("segment {first} flipped at byte {at}");
            let before = ends.iter().filter(|end| **end <= at).count();
            let record_start = before.checked_sub(1).map_or(0, |k| ends[k]);
            let torn = position == last && before + 1 == ends.len();
            match fixture.open_expecting(&runtime, first + before as u64 - 1, &what) {
                Ok(()) => assert!(torn, "{what}: the open must refuse"),
                Err(message) => {
                    assert!(!torn, "{what}: the open must cut the torn tail: {message}");
                    assert!(
                        message.contains(&name)
                            && message.contains(&format!("at byte {record_start} ")),
                        "{what}: {message}"
                    );
                    assert_eq!(
                        files_of(fixture.path()),
                        fixture.pristine_with(&name, &bytes)
                    );
                }
            }
            fixture.restore();
        }
    }
}

impl DamageFixture {
    /// The pristine files with `name` replaced by `bytes`.
    fn pristine_with(&self, name: &str, bytes: &[u8]) -> BTreeMap<String, Vec<u8>> {
        let mut files = self.pristine.clone();
        files.insert(name.to_string(), bytes.to_vec());
        files
    }
}

/// A crash in the middle of a compaction leaves the newest of the segments it was deleting
/// (it deletes oldest first, each deletion synced, after the new segment exists): the open
/// keeps a contiguous log, or removes segments that end before a snapshot ahead of them.
#[test]
fn segments_left_by_an_interrupted_compaction() {
    let runtime = runtime();
    let dir = tempfile::tempdir().expect("temp dir");
    runtime.block_on(async {
        let storage = FileStorage::open_with(dir.path(), small_segments()).expect("open");
        for i in 1..=30 {
            storage.append(entries(i..=i)).await.expect("append");
        }
    });
    let old: Vec<(u64, PathBuf)> = list(dir.path())
        .expect("list")
        .segments
        .into_iter()
        .map(|(first, path)| (first.0, path))
        .collect();
    assert!(old.len() >= 4, "{old:?}");
    let old_files = files_of(dir.path());
    let restore = |name: &str| {
        std::fs::write(dir.path().join(name), &old_files[name]).expect("restore");
    };
    // A snapshot ahead of the log (the log restarts at 41: the crash came before the new
    // segment was made, or after it and two deletions), then one covering 1..=30 (a new
    // segment at 31): after each, put back the newest segments it deleted.
    for (snapshot, left, new_made, first) in [
        (40, 0, false, 41),
        (40, 2, true, 41),
        (30, 1, true, old[1].0),
        (30, 3, true, old[3].0),
    ] {
        runtime.block_on(async {
            let storage = FileStorage::open_with(dir.path(), small_segments()).expect("open");
            storage
                .save_snapshot(snapshot_at(snapshot))
                .await
                .expect("snapshot");
        });
        if !new_made {
            for (_, path) in list(dir.path()).expect("list").segments {
                std::fs::remove_file(path).expect("remove");
            }
            restore("last-segment");
        }
        for (_, path) in &old[left..] {
            restore(&name_of(path));
        }
        runtime.block_on(async {
            let storage = FileStorage::open_with(dir.path(), small_segments()).expect("open");
            let back = storage.recover().await.expect("recover");
            assert_eq!(back.last_index(), LogIndex(snapshot.max(30)));
            assert!(back.entries.is_empty());
            assert_eq!(first_held(&storage).await, first, "snapshot {snapshot}");
            assert_eq!(
                read_all_from(&storage, first).await,
                entries(first..=30),
                "snapshot {snapshot}"
            );
        });
        // Back to the whole log, without a snapshot.
        let listing = list(dir.path()).expect("list");
        for (_, path) in listing.segments.into_iter().chain(listing.snapshots) {
            std::fs::remove_file(path).expect("clean up");
        }
        for name in old_files.keys() {
            restore(name);
        }
    }
}

/// The marker may name a segment older than the newest: a crash between creating a segment and
/// recording it, or between a truncation rewriting the marker and deleting the segments after
/// it. Both open as they are (the truncation did not happen), and the marker is brought up to
/// date.
#[test]
fn a_marker_behind_the_newest_segment_is_a_crash_not_damage() {
    let runtime = runtime();
    let dir = tempfile::tempdir().expect("temp dir");
    let marker = dir.path().join("last-segment");
    let early_marker = runtime.block_on(async {
        let storage = FileStorage::open_with(dir.path(), small_segments()).expect("open");
        storage.append(entries(1..=3)).await.expect("append");
        let early = std::fs::read(&marker).expect("marker");
        for i in 4..=30 {
            storage.append(entries(i..=i)).await.expect("append");
        }
        early
    });
    assert!(list(dir.path()).expect("list").segments.len() >= 4);
    let whole = files_of(dir.path());
    let reopen_holds_everything = |what: &str| {
        runtime.block_on(async {
            let storage = FileStorage::open_with(dir.path(), small_segments())
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(read_all(&storage).await, entries(1..=30), "{what}");
        });
        assert_eq!(
            files_of(dir.path()),
            whole,
            "{what}: the marker is up to date"
        );
    };
    // A rotation interrupted before the marker named the new segment.
    std::fs::write(&marker, &early_marker).expect("write");
    reopen_holds_everything("rotation");
    // A truncation interrupted after the marker, before any segment went.
    runtime.block_on(async {
        let storage = FileStorage::open_with(dir.path(), small_segments()).expect("open");
        storage.truncate_after(LogIndex(2)).await.expect("truncate");
        assert_eq!(read_all(&storage).await, entries(1..=2));
    });
    assert_eq!(std::fs::read(&marker).expect("marker"), early_marker);
    for (name, bytes) in &whole {
        if name != "last-segment" {
            std::fs::write(dir.path().join(name), bytes).expect("put back");
        }
    }
    reopen_holds_everything("truncation");
}

#[test]
fn appends_continue_after_a_repaired_tail() {
    let runtime = runtime();
    let dir = tempfile::tempdir().expect("temp dir");
    runtime.block_on(async {
        let storage = FileStorage::open_with(dir.path(), without_room()).expect("open");
        storage.append(entries(1..=10)).await.expect("append");
    });
    let segment = list(dir.path())
        .expect("list")
        .segments
        .pop()
        .expect("a segment")
        .1;
    let len = std::fs::metadata(&segment).expect("metadata").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .expect("open")
        .set_len(len - 3)
        .expect("truncate");
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
        key in any::<u64>(),
        tag in 0u8..5,
    ) {
        let u = UserId::new(user).expect("in range");
        let v = UserId::new(other).expect("in range");
        let kind = match tag {
            0 => EventKind::UserJoined { user: u },
            1 => EventKind::Followed { follower: u, followee: v },
            2 => EventKind::Unfollowed { follower: u, followee: v },
            3 => EventKind::Posted { author: u, text: Arc::from(text.as_str()), key: None },
            _ => EventKind::Posted {
                author: u,
                text: Arc::from(text.as_str()),
                key: PostKey::new(key),
            },
        };
        let e = LogEntry {
            index: LogIndex(index),
            epoch: Epoch(epoch),
            event: Event {
                id: EventId { origin: cluster(origin), seq },
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
}

#[test]
fn a_record_longer_than_the_limit_written_by_an_earlier_version_still_reads() {
    let runtime = runtime();
    let dir = tempfile::tempdir().expect("temp dir");
    runtime.block_on(async {
        let storage = FileStorage::open_with(dir.path(), without_room()).expect("open");
        storage.append(entries(1..=2)).await.expect("append");
    });
    // What an earlier version wrote for a large state transfer: one record of about 2.9 MB.
    let mut legacy = entry_of(3, 1, 1, 3);
    legacy.event.kind = EventKind::Image(Arc::new(crate::event::OriginImage {
        users: (1..=700_000)
            .filter_map(|u| UserId::new(u * 2 - 1))
            .collect(),
        ..crate::event::OriginImage::default()
    }));
    let mut framed = Vec::new();
    frame(&mut framed, &legacy);
    assert!(framed.len() > 2 * crate::event::MAX_RECORD_BYTES);
    let segment = list(dir.path())
        .expect("list")
        .segments
        .last()
        .expect("a segment")
        .1
        .clone();
    let mut bytes = std::fs::read(&segment).expect("read");
    bytes.extend_from_slice(&framed);
    std::fs::write(&segment, bytes).expect("write");
    runtime.block_on(async {
        let storage = FileStorage::open(dir.path()).expect("an earlier version's data opens");
        let mut expected = entries(1..=2);
        expected.push(legacy);
        assert_eq!(read_all(&storage).await, expected);
        storage.append(entries(4..=4)).await.expect("appends go on");
    });
}

/// The framed bytes of `entries`, as a segment holds them.
fn framed(entries: &[LogEntry]) -> Vec<u8> {
    let mut buf = Vec::new();
    for e in entries {
        frame(&mut buf, e);
    }
    buf
}

fn newest_segment(dir: &Path) -> PathBuf {
    list(dir)
        .expect("list")
        .segments
        .pop()
        .expect("a segment")
        .1
}

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).expect("metadata").len()
}

/// Opens `dir` (which must hold entries `1..=last` and nothing else), appends entry `last + 1`
/// and opens it again: both opens find exactly the entries written. `opened` runs between the
/// first open and the append, for checks on the files.
async fn reopen_and_append(dir: &Path, last: u64, what: &str, opened: impl FnOnce()) {
    let storage = FileStorage::open(dir).unwrap_or_else(|e| panic!("{what}: the open fails: {e}"));
    assert_eq!(
        storage.recover().await.expect("recover").entries,
        entries(1..=last),
        "{what}"
    );
    opened();
    storage
        .append(entries(last + 1..=last + 1))
        .await
        .expect("append after the open");
    drop(storage);
    let storage = FileStorage::open(dir).expect("reopen");
    assert_eq!(
        storage.recover().await.expect("recover").entries,
        entries(1..=last + 1),
        "{what}, then one append"
    );
}

/// The open segment is allocated ahead: the first batch goes out with the default room of zeros
/// after it, later batches fill that room without growing the file, and an open reads the
/// zeros as the end of the records (no tail is cut), then appends after the last record.
#[test]
fn appends_fill_the_room_allocated_ahead_and_an_open_reads_past_it() {
    let runtime = runtime();
    let dir = tempfile::tempdir().expect("temp dir");
    let room = FileStorageOptions::default().preallocate_bytes;
    assert!(room > 0, "room ahead by default");
    runtime.block_on(async {
        let storage = FileStorage::open(dir.path()).expect("open");
        storage.append(entries(1..=10)).await.expect("append");
        let segment = newest_segment(dir.path());
        let records = framed(&entries(1..=10)).len() as u64;
        assert_eq!(size(&segment), records + room, "one batch, then the room");
        storage.append(entries(11..=20)).await.expect("append");
        assert_eq!(
            size(&segment),
            records + room,
            "the room is filled, not grown"
        );
    });
    let segment = newest_segment(dir.path());
    let before = std::fs::read(&segment).expect("read");
    let records = framed(&entries(1..=20));
    assert_eq!(&before[..records.len()], records, "the records, in order");
    assert!(
        before[records.len()..].iter().all(|&b| b == 0),
        "then zeros"
    );
    runtime.block_on(reopen_and_append(dir.path(), 20, "the reopen", || {
        assert_eq!(size(&segment), before.len() as u64, "nothing was cut");
    }));
}

/// An append torn inside the room ahead leaves a prefix of its record followed by the zeros
/// that were there. At every length of that prefix the open keeps every complete record, and
/// appends go on after them.
#[test]
fn an_append_torn_inside_the_room_ahead_keeps_every_complete_record() {
    let runtime = runtime();
    let dir = tempfile::tempdir().expect("temp dir");
    runtime.block_on(async {
        let storage = FileStorage::open(dir.path()).expect("open");
        storage.append(entries(1..=10)).await.expect("append");
    });
    let segment = newest_segment(dir.path());
    let pristine = std::fs::read(&segment).expect("read");
    let kept = framed(&entries(1..=10)).len();
    let torn = framed(&entries(11..=11));
    for cut in 0..=torn.len() {
        let mut bytes = pristine.clone();
        bytes[kept..kept + cut].copy_from_slice(&torn[..cut]);
        std::fs::write(&segment, &bytes).expect("tear");
        // The record's own last bytes may be zeros: a prefix that lacks only those is whole.
        let whole = torn[cut..].iter().all(|&b| b == 0);
        let last = if whole { 11 } else { 10 };
        let what = format!("{cut} bytes of record 11");
        runtime.block_on(reopen_and_append(dir.path(), last, &what, || {}));
        std::fs::write(&segment, &pristine).expect("restore");
    }
}

/// A segment that is closed gives back its room: only the newest segment may have zeros after
/// its records.
#[test]
fn a_closed_segment_gives_back_its_room() {
    let runtime = runtime();
    let dir = tempfile::tempdir().expect("temp dir");
    runtime.block_on(async {
        let storage = FileStorage::open_with(dir.path(), small_segments()).expect("open");
        storage.retain("reader", LogIndex(0));
        for i in 1..=40 {
            storage.append(entries(i..=i)).await.expect("append");
        }
    });
    let segments = list(dir.path()).expect("list").segments;
    assert!(segments.len() >= 3, "{segments:?}");
    let firsts: Vec<u64> = segments.iter().map(|(first, _)| first.0).collect();
    for (k, (first, path)) in segments.iter().enumerate() {
        let end = firsts.get(k + 1).map_or(40, |next| next - 1);
        let records = framed(&entries(first.0..=end)).len() as u64;
        let bytes = std::fs::read(path).expect("read");
        if k + 1 < segments.len() {
            assert_eq!(
                bytes.len() as u64,
                records,
                "closed segment {first}: its records only"
            );
        } else {
            assert!(
                bytes[records as usize..].iter().all(|&b| b == 0),
                "the newest segment {first}: its records, then zeros"
            );
        }
    }
}
