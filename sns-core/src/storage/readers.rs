//! Registered log readers (slaves, synchronizers) and what compaction must keep for them.

use std::collections::HashMap;

use crate::ids::LogIndex;

/// Each registered reader and the index after which it still needs every entry.
#[derive(Debug, Clone, Default)]
pub(crate) struct Readers {
    after: HashMap<String, LogIndex>,
}

impl Readers {
    /// Registers `reader`, or moves it (either way), as needing every entry after `after`.
    pub(crate) fn retain(&mut self, reader: &str, after: LogIndex) {
        self.after.insert(reader.to_owned(), after);
    }

    /// Forgets `reader`.
    pub(crate) fn release(&mut self, reader: &str) {
        self.after.remove(reader);
    }

    /// The first index a compaction for a snapshot at `snapshot` must keep: the first entry
    /// after the snapshot, or the oldest one a reader needs, but no more than `retention`
    /// entries behind the snapshot.
    pub(crate) fn keep_from(&self, snapshot: LogIndex, retention: u64) -> LogIndex {
        let covered = snapshot.next();
        let needed = self
            .after
            .values()
            .map(|after| after.next())
            .min()
            .map_or(covered, |n| n.min(covered));
        needed.max(LogIndex(covered.0.saturating_sub(retention).max(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_from_is_bounded_by_the_snapshot_and_the_retention() {
        let mut readers = Readers::default();
        assert_eq!(readers.keep_from(LogIndex(100), 10), LogIndex(101));
        readers.retain("slave", LogIndex(95));
        assert_eq!(readers.keep_from(LogIndex(100), 10), LogIndex(96));
        readers.retain("far", LogIndex(3));
        assert_eq!(readers.keep_from(LogIndex(100), 10), LogIndex(91));
        assert_eq!(readers.keep_from(LogIndex(5), 10), LogIndex(4));
        readers.release("far");
        readers.retain("slave", LogIndex(200));
        assert_eq!(readers.keep_from(LogIndex(100), 10), LogIndex(101));
        readers.release("slave");
        assert_eq!(readers.keep_from(LogIndex(0), 10), LogIndex(1));
    }
}
