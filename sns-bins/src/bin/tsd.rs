//! `tsd`: a Tiny SNS server.
//!
//! `tsd -c CLUSTER -s SERVER -h COORD_HOST -k COORD_PORT -p PORT [--clusters N] [--data-dir DIR]`
//! runs server SERVER of cluster CLUSTER: it heartbeats the coordinator, which makes it master or
//! slave, and serves the course's `SNSService` (and its `csce662` alias) on `--bind`:PORT.
//! `--clusters` (default 3) must match the coordinator's: only users of this cluster get
//! timelines here. Without `-k` it runs standalone (always master, the course's MP1 form) and
//! every user is its own. Its log and snapshots live in
//! DIR (default `./sns-data/cluster<c>/server<s>/`), fsynced before anything is acknowledged.
//! A damaged DIR stops it with a one-line message naming the damage; `--repair` cuts the log
//! at the first damage instead, logging what it dropped.
//! SIGINT or SIGTERM stops it cleanly (exit 0).
//!
//! Joined to a coordinator, its cluster token is `--cluster-token` (or `SNS_CLUSTER_TOKEN`),
//! else the one in `--cluster-token-file`, else `./sns-data/cluster-token` if that file exists
//! (where `sns up` keeps it); without one it listens on loopback only (`--bind`, default
//! 127.0.0.1) unless `--insecure`. A standalone server serves no internal calls, so it may
//! bind any address.
//!
//! Limits (see `docs/operations.md`): `--max-connections` (default 10,000, lowered to leave
//! file descriptors for the log when `ulimit -n` is lower), `--handshake-timeout-secs`,
//! `--max-timeline-streams`, `--max-streams-per-user` and `--max-posts-per-second` (per user).
//! Another cluster's events dated beyond this server's clock plus `--max-clock-skew` (default
//! 10 minutes) are refused.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{ArgAction, Parser};
use sns_core::node;
use sns_core::server::{DEFAULT_MAX_CONNECTIONS, connection_cap};
use sns_core::transport::{self, Network};
use sns_core::{ClusterId, CoordinatorLink, MemoryStorage, ServerConfig, ServerId, Storage};
use tokio_util::sync::CancellationToken;

/// Tiny SNS server.
#[derive(Debug, Parser)]
#[command(name = "tsd", version, disable_help_flag = true)]
struct Args {
    /// Port to serve clients on.
    #[arg(short = 'p', long = "port", default_value_t = 10000)]
    port: u16,
    /// Address to bind; joined to a coordinator, any but a loopback address needs a cluster
    /// token (or --insecure).
    #[arg(long, default_value = "127.0.0.1")]
    bind: String,
    /// Joined to a coordinator, listen on a non-loopback --bind without a cluster token:
    /// anyone who can reach this server may then mirror its log. Logged as an error.
    #[arg(long)]
    insecure: bool,
    /// Cluster id of this server.
    #[arg(short = 'c', long = "cluster", default_value_t = 1)]
    cluster: u32,
    /// Server id within the cluster.
    #[arg(short = 's', long = "server", default_value_t = 1)]
    server: u32,
    /// Data directory [default: ./sns-data/clusterC/serverS for cluster C, server S].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Keep everything in memory (nothing survives a restart).
    #[arg(long, conflicts_with = "data_dir")]
    in_memory: bool,
    /// Start even if the data directory is damaged: cut the log at the first damage, dropping
    /// every record after it, and log at WARN what was dropped. Without it a damaged
    /// directory stops the server with a one-line message naming the damage.
    #[arg(long, conflicts_with = "in_memory")]
    repair: bool,
    /// Host of the coordinator.
    #[arg(short = 'h', long = "coordinator-host", default_value = "127.0.0.1")]
    coordinator_host: String,
    /// Port of the coordinator; without it (and without --coordinators) the server runs
    /// standalone.
    #[arg(short = 'k', long = "coordinator-port")]
    coordinator_port: Option<u16>,
    /// Every coordinator of a group, HOST:PORT,HOST:PORT,...: each heartbeat goes to all of
    /// them, and the server keeps its role while any answers (instead of -h/-k).
    #[arg(
        long,
        value_name = "HOST:PORT,...",
        conflicts_with = "coordinator_port"
    )]
    coordinators: Option<String>,
    /// Number of clusters in the deployment (must match the coordinator's); ignored without
    /// `-k` (a standalone server owns every user).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    clusters: u32,
    /// Host name clients and the coordinator should use to reach this server.
    #[arg(long, default_value = "127.0.0.1")]
    advertise_host: String,
    #[command(flatten)]
    heartbeat: sns_bins::HeartbeatArgs,
    #[command(flatten)]
    token: sns_bins::TokenArgs,
    /// Posts kept per timeline.
    #[arg(long, default_value_t = 400)]
    timeline_cap: usize,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    metrics: sns_bins::metrics::MetricsArgs,
    /// Print help.
    #[arg(long, action = ArgAction::Help)]
    help: Option<bool>,
}

