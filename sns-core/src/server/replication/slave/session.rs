//! The slave's side of one mirroring stream as a plain value: which master messages it takes,
//! up to where it may commit, and when the master has been silent too long. No sockets, no
//! clock, no lock: the mirroring loop reads the server's role, epoch and commit index under its
//! lock, passes them and the time (since the stream opened) in, and carries the verdicts out.
//!
//! Invariants:
//! - **Fencing.** A message of an epoch older than the newest this slave knows is refused, and
//!   the master is told the newer epoch (it has been replaced and steps down); the stream ends.
//!   A message of the newest epoch or a newer one is taken, and its epoch becomes the newest
//!   known, so the known epoch only moves forward.
//! - **Only a slave mirrors.** A server that is no longer slave ends the stream on the next
//!   message (after learning its epoch, which is not older than the newest known).
//! - **The commit gate.** When the session opens the gate closes at the slave's commit index:
//!   nothing more commits until this master says so. After each message it lets through
//!   everything up to the master's commit index (and never less than the slave's own commit
//!   index), and it never closes again during the session. So a slave commits nothing that a
//!   master has not committed; the commit pipeline, which commits durable entries only, keeps
//!   it from committing what is not durable.
//! - **Acknowledgements.** The slave acknowledges its durable index, but never past the point
//!   up to which its log is known to agree with this master's (`agreed`): its commit index when
//!   the session opens (every committed entry is in the master's log), then what the master's
//!   first message settles (a truncation: its index; a snapshot: nothing until it is installed,
//!   then its index; anything else: the master continued right after the slave's last entry,
//!   so the whole log agrees), and after that the last entry of each batch appended. So a tail
//!   an old master never committed is never acknowledged to a new one, not even before the
//!   new master's truncation arrives.
//! - **Silence.** A stream on which the master says nothing for the mirror timeout while the
//!   slave waits for it is dead; the wait restarts each time the slave is ready for the next
//!   message (after handling one, or after acknowledging its durable index).

use std::time::Duration;

use crate::error::Error;
use crate::ids::{Epoch, LogIndex};
use crate::server::Role;
use crate::server::replication::ToSlave;

/// One mirroring stream, seen from the slave. Times are durations since the stream opened.
#[derive(Debug, Clone)]
pub(super) struct MirrorSession {
    /// The longest the master may stay silent.
    timeout: Duration,
    /// When the slave last started waiting for the master.
    waiting_since: Duration,
    /// Up to where entries may commit.
    gate: LogIndex,
    /// The slave's last entry when the session opened.
    last: LogIndex,
    /// Up to where this slave's log is known to agree with the master's.
    agreed: LogIndex,
    /// Whether the master's first message has been handled.
    settled: bool,
}

/// What handling a master's message did to the slave's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Handled {
    /// Every entry after this index was dropped.
    Truncated(LogIndex),
    /// A piece of a snapshot arrived; the log is untouched until the last one.
    SnapshotPiece,
    /// A snapshot at this index replaced the log.
    Installed(LogIndex),
    /// Entries up to this index were appended.
    Appended(LogIndex),
    /// Nothing was shipped (a keep-alive).
    Nothing,
}

/// What the slave does with a master's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// The master is of an older epoch than the newest known: tell it about `newer`, end the
    /// stream.
    Refuse { newer: Epoch },
    /// This server is no longer slave: end the stream, knowing `known_epoch`.
    Leave { known_epoch: Epoch },
    /// Mirror the message: `known_epoch` is now the newest known, and `counted` whether the
    /// master counts this slave for its commit point.
    Mirror { known_epoch: Epoch, counted: bool },
}

impl MirrorSession {
    /// A session that opens now (at zero) on a slave committed up to `commit` whose log ends
    /// at `last`, refusing a master silent for `timeout`.
    pub(super) fn new(timeout: Duration, commit: LogIndex, last: LogIndex) -> Self {
        Self {
            timeout,
            waiting_since: Duration::ZERO,
            gate: commit,
            last,
            agreed: commit,
            settled: false,
        }
    }

    /// What the slave acknowledges when `durable` is its durable index: never more than its
    /// log holds in agreement with this master.
    pub(super) fn acknowledge(&self, durable: LogIndex) -> LogIndex {
        durable.min(self.agreed)
    }

    /// Records what handling the master's last message did to the log.
    pub(super) fn handled(&mut self, handled: Handled) {
        let first = !self.settled;
        self.settled = true;
        match handled {
            Handled::Truncated(index) | Handled::Installed(index) | Handled::Appended(index) => {
                self.agreed = index;
            }
            Handled::SnapshotPiece => {}
            // The master continued right after the slave's last entry.
            Handled::Nothing if first => self.agreed = self.last,
            Handled::Nothing => {}
        }
    }

