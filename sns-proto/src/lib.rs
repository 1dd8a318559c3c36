//! Generated gRPC code for Tiny SNS, and the codec it uses (prost's, with undecodable
//! messages answered `INVALID_ARGUMENT`; see [`codec`]).
//!
//! `csce438` holds the course-compatible client service (`SNSService`) and coordinator service
//! (`CoordService`). Domain types, validation and conversions live in `sns-core`; this crate has
//! no logic. The same services are served under package `csce662` by `sns-core`, which renames
//! the request paths, so no second copy of the generated code exists.

/// The course's wire protocol (package `csce438`).
#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    rust_2018_idioms
)]
pub mod csce438 {
    tonic::include_proto!("csce438");
}

/// Tiny SNS's own internal services (package `sns.v1`), nested as the package path so that
/// references to `csce438` types resolve.
pub mod sns {
    /// Version 1 of the internal services.
    #[allow(
        missing_docs,
        unreachable_pub,
        clippy::all,
        clippy::pedantic,
        clippy::unwrap_used,
        rust_2018_idioms
    )]
    pub mod v1 {
        tonic::include_proto!("sns.v1");
    }
}

pub use sns::v1 as sns_v1;

pub mod codec;

pub use prost_types::Timestamp;
