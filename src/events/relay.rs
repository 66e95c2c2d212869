//! The outbox relay (worker role): publishes committed outbox rows — events to
//! `<prefix>.events`, ready-made messages (e.g. generation jobs) to the exchange their row
//! names — and deletes them once RabbitMQ confirmed and routed them.
//!
//! Each pass, in one Postgres transaction: claim up to `batch_size` rows
//! `FOR UPDATE SKIP LOCKED` (so several relays never take the same row), publish each event
//! persistent with publisher confirms, wait for every confirm of the batch, delete the rows,
//! commit. A nack, a timeout or a lost connection rolls the transaction back: the rows stay
//! and are retried after a backoff.
//!
//! Delivery is at least once: a crash (or a failed commit) after the broker confirmed but
//! before the commit publishes those events again. Consumers deduplicate by the AMQP
//! `message_id`, which is the event id. Order is by outbox id within one relay's batch;
//! across relays and retries it is not guaranteed.
//!
//! The relay wakes on `NOTIFY devgate_outbox` (sent by a trigger when outbox rows commit) on
//! a dedicated connection, and polls every `poll_interval` as a fallback (a lost listener,
//! rows left by a failed pass).

use std::{pin::pin, time::Duration};

use diesel::{
    ExpressionMethods, QueryDsl, QueryableByName,
    sql_types::{BigInt, Bytea, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid},
};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use futures_util::{FutureExt, StreamExt};
use lapin::{BasicProperties, Channel, options::BasicPublishOptions};
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    db::{self, PgPool, StoreError, schema::outbox},
    events::outbox::Event,
    identity::TenantId,
    mq::{Mq, MqError},
};

/// The `DEVGATE_OUTBOX_*` section, composed by `crate::config`.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Rows claimed, published and deleted per transaction.
    pub batch_size: usize,
    /// How often the relay looks for rows without being notified.
    pub poll_interval: Duration,
    /// How long a batch may wait for RabbitMQ's confirms before it is rolled back.
    pub confirm_timeout: Duration,
}

/// The Postgres channel the outbox trigger notifies (see the events_outbox migration).
pub const NOTIFY_CHANNEL: &str = "devgate_outbox";

/// How long a message no queue took is set aside before the relay tries it again.
pub const UNROUTABLE_RETRY: Duration = Duration::from_secs(2);

/// What one pass did.
#[derive(Debug, Clone, Copy, Default)]
struct Pass {
    published: usize,
    unroutable: usize,
}

/// First and longest pause after a failed pass.
const BACKOFF_INITIAL: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Mq(#[from] MqError),
    #[error("encoding event {0}: {1}")]
    Encode(Uuid, #[source] serde_json::Error),
}

impl From<diesel::result::Error> for RelayError {
    fn from(e: diesel::result::Error) -> Self {
        RelayError::Store(e.into())
    }
}

/// What one relay did (for logs and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    pub published: u64,
    pub failed_passes: u64,
}

#[derive(Clone)]
pub struct Relay {
    pool: PgPool,
    database_url: SecretString,
    mq: Mq,
    config: RelayConfig,
}

/// A claimed outbox row: an event (joined from `events`) or a ready-made message.
#[derive(QueryableByName)]
struct Claimed {
    #[diesel(sql_type = BigInt)]
    outbox_id: i64,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    id: Option<Uuid>,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    tenant_id: Option<Uuid>,
    #[diesel(sql_type = Nullable<Text>)]
    event_type: Option<String>,
    #[diesel(sql_type = Nullable<Jsonb>)]
    payload: Option<serde_json::Value>,
    #[diesel(sql_type = Nullable<Text>)]
    idempotency_id: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    source: Option<String>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    create_time: Option<chrono::DateTime<chrono::Utc>>,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    endpoint_id: Option<Uuid>,
    #[diesel(sql_type = Nullable<Text>)]
    exchange: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    routing_key: Option<String>,
    #[diesel(sql_type = Nullable<Bytea>)]
    body: Option<Vec<u8>>,
    #[diesel(sql_type = Nullable<Text>)]
    content_type: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    message_type: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    message_id: Option<String>,
    #[diesel(sql_type = Timestamptz)]
    queued_time: chrono::DateTime<chrono::Utc>,
}

