//! The consuming side: this cluster's queue, with manual acknowledgements and a bounded
//! prefetch. A dispatcher opens each delivery (checking its MAC first, with a key) and hands it
//! to the worker of its origin; each origin's worker applies its messages in order, as few
//! applies as their events allow (one for messages that follow each other and are ready
//! together), and acknowledges each message on its own once the master answered that its
//! events are committed. Origins are independent: one origin's repair or slow apply holds up
//! only that origin's messages.
//!
//! - A message without a valid MAC (when the synchronizer has a key) is logged, counted and
//!   dropped (acknowledged), never requeued.
//! - A message that is not a valid batch (it does not decode, carries this cluster's own
//!   events or those of a cluster the deployment does not have, or events the master refuses)
//!   is logged, counted and rejected without requeue.
//! - A message whose events do not follow the cluster's high-water mark for their origin (the
//!   master answers `Conflict`: events are missing before it) is checked against the origin's
//!   own committed high-water mark: one claiming events the origin does not have is a forgery
//!   (logged, counted, dropped). Otherwise the missing events are read straight from the
//!   origin's master ([`ClusterLink::events_of`]) and applied, then the message is applied
//!   again. Waiting for the origin's master is bounded ([`REPAIR_PATIENCE`]): past that, the
//!   message is dropped and its events are read from the origin's master later (the worker
//!   tries again, and so does the next gap and the next session).
//! - Each session starts by reading from every origin's master what this cluster lacks of its
//!   committed events, so nothing dropped earlier stays missing.
//! - Any other failure ends the session without acknowledging; the broker redelivers what was
//!   not acknowledged, and the master drops what it already has.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;

use super::publish::declaration_failed;
use super::stats::AmqpCounters;
use super::{AmqpOptions, Ended, Outage, close, connect_or_stop, supervise, topology};
use crate::error::{Error, Result};
use crate::event::Event;
use crate::ids::ClusterId;
use crate::server::MAX_APPLY_BATCH;
use crate::sync::ClusterLink;
use crate::sync::EncodedBatch;
use crate::sync::seal::{Refusal, open_bytes_encoded};

/// Longest wait for an origin's master, at each step of reading events from it (its
/// high-water mark, the next events); past that, the events are read later.
pub const REPAIR_PATIENCE: Duration = Duration::from_secs(5);
/// First pause before reading again events a repair could not read.
const CATCH_UP_FIRST_RETRY: Duration = Duration::from_secs(1);
/// Longest pause between two such attempts.
const CATCH_UP_MAX_RETRY: Duration = Duration::from_secs(30);

/// Consumes `link`'s cluster's queue until `stop` is cancelled (or the broker refuses the
/// layout).
pub(super) async fn run(
    link: &ClusterLink,
    options: &AmqpOptions,
    counters: &Arc<AmqpCounters>,
    stop: &CancellationToken,
) -> Result<()> {
    let outage = Outage::new(link.cluster(), "consumer");
    supervise(&outage, stop, || {
        session(link, options, counters, &outage, stop)
    })
    .await
}

/// One connection's life. The origins' workers live as long as the session: they are stopped
/// and waited for before it returns.
async fn session(
    link: &ClusterLink,
    options: &AmqpOptions,
    counters: &Arc<AmqpCounters>,
    outage: &Outage,
    stop: &CancellationToken,
) -> std::result::Result<(), Ended> {
    let Some(connection) = connect_or_stop(options, link.cluster(), "consumer", stop).await? else {
        return Ok(());
    };
    let mut workers = JoinSet::new();
    let consuming = consume(&connection, link, options, counters, outage, &mut workers);
    let result = tokio::select! {
        result = consuming => result,
        () = stop.cancelled() => Ok(()),
    };
    workers.shutdown().await;
    close(connection).await;
    result
}

