//! `failover`: how long clients wait when a master is killed, and what killing the leading
//! coordinator of a group costs them (results in `docs/benchmarks.md`, "Failover and
//! mirroring").
//!
//! Starts the real binaries, a `coordinator` and two `tsd` of cluster 1 (one cluster; data in
//! a temporary directory, logs in `<dir>/logs/`), and two writers: a bare `sns_core::Client`
//! that re-asks the coordinator every `--retry-ms` after an error (the failover time of the
//! system itself), and a `Session` with its default settings (what `tsc` users see). Each does
//! FOLLOW/UNFOLLOW in a loop. Both writers check that no acknowledged change is lost (a follow
//! answered "already following" after an acknowledged unfollow, or the reverse).
//!
//! `--kill master` (the default): a run SIGKILLs the master at a random point of the heartbeat
//! period and measures, per writer, the time from the kill to the end of the first successful
//! call that started after the process was gone. The killed server is then restarted, rejoins
//! as slave, and the next run starts once it is in sync.
//!
//! `--kill coordinator`: `--coordinators` (2) `coordinator --etcd` processes form a group on
//! etcd (`--etcd URL`, or a member the bench starts from `etcd` on the `PATH`, data and log in
//! the temporary directory) under a fresh prefix; servers and writers are given the whole
//! group. A run SIGKILLs the leading coordinator at a random point of the heartbeat period and
//! measures the time until a survivor leads (the next possible promotion), each writer's
//! longest gap between two successful calls and its failed calls (the write outage; see
//! `coordinator_kill.rs`), and checks that no server changed role; it then restarts the killed
//! coordinator on its port, so the next run kills whichever leads then. It fails if a server
//! changed role.
//!
//! Build the binaries first, then run (the binaries are looked for next to this one, or in
//! `--bin-dir`):
//!
//! ```sh
//! cargo build --release -p sns-bins --bins
//! cargo run --release -p sns-benches --bin failover -- --runs 10 [--interval-ms 5000 --missed 2]
//! cargo run --release -p sns-benches --bin failover -- --kill coordinator --runs 5 [--etcd URL]
//! ```

mod coordinator_kill;
mod etcd;
mod processes;
mod writers;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use sns_core::RoutingConfig;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use coordinator_kill::{LeaderKill, kill_leader};
use etcd::EtcdMember;
use processes::{Coordinators, Deployment};
use writers::{Writer, first_success_after, port_of, successes_since};

/// Measure what SIGKILL of a master (or of the leading coordinator) costs the clients.
#[derive(Debug, Parser)]
#[command(name = "failover")]
struct Args {
    /// Number of kills.
    #[arg(long, default_value_t = 10)]
    runs: u32,
    /// What each run kills.
    #[arg(long, value_enum, default_value_t = Kill::Master)]
    kill: Kill,
    /// With `--kill coordinator`: the coordinators of the group.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(2..=9))]
    coordinators: u32,
    /// With `--kill coordinator`: the etcd to keep the roles in (its client URL), under a
    /// prefix of the run's own [default: a member of the run's own, from `etcd` on the PATH].
    #[arg(long, value_name = "URL")]
    etcd: Option<String>,
    /// Heartbeat interval of the coordinator and servers, in milliseconds [default: the
    /// binaries' default].
    #[arg(long)]
    interval_ms: Option<u64>,
    /// Missed heartbeats after which a node is dead [default: the binaries' default].
    #[arg(long)]
    missed: Option<u32>,
    /// Pause of the bare client between two attempts after an error, in milliseconds.
    #[arg(long, default_value_t = 10)]
    retry_ms: u64,
    /// Directory holding `coordinator` and `tsd` [default: the directory of this binary].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Keep the temporary directory (data and logs) at the end.
    #[arg(long)]
    keep: bool,
}

/// What a run kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Kill {
    /// The master of cluster 1 (one coordinator, its roles in memory).
    Master,
    /// The leading coordinator of a group on etcd.
    Coordinator,
}

type Failure = Box<dyn std::error::Error>;

/// The longest any one wait may take before the run is abandoned.
const PATIENCE: Duration = Duration::from_secs(120);

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("failover: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("failover: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A pseudo-random fraction in [0, 1) (xorshift seeded from the clock; no need for quality).
fn fraction(state: &mut u64) -> f64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 11) as f64 / (1u64 << 53) as f64
}

