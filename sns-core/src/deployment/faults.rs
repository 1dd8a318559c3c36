//! Fault injection: crashing a server (losing unsynced writes on simulated disks), failing its
//! disk, and cutting its link to the coordinator on the memory network. Each is one call on a
//! running [`Deployment`], and none touches another server's state.

use super::{COORDINATOR_NODE, Data, Deployment, server_node};
use crate::error::{Error, Result};
use crate::ids::{ClusterId, ServerId};

/// Which way a cut between a server and the coordinator goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Bytes from the server to the coordinator (its heartbeats) stall.
    ToCoordinator,
    /// Bytes from the coordinator to the server (the replies) stall.
    FromCoordinator,
    /// Both.
    Both,
}

impl Deployment {
    /// Crashes a server: its tasks are stopped at once (connections are dropped, not closed
    /// gracefully), and on [`Data::Simulated`] disks every write not yet synced is lost. What
    /// was synced stays for [`Deployment::restart`]. (On real files, what the kernel holds is
    /// not lost by a process crash; on [`Data::Memory`] nothing is.)
    pub async fn crash(&mut self, cluster: ClusterId, server: ServerId) -> Result<()> {
        let simulated = self.config.data == Data::Simulated;
        let slot = self
            .slots
            .get_mut(&(cluster, server))
            .ok_or_else(|| Error::invalid(format!("no server {server} in cluster {cluster}")))?;
        if simulated {
            slot.disk.pull_plug();
        }
        if let Some(running) = slot.running.take() {
            running.serving.abort();
            running.shutdown.cancel();
            running.server.close().await;
            let _ = running.serving.await;
        }
        Ok(())
    }

    /// Makes every write of a server's simulated disk fail from now on, as on a full disk (for
    /// tests; needs [`Data::Simulated`]).
    pub fn fail_disk(&self, cluster: ClusterId, server: ServerId) -> Result<()> {
        if self.config.data != Data::Simulated {
            return Err(Error::invalid("failing disks need simulated disks"));
        }
        let slot = self
            .slots
            .get(&(cluster, server))
            .ok_or_else(|| Error::invalid(format!("no server {server} in cluster {cluster}")))?;
        slot.disk.fail_writes();
        Ok(())
    }

    /// Cuts (`cut = true`) or heals a server's link to the coordinator in `direction`, on the
    /// memory network: heartbeats or their replies stall on the open connection, and new
    /// connections between the two do not complete. Over TCP this is refused.
    pub fn cut(
        &self,
        cluster: ClusterId,
        server: ServerId,
        direction: Direction,
        cut: bool,
    ) -> Result<()> {
        if !self.slots.contains_key(&(cluster, server)) {
            return Err(Error::invalid(format!(
                "no server {server} in cluster {cluster}"
            )));
        }
        let network = self
            .memory_network()
            .ok_or_else(|| Error::invalid("partitions need the memory transport"))?;
        let node = server_node(cluster, server);
        let links: &[(&str, &str)] = match direction {
            Direction::ToCoordinator => &[(&node, COORDINATOR_NODE)],
            Direction::FromCoordinator => &[(COORDINATOR_NODE, &node)],
            Direction::Both => &[(&node, COORDINATOR_NODE), (COORDINATOR_NODE, &node)],
        };
        for (from, to) in links {
            if cut {
                network.cut(from, to);
            } else {
                network.heal(from, to);
            }
        }
        Ok(())
    }
}
