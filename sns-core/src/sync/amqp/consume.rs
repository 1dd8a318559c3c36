//! The consuming side: this cluster's queue, with manual acknowledgements and a bounded
//! prefetch. Deliveries that are ready together are handled together: the messages of each
//! origin, in order, become as few applies as their events allow (one, when they follow each
//! other), and all of them are acknowledged with one `multiple` ack once the master answered
//! that every one of their events is committed.
//!
//! - A message that is not a valid batch (it does not decode, carries this cluster's own
//!   events or those of a cluster the deployment does not have, or events the master refuses)
//!   is logged and rejected without requeue.
//! - A message whose events do not follow the cluster's high-water mark for their origin (the
//!   master answers `Conflict`: events are missing before it) is repaired: the missing events
//!   are read straight from the origin's master ([`ClusterLink::events_of`]) and applied, then
//!   the message is applied again.
//! - Any other failure ends the session without acknowledging; the broker redelivers what was
//!   not acknowledged, and the master drops what it already has.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::task::Poll;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;

use super::publish::declaration_failed;
use super::{AmqpOptions, Ended, Outage, close, connect_or_stop, supervise, topology};
use crate::error::{Error, Result};
use crate::event::Event;
use crate::ids::ClusterId;
use crate::server::MAX_APPLY_BATCH;
use crate::sync::ClusterLink;
use crate::sync::seal::{Refusal, open_bytes};

/// Consumes `link`'s cluster's queue until `stop` is cancelled (or the broker refuses the
/// layout).
pub(super) async fn run(
    link: &ClusterLink,
    options: &AmqpOptions,
    stop: &CancellationToken,
) -> Result<()> {
    let outage = Outage::new(link.cluster(), "consumer");
    supervise(&outage, stop, || session(link, options, &outage, stop)).await
}

/// One connection's life.
async fn session(
    link: &ClusterLink,
    options: &AmqpOptions,
    outage: &Outage,
    stop: &CancellationToken,
) -> std::result::Result<(), Ended> {
    let Some(connection) = connect_or_stop(options, link.cluster(), "consumer", stop).await? else {
        return Ok(());
    };
    let result = tokio::select! {
        result = consume(&connection, link, options, outage) => result,
        () = stop.cancelled() => Ok(()),
    };
    close(connection).await;
    result
}

async fn consume(
    connection: &Connection,
    link: &ClusterLink,
    options: &AmqpOptions,
    outage: &Outage,
) -> std::result::Result<(), Ended> {
    let channel = connection.create_channel().await?;
    topology::declare(&channel, options, link.clusters())
        .await
        .map_err(declaration_failed)?;
    channel
        .basic_qos(options.prefetch, BasicQosOptions::default())
        .await?;
    let queue = options.queue(link.cluster());
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            options
                .connection_name(link.cluster(), "consumer")
                .as_str()
                .into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    outage.connected();
    tracing::debug!(cluster = %link.cluster(), %queue, "consuming");
    loop {
        let mut deliveries = vec![next_delivery(&mut consumer).await?];
        while deliveries.len() < usize::from(options.prefetch) {
            match ready_delivery(&mut consumer).await {
                Some(delivery) => deliveries.push(delivery?),
                None => break,
            }
        }
        handle(link, &channel, deliveries).await?;
    }
}

/// The next delivery, waiting for one.
async fn next_delivery(consumer: &mut Consumer) -> std::result::Result<Delivery, Ended> {
    match std::future::poll_fn(|cx| Pin::new(&mut *consumer).poll_next(cx)).await {
        Some(delivery) => Ok(delivery?),
        None => Err(Ended::Broken(Error::Unavailable(
            "RabbitMQ cancelled the consumer (was the queue deleted?)".to_string(),
        ))),
    }
}

