//! The gRPC transport, the course's first synchronizer design: synchronizers talk to each
//! other. Each one serves `sns.v1.Sync.Subscribe` for its own cluster's committed events,
//! registers with the coordinator and heartbeats as a synchronizer, and for every other
//! cluster finds a live synchronizer of that cluster (`GetSyncServers`) and subscribes to it.
//!
//! Invariants:
//! - **Only committed events leave a cluster.** A `Subscribe` stream is the cluster's
//!   `Log.OwnEvents` stream passed on: committed events with consecutive sequence numbers,
//!   read from the current master and riding out its failovers.
//! - **Signed.** With a cluster token every message of a `Subscribe` stream is a batch signed
//!   with the deployment's key ([`seal`](super::seal)); a subscriber checks it before decoding,
//!   and a missing or bad MAC ends the subscription (logged at error level and counted in
//!   [`SyncRefusals`](super::SyncRefusals)) before anything of it is applied.
//! - **Resume, never skip.** A subscriber subscribes after its cluster's committed high-water
//!   mark for the origin, applies what arrives (the master drops duplicates and refuses holes),
//!   and after any fault (a synchronizer restart, a failover on either side, a dropped
//!   connection) subscribes again from the new high-water mark, to whichever live synchronizer
//!   of the origin the coordinator lists then.
//! - **Bounded.** A stream holds a few messages for its subscriber; a slow subscriber slows its
//!   own stream (its events wait in the origin's log), not the other streams or the writers.
//! - **One run per bus.** A [`GrpcBus`] owns its listener and hands it to the first
//!   [`SyncTransport::run`]; a second run fails. A restarted synchronizer gets a new bus.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sns_proto::csce438::{NodeRole, ServerInfo};
use tokio_util::task::TaskTracker;

use super::pull::{Source, Subscription, pull};
use super::service::{SyncPeer, sync_service};
use super::{ClusterLink, EncodedBatch, SyncTransport, cluster_of_synchronizer};
use crate::error::{Error, Result};
use crate::event::Event;
use crate::grpc::log::from_status;
use crate::ids::ClusterId;
use crate::transport::{Listener, address, split_addr};

/// First pause before asking the coordinator again for another cluster's synchronizers.
const FIRST_LOOKUP_RETRY: Duration = Duration::from_millis(20);

/// Settings of a [`GrpcBus`].
///
/// Non-exhaustive, so that fields can be added later: build it with [`GrpcBusOptions::new`] and set
/// the fields you need.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GrpcBusOptions {
    /// The synchronizer's id at the coordinator; it serves cluster `((id - 1) % N) + 1`, which
    /// must be the cluster of the link it runs on.
    pub sync_id: u32,
    /// The host other synchronizers dial to subscribe (a node name on the memory network).
    pub advertise_host: String,
    /// The port other synchronizers dial; `None` for the port the listener is bound to.
    pub advertise_port: Option<u16>,
    /// Time between heartbeats to the coordinator: the deployment's heartbeat interval, so a
    /// stopped synchronizer drops out of `GetSyncServers` after the failure timeout. Also the
    /// longest pause between two questions for another cluster's synchronizers.
    pub heartbeat_interval: Duration,
}

impl GrpcBusOptions {
    /// Options for synchronizer `sync_id` reachable at `advertise_host` on its listener's port,
    /// heartbeating at the default interval.
    pub fn new(sync_id: u32, advertise_host: impl Into<String>) -> Self {
        Self {
            sync_id,
            advertise_host: advertise_host.into(),
            advertise_port: None,
            heartbeat_interval: crate::coordinator::DEFAULT_HEARTBEAT_INTERVAL,
        }
    }
}

/// The gRPC transport (see the module documentation).
#[derive(Debug)]
pub struct GrpcBus {
    options: GrpcBusOptions,
    /// Taken by the first run.
    listener: Mutex<Option<Listener>>,
}

impl GrpcBus {
    /// A transport that serves `Sync` on `listener` and registers as `options` say. It can
    /// run once (the run owns the listener).
    pub fn new(listener: Listener, options: GrpcBusOptions) -> Self {
        Self {
            options,
            listener: Mutex::new(Some(listener)),
        }
    }

    /// The settings it was made with.
    pub fn options(&self) -> &GrpcBusOptions {
        &self.options
    }

