//! Accounting of a benchmark run: every post issued, every delivery received, latencies.
//!
//! A post's text carries the run's marker, the post's number and when it was due
//! (`sb<run>.<number>.<due ns>`), so a reader knows which post it got, without a shared map,
//! on our servers and on the course's (which prefix nothing, but may send other posts).
//! Exactly-once is checked twice: per reader (an author's posts arrive in the author's order,
//! so a post at or before the last one delivered from that author is a duplicate) and per post
//! (its delivery count against its author's followers).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::latency::{self, CurvePoint, MAX_LATENCY_MICROS, Percentiles, histogram};

/// Posts per chunk of the post table.
const CHUNK: u64 = 1 << 16;
/// Chunks at most: 2^30 posts, far beyond a run's length at any rate this machine reaches.
const MAX_CHUNKS: usize = 1 << 14;
/// Histogram shards: readers spread their recording over these, so they seldom wait.
const SHARDS: usize = 16;
/// Seconds the per-second delivery counts reach beyond the run's planned end (a disruption
/// that holds the run up); deliveries later still are left out of them.
const EXTRA_SECONDS: u64 = 60;

/// One issued post.
#[derive(Debug, Default)]
struct Slot {
    /// The author's population index + 1 (0: not filled in yet).
    author: AtomicU32,
    /// Deliveries received.
    received: AtomicU32,
}

/// Latencies of one shard, by where the follower lives.
#[derive(Debug)]
struct Latencies {
    same: Histogram<u64>,
    cross: Histogram<u64>,
}

/// The run's ledger, shared by the posters and every reader.
#[derive(Debug)]
pub struct Tally {
    marker: String,
    base: Instant,
    chunks: Box<[OnceLock<Box<[Slot]>>]>,
    issued: AtomicU64,
    /// Deliveries the issued posts should make (their authors' follower counts).
    expected: AtomicU64,
    delivered: AtomicU64,
    /// Deliveries received inside the timed window.
    delivered_in_window: AtomicU64,
    /// Deliveries received in each second since base.
    per_second: Box<[AtomicU64]>,
    /// Posts issued inside the timed window.
    issued_in_window: AtomicU64,
    /// Deliveries a reader had already had (same author, same or earlier post).
    duplicates: AtomicU64,
    /// Texts with this run's marker that name no issued post.
    unknown: AtomicU64,
    window: (Duration, Duration),
    /// The disruption of the scenario: when (ns since base; `u64::MAX`: none yet), the cluster
    /// whose authors it hit (0: any author, counted only for followers on other clusters) and
    /// the first delivery after it of a post due after it.
    disrupted_at: AtomicU64,
    disrupted_cluster: AtomicU32,
    recovered_at: AtomicU64,
    followers: Vec<u32>,
    clusters: u32,
    first_user: u32,
    latencies: Box<[Mutex<Latencies>]>,
    /// Places for posts on their way (issued, not yet delivered to every follower), when
    /// their number is bounded ([`Tally::bounding_in_flight`]).
    in_flight: Option<tokio::sync::Semaphore>,
}

/// The exactly-once verdict.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Verdict {
    /// Posts issued.
    pub posts: u64,
    /// Deliveries the posts should have made.
    pub expected: u64,
    /// Deliveries received.
    pub delivered: u64,
    /// Deliveries that never arrived.
    pub missing: u64,
    /// Deliveries received more than once.
    pub duplicates: u64,
    /// Deliveries of posts this run never made, or to users who do not follow the author.
    pub unexpected: u64,
}

impl Verdict {
    /// Whether every post reached every follower exactly once.
    pub fn exactly_once(&self) -> bool {
        self.missing == 0 && self.duplicates == 0 && self.unexpected == 0
    }
}

/// What a reader remembers to recognise duplicates: the last post number per author.
#[derive(Debug, Default)]
pub struct ReaderState {
    last: HashMap<u32, u64>,
}

