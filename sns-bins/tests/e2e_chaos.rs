//! `sns chaos` on real network namespaces: a fixed-seed schedule passes every check, and a run
//! leaves nothing behind, whether it is interrupted (SIGINT) or dies (SIGKILL, then
//! `sns chaos --clean`).
//!
//! These need root, `ip` and `nft`. Without them each test says why and passes, unless
//! `SNS_REQUIRE_CHAOS=1` (set by CI) makes that a failure. The runs take the machine's two
//! cores for a minute, so this file's tests run one at a time.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const SNS: &str = env!("CARGO_BIN_EXE_sns");
/// One run at a time.
static ONE_RUN: Mutex<()> = Mutex::new(());

/// Whether this machine can run `sns chaos`; panics instead of skipping under
/// `SNS_REQUIRE_CHAOS=1`.
fn can_run() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let tools = ["ip", "nft"].iter().all(|tool| {
        Command::new(tool)
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if root && tools {
        return true;
    }
    let why = if root {
        "ip or nft is missing"
    } else {
        "not root"
    };
    if std::env::var("SNS_REQUIRE_CHAOS").is_ok_and(|v| v == "1") {
        panic!("SNS_REQUIRE_CHAOS=1 but sns chaos cannot run here: {why}");
    }
    eprintln!("skipped: sns chaos cannot run here ({why})");
    false
}

/// The namespaces of run `pid` that exist now.
fn namespaces_of(pid: u32) -> Vec<String> {
    let listed = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let prefix = format!("snsc{pid}-");
    String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| name.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

/// The mounts under `dir` that exist now.
fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = format!("{}/", dir.display());
    std::fs::read_to_string("/proc/self/mounts")
        .expect("mounts")
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|point| point.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

fn wait_exit(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "sns chaos did not end within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `sns chaos` with `args` and returns it once its first fault was made (so every host
/// and process exists), with the rest of its stderr still being read.
fn start_until_first_fault(args: &[&str], work: &Path) -> Child {
    let mut child = Command::new(SNS)
        .arg("chaos")
        .args(args)
        .arg("--work-dir")
        .arg(work)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sns chaos starts");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[sns chaos] {line}");
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(" s  ") => return child,
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("sns chaos made no fault within 3 minutes");
            }
        }
    }
}

