//! `sns chaos`: the deployment as separate hosts, a nemesis, and a checker of the history.
//!
//! A run builds one network namespace per process (`net`): the coordinator, every server
//! (`tsd`), every synchronizer and the load client, joined by veth pairs to a bridge; it starts
//! the real binaries in them (`processes`), each server's data directory on a tmpfs of its
//! own. The load client (`sns chaos-agent`, `agent`) drives the deployment through the client
//! library and records a history ([`history`]). For `--duration`, the nemesis (`nemesis`)
//! makes one fault after another, drawn from `--seed`: SIGKILL and restart, SIGSTOP longer
//! than the failure timeout then SIGCONT, a host cut off from all others, a master cut off
//! from its slave, the clients cut off from a cluster, packet loss, delays (where the kernel
//! has `tc netem`), a full disk, a synchronizer killed and restarted. Then everything is healed,
//! the load client settles and records the end state, and the checker ([`mod@check`]) judges the
//! history. Exit code 1 on any violation, naming the seed.
//!
//! Everything the run makes is removed at the end, on Ctrl-C, and (by the next run) after a
//! crash of the run itself.

mod agent;
pub mod check;
pub mod history;
mod nemesis;
mod net;
mod processes;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::time::Instant;

pub use agent::{AgentArgs, run as run_agent};
pub use check::{Findings, check};
pub use history::Event;

use crate::bench::{Rng, parse_duration};
use nemesis::{Made, World};
use processes::Proc;

/// Port of the coordinator on its host.
const COORDINATOR_PORT: u16 = 9090;
/// Port of every server on its host.
const SERVER_PORT: u16 = 10000;
/// Port of every synchronizer on its host (gRPC bus).
const SYNC_PORT: u16 = 9000;
/// Size of each server's tmpfs.
const DISK_MB: u32 = 64;
/// Heartbeat settings of the deployment (the binaries' defaults): a node is dead after
/// 2 missed beats of 500 ms.
const FAILURE_TIMEOUT: Duration = Duration::from_secs(1);
/// RabbitMQ's start script (Debian's `rabbitmq-server` on the PATH is a wrapper that switches
/// to the rabbitmq user).
const RABBITMQ_SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
/// How long the load client may take to set up its population.
const SETUP_LIMIT: Duration = Duration::from_secs(120);

/// `sns chaos`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ChaosArgs {
    /// How long faults are made (then everything is healed and the run settles).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Seed of the fault schedule and the load [default: drawn, and printed].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Clusters (master + slave each).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=9))]
    pub clusters: u32,
    /// How events travel between clusters: local (synchronizers read the other clusters'
    /// masters), grpc (synchronizers subscribe to each other) or amqp (through a RabbitMQ node
    /// the run starts on a host of its own; needs Debian's rabbitmq-server installed).
    #[arg(long, default_value = "local")]
    pub bus: String,
    /// Coordinators: 1 (routing kept in its memory), or 2 or 3, a group on an etcd member that is
    /// a host of the run too; a group's coordinators and etcd are faulted as well.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=3))]
    pub coordinators: u32,
    /// Posts per second, all users together.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub rate: u32,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Also write the history (one JSON event per line) to FILE.
    #[arg(long, value_name = "FILE")]
    pub history: Option<PathBuf>,
    /// Where the tsd, coordinator and synchronizer binaries are [default: next to this one].
    #[arg(long, value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Where the run keeps its files (`sns-chaos-<pid>/`: data, logs; kept when the run fails)
    /// [default: the system's temporary directory].
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// Only remove what earlier runs that died left behind (their processes, namespaces and
    /// mounts under the work directory), then exit. Every run does this first anyway.
    #[arg(long)]
    pub clean: bool,
}

/// What a run reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The seed that reproduces the schedule.
    pub seed: u64,
    /// Clusters.
    pub clusters: u32,
    /// The bus.
    pub bus: String,
    /// Hosts (network namespaces) the run made.
    pub hosts: usize,
    /// Faults made, by kind (every kind present).
    pub faults: BTreeMap<String, u64>,
    /// Coordinators (more than one: a group on etcd).
    pub coordinators: u32,
    /// Fault kinds this run could not draw, and why.
    pub not_drawn: BTreeMap<String, String>,
    /// Processes that ended on their own and were started again.
    pub restarts: BTreeMap<String, u32>,
    /// What the checker found.
    pub findings: Findings,
    /// Where the logs and the history are (kept when the run failed).
    pub kept: Option<PathBuf>,
}

