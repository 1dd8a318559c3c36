//! `sns.v1.Log`: a server's side of synchronization. The adapter serves a [`Server`]'s
//! committed events, high-water marks and `Apply`; [`LogPeer`] is a synchronizer's handle on it.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use prost::Message as _;
use prost::bytes::Bytes;
use sns_proto::sns_v1::log_client::LogClient;
use sns_proto::sns_v1::log_server::{Log, LogServer};
use sns_proto::sns_v1::{HighWaterReply, HighWaterRequest, OwnEventsRequest, SyncBatch};
use tokio_stream::{Stream, StreamExt};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::events::{batch_from_wire, batch_to_wire, marks_from_wire, marks_to_wire};
use super::metadata::{presented_token, with_token};
use super::raw::{EncodedBatch, RawCodec};
use super::status;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::ids::ClusterId;
use crate::server::Server;
use crate::transport::Network;

/// Largest synchronization message accepted (a batch of at most
/// [`MAX_APPLY_BATCH`](crate::server::MAX_APPLY_BATCH) posts of 4 KiB each fits).
pub(crate) const MAX_MESSAGE: usize = 16 << 20;

/// Events per message on an `OwnEvents` or `Subscribe` stream.
pub(crate) const STREAM_BATCH: usize = 256;

/// Messages a stream holds for a peer that reads slower than events come: a slow reader slows
/// its own stream (the events wait in the log), nothing else.
pub(crate) const STREAM_BUFFER: usize = 4;

/// The log service of `server`.
pub(crate) fn service(server: Server) -> LogServer<LogAdapter> {
    LogServer::new(LogAdapter { server })
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

pub(crate) struct LogAdapter {
    server: Server,
}

impl LogAdapter {
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let presented = presented_token(request.metadata());
        self.server.authorize_peer(presented).map_err(status)
    }

    fn marks(&self) -> Result<HighWaterReply, Status> {
        let marks = self.server.high_water().map_err(status)?;
        Ok(HighWaterReply {
            cluster: self.server.config().cluster.get(),
            marks: marks_to_wire(&marks),
        })
    }
}

type BatchStream = Pin<Box<dyn Stream<Item = Result<SyncBatch, Status>> + Send>>;

#[tonic::async_trait]
impl Log for LogAdapter {
    type OwnEventsStream = BatchStream;

    async fn own_events(
        &self,
        request: Request<OwnEventsRequest>,
    ) -> Result<Response<Self::OwnEventsStream>, Status> {
        self.authorize(&request)?;
        let OwnEventsRequest { after, reader } = request.into_inner();
        let reader = (!reader.is_empty()).then_some(reader.as_str());
        let events = self
            .server
            .own_events_after(after, reader)
            .await
            .map_err(status)?;
        let origin = self.server.config().cluster;
        let (tasks, shutdown) = self.server.tasks();
        let shutdown = shutdown.clone();
        let (out, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
        tasks.spawn(async move {
            let mut events = events;
            loop {
                let next = tokio::select! {
                    next = events.next_batch(STREAM_BATCH) => next,
                    () = out.closed() => return,
                    () = shutdown.cancelled() => return,
                };
                let message = match next {
                    Ok(Some(batch)) => Ok(batch_to_wire(origin, &batch)),
                    Ok(None) => return,
                    Err(e) => Err(status(e)),
                };
                let failed = message.is_err();
                if out.send(message).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn apply(&self, request: Request<SyncBatch>) -> Result<Response<HighWaterReply>, Status> {
        self.authorize(&request)?;
        let events = batch_from_wire(request.into_inner()).map_err(status)?;
        self.server.apply_remote(events).await.map_err(status)?;
        Ok(Response::new(self.marks()?))
    }

    async fn high_water(
        &self,
        request: Request<HighWaterRequest>,
    ) -> Result<Response<HighWaterReply>, Status> {
        self.authorize(&request)?;
        Ok(Response::new(self.marks()?))
    }
}

/// A synchronizer's handle on one server's `Log` service.
#[derive(Debug, Clone)]
pub(crate) struct LogPeer {
    client: LogClient<Channel>,
    channel: Channel,
    token: Option<Arc<str>>,
}

impl LogPeer {
    /// A handle on the server at `addr` (connects lazily).
    pub(crate) fn new(network: &Network, addr: &str, token: Option<Arc<str>>) -> Result<Self> {
        let channel = network.channel(addr)?;
        let client = LogClient::new(channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        Ok(Self {
            client,
            channel,
            token,
        })
    }

    fn request<T>(&self, message: T) -> Request<T> {
        with_token(Request::new(message), self.token.as_deref())
    }

    /// The server's committed high-water marks.
    pub(crate) async fn high_water(&self) -> Result<BTreeMap<ClusterId, u64>> {
        let reply = self
            .client
            .clone()
            .high_water(self.request(HighWaterRequest {}))
            .await
            .map_err(from_status)?;
        marks_from_wire(&reply.into_inner().marks)
    }

    /// Applies `events` and waits for their commit.
    pub(crate) async fn apply(&self, origin: ClusterId, events: &[Event]) -> Result<()> {
        self.client
            .clone()
            .apply(self.request(batch_to_wire(origin, events)))
            .await
            .map_err(from_status)?;
        Ok(())
    }

    /// Applies a batch in the encoding it arrived in (see [`EncodedBatch`]) and waits for its
    /// commit: the same call as [`apply`](Self::apply), without encoding the events again.
    pub(crate) async fn apply_encoded(&self, batch: &EncodedBatch) -> Result<()> {
        let mut rpc = self.raw().await?;
        let path = PathAndQuery::from_static("/sns.v1.Log/Apply");
        rpc.unary(self.request(batch.body().clone()), path, RawCodec)
            .await
            .map_err(from_status)?;
        Ok(())
    }

    /// The server's own committed events after `after`, read by `reader` (empty: nobody in
    /// particular), each batch in the encoding the server sent (see [`next_encoded`]).
    pub(crate) async fn own_events(
        &self,
        after: u64,
        reader: &str,
    ) -> Result<tonic::Streaming<Bytes>> {
        let request = OwnEventsRequest {
            after,
            reader: reader.to_string(),
        };
        let mut rpc = self.raw().await?;
        let path = PathAndQuery::from_static("/sns.v1.Log/OwnEvents");
        let request = self.request(Bytes::from(request.encode_to_vec()));
        let reply = rpc
            .server_streaming(request, path, RawCodec)
            .await
            .map_err(from_status)?;
        Ok(reply.into_inner())
    }

    /// A client on the same channel that moves message bodies as bytes.
    async fn raw(&self) -> Result<tonic::client::Grpc<Channel>> {
        let mut rpc = tonic::client::Grpc::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        rpc.ready()
            .await
            .map_err(|e| Error::ConnectionLost(format!("the log service is not ready: {e}")))?;
        Ok(rpc)
    }
}

/// The error a peer's status stands for.
pub(crate) fn from_status(s: Status) -> Error {
    super::error(&s, super::Asked::Peer)
}

/// The next batch of an `OwnEvents` stream, decoded once and checked, with its encoding.
pub(crate) async fn next_encoded(
    stream: &mut tonic::Streaming<Bytes>,
) -> Option<Result<EncodedBatch>> {
    match stream.next().await? {
        Ok(body) => Some(EncodedBatch::decode(body)),
        Err(s) => Some(Err(from_status(s))),
    }
}