/// A delivery that is ready now, if any (`Some(Err)` when the consumer broke).
async fn ready_delivery(consumer: &mut Consumer) -> Option<std::result::Result<Delivery, Ended>> {
    std::future::poll_fn(|cx| match Pin::new(&mut *consumer).poll_next(cx) {
        Poll::Ready(Some(delivery)) => Poll::Ready(Some(delivery.map_err(Ended::from))),
        Poll::Ready(None) => Poll::Ready(Some(Err(Ended::Broken(Error::Unavailable(
            "RabbitMQ cancelled the consumer (was the queue deleted?)".to_string(),
        ))))),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// Consecutive messages of one origin whose events follow each other.
struct Run {
    origin: ClusterId,
    /// Each message's delivery tag and events, in delivery order.
    parts: Vec<(u64, Vec<Event>)>,
    len: usize,
}

impl Run {
    fn new(origin: ClusterId) -> Self {
        Self {
            origin,
            parts: Vec::new(),
            len: 0,
        }
    }

    /// Whether `events` of `origin` continue this run (and fit in one apply).
    fn continued_by(&self, origin: ClusterId, events: &[Event]) -> bool {
        let last = self.parts.last().and_then(|(_, e)| e.last());
        let first = events.first();
        origin == self.origin
            && self.len + events.len() <= MAX_APPLY_BATCH
            && matches!((last, first), (Some(l), Some(f)) if f.id.seq == l.id.seq + 1)
    }

    fn push(&mut self, tag: u64, events: Vec<Event>) {
        self.len += events.len();
        self.parts.push((tag, events));
    }
}

/// Applies and settles deliveries. Each origin's messages are applied in delivery order, as
/// few applies as possible (a run of messages whose events follow each other is one); origins
/// are independent, so the messages of two origins interleaved in the queue do not each cost
/// an apply. Every valid message is acknowledged at the end with one `multiple` ack, once all
/// of them are committed; a failure before that acknowledges none (they are redelivered).
async fn handle(
    link: &ClusterLink,
    channel: &Channel,
    deliveries: Vec<Delivery>,
) -> std::result::Result<(), Ended> {
    let mut runs: BTreeMap<ClusterId, Vec<Run>> = BTreeMap::new();
    let mut last_tag = None;
    for delivery in deliveries {
        let tag = delivery.delivery_tag;
        let opened = match open_bytes(link.sync_key(), &delivery.data) {
            Ok(opened) => opened,
            Err(refusal) => {
                link.refusals().refused(&refusal);
                match refusal {
                    Refusal::BadMac(reason) => {
                        tracing::error!(
                            cluster = %link.cluster(),
                            "dropping a RabbitMQ message that is not signed with the \
                             deployment's key: {reason}"
                        );
                        last_tag = Some(tag);
                    }
                    Refusal::Invalid(error) => reject(link, channel, tag, &error).await?,
                }
                continue;
            }
        };
        let decoded = Ok(opened).and_then(|(origin, events)| {
            if origin == link.cluster() {
                Err(Error::invalid(format!(
                    "a batch of this cluster's own events (cluster {origin})"
                )))
            } else if origin.get() > link.clusters() {
                Err(Error::invalid(format!(
                    "a batch of cluster {origin}, in a deployment of {} clusters",
                    link.clusters()
                )))
            } else {
                Ok((origin, events))
            }
        });
        match decoded {
            Err(error) => {
                link.refusals().invalid();
                reject(link, channel, tag, &error).await?
            }
            Ok((origin, events)) => {
                last_tag = Some(tag);
                if events.is_empty() {
                    continue;
                }
                let list = runs.entry(origin).or_default();
                match list.last_mut() {
                    Some(run) if run.continued_by(origin, &events) => run.push(tag, events),
                    _ => {
                        let mut run = Run::new(origin);
                        run.push(tag, events);
                        list.push(run);
                    }
                }
            }
        }
    }
    for run in runs.into_values().flatten() {
        apply_run(link, channel, run).await?;
    }
    match last_tag {
        Some(tag) => ack(channel, tag, true).await,
        None => Ok(()),
    }
}

/// Applies a run; when the master refuses it as invalid, applies its messages one by one and
/// rejects the ones that are invalid (the others are acknowledged with the rest).
async fn apply_run(
    link: &ClusterLink,
    channel: &Channel,
    run: Run,
) -> std::result::Result<(), Ended> {
    let events: Vec<Event> = run
        .parts
        .iter()
        .flat_map(|(_, e)| e.iter().cloned())
        .collect();
    match apply_repairing(link, run.origin, &events).await {
        Ok(()) => Ok(()),
        Err(error) if invalid(&error) && run.parts.len() > 1 => {
            // Find the culprit: one message at a time.
            for (tag, events) in &run.parts {
                match apply_repairing(link, run.origin, events).await {
                    Ok(()) => {}
                    Err(error) if invalid(&error) => reject(link, channel, *tag, &error).await?,
                    Err(error) => return Err(Ended::Broken(error)),
                }
            }
            Ok(())
        }
        Err(error) if invalid(&error) => match run.parts.last() {
            Some((tag, _)) => reject(link, channel, *tag, &error).await,
            None => Ok(()),
        },
        Err(error) => Err(Ended::Broken(error)),
    }
}

/// Whether a failure to apply is the message's fault (retrying cannot help).
fn invalid(error: &Error) -> bool {
    matches!(error, Error::InvalidInput(_) | Error::Corrupt(_))
}

/// Applies `origin`'s `events`; when the master answers that events are missing before them,
/// reads the missing ones from the origin's master, applies them, and applies `events` again.
async fn apply_repairing(link: &ClusterLink, origin: ClusterId, events: &[Event]) -> Result<()> {
    match apply(link, origin, events).await {
        Err(Error::Conflict(_)) => {}
        other => return other,
    }
    let before = events.first().map_or(0, |e| e.id.seq.saturating_sub(1));
    repair(link, origin, before).await?;
    match apply(link, origin, events).await {
        Err(Error::Conflict(reason)) => Err(Error::invalid(format!(
            "events of cluster {origin} that do not follow its log even after reading it \
             from its master: {reason}"
        ))),
        other => other,
    }
}

/// Applies `origin`'s events in batches the master takes.
async fn apply(link: &ClusterLink, origin: ClusterId, events: &[Event]) -> Result<()> {
    for chunk in events.chunks(MAX_APPLY_BATCH) {
        link.apply(origin, chunk).await?;
    }
    Ok(())
}

/// Brings this cluster's high-water mark for `origin` up to `until` at least, reading the
/// events straight from the origin's master.
async fn repair(link: &ClusterLink, origin: ClusterId, until: u64) -> Result<()> {
    let high_water = link.high_water().await?.get(&origin).copied().unwrap_or(0);
    if high_water >= until {
        return Ok(());
    }
    tracing::warn!(
        cluster = %link.cluster(),
        %origin,
        "events {}..={until} of cluster {origin} are not in the queue; reading them from its master",
        high_water + 1
    );
    let mut feed = link.events_of(origin, high_water);
    while feed.position() < until {
        let events = feed.next().await?;
        apply(link, origin, &events).await?;
    }
    Ok(())
}

async fn ack(channel: &Channel, tag: u64, multiple: bool) -> std::result::Result<(), Ended> {
    channel
        .basic_ack(tag, BasicAckOptions { multiple })
        .await
        .map_err(Ended::from)
}

async fn reject(
    link: &ClusterLink,
    channel: &Channel,
    tag: u64,
    error: &Error,
) -> std::result::Result<(), Ended> {
    tracing::error!(
        cluster = %link.cluster(),
        "dropping a RabbitMQ message that is not a valid batch: {error}"
    );
    channel
        .basic_reject(tag, BasicRejectOptions { requeue: false })
        .await
        .map_err(Ended::from)
}
