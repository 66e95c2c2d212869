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
/// first, at most `limit` (RecoverWebhookDeliveries; walks `webhook_deliveries_endpoint_idx`:
/// UUIDv7 ids are in creation order, and no index names `status`, so status changes stay
/// HOT updates).
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
        .order(d::id.asc())
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

use diesel::sql_types::{
    Array, Bool, Integer, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid,
};

/// One event's fan-out: inserts a pending delivery of the event for each endpoint that still
/// exists (an existing (event, endpoint) row is left alone), and answers the ids of the
/// event's deliveries that wait for their first attempt: the new ones, and those a crash left
/// without their task. Events that arrive together share one statement and one commit
/// ([`crate::db::group::GroupCommit`]).
#[derive(Debug, Clone)]
pub struct FanOut {
    pub tenant: TenantId,
    pub event_id: Uuid,
    pub event_type: String,
    pub endpoints: Vec<Uuid>,
}

impl crate::db::group::GroupWrite for FanOut {
    type Output = Vec<Uuid>;
    const NAME: &'static str = "the webhook fan-out writer";
    /// Events per statement (each with up to a few dozen endpoints).
    const MAX_BATCH: usize = 200;

    async fn write(
        conn: &mut AsyncPgConnection,
        writes: &[Self],
    ) -> Result<Vec<Vec<Uuid>>, StoreError> {
        #[derive(QueryableByName)]
        struct Waiting {
            #[diesel(sql_type = SqlUuid)]
            id: Uuid,
            #[diesel(sql_type = SqlUuid)]
            event_id: Uuid,
        }
        // One row per (event, endpoint), in (event, endpoint) order so that two batches
        // meeting on the same rows (a redelivered event) insert them in one order.
        let mut rows: Vec<(Uuid, Uuid, Uuid, &str)> = writes
            .iter()
            .flat_map(|w| {
                w.endpoints
                    .iter()
                    .map(move |e| (w.event_id, *e, w.tenant.0, w.event_type.as_str()))
            })
            .collect();
        rows.sort_by_key(|r| (r.0, r.1));
        rows.dedup_by_key(|r| (r.0, r.1));
        let ids: Vec<Uuid> = rows.iter().map(|_| Uuid::now_v7()).collect();
        let event_ids: Vec<Uuid> = writes.iter().map(|w| w.event_id).collect();
        // The new rows (RETURNING) and the older ones still waiting (the SELECT sees the table
        // as it was before the INSERT, so the two parts never overlap).
        let waiting: Vec<Waiting> = diesel::sql_query(
            "WITH ins AS ( \
                 INSERT INTO webhook_deliveries (id, tenant_id, endpoint_id, event_id, event_type) \
                 SELECT u.id, u.tenant_id, u.endpoint_id, u.event_id, u.event_type \
                 FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::text[]) \
                     AS u(id, event_id, endpoint_id, tenant_id, event_type) \
                 JOIN webhook_endpoints e ON e.id = u.endpoint_id AND e.tenant_id = u.tenant_id \
                 WHERE EXISTS (SELECT 1 FROM events WHERE id = u.event_id) \
                 ON CONFLICT (event_id, endpoint_id) DO NOTHING \
                 RETURNING id, event_id \
             ) \
             SELECT id, event_id FROM ins \
             UNION ALL \
             SELECT id, event_id FROM webhook_deliveries \
             WHERE event_id = ANY($6) AND status = 'pending' AND attempts = 0",
        )
        .bind::<Array<SqlUuid>, _>(&ids)
        .bind::<Array<SqlUuid>, _>(rows.iter().map(|r| r.0).collect::<Vec<_>>())
        .bind::<Array<SqlUuid>, _>(rows.iter().map(|r| r.1).collect::<Vec<_>>())
        .bind::<Array<SqlUuid>, _>(rows.iter().map(|r| r.2).collect::<Vec<_>>())
        .bind::<Array<Text>, _>(rows.iter().map(|r| r.3).collect::<Vec<_>>())
        .bind::<Array<SqlUuid>, _>(&event_ids)
        .load(conn)
        .await?;
        let mut by_event: std::collections::HashMap<Uuid, Vec<Uuid>> =
            std::collections::HashMap::new();
        for w in waiting {
            by_event.entry(w.event_id).or_default().push(w.id);
        }
        // An event twice in one batch (a redelivery) gets its tasks once: the second copy
        // answers none, which is right, since the first one queues them.
        Ok(writes
            .iter()
            .map(|w| by_event.remove(&w.event_id).unwrap_or_default())
            .collect())
    }
}

