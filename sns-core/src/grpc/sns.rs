//! `SNSService` adapter: the course's client-facing RPCs onto [`Server`].
//!
//! Compatibility rules (DESIGN §5.1): `UnFollow` with metadata `terminated: true` and no
//! arguments logs out; `Timeline` takes its user from metadata `username` or else from the first
//! message, rejects messages that claim another user, and sends posts pre-formatted unless the
//! client asked for `sns-timeline: structured`. A structured stream also carries an
//! acknowledgement (`Message.ack`) for each post sent with an idempotency key, once it is
//! committed, in the order the posts were sent; a course-mode stream never does.
//!
//! Limits: a message larger than [`ServerConfig::max_message_bytes`] is refused as soon as
//! its length is read, a request with more than [`MAX_ARGUMENTS`] arguments is refused, and
//! a timeline stream that brings a message that is too large or does not decode ends with
//! `INVALID_ARGUMENT` (never OK), storing nothing of that message. Posts wait their turn under
//! the user's post rate limit.
//!
//! [`ServerConfig::max_message_bytes`]: crate::ServerConfig::max_message_bytes

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use sns_proto::csce438::sns_service_server::{SnsService, SnsServiceServer};
use sns_proto::csce438::{ListReply, Message, Reply, Request};
use tokio::sync::mpsc;
use tonic::metadata::MetadataMap;
use tonic::service::Routes;
use tonic::{Code, Response, Status, Streaming};

use super::alias::{Csce662Sns, Renamed};
use super::{metadata, status};
use crate::error::{Error, Result};
use crate::event::Post;
use crate::ids::{PostId, PostKey, UserId};
use crate::server::{MAX_ARGUMENTS, Server, TimelineFeed};

/// How long a timeline stream without `username` metadata may take to name its user.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the course client sends first on a timeline stream; it opens the stream, it is no post.
const SET_STREAM: &[u8] = b"Set Stream";
/// What the course's Spring 2024 client sends on its timeline stream when the user presses
/// Ctrl-C (then it exits without logging out): on a course-style stream it ends the stream and
/// the session instead of being posted.
const QUIT: &[u8] = b"quit";

/// Acknowledgements queued for the stream's reader; beyond it the poster waits (the posts a
/// stream has in flight are bounded by its sender anyway).
const ACK_QUEUE: usize = 64;

/// The routes serving `server` as `csce438.SNSService` and `csce662.SNSService`.
pub(crate) fn routes(server: Server) -> Routes {
    let max_message_bytes = server.config().max_message_bytes;
    let service =
        SnsServiceServer::new(SnsAdapter { server }).max_decoding_message_size(max_message_bytes);
    Routes::new(service.clone()).add_service(Renamed::<_, Csce662Sns>::new(service))
}

struct SnsAdapter {
    server: Server,
}

/// The user making `request`, once its size is checked: at most [`MAX_ARGUMENTS`] arguments
/// (each argument, like the username, is a user id, so one too long for that is an invalid
/// username).
fn caller(request: &Request) -> Result<UserId, Status> {
    let count = request.arguments.len();
    if count > MAX_ARGUMENTS {
        return Err(Status::invalid_argument(format!(
            "too many arguments: {count} (at most {MAX_ARGUMENTS})"
        )));
    }
    UserId::parse(&request.username).map_err(status)
}

/// The status a timeline stream ends with when its incoming half fails: a message that is
/// too large or does not decode is the client's mistake, said as `INVALID_ARGUMENT`. Other
/// failures (the client went away) keep their status; nobody may be listening anyway.
fn bad_stream(error: Status) -> Status {
    match error.code() {
        Code::InvalidArgument => error,
        Code::OutOfRange | Code::ResourceExhausted | Code::Internal
            if std::error::Error::source(&error).is_none() =>
        {
            Status::invalid_argument(format!(
                "bad message on the timeline stream: {}",
                error.message()
            ))
        }
        _ => error,
    }
}

fn reply(msg: &str) -> Response<Reply> {
    Response::new(Reply {
        msg: msg.to_string(),
    })
}

fn argument(request: &Request) -> Result<&str, Status> {
    request
        .arguments
        .first()
        .map(String::as_str)
        .ok_or_else(|| status(Error::InvalidUsername(String::new())))
}

