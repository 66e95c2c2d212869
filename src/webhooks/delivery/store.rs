//! `webhook_deliveries` and `webhook_attempts` queries.

// --- reads and changes for the WebhookService delivery RPCs ---
//
// Every read filters by tenant and endpoint: a delivery of another tenant (or of another
// endpoint of the same tenant) is not found, like a missing one.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::{Attempt, Delivery, DeliveryStatus, ErrorKind};
use crate::{
    db::{
        StoreError,
        schema::{events, webhook_attempts, webhook_deliveries},
    },
    identity::TenantId,
};

/// A `webhook_deliveries` row as the RPCs read it (`lease_until` is the worker's business).
#[derive(Debug, Queryable, Selectable)]
#[diesel(table_name = webhook_deliveries, check_for_backend(diesel::pg::Pg))]
pub struct DeliveryRow {
    id: Uuid,
    tenant_id: Uuid,
    endpoint_id: Uuid,
    event_id: Uuid,
    event_type: String,
    status: String,
    attempts: i32,
    next_attempt_time: Option<DateTime<Utc>>,
    last_attempt_time: Option<DateTime<Utc>>,
    last_status_code: Option<i32>,
    last_error: Option<String>,
    create_time: DateTime<Utc>,
    update_time: DateTime<Utc>,
}

impl TryFrom<DeliveryRow> for Delivery {
    type Error = StoreError;
    fn try_from(row: DeliveryRow) -> Result<Self, StoreError> {
        let status = DeliveryStatus::parse(&row.status).ok_or_else(|| {
            StoreError::Unavailable(format!("webhook_deliveries.status: {:?}", row.status))
        })?;
        Ok(Delivery {
            id: row.id,
            tenant: TenantId(row.tenant_id),
            endpoint_id: row.endpoint_id,
            event_id: row.event_id,
            event_type: row.event_type,
            status,
            attempts: row.attempts,
            next_attempt_time: row.next_attempt_time,
            last_attempt_time: row.last_attempt_time,
            last_status_code: row.last_status_code,
            last_error: row.last_error,
            create_time: row.create_time,
            update_time: row.update_time,
        })
    }
}

fn deliveries(rows: Vec<DeliveryRow>) -> Result<Vec<Delivery>, StoreError> {
    rows.into_iter().map(TryInto::try_into).collect()
}

/// Inserts the pending delivery of a test event to its one endpoint (SendTestEvent, in the
/// event's transaction). The fan-out finds it and queues its first attempt.
pub async fn insert_pending(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    tenant: TenantId,
    endpoint_id: Uuid,
    event_id: Uuid,
    event_type: &str,
    now: DateTime<Utc>,
) -> Result<Delivery, StoreError> {
    use webhook_deliveries::dsl as d;
    diesel::insert_into(webhook_deliveries::table)
        .values((
            d::id.eq(id),
            d::tenant_id.eq(tenant.0),
            d::endpoint_id.eq(endpoint_id),
            d::event_id.eq(event_id),
            d::event_type.eq(event_type),
            d::status.eq(DeliveryStatus::Pending.as_str()),
            d::attempts.eq(0),
            d::create_time.eq(now),
            d::update_time.eq(now),
        ))
        .returning(DeliveryRow::as_returning())
        .get_result(conn)
        .await?
        .try_into()
}

/// One delivery of the tenant's endpoint; `NotFound` otherwise.
pub async fn get(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    endpoint_id: Uuid,
    id: Uuid,
) -> Result<Delivery, StoreError> {
    webhook_deliveries::table
        .filter(webhook_deliveries::tenant_id.eq(tenant.0))
        .filter(webhook_deliveries::endpoint_id.eq(endpoint_id))
        .filter(webhook_deliveries::id.eq(id))
        .select(DeliveryRow::as_select())
        .first(conn)
        .await?
        .try_into()
}

/// The endpoint a test event is for (`None` for an event every subscriber receives).
pub async fn event_target(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    event_id: Uuid,
) -> Result<Option<Uuid>, StoreError> {
    Ok(events::table
        .filter(events::tenant_id.eq(tenant.0))
        .filter(events::id.eq(event_id))
        .select(events::endpoint_id)
        .first(conn)
        .await?)
}

/// Which deliveries of an endpoint a listing returns.
#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    pub status: Option<DeliveryStatus>,
    pub event_type: Option<String>,
    /// Inclusive.
    pub start_time: Option<DateTime<Utc>>,
    /// Exclusive.
    pub end_time: Option<DateTime<Utc>>,
}

