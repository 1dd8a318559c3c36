//! `sns bench` as a user runs it: against the deployment it starts in its own process, against
//! a deployment of real processes (coordinator, `tsd`s, synchronizers) through `-h`/`-k`, with
//! a master aborted mid-run, and with flags that cannot work. Every run is small and short;
//! the report's exactly-once verdict, not its speed, is what these tests check.

mod support;

use serde_json::Value;
use support::{Coordinator, Heartbeat, Synchronizer, free_port, run, three_clusters};

const SNS: &str = env!("CARGO_BIN_EXE_sns");

/// A small, short run's flags: 30 users following 5 each, 200 posts/s for `duration` after
/// 0.5 s of warm-up, reported as JSON, with `extra` flags after them.
fn small<'a>(duration: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--users",
        "30",
        "--follows-per-user",
        "5",
        "--rate",
        "200",
        "--duration",
        duration,
        "--warm-up",
        "500ms",
        "--json",
    ];
    args.extend_from_slice(extra);
    args
}

fn bench(args: &[&str]) -> (Option<i32>, Value, String) {
    let mut all = vec!["bench"];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = run(SNS, &all);
    let report = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (code, report, stderr)
}

/// The report shows a run that posted, delivered every post to every follower exactly once,
/// and measured deliveries on the author's cluster and on the others.
fn assert_exactly_once(report: &Value, stderr: &str) {
    let verdict = &report["exactly_once"];
    assert_eq!(report["ok"], Value::Bool(true), "{report:#}\n{stderr}");
    let posts = verdict["posts"].as_u64().unwrap_or(0);
    let expected = verdict["expected"].as_u64().unwrap_or(0);
    assert!(posts >= 200, "only {posts} posts: {report:#}");
    assert!(expected >= posts, "{report:#}");
    assert_eq!(verdict["delivered"].as_u64(), Some(expected), "{report:#}");
    for zero in ["missing", "duplicates", "unexpected"] {
        assert_eq!(verdict[zero].as_u64(), Some(0), "{zero}: {report:#}");
    }
    for class in ["same_cluster_ms", "cross_cluster_ms"] {
        assert!(
            report[class]["count"].as_u64().unwrap_or(0) > 0,
            "no {class} deliveries: {report:#}"
        );
    }
    assert!(report["deliveries_per_s"].as_f64().unwrap_or(0.0) > 0.0);
}

#[test]
fn an_in_process_run_delivers_every_post_exactly_once_and_reports_it_as_json() {
    let (code, report, stderr) = bench(&small("1s", &["--seed", "7", "--storage", "file"]));
    assert_eq!(code, Some(0), "{stderr}");
    assert_exactly_once(&report, &stderr);
    assert_eq!(report["target"], "in-process");
    assert_eq!(report["clusters"], 3);
    assert_eq!(report["bus"], "local");
    assert_eq!(report["storage"], "file");
    assert!(report["peak_memory_bytes"].as_u64().unwrap_or(0) > 0);
}

#[test]
fn the_summary_table_names_the_verdict_and_both_latency_classes() {
    let args: Vec<&str> = small("1s", &["--storage", "memory", "--graph", "power-law"])
        .into_iter()
        .filter(|a| *a != "--json")
        .collect();
    let (code, stdout, stderr) = run(SNS, &[&["bench"], &args[..]].concat());
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("exactly once           yes"), "{stdout}");
    assert!(stdout.contains("same cluster"), "{stdout}");
    assert!(stdout.contains("other cluster"), "{stdout}");
    assert!(stdout.contains("(power-law)"), "{stdout}");
}

