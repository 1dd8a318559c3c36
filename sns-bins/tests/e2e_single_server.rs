//! End to end with real processes: the real `tsd`, two real `tsc` clients driven through pipes
//! (users 1 and 4 of the course's sanity case), then `tsd` killed with SIGKILL and restarted on
//! the same data directory: users, follows and timelines survive.

mod support;

use support::{Tsc, Tsd, free_port};

#[test]
fn course_sanity_case_survives_a_crash_of_the_server() {
    let data = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let mut tsd = Tsd::start(port, data.path());

    let mut one = Tsc::start(port, 1);
    one.expect_banner();
    let mut four = Tsc::start(port, 4);
    four.expect_banner();

    one.send("LIST");
    one.expect_line("Command completed successfully");
    one.expect_line("All users: 1, 4, ");
    one.expect_line("Followers: ");

    one.send("FOLLOW 4");
    one.expect_line("Command completed successfully");
    one.send("follow 4");
    one.expect_line("Input username already exists, command failed");
    one.send("FOLLOW 7");
    one.expect_line("Command failed with invalid username");
    one.send("UNFOLLOW");
    one.expect_line("Invalid Input -- No Arguments Given");
    one.send("DANCE");
    one.expect_line("Invalid Command");

    four.send("LIST");
    four.expect_line("Command completed successfully");
    four.expect_line("All users: 1, 4, ");
    four.expect_line("Followers: 1, ");

    one.enter_timeline();
    four.enter_timeline();

    four.send("hello from four");
    let line = one.next_line();
    assert!(
        line.starts_with("4 (") && line.ends_with(") >> hello from four"),
        "{line:?}"
    );
    one.send("one is not followed by four, so nobody sees this");
    four.send("second post");
    let line = one.next_line();
    assert!(line.ends_with(") >> second post"), "{line:?}");

    // Crash the server. Everything acknowledged (and seen live) was fsynced.
    tsd.kill();
    drop((one, four));
    let _tsd = Tsd::start(port, data.path());

    let mut one = Tsc::start(port, 1);
    one.expect_banner();
    one.send("LIST");
    one.expect_line("Command completed successfully");
    one.expect_line("All users: 1, 4, ");
    one.expect_line("Followers: ");
    one.send("FOLLOW 4");
    one.expect_line("Input username already exists, command failed");
    one.enter_timeline();
    // The last posts, newest first.
    let newest = one.next_line();
    assert!(newest.ends_with(") >> second post"), "{newest:?}");
    let older = one.next_line();
    assert!(older.ends_with(") >> hello from four"), "{older:?}");
}

#[test]
fn an_unreachable_server_is_one_line_and_exit_code_1() {
    let port = free_port();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tsc"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-u", "1"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run tsc");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
    assert!(output.stdout.is_empty());
}

#[test]
fn a_port_that_is_not_a_tiny_sns_server_is_said_plainly_in_one_line() {
    let coordinator = support::Coordinator::start(3);
    let port = coordinator.port.to_string();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tsc"))
        .args(["-h", "127.0.0.1", "-p", &port, "-u", "1"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run tsc");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("tsc: cannot use 127.0.0.1:{port}: "))
            && stderr.contains("not a Tiny SNS server"),
        "{stderr}"
    );
    assert!(!stderr.contains("Unimplemented"), "{stderr}");
}

#[test]
fn help_is_long_only_and_h_means_host() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tsc"))
        .arg("--help")
        .output()
        .expect("run tsc");
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("-h, --host"), "{text}");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tsd"))
        .arg("--help")
        .output()
        .expect("run tsd");
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("--data-dir"));
}

/// The notice a line that is not UTF-8 gets.
const NOT_TEXT: &str = "tsc: that line is not UTF-8 text; it was ignored";

#[test]
fn piped_lines_that_are_not_utf8_are_reported_and_the_client_carries_on() {
    let data = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let _tsd = Tsd::start(port, data.path());
    let mut one = Tsc::start(port, 1);
    one.expect_banner();
    let mut four = Tsc::start(port, 4);
    four.expect_banner();

    // In command mode: the bad line is reported, the next command runs.
    one.send_bytes(b"FOLLOW \xff4\n");
    assert_eq!(one.notices.next(), NOT_TEXT);
    one.send("FOLLOW 4");
    one.expect_line("Command completed successfully");
    one.enter_timeline();
    four.enter_timeline();

    // In timeline mode: the bad line is not posted, the next one is.
    four.send_bytes(b"caf\xe9 au lait\n");
    assert_eq!(four.notices.next(), NOT_TEXT);
    four.send("the line after");
    let line = one.next_line();
    assert!(line.ends_with(") >> the line after"), "{line:?}");
    assert_eq!(
        support::parse_post(&line),
        Some((4, "the line after".to_string())),
        "exactly the course's post line: {line:?}"
    );
}

