//! `sns.v1.Replication` adapter: converts mirroring messages between the wire and the domain
//! types of `server::replication`, on both ends (the master serves, the slave dials).

use std::pin::Pin;
use std::time::Duration;

use sns_proto::sns_v1::master_message::Kind as MasterKind;
use sns_proto::sns_v1::replication_client::ReplicationClient;
use sns_proto::sns_v1::replication_server::{Replication, ReplicationServer};
use sns_proto::sns_v1::slave_message::Kind as SlaveKind;
use sns_proto::sns_v1::{
    EntryBatch, MasterMessage, MirrorHello, SlaveMessage, SnapshotChunk as WireChunk,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::metadata::{presented_token, with_token};
use super::status;
use crate::error::{Error, Result};
use crate::event::LogEntry;
use crate::ids::{ClusterId, Epoch, LogIndex, ServerId};
use crate::server::replication::{Caller, FromSlave, Hello, Shipment, SnapshotChunk, ToSlave};
use crate::server::{MasterFeed, Server};
use crate::transport::{ConnectionInfo, Network};

/// How long a slave may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest mirroring message accepted (a batch of entries or a snapshot piece).
const MAX_MESSAGE: usize = 16 << 20;

/// The replication service of `server`.
pub(crate) fn service(server: Server) -> ReplicationServer<ReplicationAdapter> {
    ReplicationServer::new(ReplicationAdapter { server })
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

pub(crate) struct ReplicationAdapter {
    server: Server,
}

type Outbound = Pin<Box<dyn Stream<Item = Result<MasterMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Replication for ReplicationAdapter {
    type MirrorStream = Outbound;

    async fn mirror(
        &self,
        request: Request<Streaming<SlaveMessage>>,
    ) -> Result<Response<Self::MirrorStream>, Status> {
        let presented = presented_token(request.metadata());
        self.server.authorize_peer(presented).map_err(status)?;
        let caller = Caller {
            peer: request
                .extensions()
                .get::<ConnectionInfo>()
                .map(|info| info.peer.clone()),
        };
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello from the slave"))??;
        let hello = match first.map(from_slave) {
            Some(Ok(FromSlave::Hello(hello))) => hello,
            Some(Err(e)) => return Err(status(e)),
            _ => {
                return Err(Status::invalid_argument(
                    "a mirroring stream starts with hello",
                ));
            }
        };
        // Refused sessions end here, before anything is counted or shipped.
        let admitted = self
            .server
            .admit_slave(hello, &caller)
            .await
            .map_err(status)?;
        let (out, rx) = mpsc::channel(8);
        let inbound = inbound.map(|m| {
            m.map_err(|s| Error::ConnectionLost(format!("slave stream failed: {}", s.message())))
                .and_then(from_slave)
        });
        let server = self.server.clone();
        let (tasks, _) = self.server.tasks();
        tasks.spawn(async move {
            server.ship_to_slave(admitted, Box::pin(inbound), out).await;
        });
        let outbound = ReceiverStream::new(rx).map(|m| Ok(to_wire_master(m)));
        Ok(Response::new(Box::pin(outbound)))
    }
}

/// A master's messages, as the slave reads them.
pub(crate) struct MasterStream {
    inner: Streaming<MasterMessage>,
}

#[tonic::async_trait]
impl MasterFeed for MasterStream {
    async fn recv(&mut self) -> Option<Result<ToSlave>> {
        match self.inner.message().await {
            Ok(Some(message)) => Some(from_master(message)),
            Ok(None) => None,
            Err(s) => Some(Err(Error::ConnectionLost(format!(
                "mirroring stream failed: {}",
                s.message()
            )))),
        }
    }
}

/// Opens a mirroring stream to the master at `addr`, sending what `outbound` yields.
pub(crate) async fn open(
    network: &Network,
    addr: &str,
    token: Option<&str>,
    outbound: mpsc::Receiver<FromSlave>,
) -> Result<MasterStream> {
    let channel = network.channel(addr)?;
    let mut client = ReplicationClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let request = with_token(
        Request::new(ReceiverStream::new(outbound).map(to_wire_slave)),
        token,
    );
    let response = client
        .mirror(request)
        .await
        .map_err(|s| super::error(&s, super::Asked::Peer))?;
    Ok(MasterStream {
        inner: response.into_inner(),
    })
}

fn to_wire_slave(message: FromSlave) -> SlaveMessage {
    let kind = match message {
        FromSlave::Hello(h) => SlaveKind::Hello(MirrorHello {
            cluster: h.cluster.get(),
            server: h.server.get(),
            known_epoch: h.known_epoch.0,
            last_index: h.last_index.0,
            last_epoch: h.last_epoch.0,
            commit: h.commit.0,
        }),
        FromSlave::Durable(index) => SlaveKind::Durable(index.0),
        FromSlave::NewerEpoch(epoch) => SlaveKind::NewerEpoch(epoch.0),
    };
    SlaveMessage { kind: Some(kind) }
}

fn from_slave(message: SlaveMessage) -> Result<FromSlave> {
    match message.kind {
        Some(SlaveKind::Hello(h)) => Ok(FromSlave::Hello(Hello {
            cluster: ClusterId::new(h.cluster)
                .ok_or_else(|| Error::invalid("hello names cluster 0"))?,
            server: ServerId::new(h.server)
                .ok_or_else(|| Error::invalid("hello names server 0"))?,
            known_epoch: Epoch(h.known_epoch),
            last_index: LogIndex(h.last_index),
            last_epoch: Epoch(h.last_epoch),
            commit: LogIndex(h.commit),
        })),
        Some(SlaveKind::Durable(index)) => Ok(FromSlave::Durable(LogIndex(index))),
        Some(SlaveKind::NewerEpoch(epoch)) => Ok(FromSlave::NewerEpoch(Epoch(epoch))),
        None => Err(Error::invalid("an empty mirroring message")),
    }
}

fn to_wire_master(message: ToSlave) -> MasterMessage {
    let kind = match message.body {
        Shipment::TruncateAfter(index) => MasterKind::TruncateAfter(index.0),
        Shipment::Snapshot(chunk) => MasterKind::Snapshot(WireChunk {
            index: chunk.index.0,
            epoch: chunk.epoch.0,
            offset: chunk.offset,
            data: chunk.data,
            last: chunk.last,
        }),
        Shipment::Entries(entries) => MasterKind::Entries(EntryBatch {
            entries: entries.iter().map(LogEntry::to_bytes).collect(),
        }),
        Shipment::KeepAlive => MasterKind::Keepalive(true),
    };
    MasterMessage {
        epoch: message.epoch.0,
        commit: message.commit.0,
        in_sync: message.in_sync,
        kind: Some(kind),
    }
}

fn from_master(message: MasterMessage) -> Result<ToSlave> {
    let body = match message.kind {
        Some(MasterKind::TruncateAfter(index)) => Shipment::TruncateAfter(LogIndex(index)),
        Some(MasterKind::Snapshot(chunk)) => Shipment::Snapshot(SnapshotChunk {
            index: LogIndex(chunk.index),
            epoch: Epoch(chunk.epoch),
            offset: chunk.offset,
            data: chunk.data,
            last: chunk.last,
        }),
        Some(MasterKind::Entries(batch)) => Shipment::Entries(
            batch
                .entries
                .iter()
                .map(|bytes| LogEntry::from_bytes(bytes))
                .collect::<Result<Vec<_>>>()?,
        ),
        Some(MasterKind::Keepalive(_)) => Shipment::KeepAlive,
        None => return Err(Error::invalid("an empty mirroring message")),
    };
    Ok(ToSlave {
        epoch: Epoch(message.epoch),
        commit: LogIndex(message.commit),
        in_sync: message.in_sync,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventKind};
    use crate::ids::{EventId, Timestamp, UserId};

    #[test]
    fn messages_round_trip_through_the_wire_form() {
        let hello = FromSlave::Hello(Hello {
            cluster: ClusterId::new(2).expect("cluster"),
            server: ServerId::new(1).expect("server"),
            known_epoch: Epoch(7),
            last_index: LogIndex(41),
            last_epoch: Epoch(6),
            commit: LogIndex(40),
        });
        assert_eq!(
            from_slave(to_wire_slave(hello.clone())).expect("decodes"),
            hello
        );
        let entry = LogEntry {
            index: LogIndex(42),
            epoch: Epoch(7),
            event: Event {
                id: EventId {
                    origin: ClusterId::new(2).expect("cluster"),
                    seq: 9,
                },
                at: Timestamp(5),
                kind: EventKind::UserJoined {
                    user: UserId::new(5).expect("user"),
                },
            },
        };
        let shipped = ToSlave {
            epoch: Epoch(7),
            commit: LogIndex(41),
            in_sync: true,
            body: Shipment::Entries(vec![entry]),
        };
        assert_eq!(
            from_master(to_wire_master(shipped.clone())).expect("decodes"),
            shipped
        );
    }

    #[test]
    fn garbage_entries_are_refused_not_applied() {
        let message = MasterMessage {
            epoch: 1,
            commit: 0,
            in_sync: false,
            kind: Some(MasterKind::Entries(EntryBatch {
                entries: vec![vec![1, 2, 3]],
            })),
        };
        assert!(from_master(message).is_err());
        assert!(from_slave(SlaveMessage { kind: None }).is_err());
    }
}
