//! Starting a server as a deployment's node: opening its data directory and joining the
//! coordinator, the same way for the `tsd` binary and for an in-process [`Deployment`].
//!
//! Invariant: a server that is part of a deployment starts as a slave and mirrors until the
//! coordinator names it master; a server alone is master at once.
//!
//! [`Deployment`]: crate::Deployment

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::server::{CoordinatorLink, Server, ServerConfig};
use crate::storage::{FileStorage, FileStorageOptions, Storage};
use crate::transport::Network;

/// Opens the log in `dir` (creating it), with errors that name the directory. Damage found in
/// the log is [`Error::Corrupt`]; with `repair`, the damage and everything after it are
/// dropped instead.
pub fn open_data_dir(dir: &Path, repair: bool) -> Result<FileStorage> {
    let options = FileStorageOptions {
        repair,
        ..FileStorageOptions::default()
    };
    FileStorage::open_with(dir, options).map_err(|e| match e {
        Error::Corrupt(why) => Error::Corrupt(format!("data directory {}: {why}", dir.display())),
        e => Error::StorageFailed(format!("cannot open data directory {}: {e}", dir.display())),
    })
}

/// How long a mirroring stream may stay silent before it counts as dead: as long as the
/// coordinator waits for a server's heartbeats.
pub fn mirror_timeout(heartbeat_interval: Duration, missed_heartbeats: u32) -> Duration {
    heartbeat_interval * missed_heartbeats.max(1)
}

/// Recovers a server from `storage` and, given a coordinator `link`, joins the deployment on
/// `network` (as a slave until the coordinator names it master); without one, it is a
/// standalone master.
pub async fn start_server(
    config: ServerConfig,
    storage: Arc<dyn Storage>,
    link: Option<(CoordinatorLink, Network)>,
) -> Result<Server> {
    match link {
        Some((link, network)) => {
            let server = Server::open_replica(config, storage).await?;
            server.join(link, network);
            Ok(server)
        }
        None => Server::open(config, storage).await,
    }
}
