//! The tables `sns` prints: where everything of `sns up` runs ([`places`]), and the
//! coordinator's view for `sns status` ([`status`]).
//!
//! Only text is made here: the commands fetch what the tables show and print them. The start-up
//! table has fixed columns (scripts read it); the status table sizes each column to its widest
//! cell and trims trailing blanks, so its columns line up and no line is wider than needed.

use sns_core::admin::{DeploymentStatus, NodeStatus};
use sns_core::{Deployment, Role};

use crate::bus::bus_name;
use crate::up::TokenHints;

/// Where everything of a started deployment runs, where the cluster token is, and how to
/// reach it all.
pub(crate) fn places(
    deployment: &Deployment,
    token: &TokenHints,
    page: std::net::SocketAddr,
) -> String {
    let coordinator = deployment.coordinator_addr();
    let clusters = deployment.config().clusters;
    let mut out = format!(
        "Tiny SNS is up: {clusters} cluster{}, coordinator at {coordinator}\n\n",
        if clusters == 1 { "" } else { "s" }
    );
    out.push_str(&servers(deployment));
    out.push_str(&synchronizers(deployment));
    let (host, port) = coordinator
        .rsplit_once(':')
        .unwrap_or((coordinator, "9090"));
    let TokenHints { kept, env, flags } = token;
    out.push_str(&format!(
        "\nCluster token:     {kept}\n\
         Connect a client:  tsc -h {host} -k {port} -u <user id>\n\
         Status:            {env}sns status -h {host} -k {port}{flags}\n\
         Status page:       http://{page}/\n\
         Metrics:           http://{page}/metrics\n\
         Press Ctrl-C to stop.\n"
    ));
    out
}

/// The start-up table's servers: each one's role as the coordinator sees it now, its address
/// and its data directory.
fn servers(deployment: &Deployment) -> String {
    let mut out = format!(
        "{:<8} {:<7} {:<7} {:<22} DATA\n",
        "CLUSTER", "SERVER", "ROLE", "ADDRESS"
    );
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
    out
}

