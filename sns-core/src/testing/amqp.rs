//! RabbitMQ in tests (features `test-util` and `amqp`): run against the broker named by
//! `SNS_AMQP_URL`, or skip.
//!
//! Without `SNS_AMQP_URL` a test prints that it was skipped and passes; with
//! `SNS_REQUIRE_AMQP=1` a missing or unreachable broker fails it instead. Each
//! [`AmqpTestBroker`] has its own name prefix, so tests running at once never see each other's
//! messages, and deletes its exchange and queues when dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;

use crate::deployment::Bus;
use crate::error::{Error, Result};
use crate::ids::ClusterId;
use crate::sync::amqp::{AmqpOptions, QueueType, delete_topology, topology};

/// The variable naming the broker.
pub const AMQP_URL_VAR: &str = "SNS_AMQP_URL";
/// The variable that turns a missing broker into a failure (`1`).
pub const REQUIRE_AMQP_VAR: &str = "SNS_REQUIRE_AMQP";
/// Clusters whose queues a dropped [`AmqpTestBroker`] deletes (`1..=` this).
const MAX_TEST_CLUSTERS: u32 = 8;

/// A message taken out of a queue by [`AmqpTestBroker::take_ready`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakenMessage {
    /// The message as it was published.
    pub body: Vec<u8>,
    /// The broker delivered it before (to a consumer that stopped without acknowledging it):
    /// a requeued message, not a new publication.
    pub redelivered: bool,
}

/// A RabbitMQ broker for one test, with a name prefix of its own.
#[derive(Debug)]
pub struct AmqpTestBroker {
    url: String,
    prefix: String,
}

