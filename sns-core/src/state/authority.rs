//! Origin authority: what an origin cluster may say, checked before another cluster's event is
//! believed.
//!
//! Users belong to clusters round robin (`ClusterId::of_user`), and a cluster speaks only for
//! its own users. An event of origin `c` may only be:
//! - `UserJoined` of a user of `c`;
//! - `Followed` / `Unfollowed` whose follower is a user of `c` (the followee may be anyone);
//! - `Posted` whose author is a user of `c`;
//! - a state transfer (`Image`) holding only `c`'s users, follows whose follower is one of
//!   `c`'s users, and posts of `c`'s users with ids of origin `c` at or before the transfer's
//!   own sequence number.
//!
//! Origins outside `1..=clusters` are refused. These rules are pure: [`check_authority`]
//! depends only on the event and the number of clusters, so a master, its slave and a
//! recovering server all reach the same verdict, and [`State::apply`](super::State::apply)
//! applies them to every event of another origin, live and at recovery.
//!
//! Times are checked once, where an event enters a cluster ([`check_clock`]), never at
//! recovery: every time an event carries must lie between 2000-01-01 and the receiver's clock
//! plus a bounded skew. An origin whose clock is beyond it is refused loudly, never silently
//! reordered.

use std::fmt;
use std::time::Duration;

use crate::event::{Event, EventKind, OriginImage};
use crate::ids::{ClusterId, EventId, Timestamp, UserId};

/// The earliest event time believed: 2000-01-01T00:00:00Z, in microseconds since 1970.
pub const EARLIEST_EVENT_TIME: Timestamp = Timestamp(946_684_800_000_000);

/// The highest sequence number believed: 2^53, about 285 years of events at a million a
/// second. A higher one (a forged state transfer at 2^64 - 2, say) would set its origin's
/// high-water mark beyond anything the origin could ever send.
pub const MAX_SEQUENCE: u64 = 1 << 53;

/// The default bound on how far an origin's clock may run ahead of the receiver's.
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(600);

/// Why another cluster's event was not believed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The origin is not a cluster of this deployment.
    UnknownOrigin {
        /// The event.
        event: EventId,
        /// Clusters of the deployment (`1..=clusters`).
        clusters: u32,
    },
    /// The origin spoke for a user of another cluster.
    NotItsUser {
        /// The event.
        event: EventId,
        /// The user it spoke for.
        user: UserId,
        /// The cluster that user belongs to.
        owner: ClusterId,
    },
    /// A sequence number above [`MAX_SEQUENCE`].
    ImpossibleSequence {
        /// The event.
        event: EventId,
    },
    /// A state transfer held a post of another origin, or one later than the transfer.
    ForeignPost {
        /// The state transfer.
        event: EventId,
        /// The post it held.
        post: EventId,
    },
    /// A time before [`EARLIEST_EVENT_TIME`].
    TooEarly {
        /// The event.
        event: EventId,
        /// The time it carried.
        at: Timestamp,
    },
    /// A time beyond the receiver's clock plus the allowed skew: the origin's clock is wrong.
    ClockAhead {
        /// The event.
        event: EventId,
        /// The time it carried.
        at: Timestamp,
        /// The receiver's clock when it checked.
        now: Timestamp,
        /// The skew allowed.
        max_skew: Duration,
    },
}

impl Refusal {
    /// Whether the refusal says the origin's clock is wrong (rather than the event forged).
    pub fn is_clock(&self) -> bool {
        matches!(self, Self::TooEarly { .. } | Self::ClockAhead { .. })
    }

    /// The event refused.
    pub fn event(&self) -> EventId {
        match self {
            Self::UnknownOrigin { event, .. }
            | Self::NotItsUser { event, .. }
            | Self::ImpossibleSequence { event }
            | Self::ForeignPost { event, .. }
            | Self::TooEarly { event, .. }
            | Self::ClockAhead { event, .. } => *event,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownOrigin { event, clusters } => write!(
                f,
                "event {event} is of cluster {}, which is not one of clusters 1..={clusters}",
                event.origin
            ),
            Self::NotItsUser { event, user, owner } => write!(
                f,
                "event {event} of cluster {} speaks for user {user}, who belongs to cluster \
                 {owner}; a cluster speaks only for its own users",
                event.origin
            ),
            Self::ImpossibleSequence { event } => write!(
                f,
                "event {event} has a sequence number above 2^53, which no cluster reaches"
            ),
            Self::ForeignPost { event, post } => write!(
                f,
                "the state transfer {event} holds post {post}, of another origin or later than \
                 the transfer"
            ),
            Self::TooEarly { event, at } => write!(
                f,
                "event {event} is dated {} µs since 1970, before 2000: cluster {}'s clock is \
                 wrong",
                at.0, event.origin
            ),
            Self::ClockAhead {
                event,
                at,
                now,
                max_skew,
            } => write!(
                f,
                "event {event} is dated {} s ahead of this cluster's clock (at most {} s \
                 allowed): cluster {}'s clock is wrong",
                (at.0.saturating_sub(now.0)) / 1_000_000,
                max_skew.as_secs(),
                event.origin
            ),
        }
    }
}

