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
//! - `sns status [-h HOST -k PORT]`: the coordinator's view as a table: per server its role,
//!   the cluster's epoch and its log's, its durable and committed indexes, and for a slave
//!   whether it is in sync and how many entries it lags behind its master.
//! - `sns bench [steady|failover|broker-restart]`: the load generator (see
//!   `sns_bins::bench`): a population of users posting through the client library, every
//!   delivery's latency and an exactly-once check; exit code 1 if a delivery was missing or
//!   repeated.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{ArgAction, CommandFactory, Parser, Subcommand, ValueEnum};
use sns_bins::bus::{bus_name, parse_bus};
use sns_bins::{HeartbeatArgs, TokenArgs};
use sns_core::{Data, Deployment, DeploymentConfig, Ports, Role};
use sns_proto::csce438::NodeRole;
use sns_proto::sns_v1::admin_client::AdminClient;
use sns_proto::sns_v1::{NodeStatus, StatusReply, StatusRequest};

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
    /// Load generator: build a population, post, measure every delivery (latency, throughput,
    /// exactly once). Starts its own deployment in this process unless -h/-k name one.
    Bench(Box<sns_bins::bench::BenchArgs>),
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Command::Up {
            clusters,
            servers,
            data_dir,
            in_memory,
            repair,
            port,
            ports,
            bind,
            advertise_host,
            heartbeat,
            token,
            allow_unclean_promotion,
            bus,
        } => {
            // Parsed here rather than by clap, whose error would repeat the value (a URL's
            // password).
            let bus = parse_bus(&bus).unwrap_or_else(|e| {
                Args::command()
                    .error(ErrorKind::InvalidValue, format!("--bus: {e}"))
                    .exit()
            });
            sns_bins::init_logging();
            let config = DeploymentConfig {
                clusters,
                servers_per_cluster: servers,
                ports: match ports {
                    PortPlan::Course => Ports::Course {
                        coordinator: port.unwrap_or(9090),
                    },
                    PortPlan::Auto => match port {
                        Some(coordinator) => Ports::AutoButCoordinator { coordinator },
                        None => Ports::Auto,
                    },
                },
                advertise_host: advertise_host.unwrap_or_else(|| {
                    if bind == "0.0.0.0" {
                        "127.0.0.1".to_string()
                    } else {
                        bind.clone()
                    }
                }),
                bind_host: bind,
                data: if in_memory {
                    Data::Memory
                } else {
                    Data::Dir(data_dir)
                },
                repair,
                heartbeat_interval: heartbeat.interval(),
                missed_heartbeats: heartbeat.missed_heartbeats,
                cluster_token: token.cluster_token,
                allow_unclean_promotion,
                bus,
                ..DeploymentConfig::default()
            };
            sns_bins::run_main("sns up", up(config))
        }
        Command::Status { host, port, token } => {
            sns_bins::run_main("sns status", status(host, port, token.cluster_token))
        }
        Command::Bench(args) => {
            sns_bins::init_logging_at("error");
            sns_bins::run_main("sns bench", bench(*args))
        }
    }
}

async fn bench(args: sns_bins::bench::BenchArgs) -> Result<(), String> {
    let json = args.json;
    let report = sns_bins::bench::run(args).await?;
    if json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        println!("{text}");
    } else {
        print!("{}", report.table());
    }
    if report.ok {
        return Ok(());
    }
    let v = &report.exactly_once;
    Err(format!(
        "not exactly once: {} missing, {} duplicate, {} unexpected deliveries",
        v.missing, v.duplicates, v.unexpected
    ))
}

async fn up(config: DeploymentConfig) -> Result<(), String> {
    // Installed first: a signal arriving while the deployment starts (or just after the table
    // is printed) stops it gracefully too.
    let mut signals = sns_bins::signals::ExitSignals::install();
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
    print_places(&deployment);
    signals.recv().await;
    eprintln!("stopping...");
    deployment.shutdown().await;
    eprintln!("stopped");
    Ok(())
}

