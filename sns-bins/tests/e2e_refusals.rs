//! End to end with real processes: a server that cannot go on stops with one line and a
//! non-zero exit, so a supervisor restarts it (or its operator fixes its settings) instead of
//! it running unusable.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use support::{Coordinator, Lines, Tsc, exit_code, free_port, spawn_unwaited};

/// Starts `program` with `args`, its log read line by line.
fn spawn(program: &str, args: &[String], name: &str) -> (Child, Lines) {
    spawn_unwaited(Command::new(program), args, name)
}

/// The arguments of a `tsd` joining the coordinator on `coordinator`.
fn joining(cluster: u32, coordinator: u16, dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "-c",
        &cluster.to_string(),
        "-s",
        "1",
        "-k",
        &coordinator.to_string(),
        "-p",
        &free_port().to_string(),
        "--bind",
        "127.0.0.1",
        "--heartbeat-ms",
        "200",
        "--data-dir",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.push(dir.display().to_string());
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// The last line `log` printed before the process ended.
fn last_line(log: &Lines) -> String {
    let mut last = String::new();
    while let Some(line) = log.next_or_end() {
        last = line;
    }
    last
}

#[test]
fn a_server_whose_cluster_the_coordinator_does_not_route_exits_with_one_line() {
    let coordinator = Coordinator::start(3);
    let data = tempfile::tempdir().expect("temp dir");
    // The server believes in 9 clusters; the coordinator routes 3.
    let args = joining(7, coordinator.port, data.path(), &["--clusters", "9"]);
    let (mut tsd, log) = spawn(env!("CARGO_BIN_EXE_tsd"), &args, "tsd 7/1");
    assert_eq!(exit_code(&mut tsd), Some(1));
    let last = last_line(&log);
    assert!(
        last.starts_with("tsd: the coordinator at ") && last.contains("refused this server"),
        "{last}"
    );
    assert!(last.contains("cluster id 7 is outside 1..=3"), "{last}");
}

#[test]
fn a_server_with_the_wrong_cluster_token_exits_with_one_line() {
    let port = free_port();
    let args: Vec<String> = [
        "-p",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--clusters",
        "3",
        "--cluster-token",
        "the-right-one",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let (mut coordinator, coordinator_log) =
        spawn(env!("CARGO_BIN_EXE_coordinator"), &args, "coordinator");
    coordinator_log.until(|l| l.contains("coordinator serving"));

    let data = tempfile::tempdir().expect("temp dir");
    let args = joining(1, port, data.path(), &["--cluster-token", "a-wrong-one"]);
    let (mut tsd, log) = spawn(env!("CARGO_BIN_EXE_tsd"), &args, "tsd 1/1");
    assert_eq!(exit_code(&mut tsd), Some(1));
    let last = last_line(&log);
    assert!(
        last.starts_with("tsd: the coordinator at ") && last.contains("refused this server"),
        "{last}"
    );
    let _ = coordinator.kill();
    let _ = coordinator.wait();
}

/// A tmpfs of `bytes` mounted on a new directory, unmounted on drop; `None` where mounting is
/// not allowed (not root).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(bytes: u64) -> Option<Self> {
        let dir = tempfile::tempdir().expect("temp dir");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(Self { dir })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[test]
fn a_server_whose_disk_fills_up_exits_with_one_line() {
    let Some(disk) = SmallDisk::mount(256 * 1024) else {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    };
    let port = free_port();
    let args: Vec<String> = ["-p", &port.to_string(), "--bind", "127.0.0.1", "--data-dir"]
        .iter()
        .map(|a| a.to_string())
        .chain([disk.dir.path().display().to_string()])
        .collect();
    let (mut tsd, log) = spawn(env!("CARGO_BIN_EXE_tsd"), &args, "tsd");
    log.until(|l| l.contains("serving clients"));

    // User 1 posts 4,000-byte lines until the 256 KiB disk is full.
    let mut one = Tsc::start(port, 1);
    one.expect_banner();
    one.enter_timeline();
    let line = "x".repeat(4000);
    for _ in 0..200 {
        if tsd.try_wait().expect("wait").is_some() || !one.try_send(&line) {
            break;
        }
    }
    assert_eq!(exit_code(&mut tsd), Some(1));
    let last = last_line(&log);
    assert!(
        last.starts_with("tsd: storage failed, refusing requests:"),
        "{last}"
    );
}
