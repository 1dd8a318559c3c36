//! The operating system's TCP network, used by the binaries.
//!
//! Every socket gets `TCP_NODELAY`, accepted ones included: tonic's own `tcp_nodelay` setting
//! does not reach connections served through `serve_with_incoming`, so [`bind`] sets it on each
//! accepted socket itself (without it, small replies wait on Nagle's algorithm: 5x latency).

use std::io;

use tokio::net::{TcpListener, TcpStream};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;

use super::{Connection, ConnectionInfo, Connector, Listener};
use crate::error::{Error, Result};

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
    let incoming = TcpListenerStream::new(listener).map({
        let local = local.clone();
        move |accepted| accepted.map(|stream| connection(stream, &local))
    });
    Ok(Listener::new(local, incoming))
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