/// A post as the wire carries it, pre-formatted for the course client unless `structured`, with
/// its id in both modes (course clients ignore the extra fields).
pub(crate) fn post_message(post: &Post, structured: bool) -> Message {
    let msg = if structured {
        post.text.as_bytes().to_vec()
    } else {
        format!("{} ({}) >> {}", post.author, post.at.ctime(), post.text).into_bytes()
    };
    Message {
        username: post.author.to_string(),
        msg,
        timestamp: Some(post.at.to_proto()),
        post_origin: post.id.origin.get(),
        post_seq: post.id.seq,
        ..Message::default()
    }
}

/// The acknowledgement of `user`'s post sent with `key`: stored as `id` (`None`: an empty line,
/// nothing stored).
fn ack_message(user: UserId, key: PostKey, id: Option<PostId>) -> Message {
    Message {
        username: user.to_string(),
        post_origin: id.map_or(0, |id| id.origin.get()),
        post_seq: id.map_or(0, |id| id.seq),
        post_key: key.get(),
        ack: true,
        ..Message::default()
    }
}

/// What a timeline stream's metadata asks for.
struct TimelineOpening {
    /// Posts go out as structured messages (with acknowledgements), not pre-formatted.
    structured: bool,
    /// How many posts the client already holds, when it resumes a stream (structured only).
    resume: Option<usize>,
    /// The user named in the metadata; without one, the first message names the user.
    named: Option<UserId>,
}

impl TimelineOpening {
    /// Reads the timeline metadata, refusing a resume on a course-mode stream, a resume that
    /// is not a count, and a username that is not a user id.
    fn from_metadata(headers: &MetadataMap) -> Result<Self, Status> {
        let structured = headers
            .get(metadata::TIMELINE_MODE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"structured"));
        let resume = match headers.get(metadata::TIMELINE_RESUME) {
            Some(_) if !structured => {
                return Err(Status::invalid_argument(
                    "resuming a timeline needs a structured stream",
                ));
            }
            Some(value) => Some(
                value
                    .to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "{} must be a count of posts",
                            metadata::TIMELINE_RESUME
                        ))
                    })?,
            ),
            None => None,
        };
        let named = match headers.get(metadata::USERNAME) {
            Some(value) => {
                let text = value
                    .to_str()
                    .map_err(|_| status(Error::InvalidUsername("<binary>".into())))?;
                Some(UserId::parse(text).map_err(status)?)
            }
            None => None,
        };
        Ok(Self {
            structured,
            resume,
            named,
        })
    }
}

impl SnsAdapter {
    /// Waits (at most [`FIRST_MESSAGE_TIMEOUT`], and not past shutdown) for the first message
    /// of a timeline stream whose metadata named no user: its username is the stream's user,
    /// and the message itself is kept for the poster.
    async fn first_message(
        &self,
        inbound: &mut Streaming<Message>,
    ) -> Result<(UserId, Option<Message>), Status> {
        let (_, shutdown) = self.server.tasks();
        let first = tokio::select! {
            () = shutdown.cancelled() => {
                return Err(status(Error::server_shutting_down()));
            }
            first = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, inbound.message()) => first,
        };
        let first = first
            .map_err(|_| Status::invalid_argument("timeline stream named no user in time"))?
            .map_err(bad_stream)?
            .ok_or_else(|| Status::invalid_argument("timeline stream named no user"))?;
        Ok((UserId::parse(&first.username).map_err(status)?, Some(first)))
    }

    /// Opens `user`'s timeline feed, or resumes it after the `resume` posts the client holds.
    fn open_feed(&self, user: UserId, resume: Option<usize>) -> Result<TimelineFeed, Status> {
        match resume {
            Some(replay) => self.server.resume_timeline(user, replay),
            None => self.server.open_timeline(user),
        }
        .map_err(|e| {
            tracing::info!(%user, reason = %e, "timeline refused");
            refused(&self.server, e)
        })
    }
}

#[tonic::async_trait]
impl SnsService for SnsAdapter {
    async fn login(&self, request: tonic::Request<Request>) -> Result<Response<Reply>, Status> {
        let user = caller(request.get_ref())?;
        match self.server.login(user).await {
            Ok(()) => tracing::info!(%user, "login"),
            Err(e) => {
                tracing::info!(%user, reason = %e, "login refused");
                return Err(refused(&self.server, e));
            }
        }
        Ok(reply("login successful"))
    }