/// A delivery a worker holds (its lease), with what the attempt needs.
#[derive(Debug, QueryableByName)]
pub struct Claimed {
    #[diesel(sql_type = SqlUuid)]
    pub id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    pub tenant_id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    pub endpoint_id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    pub event_id: Uuid,
    #[diesel(sql_type = Text)]
    pub status: String,
    #[diesel(sql_type = Integer)]
    pub attempts: i32,
    #[diesel(sql_type = Text)]
    pub url: String,
    #[diesel(sql_type = Jsonb)]
    pub headers: serde_json::Value,
    #[diesel(sql_type = Integer)]
    pub rate_limit_per_second: i32,
    #[diesel(sql_type = Text)]
    pub secret_ciphertext: String,
    #[diesel(sql_type = Nullable<Text>)]
    pub previous_secret_ciphertext: Option<String>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub previous_secret_expire_time: Option<DateTime<Utc>>,
    #[diesel(sql_type = Bool)]
    pub endpoint_disabled: bool,
    #[diesel(sql_type = Text)]
    pub event_type: String,
    #[diesel(sql_type = Jsonb)]
    pub payload: serde_json::Value,
    #[diesel(sql_type = Timestamptz)]
    pub event_time: DateTime<Utc>,
    /// Set on test events: the only endpoint they go to (even a disabled one).
    #[diesel(sql_type = Nullable<SqlUuid>)]
    pub target_endpoint_id: Option<Uuid>,
}

/// A task's claim: takes the delivery for attempt `attempt` for `lease` (or `None`: see
/// [`Blocked`]), for many tasks in one statement ([`crate::db::group::GroupCommit`]).
///
/// The lease is committed without waiting for the WAL flush (`synchronous_commit = off` for
/// this statement's transaction only): a lease lost in a Postgres crash costs at most a
/// duplicate POST — with the same `webhook-id`, which receivers deduplicate — and saves one
/// of the delivery's two flushes.
/// Manual tasks may re-open a finished delivery; scheduled ones only run while it is pending.
#[derive(Debug, Clone)]
pub struct Claim {
    pub id: Uuid,
    pub attempt: i32,
    pub manual: bool,
    pub lease: std::time::Duration,
}

impl crate::db::group::GroupWrite for Claim {
    type Output = Option<Claimed>;
    const NAME: &'static str = "the delivery claimer";
    const MAX_BATCH: usize = 500;

