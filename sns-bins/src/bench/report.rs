//! The end of a run: a summary for people, JSON for machines.

use std::time::Duration;

use serde::Serialize;

use super::latency::{CurvePoint, Percentiles};
use super::tally::Verdict;

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `steady`, `failover` or `broker-restart`.
    pub scenario: String,
    /// `in-process` or the coordinator's `host:port`.
    pub target: String,
    /// Clusters.
    pub clusters: u32,
    /// Servers per cluster (in-process runs).
    pub servers_per_cluster: Option<u32>,
    /// Synchronizer transport (in-process runs).
    pub bus: Option<String>,
    /// `file` or `memory` (in-process runs).
    pub storage: Option<String>,
    /// Users in the population.
    pub users: u32,
    /// Follows per user.
    pub follows_per_user: u32,
    /// `uniform` or `power-law`.
    pub graph: String,
    /// Posts per second asked for; `None`: as fast as possible.
    pub rate: Option<u32>,
    /// As fast as possible with at most this many posts on their way (`--in-flight`).
    pub in_flight: Option<u32>,
    /// Timed seconds.
    pub duration_s: f64,
    /// Untimed seconds of posting first.
    pub warm_up_s: f64,
    /// Posts sent in the timed window, per second.
    pub posts_per_s: f64,
    /// Deliveries received in the timed window, per second.
    pub deliveries_per_s: f64,
    /// Latency of deliveries to followers on the author's cluster, for posts due in the window.
    pub same_cluster_ms: Percentiles,
    /// Latency of deliveries to followers on other clusters.
    pub cross_cluster_ms: Percentiles,
    /// All deliveries.
    pub all_ms: Percentiles,
    /// Every post of the run (warm-up included) against its deliveries.
    pub exactly_once: Verdict,
    /// The scenario's disruption, seconds after the start of posting.
    pub disruption_at_s: Option<f64>,
    /// From the disruption to the first delivery of a post due after it, in milliseconds.
    pub recovery_ms: Option<f64>,
    /// The benchmark process's peak resident memory (deployment included when in-process).
    pub peak_memory_bytes: Option<u64>,
    /// CPU time (user + system) the benchmark process used in the timed window, in seconds
    /// (deployment included when in-process).
    pub cpu_s: Option<f64>,
    /// That CPU time per post sent in the window, in milliseconds.
    pub cpu_ms_per_post: Option<f64>,
    /// Whether every delivery arrived exactly once.
    pub ok: bool,
    /// Deliveries received in each second since posting began: warm-up, timed window and
    /// drain (the last second is partial).
    pub deliveries_per_second: Vec<u64>,
    /// Latency of same-cluster deliveries against percentile, 0 to 99.99% (posts due in the
    /// window; no points without deliveries).
    pub same_cluster_curve: Vec<CurvePoint>,
    /// The same for deliveries to other clusters.
    pub cross_cluster_curve: Vec<CurvePoint>,
}

impl Report {
    /// The summary table: the run's settings and throughput, its latencies, and its verdict.
    pub fn table(&self) -> String {
        let mut out = String::new();
        self.settings(&mut out);
        self.latencies(&mut out);
        out.push('\n');
        self.verdict(&mut out);
        out
    }

    /// What ran, under which load, and the throughput it reached.
    fn settings(&self, out: &mut String) {
        line(out, "scenario", self.scenario.clone());
        let mut target = self.target.clone();
        if let (Some(servers), Some(bus), Some(storage)) =
            (self.servers_per_cluster, &self.bus, &self.storage)
        {
            target.push_str(&format!(
                ": {} × {servers} servers, bus {bus}, storage {storage}",
                plural(u64::from(self.clusters), "cluster")
            ));
        } else {
            target.push_str(&format!(
                ", {}",
                plural(u64::from(self.clusters), "cluster")
            ));
        }
        line(out, "deployment", target);
        line(
            out,
            "population",
            format!(
                "{} users, {} follows each ({})",
                self.users, self.follows_per_user, self.graph
            ),
        );
        line(
            out,
            "load",
            format!(
                "{} for {:.0} s after {:.0} s of warm-up",
                match (self.rate, self.in_flight) {
                    (Some(rate), _) => format!("{rate} posts/s"),
                    (None, Some(n)) =>
                        format!("as fast as possible, at most {n} posts on their way"),
                    (None, None) => "as fast as possible".to_string(),
                },
                self.duration_s,
                self.warm_up_s
            ),
        );
        line(
            out,
            "throughput",
            format!(
                "{:.0} posts/s, {:.0} deliveries/s",
                self.posts_per_s, self.deliveries_per_s
            ),
        );
    }

    /// The latency percentiles: same cluster, other cluster, all.
    fn latencies(&self, out: &mut String) {
        out.push_str(&format!(
            "\n{:<16} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
            "latency (ms)", "deliveries", "p50", "p90", "p99", "p99.9", "max"
        ));
        for (name, p) in [
            ("same cluster", &self.same_cluster_ms),
            ("other cluster", &self.cross_cluster_ms),
            ("all", &self.all_ms),
        ] {
            out.push_str(&format!(
                "{name:<16} {:>10} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}\n",
                p.count, p.p50, p.p90, p.p99, p.p99_9, p.max
            ));
        }
    }

