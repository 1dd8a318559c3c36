//! One user of the benchmark's population, through the public client library: a failing-over
//! [`Session`] on Tiny SNS, or a plain [`Client`] for servers that speak only the course's
//! protocol (no acknowledgements of keyed posts, so a session's posting window would fill up).

use sns_core::session::Target;
use sns_core::{
    Client, Error, Listing, Network, ReceivedPost, Session, SessionConfig, SessionTimeline,
    TimelinePoster, TimelineSender, TimelineStream, UserId,
};

/// A logged-in user.
#[derive(Debug)]
pub(super) enum Member {
    /// Our protocol, with failover.
    Session(Session),
    /// The course's protocol, no failover.
    Plain(Client),
}

/// Posts on a user's open timeline.
#[derive(Debug, Clone)]
pub(super) enum Poster {
    /// See [`Member::Session`].
    Session(TimelinePoster),
    /// See [`Member::Plain`].
    Plain(TimelineSender),
}

/// Reads a user's open timeline.
#[derive(Debug)]
pub(super) enum Inbox {
    /// See [`Member::Session`].
    Session(SessionTimeline),
    /// See [`Member::Plain`].
    Plain {
        /// The posts.
        stream: Box<TimelineStream>,
        /// Held so the stream stays open.
        _sender: TimelineSender,
    },
}

impl Member {
    /// Logs `user` in on the master the coordinator at `coordinator` names.
    pub(super) async fn connect(
        network: &Network,
        coordinator: &str,
        user: UserId,
        course: bool,
    ) -> Result<Self, Error> {
        if course {
            return Ok(Self::Plain(
                Client::login_via(network, coordinator, user).await?,
            ));
        }
        let target = Target::Coordinator(coordinator.to_string());
        Ok(Self::Session(
            Session::connect(network, target, user, SessionConfig::default()).await?,
        ))
    }

    /// Follows `target`; following already is fine (a rerun on a live deployment).
    pub(super) async fn follow(&self, target: UserId) -> Result<(), Error> {
        let result = match self {
            Self::Session(session) => session.follow(target).await,
            Self::Plain(client) => client.follow(target).await,
        };
        match result {
            Err(Error::AlreadyFollowing) => Ok(()),
            other => other,
        }
    }

    /// This user's followers.
    pub(super) async fn followers(&self) -> Result<Vec<UserId>, Error> {
        Ok(self.list().await?.followers)
    }

    /// Every user this user's cluster knows.
    pub(super) async fn all_users(&self) -> Result<Vec<UserId>, Error> {
        Ok(self.list().await?.all_users)
    }

    async fn list(&self) -> Result<Listing, Error> {
        match self {
            Self::Session(session) => session.list().await,
            Self::Plain(client) => client.list().await,
        }
    }

    /// Opens the timeline.
    pub(super) async fn timeline(&self) -> Result<(Poster, Inbox), Error> {
        match self {
            Self::Session(session) => {
                let timeline = session.timeline().await?;
                Ok((Poster::Session(timeline.poster()), Inbox::Session(timeline)))
            }
            Self::Plain(client) => {
                let (sender, stream) = client.timeline().await?;
                Ok((
                    Poster::Plain(sender.clone()),
                    Inbox::Plain {
                        stream: Box::new(stream),
                        _sender: sender,
                    },
                ))
            }
        }
    }

    /// Logs out, so the user can log in again at once in the next run.
    pub(super) async fn logout(&self) -> Result<(), Error> {
        match self {
            Self::Session(session) => session.logout().await,
            Self::Plain(client) => client.logout().await,
        }
    }
}

impl Poster {
    /// Posts `text`.
    pub(super) async fn post(&self, text: &str) -> Result<(), Error> {
        match self {
            Self::Session(poster) => poster.post(text).await,
            Self::Plain(sender) => sender.post(text).await,
        }
    }
}

impl Inbox {
    /// The next post; `None` when the stream ended.
    pub(super) async fn next(&mut self) -> Option<Result<ReceivedPost, Error>> {
        match self {
            Self::Session(timeline) => timeline.next().await,
            Self::Plain { stream, .. } => stream.next().await,
        }
    }
}