/// A duration in milliseconds.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn summary(name: &str, times: &mut [Duration]) -> String {
    times.sort();
    let median = if times.len() % 2 == 1 {
        ms(times[times.len() / 2])
    } else {
        (ms(times[times.len() / 2 - 1]) + ms(times[times.len() / 2])) / 2.0
    };
    format!(
        "{name:<11} runs {:>3}  min {:>7.0} ms  median {:>7.0} ms  max {:>7.0} ms",
        times.len(),
        times.first().map_or(0.0, |d| ms(*d)),
        median,
        times.last().map_or(0.0, |d| ms(*d)),
    )
}

/// The timing both modes share.
struct Timing {
    interval: Duration,
    missed: u32,
    retry: Duration,
}

/// What the runs of one mode found: the summary lines, and how many runs changed a role when
/// none should have.
struct Tally {
    lines: Vec<String>,
    roles_changed: usize,
}

async fn run(args: Args) -> Result<(), Failure> {
    let bin_dir = bin_dir(&args)?;
    let temp = tempfile::Builder::new().prefix("sns-failover").tempdir()?;
    std::fs::create_dir_all(temp.path().join("logs"))?;
    let timing = timing(&args);
    println!("data and logs in {}", temp.path().display());
    // Started first and dropped last: the coordinators keep their roles in it.
    let own_etcd = match (args.kill, &args.etcd) {
        (Kill::Coordinator, None) => Some(EtcdMember::start(temp.path())?),
        _ => None,
    };
    let coordinators = match args.kill {
        Kill::Master => Coordinators::Alone,
        Kill::Coordinator => group(&args, own_etcd.as_ref())?,
    };
    let mut deployment = Deployment::start(
        bin_dir,
        temp.path(),
        timing.interval,
        timing.missed,
        coordinators,
    )
    .await?;
    let stop = CancellationToken::new();
    let addr = deployment.coordinator_addr();
    let mut writers = writers::start_writers(&addr, timing.retry, &stop).await?;
    let tally = match args.kill {
        Kill::Master => kill_masters(args.runs, &timing, &mut deployment, &mut writers).await?,
        Kill::Coordinator => {
            kill_leaders(args.runs, &timing, &mut deployment, &mut writers).await?
        }
    };
    deployment.wait_for_mirrored_pair().await?;
    stop.cancel();
    let (failed, lost) = writers::finish(writers).await;
    for line in &tally.lines {
        println!("{line}");
    }
    for (name, failed) in failed {
        println!("{name}: {failed} calls failed");
    }
    println!("acknowledged changes lost: {lost}");
    drop(deployment);
    drop(own_etcd);
    if args.keep {
        println!("kept {}", temp.keep().display());
    }
    if lost > 0 {
        return Err(format!("{lost} acknowledged changes were lost").into());
    }
    if tally.roles_changed > 0 {
        return Err(format!("a server changed role in {} runs", tally.roles_changed).into());
    }
    Ok(())
}

/// The heartbeat settings and the bare client's retry pause, printed.
fn timing(args: &Args) -> Timing {
    let defaults = RoutingConfig::default();
    let interval = args
        .interval_ms
        .map_or(defaults.heartbeat_interval, Duration::from_millis);
    let missed = args.missed.unwrap_or(defaults.missed_heartbeats);
    let killed = match args.kill {
        Kill::Master => "the master".to_string(),
        Kill::Coordinator => format!("the leader of {} coordinators", args.coordinators),
    };
    println!(
        "failover: {} runs killing {killed}, heartbeat every {} ms, dead after {} missed; bare client retries every {} ms",
        args.runs,
        interval.as_millis(),
        missed,
        args.retry_ms
    );
    Timing {
        interval,
        missed,
        retry: Duration::from_millis(args.retry_ms),
    }
}

/// The coordinator group of `--kill coordinator`: on `--etcd` or the run's own member, under
/// a prefix no other run uses.
fn group(args: &Args, own_etcd: Option<&EtcdMember>) -> Result<Coordinators, Failure> {
    let etcd = match (&args.etcd, own_etcd) {
        (Some(url), _) => url.clone(),
        (None, Some(member)) => member.url().to_string(),
        (None, None) => return Err("no etcd".into()),
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let prefix = format!("/sns-failover-{}-{nanos}", std::process::id());
    println!("coordinators on etcd {etcd}, under {prefix}");
    Ok(Coordinators::Group {
        etcd,
        prefix,
        count: usize::try_from(args.coordinators)?,
    })
}

/// A seed for [`fraction`], from the clock.
fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x9e37_79b9_7f4a_7c15, |d| d.as_nanos() as u64)
        | 1
}

