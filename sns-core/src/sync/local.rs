//! The in-process transport: each synchronizer reads the other clusters' committed events
//! straight from their masters (found through the coordinator, over the deployment's network)
//! and applies them to its own cluster's master. No broker, no synchronizer-to-synchronizer
//! calls: the right choice inside one process (`sns up` by default, `TestCluster`, embedding).

use async_trait::async_trait;
use tokio_util::task::TaskTracker;

use super::link::EventFeed;
use super::pull::{Source, Subscription, pull};
use super::{ClusterLink, SyncTransport};
use crate::error::Result;
use crate::event::Event;
use crate::ids::ClusterId;
use crate::sync::EncodedBatch;

/// The in-process transport (see the module documentation).
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalBus;

impl LocalBus {
    /// The transport.
    pub fn new() -> Self {
        Self
    }
}

#[async_trait]
impl SyncTransport for LocalBus {
    fn name(&self) -> &'static str {
        "local"
    }

    fn carries_batches(&self) -> bool {
        false
    }

    async fn run(&self, link: ClusterLink) -> Result<()> {
        let tasks = TaskTracker::new();
        for origin in link.others() {
            let link = link.clone();
            tasks.spawn(async move {
                let source = MasterSource { link: link.clone() };
                pull(&link, origin, &source).await;
            });
        }
        tasks.close();
        tasks.wait().await;
        Ok(())
    }
}

/// Subscribes to an origin's master directly.
struct MasterSource {
    link: ClusterLink,
}

#[async_trait]
impl Source for MasterSource {
    async fn subscribe(&self, origin: ClusterId, after: u64) -> Result<Box<dyn Subscription>> {
        Ok(Box::new(FeedSubscription {
            feed: self.link.events_of(origin, after),
        }))
    }
}

/// An [`EventFeed`] as a subscription.
pub(crate) struct FeedSubscription {
    pub(crate) feed: EventFeed,
}

#[async_trait]
impl Subscription for FeedSubscription {
    async fn next(&mut self) -> Result<Vec<Event>> {
        self.feed.next().await
    }

    async fn next_encoded(&mut self, _origin: ClusterId) -> Result<EncodedBatch> {
        self.feed.next_encoded().await
    }
}
