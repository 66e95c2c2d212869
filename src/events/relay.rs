//! The outbox relay (worker role): publishes committed outbox rows to `<prefix>.events` and
//! deletes them once RabbitMQ confirmed them.
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
    sql_types::{BigInt, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid},
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

/// A claimed outbox row with its event.
#[derive(QueryableByName)]
struct Claimed {
    #[diesel(sql_type = BigInt)]
    outbox_id: i64,
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    tenant_id: Uuid,
    #[diesel(sql_type = Text)]
    event_type: String,
    #[diesel(sql_type = Jsonb)]
    payload: serde_json::Value,
    #[diesel(sql_type = Nullable<Text>)]
    idempotency_id: Option<String>,
    #[diesel(sql_type = Text)]
    source: String,
    #[diesel(sql_type = Timestamptz)]
    create_time: chrono::DateTime<chrono::Utc>,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    endpoint_id: Option<Uuid>,
}

impl Claimed {
    fn event(self) -> Event {
        Event {
            id: self.id,
            tenant: TenantId(self.tenant_id),
            event_type: self.event_type,
            payload: self.payload,
            idempotency_id: self.idempotency_id,
            source: self.source,
            create_time: self.create_time,
            endpoint_id: self.endpoint_id,
        }
    }
}

const CLAIM: &str = "SELECT o.id AS outbox_id, e.id, e.tenant_id, e.event_type, e.payload, \
                            e.idempotency_id, e.source, e.create_time, e.endpoint_id \
                     FROM outbox o JOIN events e ON e.id = o.event_id \
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
            let published = self.pass(publisher).await?;
            stats.published += published as u64;
            if published < self.config.batch_size || stop.is_cancelled() {
                return Ok(());
            }
        }
    }

    /// One transaction: claim, publish, await confirms, delete. Returns the rows published.
    async fn pass(&self, publisher: &mut Option<Channel>) -> Result<usize, RelayError> {
        let mut conn = db::connect(&self.pool).await?;
        let (mq, config) = (&self.mq, &self.config);
        conn.transaction::<usize, RelayError, _>(async move |conn| {
            let claimed: Vec<Claimed> = diesel::sql_query(CLAIM)
                .bind::<BigInt, _>(config.batch_size as i64)
                .load(conn)
                .await?;
            if claimed.is_empty() {
                return Ok(0);
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
            let events: Vec<Event> = claimed.into_iter().map(Claimed::event).collect();
            publish_confirmed(&channel, &mq.events_exchange(), &events, config).await?;
            diesel::delete(outbox::table.filter(outbox::id.eq_any(&ids)))
                .execute(conn)
                .await?;
            Ok(events.len())
        })
        .await
    }
}

/// Publishes every event persistent on a confirm-mode channel and waits until RabbitMQ
/// acked them all; any nack fails the whole batch (it is retried as a whole).
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    events: &[Event],
    config: &RelayConfig,
) -> Result<(), RelayError> {
    let mut confirms = Vec::with_capacity(events.len());
    for event in events {
        let body =
            serde_json::to_vec(&event.message()).map_err(|e| RelayError::Encode(event.id, e))?;
        let properties = BasicProperties::default()
            .with_message_id(event.id.to_string().into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_type(event.event_type.as_str().into())
            .with_timestamp(event.create_time.timestamp().max(0) as u64)
            .with_app_id("devgate".into());
        let confirm = channel
            .basic_publish(
                exchange.into(),
                event.event_type.as_str().into(),
                // Mandatory: an event no queue takes (the fan-out queue not declared yet on a
                // new deployment) comes back, and the batch stays in the outbox.
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                properties,
            )
            .await
            .map_err(MqError::Publish)?;
        confirms.push((event.id, confirm));
    }
    let all = async {
        for (id, confirm) in confirms {
            Mq::confirmed(confirm, id).await?;
        }
        Ok::<(), MqError>(())
    };
    tokio::time::timeout(config.confirm_timeout, all)
        .await
        .map_err(|_| MqError::ConfirmTimeout(config.confirm_timeout))??;
    Ok(())
}