    async fn list(&self, request: tonic::Request<Request>) -> Result<Response<ListReply>, Status> {
        let user = caller(request.get_ref())?;
        let listing = logged(&self.server, "LIST", user, self.server.list(user))?;
        let names = |users: Vec<UserId>| users.into_iter().map(|u| u.to_string()).collect();
        Ok(Response::new(ListReply {
            all_users: names(listing.all_users),
            followers: names(listing.followers),
        }))
    }

    async fn follow(&self, request: tonic::Request<Request>) -> Result<Response<Reply>, Status> {
        let user = caller(request.get_ref())?;
        let target = argument(request.get_ref())?;
        logged(
            &self.server,
            "FOLLOW",
            user,
            self.server.follow(user, target).await,
        )?;
        Ok(reply("follow successful"))
    }

    async fn un_follow(&self, request: tonic::Request<Request>) -> Result<Response<Reply>, Status> {
        let user = caller(request.get_ref())?;
        let terminated = request
            .metadata()
            .get(metadata::TERMINATED)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        if terminated && request.get_ref().arguments.is_empty() {
            logged(&self.server, "logout", user, self.server.logout(user))?;
            tracing::info!(%user, "logged out");
            return Ok(reply("logged out"));
        }
        let target = argument(request.get_ref())?;
        logged(
            &self.server,
            "UNFOLLOW",
            user,
            self.server.unfollow(user, target).await,
        )?;
        Ok(reply("unfollow successful"))
    }

    type TimelineStream = Outbound;

    async fn timeline(
        &self,
        request: tonic::Request<Streaming<Message>>,
    ) -> Result<Response<Self::TimelineStream>, Status> {
        let opening = TimelineOpening::from_metadata(request.metadata())?;
        let structured = opening.structured;
        let mut inbound = request.into_inner();
        let (user, first) = match opening.named {
            Some(user) => (user, None),
            None => self.first_message(&mut inbound).await?,
        };
        let feed = self.open_feed(user, opening.resume)?;
        tracing::info!(%user, structured, "timeline stream opened");
        let (errors, failures) = mpsc::channel(1);
        let (acks, acks_out) = if structured {
            let (acks, acks_out) = mpsc::channel(ACK_QUEUE);
            (Some(acks), Some(acks_out))
        } else {
            (None, None)
        };
        let (tasks, shutdown) = self.server.tasks();
        let poster = Poster {
            server: self.server.clone(),
            user,
            errors,
            acks,
            structured,
            shutdown: shutdown.clone(),
        };
        tasks.spawn(poster.run(first, inbound));
        Ok(Response::new(Outbound {
            user,
            feed,
            acks: acks_out,
            failures,
            ending: None,
            structured,
            done: false,
        }))
    }

    async fn client_heartbeat(
        &self,
        request: tonic::Request<Request>,
    ) -> Result<Response<Reply>, Status> {
        let user = caller(request.get_ref())?;
        logged(&self.server, "heartbeat", user, self.server.heartbeat(user))?;
        Ok(reply("ok"))
    }
}

impl Drop for Outbound {
    fn drop(&mut self) {
        tracing::info!(user = %self.user, "timeline stream closed");
    }
}

/// `e` as a status, counted among the server's refusals.
fn refused(server: &Server, e: Error) -> Status {
    server.count_refusal(&e);
    status(e)
}

/// Logs a client command's outcome: every command at debug level; a failure that is the
/// server's or the system's (not the request's) at info level. Returns it as a status.
fn logged<T>(
    server: &Server,
    command: &str,
    user: UserId,
    result: Result<T, Error>,
) -> Result<T, Status> {
    match result {
        Ok(value) => {
            tracing::debug!(%user, command, "done");
            Ok(value)
        }
        Err(e) if e.is_the_callers() => {
            tracing::debug!(%user, command, error = %e, "refused");
            Err(refused(server, e))
        }
        Err(e) => {
            tracing::info!(%user, command, error = %e, "command failed");
            Err(refused(server, e))
        }
    }
}

/// Reads a timeline stream's incoming messages and posts them as its user, one at a time.
struct Poster {
    server: Server,
    user: UserId,
    errors: mpsc::Sender<Status>,
    /// Where acknowledgements go (structured streams only).
    acks: Option<mpsc::Sender<Message>>,
    /// Whether the client asked for structured mode (ours); otherwise a course client.
    structured: bool,
    shutdown: tokio_util::sync::CancellationToken,
}

