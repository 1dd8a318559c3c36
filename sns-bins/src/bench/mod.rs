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

mod graph;
mod member;
mod report;
mod tally;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sns_core::{
    Bus, ClusterId, Data, Deployment, DeploymentConfig, Network, Ports, Role, ServerId, UserId,
};
use tokio::sync::Mutex;
use tokio::task::JoinSet;

pub use graph::{Graph, Rng, Shape};
pub use report::Report;
pub use tally::{Percentiles, Tally, Verdict};

use member::{Inbox, Member, Poster};

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
    fn name(self) -> &'static str {
        match self {
            Self::Steady => "steady",
            Self::Failover => "failover",
            Self::BrokerRestart => "broker-restart",
        }
    }
}

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
    /// Print the report as JSON on stdout (no progress bar).
    #[arg(long)]
    pub json: bool,
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

/// Runs the benchmark and returns its report; progress goes to stderr.
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
    check(&args, &bus)?;
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
    let config = DeploymentConfig {
        clusters: args.clusters,
        servers_per_cluster: args.servers,
        ports: Ports::Auto,
        data,
        bus: bus.clone(),
        server: sns_core::ServerConfig {
            snapshot_every: args.snapshot_every,
            ..sns_core::ServerConfig::default()
        },
        ..DeploymentConfig::default()
    };
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
fn check(args: &BenchArgs, bus: &Bus) -> Result<(), Failure> {
    if args.duration.is_zero() {
        return Err("--duration must be above 0".to_string());
    }
    let last = u64::from(args.first_user) + u64::from(args.users) - 1;
    if last > u64::from(UserId::MAX) {
        return Err(format!(
            "user ids would run past {}: lower --first-user or --users",
            UserId::MAX
        ));
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
        Scenario::BrokerRestart if args.host.is_none() && !matches!(bus, Bus::Amqp(_)) => {
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
    Ok(())
}

/// A progress bar on stderr when it is a terminal and no JSON is asked for.
fn progress(args: &BenchArgs, length: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(length),
        if args.json {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        },
    );
    if let Ok(style) = ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(what.to_string());
    bar
}

/// Runs `work(index)` for every index in `0..count` on `lanes` tasks; the first error wins.
async fn on_lanes<T, F, Fut>(
    count: u32,
    lanes: u32,
    bar: &ProgressBar,
    work: F,
) -> Result<Vec<T>, Failure>
where
    T: Send + 'static,
    F: Fn(u32) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T, Failure>> + Send,
{
    let work = Arc::new(work);
    let mut tasks = JoinSet::new();
    let lanes = lanes.clamp(1, count.max(1));
    for lane in 0..lanes {
        let work = Arc::clone(&work);
        let bar = bar.clone();
        tasks.spawn(async move {
            let mut done = Vec::new();
            let mut index = lane;
            while index < count {
                done.push((index, work(index).await?));
                bar.inc(1);
                index += lanes;
            }
            Ok::<_, Failure>(done)
        });
    }
    let mut all: Vec<Option<T>> = (0..count).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let done = joined.map_err(|e| format!("a setup task failed: {e}"))??;
        for (index, value) in done {
            all[index as usize] = Some(value);
        }
    }
    bar.finish_and_clear();
    Ok(all.into_iter().flatten().collect())
}

/// The user id of population index `index` (the range was checked by [`check`]).
fn user_id(first: u32, index: u32) -> UserId {
    UserId::new(first + index).unwrap_or_else(|| unreachable!("user ids checked before the run"))
}

/// Tasks used for setting up the population.
const SETUP_LANES: u32 = 32;

async fn drive(
    args: &BenchArgs,
    graph: &Graph,
    coordinator: &str,
    deployment: Option<Arc<Mutex<Option<Deployment>>>>,
) -> Result<Report, Failure> {
    let network = Network::tcp();
    let users = args.users;
    let first = args.first_user;
    let id = move |index: u32| user_id(first, index);

    let bar = progress(args, u64::from(users), "logging in");
    let members = {
        let network = network.clone();
        let coordinator = coordinator.to_string();
        let course = args.course;
        on_lanes(users, SETUP_LANES, &bar, move |index| {
            let network = network.clone();
            let coordinator = coordinator.clone();
            async move {
                Member::connect(&network, &coordinator, id(index), course)
                    .await
                    .map(Arc::new)
                    .map_err(|e| format!("logging in user {}: {e}", id(index)))
            }
        })
        .await?
    };
    let members: Arc<Vec<Arc<Member>>> = Arc::new(members);
    let result = drive_population(args, graph, &members, deployment).await;
    // Log everyone out, so a rerun can log in at once; errors do not matter any more.
    let bar = progress(args, u64::from(users), "logging out");
    let _ = on_lanes(users, SETUP_LANES, &bar, {
        let members = Arc::clone(&members);
        move |index| {
            let members = Arc::clone(&members);
            async move {
                let _ = members[index as usize].logout().await;
                Ok(())
            }
        }
    })
    .await;
    result
}

