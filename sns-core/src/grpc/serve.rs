//! Serving: each process's gRPC services on a listener, with one rule for stopping.
//!
//! Invariant: once a process stops, open connections get [`SHUTDOWN_GRACE`] to finish; a peer
//! that neither reads nor closes (or sits behind a partition) does not hold the stop longer.
//! The server, the coordinator and the gRPC synchronizer all stop through [`until_stopped`].

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::coordinator::Coordinator;
use crate::error::{Error, Result};
use crate::server::Server;
use crate::transport::{ConnectionLimits, Listener};

/// How long a stopping process waits for open connections to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Runs `serving` until it ends, or until [`SHUTDOWN_GRACE`] after `stopped` is cancelled.
/// `what` names the service in the error of a transport that failed.
pub(crate) async fn until_stopped(
    serving: impl Future<Output = std::result::Result<(), tonic::transport::Error>>,
    stopped: &CancellationToken,
    what: &str,
) -> Result<()> {
    tokio::select! {
        result = serving => {
            result.map_err(|e| Error::ConnectionLost(format!("{what} transport failed: {e}")))
        }
        () = async {
            stopped.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("{what}: connections still open after {SHUTDOWN_GRACE:?}; closing them");
            Ok(())
        }
    }
}

impl Server {
    /// Serves the client-facing gRPC services (`csce438.SNSService` and its `csce662` alias),
    /// the replication service and the log service on `listener` until `shutdown` is
    /// cancelled, then stops every task of this server and returns once they have all finished.
    pub async fn serve(&self, listener: Listener, shutdown: CancellationToken) -> Result<()> {
        let routes = super::sns::routes(self.clone())
            .add_service(super::replication::service(self.clone()))
            .add_service(super::log::service(self.clone()));
        let (_, own) = self.tasks();
        let own = own.clone();
        let stop = {
            let own = own.clone();
            async move {
                tokio::select! {
                    () = shutdown.cancelled() => {},
                    () = own.cancelled() => {},
                }
                // Timeline and mirroring streams are endless: end them so the graceful stop
                // can complete.
                own.cancel();
            }
        };
        let config = self.config();
        let listener = listener.limited(ConnectionLimits {
            max_connections: config.max_connections.max(1),
            handshake_timeout: config.handshake_timeout,
        });
        // HTTP/2 windows are at most 2^31 - 1 bytes (the library asserts it).
        let window = |bytes: u32| bytes.clamp(1, (1 << 31) - 1);
        let serving = crate::transport::server_builder()
            .max_concurrent_streams(Some(config.max_concurrent_streams))
            .initial_stream_window_size(Some(window(config.stream_window)))
            .initial_connection_window_size(Some(window(config.connection_window)))
            .add_routes(routes)
            .serve_with_incoming_shutdown(listener, stop);
        let result = until_stopped(serving, &own, "server").await;
        self.close().await;
        result
    }
}

impl Coordinator {
    /// Serves the coordinator (`csce438.CoordService`, its `csce662` alias, and
    /// `sns.v1.Admin`) on `listener` until `shutdown` is cancelled.
    pub async fn serve(&self, listener: Listener, shutdown: CancellationToken) -> Result<()> {
        let serving = crate::transport::server_builder()
            .add_routes(super::coord::routes(self.clone()))
            .serve_with_incoming_shutdown(listener, shutdown.clone().cancelled_owned());
        until_stopped(serving, &shutdown, "coordinator").await
    }
}
