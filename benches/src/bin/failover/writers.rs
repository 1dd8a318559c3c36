//! The two writers `failover` times: a bare `sns_core::Client` that asks the coordinator
//! again after every error, and a `Session` with its default settings. Each follows and
//! unfollows one user in a loop and reports every successful call.
//!
//! Invariant checked: an acknowledged change stays. A follow answered "already following"
//! after an acknowledged unfollow (or the reverse) counts as lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sns_core::client::CoordinatorClient;
use sns_core::session::Target;
use sns_core::{Client, Error, Network, Session, SessionConfig, UserId};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Failure, PATIENCE};

/// A successful call: when it started and ended.
#[derive(Debug, Clone, Copy)]
pub(super) struct Success {
    started: Instant,
    pub(super) ended: Instant,
    /// The port of the server that answered.
    addr: u16,
}

/// What a writer reports while it runs.
pub(super) struct Writer {
    pub(super) name: &'static str,
    successes: mpsc::UnboundedReceiver<Success>,
    lost: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

/// The follow state a writer expects, and the check that acknowledged changes stay.
struct Expectation {
    following: Option<bool>,
    lost: Arc<AtomicU64>,
    /// Calls that ended in an error other than the two answers above (a bare client's call
    /// that met the dead master; a session's call when the session gave up).
    failed: Arc<AtomicU64>,
}

impl Expectation {
    /// The next change to make: `true` to follow.
    fn next_is_follow(&self) -> bool {
        self.following != Some(true)
    }

    /// Records the answer to a follow (`follow`) or unfollow; returns whether the server
    /// answered (rather than being lost).
    fn answered(&mut self, follow: bool, result: &sns_core::Result<()>) -> bool {
        let now = match result {
            Ok(()) => follow,
            Err(Error::AlreadyFollowing) => true,
            Err(Error::NotFollowing) => false,
            Err(_) => {
                // The change may or may not have been made.
                self.following = None;
                self.failed.fetch_add(1, Ordering::SeqCst);
                return false;
            }
        };
        // "Already following" after an acknowledged unfollow (or the reverse): lost.
        if result.is_err() && self.following == Some(!now) {
            self.lost.fetch_add(1, Ordering::SeqCst);
        }
        self.following = Some(now);
        true
    }
}

pub(super) fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

/// A bare client: on an error it asks the coordinator again after `retry`, and logs in anew.
async fn bare_writer(
    coordinator: CoordinatorClient,
    user: UserId,
    target: UserId,
    retry: Duration,
    report: mpsc::UnboundedSender<Success>,
    mut expect: Expectation,
    stop: CancellationToken,
) {
    let mut client: Option<Client> = None;
    while !stop.is_cancelled() {
        let started = Instant::now();
        let current = match &client {
            Some(client) => client.clone(),
            None => {
                let login = match coordinator.locate(user).await {
                    Ok(addr) => match Client::login(&Network::tcp(), &addr, user).await {
                        Err(Error::AlreadyLoggedIn(_)) => {
                            Client::attach(&Network::tcp(), &addr, user).await
                        }
                        other => other,
                    },
                    Err(e) => Err(e),
                };
                match login {
                    Ok(fresh) => {
                        client = Some(fresh.clone());
                        fresh
                    }
                    Err(_) => {
                        tokio::time::sleep(retry).await;
                        continue;
                    }
                }
            }
        };
        let follow = expect.next_is_follow();
        let result = if follow {
            current.follow(target).await
        } else {
            current.unfollow(target).await
        };
        if expect.answered(follow, &result) {
            let _ = report.send(Success {
                started,
                ended: Instant::now(),
                addr: port_of(current.addr()),
            });
        } else {
            client = None;
            tokio::time::sleep(retry).await;
        }
    }
}

/// A session with its default settings, as `tsc` has it.
async fn session_writer(
    session: Session,
    target: UserId,
    report: mpsc::UnboundedSender<Success>,
    mut expect: Expectation,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        let started = Instant::now();
        let follow = expect.next_is_follow();
        let result = if follow {
            session.follow(target).await
        } else {
            session.unfollow(target).await
        };
        if expect.answered(follow, &result) {
            let _ = report.send(Success {
                started,
                ended: Instant::now(),
                addr: port_of(&session.addr()),
            });
        }
    }
    let _ = session.logout().await;
    session.close().await;
}

/// The first success of `writer` that started at `dead` or later, on the server at `port`.
pub(super) async fn first_success_after(
    writer: &mut Writer,
    dead: Instant,
    port: u16,
) -> Result<Success, Failure> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let next = tokio::time::timeout_at(deadline, writer.successes.recv())
            .await
            .map_err(|_| format!("{}: no successful call after {PATIENCE:?}", writer.name))?
            .ok_or_else(|| format!("{}: the writer stopped", writer.name))?;
        if next.started >= dead {
            if next.addr != port {
                return Err(format!(
                    "{}: first call after the kill served by port {}, not the promoted server's {port}",
                    writer.name, next.addr
                )
                .into());
            }
            return Ok(next);
        }
    }
}

