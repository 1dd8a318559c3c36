//! The typed client: the course's commands as async methods, gRPC codes mapped to [`Error`].
//!
//! Status codes, not message strings, decide the error (DESIGN §5.1); the meaning of a code
//! depends on the command (e.g. `ALREADY_EXISTS` is "already logged in" for a login and
//! "already following" for a follow). Following or unfollowing yourself is caught here before
//! any request is sent.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use sns_proto::csce438::coord_service_client::CoordServiceClient;
use sns_proto::csce438::sns_service_client::SnsServiceClient;
use sns_proto::csce438::{Id, Message, Request, ServerInfo, ServerList};
use tokio::sync::mpsc;
use tonic::Streaming;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use super::metadata::{self, with_token};
use super::{self as grpc, Asked};
use crate::error::{Error, Result};
use crate::event::normalize_post_text;
use crate::ids::{ClusterId, PostId, PostKey, Timestamp, UserId};
use crate::state::Listing;
use crate::transport::Network;

/// Largest reply the client accepts, in bytes: a LIST of about 25 million users. Larger
/// replies are refused with an error that says so.
pub const MAX_REPLY_BYTES: usize = 256 << 20;

/// The client-facing service's stub on `channel`, accepting replies up to [`MAX_REPLY_BYTES`].
fn sns_service(channel: Channel) -> SnsServiceClient<Channel> {
    SnsServiceClient::new(channel).max_decoding_message_size(MAX_REPLY_BYTES)
}

/// A handle on the coordinator, or on a group of coordinators: one channel to each, reused
/// for every question (and re-established by tonic after a broken connection).
///
/// Its address is one `host:port`, or several separated by commas (a group, see
/// `Coordinator::in_group`): a question goes to the member that answered last, and on to the
/// next when one cannot be reached; a synchronizer's heartbeat goes to every member.
#[derive(Debug, Clone)]
pub struct CoordinatorClient {
    members: Arc<[Member]>,
    /// The member asked first: the last that answered.
    first: Arc<AtomicUsize>,
    network: Network,
    addr: String,
}

#[derive(Debug)]
struct Member {
    addr: String,
    rpc: CoordServiceClient<Channel>,
}

/// Whether `status` was made on this side from a connection that could not be made or broke
/// (then another member of the group may answer).
fn unreached(status: &tonic::Status) -> Option<String> {
    std::error::Error::source(status).map(crate::transport::innermost)
}