    /// Up to where entries may commit.
    pub(super) fn gate(&self) -> LogIndex {
        self.gate
    }

    /// The slave starts waiting for the master's next message at `now`.
    pub(super) fn waiting(&mut self, now: Duration) {
        self.waiting_since = now;
    }

    /// When the master's silence ends the stream, unless a message arrives first.
    pub(super) fn deadline(&self) -> Duration {
        self.waiting_since + self.timeout
    }

    /// Why the stream ended when the deadline passed.
    pub(super) fn silence(&self) -> Error {
        Error::ConnectionLost(format!("the master said nothing for {:?}", self.timeout))
    }

    /// Judges `message` on a server that holds `role` and knows `known_epoch` as the newest.
    pub(super) fn receive(&self, message: &ToSlave, known_epoch: Epoch, role: Role) -> Verdict {
        if message.epoch < known_epoch {
            return Verdict::Refuse { newer: known_epoch };
        }
        let known_epoch = message.epoch;
        if role != Role::Slave {
            return Verdict::Leave { known_epoch };
        }
        Verdict::Mirror {
            known_epoch,
            counted: message.in_sync,
        }
    }

    /// The gate once a message carrying the master's commit index `master_commit` has been
    /// handled, on a server that holds `role` and committed up to `commit`; `None` when this
    /// server is no longer slave (the gate is not the session's any more).
    pub(super) fn committed(
        &mut self,
        master_commit: LogIndex,
        commit: LogIndex,
        role: Role,
    ) -> Option<LogIndex> {
        if role != Role::Slave {
            return None;
        }
        self.gate = self.gate.max(commit).max(master_commit);
        Some(self.gate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::replication::Shipment;

    const TIMEOUT: Duration = Duration::from_secs(1);

    fn from_master(epoch: u64, commit: u64) -> ToSlave {
        ToSlave {
            epoch: Epoch(epoch),
            commit: LogIndex(commit),
            in_sync: true,
            body: Shipment::KeepAlive,
        }
    }

    #[test]
    fn a_master_of_an_older_epoch_is_refused_and_told_the_newer() {
        let session = MirrorSession::new(TIMEOUT, LogIndex(0), LogIndex(0));
        let verdict = session.receive(&from_master(3, 0), Epoch(4), Role::Slave);
        assert_eq!(verdict, Verdict::Refuse { newer: Epoch(4) });
    }

    #[test]
    fn a_master_of_the_newest_epoch_is_mirrored() {
        let session = MirrorSession::new(TIMEOUT, LogIndex(0), LogIndex(0));
        let mut message = from_master(4, 0);
        message.in_sync = false;
        let verdict = session.receive(&message, Epoch(4), Role::Slave);
        assert_eq!(
            verdict,
            Verdict::Mirror {
                known_epoch: Epoch(4),
                counted: false
            }
        );
    }

    #[test]
    fn a_master_of_a_newer_epoch_is_adopted() {
        let session = MirrorSession::new(TIMEOUT, LogIndex(0), LogIndex(0));
        let verdict = session.receive(&from_master(7, 0), Epoch(4), Role::Slave);
        assert_eq!(
            verdict,
            Verdict::Mirror {
                known_epoch: Epoch(7),
                counted: true
            }
        );
    }

    #[test]
    fn a_server_no_longer_slave_leaves_but_learns_the_epoch() {
        let session = MirrorSession::new(TIMEOUT, LogIndex(0), LogIndex(0));
        let verdict = session.receive(&from_master(6, 0), Epoch(5), Role::Master);
        assert_eq!(
            verdict,
            Verdict::Leave {
                known_epoch: Epoch(6)
            }
        );
    }

    #[test]
    fn an_older_master_is_refused_even_by_a_server_no_longer_slave() {
        let session = MirrorSession::new(TIMEOUT, LogIndex(0), LogIndex(0));
        let verdict = session.receive(&from_master(2, 0), Epoch(5), Role::Master);
        assert_eq!(verdict, Verdict::Refuse { newer: Epoch(5) });
    }

    #[test]
    fn the_gate_closes_at_the_slaves_commit_index_when_the_session_opens() {
        let session = MirrorSession::new(TIMEOUT, LogIndex(12), LogIndex(12));
        assert_eq!(session.gate(), LogIndex(12));
    }

    #[test]
    fn the_gate_follows_the_masters_commit_index() {
        let mut session = MirrorSession::new(TIMEOUT, LogIndex(12), LogIndex(12));
        let gate = session.committed(LogIndex(20), LogIndex(12), Role::Slave);
        assert_eq!(gate, Some(LogIndex(20)));
        let gate = session.committed(LogIndex(25), LogIndex(18), Role::Slave);
        assert_eq!(gate, Some(LogIndex(25)));
    }

    #[test]
    fn the_gate_never_passes_what_a_master_or_this_slave_committed() {
        let mut session = MirrorSession::new(TIMEOUT, LogIndex(12), LogIndex(12));
        for (master, own) in [(0, 12), (5, 12), (15, 13), (15, 15), (16, 14)] {
            let gate = session.committed(LogIndex(master), LogIndex(own), Role::Slave);
            assert!(gate <= Some(LogIndex(16)), "{gate:?} after {master}/{own}");
        }
        assert_eq!(session.gate(), LogIndex(16));
    }

    #[test]
    fn the_gate_never_closes_during_a_session() {
        let mut session = MirrorSession::new(TIMEOUT, LogIndex(10), LogIndex(10));
        session.committed(LogIndex(30), LogIndex(10), Role::Slave);
        let gate = session.committed(LogIndex(20), LogIndex(10), Role::Slave);
        assert_eq!(gate, Some(LogIndex(30)));
    }

    #[test]
    fn the_gate_stays_at_least_at_the_slaves_own_commit_index() {
        let mut session = MirrorSession::new(TIMEOUT, LogIndex(10), LogIndex(10));
        // A snapshot installed at 40 committed everything up to it, whatever the header says.
        let gate = session.committed(LogIndex(35), LogIndex(40), Role::Slave);
        assert_eq!(gate, Some(LogIndex(40)));
    }

    #[test]
    fn the_gate_is_left_alone_once_the_server_is_no_longer_slave() {
        let mut session = MirrorSession::new(TIMEOUT, LogIndex(10), LogIndex(10));
        assert_eq!(
            session.committed(LogIndex(30), LogIndex(10), Role::Master),
            None
        );
        assert_eq!(session.gate(), LogIndex(10));
    }

    /// A slave committed up to 5 whose log ends at 10.
    fn with_a_tail() -> MirrorSession {
        MirrorSession::new(TIMEOUT, LogIndex(5), LogIndex(10))
    }

    #[test]
    fn until_the_master_speaks_a_slave_acknowledges_no_more_than_it_committed() {
        let session = with_a_tail();
        assert_eq!(session.acknowledge(LogIndex(10)), LogIndex(5));
        assert_eq!(session.acknowledge(LogIndex(3)), LogIndex(3));
    }

    #[test]
    fn a_dropped_tail_is_never_acknowledged() {
        let mut session = with_a_tail();
        session.handled(Handled::Truncated(LogIndex(5)));
        assert_eq!(session.acknowledge(LogIndex(10)), LogIndex(5));
        session.handled(Handled::Nothing);
        assert_eq!(session.acknowledge(LogIndex(10)), LogIndex(5));
        session.handled(Handled::Appended(LogIndex(7)));
        assert_eq!(
            session.acknowledge(LogIndex(6)),
            LogIndex(6),
            "7 is not durable"
        );
        assert_eq!(session.acknowledge(LogIndex(7)), LogIndex(7));
    }

    #[test]
    fn a_master_that_continues_after_the_last_entry_confirms_the_whole_log() {
        let mut session = with_a_tail();
        session.handled(Handled::Nothing);
        assert_eq!(session.acknowledge(LogIndex(10)), LogIndex(10));

        let mut session = with_a_tail();
        session.handled(Handled::Appended(LogIndex(12)));
        assert_eq!(session.acknowledge(LogIndex(11)), LogIndex(11));
        session.handled(Handled::Nothing);
        assert_eq!(session.acknowledge(LogIndex(12)), LogIndex(12));
    }

    #[test]
    fn a_log_being_replaced_by_a_snapshot_is_acknowledged_once_it_is_installed() {
        let mut session = with_a_tail();
        session.handled(Handled::SnapshotPiece);
        session.handled(Handled::SnapshotPiece);
        assert_eq!(session.acknowledge(LogIndex(10)), LogIndex(5));
        session.handled(Handled::Installed(LogIndex(40)));
        assert_eq!(session.acknowledge(LogIndex(40)), LogIndex(40));
    }

    #[test]
    fn a_silent_master_is_given_the_mirror_timeout_from_when_the_slave_waits() {
        let mut session = MirrorSession::new(TIMEOUT, LogIndex(0), LogIndex(0));
        assert_eq!(session.deadline(), TIMEOUT);
        session.waiting(Duration::from_millis(2500));
        assert_eq!(session.deadline(), Duration::from_millis(3500));
    }
}
