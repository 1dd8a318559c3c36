//! File storage: an append-only, checksummed, length-prefixed record log in segments, plus
//! snapshots for compaction, a small commit-index file and a marker naming the newest segment.
//!
//! Layout of a data directory:
//! - `LOCK`: held (advisory lock) while a server uses the directory;
//! - `log-<first index>.seg`: records `[len: u32 LE][crc32 of payload: u32 LE][payload]`, each
//!   payload one encoded [`LogEntry`]; a segment holds contiguous indexes from its first index up
//!   to the next segment's first index. The newest one may end in zeros: room the writer
//!   allocated ahead ([`FileStorageOptions::preallocate_bytes`]), read as the end of its records;
//! - `last-segment`: `SNSLAST1`, the newest segment's first index (u64 LE), its crc32; replaced
//!   atomically (temporary file, sync, rename, directory sync) whenever the newest segment
//!   changes, so a missing newest segment is noticed;
//! - `snapshot-<index>.snap`: `SNSSNAP1`, index, epoch, state length, crc32, encoded state;
//! - `commit`: two 16-byte slots `[commit index: u64 LE][crc32 of it: u32 LE][0u32]`, written
//!   alternately, so a torn write leaves the other slot's (older) value; the highest valid one
//!   counts.
//!
//! Invariants: an append is acknowledged only after `fdatasync` of every byte of it. One writer
//! thread owns the open segment and serves requests from a bounded queue in arrival order;
//! requests that are waiting while it syncs are written and synced together (group commit). The
//! commit index is written at least every [`COMMIT_EVERY_BATCHES`](writer::COMMIT_EVERY_BATCHES)
//! batches and once the writer has been idle for [`COMMIT_IDLE`](writer::COMMIT_IDLE), never
//! beyond the last synced entry. It is synced only when the writer stops: a crash may leave an
//! older value, which the commit index is allowed to be (it may lag, never lead).
//!
//! Files change in an order that keeps every crash state recognisable. A new segment is created
//! and the directory synced before the marker names it; truncation rewrites the marker before
//! it deletes later segments (newest first); compaction deletes segments oldest first and never
//! the newest; a snapshot is written to a temporary file, synced, renamed and the directory
//! synced before any segment it covers is deleted, and a snapshot ahead of the log gets its new
//! segment (and marker) before the old segments go. So, after any crash: the segments hold one
//! contiguous run of indexes (or old ones wholly covered by the snapshot, then a gap, then the
//! segment right after the snapshot); the marker names a segment that exists; there is a
//! segment; the log reaches the commit index.
//!
//! Opening checks all of that (`recovery`) before it changes anything. Only a **torn tail** is
//! repaired on its own, with a WARN: in the newest segment, a first bad record (the file ends
//! inside it, its length is 0 or runs past the end of the file, or its checksum fails) after
//! which no byte offset starts a whole record that passes its checksum and continues the log;
//! and cutting it keeps every entry the snapshot and commit index say existed. That is what an
//! interrupted append leaves: a prefix of its bytes, maybe followed by zeros or garbage.
//! Anything else is **damage**, and the open fails with [`Error::Corrupt`], naming the file and
//! byte offset or what is missing, and changes no file: a record followed by a valid one (a bit
//! flip, not a torn write), a whole checksummed record that does not decode or breaks index
//! continuity, any bad record in an earlier segment (synced before the next one began), a
//! missing segment (the newest: per the marker; between others: by the indexes in the names;
//! right after the snapshot), no segment beside a snapshot, a log that ends before the commit
//! index, a damaged snapshot or marker. With [`FileStorageOptions::repair`] the open cuts the
//! log at the first damage instead (damage only in segments the snapshot covers costs just those
//! segments; a damaged snapshot is dropped only while the log still starts at index 1), and
//! logs at WARN what it dropped. One limit: a filesystem that writes the pages of one append out
//! of order can, on a power cut, leave a hole followed by valid records of that same
//! (unacknowledged) append; that is refused too, and a repair is then safe.
//!
//! Reads do not rescan the log: an in-memory index, built by the open scan and extended after
//! each synced batch, keeps per segment the byte offset of every [`SPARSE_EVERY`](index::SPARSE_EVERY)th record and
//! per origin where its events sit; a read opens the segments it needs and reads only the byte
//! ranges holding the entries asked for.
//!
//! This file is the facade that implements [`Storage`]; the parts live in `format` (the bytes
//! of records, snapshots and the commit file), `layout` (file names, listing, creating and
//! removing files in a crash-safe order), `marker` (the `last-segment` file), `index` (the in-memory index and the reads through
//! it), `writer` (the writer thread) and `recovery` (the open scan).

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::{DEFAULT_RETENTION, Durable, Recovered, Snapshot, Storage, check_contiguous};
use crate::error::{Error, Result};
use crate::event::LogEntry;
use crate::ids::{EventId, LogIndex};

