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
use support::{Tsc, Tsd, free_port};
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

/// The course's logout: `UnFollow` without arguments and with metadata `terminated: true`.
fn logout(user: &str) -> tonic::Request<Request> {
    let mut logout = tonic::Request::new(request(user, &[]));
    logout
        .metadata_mut()
        .insert("terminated", MetadataValue::from_static("true"));
    logout
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

#[test]
fn posts_piped_into_tsc_as_fast_as_it_reads_are_all_stored_in_order() {
    let data = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let tsd = Tsd::start(port, data.path());
    let runtime = runtime();
    let (mut rpc, mut follower) = runtime.block_on(async {
        let channel: Channel = sns_core::Network::tcp()
            .connect(&tsd.addr())
            .await
            .expect("connect");
        let mut rpc = SnsServiceClient::new(channel);
        for user in ["1", "2"] {
            rpc.login(request(user, &[])).await.expect("login");
        }
        rpc.follow(request("2", &["1"])).await.expect("2 follows 1");
        rpc.un_follow(logout("1")).await.expect("1 logs out");
        let (keep, idle) = tokio::sync::mpsc::channel::<Message>(1);
        let follower = rpc
            .timeline(timeline_request(
                "2",
                true,
                tokio_stream::wrappers::ReceiverStream::new(idle),
            ))
            .await
            .expect("2's timeline")
            .into_inner();
        (rpc, (keep, follower))
    });
    let mut one = Tsc::start(port, 1);
    one.expect_banner();
    one.enter_timeline();
    let input: String = (0..FLOOD).map(|i| format!("p{i}\n")).collect();
    let typing = one.type_all_and_close(input.into_bytes());
    runtime.block_on(async {
        let delivered = tokio::time::timeout(FLOOD_WAIT, read_posts(&mut follower.1, FLOOD))
            .await
            .expect("every post delivered in time");
        assert_all_in_order(delivered, FLOOD);
    });
    typing.join().expect("typed");
    assert_eq!(one.wait_for_exit(), Some(0), "tsc exits cleanly");
    let notices = one.notices.to_end();
    assert!(notices.is_empty(), "tsc said: {notices:?}");
    runtime.block_on(async {
        rpc.list(request("2", &[]))
            .await
            .expect("LIST after the flood");
    });
}

/// Opens a gRPC connection to `addr` and makes a first call on it (a LIST): a connection
/// the server refused fails that call with a broken connection; one it serves gets an answer
/// (whatever the answer).
///
/// A connection that was never served nor closed gives an error after [`support::WAIT`], so a
/// test fails where it hangs.
async fn connect(addr: &str) -> Result<SnsServiceClient<Channel>, String> {
    let served = async {
        let channel = sns_core::Network::tcp()
            .connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let mut client = SnsServiceClient::new(channel);
        match client.list(request("1", &[])).await {
            Err(status) if std::error::Error::source(&status).is_some() => {
                Err(format!("{status:?}"))
            }
            _ => Ok(client),
        }
    };
    tokio::time::timeout(support::WAIT, served)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "timed out: neither served nor closed within {:?}",
                support::WAIT
            ))
        })
}

/// Asserts that `refused` says the server closed the connection at once (not that it left it
/// hanging until the client gave up).
fn assert_closed_at_once(refused: &str) {
    assert!(
        !refused.contains("in time") && !refused.to_lowercase().contains("timed out"),
        "{refused}"
    );
}

/// Opens connections to `addr` until one is refused (at most `most`); returns the open ones
/// (user 1 logged in through the first) and the refusal.
async fn connect_until_refused(
    addr: &str,
    most: usize,
) -> (Vec<SnsServiceClient<Channel>>, String) {
    let mut open = Vec::new();
    loop {
        assert!(open.len() < most, "{most} connections and none refused");
        match connect(addr).await {
            Ok(mut client) => {
                if open.is_empty() {
                    tokio::time::timeout(support::WAIT, client.login(request("1", &[])))
                        .await
                        .expect("login timed out")
                        .expect("login");
                }
                open.push(client);
            }
            Err(refused) => return (open, refused),
        }
    }
}

/// Every connection in `open` is still served.
async fn all_served(open: &mut [SnsServiceClient<Channel>]) {
    for (i, client) in open.iter_mut().enumerate() {
        tokio::time::timeout(support::WAIT, client.list(request("1", &[])))
            .await
            .unwrap_or_else(|_| panic!("connection {i} did not answer within {:?}", support::WAIT))
            .unwrap_or_else(|e| panic!("connection {i} is no longer served: {e:?}"));
    }
}

/// Waits until a new connection to `addr` is served (a slot was freed); fails after the
/// support module's wait.
async fn connects_again(addr: &str) {
    let last = std::cell::RefCell::new(String::new());
    let served = sns_core::testing::eventually(support::WAIT, || {
        let last = &last;
        async move {
            match connect(addr).await {
                Ok(_) => true,
                Err(e) => {
                    *last.borrow_mut() = e;
                    false
                }
            }
        }
    })
    .await;
    assert!(
        served,
        "no new connection served after a slot was freed: {}",
        last.borrow()
    );
}