/// One publish of a batch.
struct Outgoing {
    exchange: String,
    routing_key: String,
    body: Vec<u8>,
    properties: BasicProperties,
    message_id: String,
}

impl Claimed {
    /// What to publish; `events_exchange` takes the events.
    fn outgoing(self, events_exchange: &str) -> Result<Outgoing, RelayError> {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_app_id("devgate".into());
        match (self.id, self.body) {
            (Some(id), _) => {
                let event = Event {
                    id,
                    tenant: TenantId(self.tenant_id.unwrap_or_default()),
                    event_type: self.event_type.unwrap_or_default(),
                    payload: self.payload.unwrap_or_default(),
                    idempotency_id: self.idempotency_id,
                    source: self.source.unwrap_or_default(),
                    create_time: self.create_time.unwrap_or(self.queued_time),
                    endpoint_id: self.endpoint_id,
                };
                let body = serde_json::to_vec(&event.message())
                    .map_err(|e| RelayError::Encode(event.id, e))?;
                Ok(Outgoing {
                    exchange: events_exchange.to_string(),
                    routing_key: event.event_type.clone(),
                    body,
                    properties: properties
                        .with_message_id(event.id.to_string().into())
                        .with_content_type("application/json".into())
                        .with_type(event.event_type.as_str().into())
                        .with_timestamp(event.create_time.timestamp().max(0) as u64),
                    message_id: event.id.to_string(),
                })
            }
            (None, Some(body)) => {
                let message_id = self.message_id.unwrap_or_default();
                let mut properties = properties
                    .with_message_id(message_id.as_str().into())
                    .with_content_type(self.content_type.unwrap_or_default().as_str().into())
                    .with_timestamp(self.queued_time.timestamp().max(0) as u64);
                if let Some(t) = &self.message_type {
                    properties = properties.with_type(t.as_str().into());
                }
                Ok(Outgoing {
                    exchange: self.exchange.unwrap_or_default(),
                    routing_key: self.routing_key.unwrap_or_default(),
                    body,
                    properties,
                    message_id,
                })
            }
            // The table's CHECK makes every row one or the other.
            (None, None) => Err(RelayError::Store(StoreError::Unavailable(format!(
                "outbox row {} holds neither an event nor a message",
                self.outbox_id
            )))),
        }
    }
}

const CLAIM: &str = "SELECT o.id AS outbox_id, e.id, e.tenant_id, e.event_type, e.payload, \
                            e.idempotency_id, e.source, e.create_time, e.endpoint_id, \
                            o.exchange, o.routing_key, o.body, o.content_type, \
                            o.message_type, o.message_id, o.create_time AS queued_time \
                     FROM outbox o LEFT JOIN events e ON e.id = o.event_id \
                     WHERE o.not_before IS NULL OR o.not_before <= now() \
                     ORDER BY o.id \
                     LIMIT $1 \
                     FOR UPDATE OF o SKIP LOCKED";

impl Relay {
    /// `database_url` is for the dedicated LISTEN connection (pooled connections go back to
    /// the pool and would lose the subscription).
    pub fn new(pool: PgPool, database_url: SecretString, mq: Mq, config: RelayConfig) -> Self {
        Self {
            pool,
            database_url,
            mq,
            config,
        }
    }

