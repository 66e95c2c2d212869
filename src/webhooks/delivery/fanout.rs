//! The fan-out: consumes `<prefix>.webhooks.fanout` (every event on the events exchange),
//! inserts one delivery per subscribed, enabled endpoint of the event's tenant and queues
//! their first attempts; acks the event only after RabbitMQ confirmed those tasks.
//!
//! Each tenant's endpoints are cached; any change to a tenant's endpoints (a trigger sends
//! `NOTIFY devgate_webhook_endpoints, '<tenant id>'`) evicts that tenant, and entries also
//! expire after [`CACHE_TTL`], which bounds staleness when the LISTEN connection is lost.
//! A redelivered event (the relay is at least once) finds its deliveries and queues only
//! those still waiting for a first attempt.

use std::{pin::pin, sync::Arc, time::Duration};

use diesel::{ExpressionMethods, QueryDsl};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use futures_util::StreamExt;
use lapin::{
    message::Delivery as AmqpMessage,
    options::{BasicAckOptions, BasicNackOptions},
};
use moka::future::Cache;
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{
    queue::{Publisher, Task, TaskQueue},
    store,
};
use crate::{
    db::{self, PgPool, StoreError, group::GroupCommit, schema::webhook_endpoints},
    events::{matches, outbox::EventMessage},
    identity::TenantId,
    mq::{Mq, MqError},
};

/// The Postgres channel the endpoint trigger notifies (see the webhook_deliveries migration).
pub const NOTIFY_CHANNEL: &str = "devgate_webhook_endpoints";
/// How long a tenant's endpoint list is trusted without a notification.
pub const CACHE_TTL: Duration = Duration::from_secs(30);
/// Events processed at once by one fan-out consumer (also its prefetch).
const CONCURRENCY: usize = 32;
const STEP_RETRY: Duration = Duration::from_secs(1);
/// Connections the fan-out's writes use at most (one batch each).
const GROUP_WRITERS: usize = 2;
const RECONNECT_MAX: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum FanOutError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Mq(#[from] MqError),
}

/// An enabled endpoint and what it subscribes to.
#[derive(Debug, Clone)]
struct Subscription {
    id: Uuid,
    patterns: Vec<String>,
}

#[derive(Clone)]
pub struct FanOut {
    pool: PgPool,
    /// The deliveries of events that arrive together, inserted in one statement.
    deliveries: GroupCommit<store::FanOut>,
    database_url: SecretString,
    tasks: TaskQueue,
    cache: Cache<Uuid, Arc<Vec<Subscription>>>,
}

impl FanOut {
    /// `database_url` is for the dedicated LISTEN connection.
    pub fn new(pool: PgPool, database_url: SecretString, tasks: TaskQueue) -> Self {
        Self {
            deliveries: GroupCommit::spawn(pool.clone(), GROUP_WRITERS),
            pool,
            database_url,
            tasks,
            cache: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(CACHE_TTL)
                .build(),
        }
    }