mod format;
mod index;
mod layout;
mod marker;
mod recovery;
mod writer;

pub(super) use format::frame;
#[cfg(test)]
pub(super) use format::parse_segment;
#[cfg(test)]
pub(super) use format::read_commit;
use format::{CommitFile, RECORD_HEADER, write_snapshot};
use index::{LogMap, Shared};
#[cfg(test)]
pub(super) use layout::list;
#[cfg(test)]
pub(super) use writer::COMMIT_EVERY_BATCHES;
use writer::{Request, Writer};

/// Default of [`FileStorageOptions::preallocate_bytes`]: writing and syncing 1 MiB of zeros takes
/// about 1 ms on a virtio disk, once per MiB of log.
const PREALLOCATE_BYTES: u64 = 1 << 20;

/// Tuning of a [`FileStorage`].
///
/// Non-exhaustive, so that fields can be added later: build it from `FileStorageOptions::default()`
/// and set the fields you need.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FileStorageOptions {
    /// A segment larger than this is closed and a new one started.
    pub segment_bytes: u64,
    /// Group commit stops gathering requests once a batch holds this many bytes.
    pub max_batch_bytes: usize,
    /// Requests the writer thread's queue holds; [`Storage::append`] (and the other calls)
    /// block while it is full. A backstop: the server bounds its in-flight appends itself.
    pub queue_capacity: usize,
    /// Entries kept, at most, behind the latest snapshot for registered readers (rounded up
    /// to whole segments).
    pub retention: u64,
    /// What the open does with a damaged directory (see the module documentation): `false`
    /// (the default) refuses with [`Error::Corrupt`] naming the damage and changes nothing;
    /// `true` cuts the log at the first damage, removing everything after it, and opens what
    /// is left, logging at WARN what it dropped. `tsd --repair` and `sns up --repair`.
    pub repair: bool,
    /// Zeros written after a batch that runs past the open segment's size, so that the next
    /// batches' syncs do not change the file's size (0: none; every sync then grows the file
    /// and writes its inode too). Default 1 MiB; at most 64 MiB is used.
    pub preallocate_bytes: u64,
}

impl Default for FileStorageOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
            max_batch_bytes: 8 << 20,
            queue_capacity: 1024,
            retention: DEFAULT_RETENTION,
            repair: false,
            preallocate_bytes: PREALLOCATE_BYTES,
        }
    }
}

/// Durable storage in one data directory. See the module documentation for the format.
#[derive(Debug)]
pub struct FileStorage {
    dir: PathBuf,
    requests: Option<mpsc::SyncSender<Request>>,
    writer: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    /// What the open scan found, handed out by the first `recover` if nothing changed since.
    recovered: Mutex<Option<Recovered>>,
    changed: AtomicBool,
}

impl FileStorage {
    /// Opens (creating if needed) the data directory `dir` with default options.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(dir, FileStorageOptions::default())
    }

    /// Opens `dir`: takes its lock, loads the latest snapshot, scans the log (building the
    /// in-memory index), truncates any damaged tail, and starts the writer thread.
    pub fn open_with(dir: impl AsRef<Path>, options: FileStorageOptions) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        super::create_private_dir(&dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))?;
        lock.try_lock().map_err(|e| match e {
            fs::TryLockError::WouldBlock => Error::Unavailable(format!(
                "data directory {} is in use by another process",
                dir.display()
            )),
            fs::TryLockError::Error(e) => Error::Io(e),
        })?;
        let opened = recovery::open_log(&dir, options.repair)?;
        let shared = Arc::new(Shared {
            map: Mutex::new(opened.map),
            readers: Mutex::default(),
            nudged: AtomicBool::new(false),
            sleeping: AtomicBool::new(false),
            syncs: AtomicU64::new(0),
            sync_latency: crate::stats::LatencyHistogram::default(),
        });
        let (tx, rx) = mpsc::sync_channel(options.queue_capacity);
        let mut writer = Writer {
            _lock: lock,
            dir: dir.clone(),
            options,
            shared: Arc::clone(&shared),
            file: opened.file,
            file_len: opened.file_len,
            allocated: opened.allocated,
            no_room: false,
            next: opened.next,
            commit: opened.commit,
            failed: None,
        };
        let writer = std::thread::Builder::new()
            .name("sns-log-writer".to_string())
            .spawn(move || writer.run(&rx))?;
        Ok(Self {
            dir,
            requests: Some(tx),
            writer: Some(writer),
            shared,
            recovered: Mutex::new(Some(opened.recovered)),
            changed: AtomicBool::new(false),
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How many times the writer has synced appended records so far. With group commit this
    /// grows slower than the number of appends when appends are queued concurrently.
    pub fn syncs(&self) -> u64 {
        self.shared.syncs.load(Ordering::SeqCst)
    }

    fn send(&self, request: Request) -> Result<()> {
        self.requests
            .as_ref()
            .and_then(|tx| tx.send(request).ok())
            .ok_or_else(stopped)
    }

    /// Queues `request` (built around a reply channel) and waits for the reply.
    async fn call(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<()>>) -> Request,
    ) -> Result<()> {
        let (done, wait) = oneshot::channel();
        self.send(request(done))?;
        wait.await.map_err(|_| stopped())?
    }

    fn changed(&self) {
        self.changed.store(true, Ordering::SeqCst);
    }
}

