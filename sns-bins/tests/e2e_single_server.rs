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