impl Report {
    /// Whether the history passed every check.
    pub fn ok(&self) -> bool {
        self.findings.ok()
    }

    /// The report as a table.
    pub fn table(&self) -> String {
        let f = &self.findings;
        let mut out = String::new();
        let faults: Vec<String> = self
            .faults
            .iter()
            .filter(|(kind, _)| !self.not_drawn.contains_key(*kind))
            .map(|(kind, n)| format!("{kind} {n}"))
            .collect();
        let total: u64 = self.faults.values().sum();
        let mut row = |name: &str, value: String| {
            out.push_str(&format!("{name:<22} {value}\n"));
        };
        row("seed", self.seed.to_string());
        row(
            "hosts",
            format!(
                "{} ({} clusters × 2 servers, {} coordinator{}, bus {})",
                self.hosts,
                self.clusters,
                self.coordinators,
                if self.coordinators > 1 {
                    "s on etcd"
                } else {
                    ""
                },
                self.bus
            ),
        );
        row("faults", format!("{total}: {}", faults.join(", ")));
        let mut reasons: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (kind, why) in &self.not_drawn {
            reasons.entry(why).or_default().push(kind);
        }
        for (why, kinds) in reasons {
            row("not drawn", format!("{} ({why})", kinds.join(", ")));
        }
        let restarted: Vec<String> = self
            .restarts
            .iter()
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        row(
            "exited, restarted",
            if restarted.is_empty() {
                "none".to_string()
            } else {
                restarted.join(", ")
            },
        );
        row(
            "posts",
            format!("{} made, {} acknowledged", f.posts, f.stored),
        );
        row(
            "follows/unfollows",
            format!(
                "{} made, {} acknowledged",
                f.follow_calls, f.follows_acknowledged
            ),
        );
        row("deliveries", f.deliveries.to_string());
        row("role changes", f.role_changes.to_string());
        row("lost", f.count("lost").to_string());
        row("partial", f.count("partial").to_string());
        row("duplicates", f.count("duplicate").to_string());
        row("out of order", f.count("out_of_order").to_string());
        row("unexpected", f.count("unexpected").to_string());
        row("split brain", f.count("split_brain").to_string());
        row(
            "converged",
            if f.count("not_converged") == 0 && f.count("follows") == 0 {
                "yes".to_string()
            } else {
                format!(
                    "no ({} servers or lists, {} follows)",
                    f.count("not_converged"),
                    f.count("follows")
                )
            },
        );
        for detail in &f.details {
            out.push_str(&format!("  {detail}\n"));
        }
        for trouble in &f.trouble {
            out.push_str(&format!("  not judged: {trouble}\n"));
        }
        out.push_str(&if self.ok() {
            "result                 ok\n".to_string()
        } else {
            format!(
                "result                 VIOLATED — reproduce with --seed {}\n",
                self.seed
            )
        });
        if let Some(kept) = &self.kept {
            out.push_str(&format!("logs and history       {}\n", kept.display()));
        }
        out
    }
}

/// `sns chaos --clean`: removes what earlier runs that died left behind; returns how many runs
/// it cleaned up after.
pub fn clean(args: &ChaosArgs) -> Result<usize, String> {
    net::check_can_run()?;
    Ok(net::sweep(&work_parent(args)?))
}

fn work_parent(args: &ChaosArgs) -> Result<PathBuf, String> {
    let parent = match &args.work_dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir(),
    };
    std::fs::canonicalize(&parent).map_err(|e| format!("{}: {e}", parent.display()))
}

