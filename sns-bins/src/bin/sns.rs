//! `sns`: the all-in-one command.
//!
//! - `sns up`: starts a coordinator and N clusters × (master + slave) in this process, with
//!   durable storage under `--data-dir` (default `./sns-data/cluster<c>/server<s>/`), on the
//!   course's ports (coordinator 9090, server s of cluster c on `c*10000 + s - 1`) or on
//!   ephemeral ports (`--ports auto`). Prints where everything runs; Ctrl-C or SIGTERM stops
//!   every component and exits 0.
//! - `sns status [-h HOST -k PORT]`: the coordinator's routing table as a table.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, Parser, Subcommand, ValueEnum};
use sns_bins::{HeartbeatArgs, TokenArgs};
use sns_core::{Data, Deployment, DeploymentConfig, Ports, Role};
use sns_proto::csce438::NodeRole;
use sns_proto::sns_v1::StatusRequest;
use sns_proto::sns_v1::admin_client::AdminClient;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PortPlan {
    /// The course's ports: coordinator --port, server s of cluster c on c*10000 + s - 1.
    Course,
    /// Ports chosen by the operating system (for a busy machine).
    Auto,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a coordinator and every cluster in this process.
    Up {
        /// Number of clusters.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
        clusters: u32,
        /// Servers per cluster (one master, the rest slaves).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=9))]
        servers: u32,
        /// Root of the data directories.
        #[arg(long, default_value = "./sns-data")]
        data_dir: PathBuf,
        /// Keep everything in memory instead.
        #[arg(long, conflicts_with = "data_dir")]
        in_memory: bool,
        /// The coordinator's port (with the course's port plan).
        #[arg(long, default_value_t = 9090)]
        port: u16,
        /// Port plan.
        #[arg(long, value_enum, default_value_t = PortPlan::Course)]
        ports: PortPlan,
        /// Address to bind every listener to.
        #[arg(long, default_value = "127.0.0.1")]
        bind: String,
        #[command(flatten)]
        heartbeat: HeartbeatArgs,
        #[command(flatten)]
        token: TokenArgs,
    },
    /// Show the coordinator's routing table.
    Status {
        /// Coordinator host.
        #[arg(short = 'h', long = "host", default_value = "127.0.0.1")]
        host: String,
        /// Coordinator port.
        #[arg(short = 'k', long = "port", default_value_t = 9090)]
        port: u16,
        #[command(flatten)]
        token: TokenArgs,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Command::Up {
            clusters,
            servers,
            data_dir,
            in_memory,
            port,
            ports,
            bind,
            heartbeat,
            token,
        } => {
            sns_bins::init_logging();
            let config = DeploymentConfig {
                clusters,
                servers_per_cluster: servers,
                ports: match ports {
                    PortPlan::Course => Ports::Course { coordinator: port },
                    PortPlan::Auto => Ports::Auto,
                },
                advertise_host: if bind == "0.0.0.0" {
                    "127.0.0.1".to_string()
                } else {
                    bind.clone()
                },
                bind_host: bind,
                data: if in_memory {
                    Data::Memory
                } else {
                    Data::Dir(data_dir)
                },
                heartbeat_interval: heartbeat.interval(),
                missed_heartbeats: heartbeat.missed_heartbeats,
                cluster_token: token.cluster_token,
                ..DeploymentConfig::default()
            };
            sns_bins::run_main("sns up", up(config))
        }
        Command::Status { host, port, token } => {
            sns_bins::run_main("sns status", status(host, port, token.cluster_token))
        }
    }
}

async fn up(config: DeploymentConfig) -> Result<(), String> {
    let deployment = Deployment::start(config).await.map_err(|e| e.to_string())?;
    let patience = deployment.config().heartbeat_interval * 10;
    if let Err(e) = deployment.wait_for_masters(patience).await {
        deployment.shutdown().await;
        return Err(e.to_string());
    }
    print_places(&deployment);
    let signal = sns_bins::signals::wait_for_signal();
    signal.await;
    eprintln!("stopping...");
    deployment.shutdown().await;
    eprintln!("stopped");
    Ok(())
}

