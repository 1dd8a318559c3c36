//! `mirroring`: what mirroring costs a durable commit (results in `docs/benchmarks.md`,
//! "Failover and mirroring").
//!
//! For each case, a fresh one-cluster `Deployment` in this process (coordinator and servers
//! over loopback TCP, or `--memory` pipes) with `FileStorage` in a temporary directory: a
//! master alone (`servers 1`), or a master and its mirroring slave (`servers 2`, measured only
//! once the slave is in sync, so every commit waits for the slave's fsync too). W writer tasks
//! call `Server::post` on the master in a loop, each as its own user; `post` returns once the
//! post is committed (durable locally and, with a slave, acknowledged durable by it). After a
//! warm-up, every call is timed for `--seconds`: posts per second and the latency
//! percentiles. With a slave, the run checks at the end that the slave is still counted and
//! holds every committed entry.
//!
//! ```sh
//! cargo run --release -p sns-benches --bin mirroring -- --seconds 5 --writers 1,16
//! ```

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use sns_benches::{POST_TEXT, user};
use sns_core::testing::eventually;
use sns_core::{
    ClusterId, Data, Deployment, DeploymentConfig, MemoryNetwork, Ports, Role, Server, ServerId,
    Transport,
};

/// Measure posts/s and commit latency with and without a mirroring slave.
#[derive(Debug, Parser)]
#[command(name = "mirroring")]
struct Args {
    /// Timed seconds per case.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Untimed seconds of posting before each case.
    #[arg(long, default_value_t = 1)]
    warm_up: u64,
    /// Numbers of concurrent writers, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    writers: Vec<u32>,
    /// Times each case is run (cases are interleaved).
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// In-memory pipes instead of loopback TCP.
    #[arg(long)]
    memory: bool,
}

type Failure = Box<dyn std::error::Error>;

/// How long the slave may take to be in sync, or to hold what was committed.
const PATIENCE: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = sns_benches::runtime();
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mirroring: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One measured case.
struct Outcome {
    posts: usize,
    elapsed: Duration,
    /// Sorted.
    latencies: Vec<Duration>,
}

impl Outcome {
    fn percentile(&self, p: f64) -> Duration {
        let last = self.latencies.len().saturating_sub(1);
        let at = ((last as f64) * p).round() as usize;
        self.latencies.get(at).copied().unwrap_or_default()
    }
}

async fn run(args: Args) -> Result<(), Failure> {
    println!(
        "mirroring: FileStorage, over {}, {} s per case after {} s warm-up",
        if args.memory {
            "in-memory pipes"
        } else {
            "loopback TCP"
        },
        args.seconds,
        args.warm_up
    );
    println!(
        "{:<8} {:>7} {:>8} {:>9} {:>8} {:>8} {:>8}",
        "servers", "writers", "posts", "posts/s", "p50 ms", "p99 ms", "max ms"
    );
    for _ in 0..args.repeat {
        for &writers in &args.writers {
            for servers in [1, 2] {
                let outcome = case(&args, servers, writers).await?;
                let ms = |d: Duration| d.as_secs_f64() * 1000.0;
                println!(
                    "{:<8} {:>7} {:>8} {:>9.0} {:>8.2} {:>8.2} {:>8.2}",
                    servers,
                    writers,
                    outcome.posts,
                    outcome.posts as f64 / outcome.elapsed.as_secs_f64(),
                    ms(outcome.percentile(0.5)),
                    ms(outcome.percentile(0.99)),
                    ms(outcome.latencies.last().copied().unwrap_or_default()),
                );
            }
        }
    }
    Ok(())
}

async fn case(args: &Args, servers: u32, writers: u32) -> Result<Outcome, Failure> {
    let dir = tempfile::tempdir()?;
    let mut config = DeploymentConfig::default();
    config.clusters = 1;
    config.servers_per_cluster = servers;
    config.transport = if args.memory {
        Transport::Memory(MemoryNetwork::new())
    } else {
        Transport::Tcp
    };
    config.ports = Ports::Auto;
    config.data = Data::Dir(dir.path().to_path_buf());
    let deployment = Deployment::start(config).await?;
    let result = measure(&deployment, args, servers, writers).await;
    deployment.shutdown().await;
    result
}

async fn measure(
    deployment: &Deployment,
    args: &Args,
    servers: u32,
    writers: u32,
) -> Result<Outcome, Failure> {
    deployment.wait_for_masters(PATIENCE).await?;
    let cluster = ClusterId::new(1).ok_or("cluster 1")?;
    let running: Vec<Server> = (1..=servers)
        .filter_map(ServerId::new)
        .filter_map(|s| deployment.server(cluster, s).cloned())
        .collect();
    let master = running
        .iter()
        .find(|s| s.role() == Role::Master)
        .ok_or("no master")?
        .clone();
    let slave = running.iter().find(|s| s.role() == Role::Slave).cloned();
    if slave.is_some() {
        let in_sync = eventually(PATIENCE, || {
            let counted = !master.positions().in_sync.is_empty();
            let known = deployment
                .coordinator()
                .table()
                .nodes(tokio::time::Instant::now())
                .iter()
                .any(|n| n.in_sync && n.alive);
            async move { counted && known }
        })
        .await;
        if !in_sync {
            return Err("the slave never became in sync".into());
        }
    }
    for id in 1..=writers {
        master.login(user(id)).await?;
    }
    post_for(&master, writers, Duration::from_secs(args.warm_up)).await?;
    let outcome = post_for(&master, writers, Duration::from_secs(args.seconds)).await?;
    if let Some(slave) = slave {
        let positions = master.positions();
        if positions.in_sync.is_empty() {
            return Err("the master stopped counting its slave during the run".into());
        }
        let commit = positions.commit;
        let holds = eventually(PATIENCE, || {
            let durable = slave.positions().durable;
            async move { durable >= commit }
        })
        .await;
        if !holds {
            return Err(format!("the slave lacks committed entries up to {commit}").into());
        }
    }
    Ok(outcome)
}

/// `writers` tasks post on `master` for `duration`, each as its own user.
async fn post_for(master: &Server, writers: u32, duration: Duration) -> Result<Outcome, Failure> {
    let start = Instant::now();
    let deadline = start + duration;
    let tasks: Vec<_> = (1..=writers)
        .map(|id| {
            let master = master.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let began = Instant::now();
                    master.post(user(id), POST_TEXT.as_bytes()).await?;
                    latencies.push(began.elapsed());
                }
                Ok::<_, sns_core::Error>(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = start.elapsed();
    latencies.sort();
    Ok(Outcome {
        posts: latencies.len(),
        elapsed,
        latencies,
    })
}