async fn consume(
    connection: &Connection,
    link: &ClusterLink,
    options: &AmqpOptions,
    counters: &Arc<AmqpCounters>,
    outage: &Outage,
    workers: &mut JoinSet<std::result::Result<(), Ended>>,
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
    // An inbox per origin. Every message in one is delivered and not yet acknowledged, so
    // the broker's prefetch bounds them all: sending to an inbox never waits.
    let mut inboxes = BTreeMap::new();
    for origin in link.others() {
        let (inbox, messages) = mpsc::channel(usize::from(options.prefetch));
        inboxes.insert(origin, inbox);
        let worker = OriginWorker {
            link: link.clone(),
            channel: channel.clone(),
            counters: counters.clone(),
            origin,
            messages,
            batch: usize::from(options.prefetch),
            owed_at: None,
            owed_pause: CATCH_UP_FIRST_RETRY,
        };
        workers.spawn(worker.run());
    }
    loop {
        tokio::select! {
            delivery = next_delivery(&mut consumer) => {
                dispatch(link, &channel, counters, &inboxes, delivery?).await?;
            }
            Some(ended) = workers.join_next() => {
                return Err(match ended {
                    Ok(Err(ended)) => ended,
                    Ok(Ok(())) => Ended::Broken(Error::ConnectionLost(
                        "an origin's worker ended".to_string(),
                    )),
                    Err(e) => Ended::Broken(Error::ConnectionLost(format!(
                        "an origin's worker failed: {e}"
                    ))),
                });
            }
        }
    }
}

/// The next delivery, waiting for one.
async fn next_delivery(consumer: &mut Consumer) -> std::result::Result<Delivery, Ended> {
    match std::future::poll_fn(|cx| Pin::new(&mut *consumer).poll_next(cx)).await {
        Some(delivery) => Ok(delivery?),
        None => Err(Ended::Broken(Error::ConnectionLost(
            "RabbitMQ cancelled the consumer (was the queue deleted?)".to_string(),
        ))),
    }
}

/// One message, opened: its delivery tag and its origin's events (at least one), with their
/// encoding as they arrived.
struct Message {
    tag: u64,
    batch: EncodedBatch,
}

impl Message {
    /// `origin:first-last`, for logs.
    fn range(&self, origin: ClusterId) -> String {
        let first = self.events().first().map_or(0, |e| e.id.seq);
        let last = self.events().last().map_or(0, |e| e.id.seq);
        format!("{origin}:{first}-{last}")
    }

    fn events(&self) -> &[Event] {
        self.batch.events()
    }
}

/// Opens a delivery and hands it to its origin's worker, or refuses it.
async fn dispatch(
    link: &ClusterLink,
    channel: &Channel,
    counters: &AmqpCounters,
    inboxes: &BTreeMap<ClusterId, mpsc::Sender<Message>>,
    delivery: Delivery,
) -> std::result::Result<(), Ended> {
    let tag = delivery.delivery_tag;
    counters.delivered(delivery.redelivered);
    let batch = match open_bytes_encoded(link.sync_key(), &delivery.data) {
        Ok(opened) => opened,
        Err(refusal) => {
            link.refusals().refused(&refusal);
            return match refusal {
                Refusal::BadMac(reason) => {
                    counters.dropped_forged.inc();
                    tracing::error!(
                        cluster = %link.cluster(),
                        "dropping a RabbitMQ message that is not signed with the deployment's \
                         key (forged, altered, or from a synchronizer with another cluster \
                         token): {reason}"
                    );
                    ack(channel, tag).await
                }
                Refusal::Invalid(error) => reject(link, channel, counters, tag, &error).await,
            };
        }
    };
    let origin = batch.origin();
    let Some(inbox) = inboxes.get(&origin) else {
        let error = if origin == link.cluster() {
            Error::invalid(format!(
                "a batch of this cluster's own events (cluster {origin})"
            ))
        } else {
            Error::invalid(format!(
                "a batch of cluster {origin}, in a deployment of {} clusters",
                link.clusters()
            ))
        };
        link.refusals().invalid();
        return reject(link, channel, counters, tag, &error).await;
    };
    inbox.send(Message { tag, batch }).await.map_err(|_| {
        Ended::Broken(Error::ConnectionLost(
            "an origin's worker is gone".to_string(),
        ))
    })
}

