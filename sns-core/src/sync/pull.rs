//! The consuming side shared by the pull-based transports (in-process and gRPC): for each other
//! cluster, subscribe to its events after this cluster's high-water mark for it, apply what
//! arrives, and after any fault subscribe again from the (new) high-water mark.

use std::time::Duration;

use async_trait::async_trait;

use super::ClusterLink;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::ids::ClusterId;
use crate::sync::EncodedBatch;

/// First pause before subscribing again after a fault.
const FIRST_RETRY: Duration = Duration::from_millis(20);
/// Longest pause between subscriptions.
const MAX_RETRY: Duration = Duration::from_secs(1);

/// A stream of one origin's events after a sequence number, as a transport delivers them.
#[async_trait]
pub trait Subscription: Send {
    /// The next events of the origin, in order; `Err` when the subscription broke.
    async fn next(&mut self) -> Result<Vec<Event>>;

    /// [`next`](Self::next) with the events' encoding, so they are applied as they arrived
    /// (decoded once on the way). A transport that holds the encoding returns it; by default
    /// the events are encoded here.
    async fn next_encoded(&mut self, origin: ClusterId) -> Result<EncodedBatch> {
        Ok(EncodedBatch::encode(origin, self.next().await?))
    }
}

/// Where a pull-based transport subscribes to an origin's events.
#[async_trait]
pub trait Source: Send + Sync {
    /// Subscribes to `origin`'s events with a sequence number above `after`.
    async fn subscribe(&self, origin: ClusterId, after: u64) -> Result<Box<dyn Subscription>>;
}

/// Carries `origin`'s events from `source` into `link`'s cluster until the synchronizer stops.
pub async fn pull(link: &ClusterLink, origin: ClusterId, source: &dyn Source) {
    let mut pause = FIRST_RETRY;
    let shutdown = link.shutdown().clone();
    while !shutdown.is_cancelled() {
        match pull_once(link, origin, source, &mut pause).await {
            Ok(()) => return,
            Err(e) if shutdown.is_cancelled() => {
                tracing::debug!(%origin, "sync stopped: {e}");
                return;
            }
            Err(e) => {
                tracing::warn!(
                    cluster = %link.cluster(),
                    %origin,
                    "sync from cluster {origin} interrupted, resuming: {e}"
                );
            }
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = shutdown.cancelled() => return,
        }
        pause = (pause * 2).min(MAX_RETRY);
    }
}

/// One subscription: from the high-water mark until it breaks.
async fn pull_once(
    link: &ClusterLink,
    origin: ClusterId,
    source: &dyn Source,
    pause: &mut Duration,
) -> Result<()> {
    let after = link.high_water().await?.get(&origin).copied().unwrap_or(0);
    let mut subscription = source.subscribe(origin, after).await?;
    tracing::debug!(cluster = %link.cluster(), %origin, after, "subscribed");
    let shutdown = link.shutdown().clone();
    loop {
        let batch = tokio::select! {
            batch = subscription.next_encoded(origin) => batch?,
            () = shutdown.cancelled() => return Ok(()),
        };
        if let Some(stranger) = batch.events().iter().find(|e| e.id.origin != origin) {
            return Err(Error::Corrupt(format!(
                "a subscription to cluster {origin} delivered event {}",
                stranger.id
            )));
        }
        if batch.events().len() <= crate::server::MAX_APPLY_BATCH {
            link.apply_encoded(&batch).await?;
        } else {
            for chunk in batch.events().chunks(crate::server::MAX_APPLY_BATCH) {
                link.apply(origin, chunk).await?;
            }
        }
        *pause = FIRST_RETRY;
    }
}
