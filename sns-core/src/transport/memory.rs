//! An in-memory network: a whole deployment in one process with no sockets at all.
//!
//! A [`MemoryNetwork`] is a shared registry of listeners keyed by address (`node:port`).
//! [`MemoryNetwork::bind`] registers one; [`MemoryNetwork::node`] gives the [`Network`] a node
//! dials from, which connects the two ends with a `tokio::io::duplex` pipe.
//!
//! Partitions are a property of the network, per direction: while `A → B` is cut, bytes A writes
//! towards B do not arrive (A's writes pend, and B's reads of what A wrote earlier pend too),
//! and no new connection between A and B completes (a connection needs both directions, as
//! TCP's handshake does; the dialler's connect timeout decides when to give up). This holds
//! for connections opened before the cut as well. Nothing is dropped: when the direction is
//! healed every byte arrives, in order, so HTTP/2 resumes where it stopped. A connection's own
//! node never cuts itself.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use super::{Connection, ConnectionInfo, Connector, Listener, Network, split_addr};
use crate::error::{Error, Result};

/// Bytes a pipe buffers in each direction before the writer waits for the reader.
const PIPE_CAPACITY: usize = 256 * 1024;

/// Connections waiting to be accepted per listener before diallers wait.
const BACKLOG: usize = 128;

/// Ports handed out for `node:0`, as an operating system's ephemeral range.
const EPHEMERAL: std::ops::RangeInclusive<u16> = 49_152..=65_535;

/// A simulated network shared by every node in a process. Cheap to clone; clones are the same
/// network.
#[derive(Clone, Default)]
pub struct MemoryNetwork {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    /// Number of cut directions; zero lets reads and writes skip the lock.
    cuts: AtomicUsize,
}

#[derive(Default)]
struct State {
    /// Accept queues by address (`node:port`); a closed one is free to bind again.
    listeners: HashMap<String, mpsc::Sender<Connection>>,
    /// Cut directions: `from → {to}`.
    cut: HashMap<String, HashSet<String>>,
    /// Tasks waiting for a cut direction to heal.
    waiting: HashMap<(String, String), Vec<Waker>>,
    next_port: u16,
}

impl State {
    fn is_cut(&self, from: &str, to: &str) -> bool {
        self.cut.get(from).is_some_and(|to_set| to_set.contains(to))
    }

    fn is_bound(&self, addr: &str) -> bool {
        self.listeners.get(addr).is_some_and(|tx| !tx.is_closed())
    }
}

impl fmt::Debug for MemoryNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        let mut bound: Vec<&String> = state
            .listeners
            .iter()
            .filter(|(_, tx)| !tx.is_closed())
            .map(|(addr, _)| addr)
            .collect();
        bound.sort();
        let mut cut: Vec<(&String, &String)> = state
            .cut
            .iter()
            .flat_map(|(from, to)| to.iter().map(move |to| (from, to)))
            .collect();
        cut.sort();
        f.debug_struct("MemoryNetwork")
            .field("bound", &bound)
            .field("cut", &cut)
            .finish()
    }
}

impl MemoryNetwork {
    /// An empty network: nothing bound, nothing cut.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update completes before anything that could panic: a poisoned lock is usable.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts listening on `addr` (`node:port`; port 0 picks a free port). The address is
    /// taken until the listener is dropped.
    pub fn bind(&self, addr: &str) -> Result<Listener> {
        let (node, port) = split_addr(addr)
            .filter(|(node, _)| valid_node(node))
            .ok_or_else(|| Error::invalid(format!("{addr:?} is not a node:port address")))?;
        let mut state = self.lock();
        let addr = if port != 0 {
            if state.is_bound(addr) {
                return Err(Error::Unavailable(format!("port {port} is already in use")));
            }
            addr.to_string()
        } else {
            let free = EPHEMERAL.clone().count();
            let mut found = None;
            for _ in 0..free {
                if !EPHEMERAL.contains(&state.next_port) {
                    state.next_port = *EPHEMERAL.start();
                }
                let candidate = format!("{node}:{}", state.next_port);
                state.next_port = state.next_port.wrapping_add(1);
                if !state.is_bound(&candidate) {
                    found = Some(candidate);
                    break;
                }
            }
            found.ok_or_else(|| {
                Error::Unavailable(format!("no free port left on memory node {node}"))
            })?
        };
        let (tx, rx) = mpsc::channel(BACKLOG);
        state.listeners.insert(addr.clone(), tx);
        Ok(Listener::new(addr, ReceiverStream::new(rx).map(Ok)))
    }

    /// The network as seen from `node`: connections it dials come from that node, so cuts
    /// involving the node apply to them.
    pub fn node(&self, node: &str) -> Network {
        Network::new(MemoryConnector {
            network: self.clone(),
            node: Arc::from(node),
        })
    }

