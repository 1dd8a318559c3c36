//! Where each origin's events sit in the log: per origin, runs of consecutive sequence numbers
//! at consecutive log indexes, found by binary search. A log written by one origin is one run.

use std::collections::HashMap;

use crate::ids::{ClusterId, EventId, LogIndex};

/// `len` events of one origin with sequence numbers `seq..seq + len` at log indexes
/// `index..index + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    seq: u64,
    index: u64,
    len: u64,
}

impl Run {
    fn end_seq(&self) -> u64 {
        self.seq + self.len
    }

    fn end_index(&self) -> u64 {
        self.index + self.len
    }
}

/// The positions of the events of the entries held, by origin. Within an origin, runs are
/// sorted both by sequence number and by log index (an origin's sequence numbers increase
/// along the log; an entry that breaks this is left out).
#[derive(Debug, Clone, Default)]
pub(crate) struct Positions {
    origins: HashMap<ClusterId, Vec<Run>>,
}

impl Positions {
    /// Records that the entry at `index` (after every index recorded so far) carries `id`.
    pub(crate) fn push(&mut self, id: EventId, index: LogIndex) {
        let runs = self.origins.entry(id.origin).or_default();
        if let Some(run) = runs.last_mut() {
            if id.seq == run.end_seq() && index.0 == run.end_index() {
                run.len += 1;
                return;
            }
            if id.seq < run.end_seq() || index.0 < run.end_index() {
                // Out of order: not indexed (see the type's documentation).
                return;
            }
        }
        runs.push(Run {
            seq: id.seq,
            index: index.0,
            len: 1,
        });
    }

    /// The log index of `id`, if recorded.
    pub(crate) fn get(&self, id: EventId) -> Option<LogIndex> {
        let runs = self.origins.get(&id.origin)?;
        let at = runs.partition_point(|r| r.seq <= id.seq).checked_sub(1)?;
        let run = runs.get(at)?;
        (id.seq < run.end_seq()).then(|| LogIndex(run.index + (id.seq - run.seq)))
    }

    /// Forgets the entries after `index`.
    pub(crate) fn truncate_after(&mut self, index: LogIndex) {
        for runs in self.origins.values_mut() {
            let keep = runs.partition_point(|r| r.index <= index.0);
            runs.truncate(keep);
            if let Some(run) = runs.last_mut() {
                run.len = run.len.min(index.0 + 1 - run.index);
            }
        }
        self.origins.retain(|_, runs| !runs.is_empty());
    }

    /// Forgets the entries before `first`.
    pub(crate) fn remove_before(&mut self, first: LogIndex) {
        for runs in self.origins.values_mut() {
            let gone = runs.partition_point(|r| r.end_index() <= first.0);
            runs.drain(..gone);
            if let Some(run) = runs.first_mut()
                && run.index < first.0
            {
                let cut = first.0 - run.index;
                run.index += cut;
                run.seq += cut;
                run.len -= cut;
            }
        }
        self.origins.retain(|_, runs| !runs.is_empty());
    }

    /// Forgets everything.
    pub(crate) fn clear(&mut self) {
        self.origins.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(origin: u32, seq: u64) -> EventId {
        EventId {
            origin: ClusterId::new(origin).expect("valid cluster"),
            seq,
        }
    }

    #[test]
    fn interleaved_origins_truncation_and_compaction() {
        let mut positions = Positions::default();
        // Index: 1  2  3  4  5  6  7
        // Event: a1 a2 b1 a3 b2 b3 a4
        let log = [(1, 1), (1, 2), (2, 1), (1, 3), (2, 2), (2, 3), (1, 4)];
        for (i, (origin, seq)) in log.iter().enumerate() {
            positions.push(id(*origin, *seq), LogIndex(i as u64 + 1));
        }
        for (i, (origin, seq)) in log.iter().enumerate() {
            assert_eq!(
                positions.get(id(*origin, *seq)),
                Some(LogIndex(i as u64 + 1))
            );
        }
        assert_eq!(positions.get(id(1, 5)), None);
        assert_eq!(positions.get(id(3, 1)), None);
        // A duplicate later in the log is not indexed over the original.
        positions.push(id(2, 2), LogIndex(8));
        assert_eq!(positions.get(id(2, 2)), Some(LogIndex(5)));
        positions.truncate_after(LogIndex(5));
        assert_eq!(positions.get(id(2, 3)), None);
        assert_eq!(positions.get(id(1, 4)), None);
        assert_eq!(positions.get(id(2, 2)), Some(LogIndex(5)));
        positions.remove_before(LogIndex(2));
        assert_eq!(positions.get(id(1, 1)), None);
        assert_eq!(positions.get(id(1, 2)), Some(LogIndex(2)));
        positions.remove_before(LogIndex(5));
        assert_eq!(positions.get(id(1, 3)), None);
        assert_eq!(positions.get(id(2, 1)), None);
        assert_eq!(positions.get(id(2, 2)), Some(LogIndex(5)));
        // New entries continue the runs after a truncation.
        positions.push(id(1, 4), LogIndex(6));
        assert_eq!(positions.get(id(1, 4)), Some(LogIndex(6)));
    }
}