fn stopped() -> Error {
    Error::StorageFailed("storage writer stopped".to_string())
}

impl Drop for FileStorage {
    fn drop(&mut self) {
        // Closing the channel ends the writer after the requests already queued (and a last
        // write of the commit index); joining it means the directory lock is released only
        // once nothing more will be written.
        self.requests.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::StorageFailed(format!("storage task failed: {e}")))?
}

#[async_trait::async_trait]
impl Storage for FileStorage {
    async fn recover(&self) -> Result<Recovered> {
        let cached = self
            .recovered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(recovered) = cached
            && !self.changed.load(Ordering::SeqCst)
        {
            return Ok(recovered);
        }
        // Wait for what is queued, then read it back through the index.
        self.call(|done| Request::Barrier { done }).await?;
        let shared = Arc::clone(&self.shared);
        blocking(move || shared.recover()).await
    }

    fn append(&self, entries: Vec<LogEntry>) -> Durable {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Box::pin(std::future::ready(Ok(())));
        };
        let (first, last) = (first.index, last.index);
        if let Err(e) = check_contiguous(first, &entries) {
            return Box::pin(std::future::ready(Err(e)));
        }
        let mut bytes = Vec::with_capacity(entries.len() * 64);
        for entry in &entries {
            let start = bytes.len();
            frame(&mut bytes, entry);
            // Nothing is written that recovery could not read back.
            if let Err(e) = crate::event::check_record_len(bytes.len() - start - RECORD_HEADER) {
                return Box::pin(std::future::ready(Err(e)));
            }
        }
        self.changed();
        let ids = entries.iter().map(|e| e.event.id).collect();
        let (done, wait) = oneshot::channel();
        let sent = self.send(Request::Append {
            first,
            last,
            ids,
            bytes,
            done,
        });
        Box::pin(async move {
            sent?;
            wait.await.map_err(|_| stopped())?
        })
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        self.changed();
        // Written and synced here, off the writer thread, which appends meanwhile; the writer
        // only installs it and compacts the log.
        let dir = self.dir.clone();
        let index = snapshot.index;
        let written = blocking(move || write_snapshot(&dir, &snapshot)).await?;
        self.call(|done| Request::Snapshot {
            index,
            written,
            done,
        })
        .await
    }

    fn sync_latency(&self) -> Option<crate::stats::Histogram> {
        Some(self.shared.sync_latency.snapshot())
    }

    async fn snapshot(&self) -> Result<Option<Snapshot>> {
        let shared = Arc::clone(&self.shared);
        blocking(move || shared.snapshot()).await
    }

    async fn read(&self, from: LogIndex, to: LogIndex) -> Result<Vec<LogEntry>> {
        let shared = Arc::clone(&self.shared);
        blocking(move || shared.read(from, to)).await
    }

    async fn truncate_after(&self, index: LogIndex) -> Result<()> {
        self.changed();
        self.call(|done| Request::Truncate { index, done }).await
    }

    async fn position(&self, id: EventId) -> Result<Option<LogIndex>> {
        let map = self.shared.map();
        let (first, last) = (map.first(), map.last);
        Ok(map
            .positions
            .get(id)
            .filter(|index| (first..=last).contains(index)))
    }

    fn set_commit(&self, index: LogIndex) {
        self.changed();
        {
            let mut map = self.shared.map();
            map.commit = map.commit.max(index.min(map.last));
        }
        // A writer that is awake persists the index on its own (see `writer`): waking it for
        // every commit would cost a thread wake-up per commit.
        if self.shared.sleeping.load(Ordering::SeqCst)
            && !self.shared.nudged.swap(true, Ordering::SeqCst)
        {
            let nudged = self
                .requests
                .as_ref()
                .is_some_and(|tx| tx.try_send(Request::Commit).is_ok());
            if !nudged {
                // A full queue means a busy writer: it persists the index when it runs idle.
                self.shared.nudged.store(false, Ordering::SeqCst);
            }
        }
    }

    fn retain(&self, reader: &str, after: LogIndex) {
        self.shared.readers().retain(reader, after);
    }

    fn release(&self, reader: &str) {
        self.shared.readers().release(reader);
    }
}

/// What opening a data directory found and set up.
struct Opened {
    recovered: Recovered,
    map: LogMap,
    /// The last segment, open for writing.
    file: File,
    file_len: u64,
    /// Its size: records, then zeros allocated ahead.
    allocated: u64,
    next: LogIndex,
    commit: CommitFile,
}
