//! The writer thread: the one owner of the open segment, the commit file and the directory
//! lock. It serves requests from a bounded queue in arrival order; appends waiting while it
//! syncs are written and synced together (group commit), and each is answered only after the
//! `fdatasync` of every byte of it. It persists the commit index at least every
//! [`COMMIT_EVERY_BATCHES`] batches and once it has had no request for [`COMMIT_IDLE`], never
//! beyond the last synced entry. A commit alone does not wake it while it is between requests
//! (the next request or the idle timeout finds it); only a writer asleep with nothing left to
//! persist is woken by one.
//! After a failed write or sync it refuses every further change.
//!
//! The open segment is allocated ahead: when a batch would run past the bytes already written,
//! the batch goes out followed by zeros up to [`FileStorageOptions::preallocate_bytes`] beyond
//! it, in the same write and sync. Later batches overwrite those zeros, so their `fdatasync`
//! writes only data: the file's size, and so its inode, does not change. A disk too full for
//! the room takes the batch alone, and the segment gets no more room.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use tokio::sync::oneshot;

use super::FileStorageOptions;
use super::format::{CommitFile, RECORD_HEADER, record_len};
use super::index::{SPARSE_EVERY, SegmentMap, Shared};
use super::layout::{create_segment, list, remove_segments, segment_path, sync_dir};
use super::marker::write_last_segment;
use crate::error::{Error, Result};
use crate::ids::{EventId, LogIndex};
use crate::storage::check_truncation;

/// Under a steady load the writer persists an advanced commit index at least this often.
pub(in crate::storage) const COMMIT_EVERY_BATCHES: u32 = 64;
/// Most room allocated ahead at once, whatever [`FileStorageOptions::preallocate_bytes`] asks.
const MAX_ROOM: u64 = 64 << 20;
/// An idle writer persists an advanced commit index after this long without a request.
pub(super) const COMMIT_IDLE: Duration = Duration::from_millis(10);