/// At most `limit` deliveries of the endpoint, newest first, with an id below `before`
/// (keyset on the UUIDv7 id, served by `webhook_deliveries_endpoint_idx`).
pub async fn list(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    endpoint_id: Uuid,
    filter: &DeliveryFilter,
    before: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Delivery>, StoreError> {
    use webhook_deliveries::dsl as d;
    let mut q = webhook_deliveries::table
        .filter(d::tenant_id.eq(tenant.0))
        .filter(d::endpoint_id.eq(endpoint_id))
        .into_boxed();
    if let Some(status) = filter.status {
        q = q.filter(d::status.eq(status.as_str()));
    }
    if let Some(t) = &filter.event_type {
        q = q.filter(d::event_type.eq(t.clone()));
    }
    if let Some(start) = filter.start_time {
        q = q.filter(d::create_time.ge(start));
    }
    if let Some(end) = filter.end_time {
        q = q.filter(d::create_time.lt(end));
    }
    if let Some(before) = before {
        q = q.filter(d::id.lt(before));
    }
    deliveries(
        q.order(d::id.desc())
            .limit(limit)
            .select(DeliveryRow::as_select())
            .load(conn)
            .await?,
    )
}

/// The deliveries of a page of the tenant's events, in one query (ListEvents, GetEvent).
pub async fn for_events(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    event_ids: &[Uuid],
) -> Result<Vec<Delivery>, StoreError> {
    if event_ids.is_empty() {
        return Ok(Vec::new());
    }
    use webhook_deliveries::dsl as d;
    deliveries(
        webhook_deliveries::table
            .filter(d::event_id.eq_any(event_ids))
            .filter(d::tenant_id.eq(tenant.0))
            .order((d::event_id, d::id))
            .select(DeliveryRow::as_select())
            .load(conn)
            .await?,
    )
}

/// (id, attempts) of the endpoint's failed deliveries created at or after `since`, oldest
/// first, at most `limit` (RecoverWebhookDeliveries; `webhook_deliveries_failed_idx`).
pub async fn failed_since(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    endpoint_id: Uuid,
    since: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<(Uuid, i32)>, StoreError> {
    use webhook_deliveries::dsl as d;
    Ok(webhook_deliveries::table
        .filter(d::endpoint_id.eq(endpoint_id))
        .filter(d::tenant_id.eq(tenant.0))
        .filter(d::status.eq(DeliveryStatus::Failed.as_str()))
        .filter(d::create_time.ge(since))
        .order(d::create_time.asc())
        .limit(limit)
        .select((d::id, d::attempts))
        .load(conn)
        .await?)
}

#[derive(Debug, Queryable, Selectable)]
#[diesel(table_name = webhook_attempts, check_for_backend(diesel::pg::Pg))]
struct AttemptRow {
    delivery_id: Uuid,
    attempt: i32,
    tenant_id: Uuid,
    endpoint_id: Uuid,
    attempt_time: DateTime<Utc>,
    url: String,
    status_code: Option<i32>,
    response_headers: serde_json::Value,
    response_body: String,
    latency_ms: i32,
    error_kind: Option<String>,
    error_message: Option<String>,
    trigger: String,
}

const ERROR_KINDS: [ErrorKind; 7] = [
    ErrorKind::Timeout,
    ErrorKind::Connect,
    ErrorKind::Tls,
    ErrorKind::Dns,
    ErrorKind::RefusedBySsrfGuard,
    ErrorKind::Status,
    ErrorKind::Other,
];

impl TryFrom<AttemptRow> for Attempt {
    type Error = StoreError;
    fn try_from(row: AttemptRow) -> Result<Self, StoreError> {
        let corrupt = |what: &str| StoreError::Unavailable(format!("webhook_attempts.{what}"));
        let response_headers = match row.response_headers {
            serde_json::Value::Object(map) => map
                .into_iter()
                .map(|(name, value)| match value {
                    serde_json::Value::String(s) => Ok((name, s)),
                    _ => Err(corrupt("response_headers: a value is not a string")),
                })
                .collect::<Result<Vec<_>, _>>()?,
            _ => return Err(corrupt("response_headers: not an object")),
        };
        let error_kind = match row.error_kind.as_deref() {
            None => None,
            Some(kind) => Some(
                ERROR_KINDS
                    .into_iter()
                    .find(|k| k.as_str() == kind)
                    .ok_or_else(|| corrupt("error_kind"))?,
            ),
        };
        Ok(Attempt {
            delivery_id: row.delivery_id,
            attempt: row.attempt,
            tenant: TenantId(row.tenant_id),
            endpoint_id: row.endpoint_id,
            attempt_time: row.attempt_time,
            url: row.url,
            status_code: row.status_code,
            response_headers,
            response_body: row.response_body,
            latency_ms: row.latency_ms,
            error_kind,
            error_message: row.error_message,
            manual: row.trigger == "manual",
        })
    }
}

/// Every attempt of a delivery of the tenant, oldest first (GetWebhookDelivery).
pub async fn attempts(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    delivery_id: Uuid,
) -> Result<Vec<Attempt>, StoreError> {
    use webhook_attempts::dsl as a;
    webhook_attempts::table
        .filter(a::delivery_id.eq(delivery_id))
        .filter(a::tenant_id.eq(tenant.0))
        .order(a::attempt.asc())
        .select(AttemptRow::as_select())
        .load(conn)
        .await?
        .into_iter()
        .map(TryInto::try_into)
        .collect()
}

// --- the pipeline: fan-out and worker ---
