//! The binary form of events and log entries (log records): a tag byte per kind, then the
//! kind's fields, little-endian.
//!
//! Tags are never reused or changed: a post without a key keeps the original `Posted` layout
//! (tag 4), a keyed post has its own tag (5), and a whole state transfer written in one record
//! by earlier versions (tag 6) still decodes beside the pieces written now (tag 7). Decoding
//! refuses a record it cannot account for (an unknown tag, a zero id or key) as corrupt.

use std::sync::Arc;

use super::{Event, EventKind, LogEntry, OriginImage, Post};
use crate::codec::{Decoder, Encoder};
use crate::error::{Error, Result};
use crate::ids::{ClusterId, Epoch, EventId, LogIndex, PostKey, Timestamp, UserId};

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
