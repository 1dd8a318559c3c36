//! A coordinator group on a real etcd, as processes: an `etcd` member of the test's own (so a
//! test can kill and restart it), and `coordinator --etcd` processes that can be killed and
//! started again on the same port.

use std::path::PathBuf;
use std::process::{Child, Command};

use sns_core::testing::REQUIRE_ETCD_VAR;

use super::{
    Heartbeat, Lines, coordinator_args, free_port, reap, spawn_coordinator, spawn_unwaited, strings,
};

/// An etcd member of one test: its data in a temporary directory, on two free ports.
pub struct Etcd {
    child: Option<Child>,
    pub log: Option<Lines>,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
}

impl Etcd {
    /// Starts a member and waits until it serves; `None` after printing that `test` was
    /// skipped when there is no `etcd` binary (a failure with `SNS_REQUIRE_ETCD=1`).
    pub fn start(test: &str) -> Option<Self> {
        let present = Command::new("etcd").arg("--version").output().is_ok();
        if !present {
            let required = std::env::var(REQUIRE_ETCD_VAR).is_ok_and(|v| v == "1");
            assert!(
                !required,
                "{test}: {REQUIRE_ETCD_VAR}=1 but there is no etcd binary"
            );
            eprintln!("{test}: skipped: no etcd binary (Debian's etcd-server)");
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("sns-etcd-")
            .tempdir()
            .expect("a temporary directory")
            .keep();
        let mut etcd = Self {
            child: None,
            log: None,
            dir,
            client_port: free_port(),
            peer_port: free_port(),
        };
        etcd.restart();
        Some(etcd)
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Starts the member again (after [`Etcd::kill`]) on its data and ports; waits until it
    /// serves.
    pub fn restart(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let args = strings(&[
            "--name",
            "test",
            "--data-dir",
            &self.dir.join("data").display().to_string(),
            "--listen-client-urls",
            &self.url(),
            "--advertise-client-urls",
            &self.url(),
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("test={peer}"),
        ]);
        let (child, log) = spawn_unwaited(Command::new("etcd"), &args, "etcd");
        log.until(|l| l.contains("ready to serve client requests"));
        self.child = Some(child);
        self.log = Some(log);
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            reap(&mut child);
        }
        self.log = None;
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `coordinator --etcd` process of a group.
pub struct GroupCoordinator {
    child: Option<Child>,
    pub log: Lines,
    pub port: u16,
    args: Vec<String>,
}

impl GroupCoordinator {
    /// Starts a coordinator of `clusters` clusters with `heartbeat`, its roles in `etcd` under
    /// `prefix`; waits until it serves.
    pub fn start(etcd: &Etcd, prefix: &str, clusters: u32, heartbeat: Heartbeat) -> Self {
        let port = free_port();
        let mut args = coordinator_args(port, clusters, heartbeat);
        args.extend(strings(&["--etcd", &etcd.url(), "--etcd-prefix", prefix]));
        let (child, log) = Self::spawn(&args, port);
        Self {
            child: Some(child),
            log,
            port,
            args,
        }
    }

    fn spawn(args: &[String], port: u16) -> (Child, Lines) {
        spawn_coordinator(args, &format!("coordinator :{port}"))
    }

    /// Waits until this coordinator says it leads its group.
    pub fn wait_until_leading(&self) {
        self.log
            .until(|l| l.contains("this coordinator leads its group"));
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            reap(&mut child);
        }
    }

    /// Starts it again on the same port and settings (after [`GroupCoordinator::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        let (child, log) = Self::spawn(&self.args, self.port);
        self.child = Some(child);
        self.log = log;
    }
}

impl Drop for GroupCoordinator {
    fn drop(&mut self) {
        self.kill();
    }
}
