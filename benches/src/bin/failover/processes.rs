//! The deployment `failover` measures, as real processes: one `coordinator` (or, for the
//! `coordinator` kill, a group of `coordinator --etcd` processes under a prefix of the run's
//! own) and two `tsd` of cluster 1, each logging to `<dir>/logs/<name>.log`. Servers and
//! coordinators are killed with SIGKILL and restarted on the same port (and data directory);
//! every process is killed when the deployment is dropped. Internal calls carry a cluster
//! token the bench makes for the run (`<dir>/cluster-token`, mode 0600), as an operator's
//! deployment would.

mod group;

use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sns_core::Role;
use sns_core::admin::DeploymentStatus;
use tokio::time::Instant;

use super::{Failure, PATIENCE};

/// How the deployment's coordinators keep their roles.
pub(super) enum Coordinators {
    /// One coordinator, its roles in memory.
    Alone,
    /// `count` coordinators of a group, their roles in the etcd at `etcd` under `prefix`.
    Group {
        etcd: String,
        prefix: String,
        count: usize,
    },
}

/// One coordinator process: its name in the group (and its log's), port and process (`None`
/// while killed).
struct CoordinatorProcess {
    name: String,
    port: u16,
    child: Option<Child>,
}

/// The processes of the deployment and how to restart them.
pub(super) struct Deployment {
    bin_dir: PathBuf,
    root: PathBuf,
    interval: Duration,
    missed: u32,
    /// The run's cluster token and the file that holds it.
    token: String,
    token_file: PathBuf,
    /// For a group: the etcd URL and the prefix of the run's keys.
    group: Option<(String, String)>,
    coordinators: Vec<CoordinatorProcess>,
    /// Server id, client port and process of each server (`None` while killed).
    servers: Vec<(u32, u16, Option<Child>)>,
}

impl Deployment {
    /// Starts the coordinators and servers 1 and 2 of cluster 1, on free ports, from the
    /// binaries in `bin_dir`, with data and logs under `root`; returns once the master has an
    /// in-sync slave.
    pub(super) async fn start(
        bin_dir: PathBuf,
        root: &Path,
        interval: Duration,
        missed: u32,
        coordinators: Coordinators,
    ) -> Result<Self, Failure> {
        let (token, token_file) = make_token(root)?;
        let (group, names) = match coordinators {
            Coordinators::Alone => (None, vec!["coordinator".to_string()]),
            Coordinators::Group {
                etcd,
                prefix,
                count,
            } => (
                Some((etcd, prefix)),
                (1..=count).map(|i| format!("coordinator{i}")).collect(),
            ),
        };
        let mut processes = Vec::new();
        for name in names {
            let port = free_port()?;
            processes.push(CoordinatorProcess {
                name,
                port,
                child: None,
            });
        }
        let mut deployment = Self {
            bin_dir,
            root: root.to_path_buf(),
            token,
            token_file,
            interval,
            missed,
            group,
            coordinators: processes,
            servers: vec![(1, free_port()?, None), (2, free_port()?, None)],
        };
        for index in 0..deployment.coordinators.len() {
            deployment.start_coordinator(index)?;
        }
        deployment.start_server(1)?;
        deployment.start_server(2)?;
        deployment.wait_for_mirrored_pair().await?;
        Ok(deployment)
    }

