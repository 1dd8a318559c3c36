//! The nemesis: draws faults from the seed and makes them, one at a time, on the run's hosts.
//!
//! Each fault is made, held for a drawn time, and healed; after each, every process that died
//! is started again (as a supervisor would). Which server a fault hits is drawn by role (the
//! master or the slave of a drawn cluster), the role read from the coordinators' latest
//! answer, so the same seed makes the same schedule of kinds, clusters and times.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use super::net::{Host, Net};
use super::processes::Proc;
use crate::bench::Rng;

/// The kinds of fault, as reports name them.
pub(super) const KINDS: [&str; 15] = [
    "kill",
    "pause",
    "partition",
    "mirror-cut",
    "client-cut",
    "loss",
    "delay",
    "disk-full",
    "sync-restart",
    "coord-kill",
    "coord-pause",
    "coord-cut",
    "etcd-restart",
    "broker-restart",
    "broker-cut",
];

/// The kinds that need a RabbitMQ bus.
pub(super) const BROKER_KINDS: [&str; 2] = ["broker-restart", "broker-cut"];

/// The kinds that need a coordinator group (a lone coordinator keeps its routing in memory, so
/// restarting it is a loss the design accepts, not a fault to test).
pub(super) const GROUP_KINDS: [&str; 4] =
    ["coord-kill", "coord-pause", "coord-cut", "etcd-restart"];

/// One drawn fault: its kind, the cluster it aims at, whether it aims at the master (else the
/// slave), which coordinator (of a group), how long it is held.
#[derive(Debug, Clone)]
pub(super) struct Draw {
    pub(super) kind: &'static str,
    pub(super) cluster: u32,
    pub(super) master: bool,
    pub(super) coordinator: u32,
    pub(super) hold: Duration,
    pub(super) gap: Duration,
}

