//! The conformance suite for [`RoutingStore`] implementations: the checks this crate runs
//! against [`MemoryStore`](crate::coordinator::MemoryStore) and, with a real etcd, `EtcdStore`.
//!
//! [`run_all`] takes a function that opens a store on fresh, empty data (each call a new
//! handle on the same data), for a deployment of 3 clusters × 3 servers, and checks:
//!
//! - an empty store loads nothing; a record written from revision 0 loads back with the
//!   revision its write returned;
//! - a write at a revision that is no longer the record's is a conflict and changes nothing;
//! - a follower started at a revision gets every later change in order, from every handle;
//! - one term at a time: a second candidate leads only after the first resigned, and a write
//!   under an ended term is refused and changes nothing.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::coordinator::{RolesRecord, RoutingStore, StoredRoles, Swap};
use crate::ids::{ClusterId, Epoch, ServerId};

/// How long the suite waits for a store to do something.
const PATIENCE: Duration = Duration::from_secs(10);

fn cluster(id: u32) -> ClusterId {
    ClusterId::new(id).expect("cluster")
}

fn record(epoch: u64, master: u32, in_sync: &[u32]) -> RolesRecord {
    RolesRecord {
        epoch: Epoch(epoch),
        master: ServerId::new(master),
        in_sync: in_sync.iter().filter_map(|s| ServerId::new(*s)).collect(),
        promotions: 0,
    }
}

async fn within<T>(what: &str, work: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, work)
        .await
        .unwrap_or_else(|_| panic!("{what}: the store did not answer in {PATIENCE:?}"))
}

/// Runs every check, each on a store `open` makes on fresh data.
pub async fn run_all<S, F, Fut>(mut open: F)
where
    S: RoutingStore + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = (S, S)>,
{
    let (store, _) = open().await;
    writes_compare_revisions(&store).await;
    let (first, second) = open().await;
    followers_see_every_change_in_order(&first, &second).await;
    let (first, second) = open().await;
    one_term_at_a_time(&first, &second).await;
}

/// Writes load back, and a stale revision is a conflict.
async fn writes_compare_revisions<S: RoutingStore>(store: &S) {
    let (records, _) = within("load", store.load()).await.expect("load");
    assert!(records.is_empty(), "a fresh store holds {records:?}");
    let term = within("lead", store.lead("a")).await.expect("lead");
    let first = record(1, 1, &[2]);
    let Swap::Done(at) = within("swap", store.swap(&term, cluster(2), 0, &first))
        .await
        .expect("swap")
    else {
        panic!("a first write from revision 0 must succeed");
    };
    let stale = within("swap", store.swap(&term, cluster(2), 0, &record(2, 2, &[])))
        .await
        .expect("swap");
    assert_eq!(stale, Swap::Conflict, "a write from a stale revision");
    let (records, _) = within("load", store.load()).await.expect("load");
    assert_eq!(
        records,
        [StoredRoles {
            cluster: cluster(2),
            record: first.clone(),
            revision: at
        }]
    );
    let second = record(2, 2, &[]);
    let after = within("swap", store.swap(&term, cluster(2), at, &second))
        .await
        .expect("swap");
    assert!(matches!(after, Swap::Done(r) if r > at), "{after:?}");
    term.resign();
}

/// A follower started at a revision sees every change after it, in order.
async fn followers_see_every_change_in_order<S: RoutingStore + 'static>(writer: &S, reader: &S) {
    let (_, start) = within("load", reader.load()).await.expect("load");
    let (changes, mut seen) = mpsc::channel(16);
    let following = reader.follow(start, changes);
    let writing = async {
        let term = within("lead", writer.lead("writer")).await.expect("lead");
        let mut revisions = Vec::new();
        let mut at = 0;
        for epoch in 1..=3 {
            let swapped = writer
                .swap(&term, cluster(1), at, &record(epoch, 1, &[]))
                .await
                .expect("swap");
            let Swap::Done(revision) = swapped else {
                panic!("write {epoch}: {swapped:?}");
            };
            at = revision;
            revisions.push((cluster(1), revision));
        }
        let Swap::Done(revision) = writer
            .swap(&term, cluster(3), 0, &record(1, 2, &[1]))
            .await
            .expect("swap")
        else {
            panic!("a write to another cluster");
        };
        revisions.push((cluster(3), revision));
        term.resign();
        let mut got = Vec::new();
        while got.len() < revisions.len() {
            let change = within("follow", seen.recv()).await.expect("a change");
            got.push((change.cluster, change.revision));
        }
        assert_eq!(got, revisions, "changes in write order");
        drop(seen);
    };
    let (followed, ()) = tokio::join!(following, writing);
    followed.expect("the follower ends cleanly when its receiver is dropped");
}

/// A second candidate leads only once the first resigned; writes under an ended term fail.
async fn one_term_at_a_time<S: RoutingStore>(first: &S, second: &S) {
    let term = within("lead", first.lead("first")).await.expect("lead");
    let waiting = second.lead("second");
    tokio::pin!(waiting);
    let early = tokio::time::timeout(Duration::from_millis(300), &mut waiting).await;
    assert!(early.is_err(), "a second candidate led while the first did");
    term.resign();
    let next = within("the second candidate", waiting)
        .await
        .expect("the second leads once the first resigned");
    let refused = within("swap", first.swap(&term, cluster(1), 0, &record(1, 1, &[])))
        .await
        .expect("swap");
    assert_eq!(refused, Swap::NotLeading, "a write under an ended term");
    let (records, _) = within("load", second.load()).await.expect("load");
    assert!(records.is_empty(), "the refused write changed {records:?}");
    let done = within(
        "swap",
        second.swap(&next, cluster(1), 0, &record(1, 1, &[])),
    )
    .await
    .expect("swap");
    assert!(matches!(done, Swap::Done(_)), "{done:?}");
    next.resign();
}
