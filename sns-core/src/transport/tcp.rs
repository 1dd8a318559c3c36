//! The operating system's TCP network, used by the binaries.
//!
//! Every socket gets `TCP_NODELAY`, accepted ones included: tonic's own `tcp_nodelay` setting
//! does not reach connections served through `serve_with_incoming`, so [`bind`] sets it on each
//! accepted socket itself (without it, small replies wait on Nagle's algorithm: 5x latency).
//!
//! Running out of file descriptors does not stop a listener, nor make it spin: it keeps one
//! spare descriptor, and when an accept fails for want of descriptors it closes the spare,
//! accepts the waiting connection, closes it at once (the client sees it refused rather than
//! left hanging in the backlog) and takes the spare back. Open connections are not disturbed.

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tokio_stream::Stream;

use super::limits::Refusals;
use super::{Connection, ConnectionInfo, Connector, Listener};
use crate::error::{Error, Result};

/// How long a listener waits before accepting again when it is out of file descriptors and
/// has no spare one to refuse connections with.
const OUT_OF_DESCRIPTORS_PAUSE: Duration = Duration::from_millis(100);

/// Binds a TCP listener on `addr` (`host:port`; port 0 lets the system choose). A port in use
/// is reported in one line naming the port.
pub async fn bind(addr: &str) -> Result<Listener> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        let port = super::split_addr(addr).map_or_else(|| addr.to_string(), |(_, p)| p.to_string());
        if e.kind() == io::ErrorKind::AddrInUse {
            Error::Unavailable(format!("port {port} is already in use"))
        } else {
            Error::Unavailable(format!("cannot listen on {addr}: {e}"))
        }
    })?;
    listen(listener)
}

/// Serves an already bound TCP listener as a [`Listener`].
pub fn listen(listener: TcpListener) -> Result<Listener> {
    let local = listener.local_addr()?.to_string();
    let incoming = Accepting {
        listener,
        local: local.clone(),
        spare: spare_descriptor(),
        pause: None,
        refused: Refusals::new(),
    };
    Ok(Listener::new(local, incoming))
}

/// A descriptor held in reserve, to be closed when accepting fails for want of one.
fn spare_descriptor() -> Option<File> {
    File::open("/dev/null").ok()
}

/// Whether `error` says the process or the system ran out of file descriptors (`EMFILE`,
/// `ENFILE`: 24 and 23 on Linux and the BSDs).
fn out_of_descriptors(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(23 | 24))
}

/// A TCP listener's accepted connections (see the module documentation).
struct Accepting {
    listener: TcpListener,
    local: String,
    spare: Option<File>,
    /// Set while waiting to accept again, out of descriptors without a spare.
    pause: Option<Pin<Box<Sleep>>>,
    refused: Refusals,
}

impl Stream for Accepting {
    type Item = io::Result<Connection>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(pause) = &mut this.pause {
                std::task::ready!(pause.as_mut().poll(cx));
                this.pause = None;
            }
            let error = match std::task::ready!(this.listener.poll_accept(cx)) {
                Ok((stream, _)) => return Poll::Ready(Some(Ok(connection(stream, &this.local)))),
                Err(e) => e,
            };
            if !out_of_descriptors(&error) {
                // One failed accept (e.g. a connection reset while queued), not the end.
                return Poll::Ready(Some(Err(error)));
            }
            match this.spare.take() {
                Some(spare) => {
                    drop(spare);
                    if let Poll::Ready(Ok((stream, _))) = this.listener.poll_accept(cx) {
                        drop(stream);
                        this.refused
                            .note(&format!("out of file descriptors ({error})"));
                    }
                    this.spare = spare_descriptor();
                }
                None => {
                    this.refused
                        .note(&format!("out of file descriptors ({error})"));
                    this.spare = spare_descriptor();
                    this.pause = Some(Box::pin(tokio::time::sleep(OUT_OF_DESCRIPTORS_PAUSE)));
                }
            }
        }
    }
}

/// The process's limit on open file descriptors (the soft `RLIMIT_NOFILE`, as
/// `/proc/self/limits` shows it); `None` where that cannot be read (other systems) or there is
/// no limit.
pub fn descriptor_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_descriptor_limit(&limits)
}

fn parse_descriptor_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Sets the options every socket of this network carries (`TCP_NODELAY`).
pub fn configure(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)
}

/// Configures `stream` and wraps it; a socket that refuses an option still works (slower), so
/// that is logged rather than fatal.
fn connection(stream: TcpStream, local: &str) -> Connection {
    if let Err(e) = configure(&stream) {
        tracing::warn!("cannot set TCP_NODELAY on a connection: {e}");
    }
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "unknown".to_string(), |a| a.to_string());
    let info = ConnectionInfo {
        local: local.to_string(),
        peer,
        nodelay: stream.nodelay().ok(),
    };
    Connection::new(stream, info)
}

/// Dials TCP addresses (`host:port`, resolved by the system).
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpConnector;

#[async_trait::async_trait]
impl Connector for TcpConnector {
    async fn dial(&self, addr: &str) -> io::Result<Connection> {
        let stream = TcpStream::connect(addr).await?;
        let local = stream
            .local_addr()
            .map_or_else(|_| "unknown".to_string(), |a| a.to_string());
        Ok(connection(stream, &local))
    }

    /// Through the system resolver, as [`TcpConnector::dial`] resolves names.
    async fn resolve(&self, host: &str) -> io::Result<Option<Vec<IpAddr>>> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let found = tokio::net::lookup_host((host, 0)).await?;
        Ok(Some(found.map(|a| a.ip().to_canonical()).collect()))
    }
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    use super::*;

    #[tokio::test]
    async fn accepted_and_dialled_sockets_have_nodelay() {
        let mut listener = bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.addr().to_string();
        let dialled = TcpConnector.dial(&addr).await.expect("dial");
        let accepted = listener
            .next()
            .await
            .expect("a connection")
            .expect("accepted");
        assert_eq!(dialled.info().nodelay, Some(true), "dialled");
        assert_eq!(accepted.info().nodelay, Some(true), "accepted");
        assert_eq!(accepted.info().local, addr);
    }

    #[tokio::test]
    async fn names_resolve_through_the_system_resolver_and_addresses_to_themselves() {
        let loopback = TcpConnector
            .resolve("localhost")
            .await
            .expect("localhost resolves")
            .expect("a TCP network resolves names");
        assert!(loopback.iter().all(IpAddr::is_loopback), "{loopback:?}");
        assert!(!loopback.is_empty());
        let literal = TcpConnector
            .resolve("[::ffff:10.0.0.2]")
            .await
            .expect("an address");
        assert_eq!(literal, Some(vec![IpAddr::from([10, 0, 0, 2])]));
    }

    #[test]
    fn the_descriptor_limit_is_the_soft_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_descriptor_limit(limits), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_descriptor_limit(unlimited), None);
        assert_eq!(parse_descriptor_limit(""), None);
    }

    #[tokio::test]
    async fn a_port_in_use_is_named_in_one_line() {
        let taken = bind("127.0.0.1:0").await.expect("bind");
        let port = taken.port().expect("port");
        let error = bind(&format!("127.0.0.1:{port}"))
            .await
            .expect_err("in use")
            .to_string();
        assert!(
            error.contains(&format!("port {port} is already in use")),
            "{error}"
        );
        assert!(!error.contains('\n'));
    }
}
