//! Bad input and limits through the gRPC surface, over in-memory pipes: a timeline stream that
//! brings a message too large or undecodable ends with `INVALID_ARGUMENT` (never OK) and
//! stores nothing of it; undecodable unary requests answer `INVALID_ARGUMENT`; requests are
//! bounded in size and arguments; a user's timeline streams are bounded, and share one post
//! rate.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use prost::bytes::BufMut;
use sns_core::client::Client;
use sns_core::testing::{TestServer, eventually};
use sns_core::{Error, MAX_ARGUMENTS, MemoryStorage, ServerConfig, UserId};
use sns_proto::csce438::sns_service_client::SnsServiceClient;
use sns_proto::csce438::{Message, Reply, Request};
use tokio::time::Instant;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

const WAIT: Duration = Duration::from_secs(10);

fn u(id: u32) -> UserId {
    UserId::new(id).expect("valid user")
}

fn standalone() -> ServerConfig {
    let mut config = ServerConfig::default();
    config.clusters = 1;
    config
}

async fn start(config: ServerConfig) -> TestServer {
    TestServer::start_in_memory(config, Arc::new(MemoryStorage::new()))
        .await
        .expect("server starts")
}

async fn login(server: &TestServer, user: u32) -> Client {
    Client::login(&server.network, &server.addr, u(user))
        .await
        .expect("login")
}

/// A codec that sends messages as given bytes (so a test can send what no encoder would) and
/// decodes replies with prost.
struct RawCodec<D>(PhantomData<D>);

impl<D> Default for RawCodec<D> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl<D: prost::Message + Default + Send + 'static> Codec for RawCodec<D> {
    type Encode = Vec<u8>;
    type Decode = D;
    type Encoder = RawEncoder;
    type Decoder = tonic_prost::ProstDecoder<D>;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstCodec::<D, D>::raw_decoder(BufferSettings::default())
    }
}

const TIMELINE: &str = "/csce438.SNSService/Timeline";

/// A course-style timeline stream (no structured mode) sending `frames` as raw messages, named
/// by metadata when `user` is given. The client's side stays open (the sender is returned), so
/// the stream can only end by the server's choice. Returns the call's outcome.
async fn raw_timeline(
    server: &TestServer,
    user: Option<&str>,
    frames: Vec<Vec<u8>>,
) -> (
    tokio::sync::mpsc::Sender<Vec<u8>>,
    Result<tonic::Streaming<Message>, Status>,
) {
    let channel = server.channel().await.expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let (tx, rx) = tokio::sync::mpsc::channel(frames.len().max(1));
    for frame in frames {
        tx.send(frame).await.expect("queued");
    }
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    if let Some(user) = user {
        request
            .metadata_mut()
            .insert("username", MetadataValue::try_from(user).expect("ascii"));
    }
    let outcome = grpc
        .streaming(
            request,
            PathAndQuery::from_static(TIMELINE),
            RawCodec::<Message>::default(),
        )
        .await
        .map(tonic::Response::into_inner);
    (tx, outcome)
}

/// How `stream` ends: the status it ends with (`None`: ended OK). Posts are skipped.
async fn end_of(stream: &mut tonic::Streaming<Message>) -> Option<Status> {
    loop {
        match tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("the stream ends in time")
        {
            Ok(Some(_)) => {}
            Ok(None) => return None,
            Err(status) => return Some(status),
        }
    }
}

fn post(user: &str, text: &str) -> Vec<u8> {
    Message {
        username: user.into(),
        msg: text.as_bytes().to_vec(),
        ..Message::default()
    }
    .encode_to_vec()
}

/// Bytes that are no protobuf message: a field tag whose varint never ends.
const GARBAGE: &[u8] = &[0xff, 0xff, 0xff, 0xff];

/// A `Message` whose `username` (field 1, a string) is not UTF-8, with a post in `msg`.
const BAD_USERNAME: &[u8] = &[0x0a, 0x02, 0xff, 0xfe, 0x12, 0x02, b'h', b'i'];