/// Runs `sns chaos`; progress goes to stderr. `Err` only when the run could not be made;
/// violations are in the outcome.
pub async fn run(args: ChaosArgs) -> Result<Report, String> {
    let bus = match args.bus.as_str() {
        "local" | "grpc" | "amqp" => args.bus.clone(),
        other if other.starts_with("amqp://") => {
            return Err(
                "--bus: sns chaos starts its own RabbitMQ node as one of its hosts (so it can be cut off and restarted); give --bus amqp, without a URL"
                    .to_string(),
            );
        }
        other => return Err(format!("--bus {other:?}: use local, grpc or amqp")),
    };
    if args.duration.is_zero() {
        return Err("--duration must be above 0".to_string());
    }
    net::check_can_run()?;
    let bins = binaries(args.bin_dir.as_deref())?;
    let parent = match &args.work_dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir(),
    };
    let parent =
        std::fs::canonicalize(&parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    let swept = net::sweep(&parent);
    if swept > 0 {
        eprintln!("sns chaos: removed what {swept} earlier run(s) left behind");
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64 % 1_000_000)
    });
    let dir = parent.join(format!("sns-chaos-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("logs")).map_err(|e| format!("{}: {e}", dir.display()))?;
    eprintln!(
        "sns chaos: seed {seed}, {} clusters, bus {bus}, faults for {:?}; files in {}",
        args.clusters,
        args.duration,
        dir.display()
    );

    let mut signals = crate::signals::ExitSignals::install();
    let mut world = build(&args, &bus, &bins, &dir)?;
    let hosts = world.procs.len() + 1;
    let result = tokio::select! {
        result = drive(&args, seed, &mut world, &bins.sns, &dir) => result,
        () = signals.recv() => Err(format!("interrupted; the logs are in {}", dir.display())),
    };
    let restarts = world.restarts.clone();
    let mut not_drawn = BTreeMap::new();
    if !world.net.has_netem() {
        not_drawn.insert(
            "delay".to_string(),
            "this kernel has no tc netem".to_string(),
        );
    }
    if !world.procs.contains_key("broker") {
        for kind in nemesis::BROKER_KINDS {
            not_drawn.insert(
                kind.to_string(),
                "no broker: --bus amqp adds one".to_string(),
            );
        }
    }
    if !world.group {
        for kind in nemesis::GROUP_KINDS {
            not_drawn.insert(
                kind.to_string(),
                "one coordinator: --coordinators 3 adds a group on etcd".to_string(),
            );
        }
    }
    for proc in world.procs.values_mut() {
        proc.kill();
    }
    world.procs.clear();
    world.net.tear_down();
    let (history, faults) = result?;
    let findings = check(&history);
    if let Some(path) = &args.history {
        write_history(path, &history)?;
    }
    let ok = findings.ok();
    let kept = if ok {
        let _ = std::fs::remove_dir_all(&dir);
        None
    } else {
        write_history(&dir.join("history.jsonl"), &history)?;
        Some(dir)
    };
    Ok(Report {
        seed,
        clusters: args.clusters,
        bus,
        hosts,
        faults,
        coordinators: args.coordinators,
        not_drawn,
        restarts,
        findings,
        kept,
    })
}

fn write_history(path: &Path, history: &[Event]) -> Result<(), String> {
    let mut text = String::new();
    for event in history {
        text.push_str(&serde_json::to_string(event).map_err(|e| e.to_string())?);
        text.push('\n');
    }
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The binaries a run starts.
struct Binaries {
    tsd: PathBuf,
    coordinator: PathBuf,
    synchronizer: PathBuf,
    sns: PathBuf,
}

fn binaries(dir: Option<&Path>) -> Result<Binaries, String> {
    let sns = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let dir = match dir {
        Some(dir) => dir.to_path_buf(),
        None => sns
            .parent()
            .map(Path::to_path_buf)
            .ok_or("cannot find this program's directory")?,
    };
    let find = |name: &str| {
        let path = dir.join(name);
        if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "no {name} in {}: build every binary (cargo build --release -p sns-bins) or give --bin-dir",
                dir.display()
            ))
        }
    };
    Ok(Binaries {
        tsd: find("tsd")?,
        coordinator: find("coordinator")?,
        synchronizer: find("synchronizer")?,
        sns,
    })
}

