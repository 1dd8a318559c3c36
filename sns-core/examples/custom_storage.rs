//! A storage of your own, checked by the crate's own conformance suite
//! (`sns_core::testing::storage_suite`, feature `test-util`). `MeteredStorage` wraps any
//! [`Storage`] and counts what an operator would graph: appends made durable, entries written,
//! snapshots saved, truncations, and durable writes in all (what a disk would fsync). Its
//! harness opens it over a `MemoryStorage`, and "restarts" it by wrapping the same memory again.
//!
//! Run it with `cargo run -p sns-core --example custom_storage`: it runs every check of the
//! suite, prints each one that passed and the counters, and exits non-zero if one fails. In
//! your crate the same is a `#[tokio::test]` calling `storage_suite::run_all`.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sns_core::storage::Durable;
use sns_core::testing::storage_suite::{self, Check, Harness};
use sns_core::{EventId, LogEntry, LogIndex, MemoryStorage, Recovered, Result, Snapshot, Storage};

/// Counters shared by every instance opened over the same data.
#[derive(Debug, Default)]
struct Meter {
    appends: AtomicU64,
    entries: AtomicU64,
    snapshots: AtomicU64,
    truncations: AtomicU64,
}

impl Meter {
    fn count(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }

    /// Durable writes in all: each one is an fsync on a disk.
    fn durable_writes(&self) -> u64 {
        [&self.appends, &self.snapshots, &self.truncations]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

/// `inner`, counting its durable writes into `meter`. Everything else passes straight through,
/// so the wrapper keeps every invariant of `inner`, which the suite confirms.
struct MeteredStorage<S> {
    inner: S,
    meter: Arc<Meter>,
}

#[async_trait::async_trait]
impl<S: Storage> Storage for MeteredStorage<S> {
    async fn recover(&self) -> Result<Recovered> {
        self.inner.recover().await
    }

    fn append(&self, entries: Vec<LogEntry>) -> Durable {
        let count = entries.len() as u64;
        // Queue now (the order of calls is the order of the log); count once durable.
        let durable = self.inner.append(entries);
        let meter = Arc::clone(&self.meter);
        Box::pin(async move {
            durable.await?;
            Meter::count(&meter.appends, 1);
            Meter::count(&meter.entries, count);
            Ok(())
        })
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        self.inner.save_snapshot(snapshot).await?;
        Meter::count(&self.meter.snapshots, 1);
        Ok(())
    }

    async fn snapshot(&self) -> Result<Option<Snapshot>> {
        self.inner.snapshot().await
    }

    async fn read(&self, from: LogIndex, to: LogIndex) -> Result<Vec<LogEntry>> {
        self.inner.read(from, to).await
    }

    async fn truncate_after(&self, index: LogIndex) -> Result<()> {
        self.inner.truncate_after(index).await?;
        Meter::count(&self.meter.truncations, 1);
        Ok(())
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

/// Opens a `MeteredStorage` over one `MemoryStorage`; a restart wraps the same memory again
/// (a `MemoryStorage` outlives the instances opened on it, as a disk would).
struct Metered {
    memory: MemoryStorage,
    meter: Arc<Meter>,
}

impl Harness for Metered {
    fn open(&mut self) -> Result<Box<dyn Storage>> {
        Ok(Box::new(MeteredStorage {
            inner: self.memory.clone(),
            meter: Arc::clone(&self.meter),
        }))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let meter = Arc::new(Meter::default());
    let harness = || Metered {
        // The suite counts on this retention bound (entries kept behind a snapshot for readers).
        memory: MemoryStorage::with_retention(storage_suite::RETENTION),
        meter: Arc::clone(&meter),
    };
    let mut failed = Vec::new();
    for check in Check::ALL {
        // A failed check panics, naming itself and what went wrong; its own task keeps that
        // panic from unwinding through `main`, so the other checks still run.
        match tokio::spawn(check.run(harness())).await {
            Ok(()) => println!("ok      {check}"),
            Err(_) => {
                println!("FAILED  {check}");
                failed.push(check);
            }
        }
    }
    if !failed.is_empty() {
        println!("{} of {} checks failed", failed.len(), Check::ALL.len());
        return ExitCode::FAILURE;
    }
    println!(
        "all {} checks passed: {} appends of {} entries, {} snapshots, {} truncations \
         ({} durable writes)",
        Check::ALL.len(),
        meter.appends.load(Ordering::Relaxed),
        meter.entries.load(Ordering::Relaxed),
        meter.snapshots.load(Ordering::Relaxed),
        meter.truncations.load(Ordering::Relaxed),
        meter.durable_writes(),
    );
    ExitCode::SUCCESS
}