/// Applies and settles one origin's messages, in delivery order.
struct OriginWorker {
    link: ClusterLink,
    channel: Channel,
    counters: Arc<AmqpCounters>,
    origin: ClusterId,
    messages: mpsc::Receiver<Message>,
    /// Most messages taken from the inbox at once.
    batch: usize,
    /// When to read again from the origin's master events that could not be read before.
    owed_at: Option<Instant>,
    owed_pause: Duration,
}

impl OriginWorker {
    async fn run(mut self) -> std::result::Result<(), Ended> {
        // What this cluster lacks of the origin's committed events (dropped by an earlier
        // session, or lost from the queue) is read from the origin's master first.
        self.catch_up().await;
        loop {
            let owed_at = self.owed_at;
            let first = tokio::select! {
                message = self.messages.recv() => match message {
                    Some(message) => message,
                    None => return Ok(()),
                },
                () = sleep_until(owed_at), if owed_at.is_some() => {
                    self.catch_up().await;
                    continue;
                }
            };
            let mut ready = vec![first];
            while ready.len() < self.batch {
                match self.messages.try_recv() {
                    Ok(message) => ready.push(message),
                    Err(_) => break,
                }
            }
            for run in runs(ready) {
                self.settle_run(run).await?;
            }
        }
    }

    /// Applies a run of messages whose events follow each other as one batch and
    /// acknowledges each; when the master refuses the batch, settles them one by one.
    async fn settle_run(&mut self, mut run: Vec<Message>) -> std::result::Result<(), Ended> {
        if run.len() == 1
            && let Some(message) = run.pop()
        {
            return self.settle(message).await;
        }
        let events: Vec<Event> = run
            .iter()
            .flat_map(|m| m.events().iter().cloned())
            .collect();
        match apply(&self.link, self.origin, &events).await {
            Ok(()) => {
                for message in &run {
                    ack(&self.channel, message.tag).await?;
                }
                Ok(())
            }
            Err(error) if invalid(&error) || matches!(error, Error::Conflict(_)) => {
                // Find the gap or the culprit: one message at a time.
                for message in run {
                    self.settle(message).await?;
                }
                Ok(())
            }
            Err(error) => Err(Ended::Broken(error)),
        }
    }

    /// Applies one message and acknowledges it, repairing a gap before it first.
    async fn settle(&mut self, message: Message) -> std::result::Result<(), Ended> {
        match apply_message(&self.link, &message).await {
            Ok(()) => ack(&self.channel, message.tag).await,
            Err(Error::Conflict(_)) => self.repair(message).await,
            Err(error) if invalid(&error) => self.refuse(message.tag, &error).await,
            Err(error) => Err(Ended::Broken(error)),
        }
    }

    /// Settles a message that does not follow this cluster's high-water mark for its origin:
    /// drops it if the origin does not have its events (a forgery); else reads the missing
    /// events from the origin's master and applies the message again, or, when the origin's
    /// master does not answer in time, drops it and reads its events later.
    async fn repair(&mut self, message: Message) -> std::result::Result<(), Ended> {
        let (origin, range) = (self.origin, message.range(self.origin));
        let (Some(first), Some(last)) = (message.events().first(), message.events().last()) else {
            return ack(&self.channel, message.tag).await;
        };
        let (first, last) = (first.id.seq, last.id.seq);
        match tokio::time::timeout(REPAIR_PATIENCE, self.link.origin_high_water(origin)).await {
            Ok(Ok(committed)) if committed < last => {
                self.link.refusals().forged_gap();
                self.counters.dropped_forged.inc();
                tracing::error!(
                    cluster = %self.link.cluster(),
                    %origin,
                    "dropping RabbitMQ message {range}: cluster {origin} has committed events \
                     up to {committed} only, so it never sent them (a forged message)"
                );
                return ack(&self.channel, message.tag).await;
            }
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return self.postpone(message.tag, &range, &error.to_string()).await,
            Err(_) => {
                let why = format!("its master did not answer within {REPAIR_PATIENCE:?}");
                return self.postpone(message.tag, &range, &why).await;
            }
        }
        if let Err(why) = self
            .read_from_origin(first.saturating_sub(1), Reading::Gap)
            .await
        {
            return self.postpone(message.tag, &range, &why).await;
        }
        match apply_message(&self.link, &message).await {
            Ok(()) => ack(&self.channel, message.tag).await,
            Err(Error::Conflict(reason)) => {
                let error = Error::invalid(format!(
                    "events of cluster {origin} that do not follow its log even after reading \
                     it from its master: {reason}"
                ));
                self.refuse(message.tag, &error).await
            }
            Err(error) if invalid(&error) => self.refuse(message.tag, &error).await,
            Err(error) => Err(Ended::Broken(error)),
        }
    }

