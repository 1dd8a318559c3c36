//! The run's hosts: one network namespace per process, joined by veth pairs to a bridge that
//! lives in a namespace of its own (the switch), so nothing of the machine's own network is
//! touched. Every host gets `eth0` with an address on `10.213.0.0/24`; faults are nftables
//! rules in a host's namespace (a table `inet chaos`), and `tc netem` where the kernel has it.
//!
//! Every name a run makes starts with `snsc<pid>-` (pid: the run's process id), so a later run
//! can tell the leftovers of a run that died (its process is gone) and remove them
//! ([`sweep`]): processes still in its namespaces, the namespaces (their links go with them),
//! and its tmpfs mounts.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Prefix of every namespace a run makes.
const PREFIX: &str = "snsc";
/// The hosts' network: `10.213.0.<n>/24`.
const SUBNET: [u8; 3] = [10, 213, 0];

/// Runs `program args`, returning its stdout; an error names the command and its stderr.
pub(super) fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    Err(format!(
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    ))
}

/// Runs `command` inside namespace `netns`.
fn exec_in(netns: &str, command: &[&str]) -> Result<String, String> {
    let mut args = vec!["netns", "exec", netns];
    args.extend_from_slice(command);
    run("ip", &args)
}

/// Deletes a host's `tc` queueing discipline (its netem delay).
const NETEM_DEL: [&str; 6] = ["tc", "qdisc", "del", "dev", "eth0", "root"];

/// Delays the outgoing packets of namespace `netns` by `millis` (`tc netem`).
fn add_delay(netns: &str, millis: u32) -> Result<String, String> {
    let delay = format!("{millis}ms");
    exec_in(
        netns,
        &[
            "tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", &delay,
        ],
    )
}

/// Runs nftables `commands` in namespace `netns`.
fn nft(netns: &str, commands: &str) -> Result<(), String> {
    run_with_input("ip", &["netns", "exec", netns, "nft", "-f", "-"], commands)
}

/// Runs `program args` with `input` on its stdin.
fn run_with_input(program: &str, args: &[&str], input: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| format!("{program}: {e}"))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|e| format!("{program}: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    ))
}

/// Whether this process may make namespaces: it runs as root and `ip` and `nft` are there.
pub(super) fn check_can_run() -> Result<(), String> {
    let uid = run("id", &["-u"]).map_err(|e| format!("cannot tell who runs this: {e}"))?;
    if uid.trim() != "0" {
        return Err(
            "sns chaos needs root: it makes network namespaces, links and nftables rules (run it with sudo)"
                .to_string(),
        );
    }
    for (program, package) in [("ip", "iproute2"), ("nft", "nftables")] {
        if run(program, &["-V"]).is_err() && run(program, &["--version"]).is_err() {
            return Err(format!(
                "sns chaos needs `{program}` (Debian package {package}): apt-get install {package}"
            ));
        }
    }
    Ok(())
}

/// One host: a namespace with one address.
#[derive(Debug, Clone)]
pub(super) struct Host {
    /// Short name (`coord`, `c1s2`, `sync1`, `client`).
    pub(super) name: String,
    /// The namespace's name.
    pub(super) netns: String,
    /// Its address.
    pub(super) ip: Ipv4Addr,
}

/// The run's network.
#[derive(Debug)]
pub(super) struct Net {
    tag: String,
    switch: String,
    hosts: BTreeMap<String, Host>,
    /// The run's directory (data, tmpfs mounts).
    dir: PathBuf,
    mounts: Vec<PathBuf>,
    netem: bool,
    /// Set once everything was removed.
    torn_down: bool,
}