async fn drive_population(
    args: &BenchArgs,
    graph: &Graph,
    members: &Arc<Vec<Arc<Member>>>,
    deployment: Option<Arc<Mutex<Option<Deployment>>>>,
) -> Result<Report, Failure> {
    let users = args.users;
    let first = args.first_user;
    let id = move |index: u32| user_id(first, index);
    let graph = Arc::new(graph.clone());

    // A follow names a user its cluster must know: wait until every cluster lists the whole
    // population (logins on other clusters arrive through the synchronizers).
    let deadline = tokio::time::Instant::now() + args.setup_timeout;
    let clusters = args.clusters.min(users);
    let bar = progress(args, u64::from(clusters), "users known");
    on_lanes(clusters, clusters, &bar, {
        let members = Arc::clone(members);
        move |index| {
            let members = Arc::clone(&members);
            async move {
                let member = &members[index as usize];
                let mut pause = Duration::from_millis(20);
                loop {
                    let known = member
                        .all_users()
                        .await
                        .map_err(|e| format!("LIST for user {}: {e}", id(index)))?
                        .iter()
                        .filter(|u| u.get() >= first && u.get() - first < users)
                        .count() as u32;
                    if known == users {
                        return Ok(());
                    }
                    if tokio::time::Instant::now() + pause > deadline {
                        return Err(format!(
                            "the cluster of user {} knows {known} of the {users} users after --setup-timeout; are the synchronizers running?",
                            id(index)
                        ));
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
            }
        }
    })
    .await?;

    let bar = progress(args, u64::from(users), "following");
    on_lanes(users, SETUP_LANES, &bar, {
        let members = Arc::clone(members);
        let graph = Arc::clone(&graph);
        move |index| {
            let members = Arc::clone(&members);
            let graph = Arc::clone(&graph);
            async move {
                for target in graph.follows(index) {
                    members[index as usize]
                        .follow(id(*target))
                        .await
                        .map_err(|e| {
                            format!("user {} following {}: {e}", id(index), id(*target))
                        })?;
                }
                Ok(())
            }
        }
    })
    .await?;

    // Every author's cluster must know its followers (follows made on other clusters arrive
    // through the synchronizers) before posts count. What LIST then shows is what each post
    // must reach: the followers inside the population, who all read their timelines.
    let wanted = Arc::new(graph.follower_counts());
    let bar = progress(args, u64::from(users), "syncing");
    let followers = on_lanes(users, SETUP_LANES, &bar, {
        let members = Arc::clone(members);
        let wanted = Arc::clone(&wanted);
        move |index| {
            let members = Arc::clone(&members);
            let wanted = Arc::clone(&wanted);
            async move {
                let mut pause = Duration::from_millis(20);
                loop {
                    let listed = members[index as usize]
                        .followers()
                        .await
                        .map_err(|e| format!("LIST for user {}: {e}", id(index)))?;
                    let inside = listed
                        .iter()
                        .filter(|u| u.get() >= first && u.get() - first < users)
                        .count() as u32;
                    if inside >= wanted[index as usize] {
                        return Ok(inside);
                    }
                    if tokio::time::Instant::now() + pause > deadline {
                        return Err(format!(
                            "user {} has {inside} of its {} followers after --setup-timeout; are the synchronizers running?",
                            id(index),
                            wanted[index as usize]
                        ));
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
            }
        }
    })
    .await?;

    let bar = progress(args, u64::from(users), "timelines");
    let timelines = on_lanes(users, SETUP_LANES, &bar, {
        let members = Arc::clone(members);
        move |index| {
            let members = Arc::clone(&members);
            async move {
                members[index as usize]
                    .timeline()
                    .await
                    .map_err(|e| format!("opening the timeline of user {}: {e}", id(index)))
            }
        }
    })
    .await?;

    let run_id = Rng::new(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()),
    )
    .next_u64();
    let base = Instant::now();
    let window = (args.warm_up, args.warm_up + args.duration);
    let tally = Arc::new(Tally::new(
        run_id,
        base,
        window,
        followers,
        args.clusters,
        first,
    ));
    let reader_errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut posters = Vec::with_capacity(timelines.len());
    let mut readers = JoinSet::new();
    for (index, (poster, inbox)) in timelines.into_iter().enumerate() {
        posters.push(poster);
        readers.spawn(read(
            index as u32,
            inbox,
            Arc::clone(&tally),
            Arc::clone(&reader_errors),
        ));
    }
    let posters = Arc::new(posters);

    let disruption = tokio::spawn(disrupt(
        args.clone(),
        Arc::clone(&tally),
        deployment,
        window.0 + args.duration / 3,
    ));
    let bar = progress(args, window.1.as_secs(), "posting");
    let ticker = tokio::spawn(tick(bar.clone(), Arc::clone(&tally)));
    let post_errors = Arc::new(AtomicU64::new(0));
    post(args, &posters, &tally, window.1, &post_errors).await;

    // The disruption may still be under way (a restarting broker); the drain waits for it.
    let disruption = disruption
        .await
        .map_err(|e| format!("the scenario's task failed: {e}"))??;
    bar.set_prefix("draining");
    let drained_by = tokio::time::Instant::now() + args.drain;
    while tally.delivered() < tally.expected() && tokio::time::Instant::now() < drained_by {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ticker.abort();
    bar.finish_and_clear();
    readers.abort_all();
    drop(posters);

    let verdict = tally.verdict();
    let (same, cross, all) = tally.percentiles();
    let errors = std::mem::take(&mut *reader_errors.lock().unwrap_or_else(|p| p.into_inner()));
    if let Some(first) = errors.first() {
        return Err(format!(
            "{} timeline stream(s) failed, the first: {first}",
            errors.len()
        ));
    }
    let failed_posts = post_errors.load(Ordering::Relaxed);
    if failed_posts > 0 {
        return Err(format!("{failed_posts} post(s) were refused"));
    }
    let seconds = args.duration.as_secs_f64();
    Ok(Report {
        scenario: args.scenario.name().to_string(),
        target: match &args.host {
            Some(host) => sns_core::transport::address(host, args.port),
            None => "in-process".to_string(),
        },
        clusters: args.clusters,
        servers_per_cluster: None,
        bus: None,
        storage: None,
        users,
        follows_per_user: args.follows_per_user,
        graph: match args.graph {
            Shape::Uniform => "uniform",
            Shape::PowerLaw => "power-law",
        }
        .to_string(),
        rate: (args.rate > 0).then_some(args.rate),
        duration_s: seconds,
        warm_up_s: args.warm_up.as_secs_f64(),
        posts_per_s: tally.issued_in_window() as f64 / seconds,
        deliveries_per_s: tally.delivered_in_window() as f64 / seconds,
        same_cluster_ms: same,
        cross_cluster_ms: cross,
        all_ms: all,
        ok: verdict.exactly_once(),
        exactly_once: verdict,
        disruption_at_s: disruption.map(|d| d.as_secs_f64()),
        recovery_ms: tally.recovery().map(|d| d.as_secs_f64() * 1000.0),
        peak_memory_bytes: report::peak_memory(),
    })
}

/// Reads one user's timeline into the tally until the stream ends.
async fn read(
    index: u32,
    mut inbox: Inbox,
    tally: Arc<Tally>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
) {
    let mut state = tally::ReaderState::default();
    while let Some(next) = inbox.next().await {
        match next {
            Ok(post) => tally.received(index, &mut state, &post.text),
            Err(e) => {
                errors
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(format!("reader {index}: {e}"));
                return;
            }
        }
    }
}

/// Updates the progress bar every 200 ms.
async fn tick(bar: ProgressBar, tally: Arc<Tally>) {
    let mut last = (Instant::now(), tally.delivered());
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = (Instant::now(), tally.delivered());
        let rate = (now.1 - last.1) as f64 / (now.0 - last.0).as_secs_f64();
        last = now;
        bar.set_position(tally.now().as_secs());
        bar.set_message(format!(
            "{} posts, {} deliveries ({rate:.0}/s), {} pending",
            tally.issued(),
            now.1,
            tally.expected().saturating_sub(now.1)
        ));
    }
}

/// Posts until `until` (since the tally's base): paced at `--rate`, or as fast as possible.
async fn post(
    args: &BenchArgs,
    posters: &Arc<Vec<Poster>>,
    tally: &Arc<Tally>,
    until: Duration,
    errors: &Arc<AtomicU64>,
) {
    let users = posters.len() as u32;
    if args.rate > 0 {
        let mut rng = Rng::new(args.seed.wrapping_add(0x5eed));
        let period = Duration::from_secs_f64(1.0 / f64::from(args.rate));
        let mut sent = 0u64;
        loop {
            let due = period.mul_f64(sent as f64);
            if due >= until {
                return;
            }
            let now = tally.now();
            if due > now {
                tokio::time::sleep(due - now).await;
            }
            let author = rng.below(users);
            let Some(text) = tally.issue(author, due) else {
                return;
            };
            if posters[author as usize].post(&text).await.is_err() {
                errors.fetch_add(1, Ordering::Relaxed);
            }
            sent += 1;
        }
    }
    let mut tasks = JoinSet::new();
    for author in 0..users {
        let posters = Arc::clone(posters);
        let tally = Arc::clone(tally);
        let errors = Arc::clone(errors);
        tasks.spawn(async move {
            loop {
                let due = tally.now();
                if due >= until {
                    return;
                }
                let Some(text) = tally.issue(author, due) else {
                    return;
                };
                if posters[author as usize].post(&text).await.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// The scenario's disruption, at `at` (since the tally's base); returns when it happened.
async fn disrupt(
    args: BenchArgs,
    tally: Arc<Tally>,
    deployment: Option<Arc<Mutex<Option<Deployment>>>>,
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
        Scenario::Failover => {
            let deployment =
                deployment.ok_or("the failover scenario needs an in-process deployment")?;
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
            Ok(Some(when))
        }
        Scenario::BrokerRestart => {
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
                // The disruption is the moment the broker is down: posts due from then on
                // can cross clusters only once it is back and the synchronizers reconnected.
                when.get_or_insert_with(|| tally.disrupt(None));
            }
            Ok(when)
        }
    }
}
