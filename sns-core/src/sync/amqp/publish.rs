//! The publishing side: this cluster's own committed events, after the cursor, each batch one
//! persistent message on the exchange with routing key `origin.<cluster>`, its body a
//! `SignedBatch` (signed when the deployment has a cluster token, see [`seal`](crate::sync::seal)). Up to
//! [`MAX_IN_FLIGHT`] messages await their publisher confirm at once; the cursor advances past
//! a message only once it and every message before it were confirmed. A message the broker
//! refuses (nack) or cannot route (returned: a queue is missing) ends the session, and the next
//! one declares the layout again and publishes from the cursor.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::Poll;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::stats::AmqpCounters;
use super::{AmqpOptions, CursorStore, Ended, Outage, close, connect_or_stop, supervise, topology};
use crate::error::{Error, Result};
use crate::ids::ClusterId;
use crate::sync::seal::seal_encoded;
use crate::sync::{ClusterLink, EncodedBatch};

/// Most messages awaiting their publisher confirm.
pub const MAX_IN_FLIGHT: usize = 64;

/// The `content-type` of every message.
pub const CONTENT_TYPE: &str = "application/x-protobuf";
/// The `type` of every message: the protobuf message of the body.
pub const MESSAGE_TYPE: &str = "sns.v1.SignedBatch";
/// The `app-id` of every message.
pub const APP_ID: &str = "sns-synchronizer";

/// Publishes `link`'s cluster's own events until `stop` is cancelled (or the broker refuses the
/// layout).
pub(super) async fn run(
    link: &ClusterLink,
    options: &AmqpOptions,
    cursor: &CursorStore,
    counters: &AmqpCounters,
    stop: &CancellationToken,
) -> Result<()> {
    let outage = Outage::new(link.cluster(), "publisher");
    let side = Publisher {
        link,
        options,
        cursor,
        counters,
    };
    supervise(&outage, stop, || session(&side, &outage, stop)).await
}

/// What a publishing session works with.
struct Publisher<'a> {
    link: &'a ClusterLink,
    options: &'a AmqpOptions,
    cursor: &'a CursorStore,
    counters: &'a AmqpCounters,
}

/// One connection's life.
async fn session(
    side: &Publisher<'_>,
    outage: &Outage,
    stop: &CancellationToken,
) -> std::result::Result<(), Ended> {
    let (link, options) = (side.link, side.options);
    let Some(connection) = connect_or_stop(options, link.cluster(), "publisher", stop).await?
    else {
        return Ok(());
    };
    let result = tokio::select! {
        result = publish(&connection, side, outage) => result,
        () = stop.cancelled() => Ok(()),
    };
    close(connection).await;
    result
}

async fn publish(
    connection: &Connection,
    side: &Publisher<'_>,
    outage: &Outage,
) -> std::result::Result<(), Ended> {
    let (link, options, cursor) = (side.link, side.options, side.cursor);
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    topology::declare(&channel, options, link.clusters())
        .await
        .map_err(declaration_failed)?;
    outage.connected();
    let start = cursor.get();
    tracing::debug!(cluster = %link.cluster(), after = start, "publishing own events");
    // A named reader, so compaction keeps what the publisher has not published yet (the
    // publishers of one cluster share the name).
    // A message holds at most what the master streams in one batch: the consumers' prefetch
    // counts messages, so this bounds what a consumer holds.
    let mut feed = link
        .own_events(start, "amqp")
        .gathering_at_most(crate::grpc::log::STREAM_BATCH);
    let (batches, received) = mpsc::channel(4);
    // Reads ahead of the confirms; stops at the first error, which `send` reports.
    let read = async {
        loop {
            let next = feed.next_encoded().await;
            let failed = next.is_err();
            if batches.send(next).await.is_err() || failed {
                break;
            }
        }
        std::future::pending::<()>().await;
    };
    tokio::select! {
        result = send(&channel, side, received) => result,
        () = read => Ok(()),
    }
}

