//! gRPC adapters: each converts wire messages to domain types, calls the core, and converts
//! back. Errors cross the wire in exactly one place, [`status`] (both ways).

pub mod admin;
pub(crate) mod alias;
pub mod client;
pub(crate) mod coord;
pub(crate) mod events;
pub(crate) mod log;
pub(crate) mod replication;
pub(crate) mod sns;

pub(crate) mod metadata;
mod peers;
pub(crate) mod raw;
mod serve;
mod status;

pub use serve::SHUTDOWN_GRACE;
pub(crate) use serve::until_stopped;

pub(crate) use status::{Asked, error, status};
