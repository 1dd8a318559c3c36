//! `coordinator`: the Tiny SNS routing table.
//!
//! `coordinator -p PORT` serves `csce438.CoordService` (and its `csce662` alias) and
//! `sns.v1.Admin` on `--bind`:PORT (default 127.0.0.1). Alone, it keeps no routing state on
//! disk: its table is rebuilt from the next round of heartbeats after a restart. With
//! `--etcd URL[,URL...]` it is one of a group of coordinators that keep each cluster's epoch,
//! master and in-sync slaves in etcd: one of them (elected on an etcd lease) detects failures
//! and promotes; all of them route clients and take heartbeats. It accepts servers
//! `1..=--servers` of clusters `1..=--clusters` only, at most four synchronizers per cluster,
//! and forgets nodes dead for ten failure timeouts.
//!
//! Its cluster token is `--cluster-token` (or `SNS_CLUSTER_TOKEN`), else the one in
//! `--cluster-token-file`, else the one kept in `--data-dir`/cluster-token (default
//! `./sns-data/cluster-token`), which it makes there (random, mode 0600) when the file does not
//! exist, as `sns up` does: `tsd`, `synchronizer` and `sns status` started from the same
//! directory find it there. `--no-cluster-token` runs it open (the course's way: anyone who
//! can reach it may register servers); then it listens on loopback only, unless `--insecure`.
//! SIGINT or SIGTERM stops it (exit 0).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{ArgAction, Parser};
use sns_bins::{HeartbeatArgs, TokenArgs};
use sns_core::{Coordinator, CoordinatorConfig};
use tokio_util::sync::CancellationToken;

/// Tiny SNS coordinator.
#[derive(Debug, Parser)]
#[command(name = "coordinator", version, disable_help_flag = true)]
struct Args {
    /// Port to listen on.
    #[arg(short = 'p', long = "port", default_value_t = 9090)]
    port: u16,
    /// Address to bind; any but a loopback address needs a cluster token (or --insecure).
    #[arg(long, default_value = "127.0.0.1")]
    bind: String,
    /// Number of clusters (user u belongs to cluster ((u - 1) % N) + 1).
    #[arg(short = 'n', long = "clusters", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    clusters: u32,
    /// Servers per cluster: only servers 1..=N may register.
    #[arg(long = "servers", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=9))]
    servers: u32,
    /// The deployment's data directory, where the cluster token is kept (DIR/cluster-token,
    /// made there on the first start) when none is given.
    #[arg(long, default_value = sns_bins::token::DEFAULT_ROOT)]
    data_dir: PathBuf,
    /// Run without a cluster token, as the course's coordinator does: anyone who can reach it
    /// may register servers and read its status (loopback only, unless --insecure).
    #[arg(long, conflicts_with_all = ["cluster_token", "cluster_token_file"])]
    no_cluster_token: bool,
    #[command(flatten)]
    heartbeat: HeartbeatArgs,
    #[command(flatten)]
    token: TokenArgs,
    /// When a master dies and its slave is not known to be in sync, promote the slave anyway:
    /// the cluster stays available but may lose committed changes. Off by default.
    #[arg(long)]
    allow_unclean_promotion: bool,
    /// Listen on a non-loopback --bind without a cluster token: anyone who can reach the
    /// coordinator may then register servers and read its status. Logged as an error.
    #[arg(long)]
    insecure: bool,
    /// Keep the clusters' roles in etcd, with the other coordinators of a group: the etcd
    /// members' URLs, http://HOST:PORT,... Without it the coordinator is alone.
    #[arg(long, value_name = "URL,...", env = "SNS_ETCD")]
    etcd: Option<String>,
    /// The prefix of this deployment's keys in etcd (one etcd can hold several deployments).
    #[arg(long, default_value = "/sns", requires = "etcd")]
    etcd_prefix: String,
    /// This coordinator's name in its group (logs, `sns status`); default HOST:PORT of --bind
    /// and -p.
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    metrics: sns_bins::metrics::MetricsArgs,
    /// Serve the live status page of the deployment (http://ADDR/, with its metrics at
    /// /metrics) on ADDR (HOST:PORT); off unless given. Any but a loopback address needs
    /// --insecure.
    #[arg(long, value_name = "ADDR")]
    http: Option<String>,
    /// Print help.
    #[arg(long, action = ArgAction::Help)]
    help: Option<bool>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    sns_bins::init_logging();
    sns_bins::run_main("coordinator", run(args))
}