/// Makes the hosts and starts every process of the deployment.
fn build(args: &ChaosArgs, bus: &str, bins: &Binaries, dir: &Path) -> Result<World, String> {
    let token = crate::token::generate()?;
    let env = vec![(crate::token::TOKEN_VARIABLE.to_string(), token)];
    let logs = dir.join("logs");
    let mut net = net::Net::new(dir)?;
    let clusters = args.clusters;
    let servers = 2;
    let mut procs = BTreeMap::new();
    let mut disks = HashMap::new();
    let s = |v: &str| v.to_string();
    let group = args.coordinators > 1;
    let etcd_url = if group {
        let host = net.add_host("etcd")?;
        let ip = host.ip;
        let program = which("etcd").ok_or(
            "--coordinators 3 needs etcd on the PATH (Debian package etcd-server)".to_string(),
        )?;
        procs.insert(
            s("etcd"),
            Proc::new(
                &host,
                &program,
                vec![
                    s("--name"),
                    s("chaos"),
                    s("--data-dir"),
                    dir.join("etcd").display().to_string(),
                    s("--listen-client-urls"),
                    format!("http://{ip}:2379"),
                    s("--advertise-client-urls"),
                    format!("http://{ip}:2379"),
                    s("--listen-peer-urls"),
                    format!("http://{ip}:2380"),
                    s("--initial-advertise-peer-urls"),
                    format!("http://{ip}:2380"),
                    s("--initial-cluster"),
                    format!("chaos=http://{ip}:2380"),
                ],
                Vec::new(),
                &logs,
            ),
        );
        Some(format!("http://{ip}:2379"))
    } else {
        None
    };
    let bus_flag = if bus == "amqp" {
        let host = net.add_host("broker")?;
        let mut broker = broker(&host, dir, &logs)?;
        broker.whole_host = true;
        procs.insert(s("broker"), broker);
        format!("amqp://guest:guest@{}:5672/%2f", host.ip)
    } else {
        bus.to_string()
    };
    let mut coordinators = Vec::new();
    for n in 1..=args.coordinators {
        let name = if group {
            format!("coord{n}")
        } else {
            s("coord")
        };
        let host = net.add_host(&name)?;
        let ip = host.ip.to_string();
        coordinators.push(format!("{ip}:{COORDINATOR_PORT}"));
        let mut flags = vec![
            s("-p"),
            COORDINATOR_PORT.to_string(),
            s("--bind"),
            ip,
            s("-n"),
            clusters.to_string(),
            s("--servers"),
            servers.to_string(),
            s("--data-dir"),
            dir.join(&name).display().to_string(),
        ];
        if let Some(url) = &etcd_url {
            flags.extend([s("--etcd"), url.clone(), s("--name"), name.clone()]);
        }
        procs.insert(
            name.clone(),
            Proc::new(&host, &bins.coordinator, flags, env.clone(), &logs),
        );
    }
    let coordinators = coordinators.join(",");
    for c in 1..=clusters {
        for server in 1..=servers {
            let name = World::server(c, server);
            let host = net.add_host(&name)?;
            let disk = dir.join("disks").join(&name);
            net.mount_tmpfs(&disk, DISK_MB)?;
            disks.insert(name.clone(), disk.clone());
            let ip = host.ip.to_string();
            procs.insert(
                name,
                Proc::new(
                    &host,
                    &bins.tsd,
                    vec![
                        s("-p"),
                        SERVER_PORT.to_string(),
                        s("--bind"),
                        ip.clone(),
                        s("--advertise-host"),
                        ip,
                        s("-c"),
                        c.to_string(),
                        s("-s"),
                        server.to_string(),
                        s("--data-dir"),
                        disk.join("data").display().to_string(),
                        s("--coordinators"),
                        coordinators.clone(),
                        s("--clusters"),
                        clusters.to_string(),
                    ],
                    env.clone(),
                    &logs,
                ),
            );
        }
    }
    for c in 1..=clusters {
        let name = format!("sync{c}");
        let host = net.add_host(&name)?;
        let ip = host.ip.to_string();
        procs.insert(
            name.clone(),
            Proc::new(
                &host,
                &bins.synchronizer,
                vec![
                    s("--coordinators"),
                    coordinators.clone(),
                    s("-i"),
                    c.to_string(),
                    s("--clusters"),
                    clusters.to_string(),
                    s("--bus"),
                    bus_flag.clone(),
                    s("-p"),
                    SYNC_PORT.to_string(),
                    s("--bind"),
                    ip.clone(),
                    s("--advertise-host"),
                    ip,
                    s("--data-dir"),
                    dir.join(&name).display().to_string(),
                ],
                env.clone(),
                &logs,
            ),
        );
    }
    net.add_host("client")?;
    let mut world = World {
        net,
        procs,
        servers,
        disks,
        token_env: env,
        coordinators,
        group,
        restarts: BTreeMap::new(),
    };
    for proc in world.procs.values_mut() {
        proc.start()?;
    }
    Ok(world)
}

