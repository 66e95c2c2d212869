//! Webhook endpoints in Postgres. Every query filters by tenant; each function takes the
//! caller's connection so a change and its outbox event share one transaction.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::model::{EndpointChanges, EndpointState, WebhookEndpoint};
use crate::{
    db::{
        StoreError,
        schema::{tenants, webhook_endpoints},
    },
    identity::TenantId,
};

#[derive(Debug, Queryable, Selectable)]
#[diesel(table_name = webhook_endpoints, check_for_backend(diesel::pg::Pg))]
struct EndpointRow {
    id: Uuid,
    tenant_id: Uuid,
    url: String,
    description: String,
    event_types: Vec<String>,
    headers: serde_json::Value,
    rate_limit_per_second: i32,
    previous_secret_expire_time: Option<DateTime<Utc>>,
    disabled_time: Option<DateTime<Utc>>,
    disabled_reason: Option<String>,
    consecutive_failures: i32,
    created_by: String,
    create_time: DateTime<Utc>,
    update_time: DateTime<Utc>,
}

impl TryFrom<EndpointRow> for WebhookEndpoint {
    type Error = StoreError;
    fn try_from(row: EndpointRow) -> Result<Self, StoreError> {
        let headers: BTreeMap<String, String> = serde_json::from_value(row.headers)
            .map_err(|e| StoreError::Unavailable(format!("webhook_endpoints.headers: {e}")))?;
        Ok(WebhookEndpoint {
            id: row.id,
            tenant_id: TenantId(row.tenant_id),
            url: row.url,
            description: row.description,
            event_types: row.event_types,
            headers,
            rate_limit_per_second: u32::try_from(row.rate_limit_per_second).unwrap_or(0),
            previous_secret_expire_time: row.previous_secret_expire_time,
            disabled_time: row.disabled_time,
            disabled_reason: row.disabled_reason,
            consecutive_failures: row.consecutive_failures,
            created_by: row.created_by,
            create_time: row.create_time,
            update_time: row.update_time,
        })
    }
}

fn headers_json(h: &BTreeMap<String, String>) -> serde_json::Value {
    serde_json::to_value(h).expect("a string map serializes")
}

/// An endpoint to insert, with its sealed secret.
pub struct InsertEndpoint<'a> {
    pub id: Uuid,
    pub tenant_id: TenantId,
    pub new: &'a super::model::NewEndpoint,
    pub secret_ciphertext: String,
    pub created_by: String,
    pub now: DateTime<Utc>,
}

/// The sealed secrets of one endpoint.
pub struct StoredSecrets {
    pub current: String,
    /// The rotated-out secret and when its grace ends (possibly already past).
    pub previous: Option<(String, DateTime<Utc>)>,
}

/// Locks the tenant row until the transaction ends: creations of one tenant queue up, so
/// the per-tenant endpoint limit holds under concurrency.
pub async fn lock_tenant(conn: &mut AsyncPgConnection, tenant: TenantId) -> Result<(), StoreError> {
    tenants::table
        .filter(tenants::id.eq(tenant.0))
        .select(tenants::id)
        .for_update()
        .first::<Uuid>(conn)
        .await?;
    Ok(())
}

pub async fn count(conn: &mut AsyncPgConnection, tenant: TenantId) -> Result<i64, StoreError> {
    Ok(webhook_endpoints::table
        .filter(webhook_endpoints::tenant_id.eq(tenant.0))
        .count()
        .get_result(conn)
        .await?)
}

pub async fn insert(
    conn: &mut AsyncPgConnection,
    e: InsertEndpoint<'_>,
) -> Result<WebhookEndpoint, StoreError> {
    use webhook_endpoints::dsl as w;
    let rate = i32::try_from(e.new.rate_limit_per_second).unwrap_or(i32::MAX);
    let row: EndpointRow = diesel::insert_into(webhook_endpoints::table)
        .values((
            w::id.eq(e.id),
            w::tenant_id.eq(e.tenant_id.0),
            w::url.eq(&e.new.url),
            w::description.eq(&e.new.description),
            w::event_types.eq(&e.new.event_types),
            w::headers.eq(headers_json(&e.new.headers)),
            w::rate_limit_per_second.eq(rate),
            w::secret_ciphertext.eq(&e.secret_ciphertext),
            w::created_by.eq(&e.created_by),
            w::create_time.eq(e.now),
            w::update_time.eq(e.now),
        ))
        .returning(EndpointRow::as_returning())
        .get_result(conn)
        .await?;
    row.try_into()
}

/// One endpoint of the tenant; `NotFound` for another tenant's id.
pub async fn get(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    id: Uuid,
) -> Result<WebhookEndpoint, StoreError> {
    webhook_endpoints::table
        .filter(webhook_endpoints::tenant_id.eq(tenant.0))
        .filter(webhook_endpoints::id.eq(id))
        .select(EndpointRow::as_select())
        .first(conn)
        .await?
        .try_into()
}

/// Like [`get`], locking the row until the transaction ends (read-modify-write).
pub async fn get_for_update(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    id: Uuid,
) -> Result<WebhookEndpoint, StoreError> {
    webhook_endpoints::table
        .filter(webhook_endpoints::tenant_id.eq(tenant.0))
        .filter(webhook_endpoints::id.eq(id))
        .select(EndpointRow::as_select())
        .for_update()
        .first(conn)
        .await?
        .try_into()
}