/// The broker for `test`, or `None` after printing that `test` was skipped: when
/// `SNS_AMQP_URL` is not set, or the broker does not accept a connection.
///
/// # Panics
///
/// When `SNS_REQUIRE_AMQP=1` and there is no reachable broker.
pub async fn amqp_broker(test: &str) -> Option<AmqpTestBroker> {
    let required = std::env::var(REQUIRE_AMQP_VAR).is_ok_and(|v| v == "1");
    let url = match std::env::var(AMQP_URL_VAR) {
        Ok(url) if !url.is_empty() => url,
        _ => {
            assert!(
                !required,
                "{test}: {REQUIRE_AMQP_VAR}=1 but {AMQP_URL_VAR} is not set"
            );
            eprintln!("{test}: skipped: {AMQP_URL_VAR} is not set (no RabbitMQ broker)");
            return None;
        }
    };
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let broker = AmqpTestBroker {
        url,
        prefix: format!(
            "sns-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ),
    };
    let options = broker.options(QueueType::Quorum);
    match crate::sync::amqp::connect(&options, &format!("{} probe", broker.prefix)).await {
        Ok(connection) => {
            let _ = connection.close(200, "probe".into()).await;
            Some(broker)
        }
        Err(e) => {
            assert!(!required, "{test}: RabbitMQ is unreachable: {e}");
            eprintln!("{test}: skipped: RabbitMQ is unreachable: {e}");
            None
        }
    }
}

impl AmqpTestBroker {
    /// The broker's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// This test's prefix of exchange and queue names.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Transport settings for this broker and prefix, with queues of `queue_type`.
    pub fn options(&self, queue_type: QueueType) -> AmqpOptions {
        AmqpOptions {
            url: self.url.clone(),
            queue_type,
            prefix: self.prefix.clone(),
            ..AmqpOptions::default()
        }
    }

    /// [`Bus::Amqp`] with [`options`](Self::options).
    pub fn bus(&self, queue_type: QueueType) -> Bus {
        Bus::Amqp(self.options(queue_type))
    }

    /// Publishes `body` as is to the exchange with `routing_key` (e.g. `origin.2`), and
    /// returns once the broker confirmed it.
    pub async fn publish_raw(&self, routing_key: &str, body: &[u8]) -> Result<()> {
        let options = self.options(QueueType::Quorum);
        let (connection, channel) = self.open(&options, "publisher").await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(topology::unavailable)?;
        let confirmation = channel
            .basic_publish(
                options.exchange().as_str().into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .map_err(topology::unavailable)?
            .await
            .map_err(topology::unavailable)?;
        let _ = connection.close(200, "done".into()).await;
        match confirmation {
            lapin::Confirmation::Ack(None) => Ok(()),
            other => Err(Error::Unavailable(format!(
                "the broker did not take the message: {other:?}"
            ))),
        }
    }

    /// A connection to the broker named after this test and `role`, and a channel on it.
    async fn open(
        &self,
        options: &AmqpOptions,
        role: &str,
    ) -> Result<(lapin::Connection, lapin::Channel)> {
        let name = format!("{} test {role}", self.prefix);
        let connection = crate::sync::amqp::connect(options, &name).await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(topology::unavailable)?;
        Ok((connection, channel))
    }

    /// The number of messages ready in `cluster`'s queue (not counting delivered ones awaiting
    /// an acknowledgement).
    pub async fn ready_messages(&self, cluster: ClusterId) -> Result<u32> {
        let options = self.options(QueueType::Quorum);
        let (connection, channel) = self.open(&options, "probe").await?;
        let queue = channel
            .queue_declare(
                options.queue(cluster).as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(topology::unavailable)?;
        let _ = connection.close(200, "done".into()).await;
        Ok(queue.message_count())
    }

    /// Takes every ready message out of `cluster`'s queue and returns them, oldest first.
    /// Consumes (quorum queues with a single active consumer refuse `basic.get`), so it waits
    /// while another consumer is active: stop the cluster's synchronizer first.
    pub async fn take_ready(&self, cluster: ClusterId) -> Result<Vec<TakenMessage>> {
        let ready = self.ready_messages(cluster).await?;
        let options = self.options(QueueType::Quorum);
        let (connection, channel) = self.open(&options, "reader").await?;
        let mut consumer = channel
            .basic_consume(
                options.queue(cluster).as_str().into(),
                "test reader".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(topology::unavailable)?;
        let mut bodies = Vec::new();
        while bodies.len() < ready as usize {
            match tokio_stream::StreamExt::next(&mut consumer).await {
                Some(Ok(delivery)) => bodies.push(TakenMessage {
                    body: delivery.data,
                    redelivered: delivery.redelivered,
                }),
                Some(Err(e)) => return Err(topology::unavailable(e)),
                None => break,
            }
        }
        let _ = connection.close(200, "done".into()).await;
        Ok(bodies)
    }

    /// Declares `cluster`'s queue as a durable queue of `queue_type`: fine when it is of that
    /// type, refused ([`Error::Unavailable`] naming `PRECONDITION_FAILED`) when it is of
    /// another.
    pub async fn declare_queue(&self, cluster: ClusterId, queue_type: QueueType) -> Result<()> {
        let options = self.options(queue_type);
        let (connection, channel) = self.open(&options, "probe").await?;
        let declared = channel
            .queue_declare(
                options.queue(cluster).as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                topology::queue_arguments(queue_type),
            )
            .await;
        let _ = connection.close(200, "done".into()).await;
        declared.map(|_| ()).map_err(topology::unavailable)
    }
}

impl Drop for AmqpTestBroker {
    fn drop(&mut self) {
        // Best effort, on a runtime of its own: a drop cannot wait on the test's.
        let options = self.options(QueueType::Quorum);
        let removal = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                let removed = tokio::time::timeout(
                    Duration::from_secs(10),
                    delete_topology(&options, MAX_TEST_CLUSTERS),
                )
                .await;
                if let Ok(Err(e)) = removed {
                    eprintln!("could not delete the test's RabbitMQ queues: {e}");
                }
            });
        });
        let _ = removal.join();
    }
}
