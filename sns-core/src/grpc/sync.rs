//! `sns.v1.Log` adapter (a server's side of synchronization), `sns.v1.Sync` adapter and client
//! (synchronizer to synchronizer, the gRPC transport, streaming `SignedBatch`es: see
//! `sync::seal`), and the wire form of events as they cross clusters (`SyncBatch`, also what a
//! `SignedBatch` carries).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use prost::Message as _;
use sns_proto::sns_v1::log_client::LogClient;
use sns_proto::sns_v1::log_server::{Log, LogServer};
use sns_proto::sns_v1::sync_client::SyncClient;
use sns_proto::sns_v1::sync_event::Kind;
use sns_proto::sns_v1::sync_server::{Sync as SyncService, SyncServer};
use sns_proto::sns_v1::{
    FollowChange, FollowList, Followee, HighWaterReply, HighWaterRequest, ImagePost,
    OriginImage as WireImage, OriginMark, OwnEventsRequest, PostBody, SignedBatch,
    SubscribeRequest, SyncBatch, SyncEvent,
};
use tokio_stream::{Stream, StreamExt};
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::metadata::presented_token;
pub(crate) use super::metadata::with_token;
use super::status;
use crate::error::{Error, Result};
use crate::event::{Event, EventKind, OriginImage, Post};
use crate::ids::{ClusterId, EventId, Timestamp, UserId};
use crate::server::{MAX_APPLY_BATCH, Server};
use crate::sync::ClusterLink;
use crate::transport::Network;

/// Largest synchronization message accepted (a batch of at most [`MAX_APPLY_BATCH`] posts of
/// 4 KiB each fits).
pub(crate) const MAX_MESSAGE: usize = 16 << 20;

/// Events per message on an `OwnEvents` or `Subscribe` stream.
const STREAM_BATCH: usize = 256;

/// Messages a stream holds for a peer that reads slower than events come: a slow reader slows
/// its own stream (the events wait in the log), nothing else.
const STREAM_BUFFER: usize = 4;

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
type SignedStream = Pin<Box<dyn Stream<Item = Result<SignedBatch, Status>> + Send>>;

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
    token: Option<Arc<str>>,
}

