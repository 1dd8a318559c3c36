//! Durable storage of a server's log and snapshots.
//!
//! A [`Storage`] keeps the log entries a server wrote, in index order, and the latest snapshot
//! of its state. `append` returns only once the entries are durable; `recover` gives back the
//! latest snapshot and every complete entry after it. Two implementations share one test suite:
//! [`MemoryStorage`] (tests, benches, throwaway embedding) and [`FileStorage`] (the default for
//! binaries: checksummed records, group commit, snapshots and compaction).

mod file;
mod memory;
#[cfg(test)]
mod tests;

pub use file::{FileStorage, FileStorageOptions};
pub use memory::MemoryStorage;

use std::future::Future;
use std::pin::Pin;

use crate::error::Result;
use crate::event::LogEntry;
use crate::ids::{Epoch, LogIndex};
use crate::state::{State, StateConfig};

/// A point-in-time image of a server's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The last log index folded into the state.
    pub index: LogIndex,
    /// The epoch of that entry.
    pub epoch: Epoch,
    /// The encoded state (see [`Snapshot::of`] and [`Snapshot::restore`]).
    pub state: Vec<u8>,
}

impl Snapshot {
    /// Captures `state` as of log position `index`, written under `epoch`.
    pub fn of(state: &State, index: LogIndex, epoch: Epoch) -> Self {
        let mut enc = crate::codec::Encoder::default();
        state.encode(&mut enc);
        Self {
            index,
            epoch,
            state: enc.buf,
        }
    }

    /// Rebuilds the state for the cluster and timeline cap of `config`.
    pub fn restore(&self, config: &StateConfig) -> Result<State> {
        let mut dec = crate::codec::Decoder::new(&self.state);
        let state = State::decode(&mut dec, config)?;
        dec.finish()?;
        Ok(state)
    }
}

/// What a storage holds after a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// The latest snapshot, if one was taken.
    pub snapshot: Option<Snapshot>,
    /// Every entry after the snapshot (or from the start), in index order, without gaps.
    pub entries: Vec<LogEntry>,
}

impl Recovered {
    /// The index of the last entry held (snapshot included), or 0 when empty.
    pub fn last_index(&self) -> LogIndex {
        self.entries
            .last()
            .map(|e| e.index)
            .or(self.snapshot.as_ref().map(|s| s.index))
            .unwrap_or_default()
    }

    /// Rebuilds the state for `config`: the snapshot plus the entries after it.
    pub fn replay(&self, config: &StateConfig) -> Result<State> {
        let mut state = match &self.snapshot {
            Some(snapshot) => snapshot.restore(config)?,
            None => State::new(*config),
        };
        for entry in &self.entries {
            state.apply(&entry.event);
        }
        Ok(state)
    }
}

/// Resolves once an append is durable.
pub type Durable = Pin<Box<dyn Future<Output = Result<()>> + Send + 'static>>;

/// Where a server keeps its log. Implementations must be safe to call from many tasks at once;
/// concurrent appends are made durable together (group commit) where the medium allows.
#[async_trait::async_trait]
pub trait Storage: Send + Sync + 'static {
    /// The latest snapshot and every complete entry after it.
    async fn recover(&self) -> Result<Recovered>;

    /// Queues `entries` (contiguous indexes, continuing the log) for appending, in call order,
    /// and returns a future that resolves once they are durable. Queueing happens before this
    /// returns, so callers that serialize their calls get their entries in that order while
    /// waiting for durability concurrently (group commit). On error nothing after the last
    /// durable entry may be assumed stored, and the storage refuses further appends.
    fn append(&self, entries: Vec<LogEntry>) -> Durable;

    /// Durably stores `snapshot` and drops log entries it covers. Entries appended before the
    /// call and not covered by it are kept.
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()>;
}
