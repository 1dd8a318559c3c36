//! A synchronizer's handle on clusters: the current master of a cluster, found through the
//! coordinator and found again after a failover.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::progress::{OriginStats, Progress};
use super::refusals::SyncRefusals;
use super::seal::SyncKey;
use crate::client::CoordinatorClient;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::grpc::log::{LogPeer, next_encoded};
use crate::grpc::raw::EncodedBatch;
use crate::ids::{ClusterId, UserId};
use crate::transport::Network;

/// First pause before asking the coordinator again after a failed call.
const FIRST_RETRY: Duration = Duration::from_millis(20);
/// Longest pause between attempts.
const MAX_RETRY: Duration = Duration::from_millis(500);

/// Most events [`EventFeed::next`] gathers from batches that have already arrived: what one
/// apply takes.
const GATHER: usize = crate::server::MAX_APPLY_BATCH;

/// Where a synchronizer runs: its cluster, the deployment's coordinator and network.
#[derive(Clone)]
pub struct ClusterLink {
    inner: Arc<Inner>,
}

struct Inner {
    cluster: ClusterId,
    clusters: u32,
    network: Network,
    coordinator: CoordinatorClient,
    token: Option<Arc<str>>,
    /// Signs and checks batches; derived from `token`.
    key: Option<SyncKey>,
    refusals: SyncRefusals,
    shutdown: CancellationToken,
    /// The master of each cluster as last located.
    masters: Mutex<BTreeMap<ClusterId, (String, LogPeer)>>,
    /// What was applied and what the origins report, per origin.
    progress: Progress,
}

impl std::fmt::Debug for ClusterLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterLink")
            .field("cluster", &self.inner.cluster)
            .field("coordinator", &self.inner.coordinator.addr())
            .finish_non_exhaustive()
    }
}

