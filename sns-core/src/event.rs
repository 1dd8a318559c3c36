//! Events: every change to the system is one, and the log is a sequence of them.
//!
//! An [`Event`] is identified by its origin cluster and that origin's gap-free sequence number;
//! a [`LogEntry`] adds where the event sits in one server's log and under which epoch it was
//! written there.
//!
//! Binary form (log records): a tag byte per kind. A post with an idempotency key has its own
//! tag ([`EventKind::Posted`] with `key: Some`), so a post without one, and every record written
//! before keys existed, keeps the original `Posted` layout and still decodes.

use std::sync::Arc;

use crate::codec::{Decoder, Encoder};
use crate::error::{Error, Result};
use crate::ids::{ClusterId, Epoch, EventId, LogIndex, PostId, PostKey, Timestamp, UserId};

/// Longest post text accepted, in bytes of UTF-8.
pub const MAX_POST_BYTES: usize = 4096;

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

/// Checks a post's text: strips one trailing newline (and a `\r` before it), rejects text over
/// [`MAX_POST_BYTES`], with an inner line break or with a terminal control character (see
/// [`check_post_text`]). Returns `None` for an empty line (ignored).
pub fn normalize_post_text(raw: &[u8]) -> Result<Option<&str>> {
    let text =
        std::str::from_utf8(raw).map_err(|_| Error::invalid("post text is not valid UTF-8"))?;
    let text = text.strip_suffix('\n').unwrap_or(text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    check_post_text(text)?;
    Ok((!text.is_empty()).then_some(text))
}

/// Checks the text of a post as stored: at most [`MAX_POST_BYTES`], one line, and no terminal
/// control character (see [`is_terminal_control`]), since clients print posts verbatim and an
/// escape sequence in a post would be run by every follower's terminal.
pub fn check_post_text(text: &str) -> Result<()> {
    if text.len() > MAX_POST_BYTES {
        return Err(Error::invalid(format!(
            "post is {} bytes; the limit is {MAX_POST_BYTES}",
            text.len()
        )));
    }
    if text.contains(['\n', '\r']) {
        return Err(Error::invalid("post text must be a single line"));
    }
    if let Some(control) = text.chars().find(|c| is_terminal_control(*c)) {
        return Err(Error::invalid(format!(
            "post text contains the control character U+{:04X}; posts may not carry terminal \
             control characters or bidirectional overrides (only tab is allowed)",
            u32::from(control)
        )));
    }
    Ok(())
}

/// Whether `c` is a character a terminal acts on or that reorders what it shows: C0 controls
/// except tab, DEL, C1 controls (U+0080 to U+009F; U+009B is a CSI on many terminals), and the
/// bidirectional embeddings, overrides and isolates (U+202A to U+202E, U+2066 to U+2069: the
/// "Trojan Source" trick, CVE-2021-42574).
pub fn is_terminal_control(c: char) -> bool {
    (c.is_control() && c != '\t')
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
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

const TAG_USER_JOINED: u8 = 1;
const TAG_FOLLOWED: u8 = 2;
const TAG_UNFOLLOWED: u8 = 3;
const TAG_POSTED: u8 = 4;
/// A post with an idempotency key: author, key, text.
const TAG_POSTED_WITH_KEY: u8 = 5;
/// A state transfer ([`OriginImage`]) in one piece, as earlier versions wrote every one.
const TAG_IMAGE: u8 = 6;
/// A piece of a state transfer: the `more` flag, the piece, then its continued follow lists.
const TAG_IMAGE_PIECE: u8 = 7;

impl LogEntry {
    /// Appends the entry's binary form to `enc`.
    pub(crate) fn encode(&self, enc: &mut Encoder) {
        enc.u64(self.index.0);
        enc.u64(self.epoch.0);
        self.event.encode(enc);
    }

    /// Reads an entry written by [`LogEntry::encode`].
    pub(crate) fn decode(dec: &mut Decoder<'_>) -> Result<Self> {
        Ok(Self {
            index: LogIndex(dec.u64()?),
            epoch: Epoch(dec.u64()?),
            event: Event::decode(dec)?,
        })
    }

    /// The entry as a standalone byte string.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut enc = Encoder::default();
        self.encode(&mut enc);
        enc.buf
    }

    /// Parses a standalone byte string made by [`LogEntry::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut dec = Decoder::new(bytes);
        let entry = Self::decode(&mut dec)?;
        dec.finish()?;
        Ok(entry)
    }
}

fn user(dec: &mut Decoder<'_>) -> Result<UserId> {
    let raw = dec.u32()?;
    UserId::new(raw).ok_or_else(|| Error::Corrupt(format!("user id {raw} out of range")))
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
            matches!(self.kind, EventKind::Image(_)) && self.id.seq == previous.id.seq
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
}