    async fn write(
        conn: &mut AsyncPgConnection,
        writes: &[Self],
    ) -> Result<Vec<Option<Claimed>>, StoreError> {
        // In id order, so concurrent batches lock rows in one order.
        let mut rows: Vec<&Claim> = writes.iter().collect();
        rows.sort_by_key(|c| c.id);
        let claimed: Vec<Claimed> = diesel::sql_query(
            "UPDATE webhook_deliveries d \
             SET lease_until = now() + u.lease_us * interval '1 microsecond' \
             FROM unnest($1::uuid[], $2::int4[], $3::bool[], $4::int8[]) \
                      AS u(id, attempt, manual, lease_us), \
                  webhook_endpoints e, events ev \
             WHERE d.id = u.id AND e.id = d.endpoint_id AND ev.id = d.event_id \
               AND (d.status = 'pending' OR u.manual) AND d.attempts < u.attempt \
               AND (d.lease_until IS NULL OR d.lease_until < now()) \
               AND set_config('synchronous_commit', 'off', true) IS NOT NULL \
             RETURNING d.id, d.tenant_id, d.endpoint_id, d.event_id, d.status, d.attempts, \
                       e.url, e.headers, e.rate_limit_per_second, e.secret_ciphertext, \
                       e.previous_secret_ciphertext, e.previous_secret_expire_time, \
                       e.disabled_time IS NOT NULL AS endpoint_disabled, ev.event_type, \
                       ev.payload, ev.create_time AS event_time, \
                       ev.endpoint_id AS target_endpoint_id",
        )
        .bind::<Array<SqlUuid>, _>(rows.iter().map(|c| c.id).collect::<Vec<_>>())
        .bind::<Array<Integer>, _>(rows.iter().map(|c| c.attempt).collect::<Vec<_>>())
        .bind::<Array<Bool>, _>(rows.iter().map(|c| c.manual).collect::<Vec<_>>())
        .bind::<Array<diesel::sql_types::BigInt>, _>(
            rows.iter()
                .map(|c| i64::try_from(c.lease.as_micros()).unwrap_or(i64::MAX))
                .collect::<Vec<_>>(),
        )
        .load(conn)
        .await?;
        // A delivery is claimed once per statement even when two tasks of it meet in one
        // batch: the first write asking for it gets it, the other finds it leased.
        let mut by_id: std::collections::HashMap<Uuid, Claimed> =
            claimed.into_iter().map(|c| (c.id, c)).collect();
        Ok(writes.iter().map(|c| by_id.remove(&c.id)).collect())
    }
}

/// Why a task could not claim its delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    /// Gone, finished, or the attempt was made already: the task is a duplicate.
    Stale,
    /// Another worker holds it (a duplicate task running now) for this long.
    Leased(std::time::Duration),
}

/// Tells why a [`Claim`] of this task answered `None`.
pub async fn blocked(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    attempt: i32,
    manual: bool,
) -> Result<Blocked, StoreError> {
    #[derive(QueryableByName)]
    struct State {
        #[diesel(sql_type = Text)]
        status: String,
        #[diesel(sql_type = Integer)]
        attempts: i32,
        #[diesel(sql_type = Nullable<diesel::sql_types::Double>)]
        lease_secs: Option<f64>,
    }
    let state: Option<State> = diesel::sql_query(
        "SELECT status, attempts, \
                EXTRACT(EPOCH FROM (lease_until - now()))::float8 AS lease_secs \
         FROM webhook_deliveries WHERE id = $1",
    )
    .bind::<SqlUuid, _>(id)
    .get_result(conn)
    .await
    .optional()?;
    Ok(match state {
        Some(s) if (s.status == "pending" || manual) && s.attempts < attempt => {
            match s.lease_secs {
                Some(secs) if secs > 0.0 => {
                    Blocked::Leased(std::time::Duration::from_secs_f64(secs))
                }
                // The lease ended between the two statements: try again at once.
                _ => Blocked::Leased(std::time::Duration::ZERO),
            }
        }
        _ => Blocked::Stale,
    })
}

/// Gives a claimed delivery back without an attempt (rate limited: the task waits).
pub async fn release(conn: &mut AsyncPgConnection, id: Uuid) -> Result<(), StoreError> {
    diesel::sql_query("UPDATE webhook_deliveries SET lease_until = NULL WHERE id = $1")
        .bind::<SqlUuid, _>(id)
        .execute(conn)
        .await?;
    Ok(())
}

/// The delivery after an attempt (or after a decision not to attempt).
#[derive(Debug, Clone)]
pub struct Recorded<'a> {
    pub status: &'a str,
    /// Attempts made, this one included.
    pub attempts: i32,
    pub next_attempt_time: Option<DateTime<Utc>>,
    pub last_attempt_time: Option<DateTime<Utc>>,
    pub last_status_code: Option<i32>,
    pub last_error: Option<&'a str>,
}

