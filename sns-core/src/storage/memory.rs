//! In-memory storage: nothing survives the process, but a "restart" within the process (a new
//! server on the same `MemoryStorage`) recovers everything, like a disk would.
//!
//! [`MemLog`] is the log itself, kept by the rules of [`Storage`]; `MemoryStorage` puts it
//! behind a lock, and the crash disk uses one as its durable image.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use super::positions::Positions;
use super::readers::Readers;
use super::{
    DEFAULT_RETENTION, Durable, Recovered, Snapshot, Storage, check_contiguous, check_truncation,
};
use crate::error::{Error, Result};
use crate::event::LogEntry;
use crate::ids::{EventId, LogIndex};

/// A log in memory: the latest snapshot, the entries `first..=last`, the commit index.
#[derive(Debug, Clone)]
pub(crate) struct MemLog {
    snapshot: Option<Snapshot>,
    /// The entries held; the first one has index `first`.
    entries: VecDeque<LogEntry>,
    first: LogIndex,
    commit: LogIndex,
    positions: Positions,
}

impl Default for MemLog {
    fn default() -> Self {
        Self {
            snapshot: None,
            entries: VecDeque::new(),
            first: LogIndex(1),
            commit: LogIndex(0),
            positions: Positions::default(),
        }
    }
}

impl MemLog {
    /// The index of the last entry held, or `first - 1` when none is.
    pub(crate) fn last(&self) -> LogIndex {
        LogIndex(self.first.0 + self.entries.len() as u64 - 1)
    }

    /// The index of the latest snapshot, or 0.
    pub(crate) fn snapshot_index(&self) -> LogIndex {
        self.snapshot.as_ref().map(|s| s.index).unwrap_or_default()
    }

    /// The commit index.
    pub(crate) fn commit(&self) -> LogIndex {
        self.commit
    }

    /// Appends `entries`, which must continue the log.
    pub(crate) fn append(&mut self, entries: Vec<LogEntry>) -> Result<()> {
        check_contiguous(self.last().next(), &entries)?;
        for entry in &entries {
            crate::event::check_entry_fits(entry)?;
        }
        for entry in entries {
            self.positions.push(entry.event.id, entry.index);
            self.entries.push_back(entry);
        }
        Ok(())
    }

    /// Raises the commit index to `index`, clamped to the last entry.
    pub(crate) fn set_commit(&mut self, index: LogIndex) {
        self.commit = self.commit.max(index.min(self.last()));
    }

    /// Removes the entries after `index`, unless that goes below the commit or the snapshot.
    pub(crate) fn truncate_after(&mut self, index: LogIndex) -> Result<()> {
        check_truncation(index, self.commit, self.snapshot_index())?;
        let keep = index.0.saturating_add(1).saturating_sub(self.first.0);
        if keep < self.entries.len() as u64 {
            self.entries.truncate(keep as usize);
            self.positions.truncate_after(index);
        }
        Ok(())
    }

    /// Stores `snapshot`, then drops the entries before `keep_from` (at most the index after
    /// the snapshot). A snapshot ahead of the log empties it.
    pub(crate) fn save_snapshot(&mut self, snapshot: Snapshot, keep_from: LogIndex) {
        let next = snapshot.index.next();
        if snapshot.index > self.last() {
            self.entries.clear();
            self.positions.clear();
            self.first = next;
        } else {
            let keep_from = keep_from.min(next);
            let gone = keep_from.0.saturating_sub(self.first.0) as usize;
            if gone > 0 {
                self.entries.drain(..gone);
                self.first = keep_from;
                self.positions.remove_before(keep_from);
            }
        }
        self.snapshot = Some(snapshot);
    }

    /// The entries `from..=to` held, clipped to the last one.
    pub(crate) fn read(&self, from: LogIndex, to: LogIndex) -> Result<Vec<LogEntry>> {
        let from = from.max(LogIndex(1));
        if from < self.first {
            return Err(Error::Compacted { first: self.first });
        }
        let to = to.min(self.last());
        if from > to {
            return Ok(Vec::new());
        }
        let start = (from.0 - self.first.0) as usize;
        let end = (to.0 - self.first.0) as usize + 1;
        Ok(self.entries.range(start..end).cloned().collect())
    }

    /// The index of the entry carrying `id`, if held.
    pub(crate) fn position(&self, id: EventId) -> Option<LogIndex> {
        self.positions.get(id).filter(|i| *i >= self.first)
    }

    /// The snapshot, the entries after it and the commit index.
    /// The latest snapshot.
    pub(crate) fn snapshot(&self) -> Option<Snapshot> {
        self.snapshot.clone()
    }

    pub(crate) fn recover(&self) -> Recovered {
        let base = self.snapshot_index();
        Recovered {
            snapshot: self.snapshot.clone(),
            entries: self
                .entries
                .iter()
                .filter(|e| e.index > base)
                .cloned()
                .collect(),
            commit: self.commit(),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    log: MemLog,
    readers: Readers,
}

/// Storage in memory. Clones share the same contents (registered readers included).
#[derive(Debug, Clone)]
pub struct MemoryStorage {
    inner: Arc<Mutex<Inner>>,
    retention: u64,
}

impl Default for MemoryStorage {
    fn default() -> Self {
        Self::with_retention(DEFAULT_RETENTION)
    }
}

impl MemoryStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty storage that keeps at most `retention` entries behind a snapshot for readers.
    pub fn with_retention(retention: u64) -> Self {
        Self {
            inner: Arc::default(),
            retention,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the log half-written (every update
        // checks first, then changes), so a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait::async_trait]
impl Storage for MemoryStorage {
    async fn recover(&self) -> Result<Recovered> {
        Ok(self.lock().log.recover())
    }

    fn append(&self, entries: Vec<LogEntry>) -> Durable {
        let result = self.lock().log.append(entries);
        Box::pin(std::future::ready(result))
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        let mut inner = self.lock();
        let keep_from = inner.readers.keep_from(snapshot.index, self.retention);
        inner.log.save_snapshot(snapshot, keep_from);
        Ok(())
    }

    async fn snapshot(&self) -> Result<Option<Snapshot>> {
        Ok(self.lock().log.snapshot())
    }

    async fn read(&self, from: LogIndex, to: LogIndex) -> Result<Vec<LogEntry>> {
        self.lock().log.read(from, to)
    }

    async fn truncate_after(&self, index: LogIndex) -> Result<()> {
        self.lock().log.truncate_after(index)
    }

    async fn position(&self, id: EventId) -> Result<Option<LogIndex>> {
        Ok(self.lock().log.position(id))
    }

    fn set_commit(&self, index: LogIndex) {
        self.lock().log.set_commit(index);
    }

    fn retain(&self, reader: &str, after: LogIndex) {
        self.lock().readers.retain(reader, after);
    }

    fn release(&self, reader: &str) {
        self.lock().readers.release(reader);
    }
}
