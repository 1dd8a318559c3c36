//! The stream of committed entries, for consumers outside the write path (a slave, a
//! synchronizer, tests).
//!
//! Invariants: a consumer sees every committed entry exactly once, in log order, and never an
//! uncommitted one. The newest committed entries are kept in a bounded in-memory window; a
//! consumer that fell behind the window reads the rest from the storage's log API, so a slow
//! consumer never slows the writers and never makes memory grow.

use std::collections::VecDeque;
use std::sync::Weak;

use tokio::sync::watch;

use super::{Shared, lock_core};
use crate::error::{Error, Result};
use crate::event::LogEntry;
use crate::ids::LogIndex;

/// The newest sequenced entries (committed or not), oldest first, at most `capacity` of them.
/// The capacity exceeds the most entries in flight, so an entry that leaves the window is
/// committed, hence durable and readable from the log.
#[derive(Debug)]
pub(crate) struct RecentEntries {
    entries: VecDeque<LogEntry>,
    capacity: usize,
}

impl RecentEntries {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// Adds the entry just sequenced (its index follows the previous one's).
    pub(crate) fn push(&mut self, entry: LogEntry) {
        if self.entries.len() == self.capacity {
            self.entries.pop_front();
        }
        self.entries.push_back(entry);
    }

    /// Drops the entries after `index` (a discarded tail).
    pub(crate) fn truncate_after(&mut self, index: LogIndex) {
        while self.entries.back().is_some_and(|e| e.index > index) {
            self.entries.pop_back();
        }
    }

    /// Forgets every entry (a snapshot replaced the log).
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
    }

    /// The epoch of the newest entry held.
    pub(crate) fn last_epoch(&self) -> Option<crate::ids::Epoch> {
        self.entries.back().map(|e| e.epoch)
    }

    /// The epoch of the entry at `index`, if the window holds it.
    pub(crate) fn epoch_at(&self, index: LogIndex) -> Option<crate::ids::Epoch> {
        let first = self.entries.front()?.index;
        let offset = usize::try_from(index.0.checked_sub(first.0)?).ok()?;
        self.entries.get(offset).map(|e| e.epoch)
    }

    /// Entries from `from` up to `to` (inclusive), at most `max`, if the window still holds
    /// `from`.
    pub(crate) fn range(&self, from: LogIndex, to: LogIndex, max: usize) -> Option<Vec<LogEntry>> {
        let first = self.entries.front()?.index;
        if from < first {
            return None;
        }
        let skip = usize::try_from(from.0 - first.0).ok()?;
        Some(
            self.entries
                .iter()
                .skip(skip)
                .take_while(|e| e.index <= to)
                .take(max)
                .cloned()
                .collect(),
        )
    }
}

/// Committed entries after a position, in order: what is already committed first, then new
/// entries as they commit. Made by [`super::Server::committed_after`].
#[derive(Debug)]
pub struct CommittedEntries {
    pub(super) shared: Weak<Shared>,
    pub(super) next: LogIndex,
    pub(super) commit: watch::Receiver<LogIndex>,
}

impl CommittedEntries {
    /// The index of the next entry this stream will yield.
    pub fn position(&self) -> LogIndex {
        self.next
    }

    /// The next committed entries (at least one, at most `max`), waiting until there is one.
    /// `Ok(None)` once the server has stopped.
    pub async fn next_batch(&mut self, max: usize) -> Result<Option<Vec<LogEntry>>> {
        let max = max.max(1);
        loop {
            let commit = *self.commit.borrow_and_update();
            if self.next <= commit {
                let Some(shared) = self.shared.upgrade() else {
                    return Ok(None);
                };
                let recent = lock_core(&shared.core).recent.range(self.next, commit, max);
                let batch = match recent {
                    Some(batch) => batch,
                    None => {
                        let last = LogIndex(commit.0.min(self.next.0 + max as u64 - 1));
                        shared.storage.read(self.next, last).await?
                    }
                };
                let Some(last) = batch.last() else {
                    return Err(Error::Corrupt(format!(
                        "committed entry {} is missing from the log",
                        self.next
                    )));
                };
                self.next = last.index.next();
                return Ok(Some(batch));
            }
            if self.commit.changed().await.is_err() {
                return Ok(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventKind};
    use crate::ids::{ClusterId, Epoch, EventId, Timestamp, UserId};

    fn entry(index: u64) -> LogEntry {
        LogEntry {
            index: LogIndex(index),
            epoch: Epoch(1),
            event: Event {
                id: EventId {
                    origin: ClusterId::new(1).expect("cluster"),
                    seq: index,
                },
                at: Timestamp(index as i64),
                kind: EventKind::UserJoined {
                    user: UserId::new(index as u32).expect("user"),
                },
            },
        }
    }

    #[test]
    fn the_window_keeps_the_newest_entries() {
        let mut recent = RecentEntries::new(3);
        for i in 1..=5 {
            recent.push(entry(i));
        }
        assert!(recent.range(LogIndex(2), LogIndex(5), 10).is_none());
        let got = recent.range(LogIndex(3), LogIndex(5), 10).expect("held");
        assert_eq!(
            got.iter().map(|e| e.index.0).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        let got = recent.range(LogIndex(4), LogIndex(4), 10).expect("held");
        assert_eq!(got.len(), 1);
        let got = recent.range(LogIndex(3), LogIndex(5), 2).expect("held");
        assert_eq!(got.len(), 2);
    }
}
