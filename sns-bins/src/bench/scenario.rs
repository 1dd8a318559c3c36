//! What happens during a run besides the load: nothing (`steady`), cluster 1's master aborted
//! (`failover`), or the RabbitMQ application restarted (`broker-restart`).
//!
//! The disruption comes a third into the timed window; the tally marks the moment it
//! happened, from which it measures the time until deliveries recover.

use std::sync::Arc;
use std::time::Duration;

use sns_core::{ClusterId, Deployment, Role, ServerId};
use tokio::sync::Mutex;

use super::tally::Tally;
use super::{BenchArgs, Failure};

/// What happens during the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Steady load, nothing else.
    Steady,
    /// Abort cluster 1's master a third into the timed window (in-process only); reports the
    /// time until posts of cluster 1's authors are delivered again.
    Failover,
    /// Restart the RabbitMQ application a third into the timed window (`rabbitmqctl stop_app`,
    /// then `start_app`); reports the time from the broker being down (`stop_app` returned)
    /// until a post due after that reaches another cluster.
    BrokerRestart,
}

impl Scenario {
    /// The scenario's name, as the flag takes it and the report shows it.
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Steady => "steady",
            Self::Failover => "failover",
            Self::BrokerRestart => "broker-restart",
        }
    }
}

/// The in-process deployment a run drives, shared with the scenario that disrupts it; `None`
/// inside once it was shut down.
pub(super) type SharedDeployment = Arc<Mutex<Option<Deployment>>>;

/// The scenario's disruption, at `at` (since the tally's base); returns when it happened.
pub(super) async fn disrupt(
    args: BenchArgs,
    tally: Arc<Tally>,
    deployment: Option<SharedDeployment>,
    at: Duration,
) -> Result<Option<Duration>, Failure> {
    if args.scenario == Scenario::Steady {
        return Ok(None);
    }
    let now = tally.now();
    if at > now {
        tokio::time::sleep(at - now).await;
    }
    match args.scenario {
        Scenario::Steady => Ok(None),
        Scenario::Failover => abort_master(&args, &tally, deployment).await.map(Some),
        Scenario::BrokerRestart => restart_broker(&args, &tally).await,
    }
}

/// Aborts cluster 1's master; returns when.
async fn abort_master(
    args: &BenchArgs,
    tally: &Tally,
    deployment: Option<SharedDeployment>,
) -> Result<Duration, Failure> {
    let deployment = deployment.ok_or("the failover scenario needs an in-process deployment")?;
    let mut guard = deployment.lock().await;
    let deployment = guard.as_mut().ok_or("the deployment is gone")?;
    let cluster = ClusterId::new(1).ok_or("cluster 1")?;
    let master = (1..=args.servers)
        .filter_map(ServerId::new)
        .find(|s| {
            deployment
                .server(cluster, *s)
                .is_some_and(|server| server.role() == Role::Master)
        })
        .ok_or("cluster 1 has no master to abort")?;
    let when = tally.disrupt(Some(1));
    deployment
        .crash(cluster, master)
        .await
        .map_err(|e| format!("aborting cluster 1's master: {e}"))?;
    Ok(when)
}

/// Stops and starts the RabbitMQ application; returns when it was down.
async fn restart_broker(args: &BenchArgs, tally: &Tally) -> Result<Option<Duration>, Failure> {
    let mut when = None;
    for step in ["stop_app", "start_app"] {
        let status = tokio::process::Command::new(&args.rabbitmqctl)
            .arg(step)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .await
            .map_err(|e| format!("running {} {step}: {e}", args.rabbitmqctl))?;
        if !status.success() {
            return Err(format!("{} {step} failed: {status}", args.rabbitmqctl));
        }
        // The disruption is the moment the broker is down: posts due from then on can cross
        // clusters only once it is back and the synchronizers reconnected.
        when.get_or_insert_with(|| tally.disrupt(None));
    }
    Ok(when)
}
