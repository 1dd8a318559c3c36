//! The live status page of a deployment (`sns up --http`, `coordinator --http`): plain HTML, CSS
//! and JavaScript served by the binary itself, no external assets. The page is served with the
//! picture of that moment in it, and opens an event stream (`GET /events`, server-sent events)
//! that sends the whole picture once a second as JSON:
//! every cluster and server with role, epoch, alive, in sync and replication lag, posts/s and
//! deliveries/s per cluster, and the cross-cluster sync lag per origin (in events behind the
//! origin's head, and the age of the newest applied event).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse};
use serde::Serialize;
use sns_core::Role;
use tokio::time::Instant;

use crate::metrics::{Exporter, Source};

/// How often the page is sent a new picture.
const EVERY: Duration = Duration::from_secs(1);
/// The rates of a page's first picture are measured since the previous page load, if it was
/// at most this long ago (else they show 0 until the first event).
const RECENT_LOAD: Duration = Duration::from_secs(10);

/// One moment of the deployment, as the page shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Picture {
    /// Every server the coordinator knows, or that runs in this process.
    pub servers: Vec<ServerRow>,
    /// Per cluster: committed entries and deliveries per second (servers in this process).
    pub clusters: Vec<ClusterRow>,
    /// Per synchronizer and origin: events behind the origin's head, and the age of the
    /// newest applied event.
    pub sync: Vec<SyncRow>,
    /// The coordinator serving the page, if it is one: its standing in its group.
    pub coordinator: Option<CoordinatorRow>,
}

/// Where the coordinator stands in its group.
#[derive(Debug, Clone, Serialize)]
pub struct CoordinatorRow {
    /// Its name in its group.
    pub name: String,
    /// Where it keeps the clusters' roles (`memory`, `etcd`).
    pub store: String,
    /// Whether it leads its group.
    pub leading: bool,
    /// Whether it read its store within a failure timeout.
    pub fresh: bool,
}

/// One server's row.
#[derive(Debug, Clone, Serialize)]
pub struct ServerRow {
    /// Cluster id.
    pub cluster: u32,
    /// Server id.
    pub server: u32,
    /// `master`, `slave` or `unknown`.
    pub role: String,
    /// The cluster's epoch (or the server's own log epoch).
    pub epoch: u64,
    /// Whether its heartbeats arrive (true for servers in this process without a coordinator).
    pub alive: bool,
    /// A slave its master counts for the commit point.
    pub in_sync: bool,
    /// On a slave in this process: entries its master sequenced that it has not yet.
    pub lag: Option<u64>,
}

/// One cluster's rates.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterRow {
    /// Cluster id.
    pub cluster: u32,
    /// Entries committed per second on its master.
    pub commits_per_s: f64,
    /// Posts handed to timeline streams per second (all its servers).
    pub deliveries_per_s: f64,
}

/// One origin as a synchronizer applies it.
#[derive(Debug, Clone, Serialize)]
pub struct SyncRow {
    /// The synchronizer's cluster.
    pub cluster: u32,
    /// The origin cluster.
    pub origin: u32,
    /// The origin's highest sequence number applied.
    pub high_water: u64,
    /// The origin's committed events not applied yet (its head as its master answered, minus
    /// `high_water`); `None` while its master has not answered.
    pub behind: Option<u64>,
    /// Now minus the origin's time of its newest applied event, seconds.
    pub age_s: f64,
}

/// Running totals to turn counters into rates.
#[derive(Debug, Default, Clone)]
struct Totals {
    commits: BTreeMap<u32, u64>,
    deliveries: BTreeMap<u32, u64>,
}

