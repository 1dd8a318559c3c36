//! `sns`: the all-in-one command.
//!
//! - `sns up`: starts a coordinator and N clusters × (master + slave) in this process, with
//!   durable storage under `--data-dir` (default `./sns-data/cluster<c>/server<s>/`), on the
//!   course's ports (coordinator 9090, server s of cluster c on `c*10000 + s - 1`) or on
//!   ephemeral ports (`--ports auto`). Prints where everything runs; Ctrl-C or SIGTERM stops
//!   every component and exits 0. A damaged data directory stops it with a message naming the
//!   damage; `--repair` cuts each damaged log at its first damage instead.
//!   Every slave mirrors its cluster's master and is promoted when the master dies (only an
//!   in-sync one, unless `--allow-unclean-promotion`). One synchronizer per cluster carries
//!   users, follows and posts between clusters over `--bus`: `local` (default: it reads the
//!   other clusters' masters directly) or `grpc` (synchronizers serve `sns.v1.Sync` and
//!   subscribe to each other; cluster c's on port `9000 + c` with the course's ports).
//!   Every internal call needs the cluster token: the one given (`--cluster-token`,
//!   `SNS_CLUSTER_TOKEN`), else the one kept in `--cluster-token-file` or
//!   `<data-dir>/cluster-token`, made there (random, mode 0600) on the first start; with
//!   `--in-memory` a new one each start, shown in the table it prints.
//! - `sns status [-h HOST -k PORT] [--data-dir DIR]`: the coordinator's view as a table (with
//!   the token from `DIR/cluster-token`, default `./sns-data`, when none is given): per server its role,
//!   the cluster's epoch and its log's, its durable and committed indexes, and for a slave
//!   whether it is in sync and how many entries it lags behind its master.
//! - `sns bench [steady|failover|broker-restart]`: the load generator (see
//!   `sns_bins::bench`): a population of users posting through the client library, every
//!   delivery's latency and an exactly-once check; exit code 1 if a delivery was missing or
//!   repeated. `--report FILE.svg` (or `.html`) draws each run's latency percentiles and
//!   deliveries per second into FILE afterwards.
//! - `sns chaos [--duration 60s] [--seed N] [--clusters 3] [--bus local|grpc] [--json]`: the
//!   deployment as separate hosts (network namespaces) under a nemesis, and a checker of the
//!   recorded history (see `sns_bins::chaos`); needs root; exit code 1 on any violation.

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{ArgAction, CommandFactory, Parser, Subcommand};
use sns_bins::bus::parse_bus;
use sns_bins::status::StatusArgs;
use sns_bins::up::UpArgs;

/// Tiny SNS: run a whole deployment, or inspect one.
#[derive(Debug, Parser)]
#[command(
    name = "sns",
    version,
    disable_help_flag = true,
    disable_help_subcommand = true
)]
struct Args {
    #[command(subcommand)]
    command: Command,
    /// Print help.
    #[arg(long, action = ArgAction::Help, global = true)]
    help: Option<bool>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a coordinator and every cluster in this process.
    Up(Box<UpArgs>),
    /// Show the coordinator's routing table.
    Status(StatusArgs),
    /// Load generator: build a population, post, measure every delivery (latency, throughput,
    /// exactly once). Starts its own deployment in this process unless -h/-k name one.
    Bench(Box<sns_bins::bench::BenchArgs>),
    /// Fault injection on real hosts: the deployment in network namespaces, a nemesis that
    /// kills, pauses, partitions and fills disks, and a checker of what clients saw. Needs
    /// root. Exit code 1 on any violation, naming the seed that reproduces it.
    Chaos(Box<sns_bins::chaos::ChaosArgs>),
    /// The load client of `sns chaos`, started by it inside its own namespace.
    #[command(hide = true)]
    ChaosAgent(Box<sns_bins::chaos::AgentArgs>),
}

fn main() -> ExitCode {
    match Args::parse().command {
        Command::Up(args) => {
            // Parsed here rather than by clap, whose error would repeat the value (a URL's
            // password).
            let bus = parse_bus(args.bus()).unwrap_or_else(|e| {
                Args::command()
                    .error(ErrorKind::InvalidValue, format!("--bus: {e}"))
                    .exit()
            });
            sns_bins::init_logging();
            sns_bins::up::main(*args, bus)
        }
        Command::Status(args) => {
            sns_bins::init_logging_at("warn");
            sns_bins::run_main("sns status", sns_bins::status::run(args))
        }
        Command::Bench(args) => {
            sns_bins::init_logging_at("error");
            sns_bins::run_main("sns bench", bench(*args))
        }
        Command::Chaos(args) => {
            sns_bins::init_logging_at("error");
            sns_bins::run_main("sns chaos", chaos(*args))
        }
        Command::ChaosAgent(args) => {
            sns_bins::init_logging_at("error");
            sns_bins::run_main("sns chaos-agent", sns_bins::chaos::run_agent(*args))
        }
    }
}

async fn chaos(args: sns_bins::chaos::ChaosArgs) -> Result<(), String> {
    if args.clean {
        let cleaned = sns_bins::chaos::clean(&args)?;
        eprintln!("sns chaos: removed what {cleaned} earlier run(s) left behind");
        return Ok(());
    }
    let json = args.json;
    let outcome = sns_bins::chaos::run(args).await?;
    if json {
        println!("{}", to_json(&outcome)?);
    } else {
        print!("{}", outcome.table());
    }
    if outcome.ok() {
        return Ok(());
    }
    Err(format!(
        "the history violates the system's guarantees; reproduce with --seed {}",
        outcome.seed
    ))
}

async fn bench(args: sns_bins::bench::BenchArgs) -> Result<(), String> {
    let json = args.json;
    let picture = args.report.clone();
    let reports = sns_bins::bench::run_all(args).await?;
    let worst = sns_bins::bench::Worst::of(&reports);
    match (&reports[..], json) {
        ([report], true) => println!("{}", to_json(report)?),
        ([report], false) => print!("{}", report.table()),
        (_, true) => println!(
            "{}",
            to_json(&serde_json::json!({ "runs": reports, "worst": worst }))?
        ),
        (_, false) => {
            for (i, report) in reports.iter().enumerate() {
                println!("── run {} of {}", i + 1, reports.len());
                print!("{}", report.table());
                println!();
            }
            println!("── {} runs", reports.len());
            print!("{}", worst.table(&reports));
        }
    }
    if let Some(path) = picture {
        sns_bins::bench::picture::write(&path, &reports)?;
        eprintln!("report written to {}", path.display());
    }
    let failed: Vec<String> = reports
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.ok)
        .map(|(i, r)| {
            let v = &r.exactly_once;
            let run = if reports.len() > 1 {
                format!("run {}: ", i + 1)
            } else {
                String::new()
            };
            format!(
                "{run}{} missing, {} duplicate, {} unexpected deliveries",
                v.missing, v.duplicates, v.unexpected
            )
        })
        .collect();
    if failed.is_empty() {
        return Ok(());
    }
    Err(format!("not exactly once: {}", failed.join("; ")))
}

fn to_json(value: &impl serde::Serialize) -> Result<String, String> {
    serde_json::to_string_pretty(value).map_err(|e| e.to_string())
}
