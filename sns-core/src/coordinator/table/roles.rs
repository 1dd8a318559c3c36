//! One cluster's roles (its epoch, master and in-sync set) and how a server's heartbeat moves
//! them.
//!
//! Rules (see the table's invariants): a master stays master while alive and is named again
//! under a new epoch when it restarted or stepped down; a dead master is replaced only by a
//! slave it reported in sync, or, with unclean promotion, by the live server with the most
//! recent log; a cluster with no known master takes the word of a server claiming mastership
//! (a restarted coordinator), else elects the most recent log once its election window closed.

use std::collections::BTreeSet;

use super::Beat;
use crate::coordinator::store::{Revision, RolesRecord};
use crate::error::{Error, Result};
use crate::ids::{Epoch, Role, ServerId};

/// The roles of one cluster.
#[derive(Debug, Clone, Default)]
pub(super) struct ClusterRoles {
    pub(super) epoch: Epoch,
    pub(super) master: Option<ServerId>,
    /// The slaves the master last reported in sync.
    pub(super) in_sync: BTreeSet<ServerId>,
    /// Slaves named master in place of a dead one.
    pub(super) promotions: u64,
    /// The revision of the stored record these roles are (0: none stored yet).
    pub(super) revision: Revision,
}

impl ClusterRoles {
    /// The durable part of these roles, as stored.
    pub(super) fn record(&self) -> RolesRecord {
        RolesRecord {
            epoch: self.epoch,
            master: self.master,
            in_sync: self.in_sync.clone(),
            promotions: self.promotions,
        }
    }

    /// Roles as a stored record at `revision` says.
    pub(super) fn stored(record: RolesRecord, revision: Revision) -> Self {
        Self {
            epoch: record.epoch,
            master: record.master,
            in_sync: record.in_sync,
            promotions: record.promotions,
            revision,
        }
    }

    /// The answer a coordinator that may not change these roles gives `beat`: slave to all but
    /// the recorded master; master to the recorded master only while it writes under the
    /// recorded epoch and counts in sync every slave the record does (so its answer never
    /// vouches for an in-sync set the record does not hold). Anything else waits for the
    /// leading coordinator.
    pub(super) fn unchanged_answer(&self, beat: &Beat) -> Result<Role> {
        if self.master != Some(beat.server) {
            return Ok(Role::Slave);
        }
        let counted = self.in_sync.iter().all(|s| beat.in_sync.contains(s));
        if beat.claims_master && beat.epoch == self.epoch && counted {
            Ok(Role::Master)
        } else {
            Err(Error::Unavailable(format!(
                "the roles of cluster {} change with this heartbeat, which only the leading \
                 coordinator records; beat again",
                beat.cluster
            )))
        }
    }
}

impl ClusterRoles {
    /// Names `server` master under a new epoch (above `floor` too).
    fn name_master(&mut self, server: ServerId, floor: Epoch) -> Result<()> {
        let Some(epoch) = self.epoch.0.max(floor.0).checked_add(1) else {
            return Err(Error::invalid("epoch out of range"));
        };
        self.epoch = Epoch(epoch);
        self.master = Some(server);
        self.in_sync.clear();
        Ok(())
    }

    /// A beat of the cluster's master: it stays master. Its in-sync set is taken while it
    /// writes under the current epoch (or a newer one, which a restarted coordinator with
    /// nothing stored did not know; with a stored record the epoch is the record's, and a newer
    /// claim is not taken); a master that no longer claims mastership is named again under a
    /// new epoch.
    pub(super) fn master_beat(&mut self, beat: &Beat) -> Result<Role> {
        let server = beat.server;
        if beat.claims_master && beat.epoch <= self.epoch {
            if beat.epoch == self.epoch {
                self.in_sync = beat.in_sync.iter().copied().collect();
            }
        } else if beat.claims_master && self.revision > 0 {
            return Err(Error::Unavailable(format!(
                "server {server} claims epoch {} of cluster {}, newer than the recorded {}; \
                 beat again",
                beat.epoch, beat.cluster, self.epoch
            )));
        } else if beat.claims_master {
            // Its epoch is newer than this table knows (a restarted coordinator).
            self.epoch = beat.epoch;
            self.in_sync = beat.in_sync.iter().copied().collect();
        } else {
            // The master restarted or stepped down: it writes under a new epoch.
            self.name_master(server, beat.epoch)?;
        }
        Ok(Role::Master)
    }

    /// A beat of a slave while the master is dead: the slave is promoted if the master
    /// reported it in sync, or if `unclean_choice` (unclean promotion is allowed and this
    /// slave has the most recent log). (The promotion is logged when it is installed.)
    pub(super) fn replace_dead_master(
        &mut self,
        beat: &Beat,
        unclean_choice: bool,
    ) -> Result<Role> {
        let server = beat.server;
        if self.in_sync.contains(&server) || unclean_choice {
            self.name_master(server, beat.epoch)?;
            self.promotions += 1;
            Ok(Role::Master)
        } else {
            Ok(Role::Slave)
        }
    }

    /// A beat while no master is known (a fresh cluster, or a restarted coordinator): a server
    /// claiming mastership keeps it; otherwise the server is elected if `elected` (the
    /// election window closed and its log is the most recent).
    pub(super) fn without_master(&mut self, beat: &Beat, elected: bool) -> Result<Role> {
        let server = beat.server;
        if beat.claims_master {
            self.epoch = self.epoch.max(beat.epoch);
            self.master = Some(server);
            self.in_sync = beat.in_sync.iter().copied().collect();
            Ok(Role::Master)
        } else if elected {
            self.name_master(server, beat.epoch)?;
            Ok(Role::Master)
        } else {
            Ok(Role::Slave)
        }
    }
}
