//! `failover --kill coordinator`: SIGKILL the leading coordinator of a group on etcd while the
//! writers go on, and measure what that costs.
//!
//! Per kill: the time from the kill to the first answer of a surviving coordinator saying it
//! leads (the next moment a promotion is possible: the dead leader's etcd lease has to expire
//! first), each writer's longest time between two successive successful calls from the last
//! one before the kill until a failure timeout after the new leader leads (with no outage,
//! about one call), and whether any server changed role (the master, its epoch and the
//! servers' `role changed` log lines must all stay as they were). Servers beat every
//! coordinator and the writers talk to the master directly, so the target is no outage at all.
//! As a control, each run first takes the same measure of the writers over a window with no
//! kill, as long as a kill's window usually is: on a shared disk a call now and then waits
//! tens of milliseconds for an fsync, kill or not.

use std::time::Duration;

use tokio::time::Instant;

use super::processes::Deployment;
use super::writers::{Outage, Writer, outage, successes_since};
use super::{Failure, ms};

/// The coordinators' etcd lease (they run with the default): the control window is this plus
/// a failure timeout, about as long as a kill's.
const LEASE: Duration = sns_core::coordinator::DEFAULT_LEASE;

/// What one kill of the leading coordinator showed.
pub(super) struct LeaderKill {
    /// From the kill to a surviving coordinator's first answer that it leads.
    pub(super) to_new_leader: Duration,
    /// Per writer, in the order of the writers.
    pub(super) outages: Vec<Outage>,
    /// Per writer, the same over the control window with no kill.
    pub(super) quiet: Vec<Outage>,
    /// Whether the master or its epoch changed, or a server logged a role change.
    pub(super) roles_changed: bool,
}

/// Run `run`: once the master has an in-sync slave and both writers are going, SIGKILLs the
/// leading coordinator `pause` into the heartbeat period, waits for another to lead, watches
/// the writers for `failure_timeout` more, checks the roles, prints the run's line, and starts
/// the killed coordinator again.
pub(super) async fn kill_leader(
    run: u32,
    pause: Duration,
    failure_timeout: Duration,
    deployment: &mut Deployment,
    writers: &mut [Writer],
) -> Result<LeaderKill, Failure> {
    deployment.wait_for_mirrored_pair().await?;
    let settled = Instant::now();
    for writer in writers.iter_mut() {
        successes_since(writer, settled, 20).await?;
    }
    let quiet = control(writers, LEASE + failure_timeout).await?;
    let leader = deployment.leader().await?;
    let roles_before = deployment.master_and_epoch().await?;
    let changes_before = deployment.role_changes()?;
    // Kill at a random point of the heartbeat period.
    tokio::time::sleep(pause).await;
    let failed: Vec<u64> = writers.iter().map(Writer::failed).collect();
    let killed_at = Instant::now();
    deployment.kill_coordinator(leader)?;
    let (successor, leads_at) = deployment.wait_for_new_leader().await?;
    let to_new_leader = leads_at - killed_at;
    // A master that no coordinator acknowledges steps down a failure timeout after its last
    // acknowledged heartbeat: watch the writers for that long after the new leader leads.
    let until = leads_at + failure_timeout;
    let mut outages = Vec::new();
    for (writer, failed) in writers.iter_mut().zip(failed) {
        outages.push(outage(writer, killed_at, until, failed).await?);
    }
    let roles_after = deployment.master_and_epoch().await?;
    let roles_changed = roles_after != roles_before || deployment.role_changes()? != changes_before;
    let mut line = format!(
        "run {run:>2}: killed {} (leading) {:>3.0} ms into the period; {} leads after {:>5.0} ms",
        deployment.coordinator_name(leader),
        ms(pause),
        deployment.coordinator_name(successor),
        ms(to_new_leader),
    );
    for ((writer, outage), quiet) in writers.iter().zip(&outages).zip(&quiet) {
        line.push_str(&format!(
            "; {}: gap over the kill {:.1} ms, longest {:>4.0} ms ({:.0} ms after the kill; median {:.1} ms, {} calls, {} failed; no kill: {:.0} ms)",
            writer.name,
            ms(outage.spanning_gap),
            ms(outage.longest_gap),
            ms(outage.longest_ended),
            ms(outage.median_gap),
            outage.calls,
            outage.failed,
            ms(quiet.longest_gap),
        ));
    }
    let (master, epoch) = roles_after;
    line.push_str(&if roles_changed {
        format!("; ROLES CHANGED: master {master}, epoch {epoch}")
    } else {
        format!("; roles unchanged (master {master}, epoch {epoch})")
    });
    println!("{line}");
    deployment.restart_coordinator(leader).await?;
    Ok(LeaderKill {
        to_new_leader,
        outages,
        quiet,
        roles_changed,
    })
}

/// Each writer's gaps over `window` from now, with nothing killed.
async fn control(writers: &mut [Writer], window: Duration) -> Result<Vec<Outage>, Failure> {
    let failed: Vec<u64> = writers.iter().map(Writer::failed).collect();
    let start = Instant::now();
    let mut quiet = Vec::new();
    for (writer, failed) in writers.iter_mut().zip(failed) {
        quiet.push(outage(writer, start, start + window, failed).await?);
    }
    Ok(quiet)
}
