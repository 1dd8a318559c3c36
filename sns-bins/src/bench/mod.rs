//! `sns bench`: the load generator.
//!
//! It speaks the public wire protocol through the client library ([`sns_core::Session`], with
//! its failover), so it drives an in-process deployment it starts itself (the default) or any
//! running deployment reached through its coordinator (`-h HOST -k PORT`), the course's
//! servers included (`--course`: plain clients, no keyed posts).
//!
//! A run: start the deployment (in-process), log in `--users` users, have each follow
//! `--follows-per-user` others (uniform or power-law), wait until every author's cluster knows
//! its followers (each author's `LIST`), open every user's timeline, then post at `--rate` (or
//! as fast as possible) for `--warm-up` + `--duration`, and wait (at most `--drain`) for every
//! delivery. Latency runs from when a post was due (the schedule, so a stalled sender shows up
//! in the latencies instead of hiding them) to when a follower's client received it; only posts
//! due in the timed window count. Every post of the run is checked for exactly-once delivery.
//! Scenarios add a disruption a third into the timed window: `failover` aborts cluster 1's
//! master, `broker-restart` restarts the RabbitMQ application (`rabbitmqctl stop_app` and
//! `start_app`).
//!
//! The steps, by module: `setup` builds the population (logins, follows, their
//! synchronization, timelines), `load` runs the timed window, `scenario` disrupts it, `tally`
//! counts every post and delivery (`latency` reads its histograms), `report` says what was
//! measured, and `picture` draws it (`--report FILE.svg`).

mod graph;
mod latency;
mod load;
mod member;
pub mod picture;
mod report;
mod scenario;
mod setup;
mod tally;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sns_core::{Bus, Data, Deployment, DeploymentConfig, Ports, UserId};
use tokio::sync::Mutex;

pub use graph::{Graph, Rng, Shape};
pub use latency::{CurvePoint, Percentiles};
pub use report::{Report, Worst};
pub use scenario::Scenario;
pub use tally::{Tally, Verdict};

use scenario::SharedDeployment;

/// Where the servers keep their logs (in-process runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StorageKind {
    /// Files in a fresh temporary directory (or `--data-dir`), fsynced: durable.
    File,
    /// Memory only.
    Memory,
}

/// `sns bench`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// What happens during the run.
    #[arg(value_enum, default_value_t = Scenario::Steady)]
    pub scenario: Scenario,
    /// Coordinator host of a running deployment; without it, the benchmark starts its own in
    /// this process.
    #[arg(short = 'h', long = "host")]
    pub host: Option<String>,
    /// Coordinator port of a running deployment.
    #[arg(short = 'k', long = "port", default_value_t = 9090)]
    pub port: u16,
    /// Number of clusters (in-process: how many to start; running deployment: how many it
    /// has, to tell same-cluster from cross-cluster deliveries).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub clusters: u32,
    /// Servers per cluster (in-process).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=9))]
    pub servers: u32,
    /// Synchronizer transport (in-process): local, grpc or amqp://USER:PASSWORD@HOST:PORT/VHOST.
    #[arg(long, default_value = "local")]
    pub bus: String,
    /// Server storage (in-process).
    #[arg(long, value_enum, default_value_t = StorageKind::File)]
    pub storage: StorageKind,
    /// Directory for `--storage file` (default: a fresh temporary directory, removed after).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Users in the population.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(2..=1_000_000))]
    pub users: u32,
    /// Id of the first user (the population is this and the following ids); pick a fresh
    /// range when rerunning against a running deployment.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub first_user: u32,
    /// Users each user follows.
    #[arg(long, default_value_t = 10)]
    pub follows_per_user: u32,
    /// How follow targets are chosen.
    #[arg(long, value_enum, default_value_t = Shape::Uniform)]
    pub graph: Shape,
    /// Posts per second, all users together (each post by a user drawn at random); 0: every
    /// user posts as fast as its window of unacknowledged posts allows.
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    /// With `--rate 0`: at most N posts on their way at once, all users together (a post is
    /// on its way until every follower has it), so posting keeps pace with delivery; without
    /// it, each user is held back only by its window of unacknowledged posts.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub in_flight: Option<u32>,
    /// Timed length of the run (`30s`, `2m`, `500ms`, or seconds).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Untimed posting before the timed window (its posts are still checked for delivery).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warm_up: Duration,
    /// How long to wait after the last post for the deliveries still on their way.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub drain: Duration,
    /// How long setting up the population may take.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub setup_timeout: Duration,
    /// Committed entries between snapshots on every server (in-process).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_every: u64,
    /// Seed of the follow graph and of the choice of authors.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The deployment speaks only the course's protocol (plain clients: no failover, no
    /// acknowledged posts).
    #[arg(long)]
    pub course: bool,
    /// Runs, one after the other, each with a fresh deployment (in-process) or a fresh range
    /// of users after the previous run's (running deployment); each run is reported, then the
    /// worst figure of each kind across the runs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub runs: u32,
    /// Print the report as JSON on stdout (no progress bar).
    #[arg(long)]
    pub json: bool,
    /// After the run(s), draw each run's latency percentiles per path and deliveries per
    /// second into FILE: an SVG picture (`.svg`) or an HTML page with it inline (`.html`).
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// `rabbitmqctl` to run for the broker-restart scenario.
    #[arg(long, default_value = "rabbitmqctl")]
    pub rabbitmqctl: String,
}

