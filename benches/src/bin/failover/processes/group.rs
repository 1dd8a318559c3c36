//! The coordinators of a [`Deployment`] as a group: which one leads (each coordinator's own
//! admin status says whether it does), killing one, waiting for another to lead, and starting
//! the killed one again; and what the servers' roles are, to check that none changed.

use std::time::Duration;

use sns_core::Network;
use sns_core::admin::{AdminClient, DeploymentStatus};
use sns_core::{Epoch, Role};
use tokio::time::Instant;

use super::{Deployment, stop};
use crate::{Failure, PATIENCE};

/// How often a coordinator's status is asked while waiting for it to lead or serve.
const POLL: Duration = Duration::from_millis(5);

impl Deployment {
    /// The status of coordinator `index`, as it alone sees the deployment.
    pub(crate) async fn coordinator_status(
        &self,
        index: usize,
    ) -> Result<DeploymentStatus, Failure> {
        let coordinator = self.coordinators.get(index).ok_or("no such coordinator")?;
        let admin = AdminClient::connect(
            &Network::tcp(),
            &format!("127.0.0.1:{}", coordinator.port),
            Some(self.token.clone()),
        )
        .await?;
        Ok(admin.status().await?)
    }

    /// The name of coordinator `index` in its group.
    pub(crate) fn coordinator_name(&self, index: usize) -> &str {
        self.coordinators.get(index).map_or("?", |c| &c.name)
    }

    /// Waits until exactly one running coordinator says it leads; returns its index.
    pub(crate) async fn leader(&self) -> Result<usize, Failure> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let mut leading = Vec::new();
            for index in 0..self.coordinators.len() {
                if self.coordinators[index].child.is_some()
                    && let Ok(status) = self.coordinator_status(index).await
                    && status.leading
                {
                    leading.push(index);
                }
            }
            if let [leader] = leading[..] {
                return Ok(leader);
            }
            if Instant::now() >= deadline {
                return Err(format!("no single leading coordinator after {PATIENCE:?}").into());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// SIGKILLs coordinator `index` and waits until the process is gone.
    pub(crate) fn kill_coordinator(&mut self, index: usize) -> Result<(), Failure> {
        let coordinator = self
            .coordinators
            .get_mut(index)
            .ok_or("no such coordinator")?;
        stop(coordinator.child.take())
    }

    /// Asks every running coordinator every 5 ms whether it leads, until one does; returns it
    /// and when its answer arrived.
    pub(crate) async fn wait_for_new_leader(&self) -> Result<(usize, Instant), Failure> {
        let running: Vec<usize> = (0..self.coordinators.len())
            .filter(|&i| self.coordinators[i].child.is_some())
            .collect();
        // One connection per coordinator, made before the clock matters.
        let mut admins = Vec::new();
        for &index in &running {
            let addr = format!("127.0.0.1:{}", self.coordinators[index].port);
            let admin =
                AdminClient::connect(&Network::tcp(), &addr, Some(self.token.clone())).await?;
            admins.push((index, admin));
        }
        let deadline = Instant::now() + PATIENCE;
        loop {
            for (index, admin) in &admins {
                if admin.status().await.is_ok_and(|s| s.leading) {
                    return Ok((*index, Instant::now()));
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("no coordinator led within {PATIENCE:?} of the kill").into());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Starts coordinator `index` again on its port and waits until it answers with a fresh
    /// read of its store (it then answers heartbeats).
    pub(crate) async fn restart_coordinator(&mut self, index: usize) -> Result<(), Failure> {
        self.start_coordinator(index)?;
        let deadline = Instant::now() + PATIENCE;
        loop {
            if self
                .coordinator_status(index)
                .await
                .is_ok_and(|s| s.store_fresh)
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(
                    format!("the restarted coordinator did not serve in {PATIENCE:?}").into(),
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The master of cluster 1 and its epoch, as the first running coordinator that answers
    /// sees them.
    pub(crate) async fn master_and_epoch(&self) -> Result<(u32, Epoch), Failure> {
        let status = self.status().await?;
        status
            .nodes
            .iter()
            .find(|n| n.alive && n.role == Some(Role::Master))
            .map(|n| (n.id, n.epoch))
            .ok_or_else(|| "no live master".into())
    }

    /// How many times the servers have logged a role change so far (each of their logs holds
    /// every start of the run).
    pub(crate) fn role_changes(&self) -> Result<usize, Failure> {
        let mut changes = 0;
        for (server, _, _) in &self.servers {
            let log = std::fs::read_to_string(self.log_path(&format!("tsd{server}")))?;
            changes += log.lines().filter(|l| l.contains("role changed")).count();
        }
        Ok(changes)
    }
}