type FollowLists = Vec<(UserId, Vec<(UserId, Timestamp)>)>;

fn encode_follows(enc: &mut Encoder, lists: &FollowLists) {
    enc.len(lists.len());
    for (follower, followees) in lists {
        enc.u32(follower.get());
        enc.len(followees.len());
        for (followee, since) in followees {
            enc.u32(followee.get());
            enc.i64(since.0);
        }
    }
}

fn decode_follows(dec: &mut Decoder<'_>) -> Result<FollowLists> {
    let mut lists = Vec::new();
    for _ in 0..dec.len(8)? {
        let follower = user(dec)?;
        let mut followees = Vec::new();
        for _ in 0..dec.len(12)? {
            followees.push((user(dec)?, Timestamp(dec.i64()?)));
        }
        lists.push((follower, followees));
    }
    Ok(lists)
}

fn decode_image(dec: &mut Decoder<'_>) -> Result<OriginImage> {
    let mut image = OriginImage::default();
    for _ in 0..dec.len(4)? {
        image.users.push(user(dec)?);
    }
    image.follows = decode_follows(dec)?;
    for _ in 0..dec.len(28)? {
        let origin =
            ClusterId::new(dec.u32()?).ok_or_else(|| Error::Corrupt("cluster id 0".to_string()))?;
        let seq = dec.u64()?;
        image.posts.push(Post {
            id: EventId { origin, seq },
            author: user(dec)?,
            at: Timestamp(dec.i64()?),
            text: Arc::from(dec.str()?),
        });
    }
    Ok(image)
}

impl Event {
    pub(crate) fn encode(&self, enc: &mut Encoder) {
        enc.u32(self.id.origin.get());
        enc.u64(self.id.seq);
        enc.i64(self.at.0);
        match &self.kind {
            EventKind::UserJoined { user } => {
                enc.u8(TAG_USER_JOINED);
                enc.u32(user.get());
            }
            EventKind::Followed { follower, followee } => {
                enc.u8(TAG_FOLLOWED);
                enc.u32(follower.get());
                enc.u32(followee.get());
            }
            EventKind::Unfollowed { follower, followee } => {
                enc.u8(TAG_UNFOLLOWED);
                enc.u32(follower.get());
                enc.u32(followee.get());
            }
            EventKind::Posted {
                author,
                text,
                key: None,
            } => {
                enc.u8(TAG_POSTED);
                enc.u32(author.get());
                enc.str(text);
            }
            EventKind::Posted {
                author,
                text,
                key: Some(key),
            } => {
                enc.u8(TAG_POSTED_WITH_KEY);
                enc.u32(author.get());
                enc.u64(key.get());
                enc.str(text);
            }
            EventKind::Image(image) => {
                let whole = !image.more && image.continued_follows.is_empty();
                if whole {
                    enc.u8(TAG_IMAGE);
                } else {
                    enc.u8(TAG_IMAGE_PIECE);
                    enc.u8(u8::from(image.more));
                    encode_follows(enc, &image.continued_follows);
                }
                enc.len(image.users.len());
                for user in &image.users {
                    enc.u32(user.get());
                }
                encode_follows(enc, &image.follows);
                enc.len(image.posts.len());
                for post in &image.posts {
                    enc.u32(post.id.origin.get());
                    enc.u64(post.id.seq);
                    enc.u32(post.author.get());
                    enc.i64(post.at.0);
                    enc.str(&post.text);
                }
            }
        }
    }

