//! File storage: an append-only, checksummed, length-prefixed record log in segments, plus
//! snapshots for compaction.
//!
//! Layout of a data directory:
//! - `LOCK`: held (advisory lock) while a server uses the directory;
//! - `log-<first index>.seg`: records `[len: u32 LE][crc32 of payload: u32 LE][payload]`, each
//!   payload one encoded [`LogEntry`]; a segment holds contiguous indexes from its first index up
//!   to the next segment's first index;
//! - `snapshot-<index>.snap`: `SNSSNAP1`, index, epoch, state length, crc32, encoded state.
//!
//! Invariants: an append is acknowledged only after `fdatasync` of every byte of it. One writer
//! thread owns the open segment and serves appends in arrival order; requests that are waiting
//! while it syncs are written and synced together (group commit). On open, the first record that
//! is torn, fails its checksum, does not decode or breaks index continuity ends the log: the
//! segment is truncated there and later segments are removed, so every record before the damage
//! is kept. Snapshots are written to a temporary file, synced, renamed and the directory synced
//! before any log segment they cover is deleted.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, mpsc};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::{Durable, Recovered, Snapshot, Storage};
use crate::codec::{Decoder, Encoder};
use crate::error::{Error, Result};
use crate::event::LogEntry;
use crate::ids::{Epoch, LogIndex};

const SNAPSHOT_MAGIC: &[u8; 8] = b"SNSSNAP1";
const RECORD_HEADER: usize = 8;
/// No single record may claim more than this (a post is at most 4 KiB; this bounds damage).
const MAX_RECORD_BYTES: u32 = 1 << 20;

/// Tuning of a [`FileStorage`].
#[derive(Debug, Clone)]
pub struct FileStorageOptions {
    /// A segment larger than this is closed and a new one started.
    pub segment_bytes: u64,
    /// Group commit stops gathering requests once a batch holds this many bytes.
    pub max_batch_bytes: usize,
}

impl Default for FileStorageOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
            max_batch_bytes: 8 << 20,
        }
    }
}

enum Request {
    Append {
        first: LogIndex,
        last: LogIndex,
        bytes: Vec<u8>,
        done: oneshot::Sender<Result<()>>,
    },
    Snapshot {
        snapshot: Snapshot,
        done: oneshot::Sender<Result<()>>,
    },
}

/// Durable storage in one data directory. See the module documentation for the format.
#[derive(Debug)]
pub struct FileStorage {
    dir: PathBuf,
    requests: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
    recovered: Mutex<Option<Recovered>>,
}

