//! Errors on the wire, both ways, in one place: [`status`] turns an [`Error`] into the
//! `tonic::Status` a peer receives, and [`error`] turns a received status back into the
//! [`Error`] it stands for.
//!
//! Invariants:
//! - The four command errors keep the exact codes and messages the course's client compares
//!   against (DESIGN §5.1); their meaning depends on the command that was asked ([`Asked`]).
//! - Every status this crate makes carries its error's kind in the `sns-error` metadata entry,
//!   so an error crosses the wire as itself: "not master" stays `NotMaster`, a limit stays
//!   `OverLimit`. A status without it (made by the transport, or by another implementation) is
//!   read from its code alone.
//! - A status with a source was made on this side from a broken connection, whatever its code:
//!   it is always [`Error::ConnectionLost`].

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use super::metadata::ERROR_KIND as ERROR_KIND_METADATA;
use crate::error::Error;
use crate::ids::{LogIndex, UserId};

/// What was asked, which gives a status code shared by several errors its meaning.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Asked {
    /// A client's login as this user.
    Login(UserId),
    /// A client's follow: the user, and whom they follow.
    Follow(UserId, UserId),
    /// A client's unfollow: the user, and whom they unfollow.
    Unfollow(UserId, UserId),
    /// Another client command, by this user.
    Command(UserId),
    /// An internal call between the deployment's processes.
    Peer,
}

/// The kind of `error`, as [`ERROR_KIND_METADATA`] carries it.
fn kind(error: &Error) -> &'static str {
    match error {
        Error::InvalidUsername(_) => "invalid-username",
        Error::SameClient => "same-client",
        Error::AlreadyFollowing => "already-following",
        Error::NotFollowing => "not-following",
        Error::AlreadyLoggedIn(_) => "already-logged-in",
        Error::NotLoggedIn(_) => "not-logged-in",
        Error::InvalidInput(_) => "invalid-input",
        Error::PermissionDenied(_) => "permission-denied",
        Error::Conflict(_) => "conflict",
        Error::OverLimit(_) => "over-limit",
        Error::Full(_) => "full",
        Error::Unauthorized => "unauthorized",
        Error::NotMaster(_) => "not-master",
        Error::ShuttingDown(_) => "shutting-down",
        Error::StorageFailed(_) => "storage-failed",
        Error::ConnectionLost(_) => "connection-lost",
        Error::Overloaded(_) => "overloaded",
        Error::Unavailable(_) => "unavailable",
        Error::Unreachable { .. } => "unreachable",
        Error::Io(_) => "io",
        Error::Compacted { .. } => "compacted",
        Error::Corrupt(_) => "corrupt",
        Error::Rpc(_) => "rpc",
    }
}

/// The one mapping from [`Error`] to a gRPC status.
pub(crate) fn status(error: Error) -> Status {
    let kind = kind(&error);
    let mut status = match error {
        Error::InvalidUsername(_) => Status::invalid_argument("invalid username"),
        Error::SameClient => Status::already_exists("same client"),
        Error::AlreadyFollowing => Status::already_exists("already following"),
        Error::NotFollowing => Status::failed_precondition("not following"),
        e @ Error::AlreadyLoggedIn(_) => Status::already_exists(e.to_string()),
        e @ Error::NotLoggedIn(_) => Status::unauthenticated(e.to_string()),
        Error::InvalidInput(message) => Status::invalid_argument(message),
        Error::PermissionDenied(message) => Status::permission_denied(message),
        Error::Conflict(message) => Status::already_exists(message),
        Error::Full(message) | Error::OverLimit(message) => Status::resource_exhausted(message),
        e @ Error::Unauthorized => Status::unauthenticated(e.to_string()),
        e @ Error::ShuttingDown(_) => Status::unavailable(e.to_string()),
        Error::NotMaster(message)
        | Error::StorageFailed(message)
        | Error::ConnectionLost(message)
        | Error::Overloaded(message)
        | Error::Unavailable(message) => Status::unavailable(message),
        e @ Error::Unreachable { .. } => Status::unavailable(e.to_string()),
        e @ Error::Io(_) => Status::unavailable(e.to_string()),
        Error::Compacted { first } => Status::out_of_range(first.0.to_string()),
        Error::Corrupt(message) => Status::new(Code::DataLoss, message),
        Error::Rpc(message) => Status::unknown(message),
    };
    status
        .metadata_mut()
        .insert(ERROR_KIND_METADATA, MetadataValue::from_static(kind));
    status
}