/// `runs` kills of the master; the summary of each writer's time to its first success.
async fn kill_masters(
    runs: u32,
    timing: &Timing,
    deployment: &mut Deployment,
    writers: &mut [Writer],
) -> Result<Tally, Failure> {
    let mut seed = seed();
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); writers.len()];
    for run in 1..=runs {
        let pause = timing.interval.mul_f64(fraction(&mut seed));
        kill_master(run, pause, deployment, writers, &mut times).await?;
    }
    let lines = writers
        .iter()
        .zip(&mut times)
        .map(|(writer, times)| summary(writer.name, times))
        .collect();
    Ok(Tally {
        lines,
        roles_changed: 0,
    })
}

/// `runs` kills of the leading coordinator; the summary of the time to the next leader and of
/// each writer's longest gap and failed calls.
async fn kill_leaders(
    runs: u32,
    timing: &Timing,
    deployment: &mut Deployment,
    writers: &mut [Writer],
) -> Result<Tally, Failure> {
    let mut seed = seed();
    let failure_timeout = timing.interval * timing.missed;
    let mut kills: Vec<LeaderKill> = Vec::new();
    for run in 1..=runs {
        let pause = timing.interval.mul_f64(fraction(&mut seed));
        kills.push(kill_leader(run, pause, failure_timeout, deployment, writers).await?);
    }
    let mut leads: Vec<Duration> = kills.iter().map(|k| k.to_new_leader).collect();
    let mut lines = vec![summary("leads", &mut leads)];
    for (index, writer) in writers.iter().enumerate() {
        let mut gaps: Vec<Duration> = kills.iter().map(|k| k.outages[index].longest_gap).collect();
        let failed: u64 = kills.iter().map(|k| k.outages[index].failed).sum();
        lines.push(format!(
            "{}  (longest gap per kill; {failed} calls failed in the windows)",
            summary(writer.name, &mut gaps)
        ));
        let mut spanning: Vec<Duration> = kills
            .iter()
            .map(|k| k.outages[index].spanning_gap)
            .collect();
        lines.push(format!(
            "{}  (gap over the kill)",
            summary(&format!("{} kill", writer.name), &mut spanning)
        ));
        let mut quiet: Vec<Duration> = kills.iter().map(|k| k.quiet[index].longest_gap).collect();
        lines.push(format!(
            "{}  (longest gap per window with no kill)",
            summary(&format!("{} ctl", writer.name), &mut quiet)
        ));
    }
    let roles_changed = kills.iter().filter(|k| k.roles_changed).count();
    lines.push(format!(
        "runs in which a server changed role: {roles_changed}"
    ));
    Ok(Tally {
        lines,
        roles_changed,
    })
}

/// Where `coordinator` and `tsd` are (absolute: the binaries run in the deployment's
/// directory), checked to hold both.
fn bin_dir(args: &Args) -> Result<PathBuf, Failure> {
    let bin_dir = match &args.bin_dir {
        Some(dir) => std::path::absolute(dir)?,
        None => std::env::current_exe()?
            .parent()
            .map(Path::to_path_buf)
            .ok_or("no directory for this binary")?,
    };
    for binary in ["coordinator", "tsd"] {
        if !bin_dir.join(binary).exists() {
            return Err(format!(
                "no {binary} in {}: build it first (cargo build --release -p sns-bins --bins) or pass --bin-dir",
                bin_dir.display()
            )
            .into());
        }
    }
    Ok(bin_dir)
}

/// Run `run`: once the master has an in-sync slave and both writers are going, SIGKILLs the
/// master `pause` into the heartbeat period, times each writer's first success on the promoted
/// server, prints the run's line, and restarts the killed server.
async fn kill_master(
    run: u32,
    pause: Duration,
    deployment: &mut Deployment,
    writers: &mut [Writer],
    times: &mut [Vec<Duration>],
) -> Result<(), Failure> {
    let (master, slave) = deployment.wait_for_mirrored_pair().await?;
    let settled = Instant::now();
    for writer in writers.iter_mut() {
        successes_since(writer, settled, 20).await?;
    }
    // Kill at a random point of the heartbeat period.
    tokio::time::sleep(pause).await;
    let killed_at = Instant::now();
    deployment.kill(master)?;
    let dead = Instant::now();
    let promoted = port_of(&deployment.addr_of(slave));
    let mut line = format!("run {run:>2}: killed server {master}");
    for (writer, times) in writers.iter_mut().zip(times) {
        let first = first_success_after(writer, dead, promoted).await?;
        let took = first.ended - killed_at;
        times.push(took);
        line.push_str(&format!(
            "  {} {:>6.0} ms",
            writer.name,
            took.as_secs_f64() * 1000.0
        ));
    }
    println!("{line}");
    deployment.start_server(master)
}
