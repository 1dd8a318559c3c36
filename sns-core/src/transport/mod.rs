//! The injected network: how components accept connections and reach their peers.
//!
//! Servers and the coordinator serve on a [`Listener`] (the address peers dial, plus a stream
//! of accepted [`Connection`]s); clients, heartbeats and anything else that calls a peer get a
//! tonic [`Channel`] from a [`Network`] (a cloneable handle on a [`Connector`]). Three networks
//! exist: TCP for the binaries ([`tcp`]), in-memory pipes for a whole deployment inside one
//! process ([`MemoryNetwork`]), and any other byte stream a caller plugs in through the public
//! API (the tests run the system on turmoil's simulated network this way).
//!
//! Invariants:
//! - An address is a `host:port` string, for every network. This module is the only place that
//!   turns one into a URL or a tonic `Endpoint`; nothing else formats `http://` strings.
//! - Every dialled channel has the same settings: [`CONNECT_TIMEOUT`] (unless a caller asks for
//!   another), and HTTP/2 keepalive pings ([`KEEPALIVE_INTERVAL`], [`KEEPALIVE_TIMEOUT`]) that
//!   close a connection whose peer has silently gone. [`server_builder`] gives the serving side
//!   the same keepalive.
//! - Every TCP socket, accepted or dialled, has `TCP_NODELAY` set (DESIGN §8): gRPC messages
//!   are small, and Nagle's algorithm would hold them back by a round trip.
//! - A [`Connection`] is a reliable, ordered byte stream. A network may delay bytes (a memory
//!   partition stalls them) but never drops or reorders them on a live connection.
//!
//! What it does not do: no TLS, no name resolution of its own (TCP uses the system resolver,
//! the memory network its own registry), no retries (tonic reconnects a channel on its next
//! call; callers decide when to try again). Connection limits are opt-in per listener
//! ([`Listener::limited`]); servers bound their own streams.

pub mod limits;
pub mod memory;
pub mod tcp;

use std::fmt;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_stream::Stream;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Uri};

pub use limits::ConnectionLimits;
pub use memory::MemoryNetwork;

use crate::error::{Error, Result};

/// How long establishing a connection may take before the dialler gives up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Time between HTTP/2 keepalive pings on an idle connection, both directions.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// How long a keepalive ping may go unanswered before the connection is closed.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Any byte stream a connection can run on.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// What is known about a connection's two ends (tonic's connect info for requests served on
/// it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// This end's address (a listener's address on the accepting side).
    pub local: String,
    /// The other end's address (or node name, on the memory network).
    pub peer: String,
    /// `TCP_NODELAY` as read back from the socket after it was configured; `None` when the
    /// connection is not a TCP socket.
    pub nodelay: Option<bool>,
}

/// One established connection, accepted or dialled, on any network.
pub struct Connection {
    io: Box<dyn Io>,
    info: ConnectionInfo,
}

impl Connection {
    /// Wraps a byte stream with what is known about its ends.
    pub fn new(io: impl Io, info: ConnectionInfo) -> Self {
        Self {
            io: Box::new(io),
            info,
        }
    }

    /// The connection's ends.
    pub fn info(&self) -> &ConnectionInfo {
        &self.info
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}

type Incoming = Pin<Box<dyn Stream<Item = io::Result<Connection>> + Send>>;

/// A bound listener: the address peers dial, and the connections they open, in order.
///
/// It is a [`Stream`] of accepted connections, so it goes straight into tonic's
/// `serve_with_incoming_shutdown`. An `Err` item is one failed accept, not the end of the
/// listener; the stream ends only when the network closes it. Dropping the listener stops
/// accepting and frees its address.
pub struct Listener {
    addr: String,
    incoming: Incoming,
}

impl Listener {
    /// A listener reachable at `addr` (`host:port`) that yields `incoming`.
    pub fn new(
        addr: impl Into<String>,
        incoming: impl Stream<Item = io::Result<Connection>> + Send + 'static,
    ) -> Self {
        Self {
            addr: addr.into(),
            incoming: Box::pin(incoming),
        }
    }