/// Publishes what `received` yields and advances `cursor` as confirms arrive.
async fn send(
    channel: &Channel,
    side: &Publisher<'_>,
    mut received: mpsc::Receiver<Result<EncodedBatch>>,
) -> std::result::Result<(), Ended> {
    let (link, options, cursor, counters) = (side.link, side.options, side.cursor, side.counters);
    let origin = link.cluster();
    let exchange = options.exchange();
    let routing_key = AmqpOptions::routing_key(origin);
    let mut in_flight: VecDeque<(u64, PublisherConfirm)> = VecDeque::new();
    loop {
        tokio::select! {
            batch = received.recv(), if in_flight.len() < MAX_IN_FLIGHT => {
                let batch = match batch {
                    Some(Ok(batch)) => batch,
                    Some(Err(error)) => return Err(feed_failed(link, cursor, error).await),
                    None => return Err(Ended::Broken(Error::ConnectionLost(
                        "the own-event feed ended".to_string(),
                    ))),
                };
                let events = batch.events();
                let (Some(first), Some(last)) = (events.first(), events.last()) else {
                    continue;
                };
                let body = seal_encoded(link.sync_key(), &batch)
                    .map_err(Ended::Broken)?
                    .encode_to_vec();
                let confirm = channel
                    .basic_publish(
                        exchange.as_str().into(),
                        routing_key.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        &body,
                        properties(origin, first.id.seq, last.id.seq),
                    )
                    .await?;
                counters.published.inc();
                // A state transfer piece that says more follow completes nothing: the cursor
                // moves only past the last piece.
                let done = events.iter().rev().find(|e| e.completes()).map_or(0, |e| e.id.seq);
                in_flight.push_back((done, confirm));
            }
            (seq, confirmation) = first_confirmation(&mut in_flight) => {
                match confirmation? {
                    Confirmation::Ack(None) => {
                        counters.confirmed.inc();
                        cursor.advance(seq);
                    }
                    Confirmation::Ack(Some(returned)) => {
                        counters.returned.inc();
                        return Err(Ended::Broken(Error::Unavailable(format!(
                            "RabbitMQ could not route events up to {origin}:{seq} ({}); declaring the queues again",
                            returned.reply_text
                        ))));
                    }
                    Confirmation::Nack(_) => {
                        counters.nacked.inc();
                        return Err(Ended::Broken(Error::Unavailable(format!(
                            "RabbitMQ refused to store events up to {origin}:{seq}"
                        ))));
                    }
                    Confirmation::NotRequested => {
                        return Err(Ended::Broken(Error::Unavailable(
                            "publisher confirms are off on the channel".to_string(),
                        )));
                    }
                }
            }
        }
    }
}

/// The properties of a message holding `origin`'s events `first..=last`.
pub(super) fn properties(origin: ClusterId, first: u64, last: u64) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(CONTENT_TYPE.into())
        .with_type(MESSAGE_TYPE.into())
        .with_app_id(APP_ID.into())
        .with_message_id(format!("{origin}:{first}-{last}").into())
}

/// Waits for the oldest message in flight to be confirmed and takes it out: its last sequence
/// number and the broker's answer. Never ready while nothing is in flight.
async fn first_confirmation(
    in_flight: &mut VecDeque<(u64, PublisherConfirm)>,
) -> (u64, lapin::Result<Confirmation>) {
    let answer = std::future::poll_fn(|cx| match in_flight.front_mut() {
        Some((_, confirm)) => Pin::new(confirm).poll(cx),
        None => Poll::Pending,
    })
    .await;
    let seq = in_flight.pop_front().map_or(0, |(seq, _)| seq);
    (seq, answer)
}

/// What a failure to read own events means for the session. A cursor beyond what the
/// cluster has committed (its data was replaced) is set back to the cluster's high-water mark.
async fn feed_failed(link: &ClusterLink, cursor: &CursorStore, error: Error) -> Ended {
    if let Error::InvalidInput(_) = error
        && let Ok(marks) = link.high_water().await
    {
        let committed = marks.get(&link.cluster()).copied().unwrap_or(0);
        if cursor.get() > committed {
            tracing::error!(
                cluster = %link.cluster(),
                "the RabbitMQ publisher's cursor ({}) is beyond the cluster's committed events \
                 ({committed}); publishing from {committed}",
                cursor.get()
            );
            cursor.rewind(committed);
        }
    }
    Ended::Broken(error)
}

/// A declaration the broker refused is a configuration error; anything else an outage.
pub(super) fn declaration_failed(error: Error) -> Ended {
    match error {
        Error::InvalidInput(_) => Ended::Fatal(error),
        other => Ended::Broken(other),
    }
}
