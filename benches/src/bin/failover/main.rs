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

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Parser;
use sns_core::client::CoordinatorClient;
use sns_core::session::Target;
use sns_core::{Client, Error, Network, RoutingConfig, Session, SessionConfig, UserId};
use sns_proto::csce438::NodeRole;
use sns_proto::sns_v1::admin_client::AdminClient;
use sns_proto::sns_v1::{NodeStatus, StatusRequest};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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

/// The processes of the deployment and how to restart them.
struct Deployment {
    bin_dir: PathBuf,
    root: PathBuf,
    interval: Duration,
    missed: u32,
    coordinator_port: u16,
    coordinator: Option<Child>,
    /// Server id, client port and process of each server (`None` while killed).
    servers: Vec<(u32, u16, Option<Child>)>,
}

impl Deployment {
    fn coordinator_addr(&self) -> String {
        format!("127.0.0.1:{}", self.coordinator_port)
    }

    fn heartbeat_args(&self) -> Vec<String> {
        vec![
            "--heartbeat-ms".to_string(),
            self.interval.as_millis().to_string(),
            "--missed-heartbeats".to_string(),
            self.missed.to_string(),
        ]
    }

    fn log(&self, name: &str) -> Result<File, Failure> {
        let path = self.root.join("logs").join(format!("{name}.log"));
        Ok(File::options().create(true).append(true).open(path)?)
    }

    fn start_coordinator(&mut self) -> Result<(), Failure> {
        let mut command = Command::new(self.bin_dir.join("coordinator"));
        // Run in the deployment's own directory, so a cluster token kept in the caller's
        // ./sns-data is not picked up (the bench's status calls carry none).
        command
            .current_dir(&self.root)
            .args(["-p", &self.coordinator_port.to_string()])
            .args(["--bind", "127.0.0.1", "--clusters", "1"])
            .args(self.heartbeat_args());
        self.coordinator = Some(spawn(command, self.log("coordinator")?)?);
        Ok(())
    }

    fn start_server(&mut self, server: u32) -> Result<(), Failure> {
        let index = self
            .servers
            .iter()
            .position(|(s, _, _)| *s == server)
            .ok_or("no such server")?;
        let port = self.servers[index].1;
        let mut command = Command::new(self.bin_dir.join("tsd"));
        command
            .current_dir(&self.root)
            .args(["-c", "1", "-s", &server.to_string(), "--clusters", "1"])
            .args(["-h", "127.0.0.1", "-k", &self.coordinator_port.to_string()])
            .args(["-p", &port.to_string(), "--bind", "127.0.0.1"])
            .args(self.heartbeat_args())
            .arg("--data-dir")
            .arg(self.root.join(format!("server{server}")));
        let child = spawn(command, self.log(&format!("tsd{server}"))?)?;
        self.servers[index].2 = Some(child);
        Ok(())
    }

