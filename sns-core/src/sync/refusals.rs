//! What a synchronizer refused to apply, counted: forged or altered batches (bad MAC), messages
//! claiming events their origin does not have (forged gaps), batches that are not valid, and
//! messages dropped for now because the events before them could not be read in time.
//! Each refusal is also logged at error level where it happens; the counts are for tests and,
//! later, metrics.

use std::sync::atomic::{AtomicU64, Ordering};

use super::seal::Refusal;

/// A synchronizer's refusal counters, since it started ([`Synchronizer::refusals`](
/// super::Synchronizer::refusals)).
#[derive(Debug, Default)]
pub struct SyncRefusals {
    bad_mac: AtomicU64,
    forged_gap: AtomicU64,
    invalid: AtomicU64,
    postponed: AtomicU64,
}

/// The counts of a [`SyncRefusals`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefusalCounts {
    /// Batches without a MAC, or with one that does not match, where a key was expected.
    pub bad_mac: u64,
    /// RabbitMQ messages that claimed events beyond their origin's own committed high-water
    /// mark (a forgery that would otherwise have sent the consumer into gap repair).
    pub forged_gap: u64,
    /// Batches that were not valid: undecodable, signed for another origin or range, of this
    /// cluster or of a cluster the deployment does not have, or refused by the master.
    pub invalid: u64,
    /// RabbitMQ messages dropped because the events missing before them could not be read from
    /// their origin's master in time; those events are read from there later.
    pub postponed: u64,
}

impl SyncRefusals {
    /// The counts now.
    pub fn counts(&self) -> RefusalCounts {
        RefusalCounts {
            bad_mac: self.bad_mac.load(Ordering::Relaxed),
            forged_gap: self.forged_gap.load(Ordering::Relaxed),
            invalid: self.invalid.load(Ordering::Relaxed),
            postponed: self.postponed.load(Ordering::Relaxed),
        }
    }

    /// Counts a batch that [`open`](super::seal::open) refused.
    pub(crate) fn refused(&self, refusal: &Refusal) {
        match refusal {
            Refusal::BadMac(_) => self.bad_mac.fetch_add(1, Ordering::Relaxed),
            Refusal::Invalid(_) => self.invalid.fetch_add(1, Ordering::Relaxed),
        };
    }

    // The counters below are bumped only by the RabbitMQ consumer (feature `amqp`); the pull
    // transports count what `open` refuses and leave the rest to the master.

    /// Counts a message that claimed events its origin does not have.
    #[cfg(feature = "amqp")]
    pub(crate) fn forged_gap(&self) {
        self.forged_gap.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a message dropped until its origin's master can be read.
    #[cfg(feature = "amqp")]
    pub(crate) fn postponed(&self) {
        self.postponed.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a batch that was not valid.
    #[cfg(feature = "amqp")]
    pub(crate) fn invalid(&self) {
        self.invalid.fetch_add(1, Ordering::Relaxed);
    }
}