/// A RabbitMQ node of its own on `host`: its files under `dir/broker`, no plugins, the guest
/// user allowed from other hosts (only the run's hosts reach it).
fn broker(host: &net::Host, dir: &Path, logs: &Path) -> Result<Proc, String> {
    // Debian's `rabbitmq-server` on the PATH is a wrapper that switches to the rabbitmq user;
    // the script it runs takes its settings from the environment.
    let program = PathBuf::from(RABBITMQ_SERVER);
    if !program.is_file() {
        return Err(format!(
            "--bus amqp needs RabbitMQ installed (Debian package rabbitmq-server): no {RABBITMQ_SERVER}"
        ));
    }
    let home = dir.join("broker");
    std::fs::create_dir_all(&home).map_err(|e| format!("{}: {e}", home.display()))?;
    let write = |name: &str, text: &str| {
        std::fs::write(home.join(name), text).map_err(|e| format!("{name}: {e}"))
    };
    write(
        "rabbitmq.conf",
        "loopback_users = none\nlisteners.tcp.default = 5672\n",
    )?;
    write("enabled_plugins", "[].\n")?;
    let at = |name: &str| home.join(name).display().to_string();
    let env = vec![
        ("HOME".to_string(), at("")),
        (
            "RABBITMQ_NODENAME".to_string(),
            "rabbit@localhost".to_string(),
        ),
        ("RABBITMQ_MNESIA_BASE".to_string(), at("mnesia")),
        ("RABBITMQ_LOG_BASE".to_string(), at("log")),
        ("RABBITMQ_LOGS".to_string(), "-".to_string()),
        ("RABBITMQ_CONFIG_FILE".to_string(), at("rabbitmq.conf")),
        (
            "RABBITMQ_ENABLED_PLUGINS_FILE".to_string(),
            at("enabled_plugins"),
        ),
        ("RABBITMQ_PID_FILE".to_string(), at("pid")),
    ];
    Ok(Proc::new(host, &program, Vec::new(), env, logs))
}

/// `program`'s path if it is on the PATH.
fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}

/// Faults made, by kind.
type Faults = BTreeMap<String, u64>;

