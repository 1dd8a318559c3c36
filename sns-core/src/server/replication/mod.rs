//! Mirroring: a cluster's master ships its log to its slave, and the commit point waits for
//! the slave while it is counted.
//!
//! The slave dials the master the coordinator names and says where its log stands (`Hello`);
//! the master answers with where it must continue: after dropping a tail the master never
//! committed (`TruncateAfter`), after a snapshot when it is too far behind or past the master's
//! retention bound, or right after its last entry. Then the master ships entries as it
//! sequences them (before they are durable locally, so both disks work at once), in batches,
//! with its epoch and commit index on every message; the slave appends them durably, in order,
//! and acknowledges its durable index. The slave commits what the master's commit index covers.
//!
//! Invariants:
//! - **Log matching.** Each epoch has one master process: the coordinator gives a new epoch to
//!   every master it names, including a master that restarted or stepped down. So two logs
//!   holding an entry of the same index and epoch agree up to it, and the master can find where
//!   a slave's log diverged from its last (index, epoch) and its commit index.
//! - **Committed entries are never truncated.** A slave's commit index only follows a master's,
//!   and every committed entry is in every later master's log (see promotion below), so a
//!   divergent tail always lies after the slave's commit index.
//! - **Acknowledgements name only agreeing entries.** In a session a slave acknowledges its
//!   durable index, but never past the point up to which its log is known to agree with this
//!   master's: its commit index until the master's first message settles where it continues
//!   (after a truncation, only up to the truncation point; with a snapshot, nothing more until
//!   it is installed; any other first message means the master continues right after the
//!   slave's last entry, so a master sends a truncation only first), then each batch it
//!   appends. A truncation rewinds the durable index the
//!   slave acknowledges from. So a master that keeps the highest index a slave acknowledged
//!   never counts it for an entry it does not hold, such as an old master's uncommitted tail
//!   (see `slave/session.rs`).
//! - **The commit point.** A master commits an entry once it is durable locally and on every
//!   slave it counts. It counts a slave from the moment the slave has been sent everything
//!   sequenced (`Required`), and reports it to the coordinator as in sync once the slave has
//!   acknowledged everything committed since (`InSync`). It stops counting a slave it reported
//!   only after a heartbeat without that slave was answered (`Leaving` until then; commits wait).
//!   So the coordinator's in-sync set never names a slave that misses a committed entry.
//! - **Promotion.** The coordinator promotes only a live slave in the dead master's last
//!   reported in-sync set, under a new epoch; the new master commits every entry it holds.
//! - **Fencing.** A slave refuses messages of an epoch older than the newest it knows, and the
//!   coordinator tells a promoted slave its new epoch before anything else can. An old master
//!   that does not know it was replaced can therefore commit nothing once its slave was
//!   promoted: commits need the slave's acknowledgement, or the coordinator's answer to drop the
//!   slave, and the coordinator answers an old master by demoting it. This is the fence we rely
//!   on, not a lease; the master also stops accepting writes when it has not reached the
//!   coordinator for a whole failure timeout, which bounds how long its clients wait.

mod admission;
mod master;
mod slave;

use std::collections::BTreeMap;

use crate::event::LogEntry;
use crate::ids::{ClusterId, Epoch, LogIndex, ServerId};
use crate::storage::Storage;

pub(crate) use admission::{Caller, ListedSlave, RefusalLog, Roster};
pub(super) use slave::run_mirror;

/// Most entries in one shipment.
pub(crate) const MAX_BATCH: usize = 512;

/// Snapshot bytes per shipment.
pub(crate) const SNAPSHOT_CHUNK: usize = 1 << 20;

/// Where a slave's log stands when it starts mirroring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hello {
    pub(crate) cluster: ClusterId,
    pub(crate) server: ServerId,
    /// The newest cluster epoch the slave has heard of.
    pub(crate) known_epoch: Epoch,
    /// The slave's last entry (0 when empty) and its epoch.
    pub(crate) last_index: LogIndex,
    pub(crate) last_epoch: Epoch,
    /// Every entry up to here is committed, hence in the master's log.
    pub(crate) commit: LogIndex,
}