impl LogPeer {
    /// A handle on the server at `addr` (connects lazily).
    pub(crate) fn new(network: &Network, addr: &str, token: Option<Arc<str>>) -> Result<Self> {
        let client = LogClient::new(network.channel(addr)?)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        Ok(Self { client, token })
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

    /// The server's own committed events after `after`, read by `reader` (empty: nobody in
    /// particular).
    pub(crate) async fn own_events(
        &self,
        after: u64,
        reader: &str,
    ) -> Result<tonic::Streaming<SyncBatch>> {
        let request = OwnEventsRequest {
            after,
            reader: reader.to_string(),
        };
        let reply = self
            .client
            .clone()
            .own_events(self.request(request))
            .await
            .map_err(from_status)?;
        Ok(reply.into_inner())
    }
}

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
                    next = feed.next() => next,
                    () = out.closed() => return,
                };
                let events = match next {
                    Ok(events) => events,
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
                for chunk in events.chunks(STREAM_BATCH) {
                    // Chunks are never empty, so sealing cannot fail; the stream ends if it did.
                    let signed =
                        crate::sync::seal::seal(key.as_ref(), origin, chunk).map_err(status);
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

/// The error a peer's status stands for.
pub(crate) fn from_status(s: Status) -> Error {
    super::error(&s, super::Asked::Peer)
}

/// One event in its wire form (a post's idempotency key stays in its cluster).
pub(crate) fn event_to_wire(event: &Event) -> SyncEvent {
    let kind = match &event.kind {
        EventKind::UserJoined { user } => Kind::UserJoined(user.get()),
        EventKind::Followed { follower, followee } => Kind::Followed(FollowChange {
            follower: follower.get(),
            followee: followee.get(),
        }),
        EventKind::Unfollowed { follower, followee } => Kind::Unfollowed(FollowChange {
            follower: follower.get(),
            followee: followee.get(),
        }),
        EventKind::Posted { author, text, .. } => Kind::Posted(PostBody {
            author: author.get(),
            text: text.to_string(),
        }),
        EventKind::Image(image) => Kind::Image(WireImage {
            users: image.users.iter().map(|u| u.get()).collect(),
            follows: follows_to_wire(&image.follows),
            continued_follows: follows_to_wire(&image.continued_follows),
            more: image.more,
            posts: image
                .posts
                .iter()
                .map(|post| ImagePost {
                    seq: post.id.seq,
                    author: post.author.get(),
                    at_micros: post.at.0,
                    text: post.text.to_string(),
                })
                .collect(),
        }),
    };
    SyncEvent {
        origin: event.id.origin.get(),
        seq: event.id.seq,
        at_micros: event.at.0,
        kind: Some(kind),
    }
}

type FollowLists = Vec<(UserId, Vec<(UserId, Timestamp)>)>;

fn follows_to_wire(lists: &FollowLists) -> Vec<FollowList> {
    lists
        .iter()
        .map(|(follower, followees)| FollowList {
            follower: follower.get(),
            followees: followees
                .iter()
                .map(|(followee, since)| Followee {
                    followee: followee.get(),
                    since_micros: since.0,
                })
                .collect(),
        })
        .collect()
}

fn follows_from_wire(lists: Vec<FollowList>) -> Result<FollowLists> {
    let user = |raw: u32| {
        UserId::new(raw).ok_or_else(|| Error::invalid(format!("user id {raw} is out of range")))
    };
    lists
        .into_iter()
        .map(|list| {
            let followees = list
                .followees
                .into_iter()
                .map(|f| Ok((user(f.followee)?, Timestamp(f.since_micros))))
                .collect::<Result<Vec<_>>>()?;
            Ok((user(list.follower)?, followees))
        })
        .collect()
}

/// One event from its wire form, checked.
pub(crate) fn event_from_wire(event: SyncEvent) -> Result<Event> {
    let user = |raw: u32| {
        UserId::new(raw).ok_or_else(|| Error::invalid(format!("user id {raw} is out of range")))
    };
    let origin =
        ClusterId::new(event.origin).ok_or_else(|| Error::invalid("an event of cluster 0"))?;
    if event.seq == 0 {
        return Err(Error::invalid("sequence numbers start at 1"));
    }
    let kind = match event.kind {
        Some(Kind::UserJoined(u)) => EventKind::UserJoined { user: user(u)? },
        Some(Kind::Followed(f)) => EventKind::Followed {
            follower: user(f.follower)?,
            followee: user(f.followee)?,
        },
        Some(Kind::Unfollowed(f)) => EventKind::Unfollowed {
            follower: user(f.follower)?,
            followee: user(f.followee)?,
        },
        Some(Kind::Posted(p)) => EventKind::Posted {
            author: user(p.author)?,
            text: Arc::from(p.text),
            key: None,
        },
        Some(Kind::Image(image)) => {
            let mut out = OriginImage::default();
            for u in image.users {
                out.users.push(user(u)?);
            }
            out.follows = follows_from_wire(image.follows)?;
            out.continued_follows = follows_from_wire(image.continued_follows)?;
            out.more = image.more;
            for post in image.posts {
                if post.seq == 0 || post.seq > event.seq {
                    return Err(Error::invalid(format!(
                        "an image as of {} holds post {}",
                        event.seq, post.seq
                    )));
                }
                out.posts.push(Post {
                    id: EventId {
                        origin,
                        seq: post.seq,
                    },
                    author: user(post.author)?,
                    at: Timestamp(post.at_micros),
                    text: Arc::from(post.text),
                });
            }
            EventKind::Image(Arc::new(out))
        }
        None => return Err(Error::invalid(format!("event {} has no kind", event.seq))),
    };
    Ok(Event {
        id: EventId {
            origin,
            seq: event.seq,
        },
        at: Timestamp(event.at_micros),
        kind,
    })
}

/// A batch of one origin's events in its wire form.
pub(crate) fn batch_to_wire(origin: ClusterId, events: &[Event]) -> SyncBatch {
    SyncBatch {
        origin: origin.get(),
        events: events.iter().map(event_to_wire).collect(),
    }
}

/// A batch from its wire form: every event of the batch's origin, with consecutive sequence
/// numbers, at most [`MAX_APPLY_BATCH`] of them.
pub(crate) fn batch_from_wire(batch: SyncBatch) -> Result<Vec<Event>> {
    if batch.events.len() > MAX_APPLY_BATCH {
        return Err(Error::invalid(format!(
            "a batch holds at most {MAX_APPLY_BATCH} events, not {}",
            batch.events.len()
        )));
    }
    let events = batch
        .events
        .into_iter()
        .map(event_from_wire)
        .collect::<Result<Vec<_>>>()?;
    for pair in events.windows(2) {
        if !pair[1].follows_event(&pair[0]) {
            return Err(Error::invalid(format!(
                "a batch's events must be consecutive: {} follows {}",
                pair[1].id, pair[0].id
            )));
        }
    }
    if events.iter().any(|e| e.id.origin.get() != batch.origin) {
        return Err(Error::invalid(format!(
            "a batch of cluster {} holds another cluster's event",
            batch.origin
        )));
    }
    Ok(events)
}

/// A batch as bytes (a RabbitMQ message body).
pub fn encode_batch(origin: ClusterId, events: &[Event]) -> Vec<u8> {
    batch_to_wire(origin, events).encode_to_vec()
}

/// A batch from bytes made by [`encode_batch`], checked as `Log.Apply` checks one. Returns
/// the batch's origin and its events.
pub fn decode_batch(bytes: &[u8]) -> Result<(ClusterId, Vec<Event>)> {
    let batch =
        SyncBatch::decode(bytes).map_err(|e| Error::Corrupt(format!("not a sync batch: {e}")))?;
    let origin = ClusterId::new(batch.origin)
        .ok_or_else(|| Error::Corrupt("a sync batch of cluster 0".to_string()))?;
    let events = batch_from_wire(batch).map_err(|e| Error::Corrupt(e.to_string()))?;
    Ok((origin, events))
}

fn marks_to_wire(marks: &BTreeMap<ClusterId, u64>) -> Vec<OriginMark> {
    marks
        .iter()
        .map(|(origin, seq)| OriginMark {
            origin: origin.get(),
            seq: *seq,
        })
        .collect()
}

fn marks_from_wire(marks: &[OriginMark]) -> Result<BTreeMap<ClusterId, u64>> {
    marks
        .iter()
        .map(|m| {
            ClusterId::new(m.origin)
                .map(|origin| (origin, m.seq))
                .ok_or_else(|| Error::Corrupt("a high-water mark of cluster 0".to_string()))
        })
        .collect()
}

/// A stream of wire batches as checked events.
pub(crate) async fn next_batch(
    stream: &mut tonic::Streaming<SyncBatch>,
) -> Option<Result<Vec<Event>>> {
    match stream.next().await? {
        Ok(batch) => Some(batch_from_wire(batch)),
        Err(s) => Some(Err(from_status(s))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, kind: EventKind) -> Event {
        Event {
            id: EventId {
                origin: ClusterId::new(2).expect("cluster"),
                seq,
            },
            at: Timestamp(-5 + seq as i64),
            kind,
        }
    }

    fn u(id: u32) -> UserId {
        UserId::new(id).expect("user")
    }

    #[test]
    fn batches_round_trip_and_drop_post_keys() {
        let events = vec![
            event(1, EventKind::UserJoined { user: u(2) }),
            event(
                2,
                EventKind::Followed {
                    follower: u(2),
                    followee: u(1),
                },
            ),
            event(
                3,
                EventKind::Unfollowed {
                    follower: u(2),
                    followee: u(1),
                },
            ),
            event(
                4,
                EventKind::Posted {
                    author: u(2),
                    text: Arc::from("hello ✓"),
                    key: crate::ids::PostKey::new(7),
                },
            ),
        ];
        let origin = ClusterId::new(2).expect("cluster");
        let (got_origin, got) = decode_batch(&encode_batch(origin, &events)).expect("decodes");
        assert_eq!(got_origin, origin);
        let mut expected = events;
        if let EventKind::Posted { key, .. } = &mut expected[3].kind {
            *key = None;
        }
        assert_eq!(got, expected);
    }

    #[test]
    fn a_state_transfer_round_trips_through_the_wire_and_the_log() {
        let origin = ClusterId::new(2).expect("cluster");
        let post = |seq: u64, author: u32| Post {
            id: EventId { origin, seq },
            author: u(author),
            at: Timestamp(100 + seq as i64),
            text: Arc::from(format!("post {seq}")),
        };
        let image = event(
            40,
            EventKind::Image(Arc::new(OriginImage {
                users: vec![u(2), u(5)],
                follows: vec![(u(2), vec![(u(1), Timestamp(7)), (u(5), Timestamp(-3))])],
                posts: vec![post(12, 2), post(39, 5)],
                ..OriginImage::default()
            })),
        );
        let next = event(41, EventKind::UserJoined { user: u(8) });
        let batch = [image.clone(), next];
        let (_, got) = decode_batch(&encode_batch(origin, &batch)).expect("decodes");
        assert_eq!(got, batch);
        let entry = crate::event::LogEntry {
            index: crate::ids::LogIndex(3),
            epoch: crate::ids::Epoch(1),
            event: image,
        };
        let bytes = entry.to_bytes();
        assert_eq!(
            crate::event::LogEntry::from_bytes(&bytes).expect("decodes"),
            entry
        );
        // A post claimed later than the image is refused.
        let bad = event(
            3,
            EventKind::Image(Arc::new(OriginImage {
                posts: vec![post(9, 2)],
                ..OriginImage::default()
            })),
        );
        assert!(decode_batch(&encode_batch(origin, &[bad])).is_err());
    }

    #[test]
    fn malformed_batches_are_refused() {
        let origin = ClusterId::new(2).expect("cluster");
        let a = event(1, EventKind::UserJoined { user: u(2) });
        let c = event(3, EventKind::UserJoined { user: u(5) });
        assert!(decode_batch(&encode_batch(origin, &[a.clone(), c])).is_err());
        let other = ClusterId::new(3).expect("cluster");
        assert!(decode_batch(&encode_batch(other, &[a])).is_err());
        assert!(decode_batch(&[0xff, 0xff, 0xff]).is_err());
        let zero_user = SyncBatch {
            origin: 2,
            events: vec![SyncEvent {
                origin: 2,
                seq: 1,
                at_micros: 0,
                kind: Some(Kind::UserJoined(0)),
            }],
        };
        assert!(batch_from_wire(zero_user).is_err());
    }
}