    /// The address peers dial (`host:port`), with the port actually bound.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The port of [`Listener::addr`].
    pub fn port(&self) -> Option<u16> {
        split_addr(&self.addr).map(|(_, port)| port)
    }
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Stream for Listener {
    type Item = io::Result<Connection>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.incoming.as_mut().poll_next(cx)
    }
}

/// Joins a host and a port into an address (`host:port`, an IPv6 host in brackets).
pub fn address(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Splits `host:port` (the host may be a bracketed IPv6 address).
pub(crate) fn split_addr(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let port = port.parse().ok()?;
    (!host.is_empty()).then_some((host, port))
}

/// Opens byte streams to addresses: the one thing a network must provide to be dialled.
#[async_trait::async_trait]
pub trait Connector: Send + Sync + 'static {
    /// Opens a connection to `addr` (`host:port`). It may take as long as the network needs;
    /// callers bound it with their connect timeout.
    async fn dial(&self, addr: &str) -> io::Result<Connection>;

    /// The IP addresses `host` (a name) stands for on this network, to compare with the IP a
    /// connection came from: `Ok(None)` when this network cannot tell (the default, for a
    /// network that names its hosts in its own way). A master uses it to check that a
    /// mirroring session comes from its slave's registered host.
    async fn resolve(&self, host: &str) -> io::Result<Option<Vec<IpAddr>>> {
        let _ = host;
        Ok(None)
    }
}

/// A cloneable handle on a [`Connector`]: how a component reaches its peers.
#[derive(Clone)]
pub struct Network {
    connector: Arc<dyn Connector>,
}

impl fmt::Debug for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Network").finish_non_exhaustive()
    }
}

impl Network {
    /// A network that dials through `connector`.
    pub fn new(connector: impl Connector) -> Self {
        Self {
            connector: Arc::new(connector),
        }
    }

    /// The operating system's TCP network (see [`tcp`]).
    pub fn tcp() -> Self {
        Self::new(tcp::TcpConnector)
    }

    /// Opens a raw connection to `addr`.
    pub async fn dial(&self, addr: &str) -> io::Result<Connection> {
        self.connector.dial(addr).await
    }

    /// The IP addresses `host` stands for on this network (see [`Connector::resolve`]).
    pub async fn resolve(&self, host: &str) -> io::Result<Option<Vec<IpAddr>>> {
        self.connector.resolve(host).await
    }

    /// Connects to the gRPC endpoint at `addr` (`host:port`) now, failing after
    /// [`CONNECT_TIMEOUT`] with [`Error::Unreachable`].
    pub async fn connect(&self, addr: &str) -> Result<Channel> {
        let endpoint = self.endpoint(addr, CONNECT_TIMEOUT)?;
        endpoint
            .connect_with_connector(self.dialer(addr))
            .await
            .map_err(|e| unreachable(addr, innermost(&e)))
    }

    /// A channel to `addr` that connects on first use (and reconnects after a broken
    /// connection), each attempt bounded by [`CONNECT_TIMEOUT`].
    pub fn channel(&self, addr: &str) -> Result<Channel> {
        self.channel_with_timeout(addr, CONNECT_TIMEOUT)
    }

    /// Like [`Network::channel`], with another bound on each connection attempt.
    pub fn channel_with_timeout(&self, addr: &str, connect_timeout: Duration) -> Result<Channel> {
        let endpoint = self.endpoint(addr, connect_timeout)?;
        Ok(endpoint.connect_with_connector_lazy(self.dialer(addr)))
    }

    fn endpoint(&self, addr: &str, connect_timeout: Duration) -> Result<Endpoint> {
        Ok(Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| unreachable(addr, format!("bad address: {e}")))?
            .connect_timeout(connect_timeout)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT))
    }

    fn dialer(&self, addr: &str) -> Dialer {
        Dialer {
            connector: Arc::clone(&self.connector),
            addr: Arc::from(addr),
        }
    }
}

