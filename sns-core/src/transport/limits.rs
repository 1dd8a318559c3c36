//! Bounds on a serving listener's connections: how many may be open at once, and how long a new
//! one may take to start speaking HTTP/2.
//!
//! A connection accepted while [`ConnectionLimits::max_connections`] are open is closed at
//! once (the client sees the connection closed, not a hang); open connections are not
//! disturbed. A connection that has not sent its HTTP/2 preface and first frame (its
//! `SETTINGS`) within [`ConnectionLimits::handshake_timeout`] is closed: a socket that connects
//! and says nothing holds no slot for long. After the handshake, HTTP/2 keepalive pings close a
//! peer that went silent.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_stream::Stream;

use super::{Connection, Listener};

/// What an HTTP/2 client sends first (RFC 9113 §3.4), before its first frame.
const PREFACE_LEN: usize = 24;

/// Length of an HTTP/2 frame header.
const FRAME_HEADER_LEN: usize = 9;

/// The bounds [`Listener::limited`] applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Most connections open at once; one accepted beyond it is closed at once.
    pub max_connections: usize,
    /// How long a new connection may take to send its HTTP/2 preface and first frame.
    pub handshake_timeout: Duration,
}

impl Listener {
    /// This listener with `limits` applied to the connections it yields (see the module
    /// documentation). Each connection holds its slot until it is dropped.
    pub fn limited(self, limits: ConnectionLimits) -> Listener {
        let addr = self.addr().to_string();
        let incoming = Limited {
            inner: self,
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            refused: Refusals::new(),
        };
        Listener::new(addr, incoming)
    }
}

struct Limited {
    inner: Listener,
    slots: Arc<Semaphore>,
    limits: ConnectionLimits,
    refused: Refusals,
}

impl Stream for Limited {
    type Item = io::Result<Connection>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            let connection = match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
                Some(Ok(connection)) => connection,
                other => return Poll::Ready(other),
            };
            match Arc::clone(&this.slots).try_acquire_owned() {
                Ok(slot) => {
                    let info = connection.info().clone();
                    let guarded = Guarded {
                        inner: connection,
                        _slot: slot,
                        handshake: Some(Handshake::new(this.limits.handshake_timeout)),
                    };
                    return Poll::Ready(Some(Ok(Connection::new(guarded, info))));
                }
                Err(_) => {
                    this.refused.note(&format!(
                        "{} connections are open, the limit",
                        this.limits.max_connections
                    ));
                    // Dropped: closed at once.
                }
            }
        }
    }
}

/// Counts refused connections and logs them at most once every [`Refusals::EVERY`], so a
/// flood of connections cannot flood the log.
pub(crate) struct Refusals {
    count: u64,
    last_log: Option<Instant>,
}

impl Refusals {
    const EVERY: Duration = Duration::from_secs(10);

    pub(crate) fn new() -> Self {
        Self {
            count: 0,
            last_log: None,
        }
    }

    /// Counts one refused connection, refused because of `why`.
    pub(crate) fn note(&mut self, why: &str) {
        self.count += 1;
        let now = Instant::now();
        if self
            .last_log
            .is_none_or(|last| now.saturating_duration_since(last) >= Self::EVERY)
        {
            tracing::warn!(
                "refusing new connections: {why} ({} refused since the last warning)",
                self.count
            );
            self.count = 0;
            self.last_log = Some(now);
        }
    }
}

/// An accepted connection holding its slot, and watching its handshake until it is done.
struct Guarded {
    inner: Connection,
    _slot: OwnedSemaphorePermit,
    /// `None` once the handshake is complete.
    handshake: Option<Handshake>,
}

/// A client's HTTP/2 handshake under way, and when it must be done.
struct Handshake {
    deadline: Pin<Box<Sleep>>,
    progress: Preface,
}

impl Handshake {
    fn new(timeout: Duration) -> Self {
        Self {
            deadline: Box::pin(tokio::time::sleep(timeout)),
            progress: Preface::default(),
        }
    }
}

/// Progress of a client's HTTP/2 handshake: the preface, then one whole frame (its
/// `SETTINGS`).
#[derive(Debug, Default)]
struct Preface {
    /// Bytes read so far.
    read: usize,
    /// The first frame's header, as far as read.
    header: [u8; FRAME_HEADER_LEN],
}

