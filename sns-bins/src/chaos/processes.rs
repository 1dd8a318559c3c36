//! The run's processes: real binaries started in their host's namespace with `ip netns exec`
//! (which becomes the binary, so a signal to the child reaches the binary itself), their
//! output appended to `logs/<name>.log` in the run's directory.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::net::{Host, kill_all_in, pids_in, run};

/// One process of the deployment.
#[derive(Debug)]
pub(super) struct Proc {
    /// `coord`, `c1s2`, `sync1`, ...: also its host's name.
    pub(super) name: String,
    pub(super) host: Host,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    paused: bool,
    /// Signals go to every process on its host (a program that runs its work as children,
    /// such as RabbitMQ's start script).
    pub(super) whole_host: bool,
}

impl Proc {
    pub(super) fn new(
        host: &Host,
        program: &Path,
        args: Vec<String>,
        env: Vec<(String, String)>,
        logs: &Path,
    ) -> Self {
        Self {
            name: host.name.clone(),
            host: host.clone(),
            program: program.to_path_buf(),
            args,
            env,
            log: logs.join(format!("{}.log", host.name)),
            child: None,
            paused: false,
            whole_host: false,
        }
    }

    /// Starts it (again).
    pub(super) fn start(&mut self) -> Result<(), String> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        let err = log
            .try_clone()
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.host.netns])
            .arg(&self.program)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.name))?;
        self.child = Some(child);
        self.paused = false;
        Ok(())
    }

    /// Whether it runs (a paused process runs).
    pub(super) fn is_running(&mut self) -> bool {
        let Some(child) = &mut self.child else {
            return false;
        };
        match child.try_wait() {
            Ok(None) => true,
            Ok(Some(_)) | Err(_) => {
                self.child = None;
                false
            }
        }
    }

    /// SIGKILL, and waits for it to be gone (with `whole_host`, every process of its host, until
    /// none is left, so a restart does not meet the old one's ports and locks).
    pub(super) fn kill(&mut self) {
        if self.whole_host {
            kill_all_in(&self.host.netns);
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
    }

    /// SIGSTOP (with `whole_host`, every process of its host): it stays, frozen, until
    /// [`resume`](Self::resume).
    pub(super) fn pause(&mut self) -> Result<(), String> {
        let pid = self
            .pid()
            .ok_or_else(|| format!("{} is not running", self.name))?;
        if self.whole_host {
            for pid in pids_in(&self.host.netns) {
                let _ = run("kill", &["-STOP", &pid]);
            }
        } else {
            run("kill", &["-STOP", &pid.to_string()])?;
        }
        self.paused = true;
        Ok(())
    }

    /// SIGCONT.
    pub(super) fn resume(&mut self) {
        if self.paused {
            let pids = if self.whole_host {
                pids_in(&self.host.netns)
            } else {
                self.pid().map(|p| p.to_string()).into_iter().collect()
            };
            for pid in pids {
                let _ = run("kill", &["-CONT", &pid]);
            }
        }
        self.paused = false;
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