#[test]
fn a_typed_line_that_is_not_utf8_is_reported_on_a_terminal_too() {
    let data = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let _tsd = Tsd::start(port, data.path());

    // User 4 on a pseudo-terminal (util-linux `script`), so the line editor reads the bytes.
    // Bytes typed before the editor switched the terminal to raw mode are echoed back as they
    // are, so the screen may show the invalid byte (the reader shows it as U+FFFD).
    let command = format!("{} -h 127.0.0.1 -p {port} -u 4", env!("CARGO_BIN_EXE_tsc"));
    let mut terminal = std::process::Command::new("script")
        .args(["-qfec", &command, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("script(1) runs tsc on a pseudo-terminal");
    let mut keys = terminal.stdin.take().expect("stdin");
    let screen = support::Lines::new(terminal.stdout.take().expect("stdout"), "tsc on a pty");
    let mut type_line = |bytes: &[u8]| {
        use std::io::Write;
        keys.write_all(bytes).expect("type");
        keys.flush().expect("flush");
    };
    screen.until(|l| l.contains("TIMELINE"));

    // User 1 follows 4 (known now) and reads its timeline through pipes.
    let mut one = Tsc::start(port, 1);
    one.expect_banner();
    one.send("FOLLOW 4");
    one.expect_line("Command completed successfully");
    one.enter_timeline();

    type_line(b"TIMELINE\r");
    screen.until(|l| l.contains("Now you are in the timeline"));
    type_line(b"caf\xe9\r");
    screen.until(|l| l.contains(NOT_TEXT));
    type_line(b"typed after it\r");
    let line = one.next_line();
    assert!(line.ends_with(") >> typed after it"), "{line:?}");
    let _ = terminal.kill();
    let _ = terminal.wait();
}

#[test]
fn sigterm_and_sighup_log_out_so_the_user_logs_in_again_at_once() {
    let data = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let _tsd = Tsd::start(port, data.path());
    for signal in ["TERM", "HUP", "TERM"] {
        let mut one = Tsc::start(port, 1);
        one.expect_banner();
        assert_eq!(
            one.signal_and_wait(signal),
            Some(0),
            "SIGTERM/SIGHUP exit 0"
        );
        assert_eq!(one.notices.next(), "tsc: stopped by a signal; logging out");
    }
    // In timeline mode as well.
    let mut one = Tsc::start(port, 1);
    one.expect_banner();
    one.enter_timeline();
    assert_eq!(one.signal_and_wait("HUP"), Some(0));
    // Logged out: a new login is accepted right away (a session would otherwise live 6 s).
    let again = Tsc::start(port, 1);
    again.expect_banner();
}

#[test]
fn extra_words_are_an_error_and_timeline_is_not_entered_by_accident() {
    let data = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let _tsd = Tsd::start(port, data.path());
    let _four = Tsc::start(port, 4);
    let mut one = Tsc::start(port, 1);
    one.expect_banner();
    for line in ["FOLLOW 4 5", "TIMELINE now", "LIST all"] {
        one.send(line);
        one.expect_line("Invalid Input -- Too Many Arguments");
    }
    // Still in command mode (LIST answers), and `FOLLOW 4 5` followed nobody: following 4
    // now is new.
    let (users, _) = one.list();
    assert_eq!(users.len(), 2);
    one.send("FOLLOW 4");
    one.expect_line("Command completed successfully");
}

#[test]
fn post_times_are_shown_in_the_readers_time_zone() {
    let data = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let _tsd = Tsd::start(port, data.path());
    let mut four = Tsc::start(port, 4);
    four.expect_banner();
    // A reader 5 h 30 min east of UTC (a POSIX TZ rule: no time zone database needed).
    let mut one = Tsc::spawn_with_env(
        &["-h", "127.0.0.1", "-p", &port.to_string(), "-u", "1"],
        &[("TZ", "XYZ-5:30")],
    );
    one.expect_banner();
    one.send("FOLLOW 4");
    one.expect_line("Command completed successfully");
    one.enter_timeline();
    four.enter_timeline();
    let before = chrono::Utc::now();
    four.send("what time is it");
    let line = one.next_line();
    let after = chrono::Utc::now();
    // Exactly the course's line, nothing after the year, in the reader's zone.
    assert_eq!(
        support::parse_post(&line),
        Some((4, "what time is it".to_string())),
        "{line:?}"
    );
    let india = chrono::FixedOffset::east_opt(5 * 3600 + 1800).expect("an offset");
    let shown = |t: chrono::DateTime<chrono::Utc>| {
        format!(
            "4 ({}) >> what time is it",
            t.with_timezone(&india).format("%a %b %e %H:%M:%S %Y")
        )
    };
    let mut t = before - chrono::Duration::seconds(1);
    let mut candidates = Vec::new();
    while t <= after + chrono::Duration::seconds(1) {
        candidates.push(shown(t));
        t += chrono::Duration::seconds(1);
    }
    assert!(
        candidates.contains(&line),
        "{line:?} is not one of {candidates:?}"
    );
}

/// What `tsc` prints on stderr (and its exit code) when it cannot log in with `args`.
fn refused_login(args: &[&str]) -> (Option<i32>, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tsc"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run tsc");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_port_that_is_not_tiny_sns_a_silent_one_and_a_closed_one_each_get_a_plain_sentence() {
    use std::io::Write;
    // A port that answers in another protocol (HTTP/1), and one that accepts and says nothing.
    let http = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let http_port = http.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in http.incoming().flatten() {
            let mut stream = stream;
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
            // Kept open, as an HTTP/1 server keeps a connection alive.
            held.push(stream);
        }
    });
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_port = silent.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming().flatten() {
            held.push(stream);
        }
    });
    let closed_port = free_port();
    let (http_port, silent_port, closed_port) = (
        http_port.to_string(),
        silent_port.to_string(),
        closed_port.to_string(),
    );
    for (args, says) in [
        (
            ["-p", http_port.as_str()],
            "cannot use the server at 127.0.0.1:",
        ),
        (
            ["-k", http_port.as_str()],
            "cannot reach the coordinator at 127.0.0.1:",
        ),
        (["-p", silent_port.as_str()], "did not answer in time"),
        (["-k", silent_port.as_str()], "did not answer in time"),
        (["-k", closed_port.as_str()], "nothing is listening there"),
    ] {
        let mut all = vec!["-h", "127.0.0.1", "-u", "1"];
        all.extend(args);
        let (code, stderr) = refused_login(&all);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        if args[1] == http_port {
            // It either answers in a way gRPC cannot read or closes: either way, a wrong port.
            assert!(
                stderr.contains("is that the right port?"),
                "{args:?}: {stderr}"
            );
        }
        for transport_words in ["h2", "http2", "tcp connect", "os error"] {
            assert!(
                !stderr.contains(transport_words),
                "{args:?}: {transport_words:?} in {stderr}"
            );
        }
    }
}

