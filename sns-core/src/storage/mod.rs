//! Durable storage of a server's log and snapshots.
//!
//! A [`Storage`] keeps the log entries a server wrote, in index order, and the latest snapshot
//! of its state. `append` returns only once the entries are durable; `recover` gives back the
//! latest snapshot and every complete entry after it. Mirroring and sync read the log through
//! the same trait (`read`, `position`, `truncate_after`, the commit index and registered
//! readers); its invariants are written on [`Storage`]. Implementations share one test suite
//! (`sns_core::testing::storage_suite`, feature `test-util`, which checks an embedder's own
//! storage the same way): [`MemoryStorage`] (tests, benches, throwaway embedding),
//! [`FileStorage`] (the default for binaries: checksummed records, group commit, snapshots and
//! compaction) and [`CrashDisk`] (for tests: a disk with a write cache whose plug can be
//! pulled).

mod crash;
mod file;
mod memory;
mod positions;
mod readers;
#[cfg(test)]
mod tests;

pub use crash::{CrashDisk, CrashDiskOptions, CrashStorage};
pub use file::{FileStorage, FileStorageOptions};
pub use memory::MemoryStorage;

/// Creates `dir` and any missing parents with mode 0700 whatever the umask (a data directory
/// holds every user's posts, and perhaps the cluster token): only the owner may look inside.
/// Directories that exist already are left as they are.
pub fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

use std::future::Future;
use std::pin::Pin;

use crate::error::{Error, Result};
use crate::event::LogEntry;
use crate::ids::{Epoch, EventId, LogIndex};
use crate::state::{State, StateConfig};