/// A message from a slave to its master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FromSlave {
    /// The first message of a stream.
    Hello(Hello),
    /// The slave's highest durable index.
    Durable(LogIndex),
    /// The slave knows a newer epoch: the master has been replaced.
    NewerEpoch(Epoch),
}

/// A message from a master to its slave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ToSlave {
    /// The master's epoch.
    pub(crate) epoch: Epoch,
    /// The master's commit index.
    pub(crate) commit: LogIndex,
    /// Whether the master counts this slave for its commit point.
    pub(crate) in_sync: bool,
    pub(crate) body: Shipment,
}

/// What a master ships.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Shipment {
    /// Drop every entry after this index.
    TruncateAfter(LogIndex),
    /// A piece of a snapshot, installed once the last piece arrives.
    Snapshot(SnapshotChunk),
    /// Entries continuing the slave's log.
    Entries(Vec<LogEntry>),
    /// Nothing new; asks for an acknowledgement.
    KeepAlive,
}

/// A piece of a snapshot in transit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SnapshotChunk {
    pub(crate) index: LogIndex,
    pub(crate) epoch: Epoch,
    pub(crate) offset: u64,
    pub(crate) data: Vec<u8>,
    pub(crate) last: bool,
}

/// The master a slave mirrors, as the coordinator named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MirrorTarget {
    pub(crate) server: ServerId,
    /// `host:port`.
    pub(crate) addr: String,
}

/// How a master counts one slave (see the invariants above).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// Catching up: not counted.
    Catching,
    /// Counted; in sync once it acknowledged `since` (the commit index when counting began).
    Required { since: LogIndex },
    /// Counted; `announced` once a heartbeat named it to the coordinator.
    InSync { announced: bool },
    /// Gone after being announced: still counted (commits wait) until a heartbeat built after
    /// beat `after_beat` was answered.
    Leaving { after_beat: u64 },
}

#[derive(Debug, Clone)]
struct Replica {
    session: u64,
    acked: LogIndex,
    standing: Standing,
}

/// A master's slaves: their acknowledged positions and whether each is counted.
#[derive(Debug, Default)]
pub(crate) struct Replicas {
    replicas: BTreeMap<ServerId, Replica>,
    sessions: u64,
    beats: u64,
}

fn reader(server: ServerId) -> String {
    format!("slave-{server}")
}

impl Replicas {
    /// Registers a new mirroring stream from `server`, replacing any older one. A slave that
    /// was counted stays counted (it keeps every entry it acknowledged).
    pub(crate) fn attach(&mut self, server: ServerId, commit: LogIndex) -> u64 {
        self.sessions += 1;
        let counted = self
            .replicas
            .get(&server)
            .is_some_and(|r| r.standing != Standing::Catching);
        let standing = if counted {
            Standing::Required { since: commit }
        } else {
            Standing::Catching
        };
        self.replicas.insert(
            server,
            Replica {
                session: self.sessions,
                acked: LogIndex(0),
                standing,
            },
        );
        self.sessions
    }

    fn get(&mut self, server: ServerId, session: u64) -> Option<&mut Replica> {
        self.replicas
            .get_mut(&server)
            .filter(|r| r.session == session)
    }

    /// The slave has been sent everything sequenced: count it from now on.
    pub(crate) fn caught_up(&mut self, server: ServerId, session: u64, commit: LogIndex) {
        if let Some(replica) = self.get(server, session)
            && replica.standing == Standing::Catching
        {
            replica.standing = Standing::Required { since: commit };
            if replica.acked >= commit {
                replica.standing = Standing::InSync { announced: false };
            }
        }
    }