/// The one mapping from a received gRPC status back to the [`Error`] it stands for.
pub(crate) fn error(status: &Status, asked: Asked) -> Error {
    if let Some(source) = std::error::Error::source(status) {
        return Error::ConnectionLost(crate::transport::innermost(source));
    }
    let kind = status
        .metadata()
        .get(ERROR_KIND_METADATA)
        .and_then(|v| v.to_str().ok());
    kind.and_then(|kind| from_kind(kind, status, asked))
        .unwrap_or_else(|| from_code(status, asked))
}

/// The error named by `kind`, if this crate knows the name and the question gives it a value.
fn from_kind(kind: &str, status: &Status, asked: Asked) -> Option<Error> {
    let message = status.message().to_string();
    let user = match asked {
        Asked::Login(user)
        | Asked::Command(user)
        | Asked::Follow(user, _)
        | Asked::Unfollow(user, _) => Some(user),
        Asked::Peer => None,
    };
    let error = match kind {
        "invalid-input" => Error::InvalidInput(message),
        "permission-denied" => Error::PermissionDenied(message),
        "conflict" => Error::Conflict(message),
        "over-limit" => Error::OverLimit(message),
        "full" => Error::Full(message),
        "unauthorized" => Error::Unauthorized,
        "not-master" => Error::NotMaster(message),
        "shutting-down" => Error::ShuttingDown(
            message
                .strip_suffix(" is shutting down")
                .unwrap_or(&message)
                .to_string(),
        ),
        "storage-failed" => Error::StorageFailed(message),
        "connection-lost" | "unreachable" | "io" => Error::ConnectionLost(message),
        "overloaded" => Error::Overloaded(message),
        "unavailable" => Error::Unavailable(message),
        "compacted" => Error::Compacted {
            first: LogIndex(message.parse().unwrap_or(0)),
        },
        "corrupt" => Error::Corrupt(message),
        "rpc" => Error::Rpc(message),
        "already-logged-in" => Error::AlreadyLoggedIn(user?),
        "not-logged-in" => Error::NotLoggedIn(user?),
        // The command errors keep their course codes; the question decides.
        _ => return None,
    };
    Some(error)
}

