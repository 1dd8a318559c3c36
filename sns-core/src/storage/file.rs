//! File storage: an append-only, checksummed, length-prefixed record log in segments, plus
//! snapshots for compaction, a small commit-index file and a marker naming the newest segment.
//!
//! Layout of a data directory:
//! - `LOCK`: held (advisory lock) while a server uses the directory;
//! - `log-<first index>.seg`: records `[len: u32 LE][crc32 of payload: u32 LE][payload]`, each
//!   payload one encoded [`LogEntry`]; a segment holds contiguous indexes from its first index up
//!   to the next segment's first index;
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
//! commit index is written when the writer's queue runs empty, and at least every
//! [`COMMIT_EVERY_BATCHES`] batches, never beyond the last synced entry. It is synced only when
//! the writer stops: a crash may leave an older value, which the commit index is allowed to be
//! (it may lag, never lead).
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
//! each synced batch, keeps per segment the byte offset of every [`SPARSE_EVERY`]th record and
//! per origin where its events sit; a read opens the segments it needs and reads only the byte
//! ranges holding the entries asked for.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::positions::Positions;
use super::readers::Readers;
use super::{
    DEFAULT_RETENTION, Durable, Recovered, Snapshot, Storage, check_contiguous, check_truncation,
};
use crate::codec::{Decoder, Encoder};
use crate::error::{Error, Result};
use crate::event::LogEntry;
use crate::ids::{Epoch, EventId, LogIndex};

mod recovery;

use recovery::write_last_segment;

const SNAPSHOT_MAGIC: &[u8; 8] = b"SNSSNAP1";
const RECORD_HEADER: usize = 8;
/// No record read may claim more than this (this bounds damage). Records are written only up
/// to [`MAX_RECORD_BYTES`](crate::event::MAX_RECORD_BYTES); earlier versions wrote longer
/// ones, which still read.
const MAX_READ_RECORD_BYTES: u32 = crate::event::MAX_LEGACY_RECORD_BYTES as u32;
/// The in-memory index notes the byte offset of every this many records of a segment.
const SPARSE_EVERY: u64 = 32;
/// Under a steady load the writer persists an advanced commit index at least this often.
const COMMIT_EVERY_BATCHES: u32 = 64;
const COMMIT_FILE: &str = "commit";
const COMMIT_SLOT_BYTES: usize = 16;

/// Tuning of a [`FileStorage`].
#[derive(Debug, Clone)]
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
}

impl Default for FileStorageOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
            max_batch_bytes: 8 << 20,
            queue_capacity: 1024,
            retention: DEFAULT_RETENTION,
            repair: false,
        }
    }
}

enum Request {
    Append {
        first: LogIndex,
        last: LogIndex,
        ids: Vec<EventId>,
        bytes: Vec<u8>,
        done: oneshot::Sender<Result<()>>,
    },
    Snapshot {
        snapshot: Snapshot,
        done: oneshot::Sender<Result<()>>,
    },
    Truncate {
        index: LogIndex,
        done: oneshot::Sender<Result<()>>,
    },
    /// Answered once every request queued before it is served.
    Barrier { done: oneshot::Sender<Result<()>> },
    /// The commit index advanced (wakes an idle writer to persist it).
    Commit,
}

/// One segment, as the in-memory index knows it.
#[derive(Debug)]
struct SegmentMap {
    first: LogIndex,
    path: PathBuf,
    /// Bytes of synced, valid records.
    len: u64,
    /// `sparse[k]` is the byte offset of the record with index `first + k * SPARSE_EVERY`.
    sparse: Vec<u64>,
}

impl SegmentMap {
    fn new(first: LogIndex, path: PathBuf) -> Self {
        Self {
            first,
            path,
            len: 0,
            sparse: Vec::new(),
        }
    }