    /// Cuts the direction `from → to` (node names): bytes from `from` to `to` stall, new
    /// connections between them do not complete.
    pub fn cut(&self, from: &str, to: &str) {
        let mut state = self.lock();
        if state
            .cut
            .entry(from.to_string())
            .or_default()
            .insert(to.to_string())
        {
            self.inner.cuts.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Heals the direction `from → to`: stalled bytes flow again, in order.
    pub fn heal(&self, from: &str, to: &str) {
        let woken = {
            let mut state = self.lock();
            let removed = state
                .cut
                .get_mut(from)
                .is_some_and(|to_set| to_set.remove(to));
            if removed {
                self.inner.cuts.fetch_sub(1, Ordering::SeqCst);
            }
            state
                .waiting
                .remove(&(from.to_string(), to.to_string()))
                .unwrap_or_default()
        };
        woken.into_iter().for_each(Waker::wake);
    }

    /// Cuts both directions between `a` and `b`.
    pub fn partition(&self, a: &str, b: &str) {
        self.cut(a, b);
        self.cut(b, a);
    }

    /// Heals both directions between `a` and `b`.
    pub fn repair(&self, a: &str, b: &str) {
        self.heal(a, b);
        self.heal(b, a);
    }

    /// Heals every cut.
    pub fn heal_all(&self) {
        let woken: Vec<Waker> = {
            let mut state = self.lock();
            state.cut.clear();
            self.inner.cuts.store(0, Ordering::SeqCst);
            state.waiting.drain().flat_map(|(_, w)| w).collect()
        };
        woken.into_iter().for_each(Waker::wake);
    }

    /// Whether the direction `from → to` is cut.
    pub fn is_cut(&self, from: &str, to: &str) -> bool {
        self.lock().is_cut(from, to)
    }

    /// Ready when `from → to` is not cut; otherwise registers the task to be woken on heal.
    fn poll_open(&self, from: &str, to: &str, cx: &mut Context<'_>) -> Poll<()> {
        if self.inner.cuts.load(Ordering::SeqCst) == 0 {
            return Poll::Ready(());
        }
        let mut state = self.lock();
        if !state.is_cut(from, to) {
            return Poll::Ready(());
        }
        let wakers = state
            .waiting
            .entry((from.to_string(), to.to_string()))
            .or_default();
        if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
            wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }

    async fn dial(&self, from: &Arc<str>, addr: &str) -> io::Result<Connection> {
        let (node, _) = split_addr(addr).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{addr:?} is not a node:port address"),
            )
        })?;
        let node: Arc<str> = Arc::from(node);
        // A connection needs both directions; a cut one stalls the handshake.
        std::future::poll_fn(|cx| {
            let there = self.poll_open(from, &node, cx);
            let back = self.poll_open(&node, from, cx);
            if there.is_ready() && back.is_ready() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        let refused = || {
            io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("nothing listens on {addr}"),
            )
        };
        let queue = self
            .lock()
            .listeners
            .get(addr)
            .filter(|tx| !tx.is_closed())
            .cloned()
            .ok_or_else(refused)?;
        let (near, far) = tokio::io::duplex(PIPE_CAPACITY);
        let dialled = Connection::new(
            MemoryStream {
                pipe: near,
                local: Arc::clone(from),
                peer: Arc::clone(&node),
                network: self.clone(),
            },
            ConnectionInfo {
                local: from.to_string(),
                peer: addr.to_string(),
                nodelay: None,
            },
        );
        let accepted = Connection::new(
            MemoryStream {
                pipe: far,
                local: node,
                peer: Arc::clone(from),
                network: self.clone(),
            },
            ConnectionInfo {
                local: addr.to_string(),
                peer: from.to_string(),
                nodelay: None,
            },
        );
        queue.send(accepted).await.map_err(|_| refused())?;
        Ok(dialled)
    }
}

fn valid_node(node: &str) -> bool {
    !node.is_empty()
        && node
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// Dials from one node of a [`MemoryNetwork`].
struct MemoryConnector {
    network: MemoryNetwork,
    node: Arc<str>,
}

#[async_trait::async_trait]
impl Connector for MemoryConnector {
    async fn dial(&self, addr: &str) -> io::Result<Connection> {
        self.network.dial(&self.node, addr).await
    }

    /// Nodes are named, never numbered: a name stands for no IP address here (a connection's
    /// peer is the dialling node's name).
    async fn resolve(&self, _host: &str) -> io::Result<Option<Vec<IpAddr>>> {
        Ok(Some(Vec::new()))
    }
}

/// One end of a memory connection: a pipe that pends while its direction is cut.
struct MemoryStream {
    pipe: DuplexStream,
    local: Arc<str>,
    peer: Arc<str>,
    network: MemoryNetwork,
}

impl AsyncRead for MemoryStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Bytes the peer wrote before a cut are still on the wire: they wait too.
        if self
            .network
            .poll_open(&self.peer, &self.local, cx)
            .is_pending()
        {
            return Poll::Pending;
        }
        Pin::new(&mut self.pipe).poll_read(cx, buf)
    }
}