    /// Checks the settings against `link` and takes the listener.
    fn prepare(&self, link: &ClusterLink) -> Result<(Listener, Registration)> {
        let options = &self.options;
        let served = cluster_of_synchronizer(options.sync_id, link.clusters())?;
        let wire_id = i32::try_from(options.sync_id).map_err(|_| {
            Error::invalid(format!(
                "synchronizer id {} does not fit the wire's 32-bit signed id",
                options.sync_id
            ))
        })?;
        if served != link.cluster() {
            return Err(Error::invalid(format!(
                "synchronizer {} serves cluster {served}, not cluster {}",
                options.sync_id,
                link.cluster()
            )));
        }
        if options.heartbeat_interval.is_zero() {
            return Err(Error::invalid("the heartbeat interval must be above zero"));
        }
        if options.advertise_host.is_empty() {
            return Err(Error::invalid("the advertised host is empty"));
        }
        let listener = self
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| {
                Error::invalid(
                    "this gRPC bus already ran: its listener belongs to the first run; \
                     make a new GrpcBus to run again",
                )
            })?;
        let port = options
            .advertise_port
            .or_else(|| listener.port())
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "no port to advertise: the listener's address {} has none",
                    listener.addr()
                ))
            })?;
        let registration = Registration {
            id: wire_id,
            addr: address(&options.advertise_host, port),
            info: ServerInfo {
                server_id: wire_id,
                hostname: options.advertise_host.clone(),
                port: port.to_string(),
                r#type: "synchronizer".to_string(),
                cluster_id: link.cluster().get() as i32,
                node_role: NodeRole::Synchronizer.into(),
                ..ServerInfo::default()
            },
            interval: options.heartbeat_interval,
        };
        Ok((listener, registration))
    }
}

#[async_trait]
impl SyncTransport for GrpcBus {
    fn name(&self) -> &'static str {
        "grpc"
    }

    async fn run(&self, link: ClusterLink) -> Result<()> {
        let (listener, registration) = self.prepare(&link)?;
        tracing::info!(
            cluster = %link.cluster(),
            sync = registration.id,
            listen = listener.addr(),
            advertised = %registration.addr,
            "gRPC synchronizer serving"
        );
        let tasks = TaskTracker::new();
        let serving = tasks.spawn(serve(link.clone(), listener, tasks.clone()));
        tasks.spawn(heartbeat(link.clone(), registration.clone()));
        for origin in link.others() {
            let source = PeerSource {
                link: link.clone(),
                sync_id: registration.id,
                max_pause: registration.interval,
                turn: AtomicUsize::new(0),
            };
            let link = link.clone();
            tasks.spawn(async move { pull(&link, origin, &source).await });
        }
        tasks.close();
        let result = match serving.await {
            Ok(result) => result,
            Err(e) => Err(Error::ConnectionLost(format!(
                "the Sync service task failed: {e}"
            ))),
        };
        if result.is_err() {
            // Without its service the synchronizer cannot do its job: stop the rest too.
            link.shutdown().cancel();
        }
        tasks.wait().await;
        result
    }
}

/// What a synchronizer tells the coordinator.
#[derive(Debug, Clone)]
struct Registration {
    id: i32,
    addr: String,
    info: ServerInfo,
    interval: Duration,
}

/// Serves `Sync` on `listener` until the synchronizer stops.
async fn serve(link: ClusterLink, listener: Listener, streams: TaskTracker) -> Result<()> {
    let shutdown = link.shutdown().clone();
    let service = sync_service(link, streams);
    let serving = crate::transport::server_builder()
        .add_service(service)
        .serve_with_incoming_shutdown(listener, shutdown.clone().cancelled_owned());
    // Streams end when the synchronizer stops.
    crate::grpc::until_stopped(serving, &shutdown, "the Sync service").await
}

/// Registers with the coordinator (`RegisterSyncServer`), then heartbeats as a synchronizer
/// every interval until the synchronizer stops. A stopping synchronizer just goes quiet: the
/// coordinator drops it after the failure timeout.
async fn heartbeat(link: ClusterLink, registration: Registration) {
    let shutdown = link.shutdown().clone();
    let mut ticks = tokio::time::interval(registration.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut registered = false;
    let mut failing = false;
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let call = link.coordinator().synchronizer_beat(
            registration.info.clone(),
            !registered,
            link.cluster_token(),
        );
        let answer = tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            answer = tokio::time::timeout(registration.interval, call) => answer,
        };
        match answer {
            Ok(Ok(_)) => {
                if !registered {
                    tracing::info!(
                        cluster = %link.cluster(),
                        sync = registration.id,
                        "synchronizer registered with the coordinator"
                    );
                } else if failing {
                    tracing::info!(sync = registration.id, "coordinator reachable again");
                }
                registered = true;
                failing = false;
            }
            Ok(Err(error)) => {
                if !failing {
                    tracing::warn!(
                        sync = registration.id,
                        "synchronizer heartbeat refused or failed: {error}"
                    );
                }
                failing = true;
            }
            Err(_) => {
                if !failing {
                    tracing::warn!(sync = registration.id, "synchronizer heartbeat timed out");
                }
                failing = true;
            }
        }
    }
}

/// Subscribes to a live synchronizer of the origin, as the coordinator lists them.
struct PeerSource {
    link: ClusterLink,
    sync_id: i32,
    max_pause: Duration,
    /// Rotates among several synchronizers of a cluster, so one that is listed but gone does
    /// not take every attempt.
    turn: AtomicUsize,
}

