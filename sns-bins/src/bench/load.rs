//! The timed part of a run: every member reads its timeline into the [`Tally`], posts go out
//! (paced at `--rate`, or as fast as each poster's window allows) for `--warm-up` +
//! `--duration`, the scenario disrupts, and the run drains (at most `--drain`) before the
//! numbers are read.
//!
//! Latency runs from when a post was due (the schedule, so a stalled sender shows up in the
//! latencies instead of hiding them) to when a follower's client received it. In a closed loop
//! a post is due when its author may post it (after waiting for a place, with `--in-flight`). A failed
//! timeline stream or a refused post fails the run: its numbers would not mean what they say.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use tokio::task::JoinSet;

use super::latency::Percentiles;
use super::member::{Inbox, Poster};
use super::report::{self, Report};
use super::scenario::{SharedDeployment, disrupt};
use super::setup::progress;
use super::tally::{self, Tally, Verdict};
use super::{BenchArgs, Failure, Rng, Shape};

/// What went wrong on the timeline streams (one line each), shared with their readers.
type ReaderErrors = Arc<std::sync::Mutex<Vec<String>>>;

/// Runs the timed window over the open `timelines` (by index; `followers` says how many
/// deliveries each author's posts must get) and reports what it measured.
pub(super) async fn measure(
    args: &BenchArgs,
    followers: Vec<u32>,
    timelines: Vec<(Poster, Inbox)>,
    deployment: Option<SharedDeployment>,
) -> Result<Report, Failure> {
    let run_id = Rng::new(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()),
    )
    .next_u64();
    let base = Instant::now();
    let window = (args.warm_up, args.warm_up + args.duration);
    let mut tally = Tally::new(
        run_id,
        base,
        window,
        args.drain,
        followers,
        args.clusters,
        args.first_user,
    );
    if let Some(limit) = args.in_flight {
        tally = tally.bounding_in_flight(limit as usize);
    }
    let tally = Arc::new(tally);
    let reader_errors = ReaderErrors::default();
    let (posters, mut readers) = start_readers(timelines, &tally, &reader_errors);

    let disruption = tokio::spawn(disrupt(
        args.clone(),
        Arc::clone(&tally),
        deployment,
        window.0 + args.duration / 3,
    ));
    let bar = progress(args, window.1.as_secs(), "posting");
    let ticker = tokio::spawn(tick(bar.clone(), Arc::clone(&tally)));
    let cpu = tokio::spawn(cpu_in_window(base, window));
    let post_errors = Arc::new(AtomicU64::new(0));
    post(args, &posters, &tally, window.1, &post_errors).await;

    // The disruption may still be under way (a restarting broker); the drain waits for it.
    let disruption = disruption
        .await
        .map_err(|e| format!("the scenario's task failed: {e}"))??;
    bar.set_prefix("draining");
    drain(&tally, args.drain).await;
    ticker.abort();
    let cpu = cpu.await.ok().flatten();
    bar.finish_and_clear();
    readers.abort_all();
    drop(posters);

    let verdict = tally.verdict();
    let latencies = tally.percentiles();
    refusals(&reader_errors, &post_errors)?;
    Ok(report(args, &tally, verdict, latencies, disruption, cpu))
}

/// The CPU time this process used during the timed window (`base + window.0` to
/// `base + window.1`), where the system tells it.
async fn cpu_in_window(base: Instant, window: (Duration, Duration)) -> Option<Duration> {
    let at = |offset: Duration| tokio::time::Instant::from_std(base + offset);
    tokio::time::sleep_until(at(window.0)).await;
    let start = report::process_cpu()?;
    tokio::time::sleep_until(at(window.1)).await;
    Some(report::process_cpu()?.saturating_sub(start))
}

/// Starts a reader on every timeline's inbox; returns the posters, by index, and the readers.
fn start_readers(
    timelines: Vec<(Poster, Inbox)>,
    tally: &Arc<Tally>,
    errors: &ReaderErrors,
) -> (Arc<Vec<Poster>>, JoinSet<()>) {
    let mut posters = Vec::with_capacity(timelines.len());
    let mut readers = JoinSet::new();
    for (index, (poster, inbox)) in timelines.into_iter().enumerate() {
        posters.push(poster);
        readers.spawn(read(
            index as u32,
            inbox,
            Arc::clone(tally),
            Arc::clone(errors),
        ));
    }
    (Arc::new(posters), readers)
}