fn print_places(deployment: &Deployment) {
    let coordinator = deployment.coordinator_addr();
    let mut out = format!(
        "Tiny SNS is up: {} clusters, coordinator at {coordinator}\n\n",
        deployment.config().clusters
    );
    out.push_str(&format!(
        "{:<8} {:<7} {:<7} {:<22} DATA\n",
        "CLUSTER", "SERVER", "ROLE", "ADDRESS"
    ));
    let nodes = deployment
        .coordinator()
        .table()
        .nodes(tokio::time::Instant::now());
    for place in deployment.servers() {
        let node = nodes
            .iter()
            .find(|n| n.cluster == place.cluster && n.id == place.server.get() && n.alive);
        let role = match node.and_then(|n| n.role) {
            Some(Role::Master) => "master",
            Some(Role::Slave) => "slave",
            None => "down",
        };
        let data = place
            .data_dir
            .map_or_else(|| "memory".to_string(), |d| d.display().to_string());
        out.push_str(&format!(
            "{:<8} {:<7} {:<7} {:<22} {}\n",
            place.cluster.get(),
            place.server.get(),
            role,
            place.addr,
            data
        ));
    }
    let (host, port) = coordinator
        .rsplit_once(':')
        .unwrap_or((coordinator, "9090"));
    out.push_str(&format!(
        "\nConnect a client:  tsc -h {host} -k {port} -u <user id>\n\
         Status:            sns status -h {host} -k {port}\n\
         Press Ctrl-C to stop.\n"
    ));
    print!("{out}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
}

async fn status(host: String, port: u16, token: Option<String>) -> Result<(), String> {
    let addr = sns_core::transport::address(&host, port);
    let channel = sns_core::Network::tcp()
        .connect(&addr)
        .await
        .map_err(|e| format!("cannot reach the coordinator: {e}"))?;
    let mut request = tonic::Request::new(StatusRequest {});
    if let Some(token) = token {
        let value = token
            .parse()
            .map_err(|_| "the cluster token must be printable ASCII".to_string())?;
        request.metadata_mut().insert("sns-cluster-token", value);
    }
    let reply = AdminClient::new(channel)
        .status(request)
        .await
        .map_err(|s| format!("status failed: {}", s.message()))?
        .into_inner();
    println!(
        "{} clusters; heartbeat every {} ms, dead after {} ms",
        reply.clusters, reply.heartbeat_interval_ms, reply.failure_timeout_ms
    );
    println!(
        "{:<8} {:<7} {:<13} {:<22} {:>15} {:<6} {:>5} {:>9} {:>9} {:>9} {:>9}",
        "CLUSTER",
        "SERVER",
        "ROLE",
        "ADDRESS",
        "LAST HEARTBEAT",
        "ALIVE",
        "EPOCH",
        "LOG EPOCH",
        "DURABLE",
        "COMMIT",
        "SLAVE ACK"
    );
    for node in reply.nodes {
        let synchronizer = node.node_role == i32::from(NodeRole::Synchronizer);
        let position = |value: u64| {
            if synchronizer {
                "-".to_string()
            } else {
                value.to_string()
            }
        };
        println!(
            "{:<8} {:<7} {:<13} {:<22} {:>15} {:<6} {:>5} {:>9} {:>9} {:>9} {:>9}",
            node.cluster,
            node.server,
            node.role,
            format!("{}:{}", node.hostname, node.port),
            format!("{:.1}s ago", node.last_heartbeat_ms as f64 / 1000.0),
            if node.alive { "yes" } else { "no" },
            node.epoch,
            position(node.log_epoch),
            position(node.durable_index),
            position(node.commit_index),
            node.slave_acked_index
                .map_or_else(|| "-".to_string(), |i| i.to_string()),
        );
    }
    Ok(())
}