#[test]
fn a_picture_of_the_run_is_written_after_it() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("run.html");
    let path_text = path.to_str().expect("a UTF-8 path");
    let (code, report, stderr) = bench(&small(
        "1s",
        &["--storage", "memory", "--report", path_text],
    ));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!("report written to {path_text}")),
        "{stderr}"
    );
    let page = std::fs::read_to_string(&path).expect("the picture");
    assert!(page.starts_with("<!DOCTYPE html>"), "{page}");
    assert!(page.contains("<svg ") && page.contains("</svg>"), "{page}");
    assert_eq!(page.matches("<polyline").count(), 3, "{page}");
    assert!(page.contains("same cluster: p99 "), "{page}");
    // The data drawn is in the JSON report too: a point per second, the curves.
    let per_second = report["deliveries_per_second"]
        .as_array()
        .expect("an array");
    let total: u64 = per_second.iter().filter_map(Value::as_u64).sum();
    assert!(per_second.len() >= 2, "{report:#}");
    assert_eq!(Some(total), report["exactly_once"]["delivered"].as_u64());
    for curve in ["same_cluster_curve", "cross_cluster_curve"] {
        let points = report[curve].as_array().map_or(0, Vec::len);
        assert_eq!(points, 81, "{curve}: {report:#}");
    }

    // Where the picture cannot go, the run fails after it, saying so.
    let taken = dir.path().join("taken.svg");
    std::fs::create_dir(&taken).expect("a directory");
    let taken_text = taken.to_str().expect("a UTF-8 path");
    let (code, _, stderr) = bench(&small(
        "500ms",
        &["--storage", "memory", "--report", taken_text],
    ));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("--report: cannot write"), "{stderr}");
}

#[test]
fn a_deployment_of_real_processes_is_driven_through_its_coordinator() {
    let data = tempfile::tempdir().expect("a temporary directory");
    // Slow heartbeats: the other tests of this file load the machine with in-process benches,
    // and a master must not step down for a stalled beat in the middle of the run.
    let coordinator = Coordinator::start_with(3, Heartbeat::FAILOVER);
    let _servers = three_clusters(&coordinator, data.path());
    let _synchronizers: Vec<Synchronizer> = (1..=3)
        .map(|c| Synchronizer::start(&coordinator, c, free_port(), "local"))
        .collect();
    let port = coordinator.port.to_string();
    let args = small("1s", &["-h", "127.0.0.1", "-k", &port]);
    let (code, report, stderr) = bench(&args);
    assert_eq!(code, Some(0), "{stderr}");
    assert_exactly_once(&report, &stderr);
    assert_eq!(report["target"], format!("127.0.0.1:{port}"));

    // Everyone was logged out, so the same population runs again at once.
    let (code, report, stderr) = bench(&args);
    assert_eq!(code, Some(0), "second run: {stderr}");
    assert_exactly_once(&report, &stderr);
}

#[test]
fn course_mode_plain_clients_deliver_exactly_once_too() {
    // `--course` drives servers that speak only the course's protocol: plain clients, posts
    // without keys. Ours speak it as well, so the same check holds.
    let (code, report, stderr) = bench(&small("1s", &["--storage", "memory", "--course"]));
    assert_eq!(code, Some(0), "{stderr}");
    assert_exactly_once(&report, &stderr);
}

#[test]
fn a_master_aborted_mid_run_loses_and_repeats_nothing() {
    let mut args = vec!["failover"];
    args.extend(small("3s", &["--storage", "memory"]));
    let (code, report, stderr) = bench(&args);
    assert_eq!(code, Some(0), "{stderr}");
    assert_exactly_once(&report, &stderr);
    assert_eq!(report["scenario"], "failover");
    assert!(report["disruption_at_s"].as_f64().is_some(), "{report:#}");
    let recovery = report["recovery_ms"].as_f64();
    assert!(
        recovery.is_some_and(|ms| ms > 0.0),
        "no delivery of cluster 1's posts after the abort: {report:#}"
    );
}

#[test]
fn flags_that_cannot_work_are_refused_before_anything_starts() {
    for (args, says) in [
        (
            &["--users", "10", "--follows-per-user", "10"][..],
            "--follows-per-user must be below --users",
        ),
        (&["failover", "-h", "127.0.0.1"][..], "only in-process"),
        (&["failover", "--servers", "1"][..], "--servers 2"),
        (&["broker-restart"][..], "--bus amqp://"),
        (&["--duration", "soon"][..], "not a duration"),
        (&["--bus", "carrier-pigeon"][..], "unknown bus"),
        (
            &["--first-user", "2147483647", "--users", "2"][..],
            "--first-user",
        ),
        (
            &["--report", "run.png"][..],
            "--report: FILE must end in .svg or .html",
        ),
        (
            &["--report", "/no/such/directory/run.svg"][..],
            "does not exist",
        ),
    ] {
        let (code, _, stderr) = bench(args);
        // 1: refused by the benchmark; 2: by the flag parser.
        assert!(matches!(code, Some(1 | 2)), "{args:?}: {code:?} {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
