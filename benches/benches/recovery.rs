//! Restart time of a server with 1,000,000 logged events (DESIGN §8: ready ≤ 2 s).
//!
//! Setup writes, once, a 1,000,000-entry log into a temporary directory (10,000 entries per
//! append): 1,000 users join, each follows 10 others, and the other 989,000 entries are posts,
//! so replaying a post fans it out to 10 timelines. Measured, per iteration:
//! - `restart_1m_events/storage_replay`: `FileStorage::open` (lock, scan, checksum and decode
//!   every record) + `recover` + `Recovered::replay` (400-post timelines) (rebuild the state);
//! - `restart_1m_events/server_open`: the same through `Server::open` (what `tsd` does), which
//!   also drops the recovered entries before it returns;
//! - `restart_snapshot_plus_tail/storage_replay`: a directory holding a snapshot of that state
//!   (at index 1,000,000) plus a 10,000-entry log tail;
//! - `read_from_1m_events/read_100k_from_the_middle`: `Storage::read` of the entries
//!   450,001..=550,000 from an open `FileStorage` on the 1,000,000-entry log (positioned reads
//!   through the in-memory index, no rescan of the log).
//!
//! Files are read from the page cache (the setup just wrote them); a cold-cache restart also
//! pays for reading the log from disk (about 80 MB here).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use sns_benches::{community_log, origin, runtime};
use sns_core::{
    Epoch, FileStorage, LogEntry, LogIndex, Server, ServerConfig, Snapshot, State, StateConfig,
    Storage,
};

/// Events in the log.
const EVENTS: u64 = 1_000_000;
/// Users in the log, each following `FOLLOWS_EACH` others.
const USERS: u32 = 1_000;
/// Follows per user.
const FOLLOWS_EACH: u32 = 10;
/// Entries per append while writing the log.
const BATCH: usize = 10_000;
/// Entries after the snapshot in the snapshot-plus-tail directory.
const TAIL: u64 = 10_000;
/// Entries read from the middle of the log.
const READ: u64 = 100_000;

/// Appends `entries` to the storage in `dir`, `BATCH` at a time.
fn write_log(rt: &tokio::runtime::Runtime, dir: &Path, entries: impl Iterator<Item = LogEntry>) {
    let storage = FileStorage::open(dir).expect("open storage");
    let mut entries = entries.peekable();
    rt.block_on(async {
        while entries.peek().is_some() {
            let batch: Vec<LogEntry> = entries.by_ref().take(BATCH).collect();
            storage.append(batch).await.expect("append is durable");
        }
    });
}

/// Opens the storage in `dir`, recovers it and rebuilds the state; returns the time that took
/// and what it built (dropped by the caller, outside the timed section).
/// A server of a one-cluster deployment: every user is local, as in the replayed state.
fn single_cluster() -> ServerConfig {
    let mut config = ServerConfig::default();
    config.clusters = 1;
    config
}

fn storage_replay(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
) -> (Duration, (FileStorage, sns_core::Recovered, State)) {
    let start = Instant::now();
    let storage = FileStorage::open(dir).expect("open storage");
    let recovered = rt.block_on(storage.recover()).expect("recover");
    let state = recovered.replay(&StateConfig::default()).expect("replay");
    (start.elapsed(), (storage, recovered, state))
}

fn restart(c: &mut Criterion) {
    let rt = runtime();
    let log_dir = tempfile::tempdir().expect("temp dir");
    let write = Instant::now();
    write_log(
        &rt,
        log_dir.path(),
        community_log(EVENTS, USERS, FOLLOWS_EACH),
    );
    eprintln!(
        "setup: wrote {EVENTS} entries in {:.1?} ({} bytes of log)",
        write.elapsed(),
        dir_bytes(log_dir.path())
    );

    read_from_the_middle(c, &rt, log_dir.path());

    let mut group = c.benchmark_group("restart_1m_events");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(30));
    let mut last_state = None;
    group.bench_function("storage_replay", |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iters {
                let (took, (storage, recovered, state)) = storage_replay(&rt, log_dir.path());
                elapsed += took;
                assert_eq!(recovered.entries.len() as u64, EVENTS);
                assert_eq!(state.high_water(origin()), EVENTS);
                drop((storage, recovered));
                last_state = Some(state);
            }
            elapsed
        });
    });
    group.bench_function("server_open", |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let server = rt.block_on(async {
                    let storage = FileStorage::open(log_dir.path()).expect("open storage");
                    Server::open(single_cluster(), Arc::new(storage))
                        .await
                        .expect("open server")
                });
                elapsed += start.elapsed();
                assert_eq!(
                    server
                        .list(sns_benches::user(1))
                        .expect("list")
                        .all_users
                        .len(),
                    USERS as usize
                );
                // Closing ends the commit task; dropping the server then drops the storage,
                // which releases the directory lock for the next iteration.
                rt.block_on(server.close());
                drop(server);
            }
            elapsed
        });
    });
    group.finish();

    // A directory holding a snapshot of that state at index 1,000,000 plus a short tail.
    // (When a filter skipped the replay benchmark, rebuild the state once, untimed.)
    let state = last_state.unwrap_or_else(|| storage_replay(&rt, log_dir.path()).1.2);
    let snap_dir = tempfile::tempdir().expect("temp dir");
    {
        let storage = FileStorage::open(snap_dir.path()).expect("open storage");
        let snapshot = Snapshot::of(&state, LogIndex(EVENTS), Epoch(1));
        eprintln!("setup: snapshot of {} bytes", snapshot.state.len());
        rt.block_on(storage.save_snapshot(snapshot))
            .expect("snapshot saved");
    }
    drop(state);
    let tail = community_log(EVENTS + TAIL, USERS, FOLLOWS_EACH).skip(EVENTS as usize);
    write_log(&rt, snap_dir.path(), tail);
    let mut group = c.benchmark_group("restart_snapshot_plus_tail");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("storage_replay", |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iters {
                let (took, (storage, recovered, state)) = storage_replay(&rt, snap_dir.path());
                elapsed += took;
                assert_eq!(recovered.entries.len() as u64, TAIL);
                assert_eq!(state.high_water(origin()), EVENTS + TAIL);
                drop((storage, recovered, state));
            }
            elapsed
        });
    });
    group.finish();
}

/// Reads `READ` entries from the middle of the log in `dir`.
fn read_from_the_middle(c: &mut Criterion, rt: &tokio::runtime::Runtime, dir: &Path) {
    let storage = FileStorage::open(dir).expect("open storage");
    // The first recovery hands out what the open scan found; drop it.
    drop(rt.block_on(storage.recover()).expect("recover"));
    let from = LogIndex(EVENTS / 2 - READ / 2 + 1);
    let to = LogIndex(EVENTS / 2 + READ / 2);
    let mut group = c.benchmark_group("read_from_1m_events");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(8));
    group.throughput(Throughput::Elements(READ));
    group.bench_function("read_100k_from_the_middle", |b| {
        b.iter_with_large_drop(|| {
            let entries = rt.block_on(storage.read(from, to)).expect("read");
            assert_eq!(entries.len() as u64, READ);
            assert_eq!(entries.first().map(|e| e.index), Some(from));
            entries
        });
    });
    group.finish();
}

/// Total size of the files in `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum()
}

criterion_group!(benches, restart);
criterion_main!(benches);
