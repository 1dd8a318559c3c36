//! Client sessions: who is logged in, driven by explicit times (no clock, no I/O).
//!
//! A session is alive while its user holds a timeline stream or was last seen (login, command,
//! heartbeat, stream closed) less than the session timeout ago. Only a login starts a session
//! for a user who has none, or a command (so a server restarted under a connected client
//! serves it on): a heartbeat or a timeline stream never does. Expiry is evaluated lazily when
//! someone tries to log in, so nothing polls.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::ids::UserId;

#[derive(Debug, Clone)]
struct Session {
    last_seen: Instant,
    streams: usize,
}

/// The live sessions of one server.
#[derive(Debug)]
pub(crate) struct Sessions {
    timeout: Duration,
    sessions: HashMap<UserId, Session>,
}

impl Sessions {
    pub(crate) fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            sessions: HashMap::new(),
        }
    }

    fn alive(&self, session: &Session, now: Instant) -> bool {
        session.streams > 0 || now.saturating_duration_since(session.last_seen) < self.timeout
    }

    /// How many sessions are alive at `now`.
    pub(crate) fn live(&self, now: Instant) -> usize {
        self.sessions
            .values()
            .filter(|s| self.alive(s, now))
            .count()
    }

    /// Starts a session for `user`, unless a live one exists.
    pub(crate) fn login(&mut self, user: UserId, now: Instant) -> Result<()> {
        if let Some(session) = self.sessions.get(&user)
            && self.alive(session, now)
        {
            return Err(Error::AlreadyLoggedIn(user));
        }
        self.sessions.insert(
            user,
            Session {
                last_seen: now,
                streams: 0,
            },
        );
        Ok(())
    }

    /// Records activity of `user` (a command or heartbeat), creating the session if the user
    /// has none (e.g. after the server restarted under a connected client).
    pub(crate) fn touch(&mut self, user: UserId, now: Instant) {
        self.sessions
            .entry(user)
            .and_modify(|s| s.last_seen = now)
            .or_insert(Session {
                last_seen: now,
                streams: 0,
            });
    }

    /// Records a heartbeat of `user`: prolongs a live session and says whether there was one.
    /// An expired or missing session is not brought back.
    pub(crate) fn refresh(&mut self, user: UserId, now: Instant) -> bool {
        if !self.is_alive(user, now) {
            return false;
        }
        self.touch(user, now);
        true
    }

    /// Ends `user`'s session at once.
    pub(crate) fn logout(&mut self, user: UserId) {
        self.sessions.remove(&user);
    }

    /// A timeline stream of `user` opened.
    pub(crate) fn stream_opened(&mut self, user: UserId, now: Instant) {
        self.touch(user, now);
        if let Some(session) = self.sessions.get_mut(&user) {
            session.streams += 1;
        }
    }

    /// A timeline stream of `user` closed; the session lives on for one more timeout.
    pub(crate) fn stream_closed(&mut self, user: UserId, now: Instant) {
        if let Some(session) = self.sessions.get_mut(&user) {
            session.streams = session.streams.saturating_sub(1);
            session.last_seen = now;
        }
    }

    /// Whether `user` has a live session now.
    pub(crate) fn is_alive(&self, user: UserId, now: Instant) -> bool {
        self.sessions
            .get(&user)
            .is_some_and(|session| self.alive(session, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(id: u32) -> UserId {
        UserId::new(id).expect("valid user")
    }

    #[test]
    fn a_live_session_refuses_a_second_login_until_it_expires() {
        let t0 = Instant::now();
        let mut s = Sessions::new(Duration::from_secs(6));
        assert!(s.login(u(1), t0).is_ok());
        assert!(matches!(
            s.login(u(1), t0 + Duration::from_secs(5)),
            Err(Error::AlreadyLoggedIn(_))
        ));
        // A heartbeat at 5 s keeps it alive until 11 s.
        s.touch(u(1), t0 + Duration::from_secs(5));
        assert!(s.login(u(1), t0 + Duration::from_secs(10)).is_err());
        assert!(s.login(u(1), t0 + Duration::from_secs(11)).is_ok());
        // Other users are independent.
        assert!(s.login(u(2), t0).is_ok());
    }

    #[test]
    fn an_open_stream_keeps_the_session_alive() {
        let t0 = Instant::now();
        let mut s = Sessions::new(Duration::from_secs(6));
        assert!(s.login(u(1), t0).is_ok());
        s.stream_opened(u(1), t0);
        assert!(s.is_alive(u(1), t0 + Duration::from_secs(600)));
        s.stream_closed(u(1), t0 + Duration::from_secs(600));
        assert!(s.is_alive(u(1), t0 + Duration::from_secs(605)));
        assert!(!s.is_alive(u(1), t0 + Duration::from_secs(606)));
    }

    #[test]
    fn a_heartbeat_prolongs_a_live_session_but_never_starts_or_revives_one() {
        let t0 = Instant::now();
        let mut s = Sessions::new(Duration::from_secs(6));
        assert!(!s.refresh(u(3), t0), "no session: nothing to prolong");
        assert!(s.login(u(3), t0).is_ok(), "and the user can log in");
        assert!(s.refresh(u(3), t0 + Duration::from_secs(5)));
        assert!(s.is_alive(u(3), t0 + Duration::from_secs(10)));
        assert!(!s.refresh(u(3), t0 + Duration::from_secs(11)), "expired");
        assert!(!s.is_alive(u(3), t0 + Duration::from_secs(11)));
        assert!(s.login(u(3), t0 + Duration::from_secs(11)).is_ok());
    }

    #[test]
    fn logout_ends_the_session_at_once() {
        let t0 = Instant::now();
        let mut s = Sessions::new(Duration::from_secs(6));
        assert!(s.login(u(1), t0).is_ok());
        s.logout(u(1));
        assert!(s.login(u(1), t0).is_ok());
    }
}