    /// Runs until `stop`; failures are logged and retried with backoff, never returned.
    pub async fn run(self, stop: CancellationToken) -> RelayStats {
        let mut stats = RelayStats::default();
        let mut listener: Option<AsyncPgConnection> = None;
        let mut publisher: Option<Channel> = None;
        let mut backoff = BACKOFF_INITIAL;
        while !stop.is_cancelled() {
            // Subscribe before draining, so a commit during the drain still wakes us.
            if listener.is_none() {
                match self.listen().await {
                    Ok(conn) => listener = Some(conn),
                    Err(e) => {
                        tracing::warn!(error = %e, "outbox relay cannot LISTEN; polling only")
                    }
                }
            }
            if let Some(conn) = listener.as_mut() {
                // Notifications that arrived meanwhile are covered by the drain below.
                let mut notes = pin!(conn.notifications_stream());
                while let Some(Some(_)) = notes.next().now_or_never() {}
            }
            let wait = match self.drain(&mut publisher, &mut stats, &stop).await {
                Ok(()) => {
                    backoff = BACKOFF_INITIAL;
                    None
                }
                Err(e) => {
                    stats.failed_passes += 1;
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "outbox relay pass failed; rows stay in the outbox");
                    if let Some(channel) = publisher.take() {
                        // Best effort: the channel may be gone with its connection.
                        let _ = channel.close(200, "relay pass failed".into()).await;
                    }
                    if matches!(e, RelayError::Mq(MqError::ConfirmTimeout(_))) {
                        self.mq.reset().await;
                    }
                    let wait = backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    Some(wait)
                }
            };
            match (wait, listener.as_mut()) {
                (None, Some(conn)) => {
                    // Some(true): lost; Some(false): notified or stopped; None: timed out.
                    let woke = {
                        let mut notes = pin!(conn.notifications_stream());
                        tokio::select! {
                            _ = stop.cancelled() => Some(false),
                            note = notes.next() => Some(!matches!(note, Some(Ok(_)))),
                            _ = tokio::time::sleep(self.config.poll_interval) => None,
                        }
                    };
                    let lost = match woke {
                        Some(lost) => lost,
                        // A silent listener may be a dead one: check it at each poll.
                        None => diesel::sql_query("SELECT 1").execute(conn).await.is_err(),
                    };
                    if lost {
                        tracing::warn!("outbox relay lost its LISTEN connection; reconnecting");
                        listener = None;
                    }
                }
                (wait, _) => {
                    let wait = wait.unwrap_or(self.config.poll_interval);
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        stats
    }

    async fn listen(&self) -> Result<AsyncPgConnection, StoreError> {
        let mut conn = AsyncPgConnection::establish(self.database_url.expose_secret())
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        diesel::sql_query(format!("LISTEN {NOTIFY_CHANNEL}"))
            .execute(&mut conn)
            .await?;
        Ok(conn)
    }

    /// Passes until one claims less than a full batch.
    async fn drain(
        &self,
        publisher: &mut Option<Channel>,
        stats: &mut RelayStats,
        stop: &CancellationToken,
    ) -> Result<(), RelayError> {
        loop {
            let pass = self.pass(publisher).await?;
            stats.published += pass.published as u64;
            if pass.unroutable > 0 {
                tracing::warn!(
                    rows = pass.unroutable,
                    retry_in_s = UNROUTABLE_RETRY.as_secs(),
                    "outbox messages no queue takes yet (is their consumer bound?); set aside"
                );
            }
            if pass.published + pass.unroutable < self.config.batch_size || stop.is_cancelled() {
                return Ok(());
            }
        }
    }

    /// One transaction: claim, publish, await confirms, delete what was routed and set aside
    /// what no queue took.
    async fn pass(&self, publisher: &mut Option<Channel>) -> Result<Pass, RelayError> {
        let mut conn = db::connect(&self.pool).await?;
        let (mq, config) = (&self.mq, &self.config);
        conn.transaction::<Pass, RelayError, _>(async move |conn| {
            let claimed: Vec<Claimed> = diesel::sql_query(CLAIM)
                .bind::<BigInt, _>(config.batch_size as i64)
                .load(conn)
                .await?;
            if claimed.is_empty() {
                return Ok(Pass::default());
            }
            let channel = match publisher.as_ref() {
                Some(channel) if channel.status().connected() => channel.clone(),
                _ => {
                    let channel = mq.confirm_channel().await?;
                    *publisher = Some(channel.clone());
                    channel
                }
            };
            let ids: Vec<i64> = claimed.iter().map(|c| c.outbox_id).collect();
            let events_exchange = mq.events_exchange();
            let batch = claimed
                .into_iter()
                .map(|c| c.outgoing(&events_exchange))
                .collect::<Result<Vec<_>, _>>()?;
            declare_exchanges(&channel, &batch, &events_exchange).await?;
            let routed = publish_confirmed(&channel, &batch, config).await?;
            let (mut done, mut aside) = (Vec::new(), Vec::new());
            for (id, routed) in ids.into_iter().zip(routed) {
                if routed {
                    done.push(id)
                } else {
                    aside.push(id)
                }
            }
            diesel::delete(outbox::table.filter(outbox::id.eq_any(&done)))
                .execute(conn)
                .await?;
            if !aside.is_empty() {
                let until = chrono::Utc::now()
                    + chrono::Duration::from_std(UNROUTABLE_RETRY).expect("a small duration");
                diesel::update(outbox::table.filter(outbox::id.eq_any(&aside)))
                    .set(outbox::not_before.eq(Some(until)))
                    .execute(conn)
                    .await?;
            }
            Ok(Pass {
                published: done.len(),
                unroutable: aside.len(),
            })
        })
        .await
    }
}

/// Declares (durable topic, idempotent) the exchanges of a batch's messages: their consumers
/// (the orchestrator) may not have declared them yet. The events exchange is declared on
/// connect.
async fn declare_exchanges(
    channel: &Channel,
    batch: &[Outgoing],
    events_exchange: &str,
) -> Result<(), MqError> {
    let mut seen: Vec<&str> = Vec::new();
    for out in batch {
        let name = out.exchange.as_str();
        if name == events_exchange || seen.contains(&name) {
            continue;
        }
        seen.push(name);
        channel
            .exchange_declare(
                name.into(),
                lapin::ExchangeKind::Topic,
                lapin::options::ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .map_err(|source| MqError::Declare {
                what: format!("exchange {name}"),
                source,
            })?;
    }
    Ok(())
}

/// Publishes every message persistent and mandatory on a confirm-mode channel and waits
/// for RabbitMQ's confirms; returns, per message, whether a queue took it. A nack, a lost
/// channel or a timeout fails the whole batch (it is retried as a whole). A message no queue
/// takes (the fan-out queue not declared yet on a new deployment, no orchestrator bound)
/// comes back: it stays in the outbox, set aside for [`UNROUTABLE_RETRY`].
async fn publish_confirmed(
    channel: &Channel,
    batch: &[Outgoing],
    config: &RelayConfig,
) -> Result<Vec<bool>, RelayError> {
    let mut confirms = Vec::with_capacity(batch.len());
    for out in batch {
        let confirm = channel
            .basic_publish(
                out.exchange.as_str().into(),
                out.routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &out.body,
                out.properties.clone(),
            )
            .await
            .map_err(MqError::Publish)?;
        confirms.push((out.message_id.as_str(), confirm));
    }
    let all = async {
        let mut routed = Vec::with_capacity(confirms.len());
        for (id, confirm) in confirms {
            match Mq::confirmed(confirm, id).await {
                Ok(()) => routed.push(true),
                Err(MqError::Unroutable { .. }) => routed.push(false),
                Err(e) => return Err(e),
            }
        }
        Ok::<Vec<bool>, MqError>(routed)
    };
    Ok(tokio::time::timeout(config.confirm_timeout, all)
        .await
        .map_err(|_| MqError::ConfirmTimeout(config.confirm_timeout))??)
}
