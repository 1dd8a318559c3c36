//! Running the real binaries as processes: start, drive through pipes, read lines with a
//! timeout, ask the coordinator for its status, kill.
//!
//! Every wait has a deadline ([`WAIT`], generous for a loaded 2-core machine). Every line a
//! child writes is also echoed on the test's stderr, which the test harness shows when the test
//! fails.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sns_proto::csce438::NodeRole;
use sns_proto::sns_v1::admin_client::AdminClient;
use sns_proto::sns_v1::{NodeStatus, StatusReply, StatusRequest};

pub mod group;

/// How long any expected line or condition may take.
pub const WAIT: Duration = Duration::from_secs(30);

/// The directory every process of this test binary runs in, unless its test says otherwise:
/// a deployment's directory, as an operator starts the separate processes from one. The first
/// coordinator keeps the cluster token in its `./sns-data/cluster-token`, where every `tsd`,
/// `synchronizer` and `sns status` started here finds it, and the source tree stays clean.
pub fn sandbox() -> &'static Path {
    static SANDBOX: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    SANDBOX.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("sns-e2e-")
            .tempdir()
            .expect("a temporary directory")
            .keep()
    })
}

/// The cluster token the sandbox's coordinators keep, once one was started.
pub fn sandbox_token() -> Option<String> {
    std::fs::read_to_string(sandbox().join("sns-data/cluster-token"))
        .ok()
        .map(|t| t.trim().to_string())
}

/// A port that was free a moment ago (bind to 0, read, release).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Lines of a child's stream, read on a thread so reads can time out. Bytes that are not UTF-8
/// (a terminal echoing them back, say) are shown as U+FFFD instead of ending the stream.
pub struct Lines {
    rx: mpsc::Receiver<String>,
    name: String,
}

impl Lines {
    pub fn new(stream: impl std::io::Read + Send + 'static, name: &str) -> Self {
        let (tx, rx) = mpsc::channel();
        let label = name.to_string();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut bytes = Vec::new();
            loop {
                bytes.clear();
                match reader.read_until(b'\n', &mut bytes) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let text = String::from_utf8_lossy(&bytes);
                let line = text.strip_suffix('\n').unwrap_or(&text);
                let line = line.strip_suffix('\r').unwrap_or(line).to_string();
                eprintln!("[{label}] {line}");
                // The reader may be gone; keep draining so the child never blocks on a full pipe.
                let _ = tx.send(line);
            }
        });
        Self {
            rx,
            name: name.to_string(),
        }
    }

    /// The next line, or a test failure after [`WAIT`].
    pub fn next(&self) -> String {
        self.rx
            .recv_timeout(WAIT)
            .unwrap_or_else(|e| panic!("{}: no line within {WAIT:?}: {e}", self.name))
    }

    /// The next line, or `None` once the stream ended; a test failure after [`WAIT`].
    pub fn next_or_end(&self) -> Option<String> {
        match self.rx.recv_timeout(WAIT) {
            Ok(line) => Some(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
            Err(e) => panic!("{}: no line within {WAIT:?}: {e}", self.name),
        }
    }

    /// Every line already received, without waiting.
    pub fn drain(&self) -> Vec<String> {
        self.rx.try_iter().collect()
    }

    /// Every line until the stream ends (the child closed it, e.g. by exiting); fails after
    /// [`WAIT`].
    pub fn to_end(&self) -> Vec<String> {
        let deadline = std::time::Instant::now() + WAIT;
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => lines.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => return lines,
                Err(e) => panic!("{}: the stream did not end: {e}", self.name),
            }
        }
    }

    /// Reads lines until one satisfies `matches`; fails after [`WAIT`].
    pub fn until(&self, matches: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) if matches(&line) => return line,
                Ok(_) => {}
                Err(e) => panic!("{}: expected line not seen: {e}", self.name),
            }
        }
    }
}

