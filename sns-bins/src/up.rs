//! `sns up`: a coordinator and N clusters × (master + slave) in this process, with one
//! synchronizer per cluster, until Ctrl-C or SIGTERM.
//!
//! Its flags map onto a [`DeploymentConfig`]; the cluster token is the one given, else the one
//! kept in the token file (made there on the first start), else (in memory) a new one per start
//! (`UpToken`). Once every cluster has a master it prints where everything runs
//! (`tables::places`); a signal stops every component and the command exits 0.

use std::path::{Path, PathBuf};

use clap::ValueEnum;
use sns_core::{Bus, Data, Deployment, DeploymentConfig, Ports};

use crate::tables;
use crate::token::{DEFAULT_ROOT, TOKEN_FILE};
use crate::{HeartbeatArgs, TokenArgs};

/// Which ports `sns up` listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PortPlan {
    /// The course's ports: coordinator --port, server s of cluster c on c*10000 + s - 1.
    Course,
    /// Ports chosen by the operating system (for a busy machine).
    Auto,
}

/// `sns up`'s flags.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Number of clusters.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    clusters: u32,
    /// Servers per cluster (one master, the rest slaves).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=9))]
    servers: u32,
    /// Root of the data directories (and of the cluster token, DIR/cluster-token).
    #[arg(long, default_value = DEFAULT_ROOT)]
    data_dir: PathBuf,
    /// Keep everything in memory instead.
    #[arg(long, conflicts_with = "data_dir")]
    in_memory: bool,
    /// Start every server even if its data directory is damaged: cut its log at the first
    /// damage, dropping every record after it, and log at WARN what was dropped.
    #[arg(long, conflicts_with = "in_memory")]
    repair: bool,
    /// The coordinator's port [default: 9090 with the course's port plan; chosen by the
    /// system with `--ports auto`, unless given].
    #[arg(long)]
    port: Option<u16>,
    /// Port plan.
    #[arg(long, value_enum, default_value_t = PortPlan::Course)]
    ports: PortPlan,
    /// Address to bind every listener to.
    #[arg(long, default_value = "127.0.0.1")]
    bind: String,
    /// Host name clients and the other components use to reach this machine's listeners
    /// [default: the --bind address, or 127.0.0.1 when binding 0.0.0.0].
    #[arg(long)]
    advertise_host: Option<String>,
    #[command(flatten)]
    heartbeat: HeartbeatArgs,
    #[command(flatten)]
    token: TokenArgs,
    /// When a master dies and its slave is not known to be in sync, promote the slave
    /// anyway: the cluster stays available but may lose committed changes. Off by default.
    #[arg(long)]
    allow_unclean_promotion: bool,
    /// How the synchronizers carry events between clusters: local (they read the other
    /// clusters' masters directly) or grpc (they serve sns.v1.Sync, cluster c's on port
    /// 9000 + c with the course's ports, and subscribe to each other).
    #[arg(long, default_value = "local")]
    bus: String,
    /// Serve the live status page (http://ADDR/) and Prometheus metrics of every component
    /// (http://ADDR/metrics) on ADDR (HOST:PORT; port 0 lets the system choose). Any but a
    /// loopback address needs --insecure-http.
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
    http: String,
    /// Serve the status page and metrics on a non-loopback --http address (nothing there asks
    /// for a token).
    #[arg(long)]
    insecure_http: bool,
    /// Keep the clusters' roles in etcd (the members' URLs, http://HOST:PORT,...): the
    /// deployment's coordinator is then one of a group that other `coordinator --etcd`
    /// processes may join. Without it the roles live in the coordinator's memory.
    #[arg(long, value_name = "URL,...", env = "SNS_ETCD")]
    etcd: Option<String>,
    /// The prefix of this deployment's keys in etcd.
    #[arg(long, default_value = "/sns", requires = "etcd")]
    etcd_prefix: String,
}

impl UpArgs {
    /// The `--bus` flag as given (its parse, and the error a bad one gets, are the caller's).
    pub fn bus(&self) -> &str {
        &self.bus
    }

    /// The deployment these flags ask for, carrying `bus` (parsed from `--bus` by the caller)
    /// and the cluster token found for this start.
    fn config(self, bus: Bus, cluster_token: &UpToken) -> DeploymentConfig {
        let advertise_host = self.advertise_host.unwrap_or_else(|| {
            if self.bind == "0.0.0.0" {
                "127.0.0.1".to_string()
            } else {
                self.bind.clone()
            }
        });
        let mut config = DeploymentConfig::default();
        config.clusters = self.clusters;
        config.servers_per_cluster = self.servers;
        config.ports = ports(self.ports, self.port);
        config.advertise_host = advertise_host;
        config.bind_host = self.bind;
        config.data = if self.in_memory {
            Data::Memory
        } else {
            Data::Dir(self.data_dir)
        };
        config.repair = self.repair;
        config.heartbeat_interval = self.heartbeat.interval();
        config.missed_heartbeats = self.heartbeat.missed_heartbeats;
        config.cluster_token = Some(cluster_token.token().to_string());
        config.allow_unclean_promotion = self.allow_unclean_promotion;
        config.bus = bus;
        config
    }
}

/// The ports of `plan`, with the coordinator on `port` if one was given.
fn ports(plan: PortPlan, port: Option<u16>) -> Ports {
    match plan {
        PortPlan::Course => Ports::Course {
            coordinator: port.unwrap_or(9090),
        },
        PortPlan::Auto => match port {
            Some(coordinator) => Ports::AutoButCoordinator { coordinator },
            None => Ports::Auto,
        },
    }
}

