//! A damaged data directory and the real `tsd`: a bit flip in the log with valid records after
//! it makes `tsd` exit non-zero with one line on stderr naming the segment and byte offset and
//! suggesting `--repair`; `tsd --repair` starts, says at WARN what it dropped, and serves what
//! came before the damage. `sns up` likewise refuses, and starts with `--repair`.

mod support;

use std::process::{Command, Output, Stdio};

use support::{SnsUp, Tsc, Tsd, free_port};

/// Runs `program` with `args` (logging at `RUST_LOG=log`) until it exits, which it must do
/// within [`support::WAIT`] (it is killed and the test fails otherwise).
fn run_to_exit(program: &str, args: &[&str], log: &str) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .env("RUST_LOG", log)
        .env_remove("SNS_CLUSTER_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start");
    if !support::eventually(support::WAIT, || child.try_wait().expect("wait").is_some()) {
        let _ = child.kill();
        panic!("{program} {args:?} did not stop on a damaged data directory");
    }
    child.wait_with_output().expect("output")
}

/// Byte offsets where the records of a segment start (`[len: u32 LE][crc: u32 LE][payload]`),
/// up to the zeros the writer allocates ahead of them.
fn record_starts(bytes: &[u8]) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + 8) {
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        if len == 0 {
            break;
        }
        starts.push(at);
        at += 8 + len as usize;
    }
    starts
}

#[test]
fn a_damaged_log_stops_tsd_in_one_line_and_repair_starts_it() {
    let data = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let mut tsd = Tsd::start(port, data.path());
    let mut one = Tsc::start(port, 1);
    one.expect_banner();
    let four = Tsc::start(port, 4);
    four.expect_banner();
    one.send("FOLLOW 4");
    one.expect_line("Command completed successfully");
    drop((one, four));
    tsd.kill();

    // Flip a bit in the second record (user 4 joining); the follow comes after it.
    let segment = data.path().join(format!("log-{:020}.seg", 1));
    let mut bytes = std::fs::read(&segment).expect("read the segment");
    let starts = record_starts(&bytes);
    assert!(starts.len() >= 3, "user 1, user 4, the follow: {starts:?}");
    bytes[starts[1] + 12] ^= 0x04;
    std::fs::write(&segment, &bytes).expect("damage the segment");

    let dir = data.path().display().to_string();
    let port_arg = port.to_string();
    let output = run_to_exit(
        env!("CARGO_BIN_EXE_tsd"),
        &["-p", &port_arg, "--bind", "127.0.0.1", "--data-dir", &dir],
        "info",
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("[tsd refusing] {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    for part in [
        "tsd: data directory ",
        "log-00000000000000000001.seg",
        &format!("damaged at byte {} ", starts[1]),
        "valid records follow it",
        "run tsd --repair",
    ] {
        assert!(stderr.contains(part), "{part:?} in {stderr}");
    }
    assert!(output.stdout.is_empty());
    assert_eq!(
        std::fs::read(&segment).expect("read"),
        bytes,
        "a refusal changes nothing"
    );

    // With --repair: the damaged record and everything after it go, the rest serves.
    let dropped = starts.len() - 2;
    let (mut repaired, warning) = Tsd::start_with(port, data.path(), &["--repair"], |l| {
        l.contains("repair: cut the damage away")
    });
    assert!(warning.contains("WARN"), "{warning}");
    assert!(
        warning.contains(&format!(
            "dropping {dropped} valid record(s) and 0 segment file(s)"
        )),
        "{warning}"
    );
    assert!(warning.contains("the log now ends at index 1"), "{warning}");
    repaired.log.until(|l| l.contains("serving clients"));
    let mut one = Tsc::start(port, 1);
    one.expect_banner();
    one.send("LIST");
    one.expect_line("Command completed successfully");
    one.expect_line("All users: 1, ");
    one.expect_line("Followers: ");
    drop(one);
    repaired.kill();
}

#[test]
fn sns_up_refuses_a_damaged_server_directory_and_starts_with_repair() {
    let data = tempfile::tempdir().expect("temp dir");
    let server = data.path().join("cluster1").join("server2");
    std::fs::create_dir_all(&server).expect("server directory");
    std::fs::write(server.join("last-segment"), b"junk").expect("damage");
    let dir = data.path().display().to_string();
    let args = [
        "up",
        "--ports",
        "auto",
        "--clusters",
        "1",
        "--data-dir",
        &dir,
    ];
    let output = run_to_exit(env!("CARGO_BIN_EXE_sns"), &args, "warn");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("[sns up refusing] {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    for part in [
        "sns up: data directory ",
        "last-segment is damaged",
        "run sns up --repair",
    ] {
        assert!(stderr.contains(part), "{part:?} in {stderr}");
    }

    // It comes up (the repair's WARN is in its log, echoed on the test's stderr).
    let up = SnsUp::start(data.path(), &["--clusters", "1", "--repair"]);
    assert!(
        up.printed[0].starts_with("Tiny SNS is up"),
        "{:?}",
        up.printed
    );
}
