//! Every metadata entry this crate puts on or reads from a gRPC call, and the cluster token's
//! one way on and off a call.
//!
//! Invariant: a name is written here once; adapters and clients use these constants, never the
//! bare strings.

use tonic::Request;
use tonic::metadata::{MetadataMap, MetadataValue};

/// Carries the cluster token on internal calls.
pub(crate) const TOKEN: &str = "sns-cluster-token";
/// Carries the timeline's user (the course's clients set it).
pub(crate) const USERNAME: &str = "username";
/// With value `true`, turns an argument-less `UnFollow` into a logout (the course's clients).
pub(crate) const TERMINATED: &str = "terminated";
/// With value `structured`, asks for bare post text in `Message.msg`, and for
/// acknowledgements of keyed posts.
pub(crate) const TIMELINE_MODE: &str = "sns-timeline";
/// With a count (on structured streams), asks to resume a timeline: the stream starts with up
/// to that many of the newest posts (at most the timeline's cap), oldest first, instead of the
/// last 20 newest first. A client reopening after a failover asks for as many as it remembers
/// having delivered, so it can pass on every post it missed, in order.
pub(crate) const TIMELINE_RESUME: &str = "sns-timeline-resume";
/// Names the kind of error a status stands for (see `grpc::status`).
pub(crate) const ERROR_KIND: &str = "sns-error";

/// The cluster token a call presents, if any (a value that is not text presents none).
pub(crate) fn presented_token(metadata: &MetadataMap) -> Option<&str> {
    metadata.get(TOKEN).and_then(|v| v.to_str().ok())
}

/// Attaches the cluster token, if any, to an internal call.
pub(crate) fn with_token<T>(mut request: Request<T>, token: Option<&str>) -> Request<T> {
    if let Some(token) = token.and_then(|t| MetadataValue::try_from(t).ok()) {
        request.metadata_mut().insert(TOKEN, token);
    }
    request
}
