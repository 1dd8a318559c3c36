//! The bytes of the files in a data directory: log records (`[len: u32 LE][crc32 of payload:
//! u32 LE][payload]`, each payload one encoded [`LogEntry`]), snapshot files and the two-slot
//! commit-index file. Every decoder here checks lengths and checksums and reports damage; none
//! panics on what it reads.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::layout::{snapshot_path, sync_dir};
use crate::codec::{Decoder, Encoder};
use crate::error::{Error, Result};
use crate::event::LogEntry;
use crate::ids::{Epoch, LogIndex};
use crate::storage::Snapshot;

pub(super) const RECORD_HEADER: usize = 8;
/// No record read may claim more than this (this bounds damage). Records are written only up
/// to [`MAX_RECORD_BYTES`](crate::event::MAX_RECORD_BYTES); earlier versions wrote longer
/// ones, which still read.
pub(super) const MAX_READ_RECORD_BYTES: u32 = crate::event::MAX_LEGACY_RECORD_BYTES as u32;
pub(super) const SNAPSHOT_MAGIC: &[u8; 8] = b"SNSSNAP1";
pub(super) const COMMIT_FILE: &str = "commit";
pub(super) const COMMIT_SLOT_BYTES: usize = 16;

/// The payload length a record header (its first [`RECORD_HEADER`] bytes) gives.
pub(super) fn record_len(header: &[u8]) -> u32 {
    u32::from_le_bytes([header[0], header[1], header[2], header[3]])
}

/// Appends one framed record for `entry` to `buf`.
pub(in crate::storage) fn frame(buf: &mut Vec<u8>, entry: &LogEntry) {
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
/// record or index discontinuity. Zeros from a record boundary to the end are the segment's
/// unused preallocated room: the records end there, undamaged.
pub(in crate::storage) fn parse_segment(
    bytes: &[u8],
    mut expected: LogIndex,
) -> (Vec<LogEntry>, usize, Option<String>) {
    let mut entries = Vec::new();
    let mut offset = 0;
    while offset < bytes.len() {
        // Zeros to the end of the file are room the writer allocated ahead, not a record.
        if bytes[offset..].iter().all(|&b| b == 0) {
            return (entries, offset, None);
        }
        let Some(header) = bytes.get(offset..offset + RECORD_HEADER) else {
            return (
                entries,
                offset,
                Some("the file ends inside a record header".into()),
            );
        };
        let len = record_len(header);
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

pub(super) fn read_snapshot(path: &Path) -> Result<Snapshot> {
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

/// Writes `snapshot` durably as the file its index names (through a temporary file, renamed
/// once synced) and returns its path.
pub(super) fn write_snapshot(dir: &Path, snapshot: &Snapshot) -> Result<PathBuf> {
    let mut enc = Encoder::default();
    enc.buf.extend_from_slice(SNAPSHOT_MAGIC);
    enc.u64(snapshot.index.0);
    enc.u64(snapshot.epoch.0);
    enc.u64(snapshot.state.len() as u64);
    enc.u32(crc32fast::hash(&snapshot.state));
    let final_path = snapshot_path(dir, snapshot.index);
    // Unique among concurrent writers of the same index (a slave installing its master's
    // snapshot while taking its own); left-over `.tmp` files are removed on open.
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let tmp = final_path.with_extension(format!("{}.tmp", WRITES.fetch_add(1, Ordering::Relaxed)));
    let mut file = File::create(&tmp)?;
    file.write_all(&enc.buf)?;
    // In slices, each synced: the log's appends sync the same disk meanwhile, and a large
    // unsynced write would make one of their syncs wait for all of it.
    for slice in snapshot.state.chunks(SNAPSHOT_SYNC_SLICE) {
        file.write_all(slice)?;
        file.sync_data()?;
    }
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, &final_path)?;
    sync_dir(dir)?;
    Ok(final_path)
}

/// Bytes of a snapshot written between two syncs.
const SNAPSHOT_SYNC_SLICE: usize = 1 << 20;

/// The commit-index file (see the module documentation).
#[derive(Debug)]
pub(super) struct CommitFile {
    file: File,
    /// The slot the next write goes to (the one not holding the latest value).
    slot: usize,
    pub(super) persisted: LogIndex,
    /// Whether a write may not be on disk yet.
    unsynced: bool,
}

impl CommitFile {
    pub(super) fn open(dir: &Path) -> Result<Self> {
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
    pub(super) fn reset(&mut self, index: LogIndex) -> io::Result<()> {
        self.write(index, false)?;
        self.write(index, true)
    }

    /// Writes `index` to the next slot; `sync`: and waits until it is on disk.
    pub(super) fn write(&mut self, index: LogIndex, sync: bool) -> io::Result<()> {
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
    pub(super) fn sync(&mut self) -> io::Result<()> {
        if self.unsynced {
            self.file.sync_data()?;
            self.unsynced = false;
        }
        Ok(())
    }
}

/// The slot holding the highest valid commit index in the commit file's `bytes`, and that
/// index.
pub(super) fn newest_commit_slot(bytes: &[u8]) -> Option<(usize, LogIndex)> {
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
pub(in crate::storage) fn read_commit(dir: &Path) -> io::Result<LogIndex> {
    match fs::read(dir.join(COMMIT_FILE)) {
        Ok(bytes) => Ok(newest_commit_slot(&bytes).map_or(LogIndex(0), |(_, index)| index)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(LogIndex(0)),
        Err(e) => Err(e),
    }
}