    /// Notes the records framed in `bytes`, the first with index `index`, written at `base`.
    fn note_records(&mut self, bytes: &[u8], mut index: LogIndex, base: u64) {
        let mut offset = 0;
        while let Some(header) = bytes.get(offset..offset + RECORD_HEADER) {
            if (index.0 - self.first.0).is_multiple_of(SPARSE_EVERY) {
                self.sparse.push(base + offset as u64);
            }
            let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
            offset += RECORD_HEADER + len as usize;
            index = index.next();
        }
    }
}

/// The durable log as readers see it. The writer thread changes it after each synced batch,
/// truncation or compaction; readers plan their reads under its lock and read without it.
#[derive(Debug)]
struct LogMap {
    /// Contiguous segments; every one but the last is full.
    segments: Vec<SegmentMap>,
    /// The last synced entry.
    last: LogIndex,
    /// The latest snapshot's index and file.
    snapshot: Option<(LogIndex, PathBuf)>,
    /// The commit index (as set; the writer persists it).
    commit: LogIndex,
    positions: Positions,
    /// Changes whenever entries or files go away (truncation, compaction): a read planned
    /// under an older generation is retried.
    generation: u64,
}

impl LogMap {
    fn first(&self) -> LogIndex {
        self.segments
            .first()
            .map_or(self.last.next(), |segment| segment.first)
    }

    fn snapshot_index(&self) -> LogIndex {
        self.snapshot.as_ref().map(|s| s.0).unwrap_or_default()
    }

    /// Where the entries `from..=to` (held, durable) are: one piece per segment.
    fn plan(&self, from: LogIndex, to: LogIndex) -> Result<Vec<Piece>> {
        let mut plan = Vec::new();
        for (i, segment) in self.segments.iter().enumerate() {
            let segment_last = self
                .segments
                .get(i + 1)
                .map_or(self.last, |next| LogIndex(next.first.0 - 1));
            let lo = from.max(segment.first);
            let hi = to.min(segment_last);
            if lo > hi {
                continue;
            }
            let k_lo = (lo.0 - segment.first.0) / SPARSE_EVERY;
            let k_hi = (hi.0 - segment.first.0) / SPARSE_EVERY + 1;
            let start = *segment.sparse.get(k_lo as usize).ok_or_else(|| {
                Error::Corrupt(format!("no offset of index {lo} in the log index"))
            })?;
            let end = segment
                .sparse
                .get(k_hi as usize)
                .copied()
                .unwrap_or(segment.len);
            let at = LogIndex(segment.first.0 + k_lo * SPARSE_EVERY);
            plan.push(Piece {
                path: segment.path.clone(),
                start,
                end,
                at,
                skip: (lo.0 - at.0) as usize,
                take: (hi.0 - lo.0 + 1) as usize,
            });
        }
        Ok(plan)
    }
}

/// The bytes `start..end` of a segment hold records from index `at` on; `skip` of them come
/// before the range asked for, which has `take` entries.
struct Piece {
    path: PathBuf,
    start: u64,
    end: u64,
    at: LogIndex,
    skip: usize,
    take: usize,
}

impl Piece {
    fn read(&self, into: &mut Vec<LogEntry>) -> Result<()> {
        let mut file = File::open(&self.path)?;
        file.seek(SeekFrom::Start(self.start))?;
        let mut bytes = vec![0; (self.end - self.start) as usize];
        file.read_exact(&mut bytes)?;
        let (found, valid, damage) = parse_segment(&bytes, self.at);
        if found.len() < self.skip + self.take {
            return Err(Error::Corrupt(format!(
                "segment {} no longer holds index {} (at byte {}: {})",
                self.path.display(),
                self.at.0 + found.len() as u64,
                self.start + valid as u64,
                damage.unwrap_or_default()
            )));
        }
        into.extend(found.into_iter().skip(self.skip).take(self.take));
        Ok(())
    }
}

/// What the storage handle and the writer thread share.
#[derive(Debug)]
struct Shared {
    map: Mutex<LogMap>,
    readers: Mutex<Readers>,
    /// A `Request::Commit` is queued (so `set_commit` need not queue another).
    nudged: AtomicBool,
    /// Log syncs (`fdatasync` of appended records) so far.
    syncs: AtomicU64,
}