impl From<Refusal> for crate::Error {
    fn from(refusal: Refusal) -> Self {
        crate::Error::InvalidInput(refusal.to_string())
    }
}

/// Checks that `event` says only what its origin may say in a deployment of `clusters`
/// clusters (see the module documentation). Pure.
pub fn check_authority(event: &Event, clusters: u32) -> Result<(), Refusal> {
    let clusters = clusters.max(1);
    let id = event.id;
    if id.origin.get() > clusters {
        return Err(Refusal::UnknownOrigin {
            event: id,
            clusters,
        });
    }
    if id.seq > MAX_SEQUENCE {
        return Err(Refusal::ImpossibleSequence { event: id });
    }
    let owned = |user: UserId| {
        let owner = ClusterId::of_user(user, clusters);
        if owner == id.origin {
            Ok(())
        } else {
            Err(Refusal::NotItsUser {
                event: id,
                user,
                owner,
            })
        }
    };
    match &event.kind {
        EventKind::UserJoined { user } => owned(*user),
        EventKind::Followed { follower, .. } | EventKind::Unfollowed { follower, .. } => {
            owned(*follower)
        }
        EventKind::Posted { author, .. } => owned(*author),
        EventKind::Image(image) => {
            for user in &image.users {
                owned(*user)?;
            }
            for (follower, _) in image.follows.iter().chain(&image.continued_follows) {
                owned(*follower)?;
            }
            for post in &image.posts {
                if post.id.origin != id.origin || post.id.seq > id.seq {
                    return Err(Refusal::ForeignPost {
                        event: id,
                        post: post.id,
                    });
                }
                owned(post.author)?;
            }
            Ok(())
        }
    }
}

/// Checks that every time `event` carries lies between [`EARLIEST_EVENT_TIME`] and `now` plus
/// `max_skew`: a later one means the origin's clock runs ahead, and believing it would put its
/// posts above every other post of every timeline (and, before this rule, moved the
/// receiver's own clock) for as long as the skew lasts.
pub fn check_clock(event: &Event, now: Timestamp, max_skew: Duration) -> Result<(), Refusal> {
    let skew = i64::try_from(max_skew.as_micros()).unwrap_or(i64::MAX);
    let limit = now.0.saturating_add(skew);
    let ahead = |at: Timestamp| {
        if at < EARLIEST_EVENT_TIME {
            Err(Refusal::TooEarly {
                event: event.id,
                at,
            })
        } else if at.0 > limit {
            Err(Refusal::ClockAhead {
                event: event.id,
                at,
                now,
                max_skew,
            })
        } else {
            Ok(())
        }
    };
    ahead(event.at)?;
    if let EventKind::Image(image) = &event.kind {
        image_times(image).try_for_each(ahead)?;
    }
    Ok(())
}