/// What the exporter's sources say now; `last` carries the previous totals for the rates.
fn picture(exporter: &Exporter, last: &mut Totals, elapsed: f64) -> Picture {
    let mut picture = Picture::default();
    let mut totals = Totals::default();
    let mut masters: BTreeMap<u32, u64> = BTreeMap::new();
    for source in exporter.sources() {
        match source {
            Source::Coordinator(coordinator) => {
                let group = coordinator.group_status();
                picture.coordinator = Some(CoordinatorRow {
                    name: group.name,
                    store: group.store.to_string(),
                    leading: group.leading,
                    fresh: group.fresh,
                });
                let nodes = coordinator.table().nodes(tokio::time::Instant::now());
                for node in nodes.iter().filter(|n| n.role.is_some()) {
                    picture.servers.push(ServerRow {
                        cluster: node.cluster.get(),
                        server: node.id,
                        role: role_name(node.role),
                        epoch: node.epoch.0,
                        alive: node.alive,
                        in_sync: node.in_sync,
                        lag: None,
                    });
                }
            }
            Source::Server {
                cluster, handle, ..
            } => {
                let stats = handle.stats();
                let c = cluster.get();
                if stats.positions.role == Role::Master {
                    *totals.commits.entry(c).or_default() += stats.committed;
                    masters.insert(c, stats.positions.sequenced.0);
                }
                *totals.deliveries.entry(c).or_default() += stats.deliveries;
            }
            Source::Sync {
                cluster,
                synchronizer,
            } => {
                let now = sns_core::ids::Timestamp::now();
                for (origin, s) in synchronizer.link().stats() {
                    picture.sync.push(SyncRow {
                        cluster: cluster.get(),
                        origin: origin.get(),
                        high_water: s.high_water,
                        behind: s.behind(),
                        age_s: s.newest_event_age_s(now).unwrap_or(0.0),
                    });
                }
            }
        }
    }
    fill_lags(exporter, &mut picture, &masters);
    for (cluster, commits) in &totals.commits {
        let rate = |now: u64, before: Option<&u64>| {
            before.map_or(0.0, |b| now.saturating_sub(*b) as f64 / elapsed.max(1e-3))
        };
        let deliveries = totals.deliveries.get(cluster).copied().unwrap_or(0);
        picture.clusters.push(ClusterRow {
            cluster: *cluster,
            commits_per_s: rate(*commits, last.commits.get(cluster)),
            deliveries_per_s: rate(deliveries, last.deliveries.get(cluster)),
        });
    }
    *last = totals;
    picture
}

/// Adds the in-process servers' own view (slave lag) to the rows, and rows for servers no
/// coordinator reports.
fn fill_lags(exporter: &Exporter, picture: &mut Picture, masters: &BTreeMap<u32, u64>) {
    for source in exporter.sources() {
        let Source::Server {
            cluster,
            server,
            handle,
        } = source
        else {
            continue;
        };
        let positions = handle.positions();
        let (c, s) = (cluster.get(), server.get());
        let lag = (positions.role == Role::Slave)
            .then(|| {
                masters
                    .get(&c)
                    .map(|m| m.saturating_sub(positions.durable.0))
            })
            .flatten();
        match picture
            .servers
            .iter_mut()
            .find(|r| r.cluster == c && r.server == s)
        {
            Some(row) => row.lag = lag,
            None => picture.servers.push(ServerRow {
                cluster: c,
                server: s,
                role: role_name(Some(positions.role)),
                epoch: positions.epoch.0,
                alive: true,
                in_sync: positions.counted_by_master,
                lag,
            }),
        }
    }
    picture.servers.sort_by_key(|r| (r.cluster, r.server));
}

fn role_name(role: Option<Role>) -> String {
    match role {
        Some(Role::Master) => "master",
        Some(Role::Slave) => "slave",
        None => "unknown",
    }
    .to_string()
}

/// The page's routes: `GET /` (the page, holding the picture of the moment it was served)
/// and `GET /events` (its event stream).
pub fn router(exporter: Exporter) -> axum::Router {
    let for_events = exporter.clone();
    let last_load: LastLoad = Arc::new(Mutex::new(None));
    let load_for_events = last_load.clone();
    axum::Router::new()
        .route(
            "/",
            axum::routing::get(move || {
                let exporter = exporter.clone();
                let last_load = last_load.clone();
                async move { Html(page(&exporter, &last_load).await) }
            }),
        )
        .route(
            "/events",
            axum::routing::get(move || {
                let exporter = for_events.clone();
                let since = recent(&load_for_events);
                async move { events(exporter, since).into_response() }
            }),
        )
}