impl Shared {
    fn map(&self) -> MutexGuard<'_, LogMap> {
        // Every update of the map is complete before anything that could panic.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn readers(&self) -> MutexGuard<'_, Readers> {
        self.readers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The durable entries `from..=to`. Plans under the lock, reads without it, and starts
    /// over if entries or files went away meanwhile.
    fn read(&self, from: LogIndex, to: LogIndex) -> Result<Vec<LogEntry>> {
        loop {
            let (plan, generation) = {
                let map = self.map();
                let from = from.max(LogIndex(1));
                let first = map.first();
                if from < first {
                    return Err(Error::Compacted { first });
                }
                let to = to.min(map.last);
                if from > to {
                    return Ok(Vec::new());
                }
                (map.plan(from, to)?, map.generation)
            };
            let mut entries = Vec::new();
            let result = plan.iter().try_for_each(|piece| piece.read(&mut entries));
            if self.map().generation == generation {
                return result.map(|()| entries);
            }
        }
    }

    /// The latest snapshot, as of now.
    fn snapshot(&self) -> Result<Option<Snapshot>> {
        loop {
            let (snapshot, generation) = {
                let map = self.map();
                (map.snapshot.clone(), map.generation)
            };
            let result = snapshot
                .as_ref()
                .map(|(_, path)| read_snapshot(path))
                .transpose();
            if self.map().generation == generation {
                return result;
            }
        }
    }