/// Starts a server-like binary with `args`, its stderr captured as log lines, and waits for a
/// log line that says it is ready.
pub fn spawn_logged(
    program: &str,
    args: &[String],
    name: &str,
    ready: impl Fn(&str) -> bool,
) -> (Child, Lines) {
    let (child, log, _) = spawn_logged_line(program, args, name, ready);
    (child, log)
}

/// [`spawn_logged`], also returning the log line that said it is ready.
fn spawn_logged_line(
    program: &str,
    args: &[String],
    name: &str,
    ready: impl Fn(&str) -> bool,
) -> (Child, Lines, String) {
    spawn_command(Command::new(program), args, name, ready)
}

/// [`spawn_logged_line`] through `command` (a program, or a wrapper that runs one).
fn spawn_command(
    command: Command,
    args: &[String],
    name: &str,
    ready: impl Fn(&str) -> bool,
) -> (Child, Lines, String) {
    let (child, log) = spawn_unwaited(command, args, name);
    let line = log.until(ready);
    (child, log, line)
}

/// Starts `command` with `args` (info logging, no token from the environment) and reads its
/// log, without waiting for anything: for a process expected to stop on its own.
pub fn spawn_unwaited(mut command: Command, args: &[String], name: &str) -> (Child, Lines) {
    if command.get_current_dir().is_none() {
        command.current_dir(sandbox());
    }
    let mut child = command
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("SNS_CLUSTER_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {name}: {e}"));
    let log = Lines::new(child.stderr.take().expect("stderr"), name);
    (child, log)
}

/// Waits (at most [`WAIT`]) for `child` to exit; returns its exit code.
pub fn exit_code(child: &mut Child) -> Option<i32> {
    let mut status = None;
    let exited = eventually(WAIT, || {
        status = child.try_wait().expect("wait");
        status.is_some()
    });
    assert!(exited, "the process did not exit within {WAIT:?}");
    status.and_then(|s| s.code())
}

pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// A running `tsd`.
pub struct Tsd {
    child: Child,
    pub log: Lines,
    /// Its cluster, server id and client port.
    pub cluster: u32,
    pub server: u32,
    pub port: u16,
}

/// Heartbeat settings of a deployment of processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    pub interval_ms: u64,
    pub missed: u32,
}

impl Heartbeat {
    /// The settings of the tests that only need a server up quickly.
    pub const QUICK: Self = Self {
        interval_ms: 200,
        missed: 2,
    };
    /// The settings of the failover tests: a failover within about 1.5 s, yet a master is
    /// declared dead only after 1.2 s without a heartbeat, which a loaded machine does not
    /// cause by accident.
    pub const FAILOVER: Self = Self {
        interval_ms: 300,
        missed: 4,
    };

    pub fn args(self) -> Vec<String> {
        strings(&[
            "--heartbeat-ms",
            &self.interval_ms.to_string(),
            "--missed-heartbeats",
            &self.missed.to_string(),
        ])
    }
}

/// The role a starting `tsd` is expected to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Named master by the coordinator.
    Master,
    /// A slave mirroring its master.
    Slave,
    /// Serving, whatever its role (not waited for).
    Serving,
}

impl Tsd {
    /// Starts `tsd` as server `server` of cluster `cluster`, joined to the coordinator on
    /// `coordinator` (with [`Heartbeat::QUICK`]), and waits until the coordinator made it master.
    pub fn join(cluster: u32, server: u32, coordinator: u16, port: u16, dir: &Path) -> Self {
        Self::launch(
            cluster,
            server,
            coordinator,
            Heartbeat::QUICK,
            port,
            dir,
            Expect::Master,
        )
    }

    /// Starts `tsd` as server `server` of cluster `cluster` on `port`, with data in `dir`,
    /// joined to `coordinator` with its heartbeat settings, and waits until it is master or
    /// mirrors a master, as `expect` says.
    pub fn joined(
        coordinator: &Coordinator,
        cluster: u32,
        server: u32,
        port: u16,
        dir: &Path,
        expect: Expect,
    ) -> Self {
        Self::launch(
            cluster,
            server,
            coordinator.port,
            coordinator.heartbeat,
            port,
            dir,
            expect,
        )
    }

