//! The wire form of events as they cross clusters (`SyncBatch`, also what a `SignedBatch`
//! carries), both ways. Decoding checks shape only: what an event may say is the receiving
//! server's to check (`state::check_authority`).

use std::collections::BTreeMap;
use std::sync::Arc;

use prost::Message as _;
use sns_proto::sns_v1::sync_event::Kind;
use sns_proto::sns_v1::{
    FollowChange, FollowList, Followee, ImagePost, OriginImage as WireImage, OriginMark, PostBody,
    SyncBatch, SyncEvent,
};

use crate::error::{Error, Result};
use crate::event::{Event, EventKind, OriginImage, Post};
use crate::ids::{ClusterId, EventId, Timestamp, UserId};

/// One event in its wire form (a post's idempotency key stays in its cluster).
pub(crate) fn event_to_wire(event: &Event) -> SyncEvent {
    let kind = match &event.kind {
        EventKind::UserJoined { user } => Kind::UserJoined(user.get()),
        EventKind::Followed { follower, followee } => Kind::Followed(FollowChange {
            follower: follower.get(),
            followee: followee.get(),
        }),
        EventKind::Unfollowed { follower, followee } => Kind::Unfollowed(FollowChange {
            follower: follower.get(),
            followee: followee.get(),
        }),
        EventKind::Posted { author, text, .. } => Kind::Posted(PostBody {
            author: author.get(),
            text: text.to_string(),
        }),
        EventKind::Image(image) => Kind::Image(WireImage {
            users: image.users.iter().map(|u| u.get()).collect(),
            follows: follows_to_wire(&image.follows),
            continued_follows: follows_to_wire(&image.continued_follows),
            more: image.more,
            posts: image
                .posts
                .iter()
                .map(|post| ImagePost {
                    seq: post.id.seq,
                    author: post.author.get(),
                    at_micros: post.at.0,
                    text: post.text.to_string(),
                })
                .collect(),
        }),
    };
    SyncEvent {
        origin: event.id.origin.get(),
        seq: event.id.seq,
        at_micros: event.at.0,
        kind: Some(kind),
    }
}

type FollowLists = Vec<(UserId, Vec<(UserId, Timestamp)>)>;

fn follows_to_wire(lists: &FollowLists) -> Vec<FollowList> {
    lists
        .iter()
        .map(|(follower, followees)| FollowList {
            follower: follower.get(),
            followees: followees
                .iter()
                .map(|(followee, since)| Followee {
                    followee: followee.get(),
                    since_micros: since.0,
                })
                .collect(),
        })
        .collect()
}

fn follows_from_wire(lists: Vec<FollowList>) -> Result<FollowLists> {
    let user = |raw: u32| {
        UserId::new(raw).ok_or_else(|| Error::invalid(format!("user id {raw} is out of range")))
    };
    lists
        .into_iter()
        .map(|list| {
            let followees = list
                .followees
                .into_iter()
                .map(|f| Ok((user(f.followee)?, Timestamp(f.since_micros))))
                .collect::<Result<Vec<_>>>()?;
            Ok((user(list.follower)?, followees))
        })
        .collect()
}

