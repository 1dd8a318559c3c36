//! Running the real binaries as processes: start, drive through pipes, read lines with a
//! timeout, kill.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long any expected line may take.
pub const WAIT: Duration = Duration::from_secs(15);

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
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
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
}

/// Heartbeat interval used by the process tests, in milliseconds.
pub const HEARTBEAT_MS: &str = "200";

impl Tsd {
    /// Starts `tsd` as server `server` of cluster `cluster`, joined to the coordinator on
    /// `coordinator`, and waits until the coordinator made it master.
    pub fn join(cluster: u32, server: u32, coordinator: u16, port: u16, dir: &Path) -> Self {
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
            "--heartbeat-ms",
            HEARTBEAT_MS,
            "--data-dir",
        ]);
        args.push(dir.display().to_string());
        let (child, log) = spawn_logged(env!("CARGO_BIN_EXE_tsd"), &args, "tsd", |l| {
            l.contains("role assigned") && l.contains("master")
        });
        Self { child, log }
    }

    /// Starts `tsd` on `port` with data in `dir`, and waits until it serves.
    pub fn start(port: u16, dir: &Path) -> Self {
        let mut args = strings(&["-p", &port.to_string(), "--bind", "127.0.0.1", "--data-dir"]);
        args.push(dir.display().to_string());
        let (child, log) = spawn_logged(env!("CARGO_BIN_EXE_tsd"), &args, "tsd", |l| {
            l.contains("serving clients")
        });
        Self { child, log }
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
}

impl Coordinator {
    /// Starts a coordinator for `clusters` clusters and waits until it serves.
    pub fn start(clusters: u32) -> Self {
        let port = free_port();
        let args = strings(&[
            "-p",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--clusters",
            &clusters.to_string(),
            "--heartbeat-ms",
            HEARTBEAT_MS,
        ]);
        let (child, log) = spawn_logged(
            env!("CARGO_BIN_EXE_coordinator"),
            &args,
            "coordinator",
            |l| l.contains("coordinator serving"),
        );
        Self { child, log, port }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tsc");
        let stdin = child.stdin.take();
        let stdout = Lines::new(child.stdout.take().expect("stdout"), "tsc");
        Self {
            child,
            stdin,
            stdout,
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
