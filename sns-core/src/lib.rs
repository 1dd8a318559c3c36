//! Tiny SNS: a small, fault-tolerant social network service, as a library.
//!
//! The core is a pure state machine ([`State::apply`] over [`Event`]s) fed by a durable log
//! ([`Storage`]). Around it: the [`Server`] (the course's `SNSService` over gRPC), the typed
//! [`Client`], and the [`Session`] that carries a client over the loss of its server (failover).
//! Binaries in `sns-bins` only parse flags and call into this crate.
//!
//! Networking is injected ([`transport`]): components serve on a [`Listener`] and reach their
//! peers through a [`Network`], so the same code runs on TCP, on in-memory pipes
//! ([`MemoryNetwork`]) or on a simulated network.
//!
//! What this crate does not do: it does not choose ports, networks or data directories on its
//! own (callers pass listeners, networks and storage in; [`Deployment`] creates them from its
//! explicit config), and it does not install signal handlers or logging.

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
pub use grpc::sns::MAX_ARGUMENTS;
pub use ids::{
    ClusterId, Epoch, EventId, LogIndex, PostId, PostKey, Role, ServerId, Timestamp, UserId,
};
pub use server::{
    CommittedEntries, CoordinatorLink, LogPositions, Server, ServerConfig, TimelineFeed,
};
pub use session::{Session, SessionConfig, SessionEvent, SessionTimeline, TimelinePoster};
pub use state::{Applied, Listing, State, StateConfig};
pub use storage::{CrashDisk, CrashDiskOptions, CrashStorage};
pub use storage::{FileStorage, FileStorageOptions, MemoryStorage, Recovered, Snapshot, Storage};
pub use sync::{
    AmqpBus, AmqpOptions, CursorStore, GrpcBus, GrpcBusOptions, LocalBus, QueueType, RefusalCounts,
    SyncKey, SyncRefusals, SyncTransport, Synchronizer, SynchronizerConfig,
};
pub use transport::{Listener, MemoryNetwork, Network};
