//! `failover`: how long clients wait when a master is killed (results in
//! `docs/benchmarks.md`, "Failover and mirroring").
//!
//! Starts the real binaries, a `coordinator` and two `tsd` of cluster 1 (one cluster; data in
//! a temporary directory, logs in `<dir>/logs/`), and two writers: a bare `sns_core::Client`
//! that re-asks the coordinator every `--retry-ms` after an error (the failover time of the
//! system itself), and a `Session` with its default settings (what `tsc` users see). Each does
//! FOLLOW/UNFOLLOW in a loop. A run SIGKILLs the master at a random point of the heartbeat
//! period and measures, per writer, the time from the kill to the end of the first successful
//! call that started after the process was gone. The killed server is then restarted, rejoins
//! as slave, and the next run starts once it is in sync. Both writers check that no
//! acknowledged change is lost (a follow answered "already following" after an acknowledged
//! unfollow, or the reverse).
//!
//! Build the binaries first, then run (the binaries are looked for next to this one, or in
//! `--bin-dir`):
//!
//! ```sh
//! cargo build --release -p sns-bins --bins
//! cargo run --release -p sns-benches --bin failover -- --runs 10 [--interval-ms 5000 --missed 2]
//! ```

mod processes;
mod writers;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sns_core::RoutingConfig;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use processes::Deployment;
use writers::{Writer, first_success_after, port_of, successes_since};

/// Measure the time from SIGKILL of a master to the first successful client call.
#[derive(Debug, Parser)]
#[command(name = "failover")]
struct Args {
    /// Number of kills.
    #[arg(long, default_value_t = 10)]
    runs: u32,
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

fn summary(name: &str, times: &mut [Duration]) -> String {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = if times.len() % 2 == 1 {
        ms(times[times.len() / 2])
    } else {
        (ms(times[times.len() / 2 - 1]) + ms(times[times.len() / 2])) / 2.0
    };
    format!(
        "{name:<8} runs {:>3}  min {:>7.0} ms  median {:>7.0} ms  max {:>7.0} ms",
        times.len(),
        times.first().map_or(0.0, |d| ms(*d)),
        median,
        times.last().map_or(0.0, |d| ms(*d)),
    )
}

async fn run(args: Args) -> Result<(), Failure> {
    let bin_dir = bin_dir(&args)?;
    let temp = tempfile::Builder::new().prefix("sns-failover").tempdir()?;
    std::fs::create_dir_all(temp.path().join("logs"))?;
    let defaults = RoutingConfig::default();
    let interval = args
        .interval_ms
        .map_or(defaults.heartbeat_interval, Duration::from_millis);
    let missed = args.missed.unwrap_or(defaults.missed_heartbeats);
    println!(
        "failover: {} runs, heartbeat every {} ms, dead after {} missed; bare client retries every {} ms",
        args.runs,
        interval.as_millis(),
        missed,
        args.retry_ms
    );
    println!("data and logs in {}", temp.path().display());
    let retry = Duration::from_millis(args.retry_ms);
    let mut deployment = Deployment::start(bin_dir, temp.path(), interval, missed).await?;
    let stop = CancellationToken::new();
    let mut writers = writers::start_writers(&deployment.coordinator_addr(), retry, &stop).await?;

    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x9e37_79b9_7f4a_7c15, |d| d.as_nanos() as u64)
        | 1;
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); writers.len()];
    for run in 1..=args.runs {
        let pause = interval.mul_f64(fraction(&mut seed));
        kill_master(run, pause, &mut deployment, &mut writers, &mut times).await?;
    }
    deployment.wait_for_mirrored_pair().await?;
    stop.cancel();
    let (failed, lost) = writers::finish(writers).await;
    for (name, times) in ["bare", "session"].iter().zip(&mut times) {
        println!("{}", summary(name, times));
    }
    for (name, failed) in failed {
        println!("{name}: {failed} calls failed");
    }
    println!("acknowledged changes lost: {lost}");
    drop(deployment);
    if args.keep {
        println!("kept {}", temp.keep().display());
    }
    if lost > 0 {
        return Err(format!("{lost} acknowledged changes were lost").into());
    }
    Ok(())
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
