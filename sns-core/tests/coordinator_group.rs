//! Coordinators of a group on a real etcd (`SNS_ETCD_URL`; skipped without it unless
//! `SNS_REQUIRE_ETCD=1`), in this process: a leader cut off from etcd stops leading before
//! another can lead; a deployment's roles are the ones etcd holds.

#![cfg(feature = "etcd")]

use std::sync::Arc;
use std::time::Duration;

use sns_core::coordinator::EtcdStore;
use sns_core::testing::{etcd_options, eventually};
use sns_core::{Coordinator, CoordinatorConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A TCP proxy to `target` that can be cut: every connection through it is dropped and new
/// ones are closed at once, as a network partition between one host and etcd would.
struct Proxy {
    addr: String,
    cut: CancellationToken,
}

impl Proxy {
    async fn start(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address").to_string();
        let cut = CancellationToken::new();
        tokio::spawn(Self::serve(listener, target, cut.clone()));
        Self { addr, cut }
    }

    async fn serve(listener: TcpListener, target: String, cut: CancellationToken) {
        while let Ok((mut inbound, _)) = listener.accept().await {
            if cut.is_cancelled() {
                continue;
            }
            let (target, cut) = (target.clone(), cut.clone());
            tokio::spawn(async move {
                let Ok(mut outbound) = TcpStream::connect(&target).await else {
                    return;
                };
                tokio::select! {
                    () = cut.cancelled() => {}
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                }
            });
        }
    }
}

fn config() -> CoordinatorConfig {
    let mut config = CoordinatorConfig::default();
    config.routing.clusters = 1;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_etcd_stops_leading_before_another_leads() {
    let Some(options) = etcd_options("cut_off", 1, 2).await else {
        return;
    };
    let target = options.endpoints[0]
        .trim_start_matches("http://")
        .to_string();
    let proxy = Proxy::start(target).await;
    let mut through_proxy = options.clone();
    through_proxy.endpoints = vec![format!("http://{}", proxy.addr)];
    let shutdown = CancellationToken::new();
    let store = |options| async { Arc::new(EtcdStore::connect(options).await.expect("etcd")) };
    let a = Coordinator::in_group(config(), "a", store(through_proxy).await, shutdown.clone());
    let leads = eventually(Duration::from_secs(20), || async {
        a.group_status().leading
    })
    .await;
    assert!(leads, "the first coordinator never led");
    let b = Coordinator::in_group(config(), "b", store(options).await, shutdown.clone());
    let fresh = eventually(Duration::from_secs(20), || async { b.group_status().fresh }).await;
    assert!(
        fresh && !b.group_status().leading,
        "the second reads etcd and waits"
    );

    proxy.cut.cancel();
    let cut_at = Instant::now();
    let mut a_stopped = None;
    let deadline = cut_at + Duration::from_secs(30);
    let b_leads = loop {
        let (a_leads, b_leads) = (a.group_status().leading, b.group_status().leading);
        assert!(!(a_leads && b_leads), "two coordinators lead at once");
        if !a_leads && a_stopped.is_none() {
            a_stopped = Some(cut_at.elapsed());
        }
        if b_leads {
            break cut_at.elapsed();
        }
        assert!(Instant::now() < deadline, "nobody leads 30 s after the cut");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let a_stopped = a_stopped.expect("the cut-off leader stopped leading");
    assert!(a_stopped < b_leads, "{a_stopped:?} then {b_leads:?}");
    eprintln!(
        "cut at 0: the cut-off leader stopped at {a_stopped:?}, the other led at {b_leads:?}"
    );
    // Cut off, it also stops vouching for masters.
    let stale = eventually(Duration::from_secs(10), || async {
        !a.group_status().fresh
    })
    .await;
    assert!(stale, "the cut-off coordinator still answers heartbeats");
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_keeps_its_clusters_roles_in_etcd() {
    use sns_core::coordinator::RoutingStore;
    use sns_core::deployment::DeploymentConfig;
    use sns_core::{Deployment, Role};

    let Some(options) = etcd_options("deployment", 2, 2).await else {
        return;
    };
    let mut config = DeploymentConfig::in_memory();
    config.clusters = 2;
    let store = EtcdStore::connect(options.clone()).await.expect("etcd");
    config.routing_store = Some(Arc::new(store));
    let deployment = Deployment::start(config)
        .await
        .expect("the deployment starts");
    deployment
        .wait_for_masters(Duration::from_secs(30))
        .await
        .expect("every cluster gets a master");

    // What etcd holds, read by another handle, names the masters that serve.
    let (records, _) = EtcdStore::connect(options)
        .await
        .expect("etcd")
        .load()
        .await
        .expect("the records");
    assert_eq!(records.len(), 2, "{records:?}");
    for record in records {
        let master = record.record.master.expect("a master is recorded");
        let server = deployment
            .server(record.cluster, master)
            .expect("the recorded master runs here");
        assert_eq!(server.role(), Role::Master, "{record:?}");
        assert!(record.record.epoch.0 >= 1);
    }
    assert!(deployment.coordinator().group_status().leading);
    deployment.shutdown().await;
}
