//! End to end with real processes: protected by default. `sns up` makes and keeps a cluster
//! token that `sns status` and the other binaries find on their own; internal calls without it
//! are refused; a component without a token listens on loopback only unless `--insecure`.
//!
//! Every process runs in a directory of its own, so a `./sns-data` of the developer's is never
//! read.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use sns_proto::csce438::ServerInfo;
use sns_proto::csce438::coord_service_client::CoordServiceClient;
use support::{Lines, free_port, send_signal};

/// A child process, killed when dropped.
struct Running(Child);

impl Running {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// Its exit code, once it exits by itself; fails the test if it runs on past the deadline.
    fn exit_code(&mut self) -> Option<i32> {
        support::exit_code(&mut self.0)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `program` with `args` in `cwd`, its log captured; waits for a line that says it is
/// ready, and returns every line up to it too.
fn spawn(program: &str, args: &[&str], cwd: &Path, ready: &str) -> (Running, Lines, Vec<String>) {
    let mut child = Command::new(program)
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("SNS_CLUSTER_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {program}: {e}"));
    let log = Lines::new(child.stderr.take().expect("stderr"), program);
    let running = Running(child);
    let mut seen = Vec::new();
    loop {
        let line = log.next();
        let done = line.contains(ready);
        seen.push(line);
        if done {
            return (running, log, seen);
        }
    }
}

/// Runs `program` with `args` in `cwd` to completion, with `env` added.
fn run_in(program: &str, args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(cwd)
        .env("NO_COLOR", "1")
        .env_remove("SNS_CLUSTER_TOKEN")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `sns status` against the coordinator on `port`, run in `cwd`.
fn status(port: u16, cwd: &Path, env: &[(&str, &str)]) -> Output {
    run_in(
        env!("CARGO_BIN_EXE_sns"),
        &["status", "-h", "127.0.0.1", "-k", &port.to_string()],
        cwd,
        env,
    )
}

/// A running `sns up` in `cwd` with `args`, and what it printed up to "Press Ctrl-C to stop.".
struct Up {
    child: Child,
    port: u16,
    printed: Vec<String>,
    _stdout: Lines,
}

impl Up {
    fn start(cwd: &Path, args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sns"))
            .args([
                "up",
                "--ports",
                "auto",
                "--clusters",
                "1",
                "--heartbeat-ms",
                "200",
            ])
            .args(args)
            .current_dir(cwd)
            .env("RUST_LOG", "warn")
            .env_remove("SNS_CLUSTER_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sns up");
        let stdout = Lines::new(child.stdout.take().expect("stdout"), "sns up");
        let _log = Lines::new(child.stderr.take().expect("stderr"), "sns up log");
        let mut printed = Vec::new();
        loop {
            let line = stdout.next();
            let done = line == "Press Ctrl-C to stop.";
            printed.push(line);
            if done {
                break;
            }
        }
        let port = printed[0]
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no coordinator port in {:?}", printed[0]));
        Self {
            child,
            port,
            printed,
            _stdout: stdout,
        }
    }

    /// The printed line that starts with `label`, without it.
    fn line(&self, label: &str) -> String {
        self.printed
            .iter()
            .find_map(|l| l.strip_prefix(label))
            .map(|rest| rest.trim().to_string())
            .unwrap_or_else(|| panic!("no {label:?} line in {:?}", self.printed))
    }

    fn stop(mut self) {
        send_signal(&self.child, "INT");
        let code = self.child.wait().expect("wait").code();
        assert_eq!(code, Some(0), "sns up stops cleanly");
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends one heartbeat as server 2 of cluster 1 to the coordinator on `port`, with `token` if
/// given, and a synchronizer's registration without it (asserted refused); returns the status
/// code the heartbeat was answered with.
fn heartbeat(port: u16, token: Option<&str>) -> tonic::Code {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let channel = sns_core::Network::tcp()
            .connect(&format!("127.0.0.1:{port}"))
            .await
            .expect("reach the coordinator");
        let mut rpc = CoordServiceClient::new(channel);
        let info = ServerInfo {
            server_id: 2,
            hostname: "127.0.0.1".to_string(),
            port: free_port().to_string(),
            r#type: "server".to_string(),
            cluster_id: 1,
            ..ServerInfo::default()
        };
        let mut request = tonic::Request::new(info.clone());
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("sns-cluster-token", token.parse().expect("ascii"));
        }
        let heartbeat = rpc.heartbeat(request).await;
        let register = rpc
            .register_sync_server(tonic::Request::new(ServerInfo {
                server_id: 7,
                r#type: "synchronizer".to_string(),
                ..info
            }))
            .await;
        // A synchronizer's registration without the token is refused alike.
        assert_eq!(
            register.map(|_| ()).map_err(|s| s.code()),
            Err(tonic::Code::Unauthenticated)
        );
        match heartbeat {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        }
    })
}

#[test]
fn sns_up_keeps_a_token_file_that_sns_status_finds_and_nobody_without_it_gets_in() {
    let home = tempfile::tempdir().expect("temp dir");
    let elsewhere = tempfile::tempdir().expect("temp dir");
    // First start, with the default data directory: a token is made and kept, mode 0600.
    let up = Up::start(home.path(), &[]);
    let file = home.path().join("sns-data/cluster-token");
    assert_eq!(
        up.line("Cluster token:"),
        "in ./sns-data/cluster-token (made now)"
    );
    assert_eq!(
        up.line("Status:"),
        format!("sns status -h 127.0.0.1 -k {}", up.port)
    );
    let mode = std::fs::metadata(&file)
        .expect("token file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let token = std::fs::read_to_string(&file).expect("read the token");
    let token = token.strip_suffix('\n').expect("one line");
    assert_eq!(token.len(), 64, "{token}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{token}");

    // `sns status` in the same directory needs no token typed.
    let shown = status(up.port, home.path(), &[]);
    assert!(shown.status.success(), "{}", text(&shown.stderr));
    assert!(
        text(&shown.stdout).contains("master"),
        "{}",
        text(&shown.stdout)
    );
    // Without the token (another directory), status, heartbeats and registrations are refused.
    let refused = status(up.port, elsewhere.path(), &[]);
    assert_eq!(refused.status.code(), Some(1));
    let why = text(&refused.stderr);
    assert!(why.contains("wants the cluster token"), "{why}");
    assert_eq!(why.trim_end().lines().count(), 1, "{why}");
    let wrong = status(up.port, elsewhere.path(), &[("SNS_CLUSTER_TOKEN", "guess")]);
    assert!(text(&wrong.stderr).contains("refused this cluster token"));
    assert_eq!(heartbeat(up.port, None), tonic::Code::Unauthenticated);
    assert_eq!(
        heartbeat(up.port, Some("guess")),
        tonic::Code::Unauthenticated
    );
    // With the token, as given by hand, status works from anywhere.
    let given = status(up.port, elsewhere.path(), &[("SNS_CLUSTER_TOKEN", token)]);
    assert!(given.status.success(), "{}", text(&given.stderr));
    up.stop();

    // The next start keeps the same token.
    let again = Up::start(home.path(), &[]);
    assert_eq!(
        again.line("Cluster token:"),
        "in ./sns-data/cluster-token (kept)"
    );
    let kept = std::fs::read_to_string(&file).expect("read the token");
    assert_eq!(kept.trim_end(), token);
    let shown = status(again.port, home.path(), &[]);
    assert!(shown.status.success(), "{}", text(&shown.stderr));
    again.stop();

    // Another data directory: the table says how to point `sns status` at it.
    let other = home.path().join("elsewhere-data");
    let other_arg = other.display().to_string();
    let up = Up::start(home.path(), &["--data-dir", &other_arg]);
    let command = up.line("Status:");
    assert_eq!(
        command,
        format!(
            "sns status -h 127.0.0.1 -k {} --data-dir {other_arg}",
            up.port
        )
    );
    let args: Vec<&str> = command.split_whitespace().skip(1).collect();
    let shown = run_in(env!("CARGO_BIN_EXE_sns"), &args, elsewhere.path(), &[]);
    assert!(shown.status.success(), "{}", text(&shown.stderr));
    up.stop();

    // A token file that holds garbage stops `sns up` with one line, and is left as it is.
    std::fs::write(&file, b"\x00\xff not a token\n").expect("write");
    let failed = run_in(
        env!("CARGO_BIN_EXE_sns"),
        &["up", "--ports", "auto", "--clusters", "1"],
        home.path(),
        &[],
    );
    assert_eq!(failed.status.code(), Some(1));
    let why = text(&failed.stderr);
    assert!(why.contains("does not hold a token"), "{why}");
    assert_eq!(why.trim_end().lines().count(), 1, "{why}");
    assert_eq!(
        std::fs::read(&file).expect("read"),
        b"\x00\xff not a token\n"
    );
}

#[test]
fn sns_up_in_memory_shows_its_token_and_writes_no_file() {
    let home = tempfile::tempdir().expect("temp dir");
    let up = Up::start(home.path(), &["--in-memory"]);
    let shown = up.line("Cluster token:");
    let token = shown
        .strip_suffix(" (this run only)")
        .unwrap_or_else(|| panic!("{shown}"));
    assert_eq!(token.len(), 64, "{token}");
    assert_eq!(
        up.line("Status:"),
        format!(
            "SNS_CLUSTER_TOKEN={token} sns status -h 127.0.0.1 -k {}",
            up.port
        )
    );
    assert!(!home.path().join("sns-data").exists(), "nothing written");
    let with = status(up.port, home.path(), &[("SNS_CLUSTER_TOKEN", token)]);
    assert!(with.status.success(), "{}", text(&with.stderr));
    let without = status(up.port, home.path(), &[]);
    assert_eq!(without.status.code(), Some(1));
    assert_eq!(heartbeat(up.port, None), tonic::Code::Unauthenticated);
    up.stop();
}

#[test]
fn the_coordinator_and_tsd_read_the_kept_token_and_a_server_without_it_is_refused() {
    let home = tempfile::tempdir().expect("temp dir");
    let elsewhere = tempfile::tempdir().expect("temp dir");
    // The token `sns up` would have kept, in ./sns-data of the deployment's directory.
    std::fs::create_dir(home.path().join("sns-data")).expect("mkdir");
    std::fs::write(home.path().join("sns-data/cluster-token"), "kept-token\n").expect("write");
    let port = free_port();
    let port_arg = port.to_string();
    let (_coordinator, _log, _) = spawn(
        env!("CARGO_BIN_EXE_coordinator"),
        &["-p", &port_arg, "--clusters", "1", "--heartbeat-ms", "200"],
        home.path(),
        "coordinator serving",
    );
    assert_eq!(heartbeat(port, None), tonic::Code::Unauthenticated);
    assert_eq!(heartbeat(port, Some("kept-token")), tonic::Code::Ok);
    // A server started elsewhere has no token: its heartbeat is refused, and it exits with one
    // line saying so.
    let (mut stranger, stranger_log, _) = spawn(
        env!("CARGO_BIN_EXE_tsd"),
        &[
            "-c",
            "1",
            "-s",
            "2",
            "-k",
            &port_arg,
            "-p",
            "0",
            "--in-memory",
            "--heartbeat-ms",
            "200",
        ],
        elsewhere.path(),
        "joining the deployment",
    );
    assert_eq!(stranger.exit_code(), Some(1));
    let said = stranger_log.until(|l| l.contains("refused this server"));
    assert!(said.contains("cluster token"), "{said}");
    // A server started beside the token file finds it and is made master, and `sns status`
    // there shows it.
    let (_tsd, _tsd_log, _) = spawn(
        env!("CARGO_BIN_EXE_tsd"),
        &[
            "-c",
            "1",
            "-s",
            "1",
            "-k",
            &port_arg,
            "-p",
            "0",
            "--in-memory",
            "--heartbeat-ms",
            "200",
        ],
        home.path(),
        "role assigned",
    );
    let mut last = String::new();
    let named = support::eventually(support::WAIT, || {
        let shown = status(port, home.path(), &[]);
        last = format!("{}{}", text(&shown.stdout), text(&shown.stderr));
        last.lines()
            .any(|l| l.split_whitespace().take(3).eq(["1", "1", "master"]))
    });
    assert!(named, "{last}");
}

#[test]
fn without_a_token_coordinator_and_tsd_listen_beyond_loopback_only_when_told_insecure() {
    let home = tempfile::tempdir().expect("temp dir");
    let refused = |program: &str, args: &[&str]| {
        let out = run_in(program, args, home.path(), &[]);
        assert_eq!(out.status.code(), Some(1), "{program} {args:?}");
        let why = text(&out.stderr);
        assert!(why.contains("refusing to listen on 0.0.0.0"), "{why}");
        assert!(why.contains("--insecure"), "{why}");
        assert_eq!(why.trim_end().lines().count(), 1, "{why}");
    };
    let port = free_port().to_string();
    refused(
        env!("CARGO_BIN_EXE_coordinator"),
        &["-p", &port, "--bind", "0.0.0.0", "--no-cluster-token"],
    );
    refused(
        env!("CARGO_BIN_EXE_tsd"),
        &["-k", &port, "-p", "0", "--bind", "0.0.0.0", "--in-memory"],
    );

    // With --insecure they start, and say so loudly.
    let (mut coordinator, _, seen) = spawn(
        env!("CARGO_BIN_EXE_coordinator"),
        &[
            "-p",
            "0",
            "--bind",
            "0.0.0.0",
            "--no-cluster-token",
            "--insecure",
        ],
        home.path(),
        "coordinator serving",
    );
    coordinator.kill();
    assert!(
        seen.iter()
            .any(|l| l.contains("ERROR") && l.contains("INSECURE")),
        "{seen:?}"
    );
    let (mut tsd, _, seen) = spawn(
        env!("CARGO_BIN_EXE_tsd"),
        &[
            "-k",
            &port,
            "-p",
            "0",
            "--bind",
            "0.0.0.0",
            "--in-memory",
            "--insecure",
        ],
        home.path(),
        "serving clients",
    );
    tsd.kill();
    assert!(
        seen.iter()
            .any(|l| l.contains("ERROR") && l.contains("INSECURE")),
        "{seen:?}"
    );

    // With a token they need no --insecure and say nothing of it.
    let (mut coordinator, _, seen) = spawn(
        env!("CARGO_BIN_EXE_coordinator"),
        &["-p", "0", "--bind", "0.0.0.0", "--cluster-token", "s3cret"],
        home.path(),
        "coordinator serving",
    );
    coordinator.kill();
    assert!(!seen.iter().any(|l| l.contains("INSECURE")), "{seen:?}");
    // By default they listen on loopback.
    let (mut tsd, _, seen) = spawn(
        env!("CARGO_BIN_EXE_tsd"),
        &["-k", &port, "-p", "0", "--in-memory"],
        home.path(),
        "serving clients",
    );
    tsd.kill();
    let serving = seen.last().expect("a line");
    assert!(serving.contains("addr=127.0.0.1:"), "{serving}");
}

#[test]
fn separate_processes_started_from_one_directory_are_protected_without_a_token_typed() {
    use std::os::unix::fs::PermissionsExt;
    let home = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let port_arg = port.to_string();
    let coordinator_args = [
        "-p",
        port_arg.as_str(),
        "--clusters",
        "1",
        "--heartbeat-ms",
        "200",
    ];
    // The course's commands, no token anywhere: the coordinator makes one and says where.
    let (mut coordinator, _log, seen) = spawn(
        env!("CARGO_BIN_EXE_coordinator"),
        &coordinator_args,
        home.path(),
        "coordinator serving",
    );
    let file = home.path().join("sns-data/cluster-token");
    assert!(
        seen.iter()
            .any(|l| l.contains("made a cluster token") && l.contains("sns-data/cluster-token")),
        "{seen:?}"
    );
    let mode = std::fs::metadata(&file).expect("kept").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let token = std::fs::read_to_string(&file).expect("read");
    let token = token.trim();
    assert_eq!(token.len(), 64, "{token:?}");
    // Nobody without it gets in: a forged heartbeat rerouting the cluster is refused.
    assert_eq!(heartbeat(port, None), tonic::Code::Unauthenticated);
    // A server started from the same directory finds it and is made master.
    let tsd_args = [
        "-c",
        "1",
        "-s",
        "1",
        "-k",
        port_arg.as_str(),
        "-p",
        "0",
        "--in-memory",
        "--heartbeat-ms",
        "200",
    ];
    let (_tsd, _tsd_log, _) = spawn(
        env!("CARGO_BIN_EXE_tsd"),
        &tsd_args,
        home.path(),
        "role assigned",
    );
    // A coordinator started again there keeps the same token, and makes none.
    coordinator.kill();
    let (_coordinator, _log, seen) = spawn(
        env!("CARGO_BIN_EXE_coordinator"),
        &coordinator_args,
        home.path(),
        "coordinator serving",
    );
    assert!(
        !seen.iter().any(|l| l.contains("made a cluster token")),
        "{seen:?}"
    );
    assert_eq!(std::fs::read_to_string(&file).expect("read").trim(), token);
    assert_eq!(heartbeat(port, Some(token)), tonic::Code::Ok);
    // `sns status` there needs no token typed.
    let mut last = String::new();
    let named = support::eventually(support::WAIT, || {
        let shown = status(port, home.path(), &[]);
        last = format!("{}{}", text(&shown.stdout), text(&shown.stderr));
        last.lines()
            .any(|l| l.split_whitespace().take(3).eq(["1", "1", "master"]))
    });
    assert!(named, "{last}");
}