/// Bounds on what clients may hold and send.
#[derive(Debug, clap::Args)]
struct LimitArgs {
    /// Most client connections open at once; more are refused as they come [default: 10000,
    /// lowered to fit the file descriptor limit, `ulimit -n`].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: Option<u64>,
    /// Seconds a new connection may take to start speaking HTTP/2 before it is closed.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    handshake_timeout_secs: u64,
    /// Most timeline streams open at once on this server.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    max_timeline_streams: u64,
    /// Most timeline streams one user may hold open at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    max_streams_per_user: u64,
    /// Most posts per second from one user, across all of that user's streams (excess posts
    /// wait).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    max_posts_per_second: u32,
    /// How far another cluster's clock may run ahead of this server's: its events dated later
    /// than now plus this are refused, logged and counted (`600`, `600s`, `10m`, `1h`).
    #[arg(long, default_value = "10m", value_parser = parse_skew)]
    max_clock_skew: Duration,
}

/// A clock skew bound: whole seconds, or a number with `s`, `m` or `h`; at most a day.
fn parse_skew(text: &str) -> Result<Duration, String> {
    let (digits, unit) = match text.strip_suffix(['s', 'm', 'h']) {
        Some(digits) => (digits, &text[digits.len()..]),
        None => (text, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 600, 600s, 10m or 1h"))?;
    let secs = match unit {
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        _ => n,
    };
    if secs > 86_400 {
        return Err(format!(
            "{text} is more than a day; a clock that far off is wrong"
        ));
    }
    Ok(Duration::from_secs(secs))
}

impl LimitArgs {
    /// The connection limit: as given, or the default lowered to what the file descriptor
    /// limit allows. A given limit above that is kept, with a warning: connections beyond
    /// what the descriptors allow are refused as they come.
    fn max_connections(&self) -> usize {
        let descriptors = transport::tcp::descriptor_limit();
        let wanted = self.max_connections.map_or(DEFAULT_MAX_CONNECTIONS, |n| {
            usize::try_from(n).unwrap_or(usize::MAX)
        });
        let fits = connection_cap(wanted, descriptors);
        if fits == wanted {
            return wanted;
        }
        let limit = descriptors.unwrap_or_default();
        if self.max_connections.is_some() {
            tracing::warn!(
                "--max-connections {wanted} is more than {limit} file descriptors allow \
                 (ulimit -n); at most about {fits} connections will be served"
            );
            wanted
        } else {
            tracing::warn!(
                "serving at most {fits} connections: the file descriptor limit is {limit} \
                 (raise it with ulimit -n, or set --max-connections)"
            );
            fits
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    sns_bins::init_logging();
    sns_bins::run_main("tsd", run(args))
}

async fn run(args: Args) -> Result<(), String> {
    let cluster = ClusterId::new(args.cluster).ok_or("cluster ids start at 1")?;
    let server_id = ServerId::new(args.server).ok_or("server ids start at 1")?;
    let token = cluster_token(&args)?;
    let storage = open_storage(&args, cluster, server_id)?;
    let config = server_config(&args, cluster, server_id);
    let config_limits = (config.max_connections, config.max_timeline_streams);
    let addr = transport::address(&args.bind, args.port);
    let listener = transport::tcp::bind(&addr)
        .await
        .map_err(|e| e.to_string())?;
    let metrics = args.metrics.bind(args.insecure).await?;
    // Advertise the port actually bound (`-p 0` lets the system choose it).
    let link = coordinator_link(&args, listener.port().unwrap_or(args.port), token)?;
    let server = node::start_server(config, storage, link)
        .await
        .map_err(|e| format!("cannot recover: {e}"))?;
    tracing::info!(
        addr = %listener.addr(),
        max_connections = config_limits.0,
        max_timeline_streams = config_limits.1,
        "serving clients"
    );
    let shutdown = CancellationToken::new();
    sns_bins::signals::cancel_on_signal(shutdown.clone());
    if let Some(metrics) = metrics {
        let exporter = sns_bins::metrics::Exporter::new(vec![sns_bins::metrics::Source::Server {
            cluster,
            server: server_id,
            handle: server.clone(),
        }]);
        sns_bins::metrics::spawn(metrics, exporter, axum::Router::new(), shutdown.clone());
    }
    // A server that cannot go on (its storage failed, or the coordinator refused it) stops,
    // so a supervisor can restart it and recovery runs from the log.
    tokio::spawn({
        let (server, shutdown) = (server.clone(), shutdown.clone());
        async move {
            server.failure().await;
            shutdown.cancel();
        }
    });
    server
        .serve(listener, shutdown)
        .await
        .map_err(|e| e.to_string())?;
    if let Some(why) = server.failed() {
        return Err(why);
    }
    tracing::info!("stopped");
    Ok(())
}

/// Joined to a coordinator, the cluster token (given, or kept where `sns up` keeps it), after
/// checking that `--bind` may be used with it; standalone, none.
fn cluster_token(args: &Args) -> Result<Option<String>, String> {
    if !joined(args) {
        return Ok(None);
    }
    let token = args
        .token
        .resolve(Path::new(sns_bins::token::DEFAULT_ROOT))?;
    sns_bins::token::check_bind("tsd", &args.bind, token.is_some(), args.insecure)?;
    Ok(token)
}

/// The server's log: in memory, or in its data directory (a damaged one refused unless
/// `--repair`, with a message saying so).
fn open_storage(
    args: &Args,
    cluster: ClusterId,
    server_id: ServerId,
) -> Result<Arc<dyn Storage>, String> {
    if args.in_memory {
        return Ok(Arc::new(MemoryStorage::new()));
    }
    let dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("./sns-data/cluster{cluster}/server{server_id}")));
    let storage = node::open_data_dir(&dir, args.repair).map_err(|e| match e {
        sns_core::Error::Corrupt(why) if !args.repair => format!(
            "{why}; to start anyway, dropping the damage and everything after it, run \
             tsd --repair"
        ),
        sns_core::Error::Corrupt(why) | sns_core::Error::StorageFailed(why) => why,
        e => e.to_string(),
    })?;
    tracing::info!(dir = %dir.display(), "data directory opened");
    Ok(Arc::new(storage))
}

/// The server's settings from its flags (a standalone server is the only cluster).
fn server_config(args: &Args, cluster: ClusterId, server_id: ServerId) -> ServerConfig {
    let mut config = ServerConfig::default();
    config.cluster = cluster;
    config.server_id = server_id;
    config.clusters = if joined(args) { args.clusters } else { 1 };
    config.timeline_cap = args.timeline_cap;
    config.max_connections = args.limits.max_connections();
    config.handshake_timeout = Duration::from_secs(args.limits.handshake_timeout_secs);
    config.max_timeline_streams =
        usize::try_from(args.limits.max_timeline_streams).unwrap_or(usize::MAX);
    config.max_timeline_streams_per_user =
        usize::try_from(args.limits.max_streams_per_user).unwrap_or(usize::MAX);
    config.max_posts_per_second = args.limits.max_posts_per_second;
    config.max_clock_skew = args.limits.max_clock_skew;
    config.mirror_timeout =
        node::mirror_timeout(args.heartbeat.interval(), args.heartbeat.missed_heartbeats);
    config
}

/// Whether the server joins a deployment (a coordinator or a group was given).
fn joined(args: &Args) -> bool {
    args.coordinator_port.is_some() || args.coordinators.is_some()
}

/// Joined to a coordinator, the link that heartbeats it, advertising `port`; standalone, none.
fn coordinator_link(
    args: &Args,
    port: u16,
    token: Option<String>,
) -> Result<Option<(CoordinatorLink, Network)>, String> {
    if !joined(args) {
        return Ok(None);
    }
    let coordinator = sns_bins::coordinator_addr(
        args.coordinators.as_deref(),
        &args.coordinator_host,
        args.coordinator_port.unwrap_or_default(),
    )?;
    let mut link = CoordinatorLink::new(coordinator.clone(), args.advertise_host.clone(), port);
    link.interval = args.heartbeat.interval();
    link.missed_heartbeats = args.heartbeat.missed_heartbeats;
    link.cluster_token = token;
    tracing::info!(%coordinator, "joining the deployment");
    Ok(Some((link, Network::tcp())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_skew_bounds_parse_in_seconds_minutes_and_hours() {
        assert_eq!(parse_skew("600"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_skew("45s"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_skew("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_skew("2h"), Ok(Duration::from_secs(7200)));
        for bad in ["", "m", "-5", "10 m", "1.5m", "10d", "25h"] {
            assert!(parse_skew(bad).is_err(), "{bad:?}");
        }
    }
}