impl CoordinatorClient {
    /// A handle on the coordinator (or group) at `addr` that connects on first use.
    pub fn new(network: &Network, addr: &str) -> Result<Self> {
        let members = crate::coordinator::group_addrs(addr)?
            .into_iter()
            .map(|addr| {
                Ok(Member {
                    rpc: CoordServiceClient::new(network.channel(&addr)?),
                    addr,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::of(network, members, addr))
    }

    /// A handle on the coordinator (or group) at `addr`, connected now to each member that
    /// can be reached (fails with [`Error::Unreachable`] if none can).
    pub async fn connect(network: &Network, addr: &str) -> Result<Self> {
        let mut members = Vec::new();
        let mut reached = None;
        for member in crate::coordinator::group_addrs(addr)? {
            let channel = match network.connect(&member).await {
                Ok(channel) => {
                    reached = Some(Ok(()));
                    channel
                }
                Err(e) => {
                    reached.get_or_insert(Err(e));
                    network.channel(&member)?
                }
            };
            members.push(Member {
                rpc: CoordServiceClient::new(channel),
                addr: member,
            });
        }
        reached.unwrap_or(Ok(()))?;
        Ok(Self::of(network, members, addr))
    }

    fn of(network: &Network, members: Vec<Member>, addr: &str) -> Self {
        Self {
            members: members.into(),
            first: Arc::new(AtomicUsize::new(0)),
            network: network.clone(),
            addr: addr.to_string(),
        }
    }

    /// The coordinator's address, as given (several, comma-separated, for a group).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Asks the members in turn, from the one that answered last, until one answers; an
    /// answer (an error included) is final; only a member that cannot be reached passes the
    /// question on.
    async fn ask<T, F, Fut>(&self, asked: Asked, call: F) -> Result<T>
    where
        F: Fn(CoordServiceClient<Channel>) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let first = self.first.load(Ordering::Relaxed);
        let mut unreachable = None;
        for k in 0..self.members.len() {
            let at = (first + k) % self.members.len();
            let member = &self.members[at];
            match call(member.rpc.clone()).await {
                Ok(reply) => {
                    self.first.store(at, Ordering::Relaxed);
                    return Ok(reply.into_inner());
                }
                Err(status) => match unreached(&status) {
                    Some(reason) => {
                        unreachable.get_or_insert(Error::Unreachable {
                            addr: member.addr.clone(),
                            reason,
                        });
                    }
                    None => return Err(grpc::error(&status, asked)),
                },
            }
        }
        Err(unreachable.unwrap_or_else(|| Error::Unavailable("no coordinator".to_string())))
    }

    /// Which server serves `user`: its `host:port`.
    pub async fn locate(&self, user: UserId) -> Result<String> {
        let id = Id {
            id: user.get() as i32,
        };
        let reply = self
            .ask(Asked::Command(user), |mut rpc| async move {
                rpc.get_server(id).await
            })
            .await?;
        Ok(format!("{}:{}", reply.hostname, reply.port))
    }

    /// A synchronizer's heartbeat (`RegisterSyncServer` for its first, `Heartbeat` after),
    /// with the cluster token if any, to every member of the group (each keeps its own view
    /// of who is alive). Succeeds when one member took it.
    pub(crate) async fn synchronizer_beat(
        &self,
        info: ServerInfo,
        first: bool,
        token: Option<&str>,
    ) -> Result<()> {
        let beats = self.members.iter().map(|member| {
            let request = with_token(tonic::Request::new(info.clone()), token);
            let mut rpc = member.rpc.clone();
            async move {
                let answer = if first {
                    rpc.register_sync_server(request).await
                } else {
                    rpc.heartbeat(request).await
                };
                answer.map(drop).map_err(|s| grpc::error(&s, Asked::Peer))
            }
        });
        let answers = grpc::join_all(beats).await;
        let mut failure = None;
        for answer in answers {
            match answer {
                Ok(()) => return Ok(()),
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        Err(failure.unwrap_or_else(|| Error::Unavailable("no coordinator".to_string())))
    }

    /// The synchronizers the coordinator lists as live, as asked by synchronizer `asking`.
    pub(crate) async fn sync_servers(
        &self,
        asking: i32,
        token: Option<&str>,
    ) -> Result<ServerList> {
        self.ask(Asked::Peer, |mut rpc| async move {
            rpc.get_sync_servers(with_token(tonic::Request::new(Id { id: asking }), token))
                .await
        })
        .await
    }

    /// Finds `user`'s server and logs in there, on the same network.
    pub async fn login(&self, user: UserId) -> Result<Client> {
        let addr = self.locate(user).await?;
        Client::login(&self.network, &addr, user).await
    }
}

/// Asks the coordinator at `coordinator` (`host:port`) which server serves `user`; returns
/// that server's `host:port`. Opens a connection for this one question: keep a
/// [`CoordinatorClient`] to ask more than once.
pub async fn locate(network: &Network, coordinator: &str, user: UserId) -> Result<String> {
    CoordinatorClient::connect(network, coordinator)
        .await?
        .locate(user)
        .await
}

/// A logged-in user's connection to a server.
///
/// [`CoordinatorClient::login`] finds the user's server and logs in there. Unlike a
/// [`Session`](crate::Session), a `Client` stays with that server: when it is lost, calls fail
/// and the caller logs in again.
///
/// ```
/// use std::time::Duration;
///
/// use sns_core::testing::TestCluster;
/// use sns_core::{CoordinatorClient, UserId};
///
/// # #[tokio::main]
/// # async fn main() -> sns_core::Result<()> {
/// // One cluster in memory (feature `test-util`); over TCP the network is `Network::tcp()`.
/// let cluster = TestCluster::start(1).await?;
/// let coordinator = CoordinatorClient::new(cluster.network(), cluster.coordinator_addr())?;
/// let (one, two) = (UserId::new(1).unwrap(), UserId::new(2).unwrap());
/// let alice = coordinator.login(one).await?;
/// let bob = coordinator.login(two).await?;
/// alice.follow(two).await?;
/// assert_eq!(bob.list().await?.followers, vec![one]);
/// // A timeline is one call: it lasts while both halves are kept (dropping the sender ends
/// // the stream; dropping the stream ends the call, with any post not yet sent).
/// let (_alice_posts, mut timeline) = alice.timeline().await?;
/// let (posts, _bobs_stream) = bob.timeline().await?;
/// posts.post("hello").await?;
/// let post = tokio::time::timeout(Duration::from_secs(10), timeline.next())
///     .await
///     .expect("the post in time")
///     .expect("a post")?;
/// assert_eq!(post.text, "hello");
/// # cluster.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    rpc: SnsServiceClient<Channel>,
    user: UserId,
    addr: String,
}

impl Client {
    /// Connects to the server at `addr` (`host:port`) through `network` and logs `user` in.
    pub async fn login(network: &Network, addr: &str, user: UserId) -> Result<Self> {
        let channel = network.connect(addr).await?;
        let client = Self {
            rpc: sns_service(channel),
            user,
            addr: addr.to_string(),
        };
        client
            .rpc
            .clone()
            .login(client.request(None))
            .await
            .map_err(|s| grpc::error(&s, Asked::Login(user)))?;
        Ok(client)
    }

    /// Connects to the server at `addr` for `user` without logging in again: for resuming a
    /// session after a reconnect (the server refuses a second login while the session lives).
    pub async fn attach(network: &Network, addr: &str, user: UserId) -> Result<Self> {
        Ok(Self {
            rpc: sns_service(network.connect(addr).await?),
            user,
            addr: addr.to_string(),
        })
    }

    /// Finds `user`'s server through the coordinator at `coordinator` and logs in there.
    pub async fn login_via(network: &Network, coordinator: &str, user: UserId) -> Result<Self> {
        let addr = locate(network, coordinator, user).await?;
        Self::login(network, &addr, user).await
    }

    /// The logged-in user.
    pub fn user(&self) -> UserId {
        self.user
    }

    /// The server's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn request(&self, argument: Option<UserId>) -> Request {
        Request {
            username: self.user.to_string(),
            arguments: argument.map(|a| a.to_string()).into_iter().collect(),
        }
    }

    /// Follows `target`.
    pub async fn follow(&self, target: UserId) -> Result<()> {
        if target == self.user {
            return Err(Error::SameClient);
        }
        self.rpc
            .clone()
            .follow(self.request(Some(target)))
            .await
            .map_err(|s| grpc::error(&s, Asked::Follow(self.user, target)))?;
        Ok(())
    }

    /// Stops following `target`.
    pub async fn unfollow(&self, target: UserId) -> Result<()> {
        if target == self.user {
            return Err(Error::SameClient);
        }
        self.rpc
            .clone()
            .un_follow(self.request(Some(target)))
            .await
            .map_err(|s| grpc::error(&s, Asked::Unfollow(self.user, target)))?;
        Ok(())
    }

    /// All users and this user's followers.
    pub async fn list(&self) -> Result<Listing> {
        let reply = self
            .rpc
            .clone()
            .list(self.request(None))
            .await
            .map_err(|s| grpc::error(&s, Asked::Command(self.user)))?
            .into_inner();
        let parse = |names: Vec<String>| -> Result<Vec<UserId>> {
            names
                .iter()
                .map(|n| UserId::parse(n).map_err(|_| Error::Rpc(format!("bad user {n:?}"))))
                .collect()
        };
        Ok(Listing {
            all_users: parse(reply.all_users)?,
            followers: parse(reply.followers)?,
        })
    }

    /// Keeps the session alive; call every few seconds.
    pub async fn heartbeat(&self) -> Result<()> {
        self.rpc
            .clone()
            .client_heartbeat(self.request(None))
            .await
            .map_err(|s| grpc::error(&s, Asked::Command(self.user)))?;
        Ok(())
    }

    /// Ends the session (the course's `terminated` unfollow).
    pub async fn logout(&self) -> Result<()> {
        let mut request = tonic::Request::new(self.request(None));
        request
            .metadata_mut()
            .insert(metadata::TERMINATED, MetadataValue::from_static("true"));
        self.rpc
            .clone()
            .un_follow(request)
            .await
            .map_err(|s| grpc::error(&s, Asked::Command(self.user)))?;
        Ok(())
    }

    /// Opens the timeline: a sender for new posts, and the stream of posts to read (the last
    /// 20, newest first, then new ones as they happen). The stream is in structured mode: posts
    /// sent with a key ([`TimelineSender::post_keyed`]) are acknowledged on it.
    pub async fn timeline(&self) -> Result<(TimelineSender, TimelineStream)> {
        self.open_timeline(None).await
    }

    /// Reopens the timeline after losing it (e.g. on a new master): like
    /// [`Client::timeline`], but the stream starts with up to `replay` of the newest posts
    /// (at most the server's timeline cap), **oldest first**, so a reader that skips the posts
    /// it already had misses none and gets the rest in order.
    pub async fn resume_timeline(&self, replay: usize) -> Result<(TimelineSender, TimelineStream)> {
        self.open_timeline(Some(replay)).await
    }

    async fn open_timeline(
        &self,
        resume: Option<usize>,
    ) -> Result<(TimelineSender, TimelineStream)> {
        let (tx, rx) = mpsc::channel(TIMELINE_SEND_BUFFER);
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let user = MetadataValue::try_from(self.user.to_string())
            .map_err(|e| Error::invalid(e.to_string()))?;
        request.metadata_mut().insert(metadata::USERNAME, user);
        request.metadata_mut().insert(
            metadata::TIMELINE_MODE,
            MetadataValue::from_static("structured"),
        );
        if let Some(replay) = resume {
            request.metadata_mut().insert(
                metadata::TIMELINE_RESUME,
                MetadataValue::from(replay as u64),
            );
        }
        let inbound = self
            .rpc
            .clone()
            .timeline(request)
            .await
            .map_err(|s| grpc::error(&s, Asked::Command(self.user)))?
            .into_inner();
        Ok((
            TimelineSender {
                user: self.user,
                outbound: tx,
            },
            TimelineStream {
                user: self.user,
                inbound,
            },
        ))
    }
}

/// Messages a [`TimelineSender`] holds before sending waits; a caller that never has more than
/// this many posts unacknowledged never waits.
pub const TIMELINE_SEND_BUFFER: usize = 64;

/// A post as a client receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedPost {
    /// The post's id, when the server sent one (ours always does; a course server does not).
    pub id: Option<PostId>,
    /// Who posted.
    pub author: UserId,
    /// When the server accepted the post.
    pub at: Timestamp,
    /// The text.
    pub text: String,
}

impl ReceivedPost {
    /// The course client's line: `<author> (<Www Mmm dd hh:mm:ss yyyy>) >> <text>`.
    pub fn line(&self) -> String {
        format!("{} ({}) >> {}", self.author, self.at.ctime(), self.text)
    }
}

/// Sends posts on an open timeline. Dropping every sender closes the stream.
#[derive(Debug, Clone)]
pub struct TimelineSender {
    user: UserId,
    outbound: mpsc::Sender<Message>,
}

impl TimelineSender {
    /// Posts `text`: one line, at most 4096 bytes; empty lines are ignored.
    pub async fn post(&self, text: &str) -> Result<()> {
        let Some(text) = normalize_post_text(text.as_bytes())? else {
            return Ok(());
        };
        self.send_raw(self.user.to_string(), text.as_bytes().to_vec())
            .await
    }