    fn launch(
        cluster: u32,
        server: u32,
        coordinator: u16,
        heartbeat: Heartbeat,
        port: u16,
        dir: &Path,
        expect: Expect,
    ) -> Self {
        let coordinator = strings(&["-h", "127.0.0.1", "-k", &coordinator.to_string()]);
        Self::launch_to(coordinator, cluster, server, heartbeat, port, dir, expect)
    }

    /// Starts `tsd` as server `server` of cluster `cluster` (of `clusters`) on `port`, joined
    /// to every coordinator of a group (their ports), with data in `dir`; waits as `expect`
    /// says.
    pub fn in_group(
        coordinators: &[u16],
        heartbeat: Heartbeat,
        (clusters, cluster, server): (u32, u32, u32),
        port: u16,
        dir: &Path,
        expect: Expect,
    ) -> Self {
        let group: Vec<String> = coordinators
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let coordinator = strings(&[
            "--coordinators",
            &group.join(","),
            "--clusters",
            &clusters.to_string(),
        ]);
        Self::launch_to(coordinator, cluster, server, heartbeat, port, dir, expect)
    }

    fn launch_to(
        coordinator: Vec<String>,
        cluster: u32,
        server: u32,
        heartbeat: Heartbeat,
        port: u16,
        dir: &Path,
        expect: Expect,
    ) -> Self {
        let mut args = strings(&["-c", &cluster.to_string(), "-s", &server.to_string()]);
        args.extend(coordinator);
        args.extend(strings(&["-p", &port.to_string(), "--bind", "127.0.0.1"]));
        args.extend(heartbeat.args());
        args.push("--data-dir".to_string());
        args.push(dir.display().to_string());
        let name = format!("tsd {cluster}/{server}");
        let (child, log) =
            spawn_logged(env!("CARGO_BIN_EXE_tsd"), &args, &name, |l| match expect {
                Expect::Master => l.contains("role assigned") && l.contains("master"),
                Expect::Slave => l.contains("mirroring the master"),
                Expect::Serving => l.contains("serving clients"),
            });
        Self {
            child,
            log,
            cluster,
            server,
            port,
        }
    }

    /// Starts `tsd` on `port` with data in `dir`, and waits until it serves.
    pub fn start(port: u16, dir: &Path) -> Self {
        Self::start_with(port, dir, &[], |l| l.contains("serving clients")).0
    }

    /// Starts `tsd` on `port` with data in `dir` and the `extra` arguments, and waits for a
    /// log line that satisfies `ready`, which it returns (later lines are in `log`).
    pub fn start_with(
        port: u16,
        dir: &Path,
        extra: &[&str],
        ready: impl Fn(&str) -> bool,
    ) -> (Self, String) {
        Self::start_command(
            Command::new(env!("CARGO_BIN_EXE_tsd")),
            port,
            dir,
            extra,
            ready,
        )
    }

    /// [`Tsd::start_with`] through `command`: a wrapper such as `prlimit` (given `tsd` and any
    /// arguments of its own), or `tsd` itself.
    pub fn start_command(
        command: Command,
        port: u16,
        dir: &Path,
        extra: &[&str],
        ready: impl Fn(&str) -> bool,
    ) -> (Self, String) {
        let mut args = strings(&["-p", &port.to_string(), "--bind", "127.0.0.1", "--data-dir"]);
        args.push(dir.display().to_string());
        args.extend(strings(extra));
        let (child, log, line) = spawn_command(command, &args, "tsd", ready);
        let tsd = Self {
            child,
            log,
            cluster: 1,
            server: 1,
            port,
        };
        (tsd, line)
    }

    /// The address clients reach it at.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        reap(&mut self.child);
    }
}