/// The error a status without a known kind stands for, read from its code and the question.
fn from_code(status: &Status, asked: Asked) -> Error {
    let message = || status.message().to_string();
    match (status.code(), asked) {
        (Code::AlreadyExists, Asked::Login(user)) => Error::AlreadyLoggedIn(user),
        (Code::AlreadyExists, Asked::Follow(..)) => Error::AlreadyFollowing,
        (Code::AlreadyExists, Asked::Unfollow(..)) => Error::SameClient,
        (Code::FailedPrecondition, Asked::Unfollow(..)) => Error::NotFollowing,
        (Code::InvalidArgument, Asked::Follow(_, t) | Asked::Unfollow(_, t)) => {
            Error::InvalidUsername(t.to_string())
        }
        (Code::InvalidArgument, Asked::Login(user)) if status.message() == "invalid username" => {
            Error::InvalidUsername(user.to_string())
        }
        // Another refusal (a user of another cluster): the server's own words.
        (Code::InvalidArgument, _) => Error::InvalidInput(message()),
        (Code::Unauthenticated, Asked::Peer) => Error::Unauthorized,
        (
            Code::Unauthenticated,
            Asked::Login(user)
            | Asked::Command(user)
            | Asked::Follow(user, _)
            | Asked::Unfollow(user, _),
        ) => Error::NotLoggedIn(user),
        (Code::PermissionDenied, _) => Error::PermissionDenied(message()),
        (Code::AlreadyExists | Code::FailedPrecondition, _) => Error::Conflict(message()),
        (Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded, _) => {
            Error::Unavailable(message())
        }
        (Code::Unknown, Asked::Peer) => Error::Unavailable(message()),
        // The server is there and says a limit was reached: nothing to fail over from.
        (Code::ResourceExhausted, _) => Error::OverLimit(message()),
        (Code::Unimplemented, _) => Error::Rpc(
            "it does not serve the Tiny SNS client service (csce438.SNSService): not a Tiny SNS \
             server (a coordinator's port, or another program's?)"
                .into(),
        ),
        (Code::OutOfRange, _) if status.message().contains("too large") => Error::Rpc(format!(
            "the reply is larger than this client accepts ({} MiB): {}",
            super::client::MAX_REPLY_BYTES >> 20,
            status.message()
        )),
        (Code::OutOfRange, Asked::Peer) => Error::Compacted { first: LogIndex(0) },
        (Code::DataLoss, _) => Error::Corrupt(message()),
        _ => Error::Rpc(format!("{:?}: {}", status.code(), status.message())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(n: u32) -> UserId {
        UserId::new(n).expect("a valid user id")
    }

    /// Every error this crate sends that has a value to carry comes back as itself.
    #[test]
    fn errors_cross_the_wire_as_themselves() {
        let sent = [
            Error::NotMaster("this server is not the master of its cluster".into()),
            Error::ShuttingDown("server".into()),
            Error::StorageFailed("no space left on device; refusing requests".into()),
            Error::ConnectionLost("the slave went away".into()),
            Error::Overloaded("timeline reader fell behind".into()),
            Error::Unavailable("no live server in cluster 2".into()),
            Error::OverLimit("too many timeline streams open for user 1 (at most 4)".into()),
            Error::Full("too many synchronizers".into()),
            Error::InvalidInput("post too long".into()),
            Error::PermissionDenied("not yours".into()),
            Error::Conflict("slot taken".into()),
            Error::Corrupt("bad checksum".into()),
            Error::Compacted {
                first: LogIndex(42),
            },
            Error::Unauthorized,
            Error::AlreadyLoggedIn(user(7)),
            Error::NotLoggedIn(user(7)),
        ];
        for error in sent {
            let before = format!("{error:?}");
            let back = super::error(&status(error), Asked::Command(user(7)));
            assert_eq!(format!("{back:?}"), before);
        }
    }

    /// The course's codes and messages for the four command errors are unchanged, and read
    /// back by the command that was asked.
    #[test]
    fn command_errors_keep_the_course_codes_and_messages() {
        let cases = [
            (
                Error::InvalidUsername("9".into()),
                Code::InvalidArgument,
                "invalid username",
            ),
            (Error::SameClient, Code::AlreadyExists, "same client"),
            (
                Error::AlreadyFollowing,
                Code::AlreadyExists,
                "already following",
            ),
            (
                Error::NotFollowing,
                Code::FailedPrecondition,
                "not following",
            ),
        ];
        for (error, code, message) in cases {
            let sent = status(error);
            assert_eq!((sent.code(), sent.message()), (code, message));
        }
        let back = |e, asked| format!("{:?}", super::error(&status(e), asked));
        assert_eq!(
            back(Error::SameClient, Asked::Unfollow(user(1), user(1))),
            "SameClient"
        );
        assert_eq!(
            back(Error::AlreadyFollowing, Asked::Follow(user(1), user(2))),
            "AlreadyFollowing"
        );
        assert_eq!(
            back(Error::NotFollowing, Asked::Unfollow(user(1), user(2))),
            "NotFollowing"
        );
        assert_eq!(
            back(
                Error::InvalidUsername("2".into()),
                Asked::Follow(user(1), user(2))
            ),
            "InvalidUsername(\"2\")"
        );
    }

    /// A status without the kind entry (another implementation's) is read from its code.
    #[test]
    fn a_status_without_a_kind_is_read_from_its_code() {
        let bare = Status::unavailable("gone");
        assert!(matches!(error(&bare, Asked::Peer), Error::Unavailable(m) if m == "gone"));
        let limit = Status::resource_exhausted("too many");
        assert!(matches!(
            error(&limit, Asked::Command(user(1))),
            Error::OverLimit(_)
        ));
        let compacted = Status::out_of_range("compacted");
        assert!(matches!(
            error(&compacted, Asked::Peer),
            Error::Compacted { .. }
        ));
        let unimplemented = Status::unimplemented("");
        let said = error(&unimplemented, Asked::Login(user(1))).to_string();
        assert!(said.contains("not a Tiny SNS server"), "{said}");
    }

    /// Which errors send a client to find its server again, and which are answers.
    #[test]
    fn only_a_lost_server_calls_for_a_reconnect() {
        let lost =
            |e: Error| super::error(&status(e), Asked::Command(user(1))).calls_for_reconnect();
        assert!(lost(Error::NotMaster("x".into())));
        assert!(lost(Error::ShuttingDown("server".into())));
        assert!(lost(Error::StorageFailed("x".into())));
        assert!(lost(Error::ConnectionLost("x".into())));
        assert!(!lost(Error::OverLimit("x".into())));
        assert!(!lost(Error::InvalidInput("x".into())));
        assert!(!lost(Error::AlreadyLoggedIn(user(1))));
    }
}