impl Net {
    /// Makes the switch (a namespace holding bridge `br0`) for a run of this process, with its
    /// files under `dir`.
    pub(super) fn new(dir: &Path) -> Result<Self, String> {
        let tag = format!("{PREFIX}{}", std::process::id());
        let switch = format!("{tag}-sw");
        let net = Self {
            tag,
            switch: switch.clone(),
            hosts: BTreeMap::new(),
            dir: dir.to_path_buf(),
            mounts: Vec::new(),
            netem: false,
            torn_down: false,
        };
        run("ip", &["netns", "add", &switch])?;
        run(
            "ip",
            &["-n", &switch, "link", "add", "br0", "type", "bridge"],
        )?;
        run("ip", &["-n", &switch, "link", "set", "br0", "up"])?;
        Ok(net)
    }

    /// Adds host `name`: its namespace, loopback up, `eth0` on the switch with the next
    /// address, and an empty nftables table for faults.
    pub(super) fn add_host(&mut self, name: &str) -> Result<Host, String> {
        let number = self.hosts.len() + 1;
        if number > 250 {
            return Err("too many hosts for one /24".to_string());
        }
        let ip = Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], number as u8);
        let netns = format!("{}-{name}", self.tag);
        let port = format!("v{number}");
        run("ip", &["netns", "add", &netns])?;
        let host = Host {
            name: name.to_string(),
            netns: netns.clone(),
            ip,
        };
        self.hosts.insert(name.to_string(), host.clone());
        run("ip", &["-n", &netns, "link", "set", "lo", "up"])?;
        run(
            "ip",
            &[
                "-n",
                &netns,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                &self.switch,
            ],
        )?;
        run(
            "ip",
            &["-n", &self.switch, "link", "set", &port, "master", "br0"],
        )?;
        run("ip", &["-n", &self.switch, "link", "set", &port, "up"])?;
        run(
            "ip",
            &[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ],
        )?;
        run("ip", &["-n", &netns, "link", "set", "eth0", "up"])?;
        nft(
            &netns,
            "table inet chaos {\n\
             chain input { type filter hook input priority 0; policy accept; }\n\
             chain output { type filter hook output priority 0; policy accept; }\n\
             }\n",
        )?;
        if number == 1 {
            // Probe netem once: Debian's kernels have it, some others do not.
            self.netem = add_delay(&netns, 1).is_ok();
            if self.netem {
                let _ = exec_in(&netns, &NETEM_DEL);
            }
        }
        Ok(host)
    }

    /// Host `name`.
    pub(super) fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.get(name)
    }

    /// Whether delays can be made (`tc netem`).
    pub(super) fn has_netem(&self) -> bool {
        self.netem
    }

    /// Cuts `host` off from `others`, both ways (packets dropped, as by a broken network).
    pub(super) fn cut(&self, host: &Host, others: &[&Host]) -> Result<(), String> {
        if others.is_empty() {
            return Ok(());
        }
        let set = others
            .iter()
            .map(|h| h.ip.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        self.nft(
            host,
            &format!(
                "add rule inet chaos input ip saddr {{ {set} }} drop\n\
                 add rule inet chaos output ip daddr {{ {set} }} drop\n"
            ),
        )
    }

    /// Drops `percent` % of `host`'s packets, both ways.
    pub(super) fn lose(&self, host: &Host, percent: u32) -> Result<(), String> {
        self.nft(
            host,
            &format!(
                "add rule inet chaos input numgen random mod 100 < {percent} drop\n\
                 add rule inet chaos output numgen random mod 100 < {percent} drop\n"
            ),
        )
    }

    /// Delays `host`'s outgoing packets by `millis` (needs netem).
    pub(super) fn delay(&self, host: &Host, millis: u32) -> Result<(), String> {
        add_delay(&host.netns, millis).map(drop)
    }

    /// Removes every rule and delay of `host`.
    pub(super) fn heal(&self, host: &Host) -> Result<(), String> {
        if self.netem {
            let _ = exec_in(&host.netns, &NETEM_DEL);
        }
        self.nft(host, "flush table inet chaos\n")
    }

    fn nft(&self, host: &Host, commands: &str) -> Result<(), String> {
        nft(&host.netns, commands)
    }

    /// Mounts a tmpfs of `megabytes` at `dir` (made if missing): a disk that can be filled.
    pub(super) fn mount_tmpfs(&mut self, dir: &Path, megabytes: u32) -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.to_string_lossy();
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={megabytes}m,mode=0700"),
                "tmpfs",
                &path,
            ],
        )?;
        self.mounts.push(dir.to_path_buf());
        Ok(())
    }

    /// Removes everything the run made: processes left in its namespaces, the namespaces (and
    /// with them their links and rules), its mounts.
    pub(super) fn tear_down(&mut self) {
        remove_run(&self.tag, &self.dir);
        self.hosts.clear();
        self.mounts.clear();
        self.torn_down = true;
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Also after a failure half-way through making the network.
        if !self.torn_down {
            self.tear_down();
        }
    }
}

