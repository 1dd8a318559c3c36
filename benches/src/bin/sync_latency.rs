//! `sync_latency`: post → follower latency on the same cluster and across clusters, per
//! synchronizer transport (results in `docs/benchmarks.md`, "Cross-cluster sync").
//!
//! A fresh three-cluster `Deployment` in this process (coordinator, a master and a slave per
//! cluster, a synchronizer per cluster), on loopback TCP (or `--memory` pipes), with
//! `FileStorage` in a temporary directory: every post is durable and mirrored on its own
//! cluster, and every remote copy durable and mirrored on the follower's cluster, before it is
//! delivered. `--authors` users of cluster 2 post at a steady total `--rate` through their own
//! timeline streams (real gRPC clients); each author has one follower on each cluster, every
//! follower reading its timeline stream through a real client. A post's latency runs from just
//! before its client sends it to when a follower's client has received it. After a warm-up,
//! posts of the timed window are counted; the run then waits for every delivery and reports any
//! that never arrived.
//!
//! ```sh
//! cargo run --release -p sns-benches --bin sync_latency -- --bus local --rate 1000 --seconds 10
//! ```

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use sns_benches::user;
use sns_core::testing::eventually;
use sns_core::{
    Bus, Client, ClusterId, Data, Deployment, DeploymentConfig, MemoryNetwork, Ports, Role,
    ServerId, TimelineSender, TimelineStream, Transport,
};

/// Measure post → follower latency within and across clusters.
#[derive(Debug, Parser)]
#[command(name = "sync_latency")]
struct Args {
    /// The synchronizers' transport: `local`, `grpc` or a RabbitMQ URL (`amqp://...`; the run
    /// uses exchange and queues of its own, prefix `sns-bench-<pid>`, and deletes them).
    #[arg(long, default_value = "local", value_parser = parse_bus)]
    bus: Bus,
    /// Posts per second, all authors together.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Timed seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Untimed seconds of posting first.
    #[arg(long, default_value_t = 2)]
    warm_up: u64,
    /// Authors (users of cluster 2) sharing the rate.
    #[arg(long, default_value_t = 10)]
    authors: u32,
    /// In-memory pipes instead of loopback TCP.
    #[arg(long)]
    memory: bool,
}

fn parse_bus(text: &str) -> Result<Bus, String> {
    match text {
        "local" => Ok(Bus::Local),
        "grpc" => Ok(Bus::Grpc),
        url if url.starts_with("amqp://") => {
            let mut options = sns_core::AmqpOptions::new(url);
            options.prefix = format!("sns-bench-{}", std::process::id());
            options.validate().map_err(|e| e.to_string())?;
            Ok(Bus::Amqp(options))
        }
        other => Err(format!(
            "unknown bus {other:?}: use local, grpc or amqp://..."
        )),
    }
}

type Failure = Box<dyn std::error::Error>;

const PATIENCE: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = sns_benches::runtime();
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sync_latency: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Latencies of the deliveries of timed posts, by where the follower lives.
#[derive(Default)]
struct Samples {
    same: Vec<Duration>,
    cross: Vec<Duration>,
    /// Deliveries of any post (timed or not).
    received: u64,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let last = sorted.len().saturating_sub(1);
    sorted
        .get(((last as f64) * p).round() as usize)
        .copied()
        .unwrap_or_default()
}

async fn run(args: Args) -> Result<(), Failure> {
    if args.rate == 0 || args.authors == 0 {
        return Err("--rate and --authors must be at least 1".into());
    }
    let dir = tempfile::tempdir()?;
    let mut config = DeploymentConfig::default();
    config.clusters = 3;
    config.servers_per_cluster = 2;
    config.transport = if args.memory {
        Transport::Memory(MemoryNetwork::new())
    } else {
        Transport::Tcp
    };
    config.ports = Ports::Auto;
    config.data = Data::Dir(dir.path().to_path_buf());
    config.bus = args.bus.clone();
    let deployment = Deployment::start(config).await?;
    let result = measure(&deployment, &args).await;
    deployment.shutdown().await;
    if let Bus::Amqp(options) = &args.bus
        && let Err(e) = sns_core::sync::amqp::delete_topology(options, 3).await
    {
        eprintln!("sync_latency: could not delete the run's RabbitMQ queues: {e}");
    }
    result
}