/// The start-up table's synchronizers (nothing if there are none): each one's bus and address.
fn synchronizers(deployment: &Deployment) -> String {
    let synchronizers = deployment.synchronizers();
    let mut out = String::new();
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
    out
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
/// last heartbeat, so they may be up to one interval old. Below the table, why any server
/// cannot serve.
pub(crate) fn status(view: &DeploymentStatus) -> String {
    let rows: Vec<Vec<String>> = view
        .nodes
        .iter()
        .map(|node| status_row(node, &view.nodes))
        .collect();
    let mut out = format!(
        "{} clusters; heartbeat every {} ms, dead after {} ms\n",
        view.clusters,
        view.heartbeat_interval.as_millis(),
        view.failure_timeout.as_millis()
    );
    if view.routing_store != "memory" && !view.routing_store.is_empty() {
        let standing = match (view.store_fresh, view.leading) {
            (false, _) => "cannot reach its store lately, so it answers no heartbeat",
            (true, true) => "leads the group (detects failures, promotes)",
            (true, false) => "follows the group's leader",
        };
        out.push_str(&format!(
            "coordinator {} of a group on {}: {standing}\n",
            view.coordinator, view.routing_store
        ));
    }
    out.push_str(&aligned(&STATUS_COLUMNS, &rows));
    for node in &view.nodes {
        if let Some(failure) = &node.failure {
            out.push_str(&format!(
                "cluster {} server {} cannot serve: {failure}\n",
                node.cluster, node.id
            ));
        }
    }
    out
}

/// The cells of `node`'s row; `nodes` (every node) gives a slave's lag behind its master.
fn status_row(node: &NodeStatus, nodes: &[NodeStatus]) -> Vec<String> {
    let server = node.role.is_some();
    let slave = node.role == Some(Role::Slave);
    let position = |value: u64| {
        if server {
            value.to_string()
        } else {
            "-".to_string()
        }
    };
    let master_durable = nodes
        .iter()
        .find(|m| m.cluster == node.cluster && m.role == Some(Role::Master))
        .map(|m| m.durable);
    let lag = match master_durable {
        Some(durable) if slave => durable.0.saturating_sub(node.durable.0).to_string(),
        _ => "-".to_string(),
    };
    let role = match node.role {
        Some(Role::Master) => "master",
        Some(Role::Slave) => "slave",
        None => "synchronizer",
    };
    vec![
        node.cluster.to_string(),
        node.id.to_string(),
        role.to_string(),
        node.addr.clone(),
        if node.alive { "yes" } else { "no" }.to_string(),
        format!(
            "{:.1}s ago",
            node.since_heartbeat.as_millis() as f64 / 1000.0
        ),
        node.epoch.0.to_string(),
        position(node.log_epoch.0),
        position(node.durable.0),
        position(node.commit.0),
        node.slave_acked
            .map_or_else(|| "-".to_string(), |i| i.0.to_string()),
        match (slave, node.in_sync) {
            (false, _) => "-",
            (true, true) => "yes",
            (true, false) => "no",
        }
        .to_string(),
        lag,
    ]
}

/// `rows` under the headers of `columns`, each column as wide as its widest cell and aligned
/// as the column says, two spaces apart, with no trailing blanks.
fn aligned(columns: &[(&str, Align)], rows: &[Vec<String>]) -> String {
    let headers: Vec<String> = columns.iter().map(|(h, _)| h.to_string()).collect();
    let widths: Vec<usize> = (0..columns.len())
        .map(|i| {
            std::iter::once(&headers)
                .chain(rows)
                .map(|row| row[i].len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in std::iter::once(&headers).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .zip(columns.iter().map(|(_, align)| align))
            .map(|((cell, width), align)| match align {
                Align::Left => format!("{cell:<width$}"),
                Align::Right => format!("{cell:>width$}"),
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sns_core::{Epoch, LogIndex};

    use super::*;

    fn node(cluster: u32, server: u32, role: Option<Role>, durable: u64) -> NodeStatus {
        NodeStatus {
            cluster,
            id: server,
            role,
            addr: format!("127.0.0.1:{}", cluster * 10_000 + server - 1),
            since_heartbeat: Duration::from_millis(300),
            alive: true,
            epoch: Epoch(3),
            log_epoch: Epoch(2),
            durable: LogIndex(durable),
            commit: LogIndex(durable),
            slave_acked: None,
            in_sync: false,
            failure: None,
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

    fn view(clusters: u32, nodes: Vec<NodeStatus>) -> DeploymentStatus {
        DeploymentStatus {
            clusters,
            heartbeat_interval: Duration::from_millis(1000),
            failure_timeout: Duration::from_millis(2000),
            nodes,
            coordinator: "127.0.0.1:9090".to_string(),
            routing_store: "memory".to_string(),
            leading: true,
            store_fresh: true,
        }
    }

    #[test]
    fn status_names_the_answering_coordinator_of_a_group_and_its_standing() {
        let alone = status(&view(1, Vec::new()));
        assert!(!alone.contains("group"), "{alone}");
        let follower = DeploymentStatus {
            routing_store: "etcd".to_string(),
            leading: false,
            ..view(1, Vec::new())
        };
        let shown = status(&follower);
        assert_eq!(
            shown.lines().nth(1),
            Some("coordinator 127.0.0.1:9090 of a group on etcd: follows the group's leader")
        );
        let cut_off = DeploymentStatus {
            store_fresh: false,
            ..follower
        };
        assert!(status(&cut_off).contains("answers no heartbeat"));
    }

    #[test]
    fn status_shows_epochs_positions_and_the_lag_and_sync_of_each_slave() {
        let master = NodeStatus {
            slave_acked: Some(LogIndex(40)),
            log_epoch: Epoch(3),
            ..node(1, 1, Some(Role::Master), 42)
        };
        let in_sync = NodeStatus {
            in_sync: true,
            ..node(1, 2, Some(Role::Slave), 40)
        };
        let behind = node(2, 2, Some(Role::Slave), 5);
        let other_master = node(2, 1, Some(Role::Master), 9);
        let sync = node(1, 7, None, 0);
        let table = status(&view(2, vec![master, in_sync, other_master, behind, sync]));
        assert_eq!(
            table.lines().next(),
            Some("2 clusters; heartbeat every 1000 ms, dead after 2000 ms")
        );
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
            failure: Some("storage failed, refusing requests: no space left on device".to_string()),
            ..node(1, 1, Some(Role::Slave), 42)
        };
        let table = status(&view(1, vec![failed, node(1, 2, Some(Role::Master), 42)]));
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
