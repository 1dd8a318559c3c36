//! What a synchronizer knows of each origin's progress, for operators: what it applied, this
//! cluster's high-water mark as its master reports it, and the origin's head (its own committed
//! high-water mark, as the origin's master reports it). Read as [`OriginStats`] through
//! [`ClusterLink::stats`](super::ClusterLink::stats).
//!
//! The origin's head is another cluster's word: it is kept to be shown (how far behind this
//! cluster is, in events), never acted on.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::event::Event;
use crate::ids::{ClusterId, Timestamp};

/// Shortest time between two probes of the origins' heads
/// ([`ClusterLink::probe_origins`](super::ClusterLink::probe_origins)): readers more frequent
/// than this share the previous answers.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// What a synchronizer knows of one origin (see [`ClusterLink::stats`](super::ClusterLink::stats)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct OriginStats {
    /// The highest sequence number of the origin known to be applied to this cluster: applied
    /// by this link, or reported by this cluster's master.
    pub high_water: u64,
    /// Batches applied by this link.
    pub batches: u64,
    /// Events applied by this link.
    pub events: u64,
    /// The origin's timestamp of the newest event applied by this link.
    pub newest_event_at: Option<Timestamp>,
    /// The origin's own committed high-water mark, as its master last reported it; `None`
    /// before the first answer. Shown to operators, never acted on.
    pub origin_head: Option<u64>,
}

impl OriginStats {
    /// How many of the origin's committed events this cluster has not applied yet: the
    /// origin's head minus the high-water mark (0 when the head answered is older than what
    /// was applied since); `None` while the head is unknown.
    pub fn behind(&self) -> Option<u64> {
        self.origin_head
            .map(|head| head.saturating_sub(self.high_water))
    }

    /// Seconds from the origin's time of the newest applied event to `now` (0 if the origin's
    /// clock is ahead); `None` before any event was applied.
    pub fn newest_event_age_s(&self, now: crate::ids::Timestamp) -> Option<f64> {
        self.newest_event_at
            .map(|at| (now.0 - at.0).max(0) as f64 / 1e6)
    }
}

/// The per-origin figures of one link, updated as it applies and asks.
#[derive(Debug, Default)]
pub(super) struct Progress {
    origins: Mutex<BTreeMap<ClusterId, OriginStats>>,
    /// When the last probe of the origins started.
    probed_at: Mutex<Option<Instant>>,
}

impl Progress {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<ClusterId, OriginStats>> {
        self.origins.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every origin's figures now.
    pub(super) fn snapshot(&self) -> BTreeMap<ClusterId, OriginStats> {
        self.lock().clone()
    }

    /// `events` of `origin` were applied to this cluster (committed there).
    pub(super) fn applied(&self, origin: ClusterId, events: &[Event]) {
        let Some(last) = events.last() else {
            return;
        };
        let mut origins = self.lock();
        let stats = origins.entry(origin).or_default();
        stats.high_water = stats.high_water.max(last.id.seq);
        stats.batches += 1;
        stats.events += events.len() as u64;
        stats.newest_event_at = Some(last.at);
    }

    /// This cluster's master reported its high-water `marks`; those of `origins` are kept.
    pub(super) fn cluster_marks(&self, marks: &BTreeMap<ClusterId, u64>, origins: &[ClusterId]) {
        let mut known = self.lock();
        for origin in origins {
            let mark = marks.get(origin).copied().unwrap_or(0);
            let stats = known.entry(*origin).or_default();
            stats.high_water = stats.high_water.max(mark);
        }
    }

    /// `origin`'s master reported `head` as its own committed high-water mark.
    pub(super) fn origin_head(&self, origin: ClusterId, head: u64) {
        self.lock().entry(origin).or_default().origin_head = Some(head);
    }

    /// Whether a probe may start now (none started in the last [`PROBE_INTERVAL`]); if so, it
    /// counts as started.
    pub(super) fn probe_due(&self) -> bool {
        let mut probed_at = self.probed_at.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if probed_at.is_some_and(|at| now.duration_since(at) < PROBE_INTERVAL) {
            return false;
        }
        *probed_at = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;
    use crate::ids::{EventId, UserId};

    fn c(id: u32) -> ClusterId {
        ClusterId::new(id).expect("cluster")
    }

    fn joined(origin: ClusterId, seq: u64) -> Event {
        Event {
            id: EventId { origin, seq },
            at: Timestamp(seq as i64),
            kind: EventKind::UserJoined {
                user: UserId::new(seq as u32).expect("user"),
            },
        }
    }

    #[test]
    fn behind_is_the_head_minus_what_is_applied() {
        let progress = Progress::default();
        progress.applied(c(2), &[joined(c(2), 1), joined(c(2), 2)]);
        let two = progress.snapshot()[&c(2)];
        assert_eq!((two.high_water, two.batches, two.events), (2, 1, 2));
        assert_eq!(two.behind(), None, "the head is not known yet");
        progress.origin_head(c(2), 7);
        assert_eq!(progress.snapshot()[&c(2)].behind(), Some(5));
        progress.applied(c(2), &[joined(c(2), 3)]);
        assert_eq!(progress.snapshot()[&c(2)].behind(), Some(4));
        // This cluster's master has more than this link applied (another synchronizer, or
        // before a restart); an old answer from the origin never makes the lag negative.
        progress.cluster_marks(&BTreeMap::from([(c(2), 9), (c(1), 40)]), &[c(2), c(3)]);
        let known = progress.snapshot();
        assert_eq!(known[&c(2)].high_water, 9);
        assert_eq!(known[&c(2)].behind(), Some(0));
        assert_eq!(known[&c(3)].high_water, 0, "every origin gets a row");
        assert!(
            !known.contains_key(&c(1)),
            "this cluster is no origin of its own"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn probes_are_spaced() {
        let progress = Progress::default();
        assert!(progress.probe_due());
        assert!(!progress.probe_due());
        tokio::time::advance(PROBE_INTERVAL).await;
        assert!(progress.probe_due());
    }
}