impl FileStorage {
    /// Opens (creating if needed) the data directory `dir` with default options.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(dir, FileStorageOptions::default())
    }

    /// Opens `dir`: takes its lock, loads the latest snapshot, scans the log, truncates any
    /// damaged tail, and starts the writer thread.
    pub fn open_with(dir: impl AsRef<Path>, options: FileStorageOptions) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir)?;
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
        let (recovered, log) = scan(&dir)?;
        let (tx, rx) = mpsc::channel();
        let writer = std::thread::Builder::new()
            .name("sns-log-writer".to_string())
            .spawn(move || {
                let mut writer = Writer {
                    lock,
                    options,
                    log,
                    failed: None,
                };
                writer.run(&rx);
            })?;
        Ok(Self {
            dir,
            requests: Some(tx),
            writer: Some(writer),
            recovered: Mutex::new(Some(recovered)),
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn send(&self, request: Request) -> Result<()> {
        self.requests
            .as_ref()
            .and_then(|tx| tx.send(request).ok())
            .ok_or_else(|| Error::Unavailable("storage writer stopped".to_string()))
    }
}

impl Drop for FileStorage {
    fn drop(&mut self) {
        // Closing the channel ends the writer after the requests already queued; joining it
        // means the directory lock is released only once nothing more will be written.
        self.requests.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

#[async_trait::async_trait]
impl Storage for FileStorage {
    async fn recover(&self) -> Result<Recovered> {
        let cached = self
            .recovered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match cached {
            Some(recovered) => Ok(recovered),
            None => {
                // Read-only rescan; the writer owns the tail, so sync first by a no-op barrier.
                let (done, wait) = oneshot::channel();
                self.send(Request::Append {
                    first: LogIndex(0),
                    last: LogIndex(0),
                    bytes: Vec::new(),
                    done,
                })?;
                wait.await
                    .map_err(|_| Error::Unavailable("storage writer stopped".to_string()))??;
                let dir = self.dir.clone();
                tokio::task::spawn_blocking(move || read_only_scan(&dir))
                    .await
                    .map_err(|e| Error::Unavailable(format!("recovery task failed: {e}")))?
            }
        }
    }

    fn append(&self, entries: Vec<LogEntry>) -> Durable {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Box::pin(std::future::ready(Ok(())));
        };
        let (first, last) = (first.index, last.index);
        let mut bytes = Vec::with_capacity(entries.len() * 64);
        for entry in &entries {
            frame(&mut bytes, entry);
        }
        let (done, wait) = oneshot::channel();
        let sent = self.send(Request::Append {
            first,
            last,
            bytes,
            done,
        });
        Box::pin(async move {
            sent?;
            wait.await
                .map_err(|_| Error::Unavailable("storage writer stopped".to_string()))?
        })
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        let (done, wait) = oneshot::channel();
        self.send(Request::Snapshot { snapshot, done })?;
        wait.await
            .map_err(|_| Error::Unavailable("storage writer stopped".to_string()))?
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

/// Parses the records of one segment. Returns the entries and the byte length of the valid
/// prefix; stops at the first damaged record or index discontinuity.
pub(super) fn parse_segment(
    bytes: &[u8],
    mut expected: LogIndex,
) -> (Vec<LogEntry>, usize, Option<String>) {
    let mut entries = Vec::new();
    let mut offset = 0;
    while offset < bytes.len() {
        let damage = |why: String| Some(format!("at byte {offset}: {why}"));
        let Some(header) = bytes.get(offset..offset + RECORD_HEADER) else {
            return (entries, offset, damage("torn record header".into()));
        };
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len > MAX_RECORD_BYTES {
            return (entries, offset, damage(format!("record length {len}")));
        }
        let body = offset + RECORD_HEADER;
        let Some(payload) = bytes.get(body..body + len as usize) else {
            return (entries, offset, damage("torn record".into()));
        };
        if crc32fast::hash(payload) != crc {
            return (entries, offset, damage("checksum mismatch".into()));
        }
        let entry = match LogEntry::from_bytes(payload) {
            Ok(entry) => entry,
            Err(e) => return (entries, offset, damage(e.to_string())),
        };
        if entry.index != expected {
            let why = format!("index {} where {} was expected", entry.index, expected);
            return (entries, offset, damage(why));
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
    let corrupt = |why: &str| Error::Corrupt(format!("snapshot {}: {why}", path.display()));
    let mut dec = Decoder::new(&bytes);
    let mut magic = [0u8; 8];
    for b in &mut magic {
        *b = dec.u8().map_err(|_| corrupt("too short"))?;
    }
    if &magic != SNAPSHOT_MAGIC {
        return Err(corrupt("bad magic"));
    }
    let index = LogIndex(dec.u64()?);
    let epoch = Epoch(dec.u64()?);
    let len = dec.u64()? as usize;
    let crc = dec.u32()?;
    let header = 8 + 8 + 8 + 8 + 4;
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

/// The open tail of the log, as the writer thread sees it.
struct OpenLog {
    dir: PathBuf,
    /// Segments by first index; the last one is open for appends.
    segments: Vec<(LogIndex, PathBuf)>,
    file: File,
    file_len: u64,
    next: LogIndex,
}

/// Opens the directory's contents, repairing a torn tail.
fn scan(dir: &Path) -> Result<(Recovered, OpenLog)> {
    let listing = list(dir)?;
    for tmp in &listing.temporaries {
        fs::remove_file(tmp)?;
    }
    let snapshot = match listing.snapshots.last() {
        Some((_, path)) => Some(read_snapshot(path)?),
        None => None,
    };
    for (_, path) in listing.snapshots.iter().rev().skip(1) {
        fs::remove_file(path)?;
    }
    let base = snapshot.as_ref().map(|s| s.index).unwrap_or_default();
    let scanned = scan_segments(listing.segments, base, true)?;
    let next = scanned.entries.last().map_or(base, |e| e.index).next();
    let mut segments = scanned.segments;
    let (file, file_len) = match segments.last() {
        // The last segment ends where the log does: keep appending to it.
        Some((_, path)) if scanned.end == next => (
            OpenOptions::new().append(true).open(path)?,
            scanned.last_len,
        ),
        // No segment, or the snapshot reaches past the last one (a snapshot installed ahead of
        // the log): start a fresh segment at `next`, so indexes stay contiguous within a file.
        _ => {
            let path = segment_path(dir, next);
            let file = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&path)?;
            file.sync_all()?;
            segments.push((next, path));
            (file, 0)
        }
    };
    sync_dir(dir)?;
    let recovered = Recovered {
        snapshot,
        entries: scanned.entries,
    };
    let log = OpenLog {
        dir: dir.to_path_buf(),
        segments,
        file,
        file_len,
        next,
    };
    Ok((recovered, log))
}

/// What [`scan_segments`] found.
struct ScannedLog {
    /// The entries after the snapshot.
    entries: Vec<LogEntry>,
    /// The segments kept, by first index.
    segments: Vec<(LogIndex, PathBuf)>,
    /// The index after the last valid record of the last segment.
    end: LogIndex,
    /// The valid length of the last segment.
    last_len: u64,
}

/// Reads the segments after snapshot index `base`.
///
/// Only the last segment can have a torn tail (appends go to it alone, and a segment is synced
/// before the next one is started). So damage in the last segment is truncated (with `repair`),
/// while damage in an earlier one, or a missing segment, fails the open: truncating there would
/// throw away later records whose fsync completed.
fn scan_segments(
    segments: Vec<(LogIndex, PathBuf)>,
    base: LogIndex,
    repair: bool,
) -> Result<ScannedLog> {
    // Segments entirely covered by the snapshot are leftovers of an interrupted compaction.
    let mut live = Vec::new();
    for (i, (first, path)) in segments.iter().enumerate() {
        let covered = segments
            .get(i + 1)
            .is_some_and(|(next_first, _)| next_first.0 <= base.0 + 1);
        if covered {
            if repair {
                fs::remove_file(path)?;
            }
        } else {
            live.push((*first, path.clone()));
        }
    }
    let mut scanned = ScannedLog {
        entries: Vec::new(),
        segments: Vec::new(),
        end: base.next(),
        last_len: 0,
    };
    let count = live.len();
    for (position, (first, path)) in live.into_iter().enumerate() {
        let is_last = position + 1 == count;
        if position == 0 && first.0 > base.0 + 1 {
            return Err(Error::Corrupt(format!(
                "log starts at index {first} but the snapshot ends at {base}: entries missing"
            )));
        }
        if position > 0 && first != scanned.end {
            return Err(Error::Corrupt(format!(
                "segment {} starts at index {first} where {} was expected",
                path.display(),
                scanned.end
            )));
        }
        let mut bytes = Vec::new();
        File::open(&path)?.read_to_end(&mut bytes)?;
        let (found, valid, damage) = parse_segment(&bytes, first);
        scanned.end = LogIndex(first.0 + found.len() as u64);
        scanned
            .entries
            .extend(found.into_iter().filter(|e| e.index > base));
        if let Some(why) = damage {
            if !is_last {
                return Err(Error::Corrupt(format!(
                    "segment {} is damaged {why}, and later segments hold durable records; \
                     refusing to truncate",
                    path.display()
                )));
            }
            tracing::warn!(segment = %path.display(), %why, "truncating damaged log tail");
            if repair {
                let file = OpenOptions::new().write(true).open(&path)?;
                file.set_len(valid as u64)?;
                file.sync_all()?;
            }
        }
        scanned.last_len = valid as u64;
        scanned.segments.push((first, path));
    }
    if scanned.end.0 < base.0 + 1 {
        // The log ends before the snapshot: the next append continues after the snapshot.
        scanned.end = base.next();
        scanned.segments.clear();
    }
    if let Some(first) = scanned.entries.first()
        && first.index.0 != base.0 + 1
    {
        return Err(Error::Corrupt(format!(
            "log resumes at index {} but the snapshot ends at {base}",
            first.index
        )));
    }
    Ok(scanned)
}

/// A second look at a directory in use (after the cached recovery was taken): no repairs.
fn read_only_scan(dir: &Path) -> Result<Recovered> {
    let listing = list(dir)?;
    let snapshot = match listing.snapshots.last() {
        Some((_, path)) => Some(read_snapshot(path)?),
        None => None,
    };
    let base = snapshot.as_ref().map(|s| s.index).unwrap_or_default();
    let entries = scan_segments(listing.segments, base, false)?.entries;
    Ok(Recovered { snapshot, entries })
}

/// The writer thread: owns the open segment and the directory lock.
struct Writer {
    #[allow(dead_code)] // held for its lock, released when the thread ends
    lock: File,
    options: FileStorageOptions,
    log: OpenLog,
    /// Set after a failed write or sync: the file's contents are unknown, so refuse more.
    failed: Option<String>,
}

impl Writer {
    fn run(&mut self, requests: &mpsc::Receiver<Request>) {
        while let Ok(first) = requests.recv() {
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
        }
    }

    fn serve(&mut self, batch: Vec<Request>) {
        let mut pending: Vec<oneshot::Sender<Result<()>>> = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        for request in batch {
            match request {
                Request::Append {
                    first,
                    last,
                    bytes,
                    done,
                } => {
                    if let Some(why) = &self.failed {
                        let _ = done.send(Err(Error::Unavailable(why.clone())));
                    } else if bytes.is_empty() {
                        pending.push(done);
                    } else if first != self.log.next {
                        let _ = done.send(Err(Error::Corrupt(format!(
                            "append of index {first} where {} was expected",
                            self.log.next
                        ))));
                    } else {
                        buf.extend_from_slice(&bytes);
                        self.log.next = last.next();
                        pending.push(done);
                    }
                }
                Request::Snapshot { snapshot, done } => {
                    self.flush(&mut buf, &mut pending);
                    let result = match &self.failed {
                        Some(why) => Err(Error::Unavailable(why.clone())),
                        None => self.compact(&snapshot),
                    };
                    let _ = done.send(result);
                }
            }
        }
        self.flush(&mut buf, &mut pending);
        if self.failed.is_none()
            && self.log.file_len >= self.options.segment_bytes
            && let Err(e) = self.rotate(self.log.next)
        {
            self.failed = Some(format!("cannot start a new log segment: {e}"));
        }
    }

    /// Writes and syncs `buf`, then answers every waiter in `pending`.
    fn flush(&mut self, buf: &mut Vec<u8>, pending: &mut Vec<oneshot::Sender<Result<()>>>) {
        let result = if buf.is_empty() {
            Ok(())
        } else {
            self.log
                .file
                .write_all(buf)
                .and_then(|()| self.log.file.sync_data())
        };
        match result {
            Ok(()) => {
                self.log.file_len += buf.len() as u64;
                for done in pending.drain(..) {
                    let _ = done.send(Ok(()));
                }
            }
            Err(e) => {
                let why = format!("log write failed, refusing further writes: {e}");
                tracing::error!("{why}");
                self.failed = Some(why);
                for done in pending.drain(..) {
                    let _ = done.send(Err(Error::Io(io::Error::new(e.kind(), e.to_string()))));
                }
            }
        }
        buf.clear();
    }

    /// Starts a new segment whose first entry will be `first`.
    fn rotate(&mut self, first: LogIndex) -> io::Result<()> {
        let path = segment_path(&self.log.dir, first);
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        file.sync_all()?;
        sync_dir(&self.log.dir)?;
        self.log.file = file;
        self.log.file_len = 0;
        self.log.segments.push((first, path));
        Ok(())
    }

    /// Stores `snapshot` and removes what it makes redundant.
    fn compact(&mut self, snapshot: &Snapshot) -> Result<()> {
        let dir = self.log.dir.clone();
        let written = write_snapshot(&dir, snapshot)?;
        // A snapshot ahead of the log (installed from elsewhere) restarts the log after it.
        let next = self.log.next.max(snapshot.index.next());
        let fresh = self.log.file_len == 0 && self.log.segments.last().map(|s| s.0) == Some(next);
        if !fresh && let Err(e) = self.rotate(next) {
            self.failed = Some(format!("cannot start a new log segment: {e}"));
            return Err(e.into());
        }
        self.log.next = next;
        let segments = std::mem::take(&mut self.log.segments);
        let mut kept = Vec::new();
        for (i, (first, path)) in segments.iter().enumerate() {
            let covered = segments
                .get(i + 1)
                .is_some_and(|(next, _)| next.0 <= snapshot.index.0 + 1);
            if covered {
                fs::remove_file(path)?;
            } else {
                kept.push((*first, path.clone()));
            }
        }
        self.log.segments = kept;
        for (_, path) in list(&dir)?.snapshots {
            if path != written {
                fs::remove_file(path)?;
            }
        }
        sync_dir(&dir)?;
        Ok(())
    }
}
