//! `hold`: how many client connections and timeline streams one running `tsd` holds, and what
//! they cost it in memory (results in `docs/benchmarks.md`, "Limits").
//!
//! Opens `--connections` connections to the server at `--addr`, each logging in a user of its
//! own (users `1..=N`), then one timeline stream on each served connection, then `--extra`
//! more streams of the first users (on their connections). Reads the server's resident memory
//! (`VmRSS` in `/proc/<--pid>/status`) before, after the connections and after the streams,
//! and prints how many connections and streams were served and refused (with the first
//! refusal's reason), and the memory per connection and per stream. Everything stays open
//! until the report is printed.
//!
//! ```sh
//! ./target/release/tsd -p 10000 --bind 127.0.0.1 --data-dir /tmp/hold & sleep 1
//! ./target/release/hold --addr 127.0.0.1:10000 --pid $! --connections 10050 --extra 100
//! ```

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use sns_core::{Client, Network, TimelineSender, TimelineStream, UserId};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Open connections and timeline streams against a running `tsd`, and report its memory.
#[derive(Debug, Parser)]
#[command(name = "hold")]
struct Args {
    /// The server's `host:port`.
    #[arg(long)]
    addr: String,
    /// The server's process id (for its resident memory).
    #[arg(long)]
    pid: u32,
    /// Connections to open, one user each.
    #[arg(long, default_value_t = 1000)]
    connections: u32,
    /// Streams to open beyond one per connection (second streams of the first users).
    #[arg(long, default_value_t = 0)]
    extra: u32,
    /// Connections or streams being opened at once.
    #[arg(long, default_value_t = 64)]
    parallel: usize,
}

type Failure = Box<dyn std::error::Error>;

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = sns_benches::runtime();
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hold: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The server's resident memory, in KiB.
fn rss_kib(pid: u32) -> Result<u64, Failure> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or("no VmRSS line")?;
    Ok(line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?)
}

/// Served and refused attempts, with the first refusal's reason.
#[derive(Debug, Default)]
struct Tally {
    refused: u32,
    first_refusal: Option<String>,
}

impl Tally {
    fn refuse(&mut self, why: String) {
        self.refused += 1;
        self.first_refusal.get_or_insert(why);
    }
}

async fn run(args: Args) -> Result<(), Failure> {
    let network = Network::tcp();
    let base = rss_kib(args.pid)?;
    println!("server RSS at the start: {base} KiB");

    let gate = Arc::new(Semaphore::new(args.parallel.max(1)));
    let mut logins = JoinSet::new();
    for id in 1..=args.connections {
        let user = UserId::new(id).ok_or("user ids start at 1")?;
        let (network, addr, gate) = (network.clone(), args.addr.clone(), Arc::clone(&gate));
        logins.spawn(async move {
            let _turn = gate.acquire_owned().await;
            Client::login(&network, &addr, user).await
        });
    }
    let mut clients = Vec::new();
    let mut connections = Tally::default();
    while let Some(joined) = logins.join_next().await {
        match joined? {
            Ok(client) => clients.push(client),
            Err(e) => connections.refuse(e.to_string()),
        }
    }
    clients.sort_by_key(Client::user);
    let with_connections = rss_kib(args.pid)?;
    report("connections", clients.len(), &connections);

    let mut opens = JoinSet::new();
    let extra = usize::try_from(args.extra)?;
    for client in clients.iter().chain(clients.iter().take(extra)) {
        let (client, gate) = (client.clone(), Arc::clone(&gate));
        opens.spawn(async move {
            let _turn = gate.acquire_owned().await;
            client.timeline().await
        });
    }
    let mut streams: Vec<(TimelineSender, TimelineStream)> = Vec::new();
    let mut refused_streams = Tally::default();
    while let Some(joined) = opens.join_next().await {
        match joined? {
            Ok(stream) => streams.push(stream),
            Err(e) => refused_streams.refuse(e.to_string()),
        }
    }
    let with_streams = rss_kib(args.pid)?;
    report("timeline streams", streams.len(), &refused_streams);

    println!(
        "server RSS: {base} KiB at the start, {with_connections} KiB with the connections, \
         {with_streams} KiB with the streams"
    );
    if !clients.is_empty() {
        println!(
            "per connection: {:.1} KiB",
            per(with_connections.saturating_sub(base), clients.len())
        );
    }
    if !streams.is_empty() {
        println!(
            "per stream: {:.1} KiB",
            per(with_streams.saturating_sub(with_connections), streams.len())
        );
    }
    Ok(())
}

fn report(what: &str, served: usize, tally: &Tally) {
    println!("{what}: {served} served, {} refused", tally.refused);
    if let Some(why) = &tally.first_refusal {
        println!("  first refusal: {why}");
    }
}

#[allow(clippy::cast_precision_loss)]
fn per(kib: u64, count: usize) -> f64 {
    kib as f64 / count as f64
}
