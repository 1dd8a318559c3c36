//! `sns.v1.Sync`: the gRPC synchronizer's service (its cluster's committed events, streamed to
//! subscribing synchronizers in signed batches: see [`seal`](super::seal)) and
//! [`SyncPeer`], a subscriber's handle on another synchronizer's service.

use std::pin::Pin;
use std::sync::Arc;

use sns_proto::sns_v1::sync_client::SyncClient;
use sns_proto::sns_v1::sync_server::{Sync as SyncService, SyncServer};
use sns_proto::sns_v1::{SignedBatch, SubscribeRequest};
use tokio_stream::Stream;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::ClusterLink;
use crate::error::{Error, Result};
use crate::grpc::log::{MAX_MESSAGE, STREAM_BUFFER, from_status};
use crate::grpc::metadata::{presented_token, with_token};
use crate::grpc::status;
use crate::ids::ClusterId;
use crate::server::MAX_APPLY_BATCH;
use crate::transport::Network;

type SignedStream = Pin<Box<dyn Stream<Item = Result<SignedBatch, Status>> + Send>>;

/// The `Sync` service of a gRPC synchronizer serving `link`'s cluster; the tasks feeding its
/// streams run on `streams` and end when the synchronizer stops or the subscriber goes.
pub(crate) fn sync_service(link: ClusterLink, streams: TaskTracker) -> SyncServer<SyncAdapter> {
    SyncServer::new(SyncAdapter { link, streams })
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

pub(crate) struct SyncAdapter {
    link: ClusterLink,
    streams: TaskTracker,
}

impl SyncAdapter {
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let presented = presented_token(request.metadata());
        crate::auth::check_token(self.link.cluster_token(), presented).map_err(status)
    }

    /// The origin asked for, which must be this synchronizer's own cluster.
    fn origin(&self, asked: u32) -> Result<ClusterId> {
        let own = self.link.cluster();
        let clusters = self.link.clusters();
        match ClusterId::new(asked) {
            Some(origin) if origin == own => Ok(origin),
            Some(origin) if origin.get() <= clusters => Err(Error::invalid(format!(
                "this synchronizer serves the events of cluster {own} only; \
                 subscribe to a synchronizer of cluster {origin} for theirs"
            ))),
            _ => Err(Error::invalid(format!(
                "origin cluster {asked} does not exist (clusters are 1..={clusters})"
            ))),
        }
    }
}

#[tonic::async_trait]
impl SyncService for SyncAdapter {
    type SubscribeStream = SignedStream;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        self.authorize(&request)?;
        let SubscribeRequest {
            origin,
            after,
            subscriber_cluster,
        } = request.into_inner();
        let origin = self.origin(origin).map_err(status)?;
        tracing::debug!(%origin, after, subscriber = subscriber_cluster, "subscription opened");
        // A consuming cluster is a named reader, so the origin's compactions keep what it
        // still needs.
        let reader = if (1..=self.link.clusters()).contains(&subscriber_cluster)
            && subscriber_cluster != origin.get()
        {
            format!("cluster{subscriber_cluster}")
        } else {
            String::new()
        };
        let mut feed = self.link.own_events(after, &reader);
        let shutdown = self.link.shutdown().clone();
        let key = self.link.sync_key().cloned();
        let (out, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
        self.streams.spawn(async move {
            loop {
                // The feed ends with an error once the synchronizer stops.
                let next = tokio::select! {
                    next = feed.next_encoded() => next,
                    () = out.closed() => return,
                };
                let batch = match next {
                    Ok(batch) => batch,
                    Err(e) => {
                        tracing::debug!(
                            %origin,
                            subscriber = subscriber_cluster,
                            "subscription ended: {e}"
                        );
                        // The last word if there is room; the stream ends either way.
                        let _ = out.try_send(Err(status(e)));
                        return;
                    }
                };
                // A batch is signed in the encoding the feed yields it in (the master's, or
                // the feed's own for batches it gathered, at most what one apply takes); one
                // longer than that (none is, today) is cut and encoded again.
                let signed: Vec<_> = if batch.events().len() <= MAX_APPLY_BATCH {
                    vec![crate::sync::seal::seal_encoded(key.as_ref(), &batch)]
                } else {
                    batch
                        .events()
                        .chunks(MAX_APPLY_BATCH)
                        .map(|chunk| crate::sync::seal::seal(key.as_ref(), origin, chunk))
                        .collect()
                };
                for signed in signed {
                    // Batches are never empty, so sealing cannot fail; the stream ends if it did.
                    let signed = signed.map_err(status);
                    let failed = signed.is_err();
                    // A subscriber that does not read holds only its own stream, and not a
                    // stopping synchronizer.
                    let sent = tokio::select! {
                        sent = out.send(signed) => sent.is_ok() && !failed,
                        () = shutdown.cancelled() => false,
                    };
                    if !sent {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// A handle on another synchronizer's `Sync` service.
#[derive(Debug, Clone)]
pub(crate) struct SyncPeer {
    client: SyncClient<Channel>,
    token: Option<Arc<str>>,
}

impl SyncPeer {
    /// A handle on the synchronizer at `addr` (connects lazily).
    pub(crate) fn new(network: &Network, addr: &str, token: Option<Arc<str>>) -> Result<Self> {
        let client = SyncClient::new(network.channel(addr)?)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        Ok(Self { client, token })
    }

    /// `origin`'s committed events after `after`, for a subscriber in cluster `subscriber`, in
    /// signed batches (to be opened with [`open`](crate::sync::seal::open)).
    pub(crate) async fn subscribe(
        &self,
        origin: ClusterId,
        after: u64,
        subscriber: ClusterId,
    ) -> Result<tonic::Streaming<SignedBatch>> {
        let request = with_token(
            Request::new(SubscribeRequest {
                origin: origin.get(),
                after,
                subscriber_cluster: subscriber.get(),
            }),
            self.token.as_deref(),
        );
        let reply = self
            .client
            .clone()
            .subscribe(request)
            .await
            .map_err(from_status)?;
        Ok(reply.into_inner())
    }
}