#[test]
fn at_the_connection_limit_new_connections_are_refused_and_open_ones_keep_working() {
    let data = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let tsd = Tsd::start_with(port, data.path(), &["--max-connections", "3"], serving).0;
    runtime().block_on(async {
        let (mut open, refused) = connect_until_refused(&tsd.addr(), 10).await;
        assert_eq!(open.len(), 3, "connections served");
        assert_closed_at_once(&refused);
        // `tsc` says so in one line.
        let (code, _, stderr) = support::run(
            env!("CARGO_BIN_EXE_tsc"),
            &["-h", "127.0.0.1", "-p", &port.to_string(), "-u", "9"],
        );
        assert_eq!(code, Some(1), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains("connection limit"), "{stderr}");
        all_served(&mut open).await;
        open.pop();
        connects_again(&tsd.addr()).await;
    });
    tsd.log
        .until(|l| l.contains("refusing new connections: 3 connections are open"));
}

/// Whether a `tsd` log line says it serves.
fn serving(line: &str) -> bool {
    line.contains("serving clients")
}

fn prlimit(descriptors: u32) -> std::process::Command {
    let mut command = std::process::Command::new("prlimit");
    command.arg(format!("--nofile={descriptors}:{descriptors}"));
    command.arg("--").arg(env!("CARGO_BIN_EXE_tsd"));
    command
}

#[test]
fn under_a_low_descriptor_limit_connections_stop_short_of_it() {
    let data = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    // 64 descriptors: a quarter stays for the server itself, 48 are for connections.
    let tsd = Tsd::start_command(prlimit(64), port, data.path(), &[], serving).0;
    runtime().block_on(async {
        let (mut open, refused) = connect_until_refused(&tsd.addr(), 100).await;
        assert_eq!(open.len(), 48, "connections served");
        assert_closed_at_once(&refused);
        all_served(&mut open).await;
        // Writes still reach the log.
        open[0].login(request("2", &[])).await.expect("login");
        open[0]
            .follow(request("2", &["1"]))
            .await
            .expect("a follow is stored");
        open.truncate(40);
        connects_again(&tsd.addr()).await;
    });
}

#[test]
fn out_of_descriptors_new_connections_are_refused_and_open_ones_keep_working() {
    let data = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    // A connection limit above what 64 descriptors allow: accepting runs out of descriptors.
    let tsd = Tsd::start_command(
        prlimit(64),
        port,
        data.path(),
        &["--max-connections", "1000"],
        serving,
    )
    .0;
    runtime().block_on(async {
        let (mut open, refused) = connect_until_refused(&tsd.addr(), 100).await;
        assert!(open.len() >= 20, "only {} connections served", open.len());
        assert_closed_at_once(&refused);
        all_served(&mut open).await;
        open.truncate(open.len() - 5);
        connects_again(&tsd.addr()).await;
        // Writes still reach the log.
        open[0].login(request("2", &[])).await.expect("login");
        open[0]
            .follow(request("2", &["1"]))
            .await
            .expect("a follow is stored");
    });
    tsd.log.until(|l| l.contains("out of file descriptors"));
}

#[test]
fn a_socket_that_says_nothing_is_closed_at_the_handshake_deadline() {
    use std::io::Read;

    let data = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let tsd = Tsd::start_with(
        port,
        data.path(),
        &["--max-connections", "1", "--handshake-timeout-secs", "1"],
        serving,
    )
    .0;
    let started = std::time::Instant::now();
    let mut silent = std::net::TcpStream::connect(tsd.addr()).expect("connect");
    silent
        .set_read_timeout(Some(support::WAIT))
        .expect("read timeout");
    runtime().block_on(async {
        // The silent socket holds the only slot.
        let refused = connect(&tsd.addr()).await.expect_err("no slot");
        assert_closed_at_once(&refused);
    });
    // The server speaks first (its settings), then closes the socket at the deadline. Each
    // read waits at most the socket's timeout, and reading stops once that much time has gone
    // by in all.
    let mut said = [0; 1024];
    loop {
        match silent.read(&mut said) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the silent socket was not closed: {e}"),
        }
        assert!(
            started.elapsed() < support::WAIT,
            "the silent socket was still open after {:?}",
            support::WAIT
        );
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(10),
        "closed after {elapsed:?}"
    );
    runtime().block_on(connects_again(&tsd.addr()));
}

#[test]
fn a_user_over_the_stream_limit_gets_one_line_naming_it_and_stays_in_command_mode() {
    let data = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let (_tsd, _) = Tsd::start_with(port, data.path(), &["--max-streams-per-user", "1"], |l| {
        l.contains("serving clients")
    });
    let mut one = Tsc::start(port, 1);
    one.expect_banner();
    // Another stream of user 1, opened while its session lives, holds the one slot.
    let runtime = runtime();
    let _held = runtime.block_on(async {
        let channel = sns_core::Network::tcp()
            .connect(&format!("127.0.0.1:{port}"))
            .await
            .expect("connect");
        let mut rpc = SnsServiceClient::new(channel);
        let (keep, idle) = tokio::sync::mpsc::channel::<Message>(1);
        let stream = rpc
            .timeline(timeline_request(
                "1",
                true,
                tokio_stream::wrappers::ReceiverStream::new(idle),
            ))
            .await
            .expect("the first stream")
            .into_inner();
        (rpc, keep, stream)
    });
    one.send("TIMELINE");
    one.expect_line("Command failed: too many timeline streams open for user 1 (at most 1)");
    // Still in command mode, and no failover was tried.
    let (all, _) = one.list();
    assert_eq!(all, [1]);
    let notices = one.notices.drain();
    assert!(
        !notices.iter().any(|n| n.contains("server lost")),
        "{notices:?}"
    );
}
