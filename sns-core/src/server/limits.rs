//! Bounds on what clients hold and how fast they post: connections (as many as the file
//! descriptors allow), timeline streams open on this server and per user (so one client cannot
//! take every stream and lock other users out), and one post rate per user across all of that
//! user's streams (a user with many streams posts no faster than with one).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::ids::{UserId, UserMap};

/// The default of [`ServerConfig::max_connections`](super::ServerConfig::max_connections).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// Most arguments a request may carry (the course's commands take at most one); a request with
/// more is refused before anything else is read of it.
pub const MAX_ARGUMENTS: usize = 8;

/// File descriptors a server keeps for itself (its log, snapshots, listener, outgoing
/// connections) beyond its client connections: see [`connection_cap`].
pub const RESERVED_DESCRIPTORS: u64 = 64;

/// The most client connections a server can hold when the process may open `descriptors` file
/// descriptors (`None`: no known limit), if `wanted` are configured: `wanted`, lowered if need
/// be to leave [`RESERVED_DESCRIPTORS`] (or a quarter of a small limit) for everything else, so
/// connections never take the descriptors the log needs. At least 1.
pub fn connection_cap(wanted: usize, descriptors: Option<u64>) -> usize {
    let Some(limit) = descriptors else {
        return wanted.max(1);
    };
    let reserve = RESERVED_DESCRIPTORS.min(limit / 4);
    let available = usize::try_from(limit.saturating_sub(reserve)).unwrap_or(usize::MAX);
    wanted.min(available).max(1)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here is a counter update that cannot panic half-way.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The timeline stream slots: a server-wide number, and a number per user.
#[derive(Debug)]
pub(crate) struct StreamSlots {
    total: Arc<Semaphore>,
    max_total: usize,
    max_per_user: usize,
    per_user: Arc<Mutex<UserMap<usize>>>,
}

/// One open timeline stream's slot; dropping it frees the slot.
#[derive(Debug)]
pub(crate) struct StreamSlot {
    _total: OwnedSemaphorePermit,
    user: UserId,
    per_user: Arc<Mutex<UserMap<usize>>>,
}

impl StreamSlots {
    pub(crate) fn new(max_total: usize, max_per_user: usize) -> Self {
        Self {
            total: Arc::new(Semaphore::new(max_total)),
            max_total,
            max_per_user,
            per_user: Arc::default(),
        }
    }

    /// How many slots are held (streams open).
    pub(crate) fn held(&self) -> usize {
        self.max_total - self.total.available_permits()
    }

    /// A slot for a new stream of `user`; refused ([`Error::OverLimit`], naming the limit) when
    /// the user or the server holds as many streams as allowed.
    pub(crate) fn acquire(&self, user: UserId) -> Result<StreamSlot> {
        let mut per_user = lock(&self.per_user);
        let held = per_user.get(&user).copied().unwrap_or(0);
        if held >= self.max_per_user {
            return Err(Error::OverLimit(format!(
                "too many timeline streams open for user {user} (at most {})",
                self.max_per_user
            )));
        }
        let total = Arc::clone(&self.total).try_acquire_owned().map_err(|_| {
            Error::OverLimit(format!(
                "too many timeline streams open on this server (at most {})",
                self.max_total
            ))
        })?;
        per_user.insert(user, held + 1);
        Ok(StreamSlot {
            _total: total,
            user,
            per_user: Arc::clone(&self.per_user),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut per_user = lock(&self.per_user);
        if let Some(held) = per_user.get_mut(&self.user) {
            *held -= 1;
            if *held == 0 {
                per_user.remove(&self.user);
            }
        }
    }
}

/// One post rate per user: each user has a token bucket (`rate` posts a second, bursts of
/// `rate`), shared by all of the user's streams.
#[derive(Debug)]
pub(crate) struct PostPacing {
    rate: u32,
    buckets: Mutex<Buckets>,
}

#[derive(Debug)]
struct Buckets {
    by_user: UserMap<TokenBucket>,
    /// Forget full buckets once this many users have one (kept proportional to the users
    /// actually posting, so the map never grows with the number of users that ever posted).
    prune_at: usize,
}

impl PostPacing {
    const MIN_PRUNE_AT: usize = 1024;

    pub(crate) fn new(rate: u32) -> Self {
        Self {
            rate,
            buckets: Mutex::new(Buckets {
                by_user: UserMap::default(),
                prune_at: Self::MIN_PRUNE_AT,
            }),
        }
    }

    /// Takes one post of `user` into account at `now`; returns how long the post must wait
    /// to keep the user within the rate (`None`: it may go at once). Posts wait their turn:
    /// a post that waits has its token reserved, so the user's streams together stay within
    /// the rate.
    pub(crate) fn delay(&self, user: UserId, now: Instant) -> Option<Duration> {
        let mut buckets = lock(&self.buckets);
        if buckets.by_user.len() >= buckets.prune_at {
            buckets.by_user.retain(|_, bucket| !bucket.is_full(now));
            buckets.prune_at = (2 * buckets.by_user.len()).max(Self::MIN_PRUNE_AT);
        }
        buckets
            .by_user
            .entry(user)
            .or_insert_with(|| TokenBucket::new(self.rate, now))
            .take(now)
    }
}

/// A token bucket: `rate` tokens per second, bursts of up to `rate`. Tokens may go negative:
/// a taker that finds none reserves the next one and waits for it.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32, now: Instant) -> Self {
        let rate = f64::from(rate.max(1));
        Self {
            rate,
            tokens: rate,
            last: now,
        }
    }

    /// Takes a token; returns how long to wait first if none is left.
    fn take(&mut self, now: Instant) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate) - 1.0;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }

    /// Whether the bucket has refilled completely by `now` (it then holds no state worth
    /// keeping).
    fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * self.rate >= self.rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(id: u32) -> UserId {
        UserId::new(id).expect("valid user")
    }

    #[test]
    fn connections_leave_descriptors_for_the_rest_of_the_server() {
        assert_eq!(connection_cap(10_000, None), 10_000);
        assert_eq!(connection_cap(10_000, Some(20_000)), 10_000);
        assert_eq!(connection_cap(10_000, Some(1024)), 1024 - 64);
        // A small limit keeps a quarter.
        assert_eq!(connection_cap(10_000, Some(40)), 30);
        assert_eq!(connection_cap(10_000, Some(0)), 1);
        assert_eq!(connection_cap(0, None), 1);
    }

    #[test]
    fn the_bucket_allows_bursts_then_paces() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(10, t0);
        for _ in 0..10 {
            assert_eq!(bucket.take(t0), None);
        }
        let wait = bucket.take(t0).expect("must wait");
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9);
        // The next taker reserves the token after that one.
        let wait = bucket.take(t0).expect("must wait");
        assert!((wait.as_secs_f64() - 0.2).abs() < 1e-9);
        assert!(!bucket.is_full(t0 + Duration::from_millis(1100)));
        assert!(bucket.is_full(t0 + Duration::from_millis(1200)));
    }

    #[test]
    fn one_rate_per_user_across_callers_and_separate_users() {
        let t0 = Instant::now();
        let pacing = PostPacing::new(4);
        // Two streams of user 1 share its 4 posts a second.
        for _ in 0..2 {
            assert_eq!(pacing.delay(u(1), t0), None);
            assert_eq!(pacing.delay(u(1), t0), None);
        }
        assert_eq!(pacing.delay(u(1), t0), Some(Duration::from_millis(250)));
        // User 2 has a bucket of its own.
        assert_eq!(pacing.delay(u(2), t0), None);
    }

    #[test]
    fn full_buckets_are_forgotten_once_many_users_posted() {
        let t0 = Instant::now();
        let pacing = PostPacing::new(1);
        let users = u32::try_from(PostPacing::MIN_PRUNE_AT).expect("small");
        for id in 1..=users {
            pacing.delay(u(id), t0);
        }
        // A second later every bucket is full again: the next post prunes them all.
        pacing.delay(u(users + 1), t0 + Duration::from_secs(1));
        assert_eq!(lock(&pacing.buckets).by_user.len(), 1);
    }

    #[test]
    fn stream_slots_are_bounded_per_user_and_in_total_and_freed_on_drop() {
        let slots = StreamSlots::new(3, 2);
        let a = slots.acquire(u(1)).expect("first of 1");
        let _b = slots.acquire(u(1)).expect("second of 1");
        let refused = slots.acquire(u(1)).expect_err("third of 1");
        assert!(refused.to_string().contains("user 1"), "{refused}");
        let _c = slots.acquire(u(2)).expect("first of 2");
        let refused = slots.acquire(u(3)).expect_err("server full");
        assert!(refused.to_string().contains("this server"), "{refused}");
        drop(a);
        let _d = slots.acquire(u(3)).expect("a freed slot");
        assert!(slots.acquire(u(1)).is_err(), "the server is full again");
    }
}