    /// Consumes events until `stop`, reconnecting with backoff; also listens for endpoint
    /// changes to evict cached tenants.
    pub async fn run(self, stop: CancellationToken) {
        let listener = tokio::spawn(self.clone().listen(stop.clone()));
        let mq = self.tasks.mq().clone();
        while !stop.is_cancelled() {
            let Some(channel) = mq.wait_channel(RECONNECT_MAX, &stop).await else {
                break;
            };
            if let Err(e) = self.consume(&channel, &stop).await {
                tracing::warn!(error = %e, "webhook fan-out consumer stopped; reconnecting");
                mq.reset().await;
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(STEP_RETRY) => {}
                }
            }
            let _ = channel.close(200, "fan-out stopped".into()).await;
        }
        let _ = listener.await;
    }

    async fn consume(
        &self,
        channel: &lapin::Channel,
        stop: &CancellationToken,
    ) -> Result<(), MqError> {
        let mq = self.tasks.mq();
        let queues = self.tasks.queues();
        queues.declare(mq, channel).await?;
        // Each slot publishes on its own confirm channel (opened on first use): one shared
        // channel would serialize every confirm wait.
        let publishers: Vec<tokio::sync::Mutex<Option<Publisher>>> =
            (0..CONCURRENCY).map(|_| Default::default()).collect();
        Mq::consume_concurrently(
            channel,
            &queues.fanout,
            "devgate-fanout",
            CONCURRENCY,
            stop,
            |slot, message| {
                let publishers = &publishers;
                async move {
                    let mut publisher = publishers[slot].lock().await;
                    self.handle(message, &mut publisher).await;
                }
            },
        )
        .await
    }

    async fn handle(&self, message: AmqpMessage, publisher: &mut Option<Publisher>) {
        let event: EventMessage = match serde_json::from_slice(&message.data) {
            Ok(event) => event,
            Err(e) => {
                tracing::error!(error = %e, "unreadable event on the fan-out queue dropped");
                let _ = message.acker.ack(BasicAckOptions::default()).await;
                return;
            }
        };
        match self.fan_out(&event, publisher).await {
            Ok(()) => {
                let _ = message.acker.ack(BasicAckOptions::default()).await;
            }
            Err(e) => {
                if matches!(e, FanOutError::Mq(_)) {
                    *publisher = None;
                }
                tracing::warn!(error = %e, event_id = %event.id, "webhook fan-out failed; the event is requeued");
                tokio::time::sleep(STEP_RETRY).await;
                let _ = message
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await;
            }
        }
    }

    /// The deliveries of one event, and their first tasks.
    pub async fn fan_out(
        &self,
        event: &EventMessage,
        publisher: &mut Option<Publisher>,
    ) -> Result<(), FanOutError> {
        let tenant = TenantId(event.tenant_id);
        let endpoints: Vec<Uuid> = match event.endpoint_id {
            // A test event: its endpoint only.
            Some(target) => vec![target],
            None => self
                .subscriptions(tenant)
                .await?
                .iter()
                .filter(|s| s.patterns.iter().any(|p| matches(p, &event.event_type)))
                .map(|s| s.id)
                .collect(),
        };
        let waiting = self
            .deliveries
            .submit(store::FanOut {
                tenant,
                event_id: event.id,
                event_type: event.event_type.clone(),
                endpoints,
            })
            .await?;
        if waiting.is_empty() {
            return Ok(());
        }
        let tasks: Vec<Task> = waiting
            .into_iter()
            .map(|delivery_id| Task {
                delivery_id,
                attempt: 1,
                manual: false,
            })
            .collect();
        if !publisher.as_ref().is_some_and(Publisher::is_usable) {
            *publisher = Some(Publisher::open(self.tasks.mq(), self.tasks.queues().clone()).await?);
        }
        let publisher = publisher.as_mut().expect("opened above");
        publisher.publish(&tasks, None).await?;
        Ok(())
    }

    async fn subscriptions(&self, tenant: TenantId) -> Result<Arc<Vec<Subscription>>, StoreError> {
        let pool = self.pool.clone();
        self.cache
            .try_get_with(tenant.0, async move {
                let mut conn = db::connect(&pool).await?;
                load(&mut conn, tenant).await.map(Arc::new)
            })
            .await
            .map_err(|e: Arc<StoreError>| StoreError::Unavailable(e.to_string()))
    }

    /// Evicts tenants whose endpoints changed; reconnects until `stop`. While it is down the
    /// cache's TTL bounds staleness.
    async fn listen(self, stop: CancellationToken) {
        let mut delay = Duration::from_millis(200);
        while !stop.is_cancelled() {
            match AsyncPgConnection::establish(self.database_url.expose_secret()).await {
                Ok(mut conn) => {
                    if diesel::sql_query(format!("LISTEN {NOTIFY_CHANNEL}"))
                        .execute(&mut conn)
                        .await
                        .is_ok()
                    {
                        // Whatever changed while we were not listening.
                        self.cache.invalidate_all();
                        delay = Duration::from_millis(200);
                        let mut notes = pin!(conn.notifications_stream());
                        loop {
                            tokio::select! {
                                _ = stop.cancelled() => return,
                                note = notes.next() => match note {
                                    Some(Ok(n)) => {
                                        if let Ok(tenant) = n.payload.parse::<Uuid>() {
                                            self.cache.invalidate(&tenant).await;
                                        }
                                    }
                                    _ => break,
                                },
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "webhook fan-out cannot LISTEN for endpoint changes")
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(RECONNECT_MAX);
        }
    }
}

/// The tenant's enabled endpoints.
async fn load(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
) -> Result<Vec<Subscription>, StoreError> {
    use webhook_endpoints::dsl as w;
    let rows: Vec<(Uuid, Vec<String>)> = webhook_endpoints::table
        .filter(w::tenant_id.eq(tenant.0))
        .filter(w::disabled_time.is_null())
        .select((w::id, w::event_types))
        .load(conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(id, patterns)| Subscription { id, patterns })
        .collect())
}
