//! Endpoint management: the rules (tenancy, the per-tenant limit, secrets sealed at rest,
//! rotation grace) between the gRPC layer and the store. Every change writes its
//! `webhook_endpoint.*` event to the outbox in the same transaction.
//! The delivery RPCs read the delivery tables and hand manual attempts to the delivery
//! workers through RabbitMQ ([`TaskQueue`]); the event log shows each event's deliveries.

use std::{collections::HashMap, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use diesel_async::AsyncConnection;
use uuid::Uuid;

use super::{
    WebhookError,
    delivery::{
        Attempt, Delivery,
        queue::{Task, TaskQueue},
        store::{self as deliveries, DeliveryFilter},
    },
    model::{self, EndpointChanges, EndpointState, NewEndpoint, WebhookEndpoint},
    secret_box::{KeyRing, row_context},
    signing::Secret,
    ssrf::{self, Policy},
    store::{self, InsertEndpoint},
};
use crate::{
    auth::Principal,
    db::{self, PgPool, StoreError, group::GroupCommit},
    events::{
        Catalog, EventError, EventType, catalog,
        emitter::Emitter,
        outbox::{self, Append, Event, EventFilter, NewEvent, Position},
    },
    idempotency::{Claim, Guard, Idempotency, Outcome},
    identity::{Scope, TenantId},
    validation::{Violations, quote},
};

/// Grace of a rotated-out secret when the request names none.
pub const DEFAULT_ROTATION_GRACE: Duration = Duration::from_secs(24 * 3600);
/// Longest grace a rotation may ask for.
pub const MAX_ROTATION_GRACE: Duration = Duration::from_secs(7 * 24 * 3600);
/// The event type SendTestEvent sends when the request names none.
pub const DEFAULT_TEST_EVENT_TYPE: &str = "webhook.test";
/// Most deliveries one RecoverWebhookDeliveries call queues again (documented in the proto):
/// bounds the call's work; a caller recovers more by calling again with a later `since`.
pub const MAX_RECOVER: i64 = 10_000;
/// Tasks per confirmed publish while recovering.
const RECOVER_CHUNK: usize = 500;

/// One page of endpoints and the id to continue before.
pub struct Page {
    pub endpoints: Vec<WebhookEndpoint>,
    pub next: Option<Uuid>,
}

/// One page of an endpoint's deliveries and the id to continue before.
pub struct DeliveryPage {
    pub deliveries: Vec<Delivery>,
    pub next: Option<Uuid>,
}

/// An event of the log with its delivery to each endpoint it was sent to.
pub struct LoggedEvent {
    pub event: Event,
    pub deliveries: Vec<Delivery>,
}

/// A secret shown to the tenant, and the rotated-out one's grace end while it lasts.
pub struct ShownSecret {
    pub secret: Secret,
    pub previous_secret_expire_time: Option<DateTime<Utc>>,
}

pub struct Webhooks {
    pool: PgPool,
    keys: Option<KeyRing>,
    policy: Policy,
    /// Checks and appends the `webhook_endpoint.*` events; holds the compiled catalog.
    emitter: Arc<Emitter>,
    /// Queues manual delivery attempts (retry, recover) for the delivery workers.
    tasks: TaskQueue,
    /// Idempotency-Key of CreateWebhookEndpoint.
    idempotency: Idempotency,
    /// PublishEvent's writes, committed in groups.
    appender: GroupCommit<Append>,
}

/// Connections PublishEvent's group commit uses at most (one batch each).
const APPEND_WRITERS: usize = 4;

impl Webhooks {
    pub fn new(
        pool: PgPool,
        keys: Option<KeyRing>,
        policy: Policy,
        emitter: Arc<Emitter>,
        tasks: TaskQueue,
        idempotency: Idempotency,
    ) -> Self {
        Self {
            appender: GroupCommit::spawn(pool.clone(), APPEND_WRITERS),
            pool,
            keys,
            policy,
            emitter,
            tasks,
            idempotency,
        }
    }

    /// The compiled catalog (shared by every feature that emits events).
    pub async fn catalog(&self) -> Result<&Catalog, WebhookError> {
        Ok(self.emitter.catalog().await?)
    }

    /// The URL rules (shape, https in production, SSRF) as field violations.
    pub async fn check_url(&self, raw: &str, field: &str, v: &mut Violations) -> String {
        match ssrf::validate_url(raw.trim(), &self.policy).await {
            Ok(url) => url.to_string(),
            Err(e) => {
                v.add(field, e.to_string());
                String::new()
            }
        }
    }

    /// Each subscription pattern against the catalog, as `field[i]` violations.
    pub async fn check_patterns(
        &self,
        patterns: &[String],
        field: &str,
        v: &mut Violations,
    ) -> Result<(), WebhookError> {
        match self.catalog().await?.check_patterns(patterns, field) {
            Ok(()) => Ok(()),
            Err(EventError::InvalidPattern(found)) => {
                for f in found.iter() {
                    v.add(&f.field, &f.description);
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn keys(&self) -> Result<&KeyRing, WebhookError> {
        self.keys
            .as_ref()
            .ok_or(WebhookError::EncryptionNotConfigured)
    }

    /// Creates an endpoint with a fresh secret; returns both (the secret in clear only here
    /// and from [`Webhooks::secret`]). With an idempotency claim, a repeat of a created
    /// endpoint's request answers ALREADY_EXISTS naming it (the response holds the secret,
    /// which is never stored for a replay).
    pub async fn create(
        &self,
        principal: &Principal,
        new: NewEndpoint,
        claim: Option<Claim>,
    ) -> Result<(WebhookEndpoint, Secret), WebhookError> {
        let tenant = principal.tenant_with(Scope::WebhooksWrite)?;
        let keys = self.keys()?;
        // Load it before the transaction: no connection is held while compiling schemas.
        self.catalog().await?;
        let guard = match self.idempotency.begin(tenant, claim).await? {
            Outcome::Proceed(guard) => guard,
            Outcome::Replay(replay) => {
                return Err(replay.already_exists("webhook endpoint").into());
            }
        };
        let created = self
            .insert_endpoint(principal, tenant, keys, new, &guard)
            .await;
        guard.finish(&created).await;
        let (endpoint, secret) = created?;
        tracing::info!(tenant = %tenant, webhook_endpoint_id = %endpoint.id, actor = %principal.actor(), "webhook endpoint created");
        Ok((endpoint, secret))
    }

    /// The endpoint row, its event and the idempotency record, in one transaction.
    async fn insert_endpoint(
        &self,
        principal: &Principal,
        tenant: TenantId,
        keys: &KeyRing,
        new: NewEndpoint,
        guard: &Guard,
    ) -> Result<(WebhookEndpoint, Secret), WebhookError> {
        let secret = Secret::generate()?;
        let id = Uuid::now_v7();
        let sealed = keys.seal(secret.expose_bytes(), &row_context(tenant.0, id))?;
        let actor = model::actor(principal.actor());
        let mut conn = db::connect(&self.pool).await?;
        let endpoint = conn
            .transaction::<_, WebhookError, _>(async |c| {
                crate::tenants::store::ensure(c, tenant).await?;
                store::lock_tenant(c, tenant).await?;
                if store::count(c, tenant).await? >= model::MAX_ENDPOINTS_PER_TENANT {
                    return Err(WebhookError::FailedPrecondition(format!(
                        "a tenant may have at most {} webhook endpoints; delete one first",
                        model::MAX_ENDPOINTS_PER_TENANT
                    )));
                }
                let endpoint = store::insert(
                    c,
                    InsertEndpoint {
                        id,
                        tenant_id: tenant,
                        new: &new,
                        secret_ciphertext: sealed,
                        created_by: actor.clone(),
                        now: Utc::now(),
                    },
                )
                .await?;
                self.emitter
                    .emit(
                        c,
                        tenant,
                        "webhook_endpoint.created",
                        model::created_payload(&endpoint),
                    )
                    .await?;
                guard.complete_withheld(c, &endpoint.id.to_string()).await?;
                Ok(endpoint)
            })
            .await?;
        Ok((endpoint, secret))
    }

    pub async fn list(
        &self,
        principal: &Principal,
        state: Option<EndpointState>,
        before: Option<Uuid>,
        page_size: i64,
    ) -> Result<Page, WebhookError> {
        let tenant = principal.tenant_with(Scope::WebhooksRead)?;
        let mut conn = db::connect(&self.pool).await?;
        // One extra row tells whether another page follows.
        let mut endpoints = store::list(&mut conn, tenant, state, before, page_size + 1).await?;
        let next = if endpoints.len() as i64 > page_size {
            endpoints.truncate(page_size as usize);
            endpoints.last().map(|e| e.id)
        } else {
            None
        };
        Ok(Page { endpoints, next })
    }

    pub async fn get(
        &self,
        principal: &Principal,
        id: Uuid,
    ) -> Result<WebhookEndpoint, WebhookError> {
        let tenant = principal.tenant_with(Scope::WebhooksRead)?;
        let mut conn = db::connect(&self.pool).await?;
        store::get(&mut conn, tenant, id)
            .await
            .map_err(|e| not_found(e, id))
    }

    /// Applies the changes that differ from the stored endpoint; an update that changes
    /// nothing returns the endpoint and emits no event.
    pub async fn update(
        &self,
        principal: &Principal,
        id: Uuid,
        changes: EndpointChanges,
    ) -> Result<WebhookEndpoint, WebhookError> {
        let tenant = principal.tenant_with(Scope::WebhooksWrite)?;
        self.catalog().await?;
        let actor = model::actor(principal.actor());
        let mut conn = db::connect(&self.pool).await?;
        conn.transaction::<_, WebhookError, _>(async |c| {
            let current = store::get_for_update(c, tenant, id)
                .await
                .map_err(|e| not_found(e, id))?;
            let changed = changes.changed_fields(&current);
            if changed.is_empty() {
                return Ok(current);
            }
            let endpoint = store::update(c, tenant, id, &changes, Utc::now()).await?;
            self.emitter
                .emit(
                    c,
                    tenant,
                    "webhook_endpoint.updated",
                    model::updated_payload(&endpoint, &changed, &actor),
                )
                .await?;
            Ok(endpoint)
        })
        .await
    }

    pub async fn delete(&self, principal: &Principal, id: Uuid) -> Result<(), WebhookError> {
        let tenant = principal.tenant_with(Scope::WebhooksWrite)?;
        self.catalog().await?;
        let actor = model::actor(principal.actor());
        let mut conn = db::connect(&self.pool).await?;
        conn.transaction::<_, WebhookError, _>(async |c| {
            let endpoint = store::delete(c, tenant, id)
                .await
                .map_err(|e| not_found(e, id))?;
            self.emitter
                .emit(
                    c,
                    tenant,
                    "webhook_endpoint.deleted",
                    model::deleted_payload(&endpoint, &actor, Utc::now()),
                )
                .await?;
            Ok(())
        })
        .await?;
        tracing::info!(tenant = %tenant, webhook_endpoint_id = %id, actor = %actor, "webhook endpoint deleted");
        Ok(())
    }

    /// The current secret in clear. Needs `webhooks:write`: a secret forges deliveries.
    pub async fn secret(
        &self,
        principal: &Principal,
        id: Uuid,
    ) -> Result<ShownSecret, WebhookError> {
        let tenant = principal.tenant_with(Scope::WebhooksWrite)?;
        let keys = self.keys()?;
        let mut conn = db::connect(&self.pool).await?;
        let stored = store::secrets(&mut conn, tenant, id)
            .await
            .map_err(|e| not_found(e, id))?;
        let plain = keys.open(&stored.current, &row_context(tenant.0, id))?;
        let now = Utc::now();
        Ok(ShownSecret {
            secret: Secret::from_bytes(plain)?,
            previous_secret_expire_time: stored.previous.map(|(_, t)| t).filter(|t| *t > now),
        })
    }

    /// Issues a new secret. The current one keeps signing for `grace` (None: the default)
    /// unless `end_grace_now`; while an earlier rotation's grace lasts, only `end_grace_now`
    /// may rotate again.
    pub async fn rotate(
        &self,
        principal: &Principal,
        id: Uuid,
        grace: Option<Duration>,
        end_grace_now: bool,
    ) -> Result<(WebhookEndpoint, Secret), WebhookError> {
        let tenant = principal.tenant_with(Scope::WebhooksWrite)?;
        let keys = self.keys()?;
        self.catalog().await?;
        let secret = Secret::generate()?;
        let sealed = keys.seal(secret.expose_bytes(), &row_context(tenant.0, id))?;
        let actor = model::actor(principal.actor());
        let mut conn = db::connect(&self.pool).await?;
        let endpoint = conn
            .transaction::<_, WebhookError, _>(async |c| {
                let current = store::get_for_update(c, tenant, id)
                    .await
                    .map_err(|e| not_found(e, id))?;
                let now = Utc::now();
                if !end_grace_now && let Some(until) = current.live_previous_secret_expire_time(now)
                {
                    return Err(WebhookError::GraceInProgress {
                        id: id.to_string(),
                        until,
                    });
                }
                let until = (!end_grace_now).then(|| {
                    now + chrono::Duration::from_std(grace.unwrap_or(DEFAULT_ROTATION_GRACE))
                        .expect("the grace is at most 7 days")
                });
                let endpoint = store::rotate_secret(c, tenant, id, &sealed, until, now).await?;
                self.emitter
                    .emit(
                        c,
                        tenant,
                        "webhook_endpoint.secret_rotated",
                        model::secret_rotated_payload(&endpoint, &actor, until.unwrap_or(now)),
                    )
                    .await?;
                Ok(endpoint)
            })
            .await?;
        tracing::info!(tenant = %tenant, webhook_endpoint_id = %id, actor = %actor, "webhook secret rotated");
        Ok((endpoint, secret))
    }

    /// Enables a disabled endpoint (event `webhook_endpoint.enabled`); on an enabled one
    /// only the failure count is reset, and no event is emitted.
    pub async fn enable(
        &self,
        principal: &Principal,
        id: Uuid,
    ) -> Result<WebhookEndpoint, WebhookError> {
        let tenant = principal.tenant_with(Scope::WebhooksWrite)?;
        self.catalog().await?;
        let actor = model::actor(principal.actor());
        let mut conn = db::connect(&self.pool).await?;
        conn.transaction::<_, WebhookError, _>(async |c| {
            let current = store::get_for_update(c, tenant, id)
                .await
                .map_err(|e| not_found(e, id))?;
            let endpoint = store::enable(c, tenant, id, Utc::now()).await?;
            if current.state() == EndpointState::Disabled {
                self.emitter
                    .emit(
                        c,
                        tenant,
                        "webhook_endpoint.enabled",
                        model::enabled_payload(&endpoint, &actor),
                    )
                    .await?;
            }
            Ok(endpoint)
        })
        .await
    }

    /// One page of the catalog in name order, after `after`.
    pub async fn event_types(
        &self,
        principal: &Principal,
        category: Option<&str>,
        after: Option<&str>,
        page_size: i64,
    ) -> Result<(Vec<EventType>, Option<String>), WebhookError> {
        principal.tenant_with(Scope::WebhooksRead)?;
        let mut conn = db::connect(&self.pool).await?;
        let mut types = catalog::list(&mut conn, category, after, page_size + 1).await?;
        let next = if types.len() as i64 > page_size {
            types.truncate(page_size as usize);
            types.last().map(|t| t.name.clone())
        } else {
            None
        };
        Ok((types, next))
    }

    pub async fn event_type(
        &self,
        principal: &Principal,
        name: &str,
    ) -> Result<EventType, WebhookError> {
        principal.tenant_with(Scope::WebhooksRead)?;
        let mut conn = db::connect(&self.pool).await?;
        catalog::get(&mut conn, name).await.map_err(|e| match e {
            StoreError::NotFound => EventError::UnknownType(name.to_string()).into(),
            other => other.into(),
        })
    }

    /// PublishEvent: checks the type and payload against the catalog (adding to the
    /// caller's violations `v`, so one answer names every bad field) and appends the event
    /// with its outbox row. A repeated idempotency id returns the first event as a
    /// duplicate, unless its type or payload differs: reusing a key for another event is
    /// the caller's bug, and silently answering with the old event would hide it.
    pub async fn publish(
        &self,
        principal: &Principal,
        publish: Publish,
        mut v: Violations,
    ) -> Result<(Event, bool), WebhookError> {
        principal.require_internal()?;
        if let Some(event_type) = &publish.event_type {
            match self.catalog().await?.validate(event_type, &publish.payload) {
                Ok(()) => {}
                Err(EventError::UnknownType(_)) => v.add(
                    "event_type",
                    format!("{} is not a type of the event catalog", quote(event_type)),
                ),
                Err(EventError::InvalidPayload(found)) => {
                    for f in found.iter() {
                        v.add(&f.field, &f.description);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        let (Some(tenant), Some(event_type), Some(key)) =
            (publish.tenant, publish.event_type, publish.idempotency_id)
        else {
            debug_assert!(!v.is_empty(), "a missing field has its violation");
            return Err(WebhookError::Invalid(v));
        };
        v.into_result(())?;
        let new = NewEvent {
            tenant,
            event_type,
            payload: publish.payload,
            idempotency_id: Some(key),
            source: principal.actor(),
            endpoint_id: None,
        };
        let (first, duplicate) = self.appender.submit(Append(new.clone())).await?;
        if duplicate
            && (first.event_type != new.event_type || !same_json(&first.payload, &new.payload))
        {
            return Err(Violations::one(
                "idempotency_id",
                format!(
                    "already used for event {} with another type or payload; use a new id for a new event",
                    first.id
                ),
            )
            .into());
        }
        Ok((first, duplicate))
    }

    /// One page of the tenant's event log, newest first, each event with its deliveries,
    /// and the position to continue from.
    pub async fn events(
        &self,
        principal: &Principal,
        filter: &EventFilter,
        before: Option<Position>,
        page_size: i64,
    ) -> Result<(Vec<LoggedEvent>, Option<Position>), WebhookError> {
        let tenant = principal.tenant_with(Scope::WebhooksRead)?;
        let mut conn = db::connect(&self.pool).await?;
        let mut events = outbox::list(&mut conn, tenant, filter, before, page_size + 1).await?;
        let next = if events.len() as i64 > page_size {
            events.truncate(page_size as usize);
            events.last().map(|e| (e.create_time, e.id))
        } else {
            None
        };
        let events = with_deliveries(&mut conn, tenant, events).await?;
        Ok((events, next))
    }

    /// One event of the tenant with its deliveries; another tenant's id is not found, like
    /// a missing one.
    pub async fn event(
        &self,
        principal: &Principal,
        id: Uuid,
    ) -> Result<LoggedEvent, WebhookError> {
        let tenant = principal.tenant_with(Scope::WebhooksRead)?;
        let mut conn = db::connect(&self.pool).await?;
        let event = outbox::get(&mut conn, tenant, id)
            .await
            .map_err(|e| match e {
                StoreError::NotFound => WebhookError::EventNotFound(id.to_string()),
                other => other.into(),
            })?;
        let mut events = with_deliveries(&mut conn, tenant, vec![event]).await?;
        Ok(events.pop().expect("one event in, one out"))
    }

    /// SendTestEvent: a sample of `event_type` (default `webhook.test`) for this endpoint
    /// only, and its pending delivery, in one transaction. The fan-out, when the event
    /// reaches it, finds the delivery (pending, no attempt yet) and queues its first attempt;
    /// nothing is queued here, so the attempt never races the event's commit.
    pub async fn send_test_event(
        &self,
        principal: &Principal,
        endpoint_id: Uuid,
        event_type: Option<&str>,
    ) -> Result<Delivery, WebhookError> {
        let tenant = principal.tenant_with(Scope::WebhooksWrite)?;
        let event_type = event_type.unwrap_or(DEFAULT_TEST_EVENT_TYPE);
        let mut conn = db::connect(&self.pool).await?;
        let sample = match catalog::get(&mut conn, event_type).await {
            // The real endpoint and time rather than the catalog's placeholders.
            Ok(t) if event_type == DEFAULT_TEST_EVENT_TYPE => serde_json::json!({
                "webhook_endpoint_id": endpoint_id,
                "message": t.sample.get("message").cloned().unwrap_or_default(),
                "send_time": chrono::Utc::now()
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            }),
            Ok(t) => t.sample,
            Err(StoreError::NotFound) => {
                return Err(Violations::one(
                    "event_type",
                    format!("{} is not a type of the event catalog", quote(event_type)),
                )
                .into());
            }
            Err(e) => return Err(e.into()),
        };
        let source = principal.actor();
        let delivery = conn
            .transaction::<_, WebhookError, _>(async |c| {
                // Locked so a concurrent delete cannot slip between the check and the insert.
                store::get_for_update(c, tenant, endpoint_id)
                    .await
                    .map_err(|e| not_found(e, endpoint_id))?;
                let (event, _) = outbox::append(
                    c,
                    NewEvent {
                        tenant,
                        event_type: event_type.to_string(),
                        payload: sample,
                        idempotency_id: None,
                        source,
                        endpoint_id: Some(endpoint_id),
                    },
                )
                .await?;
                Ok(deliveries::insert_pending(
                    c,
                    Uuid::now_v7(),
                    tenant,
                    endpoint_id,
                    event.id,
                    &event.event_type,
                    event.create_time,
                )
                .await?)
            })
            .await?;
        tracing::info!(tenant = %tenant, webhook_endpoint_id = %endpoint_id, webhook_delivery_id = %delivery.id, event_type, "test event sent");
        Ok(delivery)
    }

    /// One page of an endpoint's deliveries, newest first.
    pub async fn deliveries(
        &self,
        principal: &Principal,
        endpoint_id: Uuid,
        filter: &DeliveryFilter,
        before: Option<Uuid>,
        page_size: i64,
    ) -> Result<DeliveryPage, WebhookError> {
        let tenant = principal.tenant_with(Scope::WebhooksRead)?;
        let mut conn = db::connect(&self.pool).await?;
        // An empty page must not tell a foreign endpoint from one without deliveries.
        store::get(&mut conn, tenant, endpoint_id)
            .await
            .map_err(|e| not_found(e, endpoint_id))?;
        let mut found = deliveries::list(
            &mut conn,
            tenant,
            endpoint_id,
            filter,
            before,
            page_size + 1,
        )
        .await?;
        let next = if found.len() as i64 > page_size {
            found.truncate(page_size as usize);
            found.last().map(|d| d.id)
        } else {
            None
        };
        Ok(DeliveryPage {
            deliveries: found,
            next,
        })
    }

    /// One delivery of the endpoint with every attempt, oldest first.
    pub async fn delivery(
        &self,
        principal: &Principal,
        endpoint_id: Uuid,
        id: Uuid,
    ) -> Result<(Delivery, Vec<Attempt>), WebhookError> {
        let tenant = principal.tenant_with(Scope::WebhooksRead)?;
        let mut conn = db::connect(&self.pool).await?;
        let delivery = deliveries::get(&mut conn, tenant, endpoint_id, id)
            .await
            .map_err(|e| delivery_not_found(e, id))?;
        let attempts = deliveries::attempts(&mut conn, tenant, id).await?;
        Ok((delivery, attempts))
    }

    /// RetryWebhookDelivery: queues the delivery's next attempt now, as a manual one (the
    /// worker runs it whatever the status; a failure leaves a failed delivery failed and a
    /// pending one on its schedule). Returns the delivery as it is before that attempt.
    pub async fn retry(
        &self,
        principal: &Principal,
        endpoint_id: Uuid,
        id: Uuid,
    ) -> Result<Delivery, WebhookError> {
        let tenant = principal.tenant_with(Scope::WebhooksWrite)?;
        let delivery = {
            let mut conn = db::connect(&self.pool).await?;
            let endpoint = store::get(&mut conn, tenant, endpoint_id)
                .await
                .map_err(|e| not_found(e, endpoint_id))?;
            let delivery = deliveries::get(&mut conn, tenant, endpoint_id, id)
                .await
                .map_err(|e| delivery_not_found(e, id))?;
            // A test event goes to its endpoint even while it is disabled; nothing else does.
            if endpoint.state() == EndpointState::Disabled
                && deliveries::event_target(&mut conn, tenant, delivery.event_id).await?
                    != Some(endpoint_id)
            {
                return Err(disabled(endpoint_id));
            }
            delivery
        };
        // No connection is held while RabbitMQ confirms.
        self.tasks
            .publish(
                &[Task {
                    delivery_id: delivery.id,
                    attempt: delivery.attempts + 1,
                    manual: true,
                }],
                None,
            )
            .await?;
        tracing::info!(tenant = %tenant, webhook_endpoint_id = %endpoint_id, webhook_delivery_id = %id, attempt = delivery.attempts + 1, "manual delivery attempt queued");
        Ok(delivery)
    }

    /// RecoverWebhookDeliveries: queues one manual attempt for each failed delivery of the
    /// endpoint created at or after `since` (oldest first, at most [`MAX_RECOVER`]); returns
    /// how many. If RabbitMQ fails midway the call fails, and calling again is safe: a task
    /// for an attempt already made is dropped by the worker.
    pub async fn recover(
        &self,
        principal: &Principal,
        endpoint_id: Uuid,
        since: DateTime<Utc>,
    ) -> Result<usize, WebhookError> {
        let tenant = principal.tenant_with(Scope::WebhooksWrite)?;
        let failed = {
            let mut conn = db::connect(&self.pool).await?;
            let endpoint = store::get(&mut conn, tenant, endpoint_id)
                .await
                .map_err(|e| not_found(e, endpoint_id))?;
            if endpoint.state() == EndpointState::Disabled {
                return Err(disabled(endpoint_id));
            }
            deliveries::failed_since(&mut conn, tenant, endpoint_id, since, MAX_RECOVER).await?
        };
        let tasks: Vec<Task> = failed
            .iter()
            .map(|&(delivery_id, attempts)| Task {
                delivery_id,
                attempt: attempts + 1,
                manual: true,
            })
            .collect();
        for chunk in tasks.chunks(RECOVER_CHUNK) {
            self.tasks.publish(chunk, None).await?;
        }
        tracing::info!(tenant = %tenant, webhook_endpoint_id = %endpoint_id, recovered = tasks.len(), since = %since, "failed deliveries queued again");
        Ok(tasks.len())
    }
}

/// A PublishEvent request after the gRPC layer's checks: `None` where a field was invalid
/// (its violation is already recorded).
pub struct Publish {
    pub tenant: Option<TenantId>,
    pub event_type: Option<String>,
    pub payload: serde_json::Value,
    pub idempotency_id: Option<String>,
}

/// JSON equality with numbers compared by value: a payload read back from `jsonb` may spell
/// a number differently (`1e20` as `100000000000000000000`) than the request did.
fn same_json(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value as J;
    match (a, b) {
        (J::Number(x), J::Number(y)) => x == y || x.as_f64() == y.as_f64(),
        (J::Array(x), J::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (J::Object(x), J::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, xv)| y.get(k).is_some_and(|yv| same_json(xv, yv)))
        }
        _ => a == b,
    }
}

/// Pairs each event with its deliveries (one query for the whole page).
async fn with_deliveries(
    conn: &mut diesel_async::AsyncPgConnection,
    tenant: TenantId,
    events: Vec<Event>,
) -> Result<Vec<LoggedEvent>, WebhookError> {
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let mut by_event: HashMap<Uuid, Vec<Delivery>> = HashMap::new();
    for d in deliveries::for_events(conn, tenant, &ids).await? {
        by_event.entry(d.event_id).or_default().push(d);
    }
    Ok(events
        .into_iter()
        .map(|event| LoggedEvent {
            deliveries: by_event.remove(&event.id).unwrap_or_default(),
            event,
        })
        .collect())
}

fn disabled(endpoint_id: Uuid) -> WebhookError {
    WebhookError::FailedPrecondition(format!(
        "webhook endpoint {endpoint_id} is disabled: enable it first (EnableWebhookEndpoint)"
    ))
}

fn delivery_not_found(e: StoreError, id: Uuid) -> WebhookError {
    match e {
        StoreError::NotFound => WebhookError::DeliveryNotFound(id.to_string()),
        other => other.into(),
    }
}

fn not_found(e: StoreError, id: Uuid) -> WebhookError {
    match e {
        StoreError::NotFound => WebhookError::NotFound(id.to_string()),
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::same_json;

    #[test]
    fn json_numbers_compare_by_value() {
        let read_back: serde_json::Value =
            serde_json::from_str(r#"{"n": 100000000000000000000, "a": [1, 2.5]}"#).unwrap();
        assert!(same_json(&json!({"a": [1, 2.5], "n": 1e20}), &read_back));
        assert!(!same_json(&json!({"a": [1, 2.5], "n": 1e21}), &read_back));
        assert!(!same_json(&json!({"a": [1], "n": 1e20}), &read_back));
        assert!(!same_json(&json!({"a": [1, 2.5]}), &read_back));
        assert!(!same_json(&json!({"a": [1, "2.5"], "n": 1e20}), &read_back));
    }
}
