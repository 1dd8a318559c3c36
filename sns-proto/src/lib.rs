//! Generated gRPC code for Tiny SNS, and nothing else.
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

/// Tiny SNS's own internal services (package `sns.v1`).
#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    rust_2018_idioms
)]
pub mod sns_v1 {
    tonic::include_proto!("sns.v1");
}

pub use prost_types::Timestamp;