impl Drop for Tsd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running `coordinator`.
pub struct Coordinator {
    child: Child,
    pub log: Lines,
    pub port: u16,
    /// The number of clusters it routes.
    pub clusters: u32,
    /// The heartbeat settings it runs with (servers joining it use the same).
    pub heartbeat: Heartbeat,
}

impl Coordinator {
    /// Starts a coordinator for `clusters` clusters with [`Heartbeat::QUICK`] and waits until
    /// it serves.
    pub fn start(clusters: u32) -> Self {
        Self::start_with(clusters, Heartbeat::QUICK)
    }

    /// Starts a coordinator for `clusters` clusters with `heartbeat` and waits until it serves.
    pub fn start_with(clusters: u32, heartbeat: Heartbeat) -> Self {
        let port = free_port();
        let (child, log) =
            spawn_coordinator(&coordinator_args(port, clusters, heartbeat), "coordinator");
        Self {
            child,
            log,
            port,
            clusters,
            heartbeat,
        }
    }

    /// The `sns.v1.Admin` status: every node as the coordinator sees it.
    pub fn status(&self) -> StatusReply {
        status_at(self.port).expect("admin status")
    }

    /// Waits until the coordinator reports `tsd` alive in `role` and, for a slave, in sync with
    /// its master with nothing left to mirror; returns that node's status. Fails after [`WAIT`].
    pub fn wait_for_role(&self, tsd: &Tsd, role: NodeRole) -> NodeStatus {
        let mut last = None;
        let held = eventually(WAIT, || {
            let reply = self.status();
            let master_durable = reply
                .nodes
                .iter()
                .find(|n| n.cluster == tsd.cluster && n.node_role == i32::from(NodeRole::Master))
                .map(|n| n.durable_index);
            let node = reply
                .nodes
                .into_iter()
                .find(|n| n.cluster == tsd.cluster && n.server == tsd.server);
            let ok = node.as_ref().is_some_and(|n| {
                n.alive
                    && n.node_role == i32::from(role)
                    && (role != NodeRole::Slave
                        || (n.in_sync && master_durable == Some(n.durable_index)))
            });
            last = node;
            ok
        });
        assert!(
            held,
            "server {}/{} is not {role:?} (and in sync) after {WAIT:?}: {last:?}",
            tsd.cluster, tsd.server
        );
        last.expect("seen")
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        reap(&mut self.child);
    }
}

/// The arguments of a coordinator on `port` for `clusters` clusters with `heartbeat`.
pub fn coordinator_args(port: u16, clusters: u32, heartbeat: Heartbeat) -> Vec<String> {
    let mut args = strings(&[
        "-p",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--clusters",
        &clusters.to_string(),
    ]);
    args.extend(heartbeat.args());
    args
}

/// Starts `coordinator` with `args` and waits until it serves.
pub fn spawn_coordinator(args: &[String], name: &str) -> (Child, Lines) {
    spawn_logged(env!("CARGO_BIN_EXE_coordinator"), args, name, |l| {
        l.contains("coordinator serving")
    })
}

/// SIGKILL, and wait for the process to be gone.
pub fn reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The `sns.v1.Admin` status of the coordinator on `port`, with the sandbox's token.
pub fn status_at(port: u16) -> Result<StatusReply, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let addr = format!("127.0.0.1:{port}");
    runtime.block_on(async {
        let channel = sns_core::Network::tcp()
            .connect(&addr)
            .await
            .map_err(|e| e.to_string())?;
        let mut request = tonic::Request::new(StatusRequest {});
        if let Some(token) = sandbox_token() {
            request.metadata_mut().insert(
                "sns-cluster-token",
                token.parse().expect("a token is printable ASCII"),
            );
        }
        AdminClient::new(channel)
            .status(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|e| e.to_string())
    })
}

