//! RabbitMQ (lapin): one connection per process, (re)opened on demand, with the topology
//! declared idempotently on every connect.
//!
//! The event bus is the durable topic exchange `<prefix>.events`: the relay publishes every
//! event to it with the event type as routing key, so internal services may bind their own
//! queues (`generation.#`, `api_key.revoked`, ...). The prefix (`DEVGATE_RABBITMQ_PREFIX`)
//! lets several deployments, or tests, share one broker.
//!
//! Reconnection is explicit rather than lapin's auto-recovery: a caller that sees an error
//! drops the connection with [`Mq::reset`] and asks again later (see [`Mq::wait_channel`]
//! for a backoff loop); the next [`Mq::channel`] connects anew and re-declares the topology.

use std::{fmt, str::FromStr, sync::Arc, time::Duration};

use lapin::{
    Channel, Connection, ConnectionProperties, ExchangeKind,
    options::{ConfirmSelectOptions, ExchangeDeclareOptions},
    types::{AMQPValue, FieldTable, LongString},
};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// The `DEVGATE_RABBITMQ_*` section, composed by `crate::config`.
#[derive(Debug, Clone)]
pub struct MqConfig {
    /// May hold a password, hence secret.
    pub url: SecretString,
    pub queue_type: QueueType,
    /// Prefix of every exchange and queue name devgate declares.
    pub prefix: String,
}

/// The kind of every queue devgate declares: quorum queues replicate across a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    Classic,
    Quorum,
}

impl FromStr for QueueType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "classic" => Ok(QueueType::Classic),
            "quorum" => Ok(QueueType::Quorum),
            other => Err(format!("expected classic or quorum, not {other:?}")),
        }
    }
}

impl QueueType {
    /// The `x-queue-type` argument for `queue.declare`.
    pub fn arguments(self) -> FieldTable {
        let kind = match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        };
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from(kind)),
        );
        args
    }
}

/// How long connecting (TCP, AMQP handshake and topology) may take before it counts as down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum MqError {
    #[error("cannot connect to RabbitMQ: {0}")]
    Connect(#[source] lapin::Error),
    #[error("RabbitMQ did not complete the connection within {0:?}")]
    ConnectTimeout(Duration),
    #[error("declaring {what}: {source}")]
    Declare {
        what: String,
        #[source]
        source: lapin::Error,
    },
    #[error("opening a RabbitMQ channel: {0}")]
    Channel(#[source] lapin::Error),
    #[error("publishing to RabbitMQ: {0}")]
    Publish(#[source] lapin::Error),
    /// The broker refused to take responsibility for a message (publisher confirm `nack`).
    #[error("RabbitMQ nacked message {message_id}")]
    Nacked { message_id: String },
    /// A mandatory publish no queue was bound to receive (e.g. before the webhook fan-out
    /// declared its queue): the broker returned it, so it must be published again.
    #[error("RabbitMQ could not route message {message_id} to any queue")]
    Unroutable { message_id: String },
    /// The broker cancelled a consumer or closed its channel without an error.
    #[error("the RabbitMQ consumer ended")]
    ConsumerEnded,
    #[error("RabbitMQ did not confirm the publishes within {0:?}")]
    ConfirmTimeout(Duration),
}

/// The process's RabbitMQ connection; cheap to clone.
#[derive(Clone)]
pub struct Mq {
    config: Arc<MqConfig>,
    conn: Arc<Mutex<Option<Arc<Connection>>>>,
    /// Every queue this process declared (see [`Mq::note_queue`]).
    queues: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
}

impl fmt::Debug for Mq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mq")
            .field("prefix", &self.config.prefix)
            .finish_non_exhaustive()
    }
}

impl Mq {
    /// No I/O: the first [`channel`](Self::channel) connects, so a process starts (and
    /// `serve` answers) while RabbitMQ is down.
    pub fn new(config: MqConfig) -> Self {
        Self {
            config: Arc::new(config),
            conn: Arc::new(Mutex::new(None)),
            queues: Default::default(),
        }
    }

    pub fn config(&self) -> &MqConfig {
        &self.config
    }