    /// Records an acknowledgement. Returns whether the slave just became in sync.
    pub(crate) fn acked(
        &mut self,
        server: ServerId,
        session: u64,
        durable: LogIndex,
        storage: &dyn Storage,
    ) -> bool {
        let Some(replica) = self.get(server, session) else {
            return false;
        };
        replica.acked = replica.acked.max(durable);
        storage.retain(&reader(server), replica.acked);
        match replica.standing {
            Standing::Required { since } if replica.acked >= since => {
                replica.standing = Standing::InSync { announced: false };
                true
            }
            _ => false,
        }
    }

    /// The stream of `session` ended. Returns whether the slave must leave through the
    /// coordinator (it was announced in sync).
    pub(crate) fn detach(&mut self, server: ServerId, session: u64, storage: &dyn Storage) -> bool {
        let beats = self.beats;
        let Some(replica) = self.get(server, session) else {
            return false;
        };
        match replica.standing {
            Standing::InSync { announced: true } => {
                replica.standing = Standing::Leaving { after_beat: beats };
                true
            }
            Standing::Leaving { .. } => true,
            _ => {
                self.replicas.remove(&server);
                storage.release(&reader(server));
                false
            }
        }
    }

    /// Whether the slave's current stream is counted for the commit point.
    pub(crate) fn is_counted(&self, server: ServerId, session: u64) -> bool {
        self.replicas
            .get(&server)
            .is_some_and(|r| r.session == session && r.standing != Standing::Catching)
    }

    /// The highest index every counted slave acknowledged, or `None` when none is counted.
    pub(crate) fn quorum(&self) -> Option<LogIndex> {
        self.replicas
            .values()
            .filter(|r| r.standing != Standing::Catching)
            .map(|r| r.acked)
            .min()
    }

    /// Every mirroring slave: its acknowledged index and whether it is in sync.
    pub(crate) fn all(&self) -> Vec<(ServerId, LogIndex, bool)> {
        self.replicas
            .iter()
            .map(|(s, r)| (*s, r.acked, matches!(r.standing, Standing::InSync { .. })))
            .collect()
    }

    /// The slaves in sync, with their acknowledged index.
    pub(crate) fn in_sync(&self) -> Vec<(ServerId, LogIndex)> {
        self.replicas
            .iter()
            .filter(|(_, r)| matches!(r.standing, Standing::InSync { .. }))
            .map(|(s, r)| (*s, r.acked))
            .collect()
    }

    /// The number of the last heartbeat built (see [`Replicas::announce`]).
    pub(crate) fn beats(&self) -> u64 {
        self.beats
    }

    /// Builds heartbeat number `n`: the slaves it names as in sync (now announced).
    pub(crate) fn announce(&mut self) -> (u64, Vec<(ServerId, LogIndex)>) {
        self.beats += 1;
        for replica in self.replicas.values_mut() {
            if let Standing::InSync { announced } = &mut replica.standing {
                *announced = true;
            }
        }
        (self.beats, self.in_sync())
    }

    /// The coordinator answered heartbeat `beat`: slaves that left before it was built are
    /// no longer counted. Returns whether any was dropped.
    pub(crate) fn confirmed(&mut self, beat: u64, storage: &dyn Storage) -> bool {
        let gone: Vec<ServerId> = self
            .replicas
            .iter()
            .filter(|(_, r)| matches!(r.standing, Standing::Leaving { after_beat } if after_beat < beat))
            .map(|(s, _)| *s)
            .collect();
        for server in &gone {
            self.replicas.remove(server);
            storage.release(&reader(*server));
        }
        !gone.is_empty()
    }

    /// Forgets every slave (this server is no longer master).
    pub(crate) fn clear(&mut self, storage: &dyn Storage) {
        for server in self.replicas.keys() {
            storage.release(&reader(*server));
        }
        self.replicas.clear();
    }
}

#[cfg(test)]
mod tests;