    pub(crate) fn decode(dec: &mut Decoder<'_>) -> Result<Self> {
        let origin = dec.u32()?;
        let origin =
            ClusterId::new(origin).ok_or_else(|| Error::Corrupt("cluster id 0".to_string()))?;
        let seq = dec.u64()?;
        let at = Timestamp(dec.i64()?);
        let kind = match dec.u8()? {
            TAG_USER_JOINED => EventKind::UserJoined { user: user(dec)? },
            TAG_FOLLOWED => EventKind::Followed {
                follower: user(dec)?,
                followee: user(dec)?,
            },
            TAG_UNFOLLOWED => EventKind::Unfollowed {
                follower: user(dec)?,
                followee: user(dec)?,
            },
            TAG_POSTED => EventKind::Posted {
                author: user(dec)?,
                text: Arc::from(dec.str()?),
                key: None,
            },
            TAG_POSTED_WITH_KEY => EventKind::Posted {
                author: user(dec)?,
                key: Some(
                    PostKey::new(dec.u64()?)
                        .ok_or_else(|| Error::Corrupt("post key 0".to_string()))?,
                ),
                text: Arc::from(dec.str()?),
            },
            TAG_IMAGE => EventKind::Image(Arc::new(decode_image(dec)?)),
            TAG_IMAGE_PIECE => {
                let more = match dec.u8()? {
                    0 => false,
                    1 => true,
                    flag => return Err(Error::Corrupt(format!("image piece flag {flag}"))),
                };
                let continued_follows = decode_follows(dec)?;
                EventKind::Image(Arc::new(OriginImage {
                    more,
                    continued_follows,
                    ..decode_image(dec)?
                }))
            }
            tag => return Err(Error::Corrupt(format!("unknown event tag {tag}"))),
        };
        Ok(Self {
            id: EventId { origin, seq },
            at,
            kind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn post_text_is_normalized() {
        assert_eq!(normalize_post_text(b"hi\n").ok().flatten(), Some("hi"));
        assert_eq!(normalize_post_text(b"hi\r\n").ok().flatten(), Some("hi"));
        assert_eq!(normalize_post_text(b"hi").ok().flatten(), Some("hi"));
        assert!(matches!(normalize_post_text(b"\n"), Ok(None)));
        assert!(matches!(normalize_post_text(b""), Ok(None)));
        assert!(normalize_post_text(b"a\nb").is_err());
        assert!(normalize_post_text(&[0xff, 0xfe]).is_err());
        assert!(normalize_post_text(&[b'x'; MAX_POST_BYTES]).is_ok());
        assert!(normalize_post_text(&[b'x'; MAX_POST_BYTES + 1]).is_err());
        // Terminal control characters are refused, wherever they are; tab and the trailing
        // newline are not.
        assert_eq!(normalize_post_text(b"a\tb\n").ok().flatten(), Some("a\tb"));
        for bad in [
            &b"\x1b[2J"[..],
            b"ring\x07",
            b"nul\x00",
            b"del\x7f",
            b"\x1b]0;title\x07\n",
            b"back\x08space",
        ] {
            let refused = normalize_post_text(bad);
            assert!(
                matches!(&refused, Err(Error::InvalidInput(m)) if m.contains("control character")),
                "{bad:?}: {refused:?}"
            );
        }
        // Other text, accents and emoji included, passes.
        assert!(normalize_post_text("café 🙂".as_bytes()).is_ok());
    }

    fn posted(key: Option<PostKey>) -> LogEntry {
        LogEntry {
            index: LogIndex(7),
            epoch: Epoch(2),
            event: Event {
                id: EventId {
                    origin: ClusterId::new(3).expect("cluster"),
                    seq: 5,
                },
                at: Timestamp(1_000),
                kind: EventKind::Posted {
                    author: UserId::new(9).expect("user"),
                    text: Arc::from("hello"),
                    key,
                },
            },
        }
    }

    #[test]
    fn posts_with_and_without_a_key_round_trip() {
        for key in [None, PostKey::new(1), PostKey::new(u64::MAX)] {
            let entry = posted(key);
            assert_eq!(LogEntry::from_bytes(&entry.to_bytes()).ok(), Some(entry));
        }
    }

    /// A post without a key is written exactly as before keys existed: index, epoch, origin,
    /// seq, time, tag 4, author, text. Old logs decode unchanged.
    #[test]
    fn a_post_without_a_key_keeps_the_original_layout() {
        let mut old = Vec::new();
        old.extend_from_slice(&7u64.to_le_bytes());
        old.extend_from_slice(&2u64.to_le_bytes());
        old.extend_from_slice(&3u32.to_le_bytes());
        old.extend_from_slice(&5u64.to_le_bytes());
        old.extend_from_slice(&1_000i64.to_le_bytes());
        old.push(TAG_POSTED);
        old.extend_from_slice(&9u32.to_le_bytes());
        old.extend_from_slice(&5u32.to_le_bytes());
        old.extend_from_slice(b"hello");
        assert_eq!(posted(None).to_bytes(), old);
        assert_eq!(LogEntry::from_bytes(&old).ok(), Some(posted(None)));
    }

    #[test]
    fn a_keyed_post_with_key_zero_is_corrupt() {
        let mut bytes = posted(PostKey::new(1)).to_bytes();
        // index, epoch, origin, seq, time, tag, author: then the key.
        let at = 8 + 8 + 4 + 8 + 8 + 1 + 4;
        bytes[at..at + 8].copy_from_slice(&0u64.to_le_bytes());
        assert!(matches!(
            LogEntry::from_bytes(&bytes),
            Err(Error::Corrupt(_))
        ));
    }
}