/// Newest first: at most `limit` endpoints with an id below `before`.
pub async fn list(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    state: Option<EndpointState>,
    before: Option<Uuid>,
    limit: i64,
) -> Result<Vec<WebhookEndpoint>, StoreError> {
    let mut q = webhook_endpoints::table
        .filter(webhook_endpoints::tenant_id.eq(tenant.0))
        .into_boxed();
    match state {
        Some(EndpointState::Enabled) => q = q.filter(webhook_endpoints::disabled_time.is_null()),
        Some(EndpointState::Disabled) => {
            q = q.filter(webhook_endpoints::disabled_time.is_not_null())
        }
        None => {}
    }
    if let Some(before) = before {
        q = q.filter(webhook_endpoints::id.lt(before));
    }
    q.order(webhook_endpoints::id.desc())
        .limit(limit)
        .select(EndpointRow::as_select())
        .load(conn)
        .await?
        .into_iter()
        .map(TryInto::try_into)
        .collect()
}

#[derive(AsChangeset)]
#[diesel(table_name = webhook_endpoints)]
struct Changeset {
    url: Option<String>,
    description: Option<String>,
    event_types: Option<Vec<String>>,
    headers: Option<serde_json::Value>,
    rate_limit_per_second: Option<i32>,
    update_time: DateTime<Utc>,
}

pub async fn update(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    id: Uuid,
    c: &EndpointChanges,
    now: DateTime<Utc>,
) -> Result<WebhookEndpoint, StoreError> {
    let set = Changeset {
        url: c.url.clone(),
        description: c.description.clone(),
        event_types: c.event_types.clone(),
        headers: c.headers.as_ref().map(headers_json),
        rate_limit_per_second: c
            .rate_limit_per_second
            .map(|r| i32::try_from(r).unwrap_or(i32::MAX)),
        update_time: now,
    };
    diesel::update(
        webhook_endpoints::table
            .filter(webhook_endpoints::tenant_id.eq(tenant.0))
            .filter(webhook_endpoints::id.eq(id)),
    )
    .set(&set)
    .returning(EndpointRow::as_returning())
    .get_result(conn)
    .await?
    .try_into()
}

/// Deletes the endpoint and returns it as it was.
pub async fn delete(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    id: Uuid,
) -> Result<WebhookEndpoint, StoreError> {
    diesel::delete(
        webhook_endpoints::table
            .filter(webhook_endpoints::tenant_id.eq(tenant.0))
            .filter(webhook_endpoints::id.eq(id)),
    )
    .returning(EndpointRow::as_returning())
    .get_result(conn)
    .await?
    .try_into()
}

pub async fn secrets(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    id: Uuid,
) -> Result<StoredSecrets, StoreError> {
    let (current, previous, expires): (String, Option<String>, Option<DateTime<Utc>>) =
        webhook_endpoints::table
            .filter(webhook_endpoints::tenant_id.eq(tenant.0))
            .filter(webhook_endpoints::id.eq(id))
            .select((
                webhook_endpoints::secret_ciphertext,
                webhook_endpoints::previous_secret_ciphertext,
                webhook_endpoints::previous_secret_expire_time,
            ))
            .first(conn)
            .await?;
    Ok(StoredSecrets {
        current,
        previous: previous.zip(expires),
    })
}

/// Replaces the secret: the current one becomes the previous until `previous_until`, or,
/// with `None`, no previous secret remains.
pub async fn rotate_secret(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    id: Uuid,
    new_ciphertext: &str,
    previous_until: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<WebhookEndpoint, StoreError> {
    use webhook_endpoints::dsl as w;
    let target = webhook_endpoints::table
        .filter(w::tenant_id.eq(tenant.0))
        .filter(w::id.eq(id));
    let row: EndpointRow = match previous_until {
        // Postgres evaluates every SET expression against the old row: the previous
        // ciphertext is the current one before this statement.
        Some(until) => {
            diesel::update(target)
                .set((
                    w::previous_secret_ciphertext.eq(w::secret_ciphertext.nullable()),
                    w::previous_secret_expire_time.eq(Some(until)),
                    w::secret_ciphertext.eq(new_ciphertext),
                    w::update_time.eq(now),
                ))
                .returning(EndpointRow::as_returning())
                .get_result(conn)
                .await?
        }
        None => {
            diesel::update(target)
                .set((
                    w::previous_secret_ciphertext.eq(None::<String>),
                    w::previous_secret_expire_time.eq(None::<DateTime<Utc>>),
                    w::secret_ciphertext.eq(new_ciphertext),
                    w::update_time.eq(now),
                ))
                .returning(EndpointRow::as_returning())
                .get_result(conn)
                .await?
        }
    };
    row.try_into()
}

/// Enables the endpoint and resets its failure count.
pub async fn enable(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<WebhookEndpoint, StoreError> {
    use webhook_endpoints::dsl as w;
    diesel::update(
        webhook_endpoints::table
            .filter(w::tenant_id.eq(tenant.0))
            .filter(w::id.eq(id)),
    )
    .set((
        w::disabled_time.eq(None::<DateTime<Utc>>),
        w::disabled_reason.eq(None::<String>),
        w::consecutive_failures.eq(0),
        w::update_time.eq(now),
    ))
    .returning(EndpointRow::as_returning())
    .get_result(conn)
    .await?
    .try_into()
}

/// Disables the endpoint with `reason` (one of [`super::model::DISABLED_REASONS`]). For the
/// delivery pipeline (auto-disable, 410) and the tests; no public RPC disables yet.
pub async fn disable(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    id: Uuid,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<WebhookEndpoint, StoreError> {
    use webhook_endpoints::dsl as w;
    diesel::update(
        webhook_endpoints::table
            .filter(w::tenant_id.eq(tenant.0))
            .filter(w::id.eq(id)),
    )
    .set((
        w::disabled_time.eq(Some(now)),
        w::disabled_reason.eq(Some(reason)),
        w::update_time.eq(now),
    ))
    .returning(EndpointRow::as_returning())
    .get_result(conn)
    .await?
    .try_into()
}