/// One event from its wire form, checked.
pub(crate) fn event_from_wire(event: SyncEvent) -> Result<Event> {
    let user = |raw: u32| {
        UserId::new(raw).ok_or_else(|| Error::invalid(format!("user id {raw} is out of range")))
    };
    let origin =
        ClusterId::new(event.origin).ok_or_else(|| Error::invalid("an event of cluster 0"))?;
    if event.seq == 0 {
        return Err(Error::invalid("sequence numbers start at 1"));
    }
    let kind = match event.kind {
        Some(Kind::UserJoined(u)) => EventKind::UserJoined { user: user(u)? },
        Some(Kind::Followed(f)) => EventKind::Followed {
            follower: user(f.follower)?,
            followee: user(f.followee)?,
        },
        Some(Kind::Unfollowed(f)) => EventKind::Unfollowed {
            follower: user(f.follower)?,
            followee: user(f.followee)?,
        },
        Some(Kind::Posted(p)) => EventKind::Posted {
            author: user(p.author)?,
            text: Arc::from(p.text),
            key: None,
        },
        Some(Kind::Image(image)) => {
            let mut out = OriginImage::default();
            for u in image.users {
                out.users.push(user(u)?);
            }
            out.follows = follows_from_wire(image.follows)?;
            out.continued_follows = follows_from_wire(image.continued_follows)?;
            out.more = image.more;
            for post in image.posts {
                if post.seq == 0 || post.seq > event.seq {
                    return Err(Error::invalid(format!(
                        "an image as of {} holds post {}",
                        event.seq, post.seq
                    )));
                }
                out.posts.push(Post {
                    id: EventId {
                        origin,
                        seq: post.seq,
                    },
                    author: user(post.author)?,
                    at: Timestamp(post.at_micros),
                    text: Arc::from(post.text),
                });
            }
            EventKind::Image(Arc::new(out))
        }
        None => return Err(Error::invalid(format!("event {} has no kind", event.seq))),
    };
    Ok(Event {
        id: EventId {
            origin,
            seq: event.seq,
        },
        at: Timestamp(event.at_micros),
        kind,
    })
}

/// A batch of one origin's events in its wire form.
pub(crate) fn batch_to_wire(origin: ClusterId, events: &[Event]) -> SyncBatch {
    SyncBatch {
        origin: origin.get(),
        events: events.iter().map(event_to_wire).collect(),
    }
}

/// A batch from its wire form: every event of the batch's origin, with consecutive sequence
/// numbers. Its shape only: how many events a server applies at once, and whether they continue
/// what it holds, are the receiving server's to check, once
/// ([`Server::apply_remote`](crate::server::Server::apply_remote)).
pub(crate) fn batch_from_wire(batch: SyncBatch) -> Result<Vec<Event>> {
    let events = batch
        .events
        .into_iter()
        .map(event_from_wire)
        .collect::<Result<Vec<_>>>()?;
    for pair in events.windows(2) {
        if !pair[1].follows_event(&pair[0]) {
            return Err(Error::invalid(format!(
                "a batch's events must be consecutive: {} follows {}",
                pair[1].id, pair[0].id
            )));
        }
    }
    if events.iter().any(|e| e.id.origin.get() != batch.origin) {
        return Err(Error::invalid(format!(
            "a batch of cluster {} holds another cluster's event",
            batch.origin
        )));
    }
    Ok(events)
}

/// A batch as bytes (a RabbitMQ message body).
pub fn encode_batch(origin: ClusterId, events: &[Event]) -> Vec<u8> {
    batch_to_wire(origin, events).encode_to_vec()
}

/// A batch from bytes made by [`encode_batch`], checked as `Log.Apply` checks one. Returns
/// the batch's origin and its events.
pub fn decode_batch(bytes: &[u8]) -> Result<(ClusterId, Vec<Event>)> {
    let batch =
        SyncBatch::decode(bytes).map_err(|e| Error::Corrupt(format!("not a sync batch: {e}")))?;
    let origin = ClusterId::new(batch.origin)
        .ok_or_else(|| Error::Corrupt("a sync batch of cluster 0".to_string()))?;
    let events = batch_from_wire(batch).map_err(|e| Error::Corrupt(e.to_string()))?;
    Ok((origin, events))
}

pub(crate) fn marks_to_wire(marks: &BTreeMap<ClusterId, u64>) -> Vec<OriginMark> {
    marks
        .iter()
        .map(|(origin, seq)| OriginMark {
            origin: origin.get(),
            seq: *seq,
        })
        .collect()
}