    /// Drops a message whose missing predecessors could not be read from the origin's master,
    /// and makes sure its events are read from there later.
    async fn postpone(
        &mut self,
        tag: u64,
        range: &str,
        why: &str,
    ) -> std::result::Result<(), Ended> {
        let origin = self.origin;
        tracing::warn!(
            cluster = %self.link.cluster(),
            %origin,
            "cannot read the events missing before RabbitMQ message {range} from the master of \
             cluster {origin} ({why}); dropping the message: its events will be read from \
             cluster {origin}'s master later"
        );
        self.link.refusals().postponed();
        self.counters.dropped_postponed.inc();
        self.owe();
        ack(&self.channel, tag).await
    }

    /// Reads what this cluster lacks of the origin's committed events from the origin's
    /// master; when it cannot, tries again later (pausing longer each time).
    async fn catch_up(&mut self) {
        let origin = self.origin;
        let mark = tokio::time::timeout(REPAIR_PATIENCE, self.link.origin_high_water(origin)).await;
        let read = match mark {
            Ok(Ok(committed)) => self.read_from_origin(committed, Reading::CatchUp).await,
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!(
                "its master did not answer within {REPAIR_PATIENCE:?}"
            )),
        };
        match read {
            Ok(()) => {
                if self.owed_at.take().is_some() {
                    tracing::info!(
                        cluster = %self.link.cluster(),
                        %origin,
                        "read the events this cluster lacked from the master of cluster {origin}"
                    );
                }
                self.owed_pause = CATCH_UP_FIRST_RETRY;
            }
            Err(why) => {
                tracing::warn!(
                    cluster = %self.link.cluster(),
                    %origin,
                    "cannot read the events of cluster {origin} from its master ({why}); \
                     trying again in {:?}",
                    self.owed_pause
                );
                self.owe();
            }
        }
    }

    /// Schedules a [`catch_up`](Self::catch_up) (the next pause from now, doubling up to
    /// [`CATCH_UP_MAX_RETRY`]), unless one is scheduled already.
    fn owe(&mut self) {
        if self.owed_at.is_none() {
            self.owed_at = Some(Instant::now() + self.owed_pause);
            self.owed_pause = (self.owed_pause * 2).min(CATCH_UP_MAX_RETRY);
        }
    }

    /// Brings this cluster's high-water mark for the origin up to `until` at least, reading
    /// the events straight from the origin's master and waiting [`REPAIR_PATIENCE`] at most
    /// for each step; `Err` says why it could not.
    async fn read_from_origin(
        &self,
        until: u64,
        reading: Reading,
    ) -> std::result::Result<(), String> {
        let (link, origin) = (&self.link, self.origin);
        let ours = link
            .high_water()
            .await
            .map_err(|e| e.to_string())?
            .get(&origin)
            .copied()
            .unwrap_or(0);
        if ours >= until {
            return Ok(());
        }
        match reading {
            Reading::Gap => tracing::warn!(
                cluster = %link.cluster(),
                %origin,
                "events {}..={until} of cluster {origin} are not in the queue; reading them \
                 from its master",
                ours + 1
            ),
            Reading::CatchUp => tracing::info!(
                cluster = %link.cluster(),
                %origin,
                "reading events {}..={until} of cluster {origin} from its master",
                ours + 1
            ),
        }
        let mut feed = link.events_of(origin, ours);
        while feed.position() < until {
            let events = match tokio::time::timeout(REPAIR_PATIENCE, feed.next()).await {
                Ok(events) => events.map_err(|e| e.to_string())?,
                Err(_) => {
                    return Err(format!(
                        "its master sent nothing for {REPAIR_PATIENCE:?} at {origin}:{}",
                        feed.position()
                    ));
                }
            };
            apply(link, origin, &events)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Rejects an invalid message (without requeue), logged and counted.
    async fn refuse(&self, tag: u64, error: &Error) -> std::result::Result<(), Ended> {
        self.link.refusals().invalid();
        reject(&self.link, &self.channel, &self.counters, tag, error).await
    }
}

/// Why events are read from their origin's master.
#[derive(Debug, Clone, Copy)]
enum Reading {
    /// A message does not follow this cluster's mark: the events before it are not in the
    /// queue.
    Gap,
    /// A session starts, or an earlier reading failed: whatever this cluster lacks.
    CatchUp,
}

/// `messages` cut into runs: consecutive messages whose events follow each other and fit in
/// one apply.
fn runs(messages: Vec<Message>) -> Vec<Vec<Message>> {
    let mut runs: Vec<Vec<Message>> = Vec::new();
    let mut len = 0;
    for message in messages {
        let continues = runs.last().is_some_and(|run| {
            let last = run.last().and_then(|m| m.events().last());
            let first = message.events().first();
            len + message.events().len() <= MAX_APPLY_BATCH
                && matches!((last, first), (Some(l), Some(f)) if f.id.seq == l.id.seq + 1)
        });
        match runs.last_mut() {
            Some(run) if continues => {
                len += message.events().len();
                run.push(message);
            }
            _ => {
                len = message.events().len();
                runs.push(vec![message]);
            }
        }
    }
    runs
}

/// Sleeps until `at` (forever for `None`).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Whether a failure to apply is the message's fault (retrying cannot help).
fn invalid(error: &Error) -> bool {
    matches!(error, Error::InvalidInput(_) | Error::Corrupt(_))
}

/// Applies `origin`'s events in batches the master takes.
/// Applies one message's batch as it arrived (decoded once, not encoded again), or in pieces
/// if it is larger than the master takes at once.
async fn apply_message(link: &ClusterLink, message: &Message) -> Result<()> {
    if message.events().len() <= MAX_APPLY_BATCH {
        link.apply_encoded(&message.batch).await
    } else {
        apply(link, message.batch.origin(), message.events()).await
    }
}

async fn apply(link: &ClusterLink, origin: ClusterId, events: &[Event]) -> Result<()> {
    for chunk in events.chunks(MAX_APPLY_BATCH) {
        link.apply(origin, chunk).await?;
    }
    Ok(())
}

/// Acknowledges one message (only it: other origins' messages before it may still be in
/// progress).
async fn ack(channel: &Channel, tag: u64) -> std::result::Result<(), Ended> {
    channel
        .basic_ack(tag, BasicAckOptions { multiple: false })
        .await
        .map_err(Ended::from)
}

/// Rejects an invalid message without requeue (logged, and counted as dropped).
async fn reject(
    link: &ClusterLink,
    channel: &Channel,
    counters: &AmqpCounters,
    tag: u64,
    error: &Error,
) -> std::result::Result<(), Ended> {
    counters.dropped_invalid.inc();
    tracing::error!(
        cluster = %link.cluster(),
        "dropping a RabbitMQ message that is not a valid batch: {error}"
    );
    channel
        .basic_reject(tag, BasicRejectOptions { requeue: false })
        .await
        .map_err(Ended::from)
}