/// Starts the load client, makes the faults, heals, and collects the history.
async fn drive(
    args: &ChaosArgs,
    seed: u64,
    world: &mut World,
    sns: &Path,
    dir: &Path,
) -> Result<(Vec<Event>, Faults), String> {
    let client = world.net.host("client").cloned().ok_or("no client host")?;
    let log = std::fs::File::create(dir.join("logs").join("client.log"))
        .map_err(|e| format!("client log: {e}"))?;
    let mut agent = tokio::process::Command::new("ip")
        .args(["netns", "exec", &client.netns])
        .arg(sns)
        .args([
            "chaos-agent",
            "--coordinators",
            &world.coordinators,
            "--clusters",
            &args.clusters.to_string(),
            "--rate",
            &args.rate.to_string(),
            "--seed",
            &seed.to_string(),
        ])
        .envs(world.token_env.clone())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting the load client: {e}"))?;
    let start = Instant::now();
    let mut stdin = agent.stdin.take().ok_or("the load client's stdin")?;
    let stdout = agent.stdout.take().ok_or("the load client's stdout")?;
    let history = Arc::new(Mutex::new(Vec::<Event>::new()));
    let masters = Arc::new(Mutex::new(HashMap::<u32, u32>::new()));
    let (ready_tx, ready) = tokio::sync::oneshot::channel::<()>();
    let reader = tokio::spawn({
        let history = Arc::clone(&history);
        let masters = Arc::clone(&masters);
        async move {
            let mut ready_tx = Some(ready_tx);
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(event) = serde_json::from_str::<Event>(&line) else {
                    continue;
                };
                match &event {
                    Event::Population { .. } => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Event::Roles {
                        cluster,
                        master: Some(master),
                        ..
                    } => {
                        if let Ok(mut masters) = masters.lock() {
                            masters.insert(*cluster, *master);
                        }
                    }
                    Event::Trouble { what, .. } => eprintln!("sns chaos: load client: {what}"),
                    _ => {}
                }
                if let Ok(mut history) = history.lock() {
                    history.push(event);
                }
            }
        }
    });
    eprintln!("sns chaos: setting up the population");
    let ready = {
        // The supervisor works during setup too.
        let deadline = Instant::now() + SETUP_LIMIT;
        tokio::pin!(ready);
        loop {
            tokio::select! {
                done = &mut ready => break Ok(done),
                () = tokio::time::sleep(Duration::from_millis(500)) => {
                    world.restart_the_dead(None)?;
                    if Instant::now() > deadline {
                        break Err(());
                    }
                }
            }
        }
    };
    match ready {
        Ok(Ok(())) => {}
        Ok(Err(_)) => {
            let _ = reader.await;
            let trouble = history
                .lock()
                .ok()
                .and_then(|h| {
                    h.iter().find_map(|e| match e {
                        Event::Trouble { what, .. } => Some(what.clone()),
                        _ => None,
                    })
                })
                .unwrap_or_else(|| "it ended".to_string());
            return Err(format!(
                "the load client could not set up its population: {trouble} (logs in {})",
                dir.display()
            ));
        }
        Err(_) => {
            return Err(format!(
                "the load client did not set up its population within {SETUP_LIMIT:?} (logs in {})",
                dir.display()
            ));
        }
    }
    let mut rng = Rng::new(seed ^ 0x006e_656d_6573_6973);
    let mut faults: Faults = nemesis::KINDS.iter().map(|k| (k.to_string(), 0)).collect();
    let end = Instant::now()
        .checked_add(args.duration)
        .ok_or("--duration is too long")?;
    let record = |event: Event| {
        if let Ok(mut history) = history.lock() {
            history.push(event);
        }
    };
    while Instant::now() < end {
        let draw = nemesis::draw(
            &mut rng,
            args.clusters,
            FAILURE_TIMEOUT,
            world.net.has_netem(),
            world.group,
            world.procs.contains_key("broker"),
        );
        let known = masters.lock().map(|m| m.clone()).unwrap_or_default();
        let (made, target) = world.make(&draw, &known)?;
        *faults.entry(draw.kind.to_string()).or_default() += 1;
        let at = start.elapsed().as_millis() as u64;
        eprintln!(
            "sns chaos: {:>6.1} s  {:<12} {target}",
            at as f64 / 1000.0,
            draw.kind
        );
        record(Event::Fault {
            at,
            kind: draw.kind.to_string(),
            target,
        });
        world.supervise(draw.hold, &made).await?;
        world.heal(made)?;
        world.supervise(draw.gap, &Made::Nothing).await?;
    }
    world.restart_the_dead(None)?;
    record(Event::Healed {
        at: start.elapsed().as_millis() as u64,
    });
    eprintln!("sns chaos: healed; waiting for the deployment to settle");
    // A load client that already ended cannot hear it; what it recorded is judged anyway.
    let _ = stdin.write_all(b"heal\n").await;
    drop(stdin);
    // The supervisor keeps working while the load client settles.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        tokio::select! {
            _ = agent.wait() => break,
            () = tokio::time::sleep(Duration::from_millis(500)) => {
                world.restart_the_dead(None)?;
                if Instant::now() > deadline {
                    break;
                }
            }
        }
    }
    let _ = agent.kill().await;
    let _ = reader.await;
    let history = history.lock().map(|h| h.clone()).unwrap_or_default();
    Ok((history, faults))
}