/// When the page was last served, and the totals then.
type LastLoad = Arc<Mutex<Option<(Instant, Totals)>>>;

/// The page with the picture of now in it, so it shows the deployment as soon as it loads
/// (its script draws that picture, then each one the event stream sends). Its rates are
/// measured since the previous load ([`RECENT_LOAD`]).
async fn page(exporter: &Exporter, last_load: &LastLoad) -> String {
    exporter.refresh().await;
    let mut last = last_load.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    let (mut totals, elapsed) = match last.take() {
        Some((at, totals)) if now - at <= RECENT_LOAD => (totals, (now - at).as_secs_f64()),
        _ => (Totals::default(), 1.0),
    };
    let picture = picture(exporter, &mut totals, elapsed);
    *last = Some((now, totals));
    PAGE.replace(FIRST_PICTURE, &script_json(&picture))
}

/// `picture` as JSON that can stand inside a `<script>` element: every `<` escaped (it can
/// only occur inside strings, where `\u003c` means the same), so no text closes the element.
fn script_json(picture: &Picture) -> String {
    serde_json::to_string(picture)
        .unwrap_or_else(|_| "null".to_string())
        .replace('<', "\\u003c")
}

/// Where the page holds its first picture.
const FIRST_PICTURE: &str = "/*first picture*/null";

/// The totals of the last page load, if it was recent ([`RECENT_LOAD`]).
fn recent(last_load: &LastLoad) -> Option<(Instant, Totals)> {
    let last = last_load.lock().unwrap_or_else(|p| p.into_inner());
    last.clone()
        .filter(|(at, _)| Instant::now() - *at <= RECENT_LOAD)
}

/// A picture now, then one every second; the first one's rates are measured since `since`
/// (the page's load), if given.
fn events(
    exporter: Exporter,
    since: Option<(Instant, Totals)>,
) -> Sse<impl futures_core::Stream<Item = Result<Event, Infallible>>> {
    let stream = async_stream(exporter, since);
    Sse::new(stream).keep_alive(KeepAlive::default())
}

fn async_stream(
    exporter: Exporter,
    since: Option<(Instant, Totals)>,
) -> impl futures_core::Stream<Item = Result<Event, Infallible>> {
    let (last, totals) = since.map_or((None, Totals::default()), |(at, t)| (Some(at), t));
    let state = (exporter, totals, last, true);
    futures_util::stream::unfold(state, |(exporter, mut totals, last, first)| async move {
        if !first {
            tokio::time::sleep(EVERY).await;
        }
        exporter.refresh().await;
        let now = Instant::now();
        let elapsed = last.map_or(1.0, |l| (now - l).as_secs_f64());
        let picture = picture(&exporter, &mut totals, elapsed);
        let json = serde_json::to_string(&picture).unwrap_or_else(|_| "{}".to_string());
        Some((
            Ok(Event::default().data(json)),
            (exporter, totals, Some(now), false),
        ))
    })
}

/// The page: a table of servers, one of clusters, one of sync lags, filled from `/events`.
const PAGE: &str = include_str!("status_page.html");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_picture_cannot_close_its_script() {
        let mut picture = Picture::default();
        picture.servers.push(ServerRow {
            cluster: 1,
            server: 1,
            role: "</script><script>alert(1)</script>".to_string(),
            epoch: 1,
            alive: true,
            in_sync: true,
            lag: None,
        });
        let json = script_json(&picture);
        assert!(!json.contains('<'), "{json}");
        let back: serde_json::Value = serde_json::from_str(&json).expect("still JSON");
        assert_eq!(back["servers"][0]["role"], picture.servers[0].role);
        assert!(PAGE.contains(FIRST_PICTURE), "the page has a place for it");
    }
}