#[test]
fn listeners_on_port_0_log_the_port_they_got_and_advertise_it() {
    // A coordinator and a server of its cluster 1, both on ports the system chooses.
    let mut coordinator = std::process::Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .current_dir(support::sandbox())
        .args(["-p", "0", "--bind", "127.0.0.1", "--clusters", "1"])
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start coordinator");
    let log = support::Lines::new(coordinator.stderr.take().expect("stderr"), "coordinator");
    let serving = log.until(|l| l.contains("coordinator serving"));
    let port = bound_port(&serving);

    let data = tempfile::tempdir().expect("temp dir");
    let mut tsd = std::process::Command::new(env!("CARGO_BIN_EXE_tsd"))
        .current_dir(support::sandbox())
        .args([
            "-c",
            "1",
            "-s",
            "1",
            "-p",
            "0",
            "--bind",
            "127.0.0.1",
            "--clusters",
            "1",
        ])
        .args(["-h", "127.0.0.1", "-k", &port.to_string()])
        .arg("--data-dir")
        .arg(data.path())
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start tsd");
    let tsd_log = support::Lines::new(tsd.stderr.take().expect("stderr"), "tsd");
    let serving = tsd_log.until(|l| l.contains("serving clients"));
    let tsd_port = bound_port(&serving);
    // Once the coordinator named it master, it routes a client to the port the server has.
    let named = support::eventually(support::WAIT, || {
        let (_, status, _) = support::run(
            env!("CARGO_BIN_EXE_sns"),
            &["status", "-h", "127.0.0.1", "-k", &port.to_string()],
        );
        status.contains("master") && status.contains(&format!(":{tsd_port}"))
    });
    assert!(named, "the server never became master at its bound port");
    let one = Tsc::via(port, 1);
    one.expect_banner();
    let direct = Tsc::start(tsd_port, 4);
    direct.expect_banner();
    let _ = tsd.kill();
    let _ = coordinator.kill();
    let _ = tsd.wait();
    let _ = coordinator.wait();
}

/// The port in a log line's `addr=HOST:PORT`; it must not be 0.
fn bound_port(line: &str) -> u16 {
    let port = line
        .split_whitespace()
        .find_map(|word| word.strip_prefix("addr="))
        .and_then(|addr| addr.rsplit(':').next())
        .and_then(|port| port.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("no addr=HOST:PORT in {line:?}"));
    assert_ne!(port, 0, "{line}");
    port
}