/// The texts `user` is shown on opening the timeline (newest first), read from the server.
fn shown(server: &TestServer, user: u32) -> Vec<String> {
    server
        .server
        .recent_posts(u(user))
        .expect("known user")
        .iter()
        .map(|p| p.text.to_string())
        .collect()
}

/// Posts `marker` as user 1 on a good stream, waits until user 2 is shown it, and returns
/// everything user 2 is shown (newest first).
async fn shown_after_marker(server: &TestServer, one: &Client, marker: &str) -> Vec<String> {
    let (sender, _feed) = one.timeline().await.expect("timeline");
    sender.post(marker).await.expect("post");
    assert!(
        eventually(WAIT, || {
            let newest = shown(server, 2).first().cloned();
            async move { newest.as_deref() == Some(marker) }
        })
        .await,
        "{marker:?} never reached user 2"
    );
    shown(server, 2)
}

#[tokio::test]
async fn every_bad_message_ends_the_timeline_with_invalid_argument_and_stores_nothing() {
    let server = start(standalone()).await;
    let one = login(&server, 1).await;
    let two = login(&server, 2).await;
    two.follow(u(1)).await.expect("2 follows 1");
    let huge = |bytes: usize| post("1", &"x".repeat(bytes));
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("a 4 MiB post", huge(4 << 20), "too large"),
        ("a 100 MiB post", huge(100 << 20), "too large"),
        (
            "an undecodable message",
            GARBAGE.to_vec(),
            "undecodable message",
        ),
        (
            "a username that is not UTF-8",
            BAD_USERNAME.to_vec(),
            "undecodable message",
        ),
    ];
    let mut expected = Vec::new();
    for (round, (case, bad, says)) in cases.into_iter().enumerate() {
        // A good post first: the stream works until the bad message.
        let good = format!("good post {round}");
        let (_open, outcome) = raw_timeline(
            &server,
            Some("1"),
            vec![post("1", &format!("{good}\n")), bad],
        )
        .await;
        let mut stream = outcome.unwrap_or_else(|e| panic!("{case}: the call failed: {e:?}"));
        let end = end_of(&mut stream).await;
        let status = end.unwrap_or_else(|| panic!("{case}: the stream ended OK"));
        assert_eq!(status.code(), Code::InvalidArgument, "{case}: {status:?}");
        assert!(status.message().contains(says), "{case}: {status:?}");
        // The good post is stored; nothing of the bad message is.
        let marker = format!("marker {round}");
        expected.insert(0, good);
        expected.insert(0, marker.clone());
        assert_eq!(
            shown_after_marker(&server, &one, &marker).await,
            expected,
            "{case}"
        );
    }
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn a_bad_first_message_naming_no_user_fails_the_call() {
    let server = start(standalone()).await;
    for (case, bad) in [
        ("an undecodable message", GARBAGE.to_vec()),
        ("a username that is not UTF-8", BAD_USERNAME.to_vec()),
        ("a 4 MiB post", post("1", &"x".repeat(4 << 20))),
    ] {
        let (_open, outcome) = raw_timeline(&server, None, vec![bad]).await;
        let status = match outcome {
            Err(status) => status,
            Ok(mut stream) => end_of(&mut stream)
                .await
                .unwrap_or_else(|| panic!("{case}: the stream ended OK")),
        };
        assert_eq!(status.code(), Code::InvalidArgument, "{case}: {status:?}");
    }
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn undecodable_unary_requests_answer_invalid_argument() {
    let server = start(standalone()).await;
    let channel = server.channel().await.expect("connect");
    for method in ["Login", "List", "Follow", "UnFollow", "ClientHeartbeat"] {
        for (case, bytes) in [
            ("garbage", GARBAGE.to_vec()),
            // `Request.username` (field 1) that is not UTF-8.
            ("a username not UTF-8", vec![0x0a, 0x02, 0xff, 0xfe]),
        ] {
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            grpc.ready().await.expect("ready");
            let path =
                PathAndQuery::try_from(format!("/csce438.SNSService/{method}")).expect("a path");
            let status = grpc
                .unary(
                    tonic::Request::new(bytes),
                    path,
                    RawCodec::<Reply>::default(),
                )
                .await
                .expect_err("refused");
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{method}, {case}: {status:?}"
            );
            assert!(
                status.message().starts_with("undecodable message"),
                "{method}, {case}: {status:?}"
            );
        }
    }
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn requests_are_bounded_in_size_and_in_arguments() {
    let server = start(standalone()).await;
    let _one = login(&server, 1).await;
    let _two = login(&server, 2).await;
    let mut rpc = SnsServiceClient::new(server.channel().await.expect("connect"));
    let request = |args: Vec<String>| Request {
        username: "1".into(),
        arguments: args,
    };
    let too_many = vec!["2".to_string(); MAX_ARGUMENTS + 1];
    let status = rpc.follow(request(too_many)).await.expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("too many arguments"),
        "{status:?}"
    );
    // Larger than the message limit: refused (tonic's code) before it is read.
    let limit = ServerConfig::default().max_message_bytes;
    let status = rpc
        .follow(request(vec!["2".repeat(limit)]))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains(&limit.to_string()), "{status:?}");
    // Nothing was followed; a normal request still works on the same connection.
    rpc.follow(request(vec!["2".into()]))
        .await
        .expect("1 follows 2");
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn one_user_cannot_take_every_timeline_stream() {
    let mut config = standalone();
    config.max_timeline_streams_per_user = 2;
    config.max_timeline_streams = 3;
    let server = start(config).await;
    let one = login(&server, 1).await;
    let two = login(&server, 2).await;
    let first = one.timeline().await.expect("1's first stream");
    let _second = one.timeline().await.expect("1's second stream");
    let refused = one.timeline().await.expect_err("1's third stream");
    assert!(
        matches!(&refused, Error::OverLimit(why) if why.contains("user 1")),
        "{refused:?}"
    );
    // Another user still gets the server's last stream.
    let _two_stream = two.timeline().await.expect("2's stream");
    // Closing one of 1's streams frees its slot.
    drop(first);
    assert!(
        eventually(WAIT, || {
            let one = one.clone();
            async move { one.timeline().await.is_ok() }
        })
        .await,
        "user 1 never got a stream back"
    );
    server.stop().await.expect("stop");
}

