//! Snapshots without replaying the log.
//!
//! A second copy of the committed state, the *shadow*, follows the committed-entry stream in
//! the background, a few entries behind the live state, and is encoded and saved every
//! `snapshot_every` entries. Taking a snapshot therefore never locks, clones or rebuilds the
//! live state, never restores the previous snapshot and never re-reads the log: its cost is
//! the encoding (on a blocking thread) and the write, spread over the interval instead of a
//! replay of the whole interval at once.
//!
//! Invariants: the shadow holds exactly the committed entries up to its index (committed
//! entries are never discarded, so it never has to undo one); it starts as a copy of the live
//! state at the commit point when the server opens. When the entries it needs next are no
//! longer in the log (a slave installed its master's snapshot, which replaces the log), it
//! starts again from the newest stored snapshot.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Shared;
use super::committed::CommittedEntries;
use crate::error::{Error, Result};
use crate::event::LogEntry;
use crate::ids::{Epoch, LogIndex};
use crate::state::State;
use crate::storage::Snapshot;

/// Committed entries taken from the stream per step.
const BATCH: usize = 4096;

/// Batches at least this long are applied on a blocking thread rather than inline, so a
/// shadow catching up never holds a runtime worker for long.
const INLINE_BATCH: usize = 64;

/// How long the shadow waits after a failed read or save before it tries again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The copy of the committed state that snapshots are taken from.
pub(super) struct Shadow {
    state: State,
    /// The last entry folded into `state`.
    index: LogIndex,
    /// The epoch of that entry.
    epoch: Epoch,
    /// Entries folded since the last snapshot.
    since_snapshot: u64,
}

impl Shadow {
    /// A shadow of `state`, which holds the committed entries up to `index` (of `epoch`);
    /// `since_snapshot` of them came after the newest snapshot.
    pub(super) fn new(state: State, index: LogIndex, epoch: Epoch, since_snapshot: u64) -> Self {
        Self {
            state,
            index,
            epoch,
            since_snapshot,
        }
    }

    fn apply(&mut self, batch: &[LogEntry]) {
        for entry in batch {
            if entry.index <= self.index {
                continue;
            }
            self.state.apply(&entry.event);
            self.index = entry.index;
            self.epoch = entry.epoch;
            self.since_snapshot += 1;
        }
    }
}

/// Follows the committed entries of the server behind `shared` with `shadow`, saving a
/// snapshot every `every` entries, until the server stops.
pub(super) async fn follow(
    shared: Weak<Shared>,
    mut shadow: Shadow,
    every: u64,
    shutdown: CancellationToken,
) {
    let Some(mut committed) = stream_after(&shared, shadow.index) else {
        return;
    };
    loop {
        let next = tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            next = committed.next_batch(BATCH) => next,
        };
        match next {
            Ok(Some(batch)) => match apply(shadow, batch).await {
                Some(applied) => shadow = applied,
                None => return,
            },
            Ok(None) => return,
            Err(Error::Compacted { .. }) => {
                shadow = match rebase(&shared).await {
                    Ok(Some(shadow)) => shadow,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::warn!("snapshots paused: cannot restore the stored one: {e}");
                        if pause(&shutdown).await {
                            return;
                        }
                        continue;
                    }
                };
                let Some(stream) = stream_after(&shared, shadow.index) else {
                    return;
                };
                committed = stream;
            }
            Err(e) => {
                tracing::warn!("snapshots paused: cannot read committed entries: {e}");
                if pause(&shutdown).await {
                    return;
                }
                let Some(stream) = stream_after(&shared, shadow.index) else {
                    return;
                };
                committed = stream;
            }
        }
        if shadow.since_snapshot >= every {
            let Some((back, result)) = save(&shared, shadow).await else {
                return;
            };
            shadow = back;
            match result {
                Ok(Some(took)) => tracing::info!(
                    index = %shadow.index,
                    encode_ms = took.encode.as_millis() as u64,
                    save_ms = took.save.as_millis() as u64,
                    "snapshot saved, log compacted"
                ),
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(index = %shadow.index, "snapshot failed (the log is intact): {e}");
                }
            }
        }
    }
}

/// Waits out a retry interval; true when the server stopped meanwhile.
async fn pause(shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => true,
        () = tokio::time::sleep(RETRY_AFTER) => false,
    }
}

fn stream_after(shared: &Weak<Shared>, after: LogIndex) -> Option<CommittedEntries> {
    let strong = shared.upgrade()?;
    Some(CommittedEntries {
        shared: shared.clone(),
        next: after.next(),
        commit: strong.commit_index.subscribe(),
    })
}

/// Folds `batch` into the shadow: inline when short, else on a blocking thread. `None` if the
/// blocking thread failed (only a bug in the fold could make it, which the live state would
/// have met first): snapshots stop, the log stays intact.
async fn apply(mut shadow: Shadow, batch: Vec<LogEntry>) -> Option<Shadow> {
    if batch.len() < INLINE_BATCH {
        shadow.apply(&batch);
        return Some(shadow);
    }
    let applied = tokio::task::spawn_blocking(move || {
        shadow.apply(&batch);
        shadow
    })
    .await;
    match applied {
        Ok(shadow) => Some(shadow),
        Err(e) => {
            tracing::error!("snapshots stopped: folding committed entries failed: {e}");
            None
        }
    }
}

/// A shadow started again from the newest stored snapshot (`None` once the server is gone).
async fn rebase(shared: &Weak<Shared>) -> Result<Option<Shadow>> {
    let Some(strong) = shared.upgrade() else {
        return Ok(None);
    };
    let config = strong.config.state_config();
    let Some(snapshot) = strong.storage.snapshot().await? else {
        return Err(Error::Corrupt(
            "the log was compacted but holds no snapshot".to_string(),
        ));
    };
    drop(strong);
    let shadow = tokio::task::spawn_blocking(move || {
        snapshot
            .restore(&config)
            .map(|state| Shadow::new(state, snapshot.index, snapshot.epoch, 0))
    })
    .await
    .map_err(|e| Error::StorageFailed(format!("snapshot task failed: {e}")))??;
    tracing::info!(index = %shadow.index, "snapshots follow the stored snapshot");
    Ok(Some(shadow))
}

/// How long the phases of a snapshot took (for the log).
struct Took {
    /// Encoding the shadow.
    encode: Duration,
    /// Writing and syncing the snapshot and compacting the log.
    save: Duration,
}

/// Encodes the shadow on a blocking thread and saves it; gives the shadow back with the
/// outcome (`Ok(None)` once the server is gone). Whatever the outcome, the next snapshot is
/// due a full interval later. `None` if the encoding thread failed.
async fn save(shared: &Weak<Shared>, shadow: Shadow) -> Option<(Shadow, Result<Option<Took>>)> {
    let started = Instant::now();
    let encoded = tokio::task::spawn_blocking(move || {
        let snapshot = Snapshot::of(&shadow.state, shadow.index, shadow.epoch);
        (shadow, snapshot)
    })
    .await;
    let (mut shadow, snapshot) = match encoded {
        Ok(done) => done,
        Err(e) => {
            tracing::error!("snapshots stopped: encoding the state failed: {e}");
            return None;
        }
    };
    shadow.since_snapshot = 0;
    let encoded = Instant::now();
    let Some(strong) = shared.upgrade() else {
        return Some((shadow, Ok(None)));
    };
    let storage = Arc::clone(&strong.storage);
    drop(strong);
    let result = storage.save_snapshot(snapshot).await.map(|()| {
        Some(Took {
            encode: encoded - started,
            save: encoded.elapsed(),
        })
    });
    Some((shadow, result))
}
