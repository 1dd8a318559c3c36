//! `FileStorage` append throughput with 1, 8 and 64 concurrent writers (group commit).
//!
//! Each writer task appends one post entry at a time, as the server's write path does: it takes
//! the next log index under a shared lock, calls `Storage::append` while holding it (queueing
//! is synchronous, so the log stays contiguous), releases the lock and awaits durability
//! (`fdatasync`). One criterion iteration is one entry appended and durable; the reported
//! throughput is entries per second, counted from the first append to the last fsync.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use sns_benches::{post_entry, runtime, user};
use sns_core::{FileStorage, Storage};
use tokio::sync::Mutex;

/// Has `writers` tasks append `appends` single-entry batches in total, and returns the time
/// from the first append to the last one being durable.
async fn run_writers(
    storage: &Arc<FileStorage>,
    next: &Arc<Mutex<u64>>,
    writers: u64,
    appends: u64,
) -> Duration {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let share = appends / writers + u64::from(writer < appends % writers);
        if share == 0 {
            continue;
        }
        let storage = Arc::clone(storage);
        let next = Arc::clone(next);
        let author = user(u32::try_from(writer).expect("few writers") + 1);
        tasks.push(tokio::spawn(async move {
            for _ in 0..share {
                let durable = {
                    let mut next = next.lock().await;
                    let index = *next;
                    *next += 1;
                    storage.append(vec![post_entry(index, author)])
                };
                durable.await.expect("append is durable");
            }
        }));
    }
    for task in tasks {
        task.await.expect("writer task finished");
    }
    start.elapsed()
}

fn append_throughput(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("file_storage_append");
    group.throughput(Throughput::Elements(1));
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(2));
    group.measurement_time(Duration::from_secs(10));
    for writers in [1u64, 8, 64] {
        let dir = tempfile::tempdir().expect("temp dir");
        let storage = Arc::new(FileStorage::open(dir.path()).expect("open storage"));
        let next = Arc::new(Mutex::new(1u64));
        group.bench_with_input(
            BenchmarkId::new("writers", writers),
            &writers,
            |b, &writers| {
                b.iter_custom(|appends| {
                    rt.block_on(run_writers(&storage, &next, writers, appends))
                });
            },
        );
        // Everything acknowledged is on disk, contiguous from index 1.
        let appended = rt.block_on(next.lock()).to_owned() - 1;
        drop(storage);
        let reopened = FileStorage::open(dir.path()).expect("reopen storage");
        let recovered = rt.block_on(reopened.recover()).expect("recover");
        assert_eq!(
            recovered.entries.len() as u64,
            appended,
            "an entry was lost"
        );
        eprintln!(
            "file_storage_append/writers/{writers}: {appended} entries appended and recovered"
        );
    }
    group.finish();
}

criterion_group!(benches, append_throughput);
criterion_main!(benches);