impl Poster {
    async fn run(self, first: Option<Message>, mut inbound: Streaming<Message>) {
        let mut opening = true;
        if let Some(first) = first {
            opening = false;
            if self.quits(&first) {
                return;
            }
            if let Err(e) = self.handle(first, true).await {
                let _ = self.errors.send(e).await;
                return;
            }
        }
        loop {
            let next = tokio::select! {
                () = self.shutdown.cancelled() => return,
                next = inbound.message() => next,
            };
            let message = match next {
                Ok(Some(message)) => message,
                // The client closed its side (or reset the stream): end the stream.
                Ok(None) => return,
                // A message too large or undecodable, or a broken connection: end the stream
                // with an error, never OK.
                Err(e) => {
                    let e = bad_stream(e);
                    tracing::info!(user = %self.user, error = %e.message(), "timeline stream failed");
                    let _ = self.errors.send(e).await;
                    return;
                }
            };
            if self.quits(&message) {
                return;
            }
            let first = std::mem::replace(&mut opening, false);
            if let Err(e) = self.handle(message, first).await {
                let _ = self.errors.send(e).await;
                return;
            }
        }
    }

    /// Whether `message` is a course client's `quit` (not on a structured stream, where it is a
    /// post like any other); if so the user is logged out, and the stream is to end.
    fn quits(&self, message: &Message) -> bool {
        let text = message.msg.strip_suffix(b"\n").unwrap_or(&message.msg);
        if self.structured || text != QUIT {
            return false;
        }
        // The course's Spring 2024 client says `quit` on Ctrl-C and exits without logging
        // out: end the session and the stream, as the servers written for it did.
        tracing::info!(user = %self.user, "a course client quit its timeline: logged out");
        let _ = self.server.logout(self.user);
        true
    }

    /// Posts one message of the stream; `first` tells whether it opens the stream (where the
    /// course client's `Set Stream` is a greeting, not a post).
    async fn handle(&self, message: Message, first: bool) -> Result<(), Status> {
        if !message.username.is_empty() && message.username != self.user.to_string() {
            return Err(status(Error::PermissionDenied(format!(
                "this timeline stream belongs to user {}",
                self.user
            ))));
        }
        if first && message.msg.strip_suffix(b"\n").unwrap_or(&message.msg) == SET_STREAM {
            return Ok(());
        }
        if let Some(wait) = self.server.post_delay(self.user) {
            tokio::select! {
                () = self.shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(wait) => {},
            }
        }
        let key = PostKey::new(message.post_key);
        let id = self
            .server
            .post_keyed(self.user, &message.msg, key)
            .await
            .map_err(|e| refused(&self.server, e))?;
        if let (Some(acks), Some(key)) = (&self.acks, key) {
            // A reader gone away ends the stream anyway: an undelivered ack is nothing to report.
            let _ = acks.send(ack_message(self.user, key, id)).await;
        }
        Ok(())
    }
}

/// The server-to-client half of a timeline stream: the feed and (structured streams) the
/// acknowledgements, ended early by an error of the incoming half, or by the incoming half
/// closing, once every acknowledgement made before is sent.
pub(crate) struct Outbound {
    user: UserId,
    feed: TimelineFeed,
    acks: Option<mpsc::Receiver<Message>>,
    failures: mpsc::Receiver<Status>,
    /// How the incoming half ended (an error or `None`), waiting for the last acks to go out.
    ending: Option<Option<Status>>,
    structured: bool,
    done: bool,
}

impl tokio_stream::Stream for Outbound {
    type Item = Result<Message, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match this.feed.poll_next_post(cx) {
            Poll::Ready(Some(Ok(post))) => {
                return Poll::Ready(Some(Ok(post_message(&post, this.structured))));
            }
            Poll::Ready(Some(Err(e))) => {
                this.done = true;
                return Poll::Ready(Some(Err(status(e))));
            }
            Poll::Ready(None) => {
                this.done = true;
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        if this.ending.is_none()
            && let Poll::Ready(ending) = this.failures.poll_recv(cx)
        {
            this.ending = Some(ending);
        }
        // The poster queues an ack before it reports an error or ends, so once the ending is
        // known every ack it made is already queued here.
        if let Some(acks) = &mut this.acks
            && let Poll::Ready(Some(ack)) = acks.poll_recv(cx)
        {
            return Poll::Ready(Some(Ok(ack)));
        }
        match this.ending.take() {
            Some(ending) => {
                this.done = true;
                Poll::Ready(ending.map(Err))
            }
            None => Poll::Pending,
        }
    }
}