/// Three clusters on `coordinator`, each a master (server 1) and its slave (server 2) with data
/// directories under `data`; returns (masters, slaves) once every slave mirrors its master.
pub fn three_clusters(coordinator: &Coordinator, data: &Path) -> (Vec<Tsd>, Vec<Tsd>) {
    let mut masters = Vec::new();
    let mut slaves = Vec::new();
    for cluster in 1..=3 {
        let dir = |s: u32| data.join(format!("cluster{cluster}/server{s}"));
        masters.push(Tsd::joined(
            coordinator,
            cluster,
            1,
            free_port(),
            &dir(1),
            Expect::Master,
        ));
        slaves.push(Tsd::joined(
            coordinator,
            cluster,
            2,
            free_port(),
            &dir(2),
            Expect::Slave,
        ));
    }
    for slave in &slaves {
        coordinator.wait_for_role(slave, NodeRole::Slave);
    }
    (masters, slaves)
}

/// Polls `check` until it holds, pausing a little longer each time (at most 100 ms), for at
/// most `timeout` (usually [`WAIT`]); returns whether it held. The blocking counterpart of
/// `sns_core::testing::eventually`, for tests that drive processes from plain threads.
pub fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Runs a command to completion with stdin closed; returns (exit code, stdout, stderr).
pub fn run(program: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let output = Command::new(program)
        .args(args)
        .current_dir(sandbox())
        .stdin(Stdio::null())
        .output()
        .expect("run");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A running `tsc` driven through pipes.
pub struct Tsc {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines,
    /// What it prints on stderr: notices about reconnects, and errors.
    pub notices: Lines,
}

impl Tsc {
    /// Starts `tsc` for `user` against a server on `port`.
    pub fn start(port: u16, user: u32) -> Self {
        Self::spawn(&[
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-u",
            &user.to_string(),
        ])
    }

    /// Starts `tsc` for `user`, routed by the coordinator on `coordinator`.
    pub fn via(coordinator: u16, user: u32) -> Self {
        Self::spawn(&[
            "-h",
            "127.0.0.1",
            "-k",
            &coordinator.to_string(),
            "-u",
            &user.to_string(),
        ])
    }

    /// Starts `tsc` with the given arguments.
    pub fn spawn(args: &[&str]) -> Self {
        Self::spawn_with_env(args, &[])
    }

    /// Starts `tsc` with the given arguments and environment variables.
    pub fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tsc"))
            .args(args)
            .current_dir(sandbox())
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tsc");
        let stdin = child.stdin.take();
        let stdout = Lines::new(child.stdout.take().expect("stdout"), "tsc");
        let notices = Lines::new(child.stderr.take().expect("stderr"), "tsc stderr");
        Self {
            child,
            stdin,
            stdout,
            notices,
        }
    }

    /// Types a line.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write to tsc");
        stdin.flush().expect("flush");
    }

    /// Types a line if `tsc` still reads its input; says whether it did.
    pub fn try_send(&mut self, line: &str) -> bool {
        let Some(stdin) = self.stdin.as_mut() else {
            return false;
        };
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .is_ok()
    }

    /// The reconnect notices printed and not yet read.
    pub fn reconnects(&self) -> Vec<String> {
        self.notices
            .drain()
            .into_iter()
            .filter(|l| l.contains("reconnect") || l.contains("server lost"))
            .collect()
    }

    /// Sends `signal` (`TERM`, `HUP`, `INT`) and waits for the exit code.
    pub fn signal_and_wait(&mut self, signal: &str) -> Option<i32> {
        send_signal(&self.child, signal);
        self.child.wait().ok().and_then(|s| s.code())
    }

    /// Types raw bytes (e.g. a line that is not UTF-8); nothing is added.
    pub fn send_bytes(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(bytes).expect("write to tsc");
        stdin.flush().expect("flush");
    }

    /// The next output line.
    pub fn next_line(&self) -> String {
        self.stdout.next()
    }

    /// Asserts the next output line.
    pub fn expect_line(&self, expected: &str) {
        assert_eq!(self.next_line(), expected);
    }

    /// Types `LIST`, asserts that it succeeded, and returns the users of the two lines it
    /// prints: all users, and the followers.
    pub fn list(&mut self) -> (Vec<u32>, Vec<u32>) {
        self.send("LIST");
        self.expect_line("Command completed successfully");
        let users = |line: String, label: &str| -> Vec<u32> {
            let rest = line
                .strip_prefix(label)
                .unwrap_or_else(|| panic!("expected {label:?}..., got {line:?}"));
            rest.split(", ")
                .filter(|u| !u.is_empty())
                .map(|u| u.parse().unwrap_or_else(|_| panic!("bad user in {line:?}")))
                .collect()
        };
        let all = users(self.next_line(), "All users: ");
        let followers = users(self.next_line(), "Followers: ");
        (all, followers)
    }

    /// Every output line already printed and not yet read, without waiting.
    pub fn drain_lines(&self) -> Vec<String> {
        self.stdout.drain()
    }

    /// Types `FOLLOW user` and asserts that it succeeded.
    pub fn follow(&mut self, user: u32) {
        self.send(&format!("FOLLOW {user}"));
        self.expect_line("Command completed successfully");
    }

    /// Types `TIMELINE` and asserts the two lines that confirm timeline mode.
    pub fn enter_timeline(&mut self) {
        self.send("TIMELINE");
        self.expect_line("Command completed successfully");
        self.expect_line("Now you are in the timeline");
    }

    /// Asserts the course banner.
    pub fn expect_banner(&self) {
        for line in sns_bins::cli::BANNER.lines() {
            self.expect_line(line);
        }
    }

    /// Types `input` (any number of lines) from a thread of its own, then closes stdin: the
    /// input may be far larger than the pipe holds.
    pub fn type_all_and_close(&mut self, input: Vec<u8>) -> std::thread::JoinHandle<()> {
        let mut stdin = self.stdin.take().expect("stdin open");
        std::thread::spawn(move || {
            stdin.write_all(&input).expect("write to tsc");
        })
    }

    /// Waits for the exit code (stdin must be closed, or the input end the client).
    pub fn wait_for_exit(&mut self) -> Option<i32> {
        self.stdin.take();
        self.child.wait().ok().and_then(|s| s.code())
    }

    /// Closes stdin and waits for the exit code.
    pub fn finish(mut self) -> Option<i32> {
        self.stdin.take();
        self.child.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for Tsc {
    fn drop(&mut self) {
        reap(&mut self.child);
    }
}

/// A running `synchronizer`.
pub struct Synchronizer {
    child: Child,
    pub log: Lines,
    /// Its id (it serves cluster `((id - 1) % N) + 1`), the port of its Sync service and the
    /// `--bus` it was given.
    pub id: u32,
    pub port: u16,
    pub bus: String,
    /// The log line in which it said what it serves.
    pub serving: String,
}

impl Synchronizer {
    /// Starts `synchronizer -i id -p port --bus bus` against `coordinator` (its cluster count
    /// and heartbeat interval), and waits until it serves and, on the gRPC bus, until it
    /// registered with the coordinator.
    pub fn start(coordinator: &Coordinator, id: u32, port: u16, bus: &str) -> Self {
        let mut args = strings(&[
            "-h",
            "127.0.0.1",
            "-k",
            &coordinator.port.to_string(),
            "-p",
            &port.to_string(),
            "-i",
            &id.to_string(),
            "--clusters",
            &coordinator.clusters.to_string(),
            "--bus",
            bus,
            "--bind",
            "127.0.0.1",
            "--heartbeat-ms",
            &coordinator.heartbeat.interval_ms.to_string(),
        ]);
        args.extend(SYNCHRONIZER_ARGS.with(|extra| extra.borrow().clone()));
        let name = format!("synchronizer {id}");
        let grpc = bus == "grpc";
        let (child, log, serving) =
            spawn_logged_line(env!("CARGO_BIN_EXE_synchronizer"), &args, &name, |l| {
                l.contains("synchronizer serving")
            });
        if grpc {
            log.until(|l| l.contains("registered with the coordinator"));
        }
        Self {
            child,
            log,
            id,
            port,
            bus: bus.to_string(),
            serving,
        }
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        reap(&mut self.child);
    }

    /// Sends `signal` (`INT`, `TERM`) and waits for the exit code.
    pub fn signal_and_wait(&mut self, signal: &str) -> Option<i32> {
        send_signal(&self.child, signal);
        self.child.wait().ok().and_then(|s| s.code())
    }
}

thread_local! {
    /// More arguments for every synchronizer this test thread starts (see
    /// [`more_synchronizer_args`]).
    static SYNCHRONIZER_ARGS: std::cell::RefCell<Vec<String>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Gives every synchronizer the calling test starts these arguments too (e.g. a RabbitMQ
/// prefix of its own). Tests run on threads of their own, so this is per test.
pub fn more_synchronizer_args(args: &[&str]) {
    SYNCHRONIZER_ARGS.with(|extra| *extra.borrow_mut() = strings(args));
}

impl Drop for Synchronizer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends `signal` (`INT`, `TERM`) to `child`.
pub fn send_signal(child: &Child, signal: &str) {
    let sent = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -{signal} failed");
}

/// A post as a client prints it, exactly the course's line: `<author> (<Www Mmm dd hh:mm:ss
/// yyyy>) >> <text>`, with a well-formed time and nothing after the year; `None` for any other
/// line.
pub fn parse_post(line: &str) -> Option<(u32, String)> {
    let (author, rest) = line.split_once(" (")?;
    let author = author.parse().ok()?;
    let (time, text) = rest.split_once(") >> ")?;
    is_course_time(time).then(|| (author, text.to_string()))
}

/// Whether `time` reads like `Mon Jan  5 09:03:07 2026` (`ctime`'s format, day padded with a
/// space or a zero).
fn is_course_time(time: &str) -> bool {
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let b = time.as_bytes();
    let digits = |range: std::ops::Range<usize>| b[range].iter().all(u8::is_ascii_digit);
    b.len() == 24
        && DAYS.contains(&&time[0..3])
        && b[3] == b' '
        && MONTHS.contains(&&time[4..7])
        && b[7] == b' '
        && (b[8] == b' ' || b[8].is_ascii_digit())
        && b[9].is_ascii_digit()
        && b[10] == b' '
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b' '
        && digits(20..24)
}

/// A running `sns up`, with what it printed before "Press Ctrl-C to stop.".
pub struct SnsUp {
    child: Child,
    /// The coordinator's port.
    pub port: u16,
    /// Every line printed up to and including "Press Ctrl-C to stop.".
    pub printed: Vec<String>,
    _stdout: Lines,
}

impl SnsUp {
    /// Starts `sns up --ports auto` with data under `dir`, [`Heartbeat::QUICK`] and `extra`
    /// arguments, and reads what it prints until it says it is up.
    pub fn start(dir: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sns"))
            .args([
                "up",
                "--ports",
                "auto",
                "--heartbeat-ms",
                &Heartbeat::QUICK.interval_ms.to_string(),
            ])
            .arg("--data-dir")
            .arg(dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .env_remove("SNS_CLUSTER_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sns up");
        let stdout = Lines::new(child.stdout.take().expect("stdout"), "sns up");
        // Its log, echoed on the test's stderr.
        let _log = Lines::new(child.stderr.take().expect("stderr"), "sns up log");
        let mut printed = Vec::new();
        loop {
            let line = stdout.next();
            let done = line == "Press Ctrl-C to stop.";
            printed.push(line);
            if done {
                break;
            }
        }
        let port = printed[0]
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no coordinator port in {:?}", printed[0]));
        Self {
            child,
            port,
            printed,
            _stdout: stdout,
        }
    }

    /// Sends `signal` (`INT`, `TERM`) and waits for the exit code.
    pub fn signal_and_wait(&mut self, signal: &str) -> Option<i32> {
        send_signal(&self.child, signal);
        self.child.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for SnsUp {
    fn drop(&mut self) {
        reap(&mut self.child);
    }
}
