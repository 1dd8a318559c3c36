//! The broker-side layout: one durable topic exchange, one durable queue per consuming cluster
//! bound to the routing key of every other origin. Every synchronizer declares all of it on
//! each (re)connection, so a message is never published before the queues that must hold it
//! exist, and a broker that lost its definitions gets them back.

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use super::{AmqpOptions, QueueType};
use crate::error::{Error, Result};
use crate::ids::ClusterId;

/// The arguments every consuming queue is declared with.
pub(crate) fn queue_arguments(queue_type: QueueType) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from(queue_type.as_str())),
    );
    arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    arguments
}

/// Declares the exchange, the queue of every cluster of `clusters` and their bindings.
/// A declaration the broker refuses (a queue or exchange that exists with other arguments, or
/// missing permissions) is a configuration error ([`Error::InvalidInput`]); anything else is
/// an outage ([`Error::Unavailable`]).
pub(super) async fn declare(channel: &Channel, options: &AmqpOptions, clusters: u32) -> Result<()> {
    let exchange = options.exchange();
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| refused(&format!("exchange {exchange}"), e))?;
    let all: Vec<ClusterId> = (1..=clusters).filter_map(ClusterId::new).collect();
    for consumer in &all {
        let queue = options.queue(*consumer);
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    exclusive: false,
                    auto_delete: false,
                    ..QueueDeclareOptions::default()
                },
                queue_arguments(options.queue_type),
            )
            .await
            .map_err(|e| refused(&format!("queue {queue}"), e))?;
        for origin in all.iter().filter(|o| *o != consumer) {
            channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    AmqpOptions::routing_key(*origin).as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| refused(&format!("binding of queue {queue}"), e))?;
        }
    }
    Ok(())
}

/// Deletes the queues of clusters `1..=clusters` and the exchange, with whatever they hold.
/// For tearing down a deployment (and tests); synchronizers never delete anything.
pub async fn delete_topology(options: &AmqpOptions, clusters: u32) -> Result<()> {
    let connection = super::connect(options, "topology removal").await?;
    let channel = connection.create_channel().await.map_err(unavailable)?;
    for cluster in (1..=clusters).filter_map(ClusterId::new) {
        channel
            .queue_delete(
                options.queue(cluster).as_str().into(),
                QueueDeleteOptions::default(),
            )
            .await
            .map_err(unavailable)?;
    }
    channel
        .exchange_delete(
            options.exchange().as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .map_err(unavailable)?;
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

/// A broker error as a lost connection: connect again and go on.
pub(crate) fn unavailable(error: lapin::Error) -> Error {
    Error::ConnectionLost(format!("RabbitMQ: {error}"))
}

/// A failed declaration: a configuration error when the broker refused it, else an outage.
fn refused(what: &str, error: lapin::Error) -> Error {
    if let lapin::ErrorKind::ProtocolError(amqp) = error.kind()
        && matches!(
            amqp.kind(),
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED | AMQPSoftError::ACCESSREFUSED)
        )
    {
        return Error::invalid(format!(
            "RabbitMQ refused to declare the {what}: {} (does it exist with other arguments, \
             e.g. another queue type? delete it or use another prefix)",
            amqp.get_message()
        ));
    }
    unavailable(error)
}
