//! End to end with real processes and a coordinator: the course's MP2.1 test cases, and the
//! all-in-one `sns up`.

mod support;

use std::io::BufRead;
use std::process::{Command, Stdio};

use support::{Coordinator, Lines, Tsc, Tsd, free_port, run};

#[test]
fn mp2_1_sanity_then_server_killed_then_restarted() {
    let coordinator = Coordinator::start(3);
    let data = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let mut tsd = Tsd::join(1, 1, coordinator.port, port, data.path());

    // Sanity: a client lists and enters the timeline.
    let mut one = Tsc::via(coordinator.port, 1);
    one.expect_banner();
    one.send("LIST");
    one.expect_line("Command completed successfully");
    one.expect_line("All users: 1, ");
    one.expect_line("Followers: ");
    one.enter_timeline();
    drop(one);

    // Server killed before the client starts: one line, exit code 1.
    tsd.kill();
    let (code, stdout, stderr) = run(
        env!("CARGO_BIN_EXE_tsc"),
        &[
            "-h",
            "127.0.0.1",
            "-k",
            &coordinator.port.to_string(),
            "-u",
            "1",
        ],
    );
    assert_eq!(code, Some(1), "stdout: {stdout}\nstderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");

    // Server restarted: the client works again, and the data is still there.
    let _tsd = Tsd::join(1, 1, coordinator.port, port, data.path());
    let mut one = Tsc::via(coordinator.port, 1);
    one.expect_banner();
    one.send("LIST");
    one.expect_line("Command completed successfully");
    one.expect_line("All users: 1, ");
}

#[test]
fn a_client_says_so_in_one_line_when_no_server_is_alive() {
    let coordinator = Coordinator::start(3);
    let (code, stdout, stderr) = run(
        env!("CARGO_BIN_EXE_tsc"),
        &[
            "-h",
            "127.0.0.1",
            "-k",
            &coordinator.port.to_string(),
            "-u",
            "2",
        ],
    );
    assert_eq!(code, Some(1));
    assert!(stdout.is_empty());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cluster 2"), "{stderr}");
}

/// A running `sns up`, with the coordinator port it printed.
struct SnsUp {
    child: std::process::Child,
    port: u16,
    _stdout: Lines,
}

impl SnsUp {
    fn start(dir: &std::path::Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sns"))
            .args([
                "up",
                "--ports",
                "auto",
                "--heartbeat-ms",
                &support::Heartbeat::QUICK.interval_ms.to_string(),
            ])
            .arg("--data-dir")
            .arg(dir)
            .env("RUST_LOG", "warn")
            .env_remove("SNS_CLUSTER_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start sns up");
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut first = String::new();
        stdout.read_line(&mut first).expect("first line");
        let port = first
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no coordinator port in {first:?}"));
        Self {
            child,
            port,
            _stdout: Lines::new(stdout, "sns up"),
        }
    }
}

impl Drop for SnsUp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn sns_up_runs_a_whole_deployment_and_stops_cleanly_on_ctrl_c() {
    let data = tempfile::tempdir().expect("temp dir");
    let mut up = SnsUp::start(data.path());

    // Users 1 and 4 share cluster 1: they follow each other and exchange posts.
    let mut one = Tsc::via(up.port, 1);
    one.expect_banner();
    let mut four = Tsc::via(up.port, 4);
    four.expect_banner();
    one.send("FOLLOW 4");
    one.expect_line("Command completed successfully");
    four.send("FOLLOW 1");
    four.expect_line("Command completed successfully");
    one.enter_timeline();
    four.enter_timeline();
    one.send("hi four");
    assert!(four.next_line().ends_with(") >> hi four"));
    four.send("hi one");
    assert!(one.next_line().ends_with(") >> hi one"));

    // Status shows six live servers: a master and a slave per cluster, every slave mirroring
    // its master, in sync and (once the heartbeats report it) with nothing left to copy.
    // Its cluster token is in the data directory, where `sns status` finds it.
    let data_dir = data.path().display().to_string();
    let status = || {
        let (code, stdout, stderr) = run(
            env!("CARGO_BIN_EXE_sns"),
            &[
                "status",
                "-h",
                "127.0.0.1",
                "-k",
                &up.port.to_string(),
                "--data-dir",
                &data_dir,
            ],
        );
        assert_eq!(code, Some(0), "{stderr}");
        stdout
    };
    let mut stdout = String::new();
    let mirrored = support::eventually(support::WAIT, || {
        stdout = status();
        let rows: Vec<Vec<&str>> = stdout
            .lines()
            .map(|l| l.split_whitespace().collect())
            .filter(|cells: &Vec<&str>| cells.get(2).is_some_and(|r| *r == "slave"))
            .collect();
        // The last two columns are IN SYNC and LAG.
        rows.len() == 3 && rows.iter().all(|r| r[r.len() - 2..] == ["yes", "0"])
    });
    assert!(mirrored, "{stdout}");
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("master") || l.contains("slave"))
        .collect();
    assert_eq!(rows.len(), 6, "{stdout}");
    assert!(rows.iter().all(|r| r.contains(" yes ")), "{stdout}");
    assert_eq!(rows.iter().filter(|r| r.contains("master")).count(), 3);

    // Ctrl-C stops everything with exit code 0.
    drop((one, four));
    let pid = up.child.id().to_string();
    let sent = Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill -INT");
    assert!(sent.success());
    let status = up.child.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn sns_up_names_a_port_that_is_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let data = tempfile::tempdir().expect("temp dir");
    let (code, _stdout, stderr) = run(
        env!("CARGO_BIN_EXE_sns"),
        &[
            "up",
            "--port",
            &port.to_string(),
            "--data-dir",
            &data.path().display().to_string(),
        ],
    );
    assert_eq!(code, Some(1));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&format!("port {port}")), "{stderr}");
}

