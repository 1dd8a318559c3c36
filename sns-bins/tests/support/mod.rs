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

/// How long any expected line or condition may take.
pub const WAIT: Duration = Duration::from_secs(30);

/// A port that was free a moment ago (bind to 0, read, release).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Lines of a child's stream, read on a thread so reads can time out.
pub struct Lines {
    rx: mpsc::Receiver<String>,
    name: String,
}

impl Lines {
    pub fn new(stream: impl std::io::Read + Send + 'static, name: &str) -> Self {
        let (tx, rx) = mpsc::channel();
        let label = name.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
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

    /// Every line already received, without waiting.
    pub fn drain(&self) -> Vec<String> {
        self.rx.try_iter().collect()
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
fn spawn_logged(
    program: &str,
    args: &[String],
    name: &str,
    ready: impl Fn(&str) -> bool,
) -> (Child, Lines) {
    let mut child = Command::new(program)
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("SNS_CLUSTER_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {name}: {e}"));
    let log = Lines::new(child.stderr.take().expect("stderr"), name);
    log.until(ready);
    (child, log)
}

fn strings(args: &[&str]) -> Vec<String> {
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

    fn args(self) -> Vec<String> {
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
        let mut args = strings(&[
            "-c",
            &cluster.to_string(),
            "-s",
            &server.to_string(),
            "-h",
            "127.0.0.1",
            "-k",
            &coordinator.to_string(),
            "-p",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ]);
        args.extend(heartbeat.args());
        args.push("--data-dir".to_string());
        args.push(dir.display().to_string());
        let name = format!("tsd {cluster}/{server}");
        let (child, log) =
            spawn_logged(env!("CARGO_BIN_EXE_tsd"), &args, &name, |l| match expect {
                Expect::Master => l.contains("role assigned") && l.contains("master"),
                Expect::Slave => l.contains("mirroring the master"),
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
        let mut args = strings(&["-p", &port.to_string(), "--bind", "127.0.0.1", "--data-dir"]);
        args.push(dir.display().to_string());
        let (child, log) = spawn_logged(env!("CARGO_BIN_EXE_tsd"), &args, "tsd", |l| {
            l.contains("serving clients")
        });
        Self {
            child,
            log,
            cluster: 1,
            server: 1,
            port,
        }
    }

    /// The address clients reach it at.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
        let mut args = strings(&[
            "-p",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--clusters",
            &clusters.to_string(),
        ]);
        args.extend(heartbeat.args());
        let (child, log) = spawn_logged(
            env!("CARGO_BIN_EXE_coordinator"),
            &args,
            "coordinator",
            |l| l.contains("coordinator serving"),
        );
        Self {
            child,
            log,
            port,
            heartbeat,
        }
    }

    /// The `sns.v1.Admin` status: every node as the coordinator sees it.
    pub fn status(&self) -> StatusReply {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let addr = format!("127.0.0.1:{}", self.port);
        runtime.block_on(async {
            let channel = sns_core::Network::tcp()
                .connect(&addr)
                .await
                .expect("reach the coordinator");
            AdminClient::new(channel)
                .status(StatusRequest {})
                .await
                .expect("admin status")
                .into_inner()
        })
    }

    /// Waits until the coordinator reports `tsd` alive in `role` and, for a slave, in sync with
    /// its master with nothing left to mirror; returns that node's status. Fails after [`WAIT`].
    pub fn wait_for_role(&self, tsd: &Tsd, role: NodeRole) -> NodeStatus {
        let mut last = None;
        let held = wait_until(|| {
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
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it holds, pausing a little longer each time (at most 100 ms), for at
/// most [`WAIT`]; returns whether it held.
pub fn wait_until(mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + WAIT;
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
        let mut child = Command::new(env!("CARGO_BIN_EXE_tsc"))
            .args(args)
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

    /// Closes stdin and waits for the exit code.
    pub fn finish(mut self) -> Option<i32> {
        self.stdin.take();
        self.child.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for Tsc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
