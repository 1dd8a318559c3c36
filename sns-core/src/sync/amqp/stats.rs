//! What the RabbitMQ transport counts for operators, since its synchronizer started: messages
//! published and what the broker answered (confirmed, refused, returned unroutable),
//! deliveries the broker marked as redelivered, and messages the consumer dropped, by reason.
//! Read as one [`AmqpStats`] by [`AmqpBus::stats`](super::AmqpBus::stats).

use crate::stats::Counter;

/// The transport's counters, shared by its publisher and consumer.
#[derive(Debug, Default)]
pub(super) struct AmqpCounters {
    pub(super) published: Counter,
    pub(super) confirmed: Counter,
    pub(super) nacked: Counter,
    pub(super) returned: Counter,
    pub(super) delivered: Counter,
    pub(super) redelivered: Counter,
    pub(super) dropped_forged: Counter,
    pub(super) dropped_invalid: Counter,
    pub(super) dropped_postponed: Counter,
}

impl AmqpCounters {
    /// Counts a delivery, and whether the broker marked it as redelivered.
    pub(super) fn delivered(&self, redelivered: bool) {
        self.delivered.inc();
        if redelivered {
            self.redelivered.inc();
        }
    }

    /// The counts now.
    pub(super) fn snapshot(&self) -> AmqpStats {
        AmqpStats {
            published: self.published.get(),
            confirmed: self.confirmed.get(),
            nacked: self.nacked.get(),
            returned: self.returned.get(),
            delivered: self.delivered.get(),
            redelivered: self.redelivered.get(),
            dropped_forged: self.dropped_forged.get(),
            dropped_invalid: self.dropped_invalid.get(),
            dropped_postponed: self.dropped_postponed.get(),
        }
    }
}

/// A RabbitMQ transport's counts at one moment (see [`AmqpBus::stats`](super::AmqpBus::stats)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AmqpStats {
    /// Messages of this cluster's own events published (republished ones included).
    pub published: u64,
    /// Published messages the broker confirmed (acknowledged, and routed to a queue).
    pub confirmed: u64,
    /// Published messages the broker refused to store (negative confirm); each one ends the
    /// publisher's session, which publishes again from its cursor.
    pub nacked: u64,
    /// Published messages the broker could not route to any queue (returned); each one ends
    /// the publisher's session, which declares the queues again.
    pub returned: u64,
    /// Messages delivered to the consumer.
    pub delivered: u64,
    /// Deliveries the broker marked as redelivered (handed out before and not acknowledged:
    /// after a consumer's restart or a broken connection).
    pub redelivered: u64,
    /// Messages dropped as forged: without a valid MAC (with a key), or claiming events their
    /// origin does not have.
    pub dropped_forged: u64,
    /// Messages dropped as invalid: undecodable, of this cluster or of a cluster the
    /// deployment does not have, or events the master refused.
    pub dropped_invalid: u64,
    /// Messages dropped for now because the events missing before them could not be read from
    /// their origin's master in time (their events are read from there later).
    pub dropped_postponed: u64,
}