#[test]
fn a_client_in_timeline_mode_rides_out_a_server_restart_without_duplicates() {
    let coordinator = Coordinator::start(3);
    let data = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let mut tsd = Tsd::join(1, 1, coordinator.port, port, data.path());

    let mut four = Tsc::via(coordinator.port, 4);
    four.expect_banner();
    let mut one = Tsc::via(coordinator.port, 1);
    one.expect_banner();
    one.send("FOLLOW 4");
    one.expect_line("Command completed successfully");
    one.enter_timeline();
    four.enter_timeline();
    four.send("before the crash");
    assert!(one.next_line().ends_with(") >> before the crash"));

    tsd.kill();
    drop(four);
    let _tsd = Tsd::join(1, 1, coordinator.port, port, data.path());

    let mut four = Tsc::via(coordinator.port, 4);
    four.expect_banner();
    four.enter_timeline();
    four.send("after the restart");
    // User 1's client reconnected by itself; the post it already showed is not shown again.
    let next = one.next_line();
    assert!(next.ends_with(") >> after the restart"), "{next:?}");
}

#[test]
fn a_line_typed_while_the_server_is_down_is_posted_once_it_is_back() {
    let coordinator = Coordinator::start(3);
    let data = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let mut tsd = Tsd::join(1, 1, coordinator.port, port, data.path());

    let mut four = Tsc::via(coordinator.port, 4);
    four.expect_banner();
    let mut one = Tsc::via(coordinator.port, 1);
    one.expect_banner();
    one.send("FOLLOW 4");
    one.expect_line("Command completed successfully");
    one.enter_timeline();
    four.enter_timeline();
    four.send("before the crash");
    assert!(one.next_line().ends_with(") >> before the crash"));

    tsd.kill();
    // User 4 keeps typing while its server is gone; its client keeps the line.
    four.send("typed while the server is down");
    let _tsd = Tsd::join(1, 1, coordinator.port, port, data.path());
    let next = one.next_line();
    assert!(
        next.ends_with(") >> typed while the server is down"),
        "{next:?}"
    );
    // Stored once: the next line user 1 sees is the next one typed.
    four.send("after the restart");
    let next = one.next_line();
    assert!(next.ends_with(") >> after the restart"), "{next:?}");
}

#[test]
fn sns_up_with_ports_auto_keeps_an_explicit_port_and_prints_the_advertised_client_command() {
    let port = free_port();
    let data = tempfile::tempdir().expect("temp dir");
    let up = support::SnsUp::start(
        data.path(),
        &[
            "--port",
            &port.to_string(),
            "--clusters",
            "1",
            "--advertise-host",
            "localhost",
        ],
    );
    assert_eq!(up.port, port, "{:?}", up.printed);
    assert!(
        up.printed[0].starts_with("Tiny SNS is up: 1 cluster, "),
        "{:?}",
        up.printed
    );
    // Addresses are given as advertised.
    let command = format!("tsc -h localhost -k {port} -u <user id>");
    assert!(
        up.printed.iter().any(|l| l.ends_with(&command)),
        "{:?}",
        up.printed
    );
    // The coordinator really is there: a client logs in through it.
    let one = Tsc::via(port, 1);
    one.expect_banner();
}

#[test]
fn logs_written_to_a_file_carry_no_escape_codes() {
    let data = tempfile::tempdir().expect("temp dir");
    let log_path = data.path().join("sns.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sns"))
        .args(["up", "--ports", "auto", "--in-memory", "--clusters", "1"])
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .env_remove("SNS_CLUSTER_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start sns up");
    let stdout = Lines::new(child.stdout.take().expect("stdout"), "sns up");
    let first = stdout.next();
    let port: u16 = first
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no coordinator port in {first:?}"));
    stdout.until(|l| l == "Press Ctrl-C to stop.");
    // Something for the log to tell: a login, a refused one, a timeline opened and closed.
    let mut one = Tsc::via(port, 1);
    one.expect_banner();
    let (code, _, refused) = run(
        env!("CARGO_BIN_EXE_tsc"),
        &["-h", "127.0.0.1", "-k", &port.to_string(), "-u", "1"],
    );
    assert_eq!(code, Some(1), "{refused}");
    one.enter_timeline();
    assert_eq!(one.finish(), Some(0));
    support::send_signal(&child, "INT");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
    let written = std::fs::read_to_string(&log_path).expect("read the log");
    for said in [
        "role changed",
        "login",
        "login refused",
        "timeline stream opened",
        "timeline stream closed",
        "master assigned",
    ] {
        assert!(written.contains(said), "no {said:?} in the log: {written}");
    }
    assert!(
        !written.contains('\u{1b}'),
        "escape codes in a log written to a file: {written:?}"
    );
}
