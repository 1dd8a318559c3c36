//! Limits and backpressure against a real `tsd` process: a client that posts as fast as it can
//! on one timeline stream, through `tsc` or as a raw gRPC client sending one HTTP/2 DATA frame
//! per post, is slowed down and never dropped; every post is stored, in order, and another
//! stream on the same connection carries on.

mod support;

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use sns_proto::csce438::sns_service_client::SnsServiceClient;
use sns_proto::csce438::{Message, Request};
use support::{Tsd, free_port};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

/// Posts in each flood.
const FLOOD: usize = 20_000;

/// How long a flood may take to be stored and delivered (the server paces one user at its
/// post rate limit, 1,000 posts a second by default).
const FLOOD_WAIT: Duration = Duration::from_secs(180);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

fn request(user: &str, args: &[&str]) -> Request {
    Request {
        username: user.to_string(),
        arguments: args.iter().map(|a| a.to_string()).collect(),
    }
}

/// A timeline call of `user` with `messages` as its outgoing half, in structured mode when
/// asked.
fn timeline_request<S>(user: &str, structured: bool, messages: S) -> tonic::Request<S> {
    let mut request = tonic::Request::new(messages);
    let name = MetadataValue::try_from(user).expect("ascii");
    request.metadata_mut().insert("username", name);
    if structured {
        request
            .metadata_mut()
            .insert("sns-timeline", MetadataValue::from_static("structured"));
    }
    request
}

/// The outgoing half of a flooding stream: post `i` is `p<i>`, and the stream yields each one
/// on a poll of its own (pending, and woken at once, in between), so tonic sends every post in
/// a DATA frame of its own, as the course's C++ client and grpc-python do.
struct OnePerFrame {
    user: String,
    next: usize,
    end: usize,
    paused: bool,
}

impl tokio_stream::Stream for OnePerFrame {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        if self.next == self.end {
            return Poll::Ready(None);
        }
        self.paused = !self.paused;
        if !self.paused {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let message = Message {
            username: self.user.clone(),
            msg: format!("p{}\n", self.next).into_bytes(),
            ..Message::default()
        };
        self.next += 1;
        Poll::Ready(Some(message))
    }
}

/// Reads `count` posts from a follower's structured stream; returns their texts.
async fn read_posts(
    stream: &mut tonic::Streaming<Message>,
    count: usize,
) -> Result<Vec<String>, String> {
    let mut texts = Vec::with_capacity(count);
    while texts.len() < count {
        match stream.message().await {
            Ok(Some(message)) if message.ack => {}
            Ok(Some(message)) => texts.push(String::from_utf8_lossy(&message.msg).into_owned()),
            Ok(None) => return Err(format!("the stream ended after {} posts", texts.len())),
            Err(status) => {
                return Err(format!(
                    "the stream failed after {} posts: {status:?}",
                    texts.len()
                ));
            }
        }
    }
    Ok(texts)
}

/// Asserts that `delivered` is posts `p0`..`p<count - 1>`, in order; says where it is not.
fn assert_all_in_order(delivered: Result<Vec<String>, String>, count: usize) {
    let delivered = delivered.unwrap_or_else(|e| panic!("{e}"));
    if let Some(at) = (0..count).find(|&i| delivered.get(i) != Some(&format!("p{i}"))) {
        panic!(
            "post {at} of {count} is {:?}, expected \"p{at}\" ({} delivered)",
            delivered.get(at),
            delivered.len()
        );
    }
}

#[test]
fn a_raw_client_posting_one_frame_per_post_is_slowed_down_not_dropped() {
    let data = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let tsd = Tsd::start(port, data.path());
    runtime().block_on(async {
        let channel: Channel = sns_core::Network::tcp()
            .connect(&tsd.addr())
            .await
            .expect("connect");
        let mut rpc = SnsServiceClient::new(channel);
        for user in ["1", "2"] {
            rpc.login(request(user, &[])).await.expect("login");
        }
        rpc.follow(request("2", &["1"])).await.expect("2 follows 1");
        // The follower's stream and the flood share one connection.
        let (_keep, idle) = tokio::sync::mpsc::channel::<Message>(1);
        let mut follower = rpc
            .timeline(timeline_request(
                "2",
                true,
                tokio_stream::wrappers::ReceiverStream::new(idle),
            ))
            .await
            .expect("2's timeline")
            .into_inner();
        let flood = OnePerFrame {
            user: "1".into(),
            next: 0,
            end: FLOOD,
            paused: false,
        };
        let mut flooding = rpc
            .timeline(timeline_request("1", false, flood))
            .await
            .expect("1's timeline")
            .into_inner();
        let delivered = tokio::time::timeout(FLOOD_WAIT, read_posts(&mut follower, FLOOD))
            .await
            .expect("every post delivered in time");
        assert_all_in_order(delivered, FLOOD);
        // The flooding stream ends cleanly once its posts are stored: the client closed its
        // side.
        let end = tokio::time::timeout(FLOOD_WAIT, flooding.message())
            .await
            .expect("the flooding stream ends");
        assert!(matches!(end, Ok(None)), "{end:?}");
        // The connection still serves.
        rpc.list(request("2", &[]))
            .await
            .expect("LIST after the flood");
    });
}