async fn measure(deployment: &Deployment, args: &Args) -> Result<(), Failure> {
    deployment.wait_for_masters(PATIENCE).await?;
    let people = People::log_in(deployment, args).await?;
    people.follow(deployment).await?;

    let base = Instant::now();
    let samples = Arc::new(Mutex::new(Samples::default()));
    let from = Duration::from_secs(args.warm_up);
    let window = Window {
        from,
        until: from + Duration::from_secs(args.seconds),
    };
    let readers = people.read_timelines(base, window, &samples).await?;
    let mut senders = Vec::new();
    for client in &people.author_clients {
        senders.push(client.timeline().await?);
    }
    let posted = post(&senders, args.rate, base, window).await?;
    let expected = posted.sent * 3;
    let all_in = eventually(PATIENCE, || {
        let received = samples.lock().map_or(0, |s| s.received);
        async move { received >= expected }
    })
    .await;
    for reader in &readers {
        reader.abort();
    }
    let mut samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner()));
    samples.same.sort();
    samples.cross.sort();
    print_results(args, &posted, &samples, expected, all_in);
    if !all_in {
        return Err(format!("{} deliveries never arrived", expected - samples.received).into());
    }
    Ok(())
}

/// The timed window, since the run's base: the posts sent in it are timed.
#[derive(Debug, Clone, Copy)]
struct Window {
    from: Duration,
    until: Duration,
}

impl Window {
    fn holds(&self, at: Duration) -> bool {
        at >= self.from && at < self.until
    }
}

/// The authors and their followers, logged in.
struct People {
    /// The authors' user ids.
    authors: Vec<u32>,
    /// Each follower: its user id, the author it follows, and whether both are on one cluster.
    followers: Vec<(u32, u32, bool)>,
    author_clients: Vec<Client>,
    follower_clients: Vec<Client>,
}

impl People {
    /// Logs in every author and follower through the deployment's coordinator.
    async fn log_in(deployment: &Deployment, args: &Args) -> Result<Self, Failure> {
        let network = deployment.network().clone();
        let coordinator = deployment.coordinator_addr().to_string();
        let login = |id: u32| {
            let network = network.clone();
            let coordinator = coordinator.clone();
            async move { Client::login_via(&network, &coordinator, user(id)).await }
        };
        // Author k (0-based) is user 3k + 2 (cluster 2); its followers are users 3k + 1
        // (cluster 1), 3(k + authors) + 2 (cluster 2) and 3k + 3 (cluster 3).
        let authors: Vec<u32> = (0..args.authors).map(|k| 3 * k + 2).collect();
        let mut followers = Vec::new();
        for k in 0..args.authors {
            followers.push((3 * k + 1, 3 * k + 2, false));
            followers.push((3 * (k + args.authors) + 2, 3 * k + 2, true));
            followers.push((3 * k + 3, 3 * k + 2, false));
        }
        let mut author_clients = Vec::new();
        for id in &authors {
            author_clients.push(login(*id).await?);
        }
        let mut follower_clients = Vec::new();
        for (id, _, _) in &followers {
            follower_clients.push(login(*id).await?);
        }
        Ok(Self {
            authors,
            followers,
            author_clients,
            follower_clients,
        })
    }

    /// Once every cluster knows every user, has each follower follow its author, then waits
    /// until the authors' cluster knows every follower (before posts are timed).
    async fn follow(&self, deployment: &Deployment) -> Result<(), Failure> {
        let everyone = self.authors.len() + self.followers.len();
        let known = eventually(PATIENCE, || {
            let client = self.follower_clients[0].clone();
            async move {
                client
                    .list()
                    .await
                    .is_ok_and(|l| l.all_users.len() == everyone)
            }
        })
        .await;
        if !known {
            return Err("the clusters never learnt every user".into());
        }
        for ((_, author, _), client) in self.followers.iter().zip(&self.follower_clients) {
            client.follow(user(*author)).await?;
        }
        let two = ClusterId::new(2).ok_or("cluster 2")?;
        let followed = eventually(PATIENCE, || {
            let master = (1..=2)
                .filter_map(ServerId::new)
                .filter_map(|s| deployment.server(two, s))
                .find(|s| s.role() == Role::Master)
                .cloned();
            let authors = self.authors.clone();
            async move {
                master.is_some_and(|m| {
                    authors
                        .iter()
                        .all(|a| m.list(user(*a)).is_ok_and(|l| l.followers.len() == 3))
                })
            }
        })
        .await;
        if !followed {
            return Err("the authors' cluster never learnt every follower".into());
        }
        Ok(())
    }

