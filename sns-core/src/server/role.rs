//! Role changes: master and slave, the commit gate, and discarding what a master that lost its
//! role had not committed.
//!
//! Invariant: a server that stops being master drops its uncommitted entries (the state never
//! held them) and truncates its log after the commit index before it takes anything new.

use std::sync::Arc;

use super::pipeline::Gate;
use super::{Core, LogPositions, Server, lock_core, storage_failed};
use crate::ids::{LogIndex, Role};

impl Server {
    pub(super) fn change_role(&self, core: &mut Core, role: Role) {
        if core.role == role {
            return;
        }
        tracing::info!(
            cluster = %self.shared.config.cluster,
            server = %self.shared.config.server_id,
            from = ?core.role,
            to = ?role,
            "role changed"
        );
        if core.role == Role::Master {
            self.discard_uncommitted(core);
            core.replicas.clear(&*self.shared.storage);
        }
        core.role = role;
        core.counted_by_master = false;
        if role == Role::Slave {
            // Entries the new master has not confirmed wait for its commit index.
            self.set_gate(core, core.commit);
        } else {
            self.shared.mirror_target.send_replace(None);
            self.open_gate(core);
        }
    }

    /// Lets the pipeline commit up to `upto` in the current generation.
    pub(super) fn set_gate(&self, core: &Core, upto: LogIndex) {
        self.shared.gate.send_replace(Gate {
            generation: core.generation,
            upto,
        });
    }

    /// On a master: the gate follows the slaves counted for the commit point.
    pub(super) fn open_gate(&self, core: &Core) {
        let upto = core.replicas.quorum().unwrap_or(Gate::OPEN);
        self.set_gate(core, upto);
    }

    /// Drops every sequenced entry that has not committed: their callers get [`Error::NotMaster`],
    /// the state never saw them, and the log is truncated after the commit index. The
    /// truncation is queued after the entries' appends (storage serves calls in order), and
    /// writes (and mirroring) wait until it is done.
    pub(super) fn discard_uncommitted(&self, core: &mut Core) {
        if core.next_index == core.commit.next() {
            return;
        }
        let discarded = core.next_index.0 - core.commit.0 - 1;
        tracing::warn!(
            cluster = %self.shared.config.cluster,
            server = %self.shared.config.server_id,
            commit = %core.commit,
            discarded,
            "discarding uncommitted entries"
        );
        self.forget_uncommitted(core);
        core.truncating = true;
        let commit = core.commit;
        let shared = Arc::downgrade(&self.shared);
        let storage = Arc::clone(&self.shared.storage);
        self.shared.tasks.spawn(async move {
            let result = storage.truncate_after(commit).await;
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let mut core = lock_core(&shared.core);
            core.truncating = false;
            if let Err(e) = result {
                storage_failed(
                    &shared,
                    &mut core,
                    format!("cannot discard uncommitted entries: {e}"),
                );
            }
            drop(core);
            shared.truncated.notify_waiters();
        });
    }

    /// The in-memory part of a discard: voids the pending entries (new generation) and
    /// rewinds the sequence to the commit index. The durable index rewinds with it, watch
    /// included: a slave acknowledges from that watch, and must never name an entry it dropped.
    pub(super) fn forget_uncommitted(&self, core: &mut Core) {
        core.generation += 1;
        core.uncommitted.clear();
        core.recent.truncate_after(core.commit);
        core.next_index = core.commit.next();
        core.next_seq = core.state.high_water(self.shared.config.cluster) + 1;
        core.durable = core.durable.min(core.commit);
        self.shared.durable_index.send_replace(core.durable);
        core.last_at = core.state.latest_time();
        core.last_epoch = core.recent.last_epoch().unwrap_or(core.last_epoch);
        self.shared.sequenced_index.send_replace(core.commit);
        let upto = self.shared.gate.borrow().upto;
        self.set_gate(core, upto);
    }

    /// The current role.
    pub fn role(&self) -> Role {
        self.lock().role
    }

    /// Changes the role (driven by the coordinator). A master that stops being master discards
    /// its uncommitted entries; a server made master commits every entry it holds.
    pub fn set_role(&self, role: Role) {
        let mut core = self.lock();
        self.change_role(&mut core, role);
    }

    /// Where this server's log stands.
    pub fn positions(&self) -> LogPositions {
        let core = self.lock();
        LogPositions {
            role: core.role,
            epoch: core.epoch,
            known_epoch: core.known_epoch,
            sequenced: LogIndex(core.next_index.0 - 1),
            durable: core.durable,
            commit: core.commit,
            in_sync: core.replicas.in_sync(),
            counted_by_master: core.role == Role::Slave && core.counted_by_master,
        }
    }
}
