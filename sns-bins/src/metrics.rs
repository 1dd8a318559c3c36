//! `/metrics` in the Prometheus text format (OpenMetrics), for every long-running process.
//!
//! The core counts (`sns_core::stats`, `Server::stats`, the coordinator's table,
//! `ClusterLink::stats`, `AmqpBus::stats`); this module reads those at each scrape (first
//! asking the synchronizers' origins for their heads: [`Exporter::refresh`]) and encodes them
//! with the
//! `prometheus-client` crate, every family prefixed `sns_` and labelled by cluster, server and
//! origin as fits. [`serve`] answers `GET /metrics` (and, when given a page, `GET /` and the
//! page's event stream: see `crate::status_page`).

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use sns_core::ids::{ClusterId, ServerId};
use sns_core::stats::Histogram;
use sns_core::sync::Synchronizer;
use sns_core::{Coordinator, Role, Server};

mod sync;

/// Longest wait for a master's answer when measuring a synchronizer's lag at a scrape
/// ([`Exporter::refresh`]).
pub const PROBE_PATIENCE: std::time::Duration = std::time::Duration::from_millis(500);

/// Something whose figures `/metrics` shows.
#[derive(Debug, Clone)]
pub enum Source {
    /// A server, by cluster and server id.
    Server {
        /// Its cluster.
        cluster: ClusterId,
        /// Its id in the cluster.
        server: ServerId,
        /// The server.
        handle: Server,
    },
    /// The coordinator.
    Coordinator(Coordinator),
    /// The synchronizer of a cluster.
    Sync {
        /// The cluster it serves.
        cluster: ClusterId,
        /// The synchronizer (its link says what it applied, its transport what it carried).
        synchronizer: Synchronizer,
    },
}

/// The collector over a fixed set of sources.
#[derive(Debug, Clone)]
pub struct Exporter {
    sources: Arc<Vec<Source>>,
}

impl Exporter {
    /// An exporter of `sources`.
    pub fn new(sources: Vec<Source>) -> Self {
        Self {
            sources: Arc::new(sources),
        }
    }

    /// Every component of `deployment`: its coordinator, servers and synchronizers.
    pub fn of_deployment(deployment: &sns_core::Deployment) -> Self {
        let mut sources = vec![Source::Coordinator(deployment.coordinator().clone())];
        for place in deployment.servers() {
            if let Some(handle) = deployment.server(place.cluster, place.server) {
                sources.push(Source::Server {
                    cluster: place.cluster,
                    server: place.server,
                    handle: handle.clone(),
                });
            }
        }
        for place in deployment.synchronizers() {
            if let Some(synchronizer) = deployment.synchronizer(place.cluster) {
                sources.push(Source::Sync {
                    cluster: place.cluster,
                    synchronizer: synchronizer.clone(),
                });
            }
        }
        Self::new(sources)
    }

    /// The sources it shows.
    pub fn sources(&self) -> &[Source] {
        &self.sources
    }

    /// Brings up to date the figures measured by asking rather than counting: each
    /// synchronizer asks its cluster's master and its origins' masters for their high-water
    /// marks ([`ClusterLink::probe_origins`](sns_core::sync::ClusterLink::probe_origins)), all
    /// at once, waiting [`PROBE_PATIENCE`] at most.
    pub async fn refresh(&self) {
        let probes = self.sources.iter().filter_map(|source| match source {
            Source::Sync { synchronizer, .. } => {
                Some(synchronizer.link().probe_origins(PROBE_PATIENCE))
            }
            _ => None,
        });
        futures_util::future::join_all(probes).await;
    }

    /// Every metric, in the text format (as of the last [`refresh`](Self::refresh) for the
    /// figures measured by asking).
    pub fn render(&self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self.clone()));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