    /// Opens every follower's timeline and reads it into `samples`: a delivery's latency runs
    /// from the time since `base` its post carries to when it arrived.
    async fn read_timelines(
        &self,
        base: Instant,
        window: Window,
        samples: &Arc<Mutex<Samples>>,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>, Failure> {
        let mut readers = Vec::new();
        for ((_, _, same), client) in self.followers.iter().zip(&self.follower_clients) {
            let (_keep_open, mut stream) = client.timeline().await?;
            let samples = Arc::clone(samples);
            let same = *same;
            readers.push(tokio::spawn(async move {
                let _keep_open = _keep_open;
                while let Some(Ok(post)) = stream.next().await {
                    let now = base.elapsed();
                    let Some(sent) = post
                        .text
                        .strip_prefix('t')
                        .and_then(|t| t.parse::<u64>().ok())
                        .map(Duration::from_nanos)
                    else {
                        continue;
                    };
                    let mut samples = samples.lock().unwrap_or_else(|p| p.into_inner());
                    samples.received += 1;
                    if window.holds(sent) {
                        let latency = now.saturating_sub(sent);
                        if same {
                            samples.same.push(latency);
                        } else {
                            samples.cross.push(latency);
                        }
                    }
                }
            }));
        }
        Ok(readers)
    }
}

/// What the posting loop did.
struct Posted {
    /// Posts sent.
    sent: u64,
    /// Posts sent in the timed window.
    timed: u64,
    /// How long posting took.
    posting: Duration,
}

/// One paced loop until the end of `window`: post n goes out at n / rate seconds, round robin
/// over the authors' `senders`, carrying the time since `base` it was sent at.
async fn post(
    senders: &[(TimelineSender, TimelineStream)],
    rate: u32,
    base: Instant,
    window: Window,
) -> Result<Posted, Failure> {
    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
    let mut sent = 0u64;
    let mut timed = 0u64;
    let started = Instant::now();
    loop {
        let due = period.mul_f64(sent as f64);
        let elapsed = started.elapsed();
        if elapsed >= window.until {
            break;
        }
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
        let (sender, _) = &senders[(sent % senders.len() as u64) as usize];
        let at = base.elapsed();
        sender.post(&format!("t{}", at.as_nanos())).await?;
        if window.holds(at) {
            timed += 1;
        }
        sent += 1;
    }
    Ok(Posted {
        sent,
        timed,
        posting: started.elapsed(),
    })
}

/// Prints the run's settings, what was posted and delivered, and the latencies.
fn print_results(args: &Args, posted: &Posted, samples: &Samples, expected: u64, all_in: bool) {
    let Posted {
        sent,
        timed,
        posting,
    } = posted;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "sync_latency: bus {:?}, {} in one process, FileStorage, 3 clusters x (master + slave)",
        args.bus,
        if args.memory { "pipes" } else { "loopback TCP" },
    );
    println!(
        "posted {sent} in {:.1} s ({:.0}/s); timed posts {timed}; deliveries {} of {expected}{}",
        posting.as_secs_f64(),
        *sent as f64 / posting.as_secs_f64(),
        samples.received,
        if all_in { "" } else { " (MISSING DELIVERIES)" }
    );
    println!(
        "{:<14} {:>8} {:>8} {:>8} {:>8}",
        "follower", "samples", "p50 ms", "p99 ms", "max ms"
    );
    for (name, list) in [
        ("same cluster", &samples.same),
        ("other cluster", &samples.cross),
    ] {
        println!(
            "{:<14} {:>8} {:>8.2} {:>8.2} {:>8.2}",
            name,
            list.len(),
            ms(percentile(list, 0.5)),
            ms(percentile(list, 0.99)),
            ms(list.last().copied().unwrap_or_default()),
        );
    }
}