/// Draws the next fault. `netem`: whether delays can be made (else none is drawn); `group`:
/// whether coordinators form a group on etcd (else none of [`GROUP_KINDS`] is drawn);
/// `broker`: whether a RabbitMQ node carries the events (else none of [`BROKER_KINDS`]).
pub(super) fn draw(
    rng: &mut Rng,
    clusters: u32,
    failure_timeout: Duration,
    netem: bool,
    group: bool,
    broker: bool,
) -> Draw {
    let in_group = |weight: u32| if group { weight } else { 0 };
    let with_broker = |weight: u32| if broker { weight } else { 0 };
    // Weights: failures of a master are what the system is built to survive, so they come most.
    let weighted: &[(&'static str, u32)] = &[
        ("kill", 3),
        ("pause", 3),
        ("partition", 3),
        ("mirror-cut", 2),
        ("client-cut", 1),
        ("loss", 2),
        ("delay", if netem { 1 } else { 0 }),
        ("disk-full", 2),
        ("sync-restart", 2),
        ("coord-kill", in_group(2)),
        ("coord-pause", in_group(1)),
        ("coord-cut", in_group(1)),
        ("etcd-restart", in_group(1)),
        ("broker-restart", with_broker(2)),
        ("broker-cut", with_broker(1)),
    ];
    let total: u32 = weighted.iter().map(|(_, w)| w).sum();
    let mut pick = rng.below(total);
    let mut kind = weighted[0].0;
    for &(name, weight) in weighted {
        if pick < weight {
            kind = name;
            break;
        }
        pick -= weight;
    }
    let cluster = rng.below(clusters) + 1;
    let master = rng.below(4) != 0;
    let coordinator = rng.below(3);
    let millis = |low: u64, high: u64, rng: &mut Rng| {
        Duration::from_millis(low + u64::from(rng.below((high - low) as u32)))
    };
    let hold = match kind {
        // Longer than the failure timeout, so the coordinator gives up on it.
        "pause" | "coord-pause" => failure_timeout + millis(500, 2500, rng),
        "kill" | "sync-restart" | "coord-kill" | "etcd-restart" | "broker-restart" => {
            millis(500, 3000, rng)
        }
        _ => millis(2000, 5000, rng),
    };
    let gap = millis(1000, 3000, rng);
    Draw {
        kind,
        cluster,
        master,
        coordinator,
        hold,
        gap,
    }
}

/// The hosts and processes a fault can hit.
pub(super) struct World {
    pub(super) net: Net,
    /// By name.
    pub(super) procs: BTreeMap<String, Proc>,
    /// Servers per cluster.
    pub(super) servers: u32,
    /// Data directory of each server, by name (a tmpfs each).
    pub(super) disks: HashMap<String, PathBuf>,
    /// The environment that gives a process the deployment's cluster token.
    pub(super) token_env: Vec<(String, String)>,
    /// Every coordinator, HOST:PORT,...
    pub(super) coordinators: String,
    /// Whether the coordinators are a group on etcd (host `etcd`, coordinators `coord<n>`).
    pub(super) group: bool,
    /// Processes that were started again after dying on their own, by name: how often.
    pub(super) restarts: BTreeMap<String, u32>,
}

/// What is being held, to be healed.
pub(super) enum Made {
    /// Nothing (the fault could not be made; said in its target).
    Nothing,
    /// Restart this process at heal time.
    Killed(String),
    /// SIGCONT this process at heal time.
    Paused(String),
    /// Flush this host's rules (and delay) at heal time.
    Rules(Host),
    /// Remove this filler file at heal time.
    Filled(PathBuf),
}

impl World {
    /// Server `s` of cluster `c`'s process name.
    pub(super) fn server(c: u32, s: u32) -> String {
        format!("c{c}s{s}")
    }

    /// The name of the server a draw aims at: cluster `draw.cluster`'s master (per `masters`)
    /// or one of its other servers.
    fn aim(&self, draw: &Draw, masters: &HashMap<u32, u32>) -> String {
        let master = masters.get(&draw.cluster).copied().unwrap_or(1);
        let server = if draw.master || self.servers < 2 {
            master
        } else {
            (master % self.servers) + 1
        };
        Self::server(draw.cluster, server)
    }

    fn host(&self, name: &str) -> Result<Host, String> {
        self.net
            .host(name)
            .cloned()
            .ok_or_else(|| format!("no host {name}"))
    }

    /// Every host but `except`.
    fn others(&self, except: &str) -> Vec<Host> {
        self.procs
            .values()
            .map(|p| p.host.clone())
            .chain(self.net.host("client").cloned())
            .filter(|h| h.name != except)
            .collect()
    }

    /// The coordinator a draw aims at.
    fn coordinator(&self, draw: &Draw) -> String {
        let count = self
            .procs
            .keys()
            .filter(|name| name.starts_with("coord"))
            .count()
            .max(1) as u32;
        format!("coord{}", draw.coordinator % count + 1)
    }

    /// Makes the fault `draw` describes; returns what to heal and what it hit, in words.
    pub(super) fn make(
        &mut self,
        draw: &Draw,
        masters: &HashMap<u32, u32>,
    ) -> Result<(Made, String), String> {
        let aimed = if draw.kind.starts_with("coord") {
            self.coordinator(draw)
        } else if draw.kind == "etcd-restart" {
            "etcd".to_string()
        } else if draw.kind.starts_with("broker") {
            "broker".to_string()
        } else {
            self.aim(draw, masters)
        };
        match draw.kind {
            "kill" | "coord-kill" | "etcd-restart" | "broker-restart" => {
                let proc = self.proc(&aimed)?;
                proc.kill();
                Ok((Made::Killed(aimed.clone()), format!("SIGKILL {aimed}")))
            }
            "sync-restart" => {
                let name = format!("sync{}", draw.cluster);
                self.proc(&name)?.kill();
                Ok((Made::Killed(name.clone()), format!("SIGKILL {name}")))
            }
            "pause" | "coord-pause" => {
                self.proc(&aimed)?.pause()?;
                Ok((
                    Made::Paused(aimed.clone()),
                    format!("SIGSTOP {aimed} for {:.1} s", draw.hold.as_secs_f64()),
                ))
            }
            "partition" | "coord-cut" | "broker-cut" => {
                let host = self.host(&aimed)?;
                let others = self.others(&aimed);
                self.net.cut(&host, &others.iter().collect::<Vec<_>>())?;
                Ok((
                    Made::Rules(host),
                    format!("{aimed} cut off from every host"),
                ))
            }
            "mirror-cut" => {
                let master = Self::server(
                    draw.cluster,
                    masters.get(&draw.cluster).copied().unwrap_or(1),
                );
                let host = self.host(&master)?;
                let slaves: Vec<Host> = (1..=self.servers)
                    .map(|s| Self::server(draw.cluster, s))
                    .filter(|name| *name != master)
                    .filter_map(|name| self.net.host(&name).cloned())
                    .collect();
                self.net.cut(&host, &slaves.iter().collect::<Vec<_>>())?;
                Ok((
                    Made::Rules(host),
                    format!("{master} cut off from its slaves only"),
                ))
            }
            "client-cut" => {
                let host = self.host("client")?;
                let servers: Vec<Host> = (1..=self.servers)
                    .map(|s| Self::server(draw.cluster, s))
                    .filter_map(|name| self.net.host(&name).cloned())
                    .collect();
                self.net.cut(&host, &servers.iter().collect::<Vec<_>>())?;
                Ok((
                    Made::Rules(host),
                    format!("the clients cut off from cluster {}", draw.cluster),
                ))
            }
            "loss" => {
                let host = self.host(&aimed)?;
                self.net.lose(&host, 30)?;
                Ok((
                    Made::Rules(host),
                    format!("30 % of {aimed}'s packets dropped"),
                ))
            }
            "delay" => {
                let host = self.host(&aimed)?;
                self.net.delay(&host, 200)?;
                Ok((
                    Made::Rules(host),
                    format!("{aimed}'s packets delayed 200 ms"),
                ))
            }
            "disk-full" => {
                let Some(disk) = self.disks.get(&aimed) else {
                    return Ok((Made::Nothing, format!("no disk of {aimed}")));
                };
                let filler = disk.join("chaos-filler");
                fill(&filler)?;
                Ok((Made::Filled(filler), format!("{aimed}'s disk full")))
            }
            other => Err(format!("unknown fault {other}")),
        }
    }

    /// Heals what `made` holds, then starts again every process that died.
    pub(super) fn heal(&mut self, made: Made) -> Result<(), String> {
        match made {
            Made::Nothing => {}
            Made::Killed(name) => self.proc(&name)?.start()?,
            Made::Paused(name) => self.proc(&name)?.resume(),
            Made::Rules(host) => self.net.heal(&host)?,
            Made::Filled(filler) => {
                std::fs::remove_file(&filler).map_err(|e| format!("{}: {e}", filler.display()))?
            }
        }
        self.restart_the_dead(None)
    }

    /// Waits `time`, starting again every half second each process that ended on its own (as a
    /// supervisor would), but the one `made` keeps down.
    pub(super) async fn supervise(&mut self, time: Duration, made: &Made) -> Result<(), String> {
        let held = match made {
            Made::Killed(name) => Some(name.clone()),
            _ => None,
        };
        let end = tokio::time::Instant::now() + time;
        loop {
            let now = tokio::time::Instant::now();
            if now >= end {
                return Ok(());
            }
            tokio::time::sleep((end - now).min(Duration::from_millis(500))).await;
            self.restart_the_dead(held.as_deref())?;
        }
    }

    /// Starts every process that ended on its own, but `held` (the one a fault keeps down).
    pub(super) fn restart_the_dead(&mut self, held: Option<&str>) -> Result<(), String> {
        for (name, proc) in &mut self.procs {
            if Some(name.as_str()) != held && !proc.is_running() {
                proc.start()?;
                *self.restarts.entry(name.clone()).or_default() += 1;
            }
        }
        Ok(())
    }

    fn proc(&mut self, name: &str) -> Result<&mut Proc, String> {
        self.procs
            .get_mut(name)
            .ok_or_else(|| format!("no process {name}"))
    }
}

/// Writes zeros to `path` until the disk is full.
fn fill(path: &std::path::Path) -> Result<(), String> {
    use std::io::Write;
    let mut file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let chunk = vec![0u8; 1 << 20];
    loop {
        match file.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
    // The last partial chunk may have left a few bytes free; fill them too.
    let _ = file.write_all(&[0u8; 4096]);
    let _ = file.sync_all();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(seed: u64, netem: bool, group: bool, broker: bool) -> Vec<(&'static str, u32)> {
        let mut rng = Rng::new(seed);
        (0..200)
            .map(|_| {
                let d = draw(&mut rng, 3, Duration::from_secs(1), netem, group, broker);
                (d.kind, d.cluster)
            })
            .collect()
    }

    #[test]
    fn a_seed_gives_the_same_schedule() {
        assert_eq!(
            schedule(7, false, true, true),
            schedule(7, false, true, true)
        );
        assert_ne!(
            schedule(7, false, true, true),
            schedule(8, false, true, true)
        );
    }

    #[test]
    fn only_what_the_run_can_make_is_drawn() {
        let lone = schedule(1, false, false, false);
        assert!(lone.iter().all(|(kind, _)| *kind != "delay"
            && !GROUP_KINDS.contains(kind)
            && !BROKER_KINDS.contains(kind)));
        assert!(lone.iter().all(|(_, cluster)| (1..=3).contains(cluster)));
        let everything = schedule(1, true, true, true);
        for kind in KINDS {
            assert!(
                everything.iter().any(|(drawn, _)| *drawn == kind),
                "{kind} never drawn in 200"
            );
        }
    }

    #[test]
    fn a_pause_outlasts_the_failure_timeout() {
        let mut rng = Rng::new(3);
        let timeout = Duration::from_secs(1);
        for _ in 0..500 {
            let d = draw(&mut rng, 2, timeout, false, true, false);
            if d.kind.ends_with("pause") {
                assert!(d.hold > timeout, "{d:?}");
            }
        }
    }
}