/// Waits until every expected delivery arrived, or `drain` has passed.
async fn drain(tally: &Tally, drain: Duration) {
    let drained_by = tokio::time::Instant::now() + drain;
    while tally.delivered() < tally.expected() && tokio::time::Instant::now() < drained_by {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The run's failure if a timeline stream failed or a post was refused.
fn refusals(reader_errors: &ReaderErrors, post_errors: &AtomicU64) -> Result<(), Failure> {
    let errors = std::mem::take(&mut *reader_errors.lock().unwrap_or_else(|p| p.into_inner()));
    if let Some(first) = errors.first() {
        return Err(format!(
            "{} timeline stream(s) failed, the first: {first}",
            errors.len()
        ));
    }
    let failed_posts = post_errors.load(Ordering::Relaxed);
    if failed_posts > 0 {
        return Err(format!("{failed_posts} post(s) were refused"));
    }
    Ok(())
}

/// The report of a run whose timed window `tally` measured (the in-process deployment's
/// shape is added by the caller that started it).
fn report(
    args: &BenchArgs,
    tally: &Tally,
    verdict: Verdict,
    (same, cross, all): (Percentiles, Percentiles, Percentiles),
    disruption: Option<Duration>,
    cpu: Option<Duration>,
) -> Report {
    let seconds = args.duration.as_secs_f64();
    let (same_cluster_curve, cross_cluster_curve) = tally.curves();
    Report {
        scenario: args.scenario.name().to_string(),
        target: match &args.host {
            Some(host) => sns_core::transport::address(host, args.port),
            None => "in-process".to_string(),
        },
        clusters: args.clusters,
        servers_per_cluster: None,
        bus: None,
        storage: None,
        users: args.users,
        follows_per_user: args.follows_per_user,
        graph: match args.graph {
            Shape::Uniform => "uniform",
            Shape::PowerLaw => "power-law",
        }
        .to_string(),
        rate: (args.rate > 0).then_some(args.rate),
        in_flight: args.in_flight,
        duration_s: seconds,
        warm_up_s: args.warm_up.as_secs_f64(),
        posts_per_s: tally.issued_in_window() as f64 / seconds,
        deliveries_per_s: tally.delivered_in_window() as f64 / seconds,
        same_cluster_ms: same,
        cross_cluster_ms: cross,
        all_ms: all,
        ok: verdict.exactly_once(),
        exactly_once: verdict,
        disruption_at_s: disruption.map(|d| d.as_secs_f64()),
        recovery_ms: tally.recovery().map(|d| d.as_secs_f64() * 1000.0),
        peak_memory_bytes: report::peak_memory(),
        cpu_s: cpu.map(|cpu| cpu.as_secs_f64()),
        cpu_ms_per_post: cpu
            .filter(|_| tally.issued_in_window() > 0)
            .map(|cpu| cpu.as_secs_f64() * 1000.0 / tally.issued_in_window() as f64),
        deliveries_per_second: tally.deliveries_per_second(),
        same_cluster_curve,
        cross_cluster_curve,
    }
}

/// Reads one user's timeline into the tally until the stream ends.
async fn read(index: u32, mut inbox: Inbox, tally: Arc<Tally>, errors: ReaderErrors) {
    let mut state = tally::ReaderState::default();
    while let Some(next) = inbox.next().await {
        match next {
            Ok(post) => tally.received(index, &mut state, &post.text),
            Err(e) => {
                errors
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(format!("reader {index}: {e}"));
                tally.unbound();
                return;
            }
        }
    }
}

/// Updates the progress bar every 200 ms.
async fn tick(bar: ProgressBar, tally: Arc<Tally>) {
    let mut last = (Instant::now(), tally.delivered());
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = (Instant::now(), tally.delivered());
        let rate = (now.1 - last.1) as f64 / (now.0 - last.0).as_secs_f64();
        last = now;
        bar.set_position(tally.now().as_secs());
        bar.set_message(format!(
            "{} posts, {} deliveries ({rate:.0}/s), {} pending",
            tally.issued(),
            now.1,
            tally.expected().saturating_sub(now.1)
        ));
    }
}

/// Posts until `until` (since the tally's base): paced at `--rate`, or as fast as possible.
async fn post(
    args: &BenchArgs,
    posters: &Arc<Vec<Poster>>,
    tally: &Arc<Tally>,
    until: Duration,
    errors: &Arc<AtomicU64>,
) {
    if args.rate > 0 {
        paced(args, posters, tally, until, errors).await;
    } else {
        flat_out(posters, tally, until, errors).await;
    }
}

/// Posts at `--rate`, each post by an author drawn at random, on schedule.
async fn paced(
    args: &BenchArgs,
    posters: &[Poster],
    tally: &Tally,
    until: Duration,
    errors: &AtomicU64,
) {
    let users = posters.len() as u32;
    let mut rng = Rng::new(args.seed.wrapping_add(0x5eed));
    let period = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let mut sent = 0u64;
    loop {
        let due = period.mul_f64(sent as f64);
        if due >= until {
            return;
        }
        let now = tally.now();
        if due > now {
            tokio::time::sleep(due - now).await;
        }
        let author = rng.below(users);
        let Some(text) = tally.issue(author, due) else {
            return;
        };
        if posters[author as usize].post(&text).await.is_err() {
            errors.fetch_add(1, Ordering::Relaxed);
        }
        sent += 1;
    }
}

/// Every author posts as fast as its poster allows; an author stops at its first refusal.
async fn flat_out(
    posters: &Arc<Vec<Poster>>,
    tally: &Arc<Tally>,
    until: Duration,
    errors: &Arc<AtomicU64>,
) {
    let mut tasks = JoinSet::new();
    for author in 0..posters.len() as u32 {
        let posters = Arc::clone(posters);
        let tally = Arc::clone(tally);
        let errors = Arc::clone(errors);
        tasks.spawn(async move {
            loop {
                tally.admit(until).await;
                let due = tally.now();
                if due >= until {
                    // Every poster passes here once at the end: its place goes to the next.
                    tally.withdraw();
                    return;
                }
                let Some(text) = tally.issue(author, due) else {
                    tally.withdraw();
                    return;
                };
                if posters[author as usize].post(&text).await.is_err() {
                    // A refused post may never be delivered: the run fails, and its place
                    // goes back so that the other posters still finish.
                    tally.withdraw();
                    errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                if tally.followers_of(author) == 0 {
                    // On its way to no one: its place is held only until it is sent.
                    tally.withdraw();
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}
