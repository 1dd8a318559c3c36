//! `/metrics` and the status page's event stream, scraped over HTTP from a whole deployment in
//! this process while it works: a post moves the delivery and commit counters, a synchronizer
//! measures itself caught up with its origin's head, and a stopped slave shows as a dead node
//! that is no longer in sync.

use std::time::Duration;

use sns_bins::metrics::Exporter;
use sns_core::deployment::{Deployment, DeploymentConfig};
use sns_core::session::{Session, SessionConfig, Target};
use sns_core::{ClusterId, Role, UserId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(20);

/// The body of `GET path` (the response is read until the server closes it).
async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read the response");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The first event of the status page's stream, as JSON.
async fn first_event(addr: std::net::SocketAddr) -> serde_json::Value {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /events HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .expect("send");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await.expect("read");
        assert!(n > 0, "the stream ended before its first event");
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen);
        if let Some(at) = text.find("data: ")
            && let Some(end) = text[at..].find('\n')
        {
            return serde_json::from_str(&text[at + 6..at + end]).expect("the event is JSON");
        }
    }
}

/// Sum of the samples of `family` whose labels include every one of `labels`.
fn sample(metrics: &str, family: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix(family) else {
            continue;
        };
        if !rest.starts_with('{') || !labels.iter().all(|l| rest.contains(l)) {
            continue;
        }
        let value: f64 = rest.rsplit(' ').next()?.parse().ok()?;
        *found.get_or_insert(0.0) += value;
    }
    found
}

async fn eventually_scraped(
    addr: std::net::SocketAddr,
    what: &str,
    check: impl Fn(&str) -> bool,
) -> String {
    let seen = |metrics: &str| check(metrics);
    let shown =
        sns_core::testing::eventually(WAIT, || async { seen(&get(addr, "/metrics").await) }).await;
    let metrics = get(addr, "/metrics").await;
    assert!(shown, "{what} never showed in:\n{metrics}");
    metrics
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_the_status_page_follow_a_working_deployment() {
    let mut config = DeploymentConfig::in_memory();
    config.clusters = 2;
    let mut deployment = Deployment::start(config).await.expect("start");
    deployment.wait_for_masters(WAIT).await.expect("masters");
    let exporter = Exporter::of_deployment(&deployment);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let stop = tokio_util::sync::CancellationToken::new();
    let serving = sns_bins::metrics::spawn(
        listener,
        exporter.clone(),
        sns_bins::status_page::router(exporter),
        stop.clone(),
    );

    let c1 = ClusterId::new(1).expect("cluster");
    let before = get(addr, "/metrics").await;
    assert!(
        before.contains("# TYPE sns_server_deliveries counter"),
        "{before}"
    );
    assert_eq!(
        sample(&before, "sns_server_deliveries_total", &["cluster=\"1\""]),
        Some(0.0)
    );

    // Users 1 and 3 live on cluster 1 of 2: 3 follows 1 and reads while 1 posts.
    let connect = |user: u32| {
        Session::connect(
            deployment.network(),
            Target::Coordinator(deployment.coordinator_addr().to_string()),
            UserId::new(user).expect("user"),
            SessionConfig::default(),
        )
    };
    let (author, reader) = (
        connect(1).await.expect("login"),
        connect(3).await.expect("login"),
    );
    reader
        .follow(UserId::new(1).expect("user"))
        .await
        .expect("follow");
    let mut timeline = reader.timeline().await.expect("timeline");
    let posting = author.timeline().await.expect("timeline");
    posting.post("measured").await.expect("post");
    let got = tokio::time::timeout(WAIT, timeline.next())
        .await
        .expect("delivered in time")
        .expect("a post")
        .expect("not an error");
    assert_eq!(got.text, "measured");

    let after = eventually_scraped(addr, "the delivery", |m| {
        sample(m, "sns_server_deliveries_total", &["cluster=\"1\""]) == Some(1.0)
    })
    .await;
    let committed = sample(
        &after,
        "sns_server_committed_entries_total",
        &["cluster=\"1\"", "server=\"1\""],
    );
    assert!(
        committed.is_some_and(|c| c >= 4.0),
        "two joins, a follow, a post: {after}"
    );
    // The commits were timed (storage in memory syncs nothing, so only commit latency).
    let timed = sample(
        &after,
        "sns_server_commit_latency_seconds_count",
        &["cluster=\"1\""],
    );
    assert!(timed.is_some_and(|n| n >= 1.0), "{after}");

    // Cluster 2's synchronizer applied cluster 1's events and measures itself against cluster
    // 1's head: caught up, nothing behind.
    let synced = eventually_scraped(addr, "cluster 2 caught up with cluster 1", |m| {
        let on_two = ["cluster=\"2\"", "origin=\"1\""];
        sample(m, "sns_sync_lag_events", &on_two) == Some(0.0)
            && sample(m, "sns_sync_origin_head", &on_two).is_some_and(|head| head >= 4.0)
    })
    .await;
    assert_eq!(
        sample(
            &synced,
            "sns_sync_high_water",
            &["cluster=\"2\"", "origin=\"1\""]
        ),
        sample(
            &synced,
            "sns_sync_origin_head",
            &["cluster=\"2\"", "origin=\"1\""]
        ),
        "{synced}"
    );
    assert!(
        !synced.contains("sns_sync_amqp_"),
        "no RabbitMQ families for the in-process bus"
    );

    // The status page's stream names every server with its role.
    let picture = first_event(addr).await;
    let servers = picture["servers"].as_array().expect("servers");
    assert_eq!(servers.len(), 4, "{picture}");
    for place in deployment.servers() {
        let role = deployment
            .server(place.cluster, place.server)
            .expect("running")
            .positions()
            .role;
        let row = servers
            .iter()
            .find(|r| r["cluster"] == place.cluster.get() && r["server"] == place.server.get())
            .expect("a row per server");
        let expected = if role == Role::Master {
            "master"
        } else {
            "slave"
        };
        assert_eq!(row["role"], expected, "{picture}");
    }

    // Stop cluster 1's slave: the coordinator counts it dead, the master no longer in sync.
    let slave = deployment
        .servers()
        .into_iter()
        .find(|p| {
            p.cluster == c1
                && deployment
                    .server(p.cluster, p.server)
                    .is_some_and(|s| s.positions().role == Role::Slave)
        })
        .expect("a slave")
        .server;
    eventually_scraped(addr, "the coordinator leading", |m| {
        sample(m, "sns_coordinator_leading", &["store=\"memory\""]) == Some(1.0)
            && sample(m, "sns_coordinator_store_fresh", &["store=\"memory\""]) == Some(1.0)
    })
    .await;
    deployment.stop(c1, slave).await.expect("stop the slave");
    let node = format!("id=\"{slave}\"");
    eventually_scraped(addr, "the dead slave", |m| {
        sample(
            m,
            "sns_coordinator_node_alive",
            &["cluster=\"1\"", "kind=\"server\"", &node],
        ) == Some(0.0)
            && sample(
                m,
                "sns_server_slave_in_sync",
                &["cluster=\"1\"", &format!("slave=\"{slave}\"")],
            )
            .is_none_or(|v| v == 0.0)
    })
    .await;

    drop((timeline, posting, author, reader));
    stop.cancel();
    serving.await.expect("the metrics server stops");
    deployment.shutdown().await;
}