#[test]
fn a_fixed_seed_schedule_passes_every_check() {
    let _one = ONE_RUN.lock().unwrap_or_else(|e| e.into_inner());
    if !can_run() {
        return;
    }
    let work = tempfile::tempdir().expect("a work directory");
    let history = work.path().join("history.jsonl");
    let output = Command::new(SNS)
        .args(["chaos", "--duration", "60s", "--seed", "20261207", "--json"])
        .arg("--work-dir")
        .arg(work.path())
        .arg("--history")
        .arg(&history)
        .stderr(Stdio::inherit())
        .output()
        .expect("sns chaos runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("the report is JSON ({e}): {stdout}"));
    assert!(
        output.status.success(),
        "sns chaos found violations: {report:#}"
    );
    let findings = &report["findings"];
    for (kind, count) in findings["violations"].as_object().expect("violations") {
        assert_eq!(count, 0, "{kind}: {report:#}");
    }
    assert_eq!(findings["trouble"].as_array().map(Vec::len), Some(0));
    let faults: u64 = report["faults"]
        .as_object()
        .expect("faults")
        .values()
        .filter_map(serde_json::Value::as_u64)
        .sum();
    assert!(faults >= 8, "a minute of faults made only {faults}");
    let stored = findings["stored"].as_u64().expect("stored");
    assert!(stored > 100, "only {stored} posts were acknowledged");
    assert!(findings["deliveries"].as_u64().expect("deliveries") >= stored);
    // The history is kept as asked, one event per line.
    let text = std::fs::read_to_string(&history).expect("the history file");
    let events: Vec<sns_bins::chaos::Event> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("an event"))
        .collect();
    let made = events
        .iter()
        .filter(|e| matches!(e, sns_bins::chaos::Event::Fault { .. }))
        .count();
    assert_eq!(made as u64, faults);
    // The checker, run again on the file, agrees.
    assert!(sns_bins::chaos::check(&events).ok());
    // Nothing is left: no namespace, no mount, no run directory.
    assert!(mounts_under(work.path()).is_empty());
    let leftovers: Vec<_> = std::fs::read_dir(work.path())
        .expect("work dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .filter(|name| name.to_string_lossy().starts_with("sns-chaos-"))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}

#[test]
fn an_interrupted_run_removes_everything_it_made() {
    let _one = ONE_RUN.lock().unwrap_or_else(|e| e.into_inner());
    if !can_run() {
        return;
    }
    let work = tempfile::tempdir().expect("a work directory");
    let mut run = start_until_first_fault(&["--duration", "60s", "--seed", "3"], work.path());
    let pid = run.id();
    assert!(namespaces_of(pid).len() >= 10, "{:?}", namespaces_of(pid));
    assert!(!mounts_under(work.path()).is_empty());
    let pids = processes_in(&namespaces_of(pid));
    assert!(pids.len() >= 10, "the run's processes: {pids:?}");
    Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .expect("kill -INT");
    let status = wait_exit(&mut run, Duration::from_secs(60));
    assert!(!status.success(), "an interrupted run does not pass");
    assert_nothing_left(pid, work.path(), &pids);
}

#[test]
fn what_a_killed_run_leaves_the_next_one_removes() {
    let _one = ONE_RUN.lock().unwrap_or_else(|e| e.into_inner());
    if !can_run() {
        return;
    }
    let work = tempfile::tempdir().expect("a work directory");
    let mut run = start_until_first_fault(&["--duration", "60s", "--seed", "4"], work.path());
    let pid = run.id();
    run.kill().expect("SIGKILL");
    run.wait().expect("reaped");
    // A run that dies cannot clean up: its hosts, processes and disks are still there.
    let left = namespaces_of(pid);
    assert!(left.len() >= 10, "{left:?}");
    let pids = processes_in(&left);
    assert!(pids.len() >= 10, "the run's processes: {pids:?}");
    assert!(!mounts_under(work.path()).is_empty());
    let cleaned = Command::new(SNS)
        .args(["chaos", "--clean", "--work-dir"])
        .arg(work.path())
        .output()
        .expect("sns chaos --clean");
    assert!(cleaned.status.success(), "{cleaned:?}");
    assert!(
        String::from_utf8_lossy(&cleaned.stderr).contains("removed what 1 earlier run"),
        "{cleaned:?}"
    );
    assert_nothing_left(pid, work.path(), &pids);
}

/// No namespace of run `pid`, no mount under `work`, none of `pids` running.
fn assert_nothing_left(pid: u32, work: &Path, pids: &[String]) {
    assert_eq!(namespaces_of(pid), Vec::<String>::new());
    assert_eq!(mounts_under(work), Vec::<String>::new());
    let alive: Vec<&String> = pids.iter().filter(|pid| is_alive(pid)).collect();
    assert!(alive.is_empty(), "still running: {alive:?}");
}

/// The processes in these namespaces now.
fn processes_in(namespaces: &[String]) -> Vec<String> {
    namespaces
        .iter()
        .flat_map(|netns| {
            let listed = Command::new("ip")
                .args(["netns", "pids", netns])
                .output()
                .expect("ip netns pids");
            String::from_utf8_lossy(&listed.stdout)
                .split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Whether process `pid` exists and is not a zombie waiting to be reaped.
fn is_alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

#[test]
fn without_root_it_says_so_in_one_line_and_makes_nothing() {
    // As root, drop to nobody with setpriv; as anyone else, just run it.
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let mut command = if root {
        if Command::new("setpriv").arg("--version").output().is_err() {
            eprintln!("skipped: running as root and setpriv is missing");
            return;
        }
        let mut command = Command::new("setpriv");
        command.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            SNS,
        ]);
        command
    } else {
        Command::new(SNS)
    };
    let work = tempfile::tempdir().expect("a work directory");
    let output = command
        .args(["chaos", "--duration", "5s", "--work-dir"])
        .arg(work.path())
        .output()
        .expect("sns chaos runs");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("needs root"), "{stderr}");
    assert!(
        std::fs::read_dir(work.path())
            .expect("work dir")
            .next()
            .is_none(),
        "it made files"
    );
}