async fn run(args: Args) -> Result<(), String> {
    let token = if args.no_cluster_token {
        None
    } else {
        Some(cluster_token(&args)?)
    };
    sns_bins::token::check_bind(
        "the coordinator",
        &args.bind,
        token.is_some(),
        args.insecure,
    )?;
    let protected = token.is_some();
    if !protected {
        tracing::warn!(
            "running without a cluster token (--no-cluster-token): anyone who can reach this \
             coordinator may register servers, reroute clients and read its status"
        );
    }
    let mut config = CoordinatorConfig::default();
    config.routing.clusters = args.clusters;
    config.routing.servers = args.servers;
    config.routing.heartbeat_interval = args.heartbeat.interval();
    config.routing.missed_heartbeats = args.heartbeat.missed_heartbeats;
    config.routing.allow_unclean_promotion = args.allow_unclean_promotion;
    config.cluster_token = token;
    let addr = sns_core::transport::address(&args.bind, args.port);
    let listener = sns_core::transport::tcp::bind(&addr)
        .await
        .map_err(|e| e.to_string())?;
    let shutdown = CancellationToken::new();
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| listener.addr().to_string());
    let coordinator = match &args.etcd {
        None => Coordinator::new(config),
        Some(urls) => {
            let store =
                sns_bins::etcd_store(urls, &args.etcd_prefix, args.clusters, args.servers).await?;
            tracing::info!(%name, etcd = %urls, prefix = %args.etcd_prefix, "coordinator of a group on etcd");
            Coordinator::in_group(config, name, Arc::new(store), shutdown.clone())
        }
    };
    let metrics = args.metrics.bind(args.insecure).await?;
    let page = match &args.http {
        Some(text) => Some(sns_bins::metrics::listen("--http", text, args.insecure).await?),
        None => None,
    };
    if args.allow_unclean_promotion {
        tracing::warn!(
            "unclean promotion allowed: a slave that is not in sync may be promoted and committed changes may be lost"
        );
    }
    // The address actually bound (`-p 0` lets the system choose the port).
    tracing::info!(
        addr = %listener.addr(),
        clusters = args.clusters,
        servers = args.servers,
        cluster_token = if protected { "required" } else { "none" },
        "coordinator serving"
    );
    sns_bins::signals::cancel_on_signal(shutdown.clone());
    let exporter = sns_bins::metrics::Exporter::new(vec![sns_bins::metrics::Source::Coordinator(
        coordinator.clone(),
    )]);
    if let Some(metrics) = metrics {
        sns_bins::metrics::spawn(
            metrics,
            exporter.clone(),
            axum::Router::new(),
            shutdown.clone(),
        );
    }
    if let Some(page) = page {
        if let Ok(addr) = page.local_addr() {
            tracing::info!(%addr, "status page on http://{addr}/");
        }
        let router = sns_bins::status_page::router(exporter.clone());
        sns_bins::metrics::spawn(page, exporter, router, shutdown.clone());
    }
    coordinator
        .serve(listener, shutdown)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!("stopped");
    Ok(())
}

/// The token given, else the one kept in the data directory, made there if there is none.
fn cluster_token(args: &Args) -> Result<String, String> {
    if let Some(token) = args.token.resolve(&args.data_dir)? {
        return Ok(token);
    }
    let path = args.data_dir.join(sns_bins::token::TOKEN_FILE);
    let (token, made) = sns_bins::token::keep_or_create(&path).map_err(|e| {
        format!("{e}; give --cluster-token-file, another --data-dir, or --no-cluster-token")
    })?;
    if made {
        tracing::info!(
            "made a cluster token and kept it in {} (mode 0600); tsd, synchronizer and sns \
             status started from this directory find it there",
            path.display()
        );
    }
    Ok(token)
}