pub(crate) fn marks_from_wire(marks: &[OriginMark]) -> Result<BTreeMap<ClusterId, u64>> {
    marks
        .iter()
        .map(|m| {
            ClusterId::new(m.origin)
                .map(|origin| (origin, m.seq))
                .ok_or_else(|| Error::Corrupt("a high-water mark of cluster 0".to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, kind: EventKind) -> Event {
        Event {
            id: EventId {
                origin: ClusterId::new(2).expect("cluster"),
                seq,
            },
            at: Timestamp(-5 + seq as i64),
            kind,
        }
    }

    fn u(id: u32) -> UserId {
        UserId::new(id).expect("user")
    }

    #[test]
    fn batches_round_trip_and_drop_post_keys() {
        let events = vec![
            event(1, EventKind::UserJoined { user: u(2) }),
            event(
                2,
                EventKind::Followed {
                    follower: u(2),
                    followee: u(1),
                },
            ),
            event(
                3,
                EventKind::Unfollowed {
                    follower: u(2),
                    followee: u(1),
                },
            ),
            event(
                4,
                EventKind::Posted {
                    author: u(2),
                    text: Arc::from("hello ✓"),
                    key: crate::ids::PostKey::new(7),
                },
            ),
        ];
        let origin = ClusterId::new(2).expect("cluster");
        let (got_origin, got) = decode_batch(&encode_batch(origin, &events)).expect("decodes");
        assert_eq!(got_origin, origin);
        let mut expected = events;
        if let EventKind::Posted { key, .. } = &mut expected[3].kind {
            *key = None;
        }
        assert_eq!(got, expected);
    }

    #[test]
    fn a_state_transfer_round_trips_through_the_wire_and_the_log() {
        let origin = ClusterId::new(2).expect("cluster");
        let post = |seq: u64, author: u32| Post {
            id: EventId { origin, seq },
            author: u(author),
            at: Timestamp(100 + seq as i64),
            text: Arc::from(format!("post {seq}")),
        };
        let image = event(
            40,
            EventKind::Image(Arc::new(OriginImage {
                users: vec![u(2), u(5)],
                follows: vec![(u(2), vec![(u(1), Timestamp(7)), (u(5), Timestamp(-3))])],
                posts: vec![post(12, 2), post(39, 5)],
                ..OriginImage::default()
            })),
        );
        let next = event(41, EventKind::UserJoined { user: u(8) });
        let batch = [image.clone(), next];
        let (_, got) = decode_batch(&encode_batch(origin, &batch)).expect("decodes");
        assert_eq!(got, batch);
        let entry = crate::event::LogEntry {
            index: crate::ids::LogIndex(3),
            epoch: crate::ids::Epoch(1),
            event: image,
        };
        let bytes = entry.to_bytes();
        assert_eq!(
            crate::event::LogEntry::from_bytes(&bytes).expect("decodes"),
            entry
        );
        // A post claimed later than the image is refused.
        let bad = event(
            3,
            EventKind::Image(Arc::new(OriginImage {
                posts: vec![post(9, 2)],
                ..OriginImage::default()
            })),
        );
        assert!(decode_batch(&encode_batch(origin, &[bad])).is_err());
    }

    #[test]
    fn malformed_batches_are_refused() {
        let origin = ClusterId::new(2).expect("cluster");
        let a = event(1, EventKind::UserJoined { user: u(2) });
        let c = event(3, EventKind::UserJoined { user: u(5) });
        assert!(decode_batch(&encode_batch(origin, &[a.clone(), c])).is_err());
        let other = ClusterId::new(3).expect("cluster");
        assert!(decode_batch(&encode_batch(other, &[a])).is_err());
        assert!(decode_batch(&[0xff, 0xff, 0xff]).is_err());
        let zero_user = SyncBatch {
            origin: 2,
            events: vec![SyncEvent {
                origin: 2,
                seq: 1,
                at_micros: 0,
                kind: Some(Kind::UserJoined(0)),
            }],
        };
        assert!(batch_from_wire(zero_user).is_err());
    }
}