impl Tally {
    /// A ledger for a run marked `run`; `followers[i]` is population index i's number of
    /// followers in the population (the deliveries each of its posts must make). User ids
    /// are `first_user + index`; a user's cluster is `(id - 1) % clusters + 1`. Latencies are
    /// kept for posts due inside `window` (from `base`); deliveries are counted per second
    /// until `drain` after the window (and a minute beyond, for a disruption that holds the
    /// run up).
    pub fn new(
        run: u64,
        base: Instant,
        window: (Duration, Duration),
        drain: Duration,
        followers: Vec<u32>,
        clusters: u32,
        first_user: u32,
    ) -> Self {
        let seconds = (window.1 + drain).as_secs() + 1 + EXTRA_SECONDS;
        Self {
            marker: format!("sb{run:x}."),
            base,
            chunks: (0..MAX_CHUNKS).map(|_| OnceLock::new()).collect(),
            issued: AtomicU64::new(0),
            expected: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            delivered_in_window: AtomicU64::new(0),
            per_second: (0..seconds).map(|_| AtomicU64::new(0)).collect(),
            issued_in_window: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            unknown: AtomicU64::new(0),
            window,
            disrupted_at: AtomicU64::new(u64::MAX),
            disrupted_cluster: AtomicU32::new(0),
            recovered_at: AtomicU64::new(u64::MAX),
            followers,
            clusters: clusters.max(1),
            first_user,
            latencies: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Latencies {
                        same: histogram(),
                        cross: histogram(),
                    })
                })
                .collect(),
            in_flight: None,
        }
    }

    /// The same ledger, with at most `limit` posts on their way at once: [`Tally::admit`]
    /// waits for a place, which a post gives back when its last delivery arrives.
    pub fn bounding_in_flight(mut self, limit: usize) -> Self {
        self.in_flight = Some(tokio::sync::Semaphore::new(limit));
        self
    }

    /// Waits for a place for one more post on its way, until `until` (since base) at the
    /// latest; at once when posts on their way are not bounded, or no longer
    /// ([`Tally::unbound`]). A place taken is held until the post reaches every follower, or
    /// given back with [`Tally::withdraw`] (a post not made, or one that has no followers,
    /// once it is sent).
    pub async fn admit(&self, until: Duration) {
        let Some(places) = &self.in_flight else {
            return;
        };
        let deadline = tokio::time::Instant::from_std(self.base + until);
        if let Ok(Ok(place)) = tokio::time::timeout_at(deadline, places.acquire()).await {
            place.forget();
        }
    }

    /// Gives back a place [`Tally::admit`] gave.
    pub fn withdraw(&self) {
        self.settled();
    }

    /// Stops bounding posts on their way: a reader failed, so some posts will never reach
    /// every follower (the run fails; this only keeps the posters from waiting for them).
    pub fn unbound(&self) {
        if let Some(places) = &self.in_flight {
            places.close();
        }
    }

    /// The followers `author` (a population index) has in the population.
    pub fn followers_of(&self, author: u32) -> u32 {
        self.followers.get(author as usize).copied().unwrap_or(0)
    }

    /// A post reached every follower: its place is free again.
    fn settled(&self) {
        if let Some(places) = &self.in_flight {
            places.add_permits(1);
        }
    }

    /// Time since the run's base.
    pub fn now(&self) -> Duration {
        self.base.elapsed()
    }

    /// The cluster of population index `index`.
    pub fn cluster_of(&self, index: u32) -> u32 {
        (self.first_user + index - 1) % self.clusters + 1
    }

    fn slot(&self, number: u64) -> Option<&Slot> {
        let chunk = self.chunks.get((number / CHUNK) as usize)?.get()?;
        chunk.get((number % CHUNK) as usize)
    }

    /// Issues the next post of `author` (a population index), due at `due` (since base):
    /// the text to post, or `None` when the table is full.
    pub fn issue(&self, author: u32, due: Duration) -> Option<String> {
        let number = self.issued.fetch_add(1, Ordering::Relaxed);
        let chunk = self
            .chunks
            .get((number / CHUNK) as usize)?
            .get_or_init(|| (0..CHUNK).map(|_| Slot::default()).collect());
        chunk[(number % CHUNK) as usize]
            .author
            .store(author + 1, Ordering::Release);
        let followers = self.followers_of(author);
        self.expected
            .fetch_add(u64::from(followers), Ordering::Relaxed);
        if self.in_window(due) {
            self.issued_in_window.fetch_add(1, Ordering::Relaxed);
        }
        Some(format!("{}{number}.{}", self.marker, due.as_nanos()))
    }

    fn in_window(&self, at: Duration) -> bool {
        at >= self.window.0 && at < self.window.1
    }

    /// Records that `reader` (a population index) received a post with `text`.
    pub fn received(&self, reader: u32, state: &mut ReaderState, text: &str) {
        let now = self.now();
        let Some(at) = text.find(&self.marker) else {
            return; // not this run's
        };
        let mut parts = text[at + self.marker.len()..].splitn(2, '.');
        let number = parts.next().and_then(|n| n.parse::<u64>().ok());
        let due = parts
            .next()
            .and_then(|d| d.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|d| d.parse::<u64>().ok())
            .map(Duration::from_nanos);
        let (Some(number), Some(due)) = (number, due) else {
            self.unknown.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Some(slot) = self.slot(number) else {
            self.unknown.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let author = match slot.author.load(Ordering::Acquire) {
            0 => {
                self.unknown.fetch_add(1, Ordering::Relaxed);
                return;
            }
            a => a - 1,
        };
        let received = slot.received.fetch_add(1, Ordering::Relaxed) + 1;
        if self.followers_of(author) == received {
            self.settled();
        }
        self.delivered.fetch_add(1, Ordering::Relaxed);
        if self.in_window(now) {
            self.delivered_in_window.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(second) = self.per_second.get(now.as_secs() as usize) {
            second.fetch_add(1, Ordering::Relaxed);
        }
        let last = state.last.entry(author).or_insert(u64::MAX);
        if *last != u64::MAX && number <= *last {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = number;
        let same = self.cluster_of(author) == self.cluster_of(reader);
        self.note_recovery(author, same, due, now);
        if self.in_window(due) {
            let micros = now.saturating_sub(due).as_micros().max(1) as u64;
            let shard = reader as usize % SHARDS;
            let mut latencies = self.latencies[shard]
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let histogram = if same {
                &mut latencies.same
            } else {
                &mut latencies.cross
            };
            histogram.saturating_record(micros.min(MAX_LATENCY_MICROS));
        }
    }

    /// Marks the scenario's disruption as happening now; `cluster` names the cluster whose
    /// authors it hits (`None`: all, seen by followers on other clusters).
    pub fn disrupt(&self, cluster: Option<u32>) -> Duration {
        let now = self.now();
        self.disrupted_cluster
            .store(cluster.unwrap_or(0), Ordering::Relaxed);
        self.disrupted_at
            .store(now.as_nanos() as u64, Ordering::Release);
        now
    }

    fn note_recovery(&self, author: u32, same: bool, due: Duration, now: Duration) {
        let at = self.disrupted_at.load(Ordering::Acquire);
        if at == u64::MAX || (due.as_nanos() as u64) < at {
            return;
        }
        let hit = match self.disrupted_cluster.load(Ordering::Relaxed) {
            0 => !same,
            cluster => self.cluster_of(author) == cluster,
        };
        if hit {
            self.recovered_at
                .fetch_min(now.as_nanos() as u64, Ordering::Relaxed);
        }
    }

    /// From the disruption to the first delivery of a post due after it (see
    /// [`Tally::disrupt`]); `None` without a disruption or before such a delivery.
    pub fn recovery(&self) -> Option<Duration> {
        let at = self.disrupted_at.load(Ordering::Acquire);
        let recovered = self.recovered_at.load(Ordering::Relaxed);
        (at != u64::MAX && recovered != u64::MAX)
            .then(|| Duration::from_nanos(recovered.saturating_sub(at)))
    }

    /// Posts issued so far.
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }

    /// Posts issued inside the timed window.
    pub fn issued_in_window(&self) -> u64 {
        self.issued_in_window.load(Ordering::Relaxed)
    }

    /// Deliveries received so far.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Deliveries received inside the timed window.
    pub fn delivered_in_window(&self) -> u64 {
        self.delivered_in_window.load(Ordering::Relaxed)
    }

    /// Deliveries the issued posts should make.
    pub fn expected(&self) -> u64 {
        self.expected.load(Ordering::Relaxed)
    }

    /// The exactly-once verdict over every issued post.
    pub fn verdict(&self) -> Verdict {
        let posts = self.issued();
        let mut verdict = Verdict {
            posts,
            expected: 0,
            delivered: self.delivered(),
            missing: 0,
            duplicates: self.duplicates.load(Ordering::Relaxed),
            unexpected: self.unknown.load(Ordering::Relaxed),
        };
        let mut over = 0;
        for number in 0..posts {
            let Some(slot) = self.slot(number) else {
                continue;
            };
            let author = slot.author.load(Ordering::Acquire);
            let should = author
                .checked_sub(1)
                .and_then(|a| self.followers.get(a as usize))
                .map_or(0, |f| u64::from(*f));
            let got = u64::from(slot.received.load(Ordering::Relaxed));
            verdict.expected += should;
            verdict.missing += should.saturating_sub(got);
            over += got.saturating_sub(should);
        }
        // A delivery beyond a post's follower count is a duplicate when a reader saw it
        // twice, and otherwise went to someone who does not follow the author.
        verdict.unexpected += over.saturating_sub(verdict.duplicates);
        verdict
    }

    /// Deliveries received in each second since base, up to the current one (a partial
    /// second).
    pub fn deliveries_per_second(&self) -> Vec<u64> {
        let seconds = (self.now().as_secs() as usize + 1).min(self.per_second.len());
        self.per_second[..seconds]
            .iter()
            .map(|second| second.load(Ordering::Relaxed))
            .collect()
    }

    /// The latencies of every shard together: same cluster, other cluster.
    fn merged(&self) -> (Histogram<u64>, Histogram<u64>) {
        let mut same = histogram();
        let mut cross = histogram();
        for shard in self.latencies.iter() {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            // Same bounds everywhere, so adding cannot fail.
            let _ = same.add(&shard.same);
            let _ = cross.add(&shard.cross);
        }
        (same, cross)
    }

    /// Latency percentile curves (0 to 99.99%): same cluster, other cluster.
    pub fn curves(&self) -> (Vec<CurvePoint>, Vec<CurvePoint>) {
        let (same, cross) = self.merged();
        (latency::curve(&same), latency::curve(&cross))
    }

    /// Latency percentiles: same cluster, other cluster, all.
    pub fn percentiles(&self) -> (Percentiles, Percentiles, Percentiles) {
        let (same, cross) = self.merged();
        let mut all = same.clone();
        let _ = all.add(&cross);
        (
            Percentiles::of(&same),
            Percentiles::of(&cross),
            Percentiles::of(&all),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Users 1, 2, 3 on clusters 1, 2, 3; user 1 (index 0) has two followers, the others none.
    fn tally() -> Tally {
        Tally::new(
            0xab,
            Instant::now(),
            (Duration::ZERO, Duration::from_secs(3600)),
            Duration::from_secs(10),
            vec![2, 0, 0],
            3,
            1,
        )
    }

    /// The end of posting in the tests that do not reach it.
    const UNTIL: Duration = Duration::from_secs(3600);

    fn places(tally: &Tally) -> usize {
        tally
            .in_flight
            .as_ref()
            .map_or(usize::MAX, |places| places.available_permits())
    }

    #[tokio::test]
    async fn a_post_holds_its_place_until_its_last_follower_has_it() {
        let tally = tally().bounding_in_flight(2);
        let (mut a, mut b) = (ReaderState::default(), ReaderState::default());
        tally.admit(UNTIL).await;
        let text = tally.issue(0, tally.now()).expect("room");
        assert_eq!(places(&tally), 1, "the post holds a place");
        tally.received(1, &mut a, &text);
        assert_eq!(places(&tally), 1, "one of two followers has it");
        tally.received(2, &mut b, &text);
        assert_eq!(places(&tally), 2, "both have it: the place is free");
        // A repeated delivery gives back nothing more.
        tally.received(2, &mut b, &text);
        assert_eq!(places(&tally), 2);

        // A place taken for a post that is not made (or that reaches no one) goes back.
        tally.admit(UNTIL).await;
        tally.withdraw();
        assert_eq!(places(&tally), 2);
    }

    #[tokio::test]
    async fn with_every_place_held_a_poster_waits_until_the_end_of_posting_at_most() {
        let tally = tally().bounding_in_flight(1);
        tally.admit(UNTIL).await;
        tally.issue(0, tally.now()).expect("room");
        assert_eq!(places(&tally), 0);
        // Nothing is delivered: the wait ends when posting does.
        let end = tally.now() + Duration::from_millis(50);
        tokio::time::timeout(Duration::from_secs(10), tally.admit(end))
            .await
            .expect("the wait ends with posting");
        assert!(
            tally.now() >= end,
            "the poster waited for the end of posting"
        );

        // A failed reader unbinds: nobody waits any more.
        tally.unbound();
        tokio::time::timeout(Duration::from_secs(10), tally.admit(UNTIL))
            .await
            .expect("no wait once unbound");
    }

    #[test]
    fn every_post_delivered_once_to_every_follower_is_exactly_once() {
        let tally = tally();
        let (mut a, mut b) = (ReaderState::default(), ReaderState::default());
        for _ in 0..3 {
            let text = tally.issue(0, tally.now()).expect("room");
            tally.received(1, &mut a, &text);
            tally.received(2, &mut b, &text);
        }
        let verdict = tally.verdict();
        assert_eq!(verdict.posts, 3);
        assert_eq!(verdict.expected, 6);
        assert_eq!(verdict.delivered, 6);
        assert!(verdict.exactly_once(), "{verdict:?}");
        let (same, cross, all) = tally.percentiles();
        assert_eq!((same.count, cross.count, all.count), (0, 6, 6));
    }

    #[test]
    fn a_missing_delivery_is_found() {
        let tally = tally();
        let (mut a, mut b) = (ReaderState::default(), ReaderState::default());
        let first = tally.issue(0, tally.now()).expect("room");
        let second = tally.issue(0, tally.now()).expect("room");
        tally.received(1, &mut a, &first);
        tally.received(1, &mut a, &second);
        tally.received(2, &mut b, &second);
        let verdict = tally.verdict();
        assert_eq!(verdict.missing, 1, "{verdict:?}");
        assert!(!verdict.exactly_once());
    }

    #[test]
    fn a_post_delivered_twice_to_one_reader_is_a_duplicate_even_if_another_missed_it() {
        let tally = tally();
        let (mut a, _b) = (ReaderState::default(), ReaderState::default());
        let text = tally.issue(0, tally.now()).expect("room");
        tally.received(1, &mut a, &text);
        tally.received(1, &mut a, &text);
        let verdict = tally.verdict();
        assert_eq!(verdict.duplicates, 1, "{verdict:?}");
        assert_eq!(verdict.missing, 0, "the count alone hides it: {verdict:?}");
        assert_eq!(verdict.unexpected, 0, "{verdict:?}");
        assert!(!verdict.exactly_once());
    }

    #[test]
    fn an_older_post_after_a_newer_one_from_the_same_author_is_a_duplicate() {
        let tally = tally();
        let mut a = ReaderState::default();
        let first = tally.issue(0, tally.now()).expect("room");
        let second = tally.issue(0, tally.now()).expect("room");
        tally.received(1, &mut a, &second);
        tally.received(1, &mut a, &first);
        assert_eq!(tally.verdict().duplicates, 1);
    }

    #[test]
    fn deliveries_to_non_followers_and_of_unknown_posts_are_unexpected() {
        let tally = tally();
        let mut a = ReaderState::default();
        let by_two = tally.issue(1, tally.now()).expect("room"); // user 2: no followers
        tally.received(0, &mut a, &by_two);
        tally.received(0, &mut a, "sbab.999.5");
        tally.received(0, &mut a, "sbab.garbage");
        tally.received(0, &mut a, "another run's post sbcd.0.1 is ignored");
        let verdict = tally.verdict();
        assert_eq!(verdict.unexpected, 3, "{verdict:?}");
        assert_eq!(verdict.delivered, 1, "{verdict:?}");
    }

    #[test]
    fn a_marker_inside_course_formatted_text_is_found() {
        let tally = tally();
        let mut a = ReaderState::default();
        let text = tally.issue(0, tally.now()).expect("room");
        tally.received(
            2,
            &mut a,
            &format!("1 (Sun Nov 22 10:00:00 2026) >> {text}\n"),
        );
        assert_eq!(tally.verdict().delivered, 1);
        assert_eq!(tally.verdict().unexpected, 0);
    }

    #[test]
    fn recovery_counts_from_the_disruption_to_the_first_post_due_after_it() {
        let tally = tally();
        let mut a = ReaderState::default();
        let before = tally.issue(0, tally.now()).expect("room");
        let at = tally.disrupt(Some(1));
        tally.received(1, &mut a, &before);
        assert_eq!(tally.recovery(), None, "a post due before does not count");
        let after = tally.issue(0, tally.now()).expect("room");
        tally.received(1, &mut a, &after);
        let took = tally.recovery().expect("recovered");
        assert!(took <= tally.now() - at);
    }

    #[test]
    fn latencies_are_split_by_cluster_and_kept_only_inside_the_window() {
        let base = Instant::now();
        let tally = Tally::new(
            1,
            base,
            (Duration::from_secs(1), Duration::from_secs(2)),
            Duration::from_secs(1),
            vec![3, 0, 0, 0],
            3,
            1,
        );
        let mut r = ReaderState::default();
        // Due inside the window (the due time is what the text says, not when it is read).
        let inside = tally.issue(0, Duration::from_millis(1500)).expect("room");
        let outside = tally.issue(0, Duration::ZERO).expect("room");
        tally.received(3, &mut r, &outside); // user 4: cluster 1, same as user 1
        let mut s = ReaderState::default();
        tally.received(3, &mut s, &inside);
        tally.received(1, &mut ReaderState::default(), &inside);
        let (same, cross, _) = tally.percentiles();
        assert_eq!((same.count, cross.count), (1, 1));
        assert_eq!(tally.issued_in_window(), 1);
    }

    #[test]
    fn deliveries_are_counted_in_the_second_of_the_run_they_arrive_in() {
        // Posting began 2.5 s ago: what arrives now counts in second 2.
        let base = Instant::now()
            .checked_sub(Duration::from_millis(2500))
            .expect("the clock is past 2.5 s");
        let tally = Tally::new(
            1,
            base,
            (Duration::from_secs(1), Duration::from_secs(2)),
            Duration::from_secs(1),
            vec![2, 0, 0],
            3,
            1,
        );
        let (mut a, mut b) = (ReaderState::default(), ReaderState::default());
        let text = tally.issue(0, Duration::from_millis(1500)).expect("room");
        tally.received(1, &mut a, &text);
        tally.received(2, &mut b, &text);
        tally.received(1, &mut a, "not this run's");
        assert_eq!(tally.deliveries_per_second(), vec![0, 0, 2]);
        let (same, cross) = tally.curves();
        assert!(same.is_empty(), "{same:?}");
        assert_eq!(cross.len(), 81);
        assert!(cross.iter().all(|p| p.ms >= 999.0), "{cross:?}");
    }

    #[test]
    fn the_per_second_counts_stop_at_the_end_of_the_room_made_for_them() {
        // Ten minutes after the start of a run planned for 3 s: beyond the counts' reach.
        let base = Instant::now()
            .checked_sub(Duration::from_secs(600))
            .expect("the clock is past 10 minutes");
        let tally = Tally::new(
            1,
            base,
            (Duration::ZERO, Duration::from_secs(2)),
            Duration::from_secs(1),
            vec![1, 0],
            1,
            1,
        );
        let text = tally.issue(0, tally.now()).expect("room");
        tally.received(1, &mut ReaderState::default(), &text);
        let series = tally.deliveries_per_second();
        assert_eq!(series.len(), 3 + 1 + EXTRA_SECONDS as usize);
        assert_eq!(series.iter().sum::<u64>(), 0);
        assert_eq!(tally.delivered(), 1);
    }
}
