//! `synchronizer`: carries users, follow relations and posts between Tiny SNS clusters.
//!
//! `synchronizer -h COORD_HOST -k COORD_PORT -p PORT -i ID [--clusters N] [--bus BUS]` serves
//! cluster `((ID - 1) % N) + 1` (N = `--clusters`, default 3, must match the coordinator's):
//! it applies the other clusters' events to its cluster's current master, found through the
//! coordinator and found again after a failover. Several synchronizers per cluster are
//! harmless (events are applied idempotently).
//! - `--bus grpc` (default, the course's first design): serves `sns.v1.Sync.Subscribe` for its
//!   cluster's committed events on `--bind`:PORT, registers and heartbeats at the coordinator
//!   as synchronizer ID (advertised as `--advertise-host`:PORT), and subscribes to a live
//!   synchronizer of every other cluster.
//! - `--bus local`: reads the other clusters' masters directly; listens on no port (`-p` is
//!   unused) and does not register.
//! - `--bus amqp://USER:PASSWORD@HOST:PORT/VHOST`: publishes its cluster's events to a RabbitMQ
//!   broker (durable exchange `sns.events`, publisher confirms) and consumes the other
//!   clusters' from its cluster's durable queue `sns.cluster.<c>` (a quorum queue, acknowledged
//!   once applied). The last confirmed event is kept in `--data-dir`
//!   (default `./sns-data/sync<ID>/`), so a restart republishes little.
//!
//! After a restart it resumes from its cluster's high-water marks, so nothing is lost or applied
//! twice. SIGINT or SIGTERM stops it cleanly (exit 0).
//!
//! Its cluster token is `--cluster-token` (or `SNS_CLUSTER_TOKEN`), else the one in
//! `--cluster-token-file`, else `./sns-data/cluster-token` if that file exists (where `sns up`
//! keeps it). Without one, the gRPC bus listens on loopback only (`--bind`, default
//! 127.0.0.1) unless `--insecure`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{ArgAction, CommandFactory, Parser};
use sns_bins::TokenArgs;
use sns_bins::bus::{bus_name, parse_bus};
use sns_core::sync::cluster_of_synchronizer;
use sns_core::transport::{self, Network};
use sns_core::{
    AmqpBus, Bus, CursorStore, GrpcBus, GrpcBusOptions, LocalBus, SyncTransport, Synchronizer,
};
use sns_core::{ClusterId, SynchronizerConfig};

