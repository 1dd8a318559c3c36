//! The in-memory index of the durable log: per segment the byte offset of every
//! [`SPARSE_EVERY`]th record, per origin where its events sit, the snapshot and the commit
//! index. The writer thread changes it after each synced batch, truncation or compaction
//! (bumping its generation when entries or files go away); readers plan under its lock, read
//! the byte ranges without it, and start over if the generation changed meanwhile.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Mutex, MutexGuard};

use super::format::{RECORD_HEADER, parse_segment, read_snapshot, record_len};
use crate::error::{Error, Result};
use crate::event::LogEntry;
use crate::ids::LogIndex;
use crate::storage::positions::Positions;
use crate::storage::readers::Readers;
use crate::storage::{Recovered, Snapshot};

/// The in-memory index notes the byte offset of every this many records of a segment.
pub(super) const SPARSE_EVERY: u64 = 32;

/// One segment, as the in-memory index knows it.
#[derive(Debug)]
pub(super) struct SegmentMap {
    pub(super) first: LogIndex,
    pub(super) path: PathBuf,
    /// Bytes of synced, valid records.
    pub(super) len: u64,
    /// `sparse[k]` is the byte offset of the record with index `first + k * SPARSE_EVERY`.
    pub(super) sparse: Vec<u64>,
}

impl SegmentMap {
    pub(super) fn new(first: LogIndex, path: PathBuf) -> Self {
        Self {
            first,
            path,
            len: 0,
            sparse: Vec::new(),
        }
    }

    /// Notes the records framed in `bytes`, the first with index `index`, written at `base`.
    pub(super) fn note_records(&mut self, bytes: &[u8], mut index: LogIndex, base: u64) {
        let mut offset = 0;
        while let Some(header) = bytes.get(offset..offset + RECORD_HEADER) {
            if (index.0 - self.first.0).is_multiple_of(SPARSE_EVERY) {
                self.sparse.push(base + offset as u64);
            }
            let len = record_len(header);
            offset += RECORD_HEADER + len as usize;
            index = index.next();
        }
    }
}

/// The durable log as readers see it. The writer thread changes it after each synced batch,
/// truncation or compaction; readers plan their reads under its lock and read without it.
#[derive(Debug)]
pub(super) struct LogMap {
    /// Contiguous segments; every one but the last is full.
    pub(super) segments: Vec<SegmentMap>,
    /// The last synced entry.
    pub(super) last: LogIndex,
    /// The latest snapshot's index and file.
    pub(super) snapshot: Option<(LogIndex, PathBuf)>,
    /// The commit index (as set; the writer persists it).
    pub(super) commit: LogIndex,
    pub(super) positions: Positions,
    /// Changes whenever entries or files go away (truncation, compaction): a read planned
    /// under an older generation is retried.
    pub(super) generation: u64,
}

impl LogMap {
    pub(super) fn first(&self) -> LogIndex {
        self.segments
            .first()
            .map_or(self.last.next(), |segment| segment.first)
    }

    pub(super) fn snapshot_index(&self) -> LogIndex {
        self.snapshot.as_ref().map(|s| s.0).unwrap_or_default()
    }

    /// Where the entries `from..=to` (held, durable) are: one piece per segment.
    pub(super) fn plan(&self, from: LogIndex, to: LogIndex) -> Result<Vec<Piece>> {
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
pub(super) struct Piece {
    pub(super) path: PathBuf,
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) at: LogIndex,
    pub(super) skip: usize,
    pub(super) take: usize,
}

impl Piece {
    pub(super) fn read(&self, into: &mut Vec<LogEntry>) -> Result<()> {
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
pub(super) struct Shared {
    pub(super) map: Mutex<LogMap>,
    pub(super) readers: Mutex<Readers>,
    /// A `Request::Commit` is queued (so `set_commit` need not queue another).
    pub(super) nudged: AtomicBool,
    /// The writer is asleep until the next request, with nothing left to persist: only then
    /// does `set_commit` wake it (with a `Request::Commit`).
    pub(super) sleeping: AtomicBool,
    /// Log syncs (`fdatasync` of appended records) so far.
    pub(super) syncs: AtomicU64,
    /// How long those syncs took.
    pub(super) sync_latency: crate::stats::LatencyHistogram,
}

impl Shared {
    pub(super) fn map(&self) -> MutexGuard<'_, LogMap> {
        // Every update of the map is complete before anything that could panic.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn readers(&self) -> MutexGuard<'_, Readers> {
        self.readers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The durable entries `from..=to`. Plans under the lock, reads without it, and starts
    /// over if entries or files went away meanwhile.
    pub(super) fn read(&self, from: LogIndex, to: LogIndex) -> Result<Vec<LogEntry>> {
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
    pub(super) fn snapshot(&self) -> Result<Option<Snapshot>> {
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
    pub(super) fn recover(&self) -> Result<Recovered> {
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