type Labels = Vec<(&'static str, String)>;

/// One family: its descriptor, then one value per label set.
struct Family<'a, 'e> {
    encoder: &'a mut DescriptorEncoder<'e>,
}

impl Family<'_, '_> {
    fn gauges(&mut self, name: &str, help: &str, rows: &[(Labels, f64)]) -> std::fmt::Result {
        if rows.is_empty() {
            return Ok(());
        }
        let mut metric = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, value) in rows {
            ConstGauge::new(*value).encode(metric.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn counters(&mut self, name: &str, help: &str, rows: &[(Labels, u64)]) -> std::fmt::Result {
        if rows.is_empty() {
            return Ok(());
        }
        let mut metric = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, value) in rows {
            ConstCounter::new(*value).encode(metric.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn histograms(
        &mut self,
        name: &str,
        help: &str,
        rows: &[(Labels, Histogram)],
    ) -> std::fmt::Result {
        if rows.is_empty() {
            return Ok(());
        }
        let mut metric = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Histogram)?;
        for (labels, h) in rows {
            metric
                .encode_family(labels)?
                .encode_histogram::<NoLabelSet>(h.sum_seconds, h.count, &h.buckets, None)?;
        }
        Ok(())
    }
}

impl Collector for Exporter {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let mut family = Family {
            encoder: &mut encoder,
        };
        let servers: Vec<_> = self
            .sources
            .iter()
            .filter_map(|s| match s {
                Source::Server {
                    cluster,
                    server,
                    handle,
                } => Some((*cluster, *server, handle)),
                _ => None,
            })
            .collect();
        servers_family(&mut family, &servers)?;
        for source in self.sources.iter() {
            if let Source::Coordinator(coordinator) = source {
                coordinator_family(&mut family, coordinator)?;
            }
        }
        let syncs: Vec<_> = self
            .sources
            .iter()
            .filter_map(|s| match s {
                Source::Sync {
                    cluster,
                    synchronizer,
                } => Some((*cluster, synchronizer)),
                _ => None,
            })
            .collect();
        sync::sync_family(&mut family, &syncs)?;
        sync::amqp_family(&mut family, &syncs)
    }
}

fn server_labels(cluster: ClusterId, server: ServerId) -> Labels {
    vec![
        ("cluster", cluster.to_string()),
        ("server", server.to_string()),
    ]
}

fn with(mut labels: Labels, key: &'static str, value: String) -> Labels {
    labels.push((key, value));
    labels
}

/// The servers' families.
fn servers_family(
    f: &mut Family<'_, '_>,
    servers: &[(ClusterId, ServerId, &Server)],
) -> std::fmt::Result {
    let stats: Vec<_> = servers
        .iter()
        .map(|(c, s, h)| (server_labels(*c, *s), h.stats()))
        .collect();
    let gauge = |pick: &dyn Fn(&sns_core::server::ServerStats) -> f64| -> Vec<(Labels, f64)> {
        stats.iter().map(|(l, s)| (l.clone(), pick(s))).collect()
    };
    let counter = |pick: &dyn Fn(&sns_core::server::ServerStats) -> u64| -> Vec<(Labels, u64)> {
        stats.iter().map(|(l, s)| (l.clone(), pick(s))).collect()
    };
    let is_master =
        |s: &sns_core::server::ServerStats| f64::from(u8::from(s.positions.role == Role::Master));
    f.gauges(
        "sns_server_is_master",
        "1 if the server is its cluster's master, else 0.",
        &gauge(&is_master),
    )?;
    f.gauges(
        "sns_server_epoch",
        "The epoch of the server's log.",
        &gauge(&|s| s.positions.epoch.0 as f64),
    )?;
    f.gauges(
        "sns_server_durable_index",
        "The last log index durable on this server.",
        &gauge(&|s| s.positions.durable.0 as f64),
    )?;
    f.gauges(
        "sns_server_commit_index",
        "The last committed log index.",
        &gauge(&|s| s.positions.commit.0 as f64),
    )?;
    f.counters(
        "sns_server_appended_entries",
        "Entries appended to the local log since start.",
        &counter(&|s| s.appended),
    )?;
    f.counters(
        "sns_server_committed_entries",
        "Entries committed since start.",
        &counter(&|s| s.committed),
    )?;
    f.counters(
        "sns_server_deliveries",
        "Posts handed to open timeline streams.",
        &counter(&|s| s.deliveries),
    )?;
    f.gauges(
        "sns_server_sessions",
        "Users with a live session.",
        &gauge(&|s| s.sessions as f64),
    )?;
    f.gauges(
        "sns_server_timeline_streams",
        "Open timeline streams.",
        &gauge(&|s| s.timeline_streams as f64),
    )?;
    let mut refusals = Vec::new();
    for (labels, s) in &stats {
        let remote = s.refused_remote.iter().map(|(_, c)| c);
        for (reason, count) in [
            ("limits", s.refused_limits),
            ("bad_input", s.refused_input),
            ("not_serving", s.refused_role),
            ("forged", remote.clone().map(|c| c.forged).sum()),
            ("clock", remote.clone().map(|c| c.clock).sum()),
            ("invalid_remote", remote.map(|c| c.invalid).sum()),
        ] {
            refusals.push((with(labels.clone(), "reason", reason.to_string()), count));
        }
    }
    f.counters(
        "sns_server_refusals",
        "Requests and remote events refused, by reason.",
        &refusals,
    )?;
    let mut lag = Vec::new();
    let mut in_sync = Vec::new();
    for (labels, s) in &stats {
        for slave in &s.slaves {
            let labels = with(labels.clone(), "slave", slave.server.to_string());
            let behind = s.positions.sequenced.0.saturating_sub(slave.acked.0);
            lag.push((labels.clone(), behind as f64));
            in_sync.push((labels, f64::from(u8::from(slave.in_sync))));
        }
    }
    f.gauges(
        "sns_server_replication_lag_entries",
        "On a master: entries sequenced and not yet acknowledged by each slave.",
        &lag,
    )?;
    f.gauges(
        "sns_server_slave_in_sync",
        "On a master: 1 if the slave is counted for the commit point.",
        &in_sync,
    )?;
    let commit: Vec<_> = stats
        .iter()
        .map(|(l, s)| (l.clone(), s.commit_latency.clone()))
        .collect();
    f.histograms(
        "sns_server_commit_latency_seconds",
        "From a client write's sequencing to its commit.",
        &commit,
    )?;
    let syncs: Vec<_> = stats
        .iter()
        .filter_map(|(l, s)| s.sync_latency.clone().map(|h| (l.clone(), h)))
        .collect();
    f.histograms(
        "sns_server_fsync_latency_seconds",
        "Time of each fdatasync of appended log entries.",
        &syncs,
    )
}

/// The coordinator's families.
fn coordinator_family(f: &mut Family<'_, '_>, coordinator: &Coordinator) -> std::fmt::Result {
    let (heartbeats, promotions, nodes) = {
        let table = coordinator.table();
        (
            table.heartbeats(),
            table.promotions(),
            table.nodes(tokio::time::Instant::now()),
        )
    };
    f.counters(
        "sns_coordinator_heartbeats",
        "Heartbeats taken.",
        &[(Vec::new(), heartbeats)],
    )?;
    let promotions: Vec<_> = promotions
        .into_iter()
        .map(|(c, n)| (vec![("cluster", c.to_string())], n))
        .collect();
    f.counters(
        "sns_coordinator_promotions",
        "Slaves named master in place of a dead master.",
        &promotions,
    )?;
    let dead = nodes.iter().filter(|n| !n.alive).count();
    f.gauges(
        "sns_coordinator_dead_nodes",
        "Servers and synchronizers whose heartbeats stopped.",
        &[(Vec::new(), dead as f64)],
    )?;
    let group = coordinator.group_status();
    let store = vec![("store", group.store.to_string())];
    f.gauges(
        "sns_coordinator_leading",
        "1 while this coordinator leads its group (detects failures and promotes); a coordinator alone always leads.",
        &[(store.clone(), f64::from(u8::from(group.leading)))],
    )?;
    f.gauges(
        "sns_coordinator_store_fresh",
        "1 while this coordinator has read its routing store within a failure timeout (else it answers no heartbeat).",
        &[(store, f64::from(u8::from(group.fresh)))],
    )?;
    let mut epochs = std::collections::BTreeMap::new();
    let mut alive = Vec::new();
    let mut masters = Vec::new();
    for node in &nodes {
        epochs.insert(node.cluster, node.epoch.0);
        let kind = if node.role.is_some() {
            "server"
        } else {
            "synchronizer"
        };
        let labels = vec![
            ("cluster", node.cluster.to_string()),
            ("kind", kind.to_string()),
            ("id", node.id.to_string()),
        ];
        alive.push((labels.clone(), f64::from(u8::from(node.alive))));
        if let Some(role) = node.role {
            masters.push((
                labels,
                f64::from(u8::from(role == Role::Master && node.alive)),
            ));
        }
    }
    let epochs: Vec<_> = epochs
        .into_iter()
        .map(|(c, e)| (vec![("cluster", c.to_string())], e as f64))
        .collect();
    f.gauges("sns_coordinator_epoch", "Each cluster's epoch.", &epochs)?;
    f.gauges(
        "sns_coordinator_node_alive",
        "1 if the node's heartbeats arrive in time.",
        &alive,
    )?;
    f.gauges(
        "sns_coordinator_server_is_master",
        "1 if the coordinator routes the cluster's clients to this live server.",
        &masters,
    )
}

/// Where metrics may be served: loopback always; any other address only with `insecure`
/// (nothing on the page or in `/metrics` needs a token to read).
pub fn check_addr(flag: &str, addr: &SocketAddr, insecure: bool) -> Result<(), String> {
    if addr.ip().is_loopback() || insecure {
        return Ok(());
    }
    Err(format!(
        "{flag} {addr}: metrics and the status page need no token to read; serve them on a \
         loopback address (127.0.0.1:PORT), or pass --insecure to serve them on {}",
        addr.ip()
    ))
}

/// Parses `HOST:PORT` (a port alone means 127.0.0.1).
pub fn parse_addr(flag: &str, text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    let full = if text.chars().all(|c| c.is_ascii_digit()) {
        format!("127.0.0.1:{text}")
    } else {
        text.to_string()
    };
    full.parse()
        .map_err(|_| format!("{flag} {text:?}: expected HOST:PORT, e.g. 127.0.0.1:9100"))
}

/// The content type of the text format `render` writes.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds `addr` for [`serve`], with a clear error.
pub async fn bind(flag: &str, addr: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("{flag} {addr}: cannot listen: {e}"))
}

/// Serves `GET /metrics` from `exporter` on `listener` (plus `router`'s routes, e.g. the status
/// page) until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    exporter: Exporter,
    router: axum::Router,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let app = router.route(
        "/metrics",
        axum::routing::get(move || {
            let exporter = exporter.clone();
            async move {
                exporter.refresh().await;
                (
                    [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
                    exporter.render(),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Starts [`serve`] in the background on an already bound listener, logging where.
pub fn spawn(
    listener: tokio::net::TcpListener,
    exporter: Exporter,
    router: axum::Router,
    shutdown: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics on http://{addr}/metrics");
    }
    tokio::spawn(async move {
        if let Err(e) = serve(listener, exporter, router, shutdown).await {
            tracing::error!("the metrics server stopped: {e}");
        }
    })
}

/// The `--metrics ADDR` flag of the long-running binaries.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics (HOST:PORT, or a port on 127.0.0.1);
    /// off unless given. Any but a loopback address needs --insecure.
    #[arg(long = "metrics", value_name = "ADDR")]
    pub metrics: Option<String>,
}

impl MetricsArgs {
    /// Binds the metrics address, if one was given (before the process starts its work, so a
    /// bad address stops it at once).
    pub async fn bind(&self, insecure: bool) -> Result<Option<tokio::net::TcpListener>, String> {
        let Some(text) = &self.metrics else {
            return Ok(None);
        };
        listen("--metrics", text, insecure).await.map(Some)
    }
}

/// Parses, checks and binds the address `text` given to `flag` (see [`check_addr`]).
pub async fn listen(
    flag: &str,
    text: &str,
    insecure: bool,
) -> Result<tokio::net::TcpListener, String> {
    let addr = parse_addr(flag, text)?;
    check_addr(flag, &addr, insecure)?;
    bind(flag, addr).await
}
