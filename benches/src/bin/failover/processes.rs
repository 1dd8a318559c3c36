//! The deployment `failover` measures, as real processes: a `coordinator` and two `tsd` of
//! cluster 1, each logging to `<dir>/logs/<name>.log`. Servers are killed with SIGKILL and
//! restarted on the same port and data directory; every process is killed when the
//! deployment is dropped. Internal calls carry a cluster token the bench makes for the run
//! (`<dir>/cluster-token`, mode 0600), as an operator's deployment would.

use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sns_core::Network;
use sns_core::Role;
use sns_core::admin::{AdminClient, NodeStatus};
use tokio::time::Instant;

use super::{Failure, PATIENCE};

/// The processes of the deployment and how to restart them.
pub(super) struct Deployment {
    bin_dir: PathBuf,
    root: PathBuf,
    interval: Duration,
    missed: u32,
    coordinator_port: u16,
    /// The run's cluster token and the file that holds it.
    token: String,
    token_file: PathBuf,
    coordinator: Option<Child>,
    /// Server id, client port and process of each server (`None` while killed).
    servers: Vec<(u32, u16, Option<Child>)>,
}

impl Deployment {
    /// Starts a coordinator and servers 1 and 2 of cluster 1, on free ports, from the binaries
    /// in `bin_dir`, with data and logs under `root`; returns once the master has an in-sync
    /// slave.
    pub(super) async fn start(
        bin_dir: PathBuf,
        root: &Path,
        interval: Duration,
        missed: u32,
    ) -> Result<Self, Failure> {
        let (token, token_file) = make_token(root)?;
        let mut deployment = Self {
            bin_dir,
            root: root.to_path_buf(),
            token,
            token_file,
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
        Ok(deployment)
    }

    pub(super) fn coordinator_addr(&self) -> String {
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
            .arg("--cluster-token-file")
            .arg(&self.token_file)
            .args(self.heartbeat_args());
        self.coordinator = Some(spawn(command, self.log("coordinator")?)?);
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
        command
            .current_dir(&self.root)
            .args(["-c", "1", "-s", &server.to_string(), "--clusters", "1"])
            .args(["-h", "127.0.0.1", "-k", &self.coordinator_port.to_string()])
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
        if let Some(mut child) = child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    pub(super) fn addr_of(&self, server: u32) -> String {
        let port = self
            .servers
            .iter()
            .find(|(s, _, _)| *s == server)
            .map_or(0, |(_, port, _)| *port);
        format!("127.0.0.1:{port}")
    }

    /// The coordinator's view of the servers.
    async fn status(&self) -> Result<Vec<NodeStatus>, Failure> {
        let admin = AdminClient::connect(
            &Network::tcp(),
            &self.coordinator_addr(),
            Some(self.token.clone()),
        )
        .await?;
        Ok(admin.status().await?.nodes)
    }

    /// Waits until a live master has a live, in-sync slave; returns (master, slave).
    pub(super) async fn wait_for_mirrored_pair(&self) -> Result<(u32, u32), Failure> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(nodes) = self.status().await {
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
