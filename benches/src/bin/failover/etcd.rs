//! The etcd member a `--kill coordinator` run keeps its coordinators' roles in, when no
//! `--etcd URL` is given: one `etcd` (from the `PATH`) on two free loopback ports, its data in
//! `<dir>/etcd`, its log in `<dir>/logs/etcd.log`. Killed when dropped.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use super::processes::free_port;
use super::{Failure, PATIENCE};

/// What etcd logs once it answers clients.
const READY: &str = "ready to serve client requests";

/// A single-member etcd cluster of the run.
pub(super) struct EtcdMember {
    child: Child,
    url: String,
}

impl EtcdMember {
    /// Starts a member with its data and log under `root`; returns once it says it serves
    /// clients.
    pub(super) fn start(root: &Path) -> Result<Self, Failure> {
        let url = format!("http://127.0.0.1:{}", free_port()?);
        let peer = format!("http://127.0.0.1:{}", free_port()?);
        let mut child = Command::new("etcd")
            .current_dir(root)
            .args(["--name", "failover", "--data-dir"])
            .arg(root.join("etcd"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("failover={peer}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                format!("cannot start etcd (Debian's etcd-server), or pass --etcd: {e}")
            })?;
        let stderr = child.stderr.take().ok_or("etcd has no stderr")?;
        let log = File::create(root.join("logs").join("etcd.log"))?;
        let (ready, readiness) = mpsc::channel();
        // Copies etcd's log to its file for as long as etcd runs, and says when it serves.
        std::thread::spawn(move || copy_log(stderr, log, &ready));
        let member = Self { child, url };
        match readiness.recv_timeout(PATIENCE) {
            Ok(()) => Ok(member),
            Err(_) => {
                Err(format!("etcd did not serve within {PATIENCE:?} (see logs/etcd.log)").into())
            }
        }
    }

    /// Its client URL.
    pub(super) fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes every line of `from` to `to`; sends on `ready` when etcd says it serves.
fn copy_log(from: impl std::io::Read, mut to: File, ready: &mpsc::Sender<()>) {
    for line in BufReader::new(from).lines() {
        let Ok(line) = line else { return };
        let _ = writeln!(to, "{line}");
        if line.contains(READY) {
            let _ = ready.send(());
        }
    }
}