impl PeerSource {
    /// The addresses of the live synchronizers of `origin`, as the coordinator lists them now.
    async fn synchronizers_of(&self, origin: ClusterId) -> Result<Vec<String>> {
        let list = self
            .link
            .coordinator()
            .sync_servers(self.sync_id, self.link.cluster_token())
            .await?;
        let clusters = self.link.clusters();
        let mut found = Vec::new();
        for (i, id) in list.server_id.iter().enumerate() {
            // Old coordinators leave `clusterID` out: the id tells the cluster as well.
            let cluster = match list.cluster_id.get(i) {
                Some(c) => u32::try_from(*c).ok().and_then(ClusterId::new),
                None => u32::try_from(*id)
                    .ok()
                    .and_then(|id| cluster_of_synchronizer(id, clusters).ok()),
            };
            if cluster != Some(origin) {
                continue;
            }
            let (Some(host), Some(port)) = (list.hostname.get(i), list.port.get(i)) else {
                continue;
            };
            let addr = address(host, port.parse().unwrap_or(0));
            if split_addr(&addr).is_some_and(|(_, port)| port != 0) {
                found.push(addr);
            }
        }
        Ok(found)
    }

    /// A live synchronizer of `origin`, waiting (and asking again) until there is one.
    async fn find(&self, origin: ClusterId) -> Result<String> {
        let mut pause = FIRST_LOOKUP_RETRY.min(self.max_pause);
        let mut said = false;
        loop {
            match self.synchronizers_of(origin).await {
                Ok(found) if !found.is_empty() => {
                    let turn = self.turn.fetch_add(1, Ordering::Relaxed);
                    return Ok(found[turn % found.len()].clone());
                }
                Ok(_) if !said => {
                    tracing::info!(
                        cluster = %self.link.cluster(),
                        %origin,
                        "no live synchronizer of cluster {origin} yet; asking again"
                    );
                    said = true;
                }
                Err(e) if !said => {
                    tracing::warn!(
                        cluster = %self.link.cluster(),
                        %origin,
                        "cannot list the synchronizers of cluster {origin}; asking again: {e}"
                    );
                    said = true;
                }
                Ok(_) | Err(_) => {}
            }
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = self.link.shutdown().cancelled() => {
                    return Err(Error::ShuttingDown("the synchronizer".to_string()));
                }
            }
            pause = (pause * 2).min(self.max_pause);
        }
    }
}

#[async_trait]
impl Source for PeerSource {
    async fn subscribe(&self, origin: ClusterId, after: u64) -> Result<Box<dyn Subscription>> {
        let addr = self.find(origin).await?;
        let token = self.link.cluster_token().map(Arc::from);
        let peer = SyncPeer::new(self.link.network(), &addr, token)?;
        let stream = peer.subscribe(origin, after, self.link.cluster()).await?;
        tracing::debug!(cluster = %self.link.cluster(), %origin, %addr, after, "subscribed to synchronizer");
        Ok(Box::new(PeerSubscription {
            link: self.link.clone(),
            stream,
            addr,
        }))
    }
}

/// A `Subscribe` stream from another synchronizer.
struct PeerSubscription {
    link: ClusterLink,
    stream: tonic::Streaming<sns_proto::sns_v1::SignedBatch>,
    addr: String,
}

#[async_trait]
impl Subscription for PeerSubscription {
    /// The next batch's events, once its MAC is checked (with a key) and it decodes. A batch
    /// that does not pass is refused, logged and counted, and ends the subscription: nothing
    /// of it is applied, and the next subscription resumes from the high-water mark.
    async fn next(&mut self) -> Result<Vec<Event>> {
        Ok(self.open_next().await?.into_events())
    }

    async fn next_encoded(&mut self, _origin: ClusterId) -> Result<EncodedBatch> {
        self.open_next().await
    }
}

impl PeerSubscription {
    /// The next batch, opened: its MAC checked (with a key), decoded once, its encoding kept.
    async fn open_next(&mut self) -> Result<EncodedBatch> {
        let signed = match self.stream.message().await {
            Ok(Some(signed)) => signed,
            Ok(None) => {
                return Err(Error::ConnectionLost(format!(
                    "the synchronizer at {} ended the stream",
                    self.addr
                )));
            }
            Err(status) => return Err(from_status(status)),
        };
        match super::seal::open_encoded(self.link.sync_key(), signed) {
            Ok(batch) => Ok(batch),
            Err(refusal) => {
                self.link.refusals().refused(&refusal);
                tracing::error!(
                    cluster = %self.link.cluster(),
                    peer = %self.addr,
                    "refusing a batch from the synchronizer at {}: {refusal}",
                    self.addr
                );
                Err(Error::Corrupt(refusal.to_string()))
            }
        }
    }
}
