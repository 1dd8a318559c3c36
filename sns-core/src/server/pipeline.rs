//! The commit pipeline: sequenced entries become durable, then committed, in log order.
//!
//! Two stages, each one task, both strictly in log order:
//! 1. **durability**: waits for each batch's local append to be durable, advances the durable
//!    index (which a slave acknowledges to its master) and passes the batch on;
//! 2. **commit**: waits for the [`Gate`] to pass each entry, then commits it (applies it to the
//!    state, publishes it to the committed-entry stream, fans a post out) and answers the caller.
//!
//! The gate is what replication adds: on a master it is the lowest index acknowledged by every
//! slave counted for the commit point (no limit without one); on a slave it is the commit index
//! its master shipped. A discard (a master losing its role, a slave dropping a tail) bumps the
//! generation, which voids every batch sequenced before it.

use std::sync::{Arc, Weak};

use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::{Core, Shared, lock_core, storage_failed};
use crate::error::{Error, Result};
use crate::event::{LogEntry, Post};
use crate::ids::{LogIndex, UserId};
use crate::state::Applied;
use crate::storage::Durable;

/// Entries sequenced together (one client write, or one batch shipped by a master), with what
/// to do once they are durable.
pub(super) struct Pending {
    pub(super) entries: Vec<LogEntry>,
    /// The discard generation they were sequenced in; a discard since then voids them.
    pub(super) generation: u64,
    pub(super) durable: Durable,
    /// The caller waiting for the commit, if any.
    pub(super) reply: Option<oneshot::Sender<Result<()>>>,
    /// When a client's write was sequenced (for the commit latency).
    pub(super) sequenced_at: Option<std::time::Instant>,
    /// In-flight slots, freed when the entries commit or are dropped.
    pub(super) _slots: Option<OwnedSemaphorePermit>,
}

/// Up to where entries may commit, and in which discard generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gate {
    pub(crate) generation: u64,
    pub(crate) upto: LogIndex,
}

impl Gate {
    /// No limit: a master without a slave counted for its commit point.
    pub(crate) const OPEN: LogIndex = LogIndex(u64::MAX);
}

/// Stage 1: waits for each batch to be durable, in order.
pub(super) async fn run_durability(
    shared: Weak<Shared>,
    mut queue: mpsc::Receiver<Pending>,
    next: mpsc::Sender<Pending>,
    shutdown: CancellationToken,
) {
    loop {
        let mut pending = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            next = queue.recv() => match next {
                Some(pending) => pending,
                None => break,
            },
        };
        let durable = std::mem::replace(&mut pending.durable, Box::pin(async { Ok(()) }));
        let result = tokio::select! {
            result = durable => result,
            () = shutdown.cancelled() => break,
        };
        let Some(shared) = shared.upgrade() else {
            break;
        };
        {
            let mut core = lock_core(&shared.core);
            if pending.generation != core.generation {
                drop(core);
                answer(pending.reply, Err(voided()));
                continue;
            }
            if let Err(e) = result {
                let why = match &e {
                    Error::StorageFailed(why) => why.clone(),
                    e => e.to_string(),
                };
                storage_failed(&shared, &mut core, why);
                drop(core);
                answer(pending.reply, Err(e));
                continue;
            }
            if let Some(last) = pending.entries.last() {
                core.durable = core.durable.max(last.index);
                shared.durable_index.send_replace(core.durable);
            }
        }
        if next.send(pending).await.is_err() {
            break;
        }
    }
}

/// Stage 2: commits each durable entry once the gate passes it, in order.
pub(super) async fn run_commits(
    shared: Weak<Shared>,
    mut queue: mpsc::Receiver<Pending>,
    mut gate: watch::Receiver<Gate>,
    shutdown: CancellationToken,
) {
    'batches: loop {
        let pending = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            next = queue.recv() => match next {
                Some(pending) => pending,
                None => break,
            },
        };
        for entry in pending.entries {
            let generation = pending.generation;
            let index = entry.index;
            let mut entry = Some(entry);
            loop {
                let passed = tokio::select! {
                    passed = gate.wait_for(|g| g.generation != generation || g.upto >= index) => passed.map(|g| *g),
                    () = shutdown.cancelled() => break 'batches,
                };
                let Ok(passed) = passed else {
                    break 'batches;
                };
                let Some(shared) = shared.upgrade() else {
                    break 'batches;
                };
                let outcome = {
                    let mut core = lock_core(&shared.core);
                    if passed.generation != generation || core.generation != generation {
                        Outcome::Voided
                    } else if shared.gate.borrow().upto < index {
                        // The gate closed again (a slave starting a new stream) between the
                        // wait and the lock; it only moves under the lock.
                        Outcome::Wait
                    } else {
                        if let Some(entry) = entry.take() {
                            commit(&shared, &mut core, entry);
                        }
                        Outcome::Committed
                    }
                };
                match outcome {
                    Outcome::Committed => break,
                    Outcome::Wait => continue,
                    Outcome::Voided => {
                        answer(pending.reply, Err(voided()));
                        continue 'batches;
                    }
                }
            }
        }
        if let (Some(at), Some(shared)) = (pending.sequenced_at, shared.upgrade()) {
            shared.counters.commit_latency.observe(at.elapsed());
        }
        answer(pending.reply, Ok(()));
    }
}

enum Outcome {
    Committed,
    Wait,
    Voided,
}

fn answer(reply: Option<oneshot::Sender<Result<()>>>, result: Result<()>) {
    if let Some(reply) = reply {
        let _ = reply.send(result);
    }
}

fn voided() -> Error {
    Error::NotMaster("this server lost its role before the change was committed".to_string())
}

/// Commits `entry`, which is durable and passed the gate: the state applies it, readers of the
/// committed-entry stream (the snapshots' shadow among them) may see it, and online followers
/// receive a post.
pub(super) fn commit(shared: &Arc<Shared>, core: &mut Core, entry: LogEntry) {
    let index = entry.index;
    let applied = core.state.apply(&entry.event);
    debug_assert!(!matches!(applied, Applied::Duplicate | Applied::Gap { .. }));
    core.uncommitted.committed(&entry);
    core.commit = index;
    if let Applied::Posted(post) = &applied {
        let delivered = fan_out(core, post);
        shared.counters.deliveries.add(delivered);
    }
    shared.counters.committed.inc();
    shared.storage.set_commit(index);
    shared.commit_index.send_replace(index);
}

/// Delivers a committed post to the online users whose timeline received it, iterating over
/// whichever is smaller: the author's local followers or the online users. Returns how many
/// streams it reached.
fn fan_out(core: &mut Core, post: &Arc<Post>) -> u64 {
    let Core {
        state, subscribers, ..
    } = core;
    if subscribers.online_users() == 0 {
        return 0;
    }
    let receives = |user: UserId| state.timeline_contains(user, post);
    let mut delivered = 0;
    if subscribers.online_users() < state.local_follower_count(post.author) {
        let online: Vec<UserId> = subscribers.users().filter(|u| receives(*u)).collect();
        for user in online {
            delivered += subscribers.deliver(user, post);
        }
    } else {
        for user in state.local_followers(post.author) {
            if subscribers.is_online(user) && receives(user) {
                delivered += subscribers.deliver(user, post);
            }
        }
    }
    delivered
}