/// What the storage handle asks of the writer thread.
pub(super) enum Request {
    Append {
        first: LogIndex,
        last: LogIndex,
        ids: Vec<EventId>,
        bytes: Vec<u8>,
        done: oneshot::Sender<Result<()>>,
    },
    /// A snapshot at `index`, already written and synced as `written`, to install: it
    /// becomes the storage's snapshot and the log is compacted behind it.
    Snapshot {
        index: LogIndex,
        written: PathBuf,
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

/// The writer thread: owns the open segment, the commit file and the directory lock.
pub(super) struct Writer {
    /// Held for its lock, released when the thread ends.
    pub(super) _lock: File,
    pub(super) dir: PathBuf,
    pub(super) options: FileStorageOptions,
    pub(super) shared: Arc<Shared>,
    /// The last segment, open for writing.
    pub(super) file: File,
    /// Bytes of records in the open segment; the next batch is written at this offset.
    pub(super) file_len: u64,
    /// The open segment's size: records, then zeros allocated ahead.
    pub(super) allocated: u64,
    /// The disk had no room to allocate ahead in the open segment: batches go alone.
    pub(super) no_room: bool,
    /// The index the next append must start at.
    pub(super) next: LogIndex,
    pub(super) commit: CommitFile,
    /// Set after a failed write or sync: the files' contents are unknown, so refuse more.
    pub(super) failed: Option<String>,
}

/// Appended records waiting in a batch: the first index and the events' ids.
pub(super) type Appended = Vec<(LogIndex, Vec<EventId>)>;
pub(super) type Waiters = Vec<oneshot::Sender<Result<()>>>;

impl Writer {
    pub(super) fn run(&mut self, requests: &mpsc::Receiver<Request>) {
        let mut since_commit = 0;
        loop {
            let first = match requests.try_recv() {
                Ok(request) => request,
                Err(mpsc::TryRecvError::Empty) => match self.idle(requests) {
                    Some(request) => request,
                    None => break,
                },
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

    /// Waits for the next request (`None`: the storage closed). While the commit index has
    /// advanced past the persisted one, it waits at most [`COMMIT_IDLE`] at a time and
    /// persists the index when that passes with no request; with nothing to persist it sleeps
    /// until a request comes, telling `set_commit` to wake it.
    fn idle(&mut self, requests: &mpsc::Receiver<Request>) -> Option<Request> {
        loop {
            if self.commit_behind() {
                match requests.recv_timeout(COMMIT_IDLE) {
                    Ok(request) => return Some(request),
                    Err(mpsc::RecvTimeoutError::Timeout) => self.persist_commit(false),
                    Err(mpsc::RecvTimeoutError::Disconnected) => return None,
                }
                continue;
            }
            // Said before the check, so that a commit made after the check sees it and wakes
            // this thread, and a commit made before it is found by the check.
            self.shared.sleeping.store(true, Ordering::SeqCst);
            if self.commit_behind() {
                self.shared.sleeping.store(false, Ordering::SeqCst);
                continue;
            }
            let request = requests.recv().ok();
            self.shared.sleeping.store(false, Ordering::SeqCst);
            return request;
        }
    }

    /// Whether the commit index has advanced past the persisted one (within the synced log).
    fn commit_behind(&self) -> bool {
        if self.failed.is_some() {
            return false;
        }
        let map = self.shared.map();
        map.commit.min(map.last) > self.commit.persisted
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
                        let _ = done.send(Err(Error::StorageFailed(why.clone())));
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
                Request::Snapshot {
                    index,
                    written,
                    done,
                } => {
                    self.flush(&mut buf, &mut appended, &mut waiters);
                    let _ = done.send(self.install(index, &written));
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
            Some(why) => Err(Error::StorageFailed(why.clone())),
            None => Ok(()),
        }
    }

    fn fail(&mut self, why: String) {
        tracing::error!("{why}");
        self.failed = Some(why);
    }

    /// Writes and syncs `buf` (allocating room ahead when it runs past the segment's size),
    /// records it in the index, then answers every waiter.
    fn flush(&mut self, buf: &mut Vec<u8>, appended: &mut Appended, waiters: &mut Waiters) {
        let records = buf.len();
        let result = if buf.is_empty() {
            Ok(())
        } else {
            let end = self.file_len + records as u64;
            let room = if end > self.allocated && !self.no_room {
                let room = self.options.preallocate_bytes.min(MAX_ROOM);
                usize::try_from(room).unwrap_or(0)
            } else {
                0
            };
            buf.resize(records + room, 0);
            let mut written = self.file.write_all_at(buf, self.file_len);
            if room > 0 && written.as_ref().is_err_and(disk_full) {
                // No room to spare on the disk: the records alone may still fit. Zeros the
                // failed write left after them read as the end of the records.
                self.no_room = true;
                buf.truncate(records);
                written = self.file.write_all_at(buf, self.file_len);
            }
            written.and_then(|()| {
                let started = std::time::Instant::now();
                let synced = self.file.sync_data();
                self.shared.sync_latency.observe(started.elapsed());
                synced
            })
        };
        match result {
            Ok(()) if buf.is_empty() => {}
            Ok(()) => {
                self.shared.syncs.fetch_add(1, Ordering::SeqCst);
                let base = self.file_len;
                self.allocated = self.allocated.max(base + buf.len() as u64);
                buf.truncate(records);
                self.file_len += records as u64;
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
    /// The closing segment gives back the room allocated ahead (unsynced: zeros left by a
    /// crash read as the end of its records).
    fn rotate(&mut self, first: LogIndex) -> io::Result<()> {
        if self.allocated > self.file_len {
            self.file.set_len(self.file_len)?;
        }
        let path = segment_path(&self.dir, first);
        let file = create_segment(&path)?;
        sync_dir(&self.dir)?;
        write_last_segment(&self.dir, first)?;
        self.file = file;
        self.file_len = 0;
        self.allocated = 0;
        self.no_room = false;
        self.shared
            .map()
            .segments
            .push(SegmentMap::new(first, path));
        Ok(())
    }

    /// Makes the snapshot at `index`, written as `written`, the storage's snapshot and deletes
    /// the segments it and the readers no longer need, and older snapshots. A snapshot older
    /// than the one held is dropped instead (two were saved at once), and one of the same
    /// index is the one held.
    fn install(&mut self, index: LogIndex, written: &Path) -> Result<()> {
        let held = self.shared.map().snapshot.clone();
        if let Err(e) = self.refuse_if_failed() {
            let _ = fs::remove_file(written);
            return Err(e);
        }
        match held {
            Some((held, _)) if held > index => {
                fs::remove_file(written)?;
                return Ok(());
            }
            // The same committed state, written under the same name: already installed.
            Some((held, _)) if held == index => return Ok(()),
            _ => {}
        }
        // The snapshot is durable: from here on, a failure leaves the files in an unknown
        // state, so the storage refuses further writes (a restart repairs).
        let result = self.compact_log(index, written);
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
            self.allocated = 0;
            self.no_room = false;
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
        for (at, path) in list(&self.dir)?.snapshots {
            if at < index {
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
            let len = record_len(&header);
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
        self.file = file;
        self.file_len = offset;
        self.allocated = offset;
        self.next = target;
        Ok(())
    }
}

/// Whether `error` says the disk (or the user's quota) is full.
fn disk_full(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}