    /// Posts `text` (as [`TimelineSender::post`]) with the idempotency key `key`: the server
    /// stores the post once however often it is sent with this key, and acknowledges each
    /// sending on the stream ([`TimelineMessage::Ack`]) once the post is stored. An empty line
    /// is not sent, so it is not acknowledged.
    pub async fn post_keyed(&self, text: &str, key: PostKey) -> Result<()> {
        let Some(text) = normalize_post_text(text.as_bytes())? else {
            return Ok(());
        };
        self.send(Message {
            username: self.user.to_string(),
            msg: text.as_bytes().to_vec(),
            timestamp: Some(Timestamp::now().to_proto()),
            post_key: key.get(),
            ..Message::default()
        })
        .await
    }

    /// Sends a message as given, without local checks (for tests of the server's checks).
    pub async fn send_raw(&self, username: String, msg: Vec<u8>) -> Result<()> {
        self.send(Message {
            username,
            msg,
            timestamp: Some(Timestamp::now().to_proto()),
            ..Message::default()
        })
        .await
    }

    async fn send(&self, message: Message) -> Result<()> {
        self.outbound
            .send(message)
            .await
            .map_err(|_| Error::ConnectionLost("the timeline stream is closed".to_string()))
    }
}

/// The posts arriving on an open timeline.
#[derive(Debug)]
pub struct TimelineStream {
    user: UserId,
    inbound: Streaming<Message>,
}

impl TimelineStream {
    /// The next post, skipping acknowledgements; `None` when the server ended the stream.
    pub async fn next(&mut self) -> Option<Result<ReceivedPost>> {
        loop {
            match self.next_message().await? {
                Ok(TimelineMessage::Post(post)) => return Some(Ok(post)),
                Ok(TimelineMessage::Ack(_)) => {}
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// The next post or acknowledgement; `None` when the server ended the stream.
    pub async fn next_message(&mut self) -> Option<Result<TimelineMessage>> {
        match self.inbound.message().await {
            Ok(Some(message)) if message.ack => {
                Some(acknowledged(&message).map(TimelineMessage::Ack))
            }
            Ok(Some(message)) => Some(received(message).map(TimelineMessage::Post)),
            Ok(None) => None,
            Err(status) => Some(Err(grpc::error(&status, Asked::Command(self.user)))),
        }
    }
}

/// What a timeline stream carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimelineMessage {
    /// A post of a followed user.
    Post(ReceivedPost),
    /// The acknowledgement of one of this user's keyed posts.
    Ack(PostAck),
}

/// The server's acknowledgement of a post sent with a key: the post is stored (committed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostAck {
    /// The key the post was sent with.
    pub key: PostKey,
    /// The stored post's id (the first post sent with this key); `None` if the line was empty
    /// and nothing was stored.
    pub id: Option<PostId>,
}

fn acknowledged(message: &Message) -> Result<PostAck> {
    let key = PostKey::new(message.post_key)
        .ok_or_else(|| Error::Rpc("acknowledgement without a post key".to_string()))?;
    Ok(PostAck {
        key,
        id: post_id(message),
    })
}

/// Both parts or nothing: a half-filled id (origin 0 or sequence 0) names no post.
fn post_id(message: &Message) -> Option<PostId> {
    ClusterId::new(message.post_origin)
        .filter(|_| message.post_seq > 0)
        .map(|origin| PostId {
            origin,
            seq: message.post_seq,
        })
}

fn received(message: Message) -> Result<ReceivedPost> {
    let author = UserId::parse(&message.username)
        .map_err(|_| Error::Rpc(format!("post from bad user {:?}", message.username)))?;
    let id = post_id(&message);
    let text = String::from_utf8(message.msg)
        .map_err(|_| Error::Rpc("post text is not UTF-8".to_string()))?;
    let at = message
        .timestamp
        .as_ref()
        .map(Timestamp::from_proto)
        .unwrap_or_default();
    Ok(ReceivedPost {
        id,
        author,
        at,
        text,
    })
}
