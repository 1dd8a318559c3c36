//! Tiny SNS: a small, fault-tolerant social network service, as a library.
//!
//! The core is a pure state machine ([`State::apply`] over [`Event`]s) fed by a durable log
//! ([`Storage`]). Around it: the [`Server`] (the course's `SNSService` over gRPC), the typed
//! [`Client`], and the [`Session`] that carries a client over the loss of its server (failover).
//! Binaries in `sns-bins` only parse flags and call into this crate.
//!
//! # Quick start
//!
//! A whole deployment in one process (a coordinator and 3 clusters of a master and a slave, in
//! memory); user 1 (cluster 1) follows user 2 (cluster 2) and receives user 2's post:
//!
//! ```
//! use std::time::Duration;
//!
//! use sns_core::deployment::{Deployment, DeploymentConfig};
//! use sns_core::session::{Session, SessionConfig, Target};
//! use sns_core::{Error, UserId};
//!
//! # #[tokio::main]
//! # async fn main() -> sns_core::Result<()> {
//! let deployment = Deployment::start(DeploymentConfig::in_memory()).await?;
//! deployment.wait_for_masters(Duration::from_secs(10)).await?;
//! let coordinator = Target::Coordinator(deployment.coordinator_addr().to_string());
//! let (one, two) = (UserId::new(1).unwrap(), UserId::new(2).unwrap());
//! let alice = Session::connect(deployment.network(), coordinator.clone(), one, SessionConfig::default()).await?;
//! let bob = Session::connect(deployment.network(), coordinator, two, SessionConfig::default()).await?;
//! // Cluster 1 hears of user 2 within milliseconds; until then user 2 is unknown there.
//! while let Err(Error::InvalidUsername(_)) = alice.follow(two).await {
//!     tokio::time::sleep(Duration::from_millis(20)).await;
//! }
//! let mut timeline = alice.timeline().await?;
//! // Bob's timeline stays open until the post is through (closing it drops queued posts).
//! let bobs = bob.timeline().await?;
//! bobs.post("hello from cluster 2").await?;
//! let post = tokio::time::timeout(Duration::from_secs(10), timeline.next())
//!     .await
//!     .expect("the post within 10 s")
//!     .expect("a post")?;
//! assert_eq!((post.author, post.text.as_str()), (two, "hello from cluster 2"));
//! # deployment.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! The same program with comments is `examples/embedded.rs`. The other examples:
//! `examples/failover_test.rs` shows how a downstream crate tests against a [`TestCluster`]
//! (feature `test-util`) on tokio's paused clock; `examples/tcp_client.rs` drives a deployment
//! over TCP with [`CoordinatorClient`] and [`Client`]; `examples/custom_storage.rs` writes a
//! [`Storage`] of its own and checks it with the crate's conformance suite,
//! [`testing::storage_suite`] (feature `test-util`).
//!
//! Networking is injected ([`transport`]): components serve on a [`Listener`] and reach their
//! peers through a [`Network`], so the same code runs on TCP, on in-memory pipes
//! ([`MemoryNetwork`]) or on a simulated network.
//!
//! What this crate does not do: it does not choose ports, networks or data directories on its
//! own (callers pass listeners, networks and storage in; [`Deployment`] creates them from its
//! explicit config), and it does not install signal handlers or logging.
//!
//! # Features
//!
//! None is on by default: an embedder gets the server, client, coordinator, storage,
//! deployments and the in-process and gRPC synchronizer transports ([`LocalBus`], [`GrpcBus`]),
//! and compiles no broker client.
//!
//! - `amqp`: the RabbitMQ synchronizer transport: [`AmqpBus`] with [`AmqpOptions`],
//!   [`CursorStore`] and [`QueueType`] (module `sync::amqp`), and `Bus::Amqp` for a
//!   [`Deployment`]'s synchronizers. Brings in `lapin`. The `sns-bins` binaries turn it on.
//! - `test-util`: the `testing` module: [`TestCluster`] (a deployment on in-memory pipes whose
//!   servers can be crashed, restarted and cut off), waiting helpers such as `eventually`, and,
//!   with `amqp` too, `amqp_broker` for tests against the broker named by `SNS_AMQP_URL`.
//!
// Items of a feature that is off are not there to link to: their links then lead to the list
// above.
#![cfg_attr(feature = "amqp", doc = "[`AmqpBus`]: sync::AmqpBus")]
#![cfg_attr(feature = "amqp", doc = "[`AmqpOptions`]: sync::AmqpOptions")]
#![cfg_attr(feature = "amqp", doc = "[`CursorStore`]: sync::CursorStore")]
#![cfg_attr(feature = "amqp", doc = "[`QueueType`]: sync::QueueType")]
#![cfg_attr(not(feature = "amqp"), doc = "[`AmqpBus`]: #features")]
#![cfg_attr(not(feature = "amqp"), doc = "[`AmqpOptions`]: #features")]
#![cfg_attr(not(feature = "amqp"), doc = "[`CursorStore`]: #features")]
#![cfg_attr(not(feature = "amqp"), doc = "[`QueueType`]: #features")]
#![cfg_attr(feature = "test-util", doc = "[`TestCluster`]: testing::TestCluster")]
#![cfg_attr(not(feature = "test-util"), doc = "[`TestCluster`]: #features")]
#![cfg_attr(
    feature = "test-util",
    doc = "[`testing::storage_suite`]: testing::storage_suite"
)]
#![cfg_attr(
    not(feature = "test-util"),
    doc = "[`testing::storage_suite`]: #features"
)]

mod auth;
mod codec;
pub mod coordinator;
pub mod deployment;
pub mod error;
pub mod event;
pub(crate) mod grpc;
pub mod ids;
pub mod node;
pub mod server;
pub mod session;
pub mod state;
pub mod stats;
pub mod storage;
pub mod sync;
#[cfg(feature = "test-util")]
pub mod testing;
pub mod transport;

pub use grpc::admin;
pub use grpc::client;

pub use client::{
    Client, CoordinatorClient, PostAck, ReceivedPost, TimelineMessage, TimelineSender,
    TimelineStream,
};
pub use coordinator::{Coordinator, CoordinatorConfig, RoutingConfig, RoutingTable};
pub use deployment::{
    Bus, Data, Deployment, DeploymentConfig, Ports, SynchronizerPlace, Transport,
};
pub use error::{Error, Result};
pub use event::{Event, EventKind, LogEntry, MAX_POST_BYTES, Post};
pub use grpc::SHUTDOWN_GRACE;
pub use ids::{
    ClusterId, Epoch, EventId, LogIndex, PostId, PostKey, Role, ServerId, Timestamp, UserId,
};
pub use server::{
    CommittedEntries, CoordinatorLink, LogPositions, MAX_ARGUMENTS, Server, ServerConfig,
    TimelineFeed,
};
pub use session::{Session, SessionConfig, SessionEvent, SessionTimeline, TimelinePoster};
pub use state::{Applied, Listing, State, StateConfig};
pub use storage::{CrashDisk, CrashDiskOptions, CrashStorage};
pub use storage::{FileStorage, FileStorageOptions, MemoryStorage, Recovered, Snapshot, Storage};
#[cfg(feature = "amqp")]
pub use sync::{AmqpBus, AmqpOptions, CursorStore, QueueType};
pub use sync::{
    GrpcBus, GrpcBusOptions, LocalBus, RefusalCounts, SyncKey, SyncRefusals, SyncTransport,
    Synchronizer, SynchronizerConfig,
};
pub use transport::{Listener, MemoryNetwork, Network};