/// Tiny SNS synchronizer.
#[derive(Debug, Parser)]
#[command(name = "synchronizer", version, disable_help_flag = true)]
struct Args {
    /// Host of the coordinator.
    #[arg(short = 'h', long = "coordinator-host", default_value = "127.0.0.1")]
    coordinator_host: String,
    /// Port of the coordinator.
    #[arg(short = 'k', long = "coordinator-port", default_value_t = 9090)]
    coordinator_port: u16,
    /// Every coordinator of a group, HOST:PORT,HOST:PORT,...: it registers with all of them
    /// and asks whichever answers (instead of -h/-k).
    #[arg(long, value_name = "HOST:PORT,...")]
    coordinators: Option<String>,
    /// Port to serve sns.v1.Sync.Subscribe on, for the other clusters' synchronizers (0 lets
    /// the system choose). Needed with --bus grpc; unused with --bus local.
    #[arg(short = 'p', long = "port")]
    port: Option<u16>,
    /// Synchronizer id; it serves cluster ((ID - 1) % N) + 1.
    #[arg(short = 'i', long = "id", value_parser = clap::value_parser!(u32).range(1..=i64::from(i32::MAX)))]
    id: u32,
    /// Number of clusters N in the deployment (must match the coordinator's).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    clusters: u32,
    /// How events travel between clusters: grpc (synchronizers subscribe to each other),
    /// local (read the other clusters' masters directly) or amqp://USER:PASSWORD@HOST:PORT/VHOST
    /// (through a RabbitMQ broker).
    #[arg(long, default_value = "grpc")]
    bus: String,
    /// Prefix of the RabbitMQ exchange and queue names (`<prefix>.events`,
    /// `<prefix>.cluster.<c>`): deployments sharing a broker use different ones.
    #[arg(long, default_value = "sns")]
    amqp_prefix: String,
    /// Where the RabbitMQ bus keeps its publisher cursor [default: ./sns-data/syncID for synchronizer ID].
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
    /// Address to bind the Sync service to (gRPC bus); any but a loopback address needs a
    /// cluster token (or --insecure).
    #[arg(long, default_value = "127.0.0.1")]
    bind: String,
    /// Serve the Sync service on a non-loopback --bind without a cluster token: anyone who
    /// can reach it may then read this cluster's events. Logged as an error.
    #[arg(long)]
    insecure: bool,
    #[command(flatten)]
    metrics: sns_bins::metrics::MetricsArgs,
    /// Host name the other synchronizers should use to reach this one (gRPC bus).
    #[arg(long, default_value = "127.0.0.1")]
    advertise_host: String,
    /// Milliseconds between heartbeats to the coordinator (gRPC bus; use the coordinator's
    /// value: it counts this synchronizer dead after its --missed-heartbeats of them).
    #[arg(long = "heartbeat-ms", default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    heartbeat_ms: u64,
    #[command(flatten)]
    token: TokenArgs,
    /// Print help.
    #[arg(long, action = ArgAction::Help)]
    help: Option<bool>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Parsed here rather than by clap, whose error would repeat the value (a URL's password).
    let bus = parse_bus(&args.bus)
        .and_then(|bus| match bus {
            Bus::Amqp(mut options) => {
                options.prefix.clone_from(&args.amqp_prefix);
                options.validate().map_err(|e| e.to_string())?;
                Ok(Bus::Amqp(options))
            }
            other => Ok(other),
        })
        .unwrap_or_else(|e| {
            Args::command()
                .error(ErrorKind::InvalidValue, format!("--bus: {e}"))
                .exit()
        });
    if matches!(bus, Bus::Grpc) && args.port.is_none() {
        Args::command()
            .error(
                ErrorKind::MissingRequiredArgument,
                "the gRPC bus serves the other synchronizers on -p PORT: give one (0 lets the system choose)",
            )
            .exit();
    }
    sns_bins::init_logging();
    sns_bins::run_main("synchronizer", run(args, bus))
}

async fn run(args: Args, bus: Bus) -> Result<(), String> {
    let cluster = cluster_of_synchronizer(args.id, args.clusters).map_err(|e| e.to_string())?;
    let token = args
        .token
        .resolve(std::path::Path::new(sns_bins::token::DEFAULT_ROOT))?;
    if matches!(bus, Bus::Grpc) {
        sns_bins::token::check_bind(
            "the synchronizer",
            &args.bind,
            token.is_some(),
            args.insecure,
        )?;
    }
    let metrics = args.metrics.bind(args.insecure).await?;
    let transport = open_bus(&args, &bus, cluster).await?;
    let coordinator = sns_bins::coordinator_addr(
        args.coordinators.as_deref(),
        &args.coordinator_host,
        args.coordinator_port,
    )?;
    let mut config = SynchronizerConfig::new(cluster, args.clusters, coordinator);
    config.cluster_token = token;
    let synchronizer =
        Synchronizer::new(&config, &Network::tcp(), transport).map_err(|e| e.to_string())?;
    let stop_metrics = tokio_util::sync::CancellationToken::new();
    let _stop_metrics = stop_metrics.clone().drop_guard();
    if let Some(metrics) = metrics {
        let exporter = sns_bins::metrics::Exporter::new(vec![sns_bins::metrics::Source::Sync {
            cluster,
            synchronizer: synchronizer.clone(),
        }]);
        sns_bins::metrics::spawn(metrics, exporter, axum::Router::new(), stop_metrics);
    }
    let running = synchronizer.run();
    tokio::pin!(running);
    let result = tokio::select! {
        result = &mut running => result,
        () = sns_bins::signals::wait_for_signal() => {
            synchronizer.stop();
            running.await
        }
    };
    result.map_err(|e| e.to_string())?;
    tracing::info!("stopped");
    Ok(())
}

/// The transport `bus` names, its listener bound; logs what it serves.
async fn open_bus(
    args: &Args,
    bus: &Bus,
    cluster: ClusterId,
) -> Result<Arc<dyn SyncTransport>, String> {
    let name = bus_name(bus);
    match bus {
        Bus::Local => {
            if let Some(port) = args.port {
                tracing::warn!(port, "-p is unused with the local bus: nothing listens");
            }
            tracing::info!(
                sync = args.id,
                %cluster,
                bus = name,
                coordinator_port = args.coordinator_port,
                "synchronizer serving cluster {cluster}: reading the other clusters' masters directly"
            );
            Ok(Arc::new(LocalBus::new()))
        }
        Bus::Grpc => {
            let port = args
                .port
                .ok_or("the gRPC bus needs -p PORT (0 lets the system choose)")?;
            let listener = transport::tcp::bind(&transport::address(&args.bind, port))
                .await
                .map_err(|e| e.to_string())?;
            let advertised =
                transport::address(&args.advertise_host, listener.port().unwrap_or(port));
            tracing::info!(
                sync = args.id,
                %cluster,
                bus = name,
                listen = listener.addr(),
                %advertised,
                "synchronizer serving cluster {cluster}: sns.v1.Sync on {}",
                listener.addr()
            );
            let mut options = GrpcBusOptions::new(args.id, args.advertise_host.clone());
            options.heartbeat_interval = Duration::from_millis(args.heartbeat_ms);
            Ok(Arc::new(GrpcBus::new(listener, options)))
        }
        Bus::Amqp(options) => {
            let dir = args
                .data_dir
                .clone()
                .unwrap_or_else(|| std::path::PathBuf::from(format!("./sns-data/sync{}", args.id)));
            let path = dir.join(format!("amqp-{}.cursor", options.prefix));
            let cursor = CursorStore::file(&path).map_err(|e| {
                format!(
                    "cannot keep the publisher cursor in {}: {e}",
                    path.display()
                )
            })?;
            tracing::info!(
                sync = args.id,
                %cluster,
                bus = name,
                queue = options.queue(cluster),
                cursor = %path.display(),
                "synchronizer serving cluster {cluster}: through RabbitMQ"
            );
            Ok(Arc::new(AmqpBus::new(options.clone(), cursor)))
        }
        Bus::None => Err("a synchronizer needs a bus: local or grpc".to_string()),
        _ => Err(format!(
            "the {name} bus is not supported by this synchronizer"
        )),
    }
}