    /// The latest snapshot, the entries after it and the commit index, as of now.
    fn recover(&self) -> Result<Recovered> {
        loop {
            let (snapshot, last, commit, generation) = {
                let map = self.map();
                (map.snapshot.clone(), map.last, map.commit, map.generation)
            };
            let result = snapshot
                .as_ref()
                .map(|(_, path)| read_snapshot(path))
                .transpose()
                .and_then(|snapshot| {
                    let base = snapshot.as_ref().map(|s| s.index).unwrap_or_default();
                    let entries = self.read(base.next(), last)?;
                    Ok(Recovered {
                        snapshot,
                        entries,
                        commit,
                    })
                });
            if self.map().generation == generation {
                return result;
            }
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
            syncs: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::sync_channel(options.queue_capacity);
        let mut writer = Writer {
            _lock: lock,
            dir: dir.clone(),
            options,
            shared: Arc::clone(&shared),
            file: opened.file,
            file_len: opened.file_len,
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
    Error::Unavailable("storage writer stopped".to_string())
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
        .map_err(|e| Error::Unavailable(format!("storage task failed: {e}")))?
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
        self.call(|done| Request::Snapshot { snapshot, done }).await
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
        if !self.shared.nudged.swap(true, Ordering::SeqCst) {
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

/// Appends one framed record for `entry` to `buf`.
pub(super) fn frame(buf: &mut Vec<u8>, entry: &LogEntry) {
    let start = buf.len();
    buf.extend_from_slice(&[0; RECORD_HEADER]);
    let mut enc = Encoder {
        buf: std::mem::take(buf),
    };
    entry.encode(&mut enc);
    *buf = enc.buf;
    let payload = &buf[start + RECORD_HEADER..];
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let crc = crc32fast::hash(payload);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Parses the records of one segment. Returns the entries, the byte length of the valid
/// prefix, and why the record after it is bad, if there is one; stops at the first damaged
/// record or index discontinuity.
pub(super) fn parse_segment(
    bytes: &[u8],
    mut expected: LogIndex,
) -> (Vec<LogEntry>, usize, Option<String>) {
    let mut entries = Vec::new();
    let mut offset = 0;
    while offset < bytes.len() {
        let Some(header) = bytes.get(offset..offset + RECORD_HEADER) else {
            return (
                entries,
                offset,
                Some("the file ends inside a record header".into()),
            );
        };
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len == 0 {
            return (entries, offset, Some("empty record".into()));
        }
        if len > MAX_READ_RECORD_BYTES {
            return (
                entries,
                offset,
                Some(format!("record length {len} over the maximum")),
            );
        }
        let body = offset + RECORD_HEADER;
        let Some(payload) = bytes.get(body..body + len as usize) else {
            return (
                entries,
                offset,
                Some("record runs past the end of the file".into()),
            );
        };
        if crc32fast::hash(payload) != crc {
            return (entries, offset, Some("checksum mismatch".into()));
        }
        let entry = match LogEntry::from_bytes(payload) {
            Ok(entry) => entry,
            Err(e) => return (entries, offset, Some(e.to_string())),
        };
        if entry.index != expected {
            let why = format!("index {} where {} was expected", entry.index, expected);
            return (entries, offset, Some(why));
        }
        expected = expected.next();
        entries.push(entry);
        offset = body + len as usize;
    }
    (entries, offset, None)
}

fn segment_path(dir: &Path, first: LogIndex) -> PathBuf {
    dir.join(format!("log-{:020}.seg", first.0))
}

fn snapshot_path(dir: &Path, index: LogIndex) -> PathBuf {
    dir.join(format!("snapshot-{:020}.snap", index.0))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The files of a data directory: snapshots and segments, each sorted by index.
pub(super) struct Listing {
    pub(super) snapshots: Vec<(LogIndex, PathBuf)>,
    pub(super) segments: Vec<(LogIndex, PathBuf)>,
    temporaries: Vec<PathBuf>,
}

pub(super) fn list(dir: &Path) -> Result<Listing> {
    let mut listing = Listing {
        snapshots: Vec::new(),
        segments: Vec::new(),
        temporaries: Vec::new(),
    };
    for item in fs::read_dir(dir)? {
        let path = item?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let index = |prefix: &str, suffix: &str| {
            name.strip_prefix(prefix)
                .and_then(|n| n.strip_suffix(suffix))
                .and_then(|n| n.parse::<u64>().ok())
                .map(LogIndex)
        };
        if let Some(i) = index("snapshot-", ".snap") {
            listing.snapshots.push((i, path));
        } else if let Some(i) = index("log-", ".seg") {
            listing.segments.push((i, path));
        } else if name.ends_with(".tmp") {
            listing.temporaries.push(path);
        }
    }
    listing.snapshots.sort();
    listing.segments.sort();
    Ok(listing)
}

fn read_snapshot(path: &Path) -> Result<Snapshot> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    let corrupt =
        |why: &str| Error::Corrupt(format!("snapshot {} is damaged: {why}", path.display()));
    let header = 8 + 8 + 8 + 8 + 4;
    if bytes.len() < header {
        return Err(corrupt("too short"));
    }
    if &bytes[..8] != SNAPSHOT_MAGIC {
        return Err(corrupt("bad magic"));
    }
    let mut dec = Decoder::new(&bytes[8..header]);
    let (Ok(index), Ok(epoch), Ok(len), Ok(crc)) = (dec.u64(), dec.u64(), dec.u64(), dec.u32())
    else {
        return Err(corrupt("too short"));
    };
    let (index, epoch, len) = (LogIndex(index), Epoch(epoch), len as usize);
    let state = bytes
        .get(header..)
        .filter(|s| s.len() == len)
        .ok_or_else(|| corrupt("length mismatch"))?;
    if crc32fast::hash(state) != crc {
        return Err(corrupt("checksum mismatch"));
    }
    Ok(Snapshot {
        index,
        epoch,
        state: state.to_vec(),
    })
}

fn write_snapshot(dir: &Path, snapshot: &Snapshot) -> Result<PathBuf> {
    let mut enc = Encoder::default();
    enc.buf.extend_from_slice(SNAPSHOT_MAGIC);
    enc.u64(snapshot.index.0);
    enc.u64(snapshot.epoch.0);
    enc.u64(snapshot.state.len() as u64);
    enc.u32(crc32fast::hash(&snapshot.state));
    let final_path = snapshot_path(dir, snapshot.index);
    let tmp = final_path.with_extension("tmp");
    let mut file = File::create(&tmp)?;
    file.write_all(&enc.buf)?;
    file.write_all(&snapshot.state)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, &final_path)?;
    sync_dir(dir)?;
    Ok(final_path)
}

/// The commit-index file (see the module documentation).
#[derive(Debug)]
struct CommitFile {
    file: File,
    /// The slot the next write goes to (the one not holding the latest value).
    slot: usize,
    persisted: LogIndex,
    /// Whether a write may not be on disk yet.
    unsynced: bool,
}

impl CommitFile {
    fn open(dir: &Path) -> Result<Self> {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(dir.join(COMMIT_FILE))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let (slot, persisted) = match newest_commit_slot(&bytes) {
            Some((slot, index)) => (1 - slot, index),
            None => (0, LogIndex(0)),
        };
        Ok(Self {
            file,
            slot,
            persisted,
            unsynced: false,
        })
    }

    /// Writes `index` to both slots and syncs: the commit index, lowered (a repair cut the
    /// log below it).
    fn reset(&mut self, index: LogIndex) -> io::Result<()> {
        self.write(index, false)?;
        self.write(index, true)
    }

    /// Writes `index` to the next slot; `sync`: and waits until it is on disk.
    fn write(&mut self, index: LogIndex, sync: bool) -> io::Result<()> {
        let mut enc = Encoder::default();
        enc.u64(index.0);
        enc.u32(crc32fast::hash(&index.0.to_le_bytes()));
        enc.u32(0);
        self.file
            .seek(SeekFrom::Start((self.slot * COMMIT_SLOT_BYTES) as u64))?;
        self.file.write_all(&enc.buf)?;
        self.slot = 1 - self.slot;
        self.persisted = index;
        self.unsynced = true;
        if sync {
            self.sync()?;
        }
        Ok(())
    }

    /// Makes the writes so far durable.
    fn sync(&mut self) -> io::Result<()> {
        if self.unsynced {
            self.file.sync_data()?;
            self.unsynced = false;
        }
        Ok(())
    }
}

/// The slot holding the highest valid commit index in the commit file's `bytes`, and that
/// index.
fn newest_commit_slot(bytes: &[u8]) -> Option<(usize, LogIndex)> {
    let mut best: Option<(usize, LogIndex)> = None;
    for slot in 0..2 {
        let Some(raw) = bytes.get(slot * COMMIT_SLOT_BYTES..(slot + 1) * COMMIT_SLOT_BYTES) else {
            continue;
        };
        let mut dec = Decoder::new(raw);
        let (Ok(index), Ok(crc)) = (dec.u64(), dec.u32()) else {
            continue;
        };
        if crc32fast::hash(&raw[..8]) == crc && best.is_none_or(|(_, b)| index > b.0) {
            best = Some((slot, LogIndex(index)));
        }
    }
    best
}

/// The persisted commit index of `dir` (0 without a commit file), read without changing it.
fn read_commit(dir: &Path) -> io::Result<LogIndex> {
    match fs::read(dir.join(COMMIT_FILE)) {
        Ok(bytes) => Ok(newest_commit_slot(&bytes).map_or(LogIndex(0), |(_, index)| index)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(LogIndex(0)),
        Err(e) => Err(e),
    }
}

/// What opening a data directory found and set up.
struct Opened {
    recovered: Recovered,
    map: LogMap,
    /// The last segment, open for appends.
    file: File,
    file_len: u64,
    next: LogIndex,
    commit: CommitFile,
}

/// Creates an empty segment file, synced (the directory is synced by the caller).
fn create_segment(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)?;
    file.sync_all()?;
    Ok(file)
}

/// Deletes segment files in the order given, syncing the directory after each, so that a crash
/// persists a prefix of the deletions (keeping the log contiguous).
fn remove_segments<'a>(dir: &Path, paths: impl Iterator<Item = &'a PathBuf>) -> io::Result<()> {
    for path in paths {
        fs::remove_file(path)?;
        sync_dir(dir)?;
    }
    Ok(())
}

/// The writer thread: owns the open segment, the commit file and the directory lock.
struct Writer {
    /// Held for its lock, released when the thread ends.
    _lock: File,
    dir: PathBuf,
    options: FileStorageOptions,
    shared: Arc<Shared>,
    /// The last segment, open for appends.
    file: File,
    file_len: u64,
    /// The index the next append must start at.
    next: LogIndex,
    commit: CommitFile,
    /// Set after a failed write or sync: the files' contents are unknown, so refuse more.
    failed: Option<String>,
}

/// Appended records waiting in a batch: the first index and the events' ids.
type Appended = Vec<(LogIndex, Vec<EventId>)>;
type Waiters = Vec<oneshot::Sender<Result<()>>>;

impl Writer {
    fn run(&mut self, requests: &mpsc::Receiver<Request>) {
        let mut since_commit = 0;
        loop {
            let first = match requests.try_recv() {
                Ok(request) => request,
                Err(mpsc::TryRecvError::Empty) => {
                    // Idle: a good moment to persist the commit index.
                    self.persist_commit(false);
                    since_commit = 0;
                    match requests.recv() {
                        Ok(request) => request,
                        Err(_) => break,
                    }
                }
                Err(mpsc::TryRecvError::Disconnected) => break,
            };
            let mut batch = vec![first];
            let mut bytes = 0;
            while bytes < self.options.max_batch_bytes {
                match requests.try_recv() {
                    Ok(request) => {
                        if let Request::Append { bytes: b, .. } = &request {
                            bytes += b.len();
                        }
                        batch.push(request);
                    }
                    Err(_) => break,
                }
            }
            self.serve(batch);
            since_commit += 1;
            if since_commit >= COMMIT_EVERY_BATCHES {
                self.persist_commit(false);
                since_commit = 0;
            }
        }
        self.persist_commit(true);
    }

    fn serve(&mut self, batch: Vec<Request>) {
        let mut buf = Vec::new();
        let mut appended = Appended::new();
        let mut waiters = Waiters::new();
        for request in batch {
            match request {
                Request::Append {
                    first,
                    last,
                    ids,
                    bytes,
                    done,
                } => {
                    if let Some(why) = &self.failed {
                        let _ = done.send(Err(Error::Unavailable(why.clone())));
                    } else if first != self.next {
                        let _ = done.send(Err(Error::Corrupt(format!(
                            "append of index {first} where {} was expected",
                            self.next
                        ))));
                    } else {
                        buf.extend_from_slice(&bytes);
                        appended.push((first, ids));
                        self.next = last.next();
                        waiters.push(done);
                    }
                }
                Request::Barrier { done } => waiters.push(done),
                Request::Commit => self.shared.nudged.store(false, Ordering::SeqCst),
                Request::Snapshot { snapshot, done } => {
                    self.flush(&mut buf, &mut appended, &mut waiters);
                    let _ = done.send(
                        self.refuse_if_failed()
                            .and_then(|()| self.compact(&snapshot)),
                    );
                }
                Request::Truncate { index, done } => {
                    self.flush(&mut buf, &mut appended, &mut waiters);
                    let _ = done.send(self.refuse_if_failed().and_then(|()| self.truncate(index)));
                }
            }
        }
        self.flush(&mut buf, &mut appended, &mut waiters);
        if self.failed.is_none() && self.file_len >= self.options.segment_bytes {
            let next = self.next;
            if let Err(e) = self.rotate(next) {
                self.fail(format!("cannot start a new log segment: {e}"));
            }
        }
    }

    fn refuse_if_failed(&self) -> Result<()> {
        match &self.failed {
            Some(why) => Err(Error::Unavailable(why.clone())),
            None => Ok(()),
        }
    }

    fn fail(&mut self, why: String) {
        tracing::error!("{why}");
        self.failed = Some(why);
    }

    /// Writes and syncs `buf`, records it in the index, then answers every waiter.
    fn flush(&mut self, buf: &mut Vec<u8>, appended: &mut Appended, waiters: &mut Waiters) {
        let result = if buf.is_empty() {
            Ok(())
        } else {
            self.file
                .write_all(buf)
                .and_then(|()| self.file.sync_data())
        };
        match result {
            Ok(()) if buf.is_empty() => {}
            Ok(()) => {
                self.shared.syncs.fetch_add(1, Ordering::SeqCst);
                let base = self.file_len;
                self.file_len += buf.len() as u64;
                let mut map = self.shared.map();
                if let (Some(segment), Some((first, _))) =
                    (map.segments.last_mut(), appended.first())
                {
                    segment.note_records(buf, *first, base);
                    segment.len = self.file_len;
                }
                map.last = LogIndex(self.next.0 - 1);
                for (first, ids) in appended.drain(..) {
                    for (offset, id) in ids.into_iter().enumerate() {
                        map.positions.push(id, LogIndex(first.0 + offset as u64));
                    }
                }
            }
            Err(e) => {
                self.fail(format!("log write failed, refusing further writes: {e}"));
                for done in waiters.drain(..) {
                    let _ = done.send(Err(Error::Io(io::Error::new(e.kind(), e.to_string()))));
                }
            }
        }
        for done in waiters.drain(..) {
            let _ = done.send(Ok(()));
        }
        buf.clear();
        appended.clear();
    }

    /// Writes the commit index if it advanced (never beyond the last synced entry); `sync`:
    /// and makes every write of it durable.
    fn persist_commit(&mut self, sync: bool) {
        if self.failed.is_some() {
            return;
        }
        let target = {
            let map = self.shared.map();
            map.commit.min(map.last)
        };
        let mut result = Ok(());
        if target > self.commit.persisted {
            result = self.commit.write(target, sync);
        } else if sync {
            result = self.commit.sync();
        }
        if let Err(e) = result {
            self.fail(format!(
                "commit index write failed, refusing further writes: {e}"
            ));
        }
    }

    /// Starts a new segment whose first entry will be `first`, and records it as the newest.
    fn rotate(&mut self, first: LogIndex) -> io::Result<()> {
        let path = segment_path(&self.dir, first);
        let file = create_segment(&path)?;
        sync_dir(&self.dir)?;
        write_last_segment(&self.dir, first)?;
        self.file = file;
        self.file_len = 0;
        self.shared
            .map()
            .segments
            .push(SegmentMap::new(first, path));
        Ok(())
    }

    /// Stores `snapshot` and deletes the segments it and the readers no longer need.
    fn compact(&mut self, snapshot: &Snapshot) -> Result<()> {
        let written = write_snapshot(&self.dir, snapshot)?;
        // The snapshot is durable: from here on, a failure leaves the files in an unknown
        // state, so the storage refuses further writes (a restart repairs).
        let result = self.compact_log(snapshot.index, &written);
        if let Err(e) = &result {
            self.fail(format!("compaction failed, refusing further writes: {e}"));
        }
        result
    }

    fn compact_log(&mut self, index: LogIndex, written: &Path) -> Result<()> {
        if index >= self.next {
            // A snapshot ahead of the log: the log restarts after it. The new segment is made
            // and recorded before the old ones go, so the log never has no segment.
            let next = index.next();
            let path = segment_path(&self.dir, next);
            let file = create_segment(&path)?;
            sync_dir(&self.dir)?;
            write_last_segment(&self.dir, next)?;
            let gone = {
                let mut map = self.shared.map();
                map.generation += 1;
                map.last = index;
                map.positions.clear();
                map.snapshot = Some((index, written.to_path_buf()));
                std::mem::replace(&mut map.segments, vec![SegmentMap::new(next, path)])
            };
            self.file = file;
            self.file_len = 0;
            self.next = next;
            remove_segments(&self.dir, gone.iter().map(|s| &s.path))?;
        } else {
            let keep_from = self
                .shared
                .readers()
                .keep_from(index, self.options.retention);
            if keep_from >= self.next && self.file_len > 0 {
                // Everything is covered, the open segment too: move on to a fresh one.
                let next = self.next;
                self.rotate(next)?;
            }
            let gone: Vec<SegmentMap> = {
                let mut map = self.shared.map();
                let count = map
                    .segments
                    .windows(2)
                    .take_while(|pair| pair[1].first <= keep_from)
                    .count();
                map.generation += 1;
                map.snapshot = Some((index, written.to_path_buf()));
                let gone = map.segments.drain(..count).collect();
                let first = map.first();
                map.positions.remove_before(first);
                gone
            };
            remove_segments(&self.dir, gone.iter().map(|s| &s.path))?;
        }
        for (_, path) in list(&self.dir)?.snapshots {
            if path != written {
                fs::remove_file(path)?;
            }
        }
        sync_dir(&self.dir)?;
        Ok(())
    }

    /// Removes every entry after `index` (unless that is refused).
    fn truncate(&mut self, index: LogIndex) -> Result<()> {
        let (commit, snapshot) = {
            let map = self.shared.map();
            (map.commit, map.snapshot_index())
        };
        check_truncation(index, commit, snapshot)?;
        if index.next() >= self.next {
            return Ok(());
        }
        let result = self.truncate_log(index.next());
        if let Err(e) = &result {
            self.fail(format!("truncation failed, refusing further writes: {e}"));
        }
        result
    }

    /// Cuts the log before `target` (an entry held).
    fn truncate_log(&mut self, target: LogIndex) -> Result<()> {
        let (keep, path, at, sparse_offset) = {
            let map = self.shared.map();
            let keep = map
                .segments
                .partition_point(|s| s.first <= target)
                .checked_sub(1)
                .ok_or_else(|| Error::Corrupt(format!("index {target} is not in the log")))?;
            let segment = &map.segments[keep];
            let k = (target.0 - segment.first.0) / SPARSE_EVERY;
            let offset = *segment.sparse.get(k as usize).ok_or_else(|| {
                Error::Corrupt(format!("no offset of index {target} in the log index"))
            })?;
            let at = LogIndex(segment.first.0 + k * SPARSE_EVERY);
            (keep, segment.path.clone(), at, offset)
        };
        // Walk from the noted record to `target`'s.
        let mut file = File::open(&path)?;
        let mut offset = sparse_offset;
        for _ in at.0..target.0 {
            let mut header = [0u8; RECORD_HEADER];
            file.seek(SeekFrom::Start(offset))?;
            file.read_exact(&mut header)?;
            let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
            offset += (RECORD_HEADER + len as usize) as u64;
        }
        let later: Vec<PathBuf> = {
            let mut map = self.shared.map();
            map.generation += 1;
            let later = map.segments.drain(keep + 1..).map(|s| s.path).collect();
            if let Some(segment) = map.segments.last_mut() {
                segment.len = offset;
                let noted = (target.0 - segment.first.0).div_ceil(SPARSE_EVERY);
                segment.sparse.truncate(noted as usize);
            }
            let last = LogIndex(target.0 - 1);
            map.last = last;
            map.positions.truncate_after(last);
            later
        };
        // The marker first (so it never names a segment gone), then the segments newest
        // first, and before the cut, so a crash leaves a contiguous log.
        if !later.is_empty() {
            let first = self.shared.map().segments.last().map(|s| s.first);
            if let Some(first) = first {
                write_last_segment(&self.dir, first)?;
            }
        }
        remove_segments(&self.dir, later.iter().rev())?;
        let file = OpenOptions::new().write(true).open(&path)?;
        file.set_len(offset)?;
        file.sync_all()?;
        self.file = OpenOptions::new().append(true).open(&path)?;
        self.file_len = offset;
        self.next = target;
        Ok(())
    }
}
