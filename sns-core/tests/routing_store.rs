//! The routing store suite against the stores this crate ships: in memory always, in etcd when
//! `SNS_ETCD_URL` names one (see `sns_core::testing::etcd_options`).

use sns_core::coordinator::MemoryStore;
use sns_core::testing::routing_store_suite;

#[tokio::test]
async fn the_memory_store_passes_the_suite() {
    routing_store_suite::run_all(|| async {
        let store = MemoryStore::new();
        (store.clone(), store)
    })
    .await;
}

#[cfg(feature = "etcd")]
#[tokio::test]
async fn the_etcd_store_passes_the_suite() {
    use sns_core::coordinator::EtcdStore;
    use sns_core::testing::etcd_options;

    let Some(options) = etcd_options("etcd_suite", 3, 3).await else {
        return;
    };
    let mut fresh = 0;
    routing_store_suite::run_all(|| {
        fresh += 1;
        let mut options = options.clone();
        options.prefix = format!("{}/{fresh}", options.prefix);
        async move {
            let open = || EtcdStore::connect(options.clone());
            (open().await.expect("etcd"), open().await.expect("etcd"))
        }
    })
    .await;
}
