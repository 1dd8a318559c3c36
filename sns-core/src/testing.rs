//! Helpers for tests and embedders (feature `test-util`): start servers on port 0 and wait for
//! conditions without sleeping a fixed time.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::server::{Server, ServerConfig};
use crate::storage::Storage;

/// Polls `check` until it returns `true` or `timeout` passes; returns whether it held.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// A server serving on a loopback port chosen by the OS.
#[derive(Debug)]
pub struct TestServer {
    /// The server itself, for direct calls.
    pub server: Server,
    /// `127.0.0.1:<port>`.
    pub addr: String,
    shutdown: CancellationToken,
    serving: JoinHandle<Result<()>>,
}

impl TestServer {
    /// Opens a server on `storage` and serves it on `127.0.0.1:0`.
    pub async fn start(config: ServerConfig, storage: Arc<dyn Storage>) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let server = Server::open(config, storage).await?;
        let shutdown = CancellationToken::new();
        let serving = tokio::spawn({
            let server = server.clone();
            let shutdown = shutdown.clone();
            async move { server.serve(listener, shutdown).await }
        });
        Ok(Self {
            server,
            addr,
            shutdown,
            serving,
        })
    }

    /// Stops serving and waits until every task of the server has finished.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        self.serving
            .await
            .map_err(|e| crate::Error::Unavailable(format!("server task failed: {e}")))?
    }
}
