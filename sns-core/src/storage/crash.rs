//! A simulated disk with a write cache, for crash tests (feature `test-util`).
//!
//! A [`CrashDisk`] keeps a durable image (a log, a snapshot, a commit index). A storage opened
//! on it ([`CrashDisk::open`]) queues every change in a volatile cache; a flusher task syncs the
//! cache to the image after [`CrashDiskOptions::sync_delay`], everything queued at once (group
//! commit), and only then resolves the appends and answers truncations and snapshots.
//! [`CrashDisk::pull_plug`] loses the cache: every change not yet synced is gone, the pending
//! calls fail, and the storage instance that was open refuses every further call. A storage
//! opened afterwards recovers exactly what was synced. Dropping a storage is a graceful close:
//! its cache is synced first. Under tokio's paused clock everything is deterministic.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};

use super::memory::MemLog;
use super::readers::Readers;
use super::{
    DEFAULT_RETENTION, Durable, Recovered, Snapshot, Storage, check_contiguous, check_truncation,
};
use crate::error::{Error, Result};
use crate::event::LogEntry;
use crate::ids::{EventId, LogIndex};

/// Tuning of a [`CrashDisk`].
///
/// Non-exhaustive, so that fields can be added later: build it from `CrashDiskOptions::default()`
/// and set the fields you need.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CrashDiskOptions {
    /// Entries kept, at most, behind the latest snapshot for registered readers.
    pub retention: u64,
    /// How long the flusher waits, after the first change reaches the cache, before it syncs
    /// everything cached.
    pub sync_delay: Duration,
}

impl Default for CrashDiskOptions {
    fn default() -> Self {
        Self {
            retention: DEFAULT_RETENTION,
            sync_delay: Duration::from_millis(1),
        }
    }
}

/// A simulated disk. Clones share it.
#[derive(Clone, Default)]
pub struct CrashDisk {
    shared: Arc<DiskShared>,
}

#[derive(Default)]
struct DiskShared {
    disk: Mutex<Disk>,
    options: CrashDiskOptions,
}

#[derive(Default)]
struct Disk {
    /// What has been synced: all that survives a pulled plug.
    image: MemLog,
    /// Bumped by every open and every pulled plug; an instance of another generation is gone.
    generation: u64,
    /// The cache of the storage instance that is open, if one is.
    open: Option<Cache>,
    /// Syncs that moved something to the image.
    syncs: u64,
    /// Every write fails from now on, as on a full disk (see [`CrashDisk::fail_writes`]).
    failing: bool,
}

/// The volatile side of an open storage instance.
struct Cache {
    generation: u64,
    /// Changes not yet synced, in order.
    queue: Vec<Change>,
    /// The index the next append must start at.
    next: LogIndex,
    /// The latest snapshot's index and the commit index, cache included.
    snapshot: LogIndex,
    commit: LogIndex,
    readers: Readers,
    flusher: Arc<Notify>,
}

type Reply = oneshot::Sender<Result<()>>;

enum Change {
    Append { entries: Vec<LogEntry>, done: Reply },
    Truncate { index: LogIndex, done: Reply },
    Snapshot { snapshot: Snapshot, done: Reply },
    Commit(LogIndex),
    Barrier { done: Reply },
}

fn disk_full() -> Error {
    Error::Io(std::io::Error::new(
        std::io::ErrorKind::StorageFull,
        "no space left on device (simulated)",
    ))
}

fn power_lost() -> Error {
    Error::StorageFailed("power lost".to_string())
}