/// On tokio's paused clock: time moves only when every task waits for a timer, so the moment
/// each post arrives is exact.
#[tokio::test(start_paused = true)]
async fn the_post_rate_limit_is_one_per_user_across_streams() {
    // The timer's resolution: a post's turn, in seconds as a float, is rounded to it.
    const TICK: Duration = Duration::from_millis(1);
    let rate = 20;
    let spacing = Duration::from_secs(1) / rate;
    let mut config = standalone();
    config.max_posts_per_second = rate;
    let server = start(config).await;
    let one = login(&server, 1).await;
    let two = login(&server, 2).await;
    two.follow(u(1)).await.expect("2 follows 1");
    let (_s2, mut feed2) = two.timeline().await.expect("2's timeline");
    let (a, _fa) = one.timeline().await.expect("1's first stream");
    let (b, _fb) = one.timeline().await.expect("1's second stream");
    let started = Instant::now();
    // Twice the rate, half on each stream: the burst covers only half of them (a limit per
    // stream would let all of them through at once).
    for i in 0..rate {
        a.post(&format!("a{i}")).await.expect("post");
        b.post(&format!("b{i}")).await.expect("post");
    }
    let burst = sns_core::testing::next_texts(&mut feed2, rate as usize, WAIT).await;
    assert_eq!(burst.len(), rate as usize);
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "the burst waits for nothing"
    );
    // Then one post per `spacing`, from both streams together: none comes early.
    for turn in 1..=rate {
        let early = tokio::time::timeout(spacing - TICK, feed2.next()).await;
        assert!(
            early.is_err(),
            "post {} of user 1 came {:?} after the start, before its turn at {:?}",
            rate + turn,
            started.elapsed(),
            spacing * turn
        );
        sns_core::testing::next_texts(&mut feed2, 1, spacing).await;
        let (at, due) = (started.elapsed(), spacing * turn);
        assert!(
            at + TICK >= due && at <= due + TICK,
            "post {} came {at:?} after the start, due at {due:?}",
            rate + turn
        );
    }
    server.stop().await.expect("stop");
}