/// Every time a state transfer carries: the start of each follow and each post's time.
fn image_times(image: &OriginImage) -> impl Iterator<Item = Timestamp> + '_ {
    let since = image
        .follows
        .iter()
        .chain(&image.continued_follows)
        .flat_map(|(_, followees)| followees.iter().map(|(_, since)| *since));
    since.chain(image.posts.iter().map(|post| post.at))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::event::Post;

    const NOW: Timestamp = Timestamp(1_765_000_000_000_000);

    fn u(id: u32) -> UserId {
        UserId::new(id).expect("user")
    }

    fn c(id: u32) -> ClusterId {
        ClusterId::new(id).expect("cluster")
    }

    fn event(origin: u32, seq: u64, kind: EventKind) -> Event {
        Event {
            id: EventId {
                origin: c(origin),
                seq,
            },
            at: NOW,
            kind,
        }
    }

    fn post(author: u32, text: &str) -> EventKind {
        EventKind::Posted {
            author: u(author),
            text: Arc::from(text),
            key: None,
        }
    }

    #[test]
    fn an_origin_speaks_for_its_own_users() {
        // Three clusters: users 2, 5, 8 belong to cluster 2.
        let ok = [
            EventKind::UserJoined { user: u(5) },
            EventKind::Followed {
                follower: u(2),
                followee: u(1),
            },
            EventKind::Unfollowed {
                follower: u(8),
                followee: u(3),
            },
            post(2, "hello"),
        ];
        for kind in ok {
            assert_eq!(check_authority(&event(2, 1, kind), 3), Ok(()));
        }
    }

    #[test]
    fn an_origin_speaking_for_another_clusters_user_is_refused() {
        let bad = [
            (EventKind::UserJoined { user: u(1) }, 1),
            (
                EventKind::Followed {
                    follower: u(1),
                    followee: u(2),
                },
                1,
            ),
            (
                EventKind::Unfollowed {
                    follower: u(3),
                    followee: u(2),
                },
                3,
            ),
            (post(1, "forged"), 1),
        ];
        for (kind, user) in bad {
            let refusal = check_authority(&event(2, 1, kind), 3).expect_err("refused");
            assert_eq!(
                refusal,
                Refusal::NotItsUser {
                    event: EventId {
                        origin: c(2),
                        seq: 1
                    },
                    user: u(user),
                    owner: ClusterId::of_user(u(user), 3),
                }
            );
            assert!(!refusal.is_clock());
        }
    }

    #[test]
    fn origins_outside_the_deployment_are_refused() {
        let refusal = check_authority(&event(99, 1, EventKind::UserJoined { user: u(99) }), 3)
            .expect_err("refused");
        assert!(matches!(
            refusal,
            Refusal::UnknownOrigin { clusters: 3, .. }
        ));
        assert!(refusal.to_string().contains("not one of clusters 1..=3"));
    }

    #[test]
    fn a_state_transfer_holds_only_its_origins_users_follows_and_posts() {
        let image = |image: OriginImage| event(2, 40, EventKind::Image(Arc::new(image)));
        let own_post = Post {
            id: EventId {
                origin: c(2),
                seq: 12,
            },
            author: u(5),
            at: NOW,
            text: Arc::from("mine"),
        };
        let good = OriginImage {
            users: vec![u(2), u(5)],
            follows: vec![(u(2), vec![(u(1), NOW), (u(3), NOW)])],
            posts: vec![own_post.clone()],
            ..OriginImage::default()
        };
        assert_eq!(check_authority(&image(good.clone()), 3), Ok(()));
        let local_user = OriginImage {
            users: vec![u(2), u(1)],
            ..good.clone()
        };
        assert!(matches!(
            check_authority(&image(local_user), 3),
            Err(Refusal::NotItsUser { .. })
        ));
        let local_follows = OriginImage {
            follows: vec![(u(1), vec![])],
            ..good.clone()
        };
        assert!(matches!(
            check_authority(&image(local_follows), 3),
            Err(Refusal::NotItsUser { .. })
        ));
        for bad_post in [
            Post {
                author: u(1),
                ..own_post.clone()
            },
            Post {
                id: EventId {
                    origin: c(3),
                    seq: 12,
                },
                ..own_post.clone()
            },
            Post {
                id: EventId {
                    origin: c(2),
                    seq: 41,
                },
                ..own_post.clone()
            },
        ] {
            let with_post = OriginImage {
                posts: vec![bad_post],
                ..good.clone()
            };
            assert!(check_authority(&image(with_post), 3).is_err());
        }
    }

    #[test]
    fn times_before_2000_are_refused_as_a_wrong_clock() {
        let skew = DEFAULT_MAX_CLOCK_SKEW;
        let mut old = event(2, 1, post(2, "1999"));
        old.at = Timestamp(EARLIEST_EVENT_TIME.0 - 1);
        let refusal = check_clock(&old, NOW, skew).expect_err("refused");
        assert!(refusal.is_clock());
        old.at = Timestamp(i64::MIN);
        assert!(check_clock(&old, NOW, skew).is_err());
        old.at = EARLIEST_EVENT_TIME;
        assert_eq!(check_clock(&old, NOW, skew), Ok(()));
        let image = OriginImage {
            users: vec![u(2)],
            follows: vec![],
            posts: vec![Post {
                id: EventId {
                    origin: c(2),
                    seq: 1,
                },
                author: u(2),
                at: Timestamp(0),
                text: Arc::from("1970"),
            }],
            ..OriginImage::default()
        };
        let transfer = event(2, 5, EventKind::Image(Arc::new(image)));
        assert!(check_clock(&transfer, NOW, skew).is_err());
    }

    #[test]
    fn times_beyond_the_skew_are_refused_and_within_it_accepted() {
        let skew = Duration::from_secs(600);
        let mut e = event(2, 1, post(2, "soon"));
        e.at = Timestamp(NOW.0 + 600_000_000);
        assert_eq!(check_clock(&e, NOW, skew), Ok(()));
        e.at = Timestamp(NOW.0 + 600_000_001);
        let refusal = check_clock(&e, NOW, skew).expect_err("refused");
        assert!(refusal.is_clock());
        assert!(refusal.to_string().contains("clock is wrong"));
        e.at = Timestamp(i64::MAX);
        assert!(check_clock(&e, NOW, skew).is_err());
        let image = OriginImage {
            users: vec![u(2)],
            follows: vec![(u(2), vec![(u(1), Timestamp(i64::MAX))])],
            posts: vec![],
            ..OriginImage::default()
        };
        let transfer = event(2, 5, EventKind::Image(Arc::new(image)));
        assert!(check_clock(&transfer, NOW, skew).is_err());
    }

    #[test]
    fn impossible_sequence_numbers_are_refused() {
        let far = event(3, u64::MAX - 1, EventKind::UserJoined { user: u(3) });
        assert_eq!(
            check_authority(&far, 3),
            Err(Refusal::ImpossibleSequence { event: far.id })
        );
        let last = event(3, MAX_SEQUENCE, EventKind::UserJoined { user: u(3) });
        assert_eq!(check_authority(&last, 3), Ok(()));
    }

    #[test]
    fn one_cluster_owns_every_user() {
        assert_eq!(
            check_authority(&event(1, 1, EventKind::UserJoined { user: u(7) }), 1),
            Ok(())
        );
        assert!(check_authority(&event(2, 1, EventKind::UserJoined { user: u(7) }), 1).is_err());
    }
}