/// How many entries behind the latest snapshot are kept, at most, for registered readers
/// unless an implementation is told otherwise (see [`Storage::retain`]).
pub const DEFAULT_RETENTION: u64 = 1_000_000;

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
    /// Every entry after the snapshot (or from the start), in index order, without gaps. The
    /// log may hold older entries too (kept for readers); [`Storage::read`] serves those.
    pub entries: Vec<LogEntry>,
    /// The persisted commit index: at most the last index held (snapshot included), and
    /// possibly behind the last [`Storage::set_commit`] before the restart.
    pub commit: LogIndex,
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
///
/// # The log and its invariants
///
/// The log holds the entries `first..=last`, where `last` is the last durable entry:
/// - **Contiguous.** Indexes have no gaps, from the first entry still held to the last one.
///   `first` is 1 until a compaction; an empty log has `first == last + 1`.
/// - **Appends continue the log.** An append must start at the index after the last entry
///   appended (durable or still queued), or after the snapshot when a snapshot is ahead of the
///   log; anything else is refused with [`Error::Corrupt`] and changes nothing.
/// - **One order.** Changes (`append`, `truncate_after`, `save_snapshot`) take effect in the
///   order they are queued: `append` queues when called, the async methods when first polled.
/// - **Reads see durable entries only.** [`read`](Self::read) and
///   [`position`](Self::position) never return an entry whose append has not resolved.
/// - **The commit index never regresses**, and never runs ahead of durable entries: a
///   [`set_commit`](Self::set_commit) below the current value is ignored, one beyond the last
///   durable entry is clamped to it. It is persisted and returned by [`recover`](Self::recover);
///   after a crash it may lag behind the last `set_commit`.
/// - **Truncation never goes below the commit index or the snapshot**:
///   [`truncate_after`](Self::truncate_after) refuses, and changes nothing, below either.
/// - **Compaction happens only in [`save_snapshot`](Self::save_snapshot)**, and deletes only
///   entries covered by the snapshot that no registered reader needs, except that at most
///   `retention` entries (an option of each implementation, [`DEFAULT_RETENTION`] unless told
///   otherwise) are kept behind the snapshot for readers. A reader further behind loses them:
///   its next read fails with [`Error::Compacted`] and it needs a snapshot (a slave) or a state
///   transfer (another cluster). `FileStorage` deletes whole segments, so it may keep a little
///   more. Entries after the snapshot are never deleted by compaction. Readers are not
///   persisted: after a restart they register again.
///
/// Servers call it; an embedder mostly chooses one ([`FileStorage`] on disk, [`MemoryStorage`])
/// or writes one, and checks it with `sns_core::testing::storage_suite` (feature `test-util`;
/// `examples/custom_storage.rs` shows how). The log through the trait:
///
/// ```
/// use std::sync::Arc;
///
/// use sns_core::{
///     ClusterId, Epoch, Event, EventId, EventKind, LogEntry, LogIndex, MemoryStorage, Storage,
///     Timestamp, UserId,
/// };
///
/// # #[tokio::main]
/// # async fn main() -> sns_core::Result<()> {
/// let joined = |index: u64, user: u32| LogEntry {
///     index: LogIndex(index),
///     epoch: Epoch(1),
///     event: Event {
///         id: EventId { origin: ClusterId::new(1).unwrap(), seq: index },
///         at: Timestamp(0),
///         kind: EventKind::UserJoined { user: UserId::new(user).unwrap() },
///     },
/// };
/// let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
/// storage.append(vec![joined(1, 7), joined(2, 8)]).await?; // resolves once durable
/// storage.append(vec![joined(3, 9)]).await?;
/// storage.set_commit(LogIndex(2));
/// assert_eq!(storage.read(LogIndex(2), LogIndex(10)).await?.len(), 2);
/// assert_eq!(storage.position(joined(3, 9).event.id).await?, Some(LogIndex(3)));
/// // Truncation below the commit index is refused; above it, it drops the tail.
/// assert!(storage.truncate_after(LogIndex(1)).await.is_err());
/// storage.truncate_after(LogIndex(2)).await?;
/// let recovered = storage.recover().await?;
/// assert_eq!((recovered.last_index(), recovered.commit), (LogIndex(2), LogIndex(2)));
/// # Ok(())
/// # }
/// ```
#[async_trait::async_trait]
pub trait Storage: Send + Sync + 'static {
    /// The latest snapshot, every complete entry after it, and the persisted commit index.
    async fn recover(&self) -> Result<Recovered>;

    /// Queues `entries` (contiguous indexes, continuing the log) for appending, in call order,
    /// and returns a future that resolves once they are durable. Queueing happens before this
    /// returns, so callers that serialize their calls get their entries in that order while
    /// waiting for durability concurrently (group commit). On error nothing after the last
    /// durable entry may be assumed stored, and the storage refuses further appends.
    ///
    /// `FileStorage` queues into a bounded queue: this blocks while it is full (a backstop; the
    /// server bounds its in-flight appends).
    fn append(&self, entries: Vec<LogEntry>) -> Durable;

    /// Durably stores `snapshot` and compacts the log (see the invariants above). Entries
    /// appended before the call and not covered by it are kept. A snapshot ahead of the log
    /// (installed from elsewhere) empties the log, which continues after the snapshot.
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()>;

    /// How long the storage's syncs of appended entries took, for storages that keep it (the
    /// default keeps nothing).
    fn sync_latency(&self) -> Option<crate::stats::Histogram> {
        None
    }

    /// The latest durable snapshot, if any (without the log: a cheap way to start a new
    /// snapshot from the previous one).
    async fn snapshot(&self) -> Result<Option<Snapshot>>;

    /// The durable entries with `from <= index <= to`, oldest first, clipped to the last durable
    /// entry (so possibly fewer, or none). Fails with [`Error::Compacted`] when `from` is below
    /// the first entry still held.
    async fn read(&self, from: LogIndex, to: LogIndex) -> Result<Vec<LogEntry>>;

    /// Durably removes every entry after `index`; the next append continues at `index + 1`.
    /// Applies after every change queued before it. Refuses with [`Error::Conflict`], changing
    /// nothing, when `index` is below the commit index or the snapshot's index.
    async fn truncate_after(&self, index: LogIndex) -> Result<()>;

    /// The log index of the event `id`, if a durable entry still held carries it. An origin's
    /// sequence numbers increase along the log; an entry that breaks this is not found.
    async fn position(&self, id: EventId) -> Result<Option<LogIndex>>;

    /// Records that every entry up to `index` is committed (see the invariants above). Cheap;
    /// persisted in the background.
    fn set_commit(&self, index: LogIndex);

    /// Registers `reader` (a slave, a synchronizer), or moves it, as still needing every entry
    /// after `after`; compaction keeps them, within the retention bound.
    fn retain(&self, reader: &str, after: LogIndex);

    /// Forgets `reader`: compaction no longer keeps entries for it.
    fn release(&self, reader: &str);
}

/// Checks that `entries` hold contiguous indexes starting at `next`.
pub(crate) fn check_contiguous(next: LogIndex, entries: &[LogEntry]) -> Result<()> {
    let mut expected = next;
    for entry in entries {
        if entry.index != expected {
            return Err(Error::Corrupt(format!(
                "append of index {} where {expected} was expected",
                entry.index
            )));
        }
        expected = expected.next();
    }
    Ok(())
}

/// The refusal of a truncation below the commit index or the snapshot, if it is one.
pub(crate) fn check_truncation(
    index: LogIndex,
    commit: LogIndex,
    snapshot: LogIndex,
) -> Result<()> {
    if index < commit {
        return Err(Error::Conflict(format!(
            "cannot truncate the log after {index}: entries up to {commit} are committed"
        )));
    }
    if index < snapshot {
        return Err(Error::Conflict(format!(
            "cannot truncate the log after {index}: the snapshot covers up to {snapshot}"
        )));
    }
    Ok(())
}