fn print_places(deployment: &Deployment) {
    let coordinator = deployment.coordinator_addr();
    let clusters = deployment.config().clusters;
    let mut out = format!(
        "Tiny SNS is up: {clusters} cluster{}, coordinator at {coordinator}\n\n",
        if clusters == 1 { "" } else { "s" }
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
    let synchronizers = deployment.synchronizers();
    if !synchronizers.is_empty() {
        out.push_str(&format!(
            "\n{:<8} {:<7} {:<7} {}\n",
            "CLUSTER", "SYNC", "BUS", "ADDRESS"
        ));
    }
    let bus = bus_name(&deployment.config().bus);
    for place in synchronizers {
        let addr = place.addr.unwrap_or_else(|| "in-process".to_string());
        out.push_str(&format!(
            "{:<8} {:<7} {:<7} {}\n",
            place.cluster.get(),
            place.cluster.get(),
            bus,
            if place.running {
                addr
            } else {
                "down".to_string()
            }
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
    print!("{}", status_table(&reply));
    Ok(())
}

/// How a column's cells line up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

/// The columns of `sns status`.
const STATUS_COLUMNS: [(&str, Align); 13] = [
    ("CLUSTER", Align::Left),
    ("SERVER", Align::Left),
    ("ROLE", Align::Left),
    ("ADDRESS", Align::Left),
    ("ALIVE", Align::Left),
    ("LAST BEAT", Align::Right),
    ("EPOCH", Align::Right),
    ("LOG EPOCH", Align::Right),
    ("DURABLE", Align::Right),
    ("COMMIT", Align::Right),
    ("SLAVE ACK", Align::Right),
    ("IN SYNC", Align::Left),
    ("LAG", Align::Right),
];

/// The coordinator's view as a table, one row per node: the cluster's epoch and the epoch of
/// the node's own log, its durable and committed indexes, for a master the index its slaves
/// acknowledged, and for a slave whether its master counts it (`IN SYNC`) and how far its
/// durable log is behind the master's (`LAG`, in entries). Positions are those of each node's
/// last heartbeat, so they may be up to one interval old.
fn status_table(reply: &StatusReply) -> String {
    let is = |node: &NodeStatus, role: NodeRole| node.node_role == i32::from(role);
    let rows: Vec<Vec<String>> = reply
        .nodes
        .iter()
        .map(|node| {
            let server = !is(node, NodeRole::Synchronizer);
            let slave = is(node, NodeRole::Slave);
            let position = |value: u64| {
                if server {
                    value.to_string()
                } else {
                    "-".to_string()
                }
            };
            let master_durable = reply
                .nodes
                .iter()
                .find(|m| m.cluster == node.cluster && is(m, NodeRole::Master))
                .map(|m| m.durable_index);
            let lag = match master_durable {
                Some(durable) if slave => durable.saturating_sub(node.durable_index).to_string(),
                _ => "-".to_string(),
            };
            vec![
                node.cluster.to_string(),
                node.server.to_string(),
                node.role.clone(),
                format!("{}:{}", node.hostname, node.port),
                if node.alive { "yes" } else { "no" }.to_string(),
                format!("{:.1}s ago", node.last_heartbeat_ms as f64 / 1000.0),
                node.epoch.to_string(),
                position(node.log_epoch),
                position(node.durable_index),
                position(node.commit_index),
                node.slave_acked_index
                    .map_or_else(|| "-".to_string(), |i| i.to_string()),
                match (slave, node.in_sync) {
                    (false, _) => "-",
                    (true, true) => "yes",
                    (true, false) => "no",
                }
                .to_string(),
                lag,
            ]
        })
        .collect();
    let mut out = format!(
        "{} clusters; heartbeat every {} ms, dead after {} ms\n",
        reply.clusters, reply.heartbeat_interval_ms, reply.failure_timeout_ms
    );
    let headers: Vec<String> = STATUS_COLUMNS.iter().map(|(h, _)| h.to_string()).collect();
    let widths: Vec<usize> = (0..STATUS_COLUMNS.len())
        .map(|i| {
            std::iter::once(&headers)
                .chain(&rows)
                .map(|row| row[i].len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in std::iter::once(&headers).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .zip(STATUS_COLUMNS.iter().map(|(_, align)| align))
            .map(|((cell, width), align)| match align {
                Align::Left => format!("{cell:<width$}"),
                Align::Right => format!("{cell:>width$}"),
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    for node in reply.nodes.iter().filter(|n| !n.failure.is_empty()) {
        out.push_str(&format!(
            "cluster {} server {} cannot serve: {}\n",
            node.cluster, node.server, node.failure
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(cluster: u32, server: u32, role: NodeRole, durable: u64) -> NodeStatus {
        NodeStatus {
            cluster,
            server,
            role: match role {
                NodeRole::Master => "master",
                NodeRole::Slave => "slave",
                _ => "synchronizer",
            }
            .to_string(),
            hostname: "127.0.0.1".to_string(),
            port: (cluster * 10_000 + server - 1).to_string(),
            last_heartbeat_ms: 300,
            alive: true,
            epoch: 3,
            node_role: role.into(),
            log_epoch: 2,
            durable_index: durable,
            commit_index: durable,
            slave_acked_index: None,
            in_sync: false,
            failure: String::new(),
        }
    }

    /// The cells of the row of `server` in `cluster`.
    fn row(table: &str, cluster: u32, server: u32) -> Vec<String> {
        table
            .lines()
            .skip(2)
            .map(|line| {
                line.split_whitespace()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .find(|cells| cells[0] == cluster.to_string() && cells[1] == server.to_string())
            .unwrap_or_else(|| panic!("no row for {cluster}/{server} in\n{table}"))
    }

    #[test]
    fn status_shows_epochs_positions_and_the_lag_and_sync_of_each_slave() {
        let master = NodeStatus {
            slave_acked_index: Some(40),
            log_epoch: 3,
            ..node(1, 1, NodeRole::Master, 42)
        };
        let in_sync = NodeStatus {
            in_sync: true,
            ..node(1, 2, NodeRole::Slave, 40)
        };
        let behind = node(2, 2, NodeRole::Slave, 5);
        let other_master = node(2, 1, NodeRole::Master, 9);
        let sync = node(1, 7, NodeRole::Synchronizer, 0);
        let table = status_table(&StatusReply {
            clusters: 2,
            nodes: vec![master, in_sync, other_master, behind, sync],
            heartbeat_interval_ms: 1000,
            failure_timeout_ms: 2000,
        });
        let header = table.lines().nth(1).expect("a header");
        for column in ["EPOCH", "LOG EPOCH", "DURABLE", "COMMIT", "IN SYNC", "LAG"] {
            assert!(header.contains(column), "{header}");
        }
        // cluster, server, role, address, alive, age ("0.3s ago"), epoch, log epoch, durable,
        // commit, slave ack, in sync, lag.
        assert_eq!(
            row(&table, 1, 1)[2..],
            [
                "master",
                "127.0.0.1:10000",
                "yes",
                "0.3s",
                "ago",
                "3",
                "3",
                "42",
                "42",
                "40",
                "-",
                "-"
            ]
        );
        assert_eq!(
            row(&table, 1, 2)[2..],
            [
                "slave",
                "127.0.0.1:10001",
                "yes",
                "0.3s",
                "ago",
                "3",
                "2",
                "40",
                "40",
                "-",
                "yes",
                "2"
            ]
        );
        assert_eq!(row(&table, 2, 2)[12..], ["no", "4"]);
        assert_eq!(row(&table, 1, 7)[8..], ["-", "-", "-", "-", "-", "-"]);
        // Every line of the table is as wide as needed and no wider: columns line up.
        let lag_column = header.find("LAG").expect("LAG");
        assert!(
            table
                .lines()
                .skip(2)
                .all(|line| line.len() == lag_column + 3),
            "{table}"
        );
    }

    #[test]
    fn status_says_why_a_server_cannot_serve() {
        let failed = NodeStatus {
            alive: false,
            failure: "storage failed, refusing requests: no space left on device".to_string(),
            ..node(1, 1, NodeRole::Slave, 42)
        };
        let table = status_table(&StatusReply {
            clusters: 1,
            nodes: vec![failed, node(1, 2, NodeRole::Master, 42)],
            heartbeat_interval_ms: 1000,
            failure_timeout_ms: 2000,
        });
        assert_eq!(row(&table, 1, 1)[4], "no");
        assert_eq!(
            table.lines().last(),
            Some(
                "cluster 1 server 1 cannot serve: storage failed, refusing requests: no space \
                 left on device"
            ),
            "{table}"
        );
    }
}