/// Parses `30s`, `2m`, `500ms`, `1.5s` or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 30s, 500ms, 2m)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {text:?}: use ms, s, m or h"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

/// A failure of the run itself (not of exactly-once delivery, which the report carries).
type Failure = String;

/// Runs the benchmark `--runs` times, one run after the other, and returns each run's report;
/// progress goes to stderr. A run that cannot be made at all (not one that misses deliveries,
/// which its report says) ends the series.
pub async fn run_all(args: BenchArgs) -> Result<Vec<Report>, Failure> {
    check(&args)?;
    let mut reports = Vec::new();
    for run_index in 0..args.runs {
        let mut run_args = args.clone();
        run_args.first_user = args.first_user + run_index * args.users;
        if args.runs > 1 && !args.json {
            eprintln!("sns bench: run {} of {}", run_index + 1, args.runs);
        }
        reports.push(run(run_args).await?);
    }
    Ok(reports)
}

/// Runs the benchmark once and returns its report; progress goes to stderr.
pub async fn run(args: BenchArgs) -> Result<Report, Failure> {
    let bus = crate::bus::parse_bus(&args.bus).map_err(|e| format!("--bus: {e}"))?;
    let bus = match bus {
        Bus::Amqp(mut options) => {
            // Exchange and queues of the run's own, deleted afterwards.
            options.prefix = format!("sns-bench-{}", std::process::id());
            Bus::Amqp(options)
        }
        other => other,
    };
    check(&args)?;
    let graph = Graph::draw(args.users, args.follows_per_user, args.graph, args.seed)?;
    if args.host.is_some() {
        let coordinator =
            sns_core::transport::address(args.host.as_deref().unwrap_or_default(), args.port);
        return drive(&args, &graph, &coordinator, None).await;
    }

    let dir;
    let data = match (args.storage, &args.data_dir) {
        (StorageKind::Memory, _) => Data::Memory,
        (StorageKind::File, Some(path)) => Data::Dir(path.clone()),
        (StorageKind::File, None) => {
            dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
            Data::Dir(dir.path().to_path_buf())
        }
    };
    let mut config = DeploymentConfig::default();
    config.clusters = args.clusters;
    config.servers_per_cluster = args.servers;
    config.ports = Ports::Auto;
    config.data = data;
    config.bus = bus.clone();
    config.server.snapshot_every = args.snapshot_every;
    let deployment = Deployment::start(config)
        .await
        .map_err(|e| format!("starting the deployment: {e}"))?;
    if let Err(e) = deployment.wait_for_masters(args.setup_timeout).await {
        deployment.shutdown().await;
        return Err(format!("the deployment never had a master everywhere: {e}"));
    }
    let coordinator = deployment.coordinator_addr().to_string();
    let deployment = Arc::new(Mutex::new(Some(deployment)));
    let result = drive(&args, &graph, &coordinator, Some(Arc::clone(&deployment))).await;
    if let Some(deployment) = deployment.lock().await.take() {
        deployment.shutdown().await;
    }
    if let Bus::Amqp(options) = &bus
        && let Err(e) = sns_core::sync::amqp::delete_topology(options, args.clusters).await
    {
        eprintln!("sns bench: could not delete the run's RabbitMQ queues: {e}");
    }
    result.map(|mut report| {
        report.servers_per_cluster = Some(args.servers);
        report.bus = Some(crate::bus::bus_name(&bus).to_string());
        report.storage = Some(
            match args.storage {
                StorageKind::File => "file",
                StorageKind::Memory => "memory",
            }
            .to_string(),
        );
        report
    })
}