impl ClusterLink {
    /// A link for the synchronizer of `cluster` (of `clusters`), reaching the coordinator at
    /// `coordinator` and the servers over `network`. Every retry loop ends when `shutdown` is
    /// cancelled.
    pub fn new(
        cluster: ClusterId,
        clusters: u32,
        network: &Network,
        coordinator: &str,
        cluster_token: Option<&str>,
        shutdown: CancellationToken,
    ) -> Result<Self> {
        if cluster.get() > clusters {
            return Err(Error::invalid(format!(
                "cluster {cluster} does not exist in a deployment of {clusters} clusters"
            )));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                cluster,
                clusters,
                network: network.clone(),
                coordinator: CoordinatorClient::new(network, coordinator)?,
                token: cluster_token.map(Arc::from),
                key: cluster_token.map(SyncKey::from_token),
                refusals: SyncRefusals::default(),
                shutdown,
                masters: Mutex::new(BTreeMap::new()),
                progress: Progress::default(),
            }),
        })
    }

    /// The cluster this link serves.
    pub fn cluster(&self) -> ClusterId {
        self.inner.cluster
    }

    /// Number of clusters in the deployment.
    pub fn clusters(&self) -> u32 {
        self.inner.clusters
    }

    /// Every other cluster of the deployment.
    pub fn others(&self) -> Vec<ClusterId> {
        (1..=self.inner.clusters)
            .filter_map(ClusterId::new)
            .filter(|c| *c != self.inner.cluster)
            .collect()
    }

    /// The network the deployment runs on.
    pub fn network(&self) -> &Network {
        &self.inner.network
    }

    /// The coordinator.
    pub fn coordinator(&self) -> &CoordinatorClient {
        &self.inner.coordinator
    }

    /// The cluster token for internal calls, if one is set.
    pub fn cluster_token(&self) -> Option<&str> {
        self.inner.token.as_deref()
    }

    /// The key that signs this cluster's batches and checks the others' (derived from the
    /// cluster token; none without one: batches go unsigned).
    pub fn sync_key(&self) -> Option<&SyncKey> {
        self.inner.key.as_ref()
    }

    /// What this synchronizer refused, counted.
    pub fn refusals(&self) -> &SyncRefusals {
        &self.inner.refusals
    }

    /// Cancelled when the synchronizer stops.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// The committed high-water mark of every origin on this cluster's master.
    pub async fn high_water(&self) -> Result<BTreeMap<ClusterId, u64>> {
        let marks = self
            .retrying(
                self.inner.cluster,
                |peer| async move { peer.high_water().await },
            )
            .await?;
        self.inner.progress.cluster_marks(&marks, &self.others());
        Ok(marks)
    }

    /// `origin`'s own committed high-water mark, as its master says (0 before its first
    /// event), asking the coordinator for the master again after a failover. Waits as long as
    /// it takes: bound it with a timeout where the origin may be gone.
    pub async fn origin_high_water(&self, origin: ClusterId) -> Result<u64> {
        let marks = self
            .retrying(origin, |peer| async move { peer.high_water().await })
            .await?;
        let head = marks.get(&origin).copied().unwrap_or(0);
        self.inner.progress.origin_head(origin, head);
        Ok(head)
    }

    /// Measures how far behind its origins this cluster is: asks this cluster's master for its
    /// high-water marks and every other cluster's master for its own committed mark, at once,
    /// waiting `patience` at most for each, and keeps the answers in [`stats`](Self::stats)
    /// ([`OriginStats::behind`]). A master that does not answer in time leaves its last
    /// answer in place. Does nothing when the previous probe started less than
    /// [`PROBE_INTERVAL`](super::PROBE_INTERVAL) ago. For operators' figures only: the
    /// origins' answers are shown, never acted on.
    pub async fn probe_origins(&self, patience: Duration) {
        if !self.inner.progress.probe_due() {
            return;
        }
        let mut asking = tokio::task::JoinSet::new();
        let link = self.clone();
        asking.spawn(async move {
            let _ = tokio::time::timeout(patience, link.high_water()).await;
        });
        for origin in self.others() {
            let link = self.clone();
            asking.spawn(async move {
                let _ = tokio::time::timeout(patience, link.origin_high_water(origin)).await;
            });
        }
        while asking.join_next().await.is_some() {}
    }

    /// Applies a batch of `origin`'s events to this cluster's master and returns once they
    /// are committed there, asking the coordinator for the master again after a failover.
    /// Fails (without retrying) when the master refuses the batch, e.g. with
    /// [`Error::Conflict`] for a batch that skips sequence numbers.
    pub async fn apply(&self, origin: ClusterId, events: &[Event]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        self.retrying(self.inner.cluster, |peer| async move {
            peer.apply(origin, events).await
        })
        .await?;
        self.note_applied(origin, events);
        Ok(())
    }

    /// What this link applied so far, and what it knows of each origin's head, per origin.
    pub fn stats(&self) -> BTreeMap<ClusterId, OriginStats> {
        self.inner.progress.snapshot()
    }

    fn note_applied(&self, origin: ClusterId, events: &[Event]) {
        self.inner.progress.applied(origin, events);
    }

    /// [`apply`](Self::apply) for a batch in the encoding it arrived in, passed on as it is.
    pub async fn apply_encoded(&self, batch: &EncodedBatch) -> Result<()> {
        if batch.events().is_empty() {
            return Ok(());
        }
        self.retrying(self.inner.cluster, |peer| async move {
            peer.apply_encoded(batch).await
        })
        .await?;
        self.note_applied(batch.origin(), batch.events());
        Ok(())
    }

    /// `origin`'s own committed events after sequence number `after`, read from that
    /// cluster's master (as reader `cluster<this cluster>`, so its compactions keep what this
    /// cluster still needs) and following its failovers.
    pub fn events_of(&self, origin: ClusterId, after: u64) -> EventFeed {
        self.feed(origin, after, format!("cluster{}", self.inner.cluster))
    }

    /// This cluster's own committed events after `after`, read on behalf of `reader` (a
    /// consuming cluster such as `cluster2`, or a publisher such as `amqp`; see
    /// [`check_reader`](crate::server::check_reader)).
    pub fn own_events(&self, after: u64, reader: &str) -> EventFeed {
        self.feed(self.inner.cluster, after, reader.to_string())
    }

    fn feed(&self, origin: ClusterId, after: u64, reader: String) -> EventFeed {
        EventFeed {
            link: self.clone(),
            origin,
            last: after,
            reader,
            stream: None,
            gather: GATHER,
            held: None,
            broken: None,
        }
    }

    /// Calls `call` on `cluster`'s master until it succeeds, fails for a reason other than
    /// the master being unreachable or not master, or the synchronizer stops.
    async fn retrying<T, F, Fut>(&self, cluster: ClusterId, call: F) -> Result<T>
    where
        F: Fn(LogPeer) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut pause = FIRST_RETRY;
        loop {
            let outcome = match self.master(cluster).await {
                Ok(peer) => call(peer).await,
                Err(e) => Err(e),
            };
            match outcome {
                Err(e) if retriable(&e) => {
                    tracing::debug!(%cluster, "master call failed, asking again: {e}");
                    self.forget(cluster);
                    self.pause(&mut pause).await?;
                }
                other => return other,
            }
        }
    }

    /// Waits `pause` (doubling it for next time), or fails once the synchronizer stops.
    async fn pause(&self, pause: &mut Duration) -> Result<()> {
        tokio::select! {
            () = tokio::time::sleep(*pause) => {}
            () = self.inner.shutdown.cancelled() => return Err(stopping()),
        }
        *pause = (*pause * 2).min(MAX_RETRY);
        Ok(())
    }

    /// The master of `cluster`, as last located or asked of the coordinator now.
    async fn master(&self, cluster: ClusterId) -> Result<LogPeer> {
        if let Some((_, peer)) = self.lock().get(&cluster) {
            return Ok(peer.clone());
        }
        if self.inner.shutdown.is_cancelled() {
            return Err(stopping());
        }
        // User `c` belongs to cluster `c` (users map to clusters round robin from 1).
        let probe = UserId::new(cluster.get()).ok_or_else(|| Error::invalid("cluster 0"))?;
        let addr = self.inner.coordinator.locate(probe).await?;
        let peer = LogPeer::new(&self.inner.network, &addr, self.inner.token.clone())?;
        self.lock().insert(cluster, (addr, peer.clone()));
        Ok(peer)
    }

    fn forget(&self, cluster: ClusterId) {
        self.lock().remove(&cluster);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ClusterId, (String, LogPeer)>> {
        self.inner.masters.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One origin's committed events after a sequence number, read from its master and resumed
/// on the new master after a failover. Made by [`ClusterLink::events_of`].
pub struct EventFeed {
    link: ClusterLink,
    origin: ClusterId,
    last: u64,
    reader: String,
    stream: Option<tonic::Streaming<prost::bytes::Bytes>>,
    /// Most events one call yields from batches already received.
    gather: usize,
    /// A batch received while gathering that did not fit, not yet accepted: taken up next.
    held: Option<EncodedBatch>,
    /// How the stream broke while gathering, after a batch was gathered: handled next.
    broken: Option<Error>,
}

impl std::fmt::Debug for EventFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventFeed")
            .field("origin", &self.origin)
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

impl EventFeed {
    /// The origin whose events this feed reads.
    pub fn origin(&self) -> ClusterId {
        self.origin
    }

    /// The sequence number of the last event yielded (the starting point before the first).
    pub fn position(&self) -> u64 {
        self.last
    }

    /// The next events (consecutive sequence numbers following the last ones yielded),
    /// waiting until there are some. Rides out failovers; fails with [`Error::Compacted`] when
    /// the origin's log no longer holds the next event, and with [`Error::Unavailable`] once
    /// the synchronizer stops.
    ///
    /// Batches that arrived while the caller was busy with the last ones are yielded together
    /// (up to what one apply takes), so a caller that falls behind catches up in large
    /// batches rather than one small batch at a time; the first batch is never held back to
    /// wait for more.
    pub async fn next(&mut self) -> Result<Vec<Event>> {
        Ok(self.next_encoded().await?.into_events())
    }

    /// [`next`](Self::next), with the events' encoding as the master sent it (encoded again
    /// when batches were gathered, or some of a batch was yielded before).
    pub(crate) async fn next_encoded(&mut self) -> Result<EncodedBatch> {
        let mut pause = FIRST_RETRY;
        loop {
            // A batch held back by the last gathering comes before a break it saw, and both
            // before the stream (gathering sets at most one of them).
            let received = if let Some(batch) = self.held.take() {
                Ok(batch)
            } else if let Some(error) = self.broken.take() {
                Err(error)
            } else if let Some(stream) = self.stream.as_mut() {
                let next = tokio::select! {
                    next = next_encoded(stream) => next,
                    () = self.link.inner.shutdown.cancelled() => return Err(stopping()),
                };
                next.unwrap_or_else(|| Err(ended()))
            } else {
                let origin = self.origin;
                let after = self.last;
                let reader = self.reader.as_str();
                let opened = self
                    .link
                    .retrying(origin, |peer| async move {
                        peer.own_events(after, reader).await
                    })
                    .await;
                self.stream = Some(opened?);
                pause = FIRST_RETRY;
                continue;
            };
            let error = match received.and_then(|batch| self.accept(batch)) {
                Ok(Some(batch)) => return Ok(self.gather(batch)),
                Ok(None) => continue,
                Err(e) => e,
            };
            self.stream = None;
            if !retriable(&error) {
                return Err(error);
            }
            tracing::debug!(origin = %self.origin, "event stream broke, resuming: {error}");
            self.link.forget(self.origin);
            self.link.pause(&mut pause).await?;
        }
    }

    /// `first`, followed by the batches already received behind it, up to `self.gather`
    /// events in all, without waiting. A state transfer piece goes alone (its batches are sized
    /// by bytes). A batch that might not fit is held, unaccepted, for the next call (so
    /// [`position`](Self::position) counts only what was yielded); a break of the stream is
    /// kept to be handled by the next call, after what was gathered is yielded.
    fn gather(&mut self, first: EncodedBatch) -> EncodedBatch {
        if has_image(&first) {
            return first;
        }
        let mut gathered: Option<Vec<Event>> = None;
        let mut count = first.events().len();
        while count < self.gather {
            let Some(stream) = self.stream.as_mut() else {
                break;
            };
            let received = match ready_now(stream) {
                None => break,
                Some(Some(Ok(batch))) => batch,
                Some(Some(Err(e))) => {
                    self.broken = Some(e);
                    break;
                }
                Some(None) => {
                    self.broken = Some(ended());
                    break;
                }
            };
            if count + received.events().len() > self.gather || has_image(&received) {
                self.held = Some(received);
                break;
            }
            let fresh = match self.accept(received) {
                Ok(Some(fresh)) => fresh,
                Ok(None) => continue,
                Err(e) => {
                    self.broken = Some(e);
                    break;
                }
            };
            count += fresh.events().len();
            gathered
                .get_or_insert_with(|| Vec::with_capacity(self.gather))
                .extend(fresh.into_events());
        }
        match gathered {
            None => first,
            Some(more) => {
                let mut events = first.into_events();
                events.extend(more);
                EncodedBatch::encode(self.origin, events)
            }
        }
    }

    /// This feed, yielding at most `events` events at a time from batches already received
    /// (between 1 and what one apply takes; one batch as the master sent it may hold more).
    #[cfg(any(feature = "amqp", test))]
    pub(crate) fn gathering_at_most(mut self, events: usize) -> Self {
        self.gather = events.clamp(1, GATHER);
        self
    }

    /// Keeps the events after the last one completed (the pieces of a state transfer share
    /// one sequence number, completed by the last); a hole means the stream is not what was
    /// asked for.
    fn accept(&mut self, batch: EncodedBatch) -> Result<Option<EncodedBatch>> {
        let whole = batch.events().iter().all(|e| e.id.seq > self.last);
        let fresh = if whole {
            batch
        } else {
            let fresh: Vec<Event> = batch
                .into_events()
                .into_iter()
                .filter(|e| e.id.seq > self.last)
                .collect();
            EncodedBatch::encode(self.origin, fresh)
        };
        let Some(first) = fresh.events().first() else {
            return Ok(None);
        };
        if first.id.origin != self.origin || !first.continues(self.last) {
            return Err(Error::ConnectionLost(format!(
                "the stream of cluster {} skipped to {}",
                self.origin, first.id
            )));
        }
        // A state transfer piece that says more follow does not complete its sequence number.
        if let Some(done) = fresh.events().iter().rev().find(|e| e.completes()) {
            self.last = done.id.seq;
        }
        Ok(Some(fresh))
    }
}

/// Whether a failed call is worth repeating on the (possibly new) master.
pub(crate) fn retriable(error: &Error) -> bool {
    error.calls_for_reconnect() || matches!(error, Error::Io(_) | Error::Rpc(_))
}

/// The next batch of `stream` if it has already arrived (`None` if it has not), without
/// waiting. Taking a message from the stream is all or nothing, so nothing is lost when this
/// finds none.
fn ready_now(
    stream: &mut tonic::Streaming<prost::bytes::Bytes>,
) -> Option<Option<Result<EncodedBatch>>> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(next_encoded(stream)).poll(&mut cx) {
        std::task::Poll::Ready(next) => Some(next),
        std::task::Poll::Pending => None,
    }
}

fn has_image(batch: &EncodedBatch) -> bool {
    batch.events().iter().any(Event::is_image)
}

fn ended() -> Error {
    Error::ConnectionLost("the master ended the stream".to_string())
}

fn stopping() -> Error {
    Error::ShuttingDown("the synchronizer".to_string())
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use prost::Message as _;
    use prost::bytes::Bytes;

    use super::*;
    use crate::event::{EventKind, OriginImage};
    use crate::grpc::events::batch_to_wire;
    use crate::grpc::raw::RawCodec;
    use crate::ids::{EventId, Timestamp};

    const ORIGIN: u32 = 2;

    /// A response body whose messages have all arrived; after them it neither ends nor yields
    /// more (`None` in the queue: a broken stream).
    struct Arrived(VecDeque<Option<Bytes>>);

    impl http_body::Body for Arrived {
        type Data = Bytes;
        type Error = tonic::Status;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<std::result::Result<http_body::Frame<Bytes>, tonic::Status>>> {
            match self.get_mut().0.pop_front() {
                Some(Some(data)) => Poll::Ready(Some(Ok(http_body::Frame::data(data)))),
                Some(None) => Poll::Ready(Some(Err(tonic::Status::invalid_argument("refused")))),
                None => Poll::Pending,
            }
        }
    }

    fn joined(seq: u64) -> Event {
        Event {
            id: EventId {
                origin: ClusterId::new(ORIGIN).expect("cluster"),
                seq,
            },
            at: Timestamp(1),
            kind: EventKind::UserJoined {
                user: UserId::new(u32::try_from(seq).expect("small") * 3 + ORIGIN).expect("user"),
            },
        }
    }

    fn image(seq: u64) -> Event {
        Event {
            kind: EventKind::Image(Arc::new(OriginImage::default())),
            ..joined(seq)
        }
    }

    /// `events` as one gRPC message of the stream.
    fn message(events: &[Event]) -> Option<Bytes> {
        let origin = ClusterId::new(ORIGIN).expect("cluster");
        let body = batch_to_wire(origin, events).encode_to_vec();
        let mut framed = vec![0];
        framed.extend_from_slice(&u32::try_from(body.len()).expect("small").to_be_bytes());
        framed.extend_from_slice(&body);
        Some(Bytes::from(framed))
    }

    fn joins(seqs: std::ops::RangeInclusive<u64>) -> Vec<Event> {
        seqs.map(joined).collect()
    }

    /// A feed of cluster [`ORIGIN`] from the start whose stream has received `arrived`.
    fn feed(arrived: Vec<Option<Bytes>>) -> EventFeed {
        let link = ClusterLink::new(
            ClusterId::new(1).expect("cluster"),
            3,
            &Network::tcp(),
            "127.0.0.1:1",
            None,
            CancellationToken::new(),
        )
        .expect("link");
        let mut feed = link.events_of(ClusterId::new(ORIGIN).expect("cluster"), 0);
        feed.stream = Some(tonic::Streaming::new_response(
            RawCodec,
            Arrived(arrived.into()),
            tonic::codegen::http::StatusCode::OK,
            None,
            None,
        ));
        feed
    }

    fn seqs(events: &[Event]) -> Vec<u64> {
        events.iter().map(|e| e.id.seq).collect()
    }

    #[tokio::test]
    async fn batches_that_have_arrived_are_yielded_as_one() {
        let mut feed = feed(vec![
            message(&joins(1..=3)),
            message(&joins(4..=5)),
            message(&joins(6..=6)),
        ]);
        let batch = feed.next_encoded().await.expect("events");
        assert_eq!(seqs(batch.events()), (1..=6).collect::<Vec<_>>());
        assert_eq!(feed.position(), 6);
        // The encoding is of all six, as one apply sends it.
        let decoded = EncodedBatch::decode(batch.body().clone()).expect("decodes");
        assert_eq!(seqs(decoded.events()), (1..=6).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_batch_that_would_overfill_the_apply_waits_for_the_next_call() {
        let first = GATHER as u64 - 10;
        let mut feed = feed(vec![
            message(&joins(1..=first)),
            message(&joins(first + 1..=first + 20)),
        ]);
        let batch = feed.next_encoded().await.expect("events");
        assert_eq!(seqs(batch.events()), (1..=first).collect::<Vec<_>>());
        assert_eq!(feed.position(), first, "only what was yielded counts");
        let batch = feed.next_encoded().await.expect("held events");
        assert_eq!(
            seqs(batch.events()),
            (first + 1..=first + 20).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn a_state_transfer_piece_is_yielded_alone() {
        let mut feed = feed(vec![
            message(&joins(1..=2)),
            message(&[image(3)]),
            message(&joins(4..=5)),
        ]);
        let batch = feed.next_encoded().await.expect("events");
        assert_eq!(seqs(batch.events()), vec![1, 2]);
        let batch = feed.next_encoded().await.expect("the piece");
        assert!(batch.events().len() == 1 && batch.events()[0].is_image());
        let batch = feed.next_encoded().await.expect("events after it");
        assert_eq!(seqs(batch.events()), vec![4, 5]);
    }

    #[tokio::test]
    async fn a_stream_that_breaks_while_gathering_yields_what_came_before_first() {
        let mut feed = feed(vec![message(&joins(1..=2)), message(&joins(3..=3)), None]);
        let batch = feed.next_encoded().await.expect("events");
        assert_eq!(seqs(batch.events()), vec![1, 2, 3]);
        assert_eq!(feed.position(), 3);
        // The next call reports the break (an error not worth reconnecting for). Were it
        // forgotten, the call would read the spent stream, find it ended and try to reconnect,
        // which a stopping synchronizer refuses.
        feed.link.inner.shutdown.cancel();
        let refused = feed.next_encoded().await.expect_err("the break");
        assert!(
            !matches!(refused, Error::ShuttingDown(_)) && refused.to_string().contains("refused"),
            "{refused:?}"
        );
    }

    #[tokio::test]
    async fn a_feed_gathers_at_most_what_it_was_given() {
        let mut feed = feed(vec![
            message(&joins(1..=3)),
            message(&joins(4..=5)),
            message(&joins(6..=8)),
        ])
        .gathering_at_most(5);
        let batch = feed.next_encoded().await.expect("events");
        assert_eq!(seqs(batch.events()), vec![1, 2, 3, 4, 5]);
        let batch = feed.next_encoded().await.expect("the rest");
        assert_eq!(seqs(batch.events()), vec![6, 7, 8]);
    }
}