/// Runs `sns up` with its flags and the bus they name: finds the cluster token, starts the
/// deployment and serves until a signal. Prints `sns up: <why>` and fails if it cannot.
pub fn main(args: UpArgs, bus: Bus) -> std::process::ExitCode {
    let cluster_token = match UpToken::find(&args.token, args.in_memory, &args.data_dir) {
        Ok(cluster_token) => cluster_token,
        Err(e) => {
            eprintln!("sns up: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let token_hints = cluster_token.hints(&args.data_dir);
    let http = (args.http.clone(), args.insecure_http);
    let etcd = args
        .etcd
        .clone()
        .map(|urls| (urls, args.etcd_prefix.clone()));
    let config = args.config(bus, &cluster_token);
    crate::run_main("sns up", run(config, token_hints, http, etcd))
}

/// Where `sns up`'s cluster token comes from.
#[derive(Debug)]
enum UpToken {
    /// Given by flag or environment.
    Given(String),
    /// Kept in a file; `made` if this start wrote it.
    Kept {
        token: String,
        path: PathBuf,
        made: bool,
    },
    /// Made for this run only (`--in-memory`).
    Memory(String),
}

impl UpToken {
    /// The token given, else the one kept in the token file (made there if missing), else
    /// (in memory, with no token file named) a new one.
    fn find(args: &TokenArgs, in_memory: bool, data_dir: &Path) -> Result<Self, String> {
        if let Some(token) = args.given()? {
            return Ok(Self::Given(token));
        }
        let path = match (&args.cluster_token_file, in_memory) {
            (Some(file), _) => file.clone(),
            (None, true) => return crate::token::generate().map(Self::Memory),
            (None, false) => data_dir.join(TOKEN_FILE),
        };
        let (token, made) = crate::token::keep_or_create(&path)?;
        Ok(Self::Kept { token, path, made })
    }

    /// The token itself.
    fn token(&self) -> &str {
        match self {
            Self::Given(token) | Self::Memory(token) | Self::Kept { token, .. } => token,
        }
    }

    /// How the start-up table tells of this token and how `sns status` finds it.
    fn hints(&self, data_dir: &Path) -> TokenHints {
        match self {
            Self::Given(_) => TokenHints {
                kept: "as given (give `sns status` the same)".to_string(),
                ..TokenHints::default()
            },
            Self::Memory(token) => TokenHints {
                kept: format!("{token} (this run only)"),
                env: format!("SNS_CLUSTER_TOKEN={token} "),
                flags: String::new(),
            },
            Self::Kept { path, made, .. } => {
                let flags = if *path == Path::new(DEFAULT_ROOT).join(TOKEN_FILE) {
                    String::new()
                } else if *path == data_dir.join(TOKEN_FILE) {
                    format!(" --data-dir {}", data_dir.display())
                } else {
                    format!(" --cluster-token-file {}", path.display())
                };
                let age = if *made { "made now" } else { "kept" };
                TokenHints {
                    kept: format!("in {} ({age})", path.display()),
                    env: String::new(),
                    flags,
                }
            }
        }
    }
}

/// What the start-up table says of the cluster token.
#[derive(Debug, Default)]
pub(crate) struct TokenHints {
    /// Where the token is (or, in memory, the token itself).
    pub(crate) kept: String,
    /// Environment to put before `sns status`.
    pub(crate) env: String,
    /// Flags to put after `sns status`.
    pub(crate) flags: String,
}

/// Starts the deployment of `config`, prints where everything runs once every cluster has a
/// master, and stops it all at the first signal.
async fn run(
    mut config: DeploymentConfig,
    token: TokenHints,
    (http, insecure_http): (String, bool),
    etcd: Option<(String, String)>,
) -> Result<(), String> {
    let http = crate::metrics::listen("--http", &http, insecure_http).await?;
    if let Some((urls, prefix)) = etcd {
        let store =
            crate::etcd_store(&urls, &prefix, config.clusters, config.servers_per_cluster).await?;
        tracing::info!(etcd = %urls, %prefix, "the clusters' roles are kept in etcd");
        config.routing_store = Some(std::sync::Arc::new(store));
    }
    let page = http.local_addr().map_err(|e| e.to_string())?;
    // Installed first: a signal arriving while the deployment starts (or just after the table
    // is printed) stops it gracefully too.
    let mut signals = crate::signals::ExitSignals::install();
    if config.allow_unclean_promotion {
        tracing::warn!(
            "unclean promotion allowed: a slave that is not in sync may be promoted and committed changes may be lost"
        );
    }
    let repair = config.repair;
    let deployment = Deployment::start(config).await.map_err(|e| match e {
        sns_core::Error::Corrupt(why) if !repair => format!(
            "{why}; to start anyway, dropping the damage and everything after it, run \
             sns up --repair"
        ),
        e => e.to_string(),
    })?;
    // Masters are named one heartbeat interval after their cluster's first beat; a loaded
    // machine may need several more, so short intervals still get 10 s.
    let patience =
        (deployment.config().heartbeat_interval * 10).max(std::time::Duration::from_secs(10));
    if let Err(e) = deployment.wait_for_masters(patience).await {
        deployment.shutdown().await;
        return Err(e.to_string());
    }
    let stop_http = tokio_util::sync::CancellationToken::new();
    let exporter = crate::metrics::Exporter::of_deployment(&deployment);
    crate::metrics::spawn(
        http,
        exporter.clone(),
        crate::status_page::router(exporter),
        stop_http.clone(),
    );
    print!("{}", tables::places(&deployment, &token, page));
    use std::io::Write;
    let _ = std::io::stdout().flush();
    signals.recv().await;
    eprintln!("stopping...");
    stop_http.cancel();
    deployment.shutdown().await;
    eprintln!("stopped");
    Ok(())
}