fn unreachable(addr: &str, reason: String) -> Error {
    Error::Unreachable {
        addr: addr.to_string(),
        reason,
    }
}

/// Why a connection failed, in a sentence about the peer rather than the transport: "nothing
/// is listening there" instead of "tcp connect error: Connection refused (os error 111)", "it
/// does not speak the Tiny SNS protocol" instead of "h2 protocol error: frame with invalid
/// size". Falls back to the most specific message in the error's chain.
pub(crate) fn innermost(error: &(dyn std::error::Error + 'static)) -> String {
    let mut reason = error.to_string();
    let mut texts = reason.to_ascii_lowercase();
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(inner) = next {
        if let Some(io) = inner.downcast_ref::<io::Error>() {
            match io.kind() {
                io::ErrorKind::ConnectionRefused => {
                    return "nothing is listening there (connection refused)".to_string();
                }
                io::ErrorKind::TimedOut => return NO_ANSWER.to_string(),
                io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                    return "the network cannot reach it".to_string();
                }
                io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted => return CLOSED.to_string(),
                _ => {}
            }
        }
        reason = inner.to_string();
        texts.push(' ');
        texts.push_str(&reason.to_ascii_lowercase());
        next = inner.source();
    }
    // Without a typed error, the transport's words are all there is to go by.
    if texts.contains("timed out") || texts.contains("deadline") {
        NO_ANSWER.to_string()
    } else if ["h2 ", "http2", "frame", "protocol error", "preface"]
        .iter()
        .any(|word| texts.contains(word))
    {
        "it does not speak the Tiny SNS protocol (is that the right port?)".to_string()
    } else if [
        "connection closed",
        "connection reset",
        "broken pipe",
        "stream closed",
        // The peer answered the handshake with something else and hung up.
        "connection was not ready",
    ]
    .iter()
    .any(|words| texts.contains(words))
    {
        CLOSED.to_string()
    } else if texts.contains("lookup") || texts.contains("resolve") || texts.contains("dns") {
        "its host name could not be resolved".to_string()
    } else {
        reason
    }
}

/// A peer that closed the connection without an answer (the client may have sent part of its
/// request: a broken pipe or a reset say the same).
const CLOSED: &str = "it closed the connection without answering (a server at its connection \
                      limit does that; otherwise, is that the right port?)";

/// A peer that accepted the connection and never answered.
const NO_ANSWER: &str = "it accepted the connection but did not answer in time";

/// A serving-side builder with this module's HTTP/2 keepalive.
pub fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
}

/// The tower service tonic calls for each (re)connection of a channel: dials the channel's
/// one address through the connector.
#[derive(Clone)]
struct Dialer {
    connector: Arc<dyn Connector>,
    addr: Arc<str>,
}

type Dialing = Pin<Box<dyn Future<Output = io::Result<TokioIo<Connection>>> + Send>>;

impl tower_service::Service<Uri> for Dialer {
    type Response = TokioIo<Connection>;
    type Error = io::Error;
    type Future = Dialing;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Dialing {
        let connector = Arc::clone(&self.connector);
        let addr = Arc::clone(&self.addr);
        Box::pin(async move { Ok(TokioIo::new(connector.dial(&addr).await?)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Words(&'static str);

    impl std::fmt::Display for Words {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Words {}

    #[test]
    fn a_closed_connection_is_said_plainly_however_the_transport_words_it() {
        for kind in [
            io::ErrorKind::BrokenPipe,
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::ConnectionAborted,
        ] {
            assert_eq!(innermost(&io::Error::from(kind)), CLOSED, "{kind:?}");
        }
        for words in [
            "stream closed because of a broken pipe",
            "connection closed before message completed",
            "connection reset by peer",
            "connection was not ready",
        ] {
            assert_eq!(innermost(&Words(words)), CLOSED, "{words}");
        }
        assert_eq!(
            innermost(&io::Error::from(io::ErrorKind::ConnectionRefused)),
            "nothing is listening there (connection refused)"
        );
    }
}