    /// Every coordinator's address, comma-separated (as clients and servers take a group).
    pub(super) fn coordinator_addr(&self) -> String {
        self.coordinators
            .iter()
            .map(|c| format!("127.0.0.1:{}", c.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn heartbeat_args(&self) -> Vec<String> {
        vec![
            "--heartbeat-ms".to_string(),
            self.interval.as_millis().to_string(),
            "--missed-heartbeats".to_string(),
            self.missed.to_string(),
        ]
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.root.join("logs").join(format!("{name}.log"))
    }

    fn log(&self, name: &str) -> Result<File, Failure> {
        let path = self.log_path(name);
        Ok(File::options().create(true).append(true).open(path)?)
    }

    /// Starts coordinator `index` (again) on its port.
    pub(super) fn start_coordinator(&mut self, index: usize) -> Result<(), Failure> {
        let coordinator = self.coordinators.get(index).ok_or("no such coordinator")?;
        let mut command = Command::new(self.bin_dir.join("coordinator"));
        // Run in the deployment's own directory, so a cluster token kept in the caller's
        // ./sns-data is not picked up (the bench's status calls carry none).
        command
            .current_dir(&self.root)
            .args(["-p", &coordinator.port.to_string()])
            .args(["--bind", "127.0.0.1", "--clusters", "1"])
            .arg("--cluster-token-file")
            .arg(&self.token_file)
            .args(self.heartbeat_args());
        if let Some((etcd, prefix)) = &self.group {
            command
                .args(["--etcd", etcd, "--etcd-prefix", prefix])
                .args(["--name", &coordinator.name]);
        }
        let child = spawn(command, self.log(&coordinator.name)?)?;
        self.coordinators[index].child = Some(child);
        Ok(())
    }

    pub(super) fn start_server(&mut self, server: u32) -> Result<(), Failure> {
        let index = self
            .servers
            .iter()
            .position(|(s, _, _)| *s == server)
            .ok_or("no such server")?;
        let port = self.servers[index].1;
        let mut command = Command::new(self.bin_dir.join("tsd"));
        command.current_dir(&self.root).args([
            "-c",
            "1",
            "-s",
            &server.to_string(),
            "--clusters",
            "1",
        ]);
        match (&self.group, self.coordinators.first()) {
            (None, Some(alone)) => command.args(["-h", "127.0.0.1", "-k", &alone.port.to_string()]),
            _ => command.args(["--coordinators", &self.coordinator_addr()]),
        };
        command
            .args(["-p", &port.to_string(), "--bind", "127.0.0.1"])
            .args(self.heartbeat_args())
            .arg("--cluster-token-file")
            .arg(&self.token_file)
            .arg("--data-dir")
            .arg(self.root.join(format!("server{server}")));
        let child = spawn(command, self.log(&format!("tsd{server}"))?)?;
        self.servers[index].2 = Some(child);
        Ok(())
    }

    /// SIGKILLs `server` and waits until the process is gone.
    pub(super) fn kill(&mut self, server: u32) -> Result<(), Failure> {
        let (_, _, child) = self
            .servers
            .iter_mut()
            .find(|(s, _, _)| *s == server)
            .ok_or("no such server")?;
        stop(child.take())
    }

    pub(super) fn addr_of(&self, server: u32) -> String {
        let port = self
            .servers
            .iter()
            .find(|(s, _, _)| *s == server)
            .map_or(0, |(_, port, _)| *port);
        format!("127.0.0.1:{port}")
    }

    /// The view of the servers of the first running coordinator that answers.
    async fn status(&self) -> Result<DeploymentStatus, Failure> {
        let mut last = None;
        for index in 0..self.coordinators.len() {
            if self.coordinators[index].child.is_none() {
                continue;
            }
            match self.coordinator_status(index).await {
                Ok(status) => return Ok(status),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| "no coordinator is running".into()))
    }

    /// Waits until a live master has a live, in-sync slave; returns (master, slave).
    pub(super) async fn wait_for_mirrored_pair(&self) -> Result<(u32, u32), Failure> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(status) = self.status().await {
                let nodes = status.nodes;
                let role = |r: Role| nodes.iter().find(|n| n.alive && n.role == Some(r)).cloned();
                // In sync: the master counts it, so it holds every committed entry (the writers
                // keep the logs moving, so their reported ends rarely match).
                if let (Some(master), Some(slave)) = (role(Role::Master), role(Role::Slave))
                    && slave.in_sync
                {
                    return Ok((master.id, slave.id));
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
        for coordinator in &mut self.coordinators {
            if let Some(child) = &mut coordinator.child {
                let _ = child.kill();
                let _ = child.wait();
            }
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

/// SIGKILLs `child` (if running) and waits until the process is gone.
fn stop(child: Option<Child>) -> Result<(), Failure> {
    if let Some(mut child) = child {
        child.kill()?;
        child.wait()?;
    }
    Ok(())
}

/// A port free on loopback now.
pub(super) fn free_port() -> Result<u16, Failure> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A fresh cluster token (64 hex digits from the process's random hash keys, the clock and the
/// process id), kept in `<root>/cluster-token`, readable by this user only.
fn make_token(root: &Path) -> Result<(String, PathBuf), Failure> {
    let mut token = String::new();
    for part in 0..4u32 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(part);
        hasher.write_u32(std::process::id());
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        token.push_str(&format!("{:016x}", hasher.finish()));
    }
    let file = root.join("cluster-token");
    let mut out = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&file)?;
    out.write_all(token.as_bytes())?;
    out.sync_all()?;
    Ok((token, file))
}
