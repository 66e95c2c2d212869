//! `webhook_deliveries` and `webhook_attempts` queries.

// --- reads and changes for the WebhookService delivery RPCs ---

// --- the pipeline: fan-out and worker ---

use chrono::{DateTime, Utc};
use diesel::{
    OptionalExtension, QueryableByName,
    sql_types::{
        Array, Bool, Integer, Interval, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid,
    },
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use crate::{db::StoreError, identity::TenantId};

/// Inserts a pending delivery of the event for each endpoint that still exists (an existing
/// (event, endpoint) row is left alone), then returns the ids of the event's deliveries that
/// wait for their first attempt: the new ones, and those a crash left without their task.
pub async fn fan_out(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    event_id: Uuid,
    event_type: &str,
    endpoints: &[Uuid],
) -> Result<Vec<Uuid>, StoreError> {
    #[derive(QueryableByName)]
    struct Id {
        #[diesel(sql_type = SqlUuid)]
        id: Uuid,
    }
    if !endpoints.is_empty() {
        let ids: Vec<Uuid> = endpoints.iter().map(|_| Uuid::now_v7()).collect();
        diesel::sql_query(
            "INSERT INTO webhook_deliveries (id, tenant_id, endpoint_id, event_id, event_type) \
             SELECT u.id, $3, u.endpoint_id, $4, $5 \
             FROM unnest($1::uuid[], $2::uuid[]) AS u(id, endpoint_id) \
             JOIN webhook_endpoints e ON e.id = u.endpoint_id AND e.tenant_id = $3 \
             WHERE EXISTS (SELECT 1 FROM events WHERE id = $4) \
             ON CONFLICT (event_id, endpoint_id) DO NOTHING",
        )
        .bind::<Array<SqlUuid>, _>(&ids)
        .bind::<Array<SqlUuid>, _>(endpoints)
        .bind::<SqlUuid, _>(tenant.0)
        .bind::<SqlUuid, _>(event_id)
        .bind::<Text, _>(event_type)
        .execute(conn)
        .await?;
    }
    let waiting: Vec<Id> = diesel::sql_query(
        "SELECT id FROM webhook_deliveries \
         WHERE event_id = $1 AND status = 'pending' AND attempts = 0",
    )
    .bind::<SqlUuid, _>(event_id)
    .load(conn)
    .await?;
    Ok(waiting.into_iter().map(|r| r.id).collect())
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

/// Takes the delivery for attempt `attempt` for `lease` (or `None`: see [`Blocked`]).
/// Manual tasks may re-open a finished delivery; scheduled ones only run while it is pending.
pub async fn claim(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    attempt: i32,
    manual: bool,
    lease: std::time::Duration,
) -> Result<Option<Claimed>, StoreError> {
    let lease = diesel::pg::data_types::PgInterval::from_microseconds(lease.as_micros() as i64);
    Ok(diesel::sql_query(
        "UPDATE webhook_deliveries d SET lease_until = now() + $4 \
         FROM webhook_endpoints e, events ev \
         WHERE d.id = $1 AND e.id = d.endpoint_id AND ev.id = d.event_id \
           AND (d.status = 'pending' OR $3) AND d.attempts < $2 \
           AND (d.lease_until IS NULL OR d.lease_until < now()) \
         RETURNING d.id, d.tenant_id, d.endpoint_id, d.event_id, d.status, d.attempts, e.url, \
                   e.headers, e.rate_limit_per_second, e.secret_ciphertext, \
                   e.previous_secret_ciphertext, e.previous_secret_expire_time, \
                   e.disabled_time IS NOT NULL AS endpoint_disabled, ev.event_type, \
                   ev.payload, ev.create_time AS event_time, \
                   ev.endpoint_id AS target_endpoint_id",
    )
    .bind::<SqlUuid, _>(id)
    .bind::<Integer, _>(attempt)
    .bind::<Bool, _>(manual)
    .bind::<Interval, _>(lease)
    .get_result(conn)
    .await
    .optional()?)
}

/// Why a task could not claim its delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    /// Gone, finished, or the attempt was made already: the task is a duplicate.
    Stale,
    /// Another worker holds it (a duplicate task running now) for this long.
    Leased(std::time::Duration),
}

/// Tells why [`claim`] returned `None` for this task.
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

/// A delivery succeeded: the endpoint's run of failures is over (no write when there was none).
pub async fn reset_failures(
    conn: &mut AsyncPgConnection,
    endpoint: Uuid,
) -> Result<(), StoreError> {
    diesel::sql_query(
        "UPDATE webhook_endpoints SET consecutive_failures = 0 \
         WHERE id = $1 AND consecutive_failures <> 0",
    )
    .bind::<SqlUuid, _>(endpoint)
    .execute(conn)
    .await?;
    Ok(())
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