    /// The topic exchange every event is published to (routing key = event type).
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.config.prefix)
    }

    /// A queue name under this deployment's prefix.
    pub fn queue_name(&self, name: &str) -> String {
        format!("{}.{name}", self.config.prefix)
    }

    /// Records that this process declared `queue`, so whoever tears a deployment down (the
    /// tests, after each one) can delete every queue it used, including delay queues whose
    /// names depend on the delays that occurred.
    pub fn note_queue(&self, queue: &str) {
        self.queues
            .lock()
            .expect("queue registry lock")
            .insert(queue.to_string());
    }

    /// The queues declared so far (see [`Mq::note_queue`]).
    pub fn declared_queues(&self) -> Vec<String> {
        self.queues
            .lock()
            .expect("queue registry lock")
            .iter()
            .cloned()
            .collect()
    }

    /// A new channel on the live connection, connecting (and declaring the topology) first
    /// if there is none or the last one was lost.
    pub async fn channel(&self) -> Result<Channel, MqError> {
        let conn = self.connection().await?;
        match conn.create_channel().await {
            Ok(channel) => Ok(channel),
            Err(e) => {
                self.forget(&conn).await;
                Err(MqError::Channel(e))
            }
        }
    }

    /// A channel in publisher-confirm mode: every publish is answered by an ack or a nack.
    pub async fn confirm_channel(&self) -> Result<Channel, MqError> {
        let channel = self.channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(MqError::Channel)?;
        Ok(channel)
    }

    /// Like [`channel`](Self::channel), retrying with exponential backoff (100 ms doubling
    /// up to `max_delay`) until it works; `None` once `stop` is cancelled.
    pub async fn wait_channel(
        &self,
        max_delay: Duration,
        stop: &CancellationToken,
    ) -> Option<Channel> {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.channel().await {
                Ok(channel) => return Some(channel),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "RabbitMQ unavailable")
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(max_delay);
        }
    }

    /// Waits for a publish's confirm: Ok only when the broker acked it AND routed it to at
    /// least one queue (publishes are mandatory, so an unroutable one comes back).
    pub async fn confirmed(
        confirm: lapin::PublisherConfirm,
        message_id: impl fmt::Display,
    ) -> Result<(), MqError> {
        let confirmation = confirm.await.map_err(MqError::Publish)?;
        if !confirmation.is_ack() {
            return Err(MqError::Nacked {
                message_id: message_id.to_string(),
            });
        }
        if confirmation.take_message().is_some() {
            return Err(MqError::Unroutable {
                message_id: message_id.to_string(),
            });
        }
        Ok(())
    }

    /// Consumes `queue` on `channel` with up to `concurrency` messages in flight (also the
    /// prefetch), calling `handle(slot, message)` for each; `slot` (0..concurrency) is unique
    /// among the messages in flight, so a caller can keep state per slot (e.g. a publisher).
    /// The handler acks. Returns Ok once `stop` fires (in-flight messages finish first), an
    /// error when the channel or the consumer is lost.
    pub async fn consume_concurrently<F, Fut>(
        channel: &Channel,
        queue: &str,
        consumer_tag: &str,
        concurrency: usize,
        stop: &CancellationToken,
        handle: F,
    ) -> Result<(), MqError>
    where
        F: Fn(usize, lapin::message::Delivery) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        use futures_util::StreamExt;
        let concurrency = concurrency.clamp(1, u16::MAX as usize);
        channel
            .basic_qos(
                concurrency as u16,
                lapin::options::BasicQosOptions::default(),
            )
            .await
            .map_err(MqError::Channel)?;
        let consumer = channel
            .basic_consume(
                queue.into(),
                consumer_tag.into(),
                lapin::options::BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(MqError::Channel)?;
        let slots = std::sync::Mutex::new((0..concurrency).collect::<Vec<_>>());
        let mut lost = None;
        consumer
            .take_until(stop.cancelled())
            .take_while(|m| {
                if let Err(e) = m {
                    lost = Some(MqError::Channel(e.clone()));
                }
                std::future::ready(m.is_ok())
            })
            .for_each_concurrent(concurrency, |message| {
                let (slots, handle) = (&slots, &handle);
                async move {
                    let Ok(message) = message else { return };
                    let slot = slots
                        .lock()
                        .expect("slot lock")
                        .pop()
                        .expect("one slot per message in flight");
                    handle(slot, message).await;
                    slots.lock().expect("slot lock").push(slot);
                }
            })
            .await;
        match lost {
            Some(e) => Err(e),
            None if stop.is_cancelled() => Ok(()),
            None => Err(MqError::ConsumerEnded),
        }
    }

    /// Drops the current connection (after an error that may have broken it), so the next
    /// call connects anew. Channels opened on it stop working.
    pub async fn reset(&self) {
        if let Some(conn) = self.conn.lock().await.take() {
            // Best effort: the connection may already be gone.
            let _ = conn.close(200, "reset".into()).await;
        }
    }

    async fn connection(&self) -> Result<Arc<Connection>, MqError> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref()
            && conn.status().connected()
        {
            return Ok(conn.clone());
        }
        *slot = None;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, self.connect())
            .await
            .map_err(|_| MqError::ConnectTimeout(CONNECT_TIMEOUT))??;
        let conn = Arc::new(conn);
        *slot = Some(conn.clone());
        tracing::info!(exchange = %self.events_exchange(), "connected to RabbitMQ");
        Ok(conn)
    }

    /// Forgets `conn` if it is still the current one (another task may have replaced it).
    async fn forget(&self, conn: &Arc<Connection>) {
        let mut slot = self.conn.lock().await;
        if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            *slot = None;
        }
    }

    async fn connect(&self) -> Result<Connection, MqError> {
        let properties =
            ConnectionProperties::default().with_connection_name(LongString::from("devgate"));
        let conn = Connection::connect(self.config.url.expose_secret(), properties)
            .await
            .map_err(MqError::Connect)?;
        let channel = conn.create_channel().await.map_err(MqError::Channel)?;
        let exchange = self.events_exchange();
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
            .map_err(|source| MqError::Declare {
                what: format!("exchange {exchange}"),
                source,
            })?;
        // Best effort: the channel was only for declaring.
        let _ = channel.close(200, "declared".into()).await;
        Ok(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_types_parse_and_name_their_argument() {
        assert_eq!("quorum".parse::<QueueType>(), Ok(QueueType::Quorum));
        assert_eq!("classic".parse::<QueueType>(), Ok(QueueType::Classic));
        assert!("lazy".parse::<QueueType>().is_err());
        let args = QueueType::Quorum.arguments();
        assert_eq!(
            args.inner().get("x-queue-type"),
            Some(&AMQPValue::LongString(LongString::from("quorum")))
        );
    }
}