impl AsyncWrite for MemoryStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self
            .network
            .poll_open(&self.local, &self.peer, cx)
            .is_pending()
        {
            return Poll::Pending;
        }
        Pin::new(&mut self.pipe).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self
            .network
            .poll_open(&self.local, &self.peer, cx)
            .is_pending()
        {
            return Poll::Pending;
        }
        Pin::new(&mut self.pipe).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self
            .network
            .poll_open(&self.local, &self.peer, cx)
            .is_pending()
        {
            return Poll::Pending;
        }
        Pin::new(&mut self.pipe).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn pair(network: &MemoryNetwork) -> (Connection, Connection) {
        let mut listener = network.bind("b:7").expect("bind");
        let dialled = network.node("a").dial("b:7").await.expect("dial");
        let accepted = listener
            .next()
            .await
            .expect("a connection")
            .expect("accepted");
        (dialled, accepted)
    }

    #[tokio::test]
    async fn a_dialled_connection_is_accepted_and_carries_bytes_both_ways() {
        let network = MemoryNetwork::new();
        let (mut a, mut b) = pair(&network).await;
        assert_eq!(a.info().peer, "b:7");
        assert_eq!(b.info().local, "b:7");
        assert_eq!(b.info().peer, "a");
        assert_eq!(a.info().nodelay, None);
        a.write_all(b"ping").await.expect("write");
        let mut got = [0u8; 4];
        b.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"ping");
        b.write_all(b"pong").await.expect("write");
        a.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"pong");
    }

    #[tokio::test]
    async fn an_unknown_address_is_refused_at_once() {
        let network = MemoryNetwork::new();
        let error = network
            .node("a")
            .dial("nobody:1")
            .await
            .expect_err("refused");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
        // A dropped listener frees its address: dialling it is refused, binding it works.
        drop(network.bind("b:7").expect("bind"));
        let error = network.node("a").dial("b:7").await.expect_err("refused");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
        let _again = network.bind("b:7").expect("bind again");
        assert!(network.bind("b:7").is_err(), "the port is in use");
    }

    #[tokio::test]
    async fn port_zero_picks_distinct_free_ports() {
        let network = MemoryNetwork::new();
        let one = network.bind("n:0").expect("bind");
        let two = network.bind("n:0").expect("bind");
        assert_ne!(one.addr(), two.addr());
        assert!(one.port().is_some_and(|p| p != 0));
        assert!(network.bind("bad name:1").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_stalls_one_direction_and_healing_delivers_every_byte_in_order() {
        let network = MemoryNetwork::new();
        let (a, mut b) = pair(&network).await;
        let (mut a_reads, mut a_writes) = tokio::io::split(a);
        // Something already in flight when the cut happens waits with the rest.
        a_writes.write_all(b"early").await.expect("write");
        network.cut("a", "b");
        assert!(network.is_cut("a", "b") && !network.is_cut("b", "a"));
        let payload: Vec<u8> = (0..3 * PIPE_CAPACITY).map(|i| (i % 251) as u8).collect();
        let writer = tokio::spawn({
            let payload = payload.clone();
            async move { a_writes.write_all(&payload).await }
        });
        let mut first = [0u8; 1];
        assert!(
            tokio::time::timeout(Duration::from_secs(60), b.read(&mut first))
                .await
                .is_err(),
            "nothing crosses a cut direction"
        );
        assert!(!writer.is_finished(), "the writer waits for the heal");
        // The other direction still works.
        b.write_all(b"back").await.expect("write");
        let mut back = [0u8; 4];
        a_reads.read_exact(&mut back).await.expect("read");
        assert_eq!(&back, b"back");
        network.heal("a", "b");
        let mut got = vec![0u8; 5 + payload.len()];
        b.read_exact(&mut got).await.expect("read after heal");
        assert_eq!(&got[..5], b"early");
        assert_eq!(&got[5..], &payload[..], "no byte lost or reordered");
        writer.await.expect("writer").expect("written");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_blocks_new_connections_until_healed() {
        let network = MemoryNetwork::new();
        let mut listener = network.bind("b:7").expect("bind");
        network.cut("b", "a");
        // The reply direction alone is enough to stop a handshake.
        let a = network.node("a");
        assert!(
            tokio::time::timeout(Duration::from_secs(60), a.dial("b:7"))
                .await
                .is_err(),
            "no connection across a cut"
        );
        let refused = a.connect("b:7").await.expect_err("connect timeout");
        assert!(matches!(refused, Error::Unreachable { .. }), "{refused:?}");
        // Other nodes are unaffected.
        network.node("c").dial("b:7").await.expect("c dials");
        network.heal("b", "a");
        a.dial("b:7").await.expect("dial after heal");
        let mut accepted = 0;
        while accepted < 2 {
            listener.next().await.expect("connection").expect("ok");
            accepted += 1;
        }
    }
}