impl Disk {
    /// Moves every cached change to the image, answering the waiters (a sync).
    fn sync(&mut self, retention: u64) {
        let Self {
            image,
            open,
            syncs,
            failing,
            ..
        } = self;
        let Some(cache) = open else {
            return;
        };
        if cache.queue.is_empty() {
            return;
        }
        if *failing {
            for change in cache.queue.drain(..) {
                match change {
                    Change::Append { done, .. }
                    | Change::Truncate { done, .. }
                    | Change::Snapshot { done, .. }
                    | Change::Barrier { done } => {
                        let _ = done.send(Err(disk_full()));
                    }
                    Change::Commit(_) => {}
                }
            }
            return;
        }
        *syncs += 1;
        for change in cache.queue.drain(..) {
            match change {
                Change::Append { entries, done } => {
                    let _ = done.send(image.append(entries));
                }
                Change::Truncate { index, done } => {
                    let _ = done.send(image.truncate_after(index));
                }
                Change::Snapshot { snapshot, done } => {
                    let keep_from = cache.readers.keep_from(snapshot.index, retention);
                    image.save_snapshot(snapshot, keep_from);
                    let _ = done.send(Ok(()));
                }
                Change::Commit(index) => image.set_commit(index),
                Change::Barrier { done } => {
                    let _ = done.send(Ok(()));
                }
            }
        }
    }
}

impl CrashDisk {
    /// An empty disk with default options.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty disk with `options`.
    pub fn with_options(options: CrashDiskOptions) -> Self {
        Self {
            shared: Arc::new(DiskShared {
                disk: Mutex::default(),
                options,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Disk> {
        self.shared.lock()
    }

    /// Opens a storage on the disk, recovering what was synced, and starts its flusher task
    /// (so it must be called within a Tokio runtime). Fails while another storage instance
    /// is open on the disk (not dropped, plug not pulled).
    pub fn open(&self) -> Result<CrashStorage> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::invalid("CrashDisk::open needs a Tokio runtime"))?;
        let mut disk = self.lock();
        if disk.open.is_some() {
            return Err(Error::Unavailable("the disk is in use".to_string()));
        }
        disk.generation += 1;
        let generation = disk.generation;
        let flusher = Arc::new(Notify::new());
        disk.open = Some(Cache {
            generation,
            queue: Vec::new(),
            next: disk.image.last().next(),
            snapshot: disk.image.snapshot_index(),
            commit: disk.image.commit(),
            readers: Readers::default(),
            flusher: Arc::clone(&flusher),
        });
        drop(disk);
        runtime.spawn(flush(Arc::clone(&self.shared), generation, flusher));
        Ok(CrashStorage {
            shared: Arc::clone(&self.shared),
            generation,
        })
    }

    /// Cuts the power: every change not yet synced is lost, the pending calls of the open
    /// storage instance fail with [`Error::Unavailable`], and so does every later call on it.
    pub fn pull_plug(&self) {
        let mut disk = self.lock();
        disk.generation += 1;
        if let Some(cache) = disk.open.take() {
            for change in cache.queue {
                match change {
                    Change::Append { done, .. }
                    | Change::Truncate { done, .. }
                    | Change::Snapshot { done, .. }
                    | Change::Barrier { done } => {
                        let _ = done.send(Err(power_lost()));
                    }
                    Change::Commit(_) => {}
                }
            }
            cache.flusher.notify_one();
        }
    }

    /// Makes every write fail from now on, as on a full disk: each change waiting for a sync,
    /// and each later one, fails with an I/O error and reaches nothing durable. Reads go on.
    pub fn fail_writes(&self) {
        let mut disk = self.lock();
        disk.failing = true;
        if let Some(cache) = &disk.open {
            cache.flusher.notify_one();
        }
    }

    /// How many syncs moved changes to the durable image so far (group commit makes this
    /// smaller than the number of appends when appends are queued concurrently).
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }
}

impl fmt::Debug for CrashDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let disk = self.lock();
        f.debug_struct("CrashDisk")
            .field("generation", &disk.generation)
            .field("open", &disk.open.is_some())
            .field("syncs", &disk.syncs)
            .finish_non_exhaustive()
    }
}

impl DiskShared {
    fn lock(&self) -> MutexGuard<'_, Disk> {
        // Every update of the disk completes before anything that could panic.
        self.disk.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The flusher of the instance of `generation`: syncs the cache `sync_delay` after it is
/// woken, until the instance is gone.
async fn flush(shared: Arc<DiskShared>, generation: u64, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        tokio::time::sleep(shared.options.sync_delay).await;
        let mut disk = shared.lock();
        if disk
            .open
            .as_ref()
            .is_none_or(|c| c.generation != generation)
        {
            return;
        }
        disk.sync(shared.options.retention);
    }
}