/// What a writer saw around a kill that should not interrupt it: the time between the ends of
/// successive successful calls, from the last one that ended before the kill to the first one
/// that started at the end of the window, and the calls that failed meanwhile.
pub(super) struct Outage {
    /// The longest time between two successive successes: with no outage, about one call.
    pub(super) longest_gap: Duration,
    /// The gap that spans the kill: from the last success that ended before it to the first
    /// that ended after it.
    pub(super) spanning_gap: Duration,
    /// When the longest gap ended, after the kill.
    pub(super) longest_ended: Duration,
    /// The median of those times: the writer's usual call spacing.
    pub(super) median_gap: Duration,
    /// Successful calls in the window.
    pub(super) calls: usize,
    /// Calls that failed in the window.
    pub(super) failed: u64,
}

impl Writer {
    /// Calls that failed so far.
    pub(super) fn failed(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }
}

/// Reads `writer`'s successes from the last one that ended before `killed_at` up to the first
/// that started at `until` or later; `failed_before` is [`Writer::failed`] at the kill.
pub(super) async fn outage(
    writer: &mut Writer,
    killed_at: Instant,
    until: Instant,
    failed_before: u64,
) -> Result<Outage, Failure> {
    let deadline = Instant::now() + PATIENCE;
    // Without a success before the kill in the channel, the window opens at the kill.
    let mut previous = killed_at;
    let mut gaps = Vec::new();
    let (mut longest_gap, mut longest_ended) = (Duration::ZERO, Duration::ZERO);
    loop {
        let next = tokio::time::timeout_at(deadline, writer.successes.recv())
            .await
            .map_err(|_| format!("{}: no successful call after {PATIENCE:?}", writer.name))?
            .ok_or_else(|| format!("{}: the writer stopped", writer.name))?;
        if next.ended > killed_at {
            let gap = next.ended.saturating_duration_since(previous);
            if gap > longest_gap {
                longest_gap = gap;
                longest_ended = next.ended - killed_at;
            }
            gaps.push(gap);
        }
        previous = next.ended;
        if next.started >= until {
            break;
        }
    }
    let spanning_gap = gaps.first().copied().unwrap_or_default();
    gaps.sort();
    Ok(Outage {
        spanning_gap,
        longest_gap,
        longest_ended,
        median_gap: gaps.get(gaps.len() / 2).copied().unwrap_or_default(),
        calls: gaps.len(),
        failed: writer.failed().saturating_sub(failed_before),
    })
}

/// Reads successes until `count` more started at `since` or later.
pub(super) async fn successes_since(
    writer: &mut Writer,
    since: Instant,
    count: u32,
) -> Result<(), Failure> {
    let deadline = Instant::now() + PATIENCE;
    let mut seen = 0;
    while seen < count {
        let next = tokio::time::timeout_at(deadline, writer.successes.recv())
            .await
            .map_err(|_| format!("{}: stalled", writer.name))?
            .ok_or_else(|| format!("{}: the writer stopped", writer.name))?;
        if next.started >= since {
            seen += 1;
        }
    }
    Ok(())
}

/// Starts the two writers on the deployment whose coordinator is at `coordinator`: a bare
/// client as user 1 and a session as user 3, both following and unfollowing user 2 (logged in
/// once first, so that it exists).
pub(super) async fn start_writers(
    coordinator: &str,
    retry: Duration,
    stop: &CancellationToken,
) -> Result<Vec<Writer>, Failure> {
    let user = |id| UserId::new(id).ok_or("bad user id");
    // User 2 is the one followed; it only has to exist.
    Client::login_via(&Network::tcp(), coordinator, user(2)?)
        .await?
        .logout()
        .await?;
    let mut writers = Vec::new();
    for name in ["bare", "session"] {
        let (report, successes) = mpsc::unbounded_channel();
        let lost = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let expect = Expectation {
            following: None,
            lost: Arc::clone(&lost),
            failed: Arc::clone(&failed),
        };
        let task = if name == "bare" {
            let coordinator = CoordinatorClient::new(&Network::tcp(), coordinator)?;
            tokio::spawn(bare_writer(
                coordinator,
                user(1)?,
                user(2)?,
                retry,
                report,
                expect,
                stop.clone(),
            ))
        } else {
            let session = Session::connect(
                &Network::tcp(),
                Target::Coordinator(coordinator.to_string()),
                user(3)?,
                SessionConfig::default(),
            )
            .await?;
            tokio::spawn(session_writer(
                session,
                user(2)?,
                report,
                expect,
                stop.clone(),
            ))
        };
        writers.push(Writer {
            name,
            successes,
            lost,
            failed,
            task,
        });
    }
    Ok(writers)
}

/// Stops waiting on `writers` (the caller has cancelled them) and waits for them; returns each
/// one's calls that failed, by name, and the acknowledged changes lost by all.
pub(super) async fn finish(writers: Vec<Writer>) -> (Vec<(&'static str, u64)>, u64) {
    let mut lost = 0;
    let mut failed = Vec::new();
    for writer in writers {
        lost += writer.lost.load(Ordering::SeqCst);
        failed.push((writer.name, writer.failed.load(Ordering::SeqCst)));
        let mut successes = writer.successes;
        // Drain so the writer never blocks, then wait for it.
        successes.close();
        let _ = writer.task.await;
    }
    (failed, lost)
}