/// Flag combinations that cannot work, refused before anything starts.
fn check(args: &BenchArgs) -> Result<(), Failure> {
    let bus = crate::bus::parse_bus(&args.bus).map_err(|e| format!("--bus: {e}"))?;
    if args.duration.is_zero() {
        return Err("--duration must be above 0".to_string());
    }
    // Every run takes the next range of users.
    let last = u64::from(args.first_user) + u64::from(args.users) * u64::from(args.runs) - 1;
    if last > u64::from(UserId::MAX) {
        return Err(format!(
            "user ids would run past {}: lower --first-user, --users or --runs",
            UserId::MAX
        ));
    }
    if args.in_flight.is_some() && args.rate > 0 {
        return Err("--in-flight bounds the closed loop: it needs --rate 0".to_string());
    }
    if args.in_flight.is_some() && args.scenario != Scenario::Steady {
        return Err(
            "--in-flight runs only the steady scenario: a disruption would hold every place \
             and stop posting everywhere"
                .to_string(),
        );
    }
    match args.scenario {
        Scenario::Steady => {}
        Scenario::Failover if args.host.is_some() => {
            return Err(
                "the failover scenario aborts a master itself, so it runs only in-process (drop -h)"
                    .to_string(),
            );
        }
        Scenario::Failover if args.servers < 2 => {
            return Err("the failover scenario needs --servers 2 or more".to_string());
        }
        Scenario::Failover => {}
        Scenario::BrokerRestart if args.host.is_none() && !matches!(&bus, Bus::Amqp(_)) => {
            return Err(
                "the broker-restart scenario needs --bus amqp://... (or a running deployment whose synchronizers use RabbitMQ)"
                    .to_string(),
            );
        }
        Scenario::BrokerRestart => {}
    }
    if args.course && args.scenario == Scenario::Failover {
        return Err("--course clients do not fail over; use the steady scenario".to_string());
    }
    if let Some(path) = &args.report {
        picture::check(path)?;
    }
    Ok(())
}

/// Logs the population in through the coordinator at `coordinator`, runs it, and logs it out
/// again whatever the outcome.
async fn drive(
    args: &BenchArgs,
    graph: &Graph,
    coordinator: &str,
    deployment: Option<SharedDeployment>,
) -> Result<Report, Failure> {
    let members = setup::log_in(args, coordinator).await?;
    let result = drive_population(args, graph, &members, deployment).await;
    setup::log_out(args, &members).await;
    result
}

/// Sets up the logged-in population (users known everywhere, follows made and synchronized,
/// timelines open), then runs the timed window.
async fn drive_population(
    args: &BenchArgs,
    graph: &Graph,
    members: &setup::Members,
    deployment: Option<SharedDeployment>,
) -> Result<Report, Failure> {
    let graph = Arc::new(graph.clone());
    let deadline = tokio::time::Instant::now() + args.setup_timeout;
    setup::wait_until_users_known(args, members, deadline).await?;
    setup::follow(args, &graph, members).await?;
    let followers = setup::wait_for_followers(args, &graph, members, deadline).await?;
    let timelines = setup::open_timelines(args, members).await?;
    load::measure(args, followers, timelines, deployment).await
}