/// A storage instance open on a [`CrashDisk`].
pub struct CrashStorage {
    shared: Arc<DiskShared>,
    generation: u64,
}

impl fmt::Debug for CrashStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CrashStorage")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl CrashStorage {
    /// Runs `f` on the image and this instance's cache, if the instance still has power.
    fn with<T>(&self, f: impl FnOnce(&mut MemLog, &mut Cache) -> Result<T>) -> Result<T> {
        let mut disk = self.shared.lock();
        let Disk { image, open, .. } = &mut *disk;
        match open {
            Some(cache) if cache.generation == self.generation => f(image, cache),
            _ => Err(power_lost()),
        }
    }

    /// Queues a change (built around a reply channel) and waits until it is synced.
    async fn queue(&self, change: impl FnOnce(&mut Cache, Reply) -> Result<Change>) -> Result<()> {
        let (done, wait) = oneshot::channel();
        self.with(|_, cache| {
            let change = change(cache, done)?;
            cache.queue.push(change);
            cache.flusher.notify_one();
            Ok(())
        })?;
        wait.await.map_err(|_| power_lost())?
    }
}

impl Drop for CrashStorage {
    fn drop(&mut self) {
        // A graceful close: the cache is synced.
        let mut disk = self.shared.lock();
        if disk
            .open
            .as_ref()
            .is_some_and(|c| c.generation == self.generation)
        {
            disk.sync(self.shared.options.retention);
            if let Some(cache) = disk.open.take() {
                cache.flusher.notify_one();
            }
        }
    }
}

#[async_trait::async_trait]
impl Storage for CrashStorage {
    async fn recover(&self) -> Result<Recovered> {
        self.queue(|_, done| Ok(Change::Barrier { done })).await?;
        self.with(|image, _| Ok(image.recover()))
    }

    fn append(&self, entries: Vec<LogEntry>) -> Durable {
        if entries.is_empty() {
            return Box::pin(std::future::ready(Ok(())));
        }
        let (done, wait) = oneshot::channel();
        let queued = self.with(|_, cache| {
            check_contiguous(cache.next, &entries)?;
            for entry in &entries {
                crate::event::check_entry_fits(entry)?;
            }
            cache.next = LogIndex(cache.next.0 + entries.len() as u64);
            cache.queue.push(Change::Append { entries, done });
            cache.flusher.notify_one();
            Ok(())
        });
        Box::pin(async move {
            queued?;
            wait.await.map_err(|_| power_lost())?
        })
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        self.queue(|cache, done| {
            cache.snapshot = snapshot.index;
            cache.next = cache.next.max(snapshot.index.next());
            Ok(Change::Snapshot { snapshot, done })
        })
        .await
    }

    async fn snapshot(&self) -> Result<Option<Snapshot>> {
        self.with(|image, _| Ok(image.snapshot()))
    }

    async fn read(&self, from: LogIndex, to: LogIndex) -> Result<Vec<LogEntry>> {
        self.with(|image, _| image.read(from, to))
    }

    async fn truncate_after(&self, index: LogIndex) -> Result<()> {
        self.queue(|cache, done| {
            check_truncation(index, cache.commit, cache.snapshot)?;
            cache.next = cache.next.min(index.next());
            Ok(Change::Truncate { index, done })
        })
        .await
    }

    async fn position(&self, id: EventId) -> Result<Option<LogIndex>> {
        self.with(|image, _| Ok(image.position(id)))
    }

    fn set_commit(&self, index: LogIndex) {
        let _ = self.with(|image, cache| {
            cache.commit = cache.commit.max(index.min(image.last()));
            cache.queue.push(Change::Commit(index));
            cache.flusher.notify_one();
            Ok(())
        });
    }

    fn retain(&self, reader: &str, after: LogIndex) {
        let _ = self.with(|_, cache| {
            cache.readers.retain(reader, after);
            Ok(())
        });
    }

    fn release(&self, reader: &str) {
        let _ = self.with(|_, cache| {
            cache.readers.release(reader);
            Ok(())
        });
    }
}
