//! Events: every change to the system is one, and the log is a sequence of them.
//!
//! An [`Event`] is identified by its origin cluster and that origin's gap-free sequence number;
//! a [`LogEntry`] adds where the event sits in one server's log and under which epoch it was
//! written there.
//!
//! Binary form (log records): a tag byte per kind. A post with an idempotency key has its own
//! tag ([`EventKind::Posted`] with `key: Some`), so a post without one, and every record written
//! before keys existed, keeps the original `Posted` layout and still decodes.
//!
//! The binary form is in `event/record.rs`, the rules a post's text must follow in
//! `event/text.rs` (re-exported here).

use std::sync::Arc;

use crate::codec::Encoder;
use crate::error::{Error, Result};
use crate::ids::{Epoch, EventId, LogIndex, PostId, PostKey, Timestamp, UserId};

mod record;
mod text;

pub use text::{MAX_POST_BYTES, check_post_text, is_terminal_control, normalize_post_text};

/// Longest log record, in bytes of its encoded [`LogEntry`]: the one record-size limit. Every
/// storage refuses to write a longer record ([`check_record_len`]), so nothing is written that
/// recovery cannot read back; a state transfer travels and is stored in pieces well below it
/// ([`OriginImage::into_pieces`]).
pub const MAX_RECORD_BYTES: usize = 1 << 20;

/// Longest record recovery reads. Versions before [`MAX_RECORD_BYTES`] was checked on writing
/// stored a whole state transfer as one record of any size; their data directories still
/// open. A length beyond this is damage.
pub const MAX_LEGACY_RECORD_BYTES: usize = 1 << 30;

/// Content bytes a state transfer piece holds at most (a quarter of [`MAX_RECORD_BYTES`], so
/// that a piece's record, or a few pieces in one message, stay far below every limit).
pub const IMAGE_PIECE_BYTES: usize = MAX_RECORD_BYTES / 4;

/// Checks that `entry`'s record fits [`MAX_RECORD_BYTES`], for a storage that does not
/// frame records itself. Only a state transfer can come near the limit (every other kind is
/// bounded far below it by its own limits, a post by [`MAX_POST_BYTES`]), so only those are
/// measured.
pub fn check_entry_fits(entry: &LogEntry) -> Result<()> {
    match entry.event.kind {
        EventKind::Image(_) => check_record_len(entry.event.record_len()),
        _ => Ok(()),
    }
}

/// Checks an encoded record's length against [`MAX_RECORD_BYTES`].
pub fn check_record_len(len: usize) -> Result<()> {
    if len > MAX_RECORD_BYTES {
        return Err(Error::invalid(format!(
            "a log record of {len} bytes is over the limit of {MAX_RECORD_BYTES}; nothing was \
             stored"
        )));
    }
    Ok(())
}

/// One change, as originated by a cluster's master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Origin cluster and its sequence number for this event.
    pub id: EventId,
    /// Server-assigned time at the origin.
    pub at: Timestamp,
    /// What happened.
    pub kind: EventKind,
}

/// What an [`Event`] changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// `user` exists (first login anywhere).
    UserJoined {
        /// The new user.
        user: UserId,
    },
    /// `follower` now follows `followee` (from the event's time on).
    Followed {
        /// Who follows.
        follower: UserId,
        /// Who is followed.
        followee: UserId,
    },
    /// `follower` stopped following `followee`.
    Unfollowed {
        /// Who follows no more.
        follower: UserId,
        /// Who is no longer followed.
        followee: UserId,
    },
    /// `author` posted `text` (one line, at most [`MAX_POST_BYTES`]); the post's id is the
    /// event's id.
    Posted {
        /// Who posted.
        author: UserId,
        /// The text, shared by every timeline that holds the post.
        text: Arc<str>,
        /// The client's idempotency key, if it sent one. A master never logs two posts of one
        /// author with the same key among the author's last
        /// [`REMEMBERED_POST_KEYS`](crate::state::REMEMBERED_POST_KEYS) keyed posts.
        key: Option<PostKey>,
    },
    /// A state transfer, or one piece of it: what the origin cluster contributes, as of its
    /// sequence number `id.seq`, for a cluster that fell behind what the origin's log still
    /// holds. Applied, it replaces the origin's contribution (see [`OriginImage`]); its last
    /// piece moves the origin's high-water mark to `id.seq`.
    Image(Arc<OriginImage>),
}

/// The origin's contribution to every cluster's state (see [`EventKind::Image`]), or one
/// piece of it.
///
/// A whole transfer may be far larger than a log record may be, so it travels and is stored
/// as pieces ([`OriginImage::into_pieces`]) that share the transfer's event id; every piece
/// but the last says `more`. Applying the pieces in order has the effect of applying the whole:
/// each user is listed in exactly one piece, together with the start of its follow list
/// (`follows`); a list too long for one piece goes on in `continued_follows` of the next ones.
/// Only the last piece moves the origin's high-water mark, so a transfer cut short is sent
/// again whole, and applying a piece twice changes nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OriginImage {
    /// The users of the origin cluster (in this piece).
    pub users: Vec<UserId>,
    /// For each user of the origin cluster who follows anyone: whom, and since when. A user of
    /// the origin listed in `users` but not here follows nobody; a listed follower follows
    /// exactly these (and those of its `continued_follows` in later pieces).
    pub follows: Vec<(UserId, Vec<(UserId, Timestamp)>)>,
    /// The rest of follow lists begun in an earlier piece: added, replacing nothing.
    pub continued_follows: Vec<(UserId, Vec<(UserId, Timestamp)>)>,
    /// The most recent posts of each user of the origin (at most the timeline cap per author),
    /// each with its id.
    pub posts: Vec<Post>,
    /// Further pieces of the same transfer follow this one.
    pub more: bool,
}