/// Writes the delivery's new state and releases its lease.
pub async fn record(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    r: &Recorded<'_>,
) -> Result<(), StoreError> {
    diesel::sql_query(
        "UPDATE webhook_deliveries SET status = $2, attempts = GREATEST(attempts, $3), \
                lease_until = NULL, next_attempt_time = $4, \
                last_attempt_time = COALESCE($5, last_attempt_time), \
                last_status_code = COALESCE($6, last_status_code), last_error = $7, \
                update_time = now() \
         WHERE id = $1",
    )
    .bind::<SqlUuid, _>(id)
    .bind::<Text, _>(r.status)
    .bind::<Integer, _>(r.attempts)
    .bind::<Nullable<Timestamptz>, _>(r.next_attempt_time)
    .bind::<Nullable<Timestamptz>, _>(r.last_attempt_time)
    .bind::<Nullable<Integer>, _>(r.last_status_code)
    .bind::<Nullable<Text>, _>(r.last_error)
    .execute(conn)
    .await?;
    Ok(())
}

/// A success: [`record`] of a `succeeded` delivery and the end of its endpoint's run of
/// failures (no write to the endpoint unless it had failures), in one statement for many
/// deliveries at once ([`crate::db::group::GroupCommit`]): the delivery workers' successes
/// share one statement and one WAL flush.
#[derive(Debug, Clone)]
pub struct Success {
    pub id: Uuid,
    /// Attempts made, this one included.
    pub attempts: i32,
    pub attempt_time: DateTime<Utc>,
    pub status_code: Option<i32>,
}

impl crate::db::group::GroupWrite for Success {
    type Output = ();
    const NAME: &'static str = "the delivery success writer";
    const MAX_BATCH: usize = 1_000;

    async fn write(conn: &mut AsyncPgConnection, writes: &[Self]) -> Result<Vec<()>, StoreError> {
        use diesel::sql_types::Array;
        // In id order, so two batches (or a batch and a manual retry) lock rows in one order.
        let mut rows: Vec<&Success> = writes.iter().collect();
        rows.sort_by_key(|s| s.id);
        diesel::sql_query(
            "WITH u AS ( \
                 SELECT * FROM unnest($1::uuid[], $2::int4[], $3::timestamptz[], $4::int4[]) \
                     AS u(id, attempts, attempt_time, status_code) \
             ), d AS ( \
                 UPDATE webhook_deliveries d SET status = 'succeeded', \
                        attempts = GREATEST(d.attempts, u.attempts), lease_until = NULL, \
                        next_attempt_time = NULL, last_attempt_time = u.attempt_time, \
                        last_status_code = u.status_code, last_error = NULL, update_time = now() \
                 FROM u WHERE d.id = u.id RETURNING d.endpoint_id \
             ) \
             UPDATE webhook_endpoints SET consecutive_failures = 0 \
             WHERE id IN (SELECT endpoint_id FROM d) AND consecutive_failures <> 0",
        )
        .bind::<Array<SqlUuid>, _>(rows.iter().map(|s| s.id).collect::<Vec<_>>())
        .bind::<Array<Integer>, _>(rows.iter().map(|s| s.attempts).collect::<Vec<_>>())
        .bind::<Array<Timestamptz>, _>(rows.iter().map(|s| s.attempt_time).collect::<Vec<_>>())
        .bind::<Array<Nullable<Integer>>, _>(rows.iter().map(|s| s.status_code).collect::<Vec<_>>())
        .execute(conn)
        .await?;
        Ok(vec![(); writes.len()])
    }
}

/// A delivery exhausted its retries: counts it and returns the endpoint's run of failures,
/// or `None` when the endpoint is gone or already disabled.
pub async fn count_failure(
    conn: &mut AsyncPgConnection,
    endpoint: Uuid,
) -> Result<Option<i32>, StoreError> {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = Integer)]
        consecutive_failures: i32,
    }
    let row: Option<Count> = diesel::sql_query(
        "UPDATE webhook_endpoints SET consecutive_failures = consecutive_failures + 1 \
         WHERE id = $1 AND disabled_time IS NULL RETURNING consecutive_failures",
    )
    .bind::<SqlUuid, _>(endpoint)
    .get_result(conn)
    .await
    .optional()?;
    Ok(row.map(|r| r.consecutive_failures))
}