    /// SIGKILLs `server` and waits until the process is gone.
    fn kill(&mut self, server: u32) -> Result<(), Failure> {
        let (_, _, child) = self
            .servers
            .iter_mut()
            .find(|(s, _, _)| *s == server)
            .ok_or("no such server")?;
        if let Some(mut child) = child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    fn addr_of(&self, server: u32) -> String {
        let port = self
            .servers
            .iter()
            .find(|(s, _, _)| *s == server)
            .map_or(0, |(_, port, _)| *port);
        format!("127.0.0.1:{port}")
    }

    /// The coordinator's view of the servers.
    async fn status(&self) -> Result<Vec<NodeStatus>, Failure> {
        let channel = Network::tcp().connect(&self.coordinator_addr()).await?;
        let reply = AdminClient::new(channel)
            .status(StatusRequest {})
            .await?
            .into_inner();
        Ok(reply.nodes)
    }

    /// Waits until a live master has a live, in-sync slave; returns (master, slave).
    async fn wait_for_mirrored_pair(&self) -> Result<(u32, u32), Failure> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(nodes) = self.status().await {
                let role = |r: NodeRole| {
                    nodes
                        .iter()
                        .find(|n| n.alive && n.node_role == i32::from(r))
                        .cloned()
                };
                // In sync: the master counts it, so it holds every committed entry (the writers
                // keep the logs moving, so their reported ends rarely match).
                if let (Some(master), Some(slave)) = (role(NodeRole::Master), role(NodeRole::Slave))
                    && slave.in_sync
                {
                    return Ok((master.server, slave.server));
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("no master with an in-sync slave after {PATIENCE:?}").into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for (_, _, child) in &mut self.servers {
            if let Some(child) = child {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if let Some(coordinator) = &mut self.coordinator {
            let _ = coordinator.kill();
            let _ = coordinator.wait();
        }
    }
}

fn spawn(mut command: Command, log: File) -> Result<Child, Failure> {
    let program = command.get_program().to_string_lossy().into_owned();
    command
        .env("RUST_LOG", "info")
        .env_remove("SNS_CLUSTER_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {program} (build it first?): {e}").into())
}

fn free_port() -> Result<u16, Failure> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A successful call: when it started and ended.
#[derive(Debug, Clone, Copy)]
struct Success {
    started: Instant,
    ended: Instant,
    /// The port of the server that answered.
    addr: u16,
}

/// What a writer reports while it runs.
struct Writer {
    name: &'static str,
    successes: mpsc::UnboundedReceiver<Success>,
    lost: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

/// The follow state a writer expects, and the check that acknowledged changes stay.
struct Expectation {
    following: Option<bool>,
    lost: Arc<AtomicU64>,
    /// Calls that ended in an error other than the two answers above (a bare client's call
    /// that met the dead master; a session's call when the session gave up).
    failed: Arc<AtomicU64>,
}

impl Expectation {
    /// The next change to make: `true` to follow.
    fn next_is_follow(&self) -> bool {
        self.following != Some(true)
    }

    /// Records the answer to a follow (`follow`) or unfollow; returns whether the server
    /// answered (rather than being lost).
    fn answered(&mut self, follow: bool, result: &sns_core::Result<()>) -> bool {
        let now = match result {
            Ok(()) => follow,
            Err(Error::AlreadyFollowing) => true,
            Err(Error::NotFollowing) => false,
            Err(_) => {
                // The change may or may not have been made.
                self.following = None;
                self.failed.fetch_add(1, Ordering::SeqCst);
                return false;
            }
        };
        // "Already following" after an acknowledged unfollow (or the reverse): lost.
        if result.is_err() && self.following == Some(!now) {
            self.lost.fetch_add(1, Ordering::SeqCst);
        }
        self.following = Some(now);
        true
    }
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

/// A bare client: on an error it asks the coordinator again after `retry`, and logs in anew.
async fn bare_writer(
    coordinator: CoordinatorClient,
    user: UserId,
    target: UserId,
    retry: Duration,
    report: mpsc::UnboundedSender<Success>,
    mut expect: Expectation,
    stop: CancellationToken,
) {
    let mut client: Option<Client> = None;
    while !stop.is_cancelled() {
        let started = Instant::now();
        let current = match &client {
            Some(client) => client.clone(),
            None => {
                let login = match coordinator.locate(user).await {
                    Ok(addr) => match Client::login(&Network::tcp(), &addr, user).await {
                        Err(Error::AlreadyLoggedIn(_)) => {
                            Client::attach(&Network::tcp(), &addr, user).await
                        }
                        other => other,
                    },
                    Err(e) => Err(e),
                };
                match login {
                    Ok(fresh) => {
                        client = Some(fresh.clone());
                        fresh
                    }
                    Err(_) => {
                        tokio::time::sleep(retry).await;
                        continue;
                    }
                }
            }
        };
        let follow = expect.next_is_follow();
        let result = if follow {
            current.follow(target).await
        } else {
            current.unfollow(target).await
        };
        if expect.answered(follow, &result) {
            let _ = report.send(Success {
                started,
                ended: Instant::now(),
                addr: port_of(current.addr()),
            });
        } else {
            client = None;
            tokio::time::sleep(retry).await;
        }
    }
}

/// A session with its default settings, as `tsc` has it.
async fn session_writer(
    session: Session,
    target: UserId,
    report: mpsc::UnboundedSender<Success>,
    mut expect: Expectation,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        let started = Instant::now();
        let follow = expect.next_is_follow();
        let result = if follow {
            session.follow(target).await
        } else {
            session.unfollow(target).await
        };
        if expect.answered(follow, &result) {
            let _ = report.send(Success {
                started,
                ended: Instant::now(),
                addr: port_of(&session.addr()),
            });
        }
    }
    let _ = session.logout().await;
    session.close().await;
}

/// The first success of `writer` that started at `dead` or later, on the server at `port`.
async fn first_success_after(
    writer: &mut Writer,
    dead: Instant,
    port: u16,
) -> Result<Success, Failure> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let next = tokio::time::timeout_at(deadline, writer.successes.recv())
            .await
            .map_err(|_| format!("{}: no successful call after {PATIENCE:?}", writer.name))?
            .ok_or_else(|| format!("{}: the writer stopped", writer.name))?;
        if next.started >= dead {
            if next.addr != port {
                return Err(format!(
                    "{}: first call after the kill served by port {}, not the promoted server's {port}",
                    writer.name, next.addr
                )
                .into());
            }
            return Ok(next);
        }
    }
}

/// Reads successes until `count` more started at `since` or later.
async fn successes_since(writer: &mut Writer, since: Instant, count: u32) -> Result<(), Failure> {
    let deadline = Instant::now() + PATIENCE;
    let mut seen = 0;
    while seen < count {
        let next = tokio::time::timeout_at(deadline, writer.successes.recv())
            .await
            .map_err(|_| format!("{}: stalled", writer.name))?
            .ok_or_else(|| format!("{}: the writer stopped", writer.name))?;
        if next.started >= since {
            seen += 1;
        }
    }
    Ok(())
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
    let bin_dir = match &args.bin_dir {
        // Absolute: the binaries run in the deployment's directory.
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
    let runs = args.runs;
    let keep = args.keep;
    let mut deployment = Deployment {
        bin_dir,
        root: temp.path().to_path_buf(),
        interval,
        missed,
        coordinator_port: free_port()?,
        coordinator: None,
        servers: vec![(1, free_port()?, None), (2, free_port()?, None)],
    };
    deployment.start_coordinator()?;
    deployment.start_server(1)?;
    deployment.start_server(2)?;
    deployment.wait_for_mirrored_pair().await?;

    let user = |id| UserId::new(id).ok_or("bad user id");
    // User 2 is the one followed; it only has to exist.
    Client::login_via(&Network::tcp(), &deployment.coordinator_addr(), user(2)?)
        .await?
        .logout()
        .await?;
    let stop = CancellationToken::new();
    let mut writers = Vec::new();
    for name in ["bare", "session"] {
        let (report, successes) = mpsc::unbounded_channel();
        let lost = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let expect = Expectation {
            following: None,
            lost: Arc::clone(&lost),
            failed: Arc::clone(&failed),
        };
        let task = if name == "bare" {
            let coordinator =
                CoordinatorClient::new(&Network::tcp(), &deployment.coordinator_addr())?;
            tokio::spawn(bare_writer(
                coordinator,
                user(1)?,
                user(2)?,
                retry,
                report,
                expect,
                stop.clone(),
            ))
        } else {
            let session = Session::connect(
                &Network::tcp(),
                Target::Coordinator(deployment.coordinator_addr()),
                user(3)?,
                SessionConfig::default(),
            )
            .await?;
            tokio::spawn(session_writer(
                session,
                user(2)?,
                report,
                expect,
                stop.clone(),
            ))
        };
        writers.push(Writer {
            name,
            successes,
            lost,
            failed,
            task,
        });
    }

    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x9e37_79b9_7f4a_7c15, |d| d.as_nanos() as u64)
        | 1;
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); writers.len()];
    for run in 1..=runs {
        let (master, slave) = deployment.wait_for_mirrored_pair().await?;
        let settled = Instant::now();
        for writer in &mut writers {
            successes_since(writer, settled, 20).await?;
        }
        // Kill at a random point of the heartbeat period.
        tokio::time::sleep(interval.mul_f64(fraction(&mut seed))).await;
        let killed_at = Instant::now();
        deployment.kill(master)?;
        let dead = Instant::now();
        let promoted = port_of(&deployment.addr_of(slave));
        let mut line = format!("run {run:>2}: killed server {master}");
        for (writer, times) in writers.iter_mut().zip(&mut times) {
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
        deployment.start_server(master)?;
    }
    deployment.wait_for_mirrored_pair().await?;
    stop.cancel();
    let mut lost = 0;
    let mut failed = Vec::new();
    for writer in writers {
        lost += writer.lost.load(Ordering::SeqCst);
        failed.push((writer.name, writer.failed.load(Ordering::SeqCst)));
        let mut successes = writer.successes;
        // Drain so the writer never blocks, then wait for it.
        successes.close();
        let _ = writer.task.await;
    }
    for (name, times) in ["bare", "session"].iter().zip(&mut times) {
        println!("{}", summary(name, times));
    }
    for (name, failed) in failed {
        println!("{name}: {failed} calls failed");
    }
    println!("acknowledged changes lost: {lost}");
    drop(deployment);
    if keep {
        println!("kept {}", temp.keep().display());
    }
    if lost > 0 {
        return Err(format!("{lost} acknowledged changes were lost").into());
    }
    Ok(())
}