/// Bytes a user takes in a piece, a follow, and a post besides its text (as the log encodes
/// them).
const PIECE_USER_BYTES: usize = 4;
const PIECE_FOLLOW_BYTES: usize = 12;
const PIECE_LIST_BYTES: usize = 12;
const PIECE_POST_BYTES: usize = 36;

impl OriginImage {
    /// Cuts a whole transfer into pieces of at most about `budget` content bytes each (at
    /// least one piece; every piece but the last says `more`). See the type's documentation
    /// for what the pieces promise.
    pub fn into_pieces(self, budget: usize) -> Vec<OriginImage> {
        let budget = budget.max(PIECE_LIST_BYTES + PIECE_FOLLOW_BYTES + PIECE_USER_BYTES);
        let mut cutter = Cutter {
            budget,
            pieces: Vec::new(),
            piece: OriginImage::default(),
            used: 0,
        };
        let mut lists: std::collections::HashMap<UserId, Vec<(UserId, Timestamp)>> =
            self.follows.into_iter().collect();
        for user in self.users {
            cutter.make_room(PIECE_USER_BYTES + PIECE_LIST_BYTES + PIECE_FOLLOW_BYTES);
            cutter.piece.users.push(user);
            cutter.used += PIECE_USER_BYTES;
            let Some(list) = lists.remove(&user) else {
                continue;
            };
            let mut rest = list.as_slice();
            let mut first = true;
            while first || !rest.is_empty() {
                if !first {
                    cutter.make_room(PIECE_LIST_BYTES + PIECE_FOLLOW_BYTES);
                }
                let room = (cutter.budget.saturating_sub(cutter.used + PIECE_LIST_BYTES)
                    / PIECE_FOLLOW_BYTES)
                    .max(1);
                let (now, later) = rest.split_at(room.min(rest.len()));
                let chunk = (user, now.to_vec());
                if first {
                    cutter.piece.follows.push(chunk);
                } else {
                    cutter.piece.continued_follows.push(chunk);
                }
                cutter.used += PIECE_LIST_BYTES + now.len() * PIECE_FOLLOW_BYTES;
                rest = later;
                first = false;
                if !rest.is_empty() {
                    cutter.cut();
                }
            }
        }
        // Follow lists of users the transfer does not list (none, from a well-formed image)
        // are kept as they were, in the last piece.
        let mut leftovers: Vec<_> = lists.into_iter().collect();
        leftovers.sort_by_key(|(user, _)| *user);
        cutter.piece.follows.extend(leftovers);
        for post in self.posts {
            let size = PIECE_POST_BYTES + post.text.len();
            cutter.make_room(size);
            cutter.piece.posts.push(post);
            cutter.used += size;
        }
        cutter.finish()
    }
}

/// Builds the pieces of [`OriginImage::into_pieces`].
struct Cutter {
    budget: usize,
    pieces: Vec<OriginImage>,
    piece: OriginImage,
    used: usize,
}

impl Cutter {
    /// Starts a new piece unless `size` more bytes fit in the current one.
    fn make_room(&mut self, size: usize) {
        if self.used > 0 && self.used + size > self.budget {
            self.cut();
        }
    }

    fn cut(&mut self) {
        let mut piece = std::mem::take(&mut self.piece);
        piece.more = true;
        self.pieces.push(piece);
        self.used = 0;
    }

    fn finish(mut self) -> Vec<OriginImage> {
        self.pieces.push(self.piece);
        self.pieces
    }
}

/// A post as timelines hold it: shared, never copied per follower.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Post {
    /// The id of the `Posted` event.
    pub id: PostId,
    /// Who posted.
    pub author: UserId,
    /// Server-assigned time of the post.
    pub at: Timestamp,
    /// The text.
    pub text: Arc<str>,
}

impl Post {
    /// Timeline order: by time, ties broken by id.
    pub fn order_key(&self) -> (Timestamp, PostId) {
        (self.at, self.id)
    }
}

/// An event at a position of one server's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Position in this server's log (from 1, no gaps).
    pub index: LogIndex,
    /// Epoch of the cluster under which the entry was written.
    pub epoch: Epoch,
    /// The event.
    pub event: Event,
}

impl Event {
    /// Whether this event may come right after its origin's event `last` (0: none yet): the
    /// next sequence number, or, for a state transfer ([`EventKind::Image`]) or a piece of one,
    /// any later one.
    pub fn continues(&self, last: u64) -> bool {
        match self.kind {
            EventKind::Image(_) => self.id.seq > last,
            _ => self.id.seq == last + 1,
        }
    }

    /// Whether this event may come right after `previous`, an event of the same origin: what
    /// [`Event::continues`] allows after it, or, after a state transfer piece that says more
    /// follow, the next piece of the same transfer.
    pub fn follows_event(&self, previous: &Event) -> bool {
        if previous.completes() {
            self.continues(previous.id.seq)
        } else {
            self.is_image() && self.id.seq == previous.id.seq
        }
    }

    /// The length of the log record this event makes (its entry's index and epoch included).
    pub fn record_len(&self) -> usize {
        let mut enc = Encoder::default();
        self.encode(&mut enc);
        enc.buf.len() + 16
    }

    /// Whether applying this event moves its origin's high-water mark to its sequence number:
    /// every event but a state transfer piece that says more pieces follow.
    pub fn completes(&self) -> bool {
        !matches!(&self.kind, EventKind::Image(image) if image.more)
    }

    /// Whether this event is a piece of a state transfer ([`EventKind::Image`]).
    pub fn is_image(&self) -> bool {
        matches!(self.kind, EventKind::Image(_))
    }
}
