//! gRPC adapters: each converts wire messages to domain types, calls the core, and converts
//! back. Errors cross the wire in exactly one place, [`status`] (both ways).

pub(crate) mod alias;
pub(crate) mod coord;
pub(crate) mod replication;
pub(crate) mod sns;
pub(crate) mod sync;

mod status;

pub(crate) use status::{Asked, error, status};