/// Every mount point of this machine, as `/proc/self/mounts` lists them (with its octal escapes
/// of spaces, tabs, newlines and backslashes undone).
fn mount_points() -> Vec<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .map(|point| {
            point
                .replace("\\040", " ")
                .replace("\\011", "\t")
                .replace("\\012", "\n")
                .replace("\\134", "\\")
        })
        .collect()
}

/// The processes in namespace `netns` now.
pub(super) fn pids_in(netns: &str) -> Vec<String> {
    run("ip", &["netns", "pids", netns])
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// SIGKILLs every process in namespace `netns`, again until none is left (a dying program may
/// have forked), for at most 10 s.
pub(super) fn kill_all_in(netns: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let pids = pids_in(netns);
        if pids.is_empty() || std::time::Instant::now() > deadline {
            return;
        }
        for pid in &pids {
            let _ = run("kill", &["-KILL", pid]);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Removes run `tag`'s processes, namespaces and the tmpfs mounts under `dir`.
fn remove_run(tag: &str, dir: &Path) {
    let listed = run("ip", &["netns", "list"]).unwrap_or_default();
    let mine = format!("{tag}-");
    for line in listed.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if !name.starts_with(&mine) {
            continue;
        }
        kill_all_in(name);
        let _ = run("ip", &["netns", "del", name]);
    }
    let prefix = format!("{}/", dir.display());
    let mut points: Vec<String> = mount_points()
        .into_iter()
        .filter(|point| point.starts_with(&prefix))
        .collect();
    // Deepest first.
    points.sort_by_key(|point| std::cmp::Reverse(point.len()));
    for point in points {
        let _ = run("umount", &["-l", &point]);
    }
}

/// Removes what earlier runs left behind when they died (their process is gone): namespaces
/// named `snsc<pid>-*`, their processes, tmpfs mounts under any `.../sns-chaos-<pid>/`, and the
/// directory `<parent>/sns-chaos-<pid>/`. Returns how many runs it cleaned up.
pub(super) fn sweep(parent: &Path) -> usize {
    let listed = run("ip", &["netns", "list"]).unwrap_or_default();
    let mut dead = std::collections::BTreeSet::new();
    for line in listed.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('-') else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            dead.insert(pid);
        }
    }
    // Mounts of dead runs, under this work directory or any other.
    let mut dirs: std::collections::BTreeMap<u32, std::collections::BTreeSet<PathBuf>> =
        std::collections::BTreeMap::new();
    for point in mount_points() {
        let Some(at) = point.find("/sns-chaos-") else {
            continue;
        };
        let rest = &point[at + "/sns-chaos-".len()..];
        let Some(pid) = rest.split('/').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            dead.insert(pid);
            let dir = format!("{}/sns-chaos-{pid}", &point[..at]);
            dirs.entry(pid).or_default().insert(PathBuf::from(dir));
        }
    }
    for pid in &dead {
        let mine = parent.join(format!("sns-chaos-{pid}"));
        let mut runs = dirs.remove(pid).unwrap_or_default();
        runs.insert(mine.clone());
        for dir in runs {
            remove_run(&format!("{PREFIX}{pid}"), &dir);
        }
        let _ = std::fs::remove_dir_all(mine);
    }
    dead.len()
}