    /// Exactly once or not, the disruption and the recovery from it, and the peak memory.
    fn verdict(&self, out: &mut String) {
        let v = &self.exactly_once;
        line(
            out,
            "exactly once",
            format!(
                "{}: {} posts, {} of {} deliveries, {} missing, {} duplicate, {} unexpected",
                if self.ok { "yes" } else { "NO" },
                v.posts,
                v.delivered,
                v.expected,
                v.missing,
                v.duplicates,
                v.unexpected
            ),
        );
        if let Some(at) = self.disruption_at_s {
            line(
                out,
                "disruption",
                format!(
                    "at {at:.1} s; recovered {}",
                    self.recovery_ms
                        .map_or("never".to_string(), |ms| format!("after {ms:.0} ms"))
                ),
            );
        }
        if let Some(bytes) = self.peak_memory_bytes {
            line(
                out,
                "peak memory",
                format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0)),
            );
        }
        if let Some(cpu) = self.cpu_s {
            let per_post = self
                .cpu_ms_per_post
                .map_or(String::new(), |ms| format!(", {ms:.3} ms per post"));
            line(
                out,
                "process CPU",
                format!(
                    "{cpu:.2} s in the timed window ({:.0}% of one core){per_post}",
                    cpu * 100.0 / self.duration_s
                ),
            );
        }
    }
}

/// The worst figure of each kind across a series of runs (`--runs`): the lowest throughput,
/// the highest latencies, any run that was not exactly once.
#[derive(Debug, Clone, Serialize)]
pub struct Worst {
    /// Runs in the series.
    pub runs: usize,
    /// The lowest posts/s of a run.
    pub posts_per_s: f64,
    /// The lowest deliveries/s of a run.
    pub deliveries_per_s: f64,
    /// Same cluster: the highest p50, p90, p99, p99.9 and max of a run.
    pub same_cluster_ms: Percentiles,
    /// Other clusters: the same.
    pub cross_cluster_ms: Percentiles,
    /// All deliveries: the same.
    pub all_ms: Percentiles,
    /// Runs that were not exactly once.
    pub not_exactly_once: usize,
}

impl Worst {
    /// The worst of `reports` (at least one).
    pub fn of(reports: &[Report]) -> Self {
        let low = |f: fn(&Report) -> f64| reports.iter().map(f).fold(f64::INFINITY, f64::min);
        let high = |pick: fn(&Report) -> &Percentiles| Percentiles {
            count: reports.iter().map(|r| pick(r).count).min().unwrap_or(0),
            p50: reports.iter().map(|r| pick(r).p50).fold(0.0, f64::max),
            p90: reports.iter().map(|r| pick(r).p90).fold(0.0, f64::max),
            p99: reports.iter().map(|r| pick(r).p99).fold(0.0, f64::max),
            p99_9: reports.iter().map(|r| pick(r).p99_9).fold(0.0, f64::max),
            max: reports.iter().map(|r| pick(r).max).fold(0.0, f64::max),
        };
        Self {
            runs: reports.len(),
            posts_per_s: low(|r| r.posts_per_s),
            deliveries_per_s: low(|r| r.deliveries_per_s),
            same_cluster_ms: high(|r| &r.same_cluster_ms),
            cross_cluster_ms: high(|r| &r.cross_cluster_ms),
            all_ms: high(|r| &r.all_ms),
            not_exactly_once: reports.iter().filter(|r| !r.ok).count(),
        }
    }

    /// One line per run (throughput, p99 and max per path, exactly once) and the worst.
    pub fn table(&self, reports: &[Report]) -> String {
        let mut out = format!(
            "{:<6} {:>9} {:>12} {:>12} {:>12} {:>12} {:>12}  {}\n",
            "run",
            "posts/s",
            "deliveries/s",
            "same p99",
            "same max",
            "other p99",
            "other max",
            "exactly once"
        );
        let row = |out: &mut String,
                   name: String,
                   posts: f64,
                   deliveries: f64,
                   same: &Percentiles,
                   other: &Percentiles,
                   ok: String| {
            out.push_str(&format!(
                "{name:<6} {posts:>9.0} {deliveries:>12.0} {:>9.2} ms {:>9.2} ms {:>9.2} ms {:>9.2} ms  {ok}\n",
                same.p99, same.max, other.p99, other.max
            ));
        };
        for (i, r) in reports.iter().enumerate() {
            let ok = if r.ok { "yes" } else { "NO" };
            row(
                &mut out,
                (i + 1).to_string(),
                r.posts_per_s,
                r.deliveries_per_s,
                &r.same_cluster_ms,
                &r.cross_cluster_ms,
                ok.to_string(),
            );
        }
        let ok = match self.not_exactly_once {
            0 => "every run".to_string(),
            n => format!("NO in {}", plural(n as u64, "run")),
        };
        row(
            &mut out,
            "worst".to_string(),
            self.posts_per_s,
            self.deliveries_per_s,
            &self.same_cluster_ms,
            &self.cross_cluster_ms,
            ok,
        );
        out
    }
}

/// One `key  value` line of the summary.
fn line(out: &mut String, key: &str, value: String) {
    out.push_str(&format!("{key:<22} {value}\n"));
}

/// `1 cluster`, `3 clusters`.
fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// The CPU time (user + system) this process has used so far, where the system tells it
/// (`/proc/self/stat`, in the kernel's fixed 100 ticks a second).
pub(super) fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name, in parentheses, may hold spaces: count fields after its end.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// The process's peak resident set size (`VmHWM`), where the system tells it.
pub(super) fn peak_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    /// The figure grows with the CPU this process burns.
    #[test]
    fn process_cpu_counts_this_process_s_cpu_time() {
        let start = super::process_cpu().expect("/proc/self/stat on Linux");
        let began = Instant::now();
        let mut spin = 0u64;
        let mut now = start;
        while now < start + Duration::from_millis(200) && began.elapsed() < Duration::from_secs(60)
        {
            for i in 0..100_000u64 {
                spin = spin.wrapping_mul(6364136223846793005).wrapping_add(i);
            }
            now = super::process_cpu().expect("read again");
        }
        std::hint::black_box(spin);
        assert!(
            now >= start + Duration::from_millis(200),
            "200 ms of spinning shows: {start:?} -> {now:?}"
        );
    }
}