impl Preface {
    /// Takes note of `bytes`, the next ones read; returns whether the handshake is complete.
    fn saw(&mut self, bytes: &[u8]) -> bool {
        for (offset, byte) in bytes.iter().enumerate() {
            let at = self.read + offset;
            if let Some(slot) = at
                .checked_sub(PREFACE_LEN)
                .and_then(|i| self.header.get_mut(i))
            {
                *slot = *byte;
            }
        }
        self.read += bytes.len();
        if self.read < PREFACE_LEN + FRAME_HEADER_LEN {
            return false;
        }
        let [a, b, c, ..] = self.header;
        let payload = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
        self.read >= PREFACE_LEN + FRAME_HEADER_LEN + payload
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let Some(handshake) = &mut this.handshake else {
            return polled;
        };
        match polled {
            Poll::Ready(Ok(())) => {
                if handshake.progress.saw(&buf.filled()[before..]) {
                    this.handshake = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match handshake.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    tracing::debug!(
                        peer = %this.inner.info().peer,
                        "closing a connection that did not complete its HTTP/2 handshake in time"
                    );
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the HTTP/2 handshake did not complete in time",
                    )))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;

    use super::*;
    use crate::transport::MemoryNetwork;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    #[test]
    fn the_handshake_is_the_preface_and_one_whole_frame() {
        // A SETTINGS frame with one 6-byte setting.
        let mut bytes = PREFACE.to_vec();
        bytes.extend_from_slice(&[0, 0, 6, 4, 0, 0, 0, 0, 0]);
        bytes.extend_from_slice(&[0, 3, 0, 0, 0, 100]);
        for split in 0..bytes.len() {
            let mut preface = Preface::default();
            let (a, b) = bytes.split_at(split);
            assert!(!preface.saw(a), "done after {split} bytes");
            assert!(preface.saw(b), "not done after all bytes (split {split})");
        }
        let mut preface = Preface::default();
        assert!(!preface.saw(&bytes[..bytes.len() - 1]));
    }

    fn limits(max_connections: usize) -> ConnectionLimits {
        ConnectionLimits {
            max_connections,
            handshake_timeout: Duration::from_secs(10),
        }
    }

    #[tokio::test]
    async fn a_connection_beyond_the_limit_is_closed_and_a_freed_slot_is_reused() {
        let memory = MemoryNetwork::new();
        let mut listener = memory.bind("server:1").expect("bind").limited(limits(1));
        let client = memory.node("client");
        let mut first = client.dial("server:1").await.expect("dial");
        let mut accepted = listener.next().await.expect("accepted").expect("ok");
        // The second is accepted by the network and closed by the limit: its reader sees the
        // end of the stream.
        let mut second = client.dial("server:1").await.expect("dial");
        let mut third = client.dial("server:1").await.expect("dial");
        let mut byte = [0u8; 1];
        let pending = tokio::spawn(async move {
            let mut listener = listener;
            let next = listener.next().await;
            (listener, next)
        });
        assert_eq!(second.read(&mut byte).await.expect("eof"), 0);
        assert_eq!(third.read(&mut byte).await.expect("eof"), 0);
        // The first still works both ways.
        first.write_all(b"x").await.expect("write");
        accepted.read_exact(&mut byte).await.expect("read");
        assert_eq!(&byte, b"x");
        drop(third);
        drop((first, accepted));
        let mut fourth = client.dial("server:1").await.expect("dial");
        let (_listener, next) = pending.await.expect("task");
        let mut accepted = next.expect("accepted").expect("ok");
        fourth.write_all(b"y").await.expect("write");
        accepted.read_exact(&mut byte).await.expect("read");
        assert_eq!(&byte, b"y");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_closed_at_the_handshake_deadline() {
        let memory = MemoryNetwork::new();
        let mut listener = memory.bind("server:1").expect("bind").limited(limits(4));
        let client = memory.node("client");
        let _silent = client.dial("server:1").await.expect("dial");
        let mut accepted = listener.next().await.expect("accepted").expect("ok");
        let started = Instant::now();
        let mut byte = [0u8; 1];
        let error = accepted.read(&mut byte).await.expect_err("timed out");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_completed_handshake_lifts_the_deadline() {
        let memory = MemoryNetwork::new();
        let mut listener = memory.bind("server:1").expect("bind").limited(limits(4));
        let client = memory.node("client");
        let mut talker = client.dial("server:1").await.expect("dial");
        let mut accepted = listener.next().await.expect("accepted").expect("ok");
        let mut hello = PREFACE.to_vec();
        hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        talker.write_all(&hello).await.expect("write");
        let mut read = vec![0u8; hello.len()];
        accepted.read_exact(&mut read).await.expect("read");
        // Well past the deadline, the connection still carries bytes.
        tokio::time::sleep(Duration::from_secs(60)).await;
        talker.write_all(b"z").await.expect("write");
        let mut byte = [0u8; 1];
        accepted.read_exact(&mut byte).await.expect("read");
        assert_eq!(&byte, b"z");
    }
}
