//! API keys in Postgres. Every tenant-facing query filters by tenant; only the verifier's
//! lookup goes by key id alone (the key id is what the token carries).

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use ipnetwork::IpNetwork;
use uuid::Uuid;

use super::model::{ApiKey, ApiKeyChanges, KeyState, ListFilter};
use crate::identity::{Environment, KeyId};
use crate::ratelimit::{LimitOverrides, QuotaOverrides};
use crate::{
    db::{
        StoreError,
        schema::{api_key_expiring_notices, api_keys, tenants},
    },
    identity::Scopes,
    identity::{Plan, TenantId},
};

#[derive(Debug, Queryable, Selectable, Insertable)]
#[diesel(table_name = api_keys, check_for_backend(diesel::pg::Pg))]
struct ApiKeyRow {
    id: String,
    tenant_id: Uuid,
    name: String,
    description: String,
    environment: String,
    scopes: Vec<String>,
    allowed_cidrs: Vec<IpNetwork>,
    secret_hash: String,
    previous_secret_hash: Option<String>,
    previous_secret_expire_time: Option<DateTime<Utc>>,
    created_by: String,
    create_time: DateTime<Utc>,
    update_time: DateTime<Utc>,
    last_used_time: Option<DateTime<Utc>>,
    expire_time: Option<DateTime<Utc>>,
    revoke_time: Option<DateTime<Utc>>,
    revoke_reason: Option<String>,
    rate_limit_per_minute: Option<i32>,
    rate_limit_per_hour: Option<i32>,
    rate_limit_per_day: Option<i32>,
    rate_limit_burst: Option<i32>,
}

impl TryFrom<ApiKeyRow> for ApiKey {
    type Error = StoreError;
    fn try_from(row: ApiKeyRow) -> Result<Self, StoreError> {
        Ok(ApiKey {
            id: KeyId::new_unchecked(row.id),
            tenant_id: TenantId(row.tenant_id),
            name: row.name,
            description: row.description,
            environment: parse_environment(&row.environment)?,
            scopes: parse_scopes(&row.scopes)?,
            allowed_cidrs: row.allowed_cidrs,
            created_by: row.created_by,
            create_time: row.create_time,
            update_time: row.update_time,
            last_used_time: row.last_used_time,
            expire_time: row.expire_time,
            revoke_time: row.revoke_time,
            revoke_reason: row.revoke_reason,
            previous_secret_expire_time: row.previous_secret_expire_time,
            rate_limits: LimitOverrides::from_columns(
                row.rate_limit_per_minute,
                row.rate_limit_per_hour,
                row.rate_limit_per_day,
                row.rate_limit_burst,
            ),
        })
    }
}

/// Overrides as limit columns.
fn columns(o: &LimitOverrides) -> [Option<i32>; 4] {
    let col = |v: Option<u32>| v.map(|v| i32::try_from(v).unwrap_or(i32::MAX));
    [
        col(o.per_minute),
        col(o.per_hour),
        col(o.per_day),
        col(o.burst),
    ]
}

fn parse_environment(s: &str) -> Result<Environment, StoreError> {
    Environment::from_db(s)
        .ok_or_else(|| StoreError::Unavailable(format!("unknown environment {s:?} in api_keys")))
}

fn parse_scopes(names: &[String]) -> Result<Scopes, StoreError> {
    Scopes::parse(names)
        .map_err(|e| StoreError::Unavailable(format!("unknown scopes in api_keys: {e:?}")))
}

/// What the verifier needs to decide on a token.
#[derive(Debug, Clone)]
pub struct AuthRecord {
    pub key_id: KeyId,
    pub tenant_id: TenantId,
    pub environment: Environment,
    pub scopes: Scopes,
    pub allowed_cidrs: Vec<IpNetwork>,
    pub secret_hash: String,
    pub previous_secret_hash: Option<String>,
    pub previous_secret_expire_time: Option<DateTime<Utc>>,
    pub expire_time: Option<DateTime<Utc>>,
    pub revoke_time: Option<DateTime<Utc>>,
    pub plan: Plan,
    pub key_limits: LimitOverrides,
    pub tenant_limits: LimitOverrides,
    pub tenant_quotas: QuotaOverrides,
}

/// A key to insert, with the hash of its first secret.
pub struct InsertKey<'a> {
    pub id: &'a KeyId,
    pub tenant_id: TenantId,
    pub new: &'a super::model::NewApiKey,
    pub secret_hash: String,
    pub created_by: String,
    pub now: DateTime<Utc>,
}

/// The keyset-pagination position: the last row of the previous page.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Cursor {
    pub create_time: DateTime<Utc>,
    pub id: String,
}

#[derive(AsChangeset)]
#[diesel(table_name = api_keys)]
struct Changeset {
    name: Option<String>,
    description: Option<String>,
    scopes: Option<Vec<String>>,
    expire_time: Option<Option<DateTime<Utc>>>,
    allowed_cidrs: Option<Vec<IpNetwork>>,
    rate_limit_per_minute: Option<Option<i32>>,
    rate_limit_per_hour: Option<Option<i32>>,
    rate_limit_per_day: Option<Option<i32>>,
    rate_limit_burst: Option<Option<i32>>,
    update_time: DateTime<Utc>,
}

pub async fn insert(
    conn: &mut AsyncPgConnection,
    key: InsertKey<'_>,
) -> Result<ApiKey, StoreError> {
    let [per_minute, per_hour, per_day, burst] = columns(&key.new.rate_limits);
    let row = ApiKeyRow {
        id: key.id.to_string(),
        tenant_id: key.tenant_id.0,
        name: key.new.name.clone(),
        description: key.new.description.clone(),
        environment: key.new.environment.as_str().to_string(),
        scopes: key.new.scopes.to_strings(),
        allowed_cidrs: key.new.allowed_cidrs.clone(),
        secret_hash: key.secret_hash,
        previous_secret_hash: None,
        previous_secret_expire_time: None,
        created_by: key.created_by,
        create_time: key.now,
        update_time: key.now,
        last_used_time: None,
        expire_time: key.new.expire_time,
        revoke_time: None,
        revoke_reason: None,
        rate_limit_per_minute: per_minute,
        rate_limit_per_hour: per_hour,
        rate_limit_per_day: per_day,
        rate_limit_burst: burst,
    };
    let stored: ApiKeyRow = diesel::insert_into(api_keys::table)
        .values(&row)
        .returning(ApiKeyRow::as_returning())
        .get_result(conn)
        .await?;
    stored.try_into()
}

pub async fn get(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    id: &KeyId,
) -> Result<ApiKey, StoreError> {
    let row: ApiKeyRow = api_keys::table
        .filter(api_keys::tenant_id.eq(tenant.0))
        .filter(api_keys::id.eq(id.as_str()))
        .select(ApiKeyRow::as_select())
        .first(conn)
        .await?;
    row.try_into()
}

/// Like [`get`], and locks the row until the transaction ends: an update compares against
/// it to know which fields change (and whether to emit an event at all).
pub async fn get_for_update(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    id: &KeyId,
) -> Result<ApiKey, StoreError> {
    let row: ApiKeyRow = api_keys::table
        .filter(api_keys::tenant_id.eq(tenant.0))
        .filter(api_keys::id.eq(id.as_str()))
        .select(ApiKeyRow::as_select())
        .for_update()
        .first(conn)
        .await?;
    row.try_into()
}

/// One page, newest first, of at most `limit` keys after `after`.
pub async fn list(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    filter: ListFilter,
    after: Option<&Cursor>,
    limit: i64,
    now: DateTime<Utc>,
) -> Result<Vec<ApiKey>, StoreError> {
    let mut query = api_keys::table
        .filter(api_keys::tenant_id.eq(tenant.0))
        .into_boxed();
    if let Some(env) = filter.environment {
        query = query.filter(api_keys::environment.eq(env.as_str()));
    }
    query = match filter.state {
        None => query,
        Some(KeyState::Revoked) => query.filter(api_keys::revoke_time.is_not_null()),
        Some(KeyState::Expired) => query
            .filter(api_keys::revoke_time.is_null())
            .filter(api_keys::expire_time.le(now)),
        Some(KeyState::Active) => query.filter(api_keys::revoke_time.is_null()).filter(
            api_keys::expire_time
                .is_null()
                .or(api_keys::expire_time.gt(now)),
        ),
    };
    if let Some(c) = after {
        query = query.filter(
            api_keys::create_time
                .lt(c.create_time)
                .or(api_keys::create_time
                    .eq(c.create_time)
                    .and(api_keys::id.lt(c.id.clone()))),
        );
    }
    let rows: Vec<ApiKeyRow> = query
        .order((api_keys::create_time.desc(), api_keys::id.desc()))
        .limit(limit)
        .select(ApiKeyRow::as_select())
        .load(conn)
        .await?;
    rows.into_iter().map(ApiKey::try_from).collect()
}

pub async fn update(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    id: &KeyId,
    changes: &ApiKeyChanges,
    now: DateTime<Utc>,
) -> Result<ApiKey, StoreError> {
    let limits = changes.rate_limits.as_ref().map(columns);
    let set = Changeset {
        name: changes.name.clone(),
        description: changes.description.clone(),
        scopes: changes.scopes.as_ref().map(Scopes::to_strings),
        expire_time: changes.expire_time,
        allowed_cidrs: changes.allowed_cidrs.clone(),
        rate_limit_per_minute: limits.map(|l| l[0]),
        rate_limit_per_hour: limits.map(|l| l[1]),
        rate_limit_per_day: limits.map(|l| l[2]),
        rate_limit_burst: limits.map(|l| l[3]),
        update_time: now,
    };
    let row: ApiKeyRow = diesel::update(api_keys::table)
        .filter(api_keys::tenant_id.eq(tenant.0))
        .filter(api_keys::id.eq(id.as_str()))
        .set(&set)
        .returning(ApiKeyRow::as_returning())
        .get_result(conn)
        .await?;
    row.try_into()
}

/// Revokes an active key; a key revoked before keeps its first revoke time and reason.
/// Returns the key and whether this call revoked it (false: it was revoked before).
pub async fn revoke(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    id: &KeyId,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<(ApiKey, bool), StoreError> {
    let updated: Option<ApiKeyRow> = diesel::update(api_keys::table)
        .filter(api_keys::tenant_id.eq(tenant.0))
        .filter(api_keys::id.eq(id.as_str()))
        .filter(api_keys::revoke_time.is_null())
        .set((
            api_keys::revoke_time.eq(now),
            api_keys::revoke_reason.eq(reason),
            api_keys::update_time.eq(now),
        ))
        .returning(ApiKeyRow::as_returning())
        .get_result(conn)
        .await
        .optional()?;
    match updated {
        Some(row) => Ok((row.try_into()?, true)),
        None => Ok((get(conn, tenant, id).await?, false)),
    }
}

/// Replaces the secret hash; the old one keeps working until `previous_until` (or stops
/// now when `None`). Only an unrevoked key rotates; `NotFound` otherwise.
pub async fn rotate(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    id: &KeyId,
    new_hash: &str,
    previous_until: Option<DateTime<Utc>>,
    end_grace: bool,
    now: DateTime<Utc>,
) -> Result<ApiKey, StoreError> {
    // Compare-and-swap: unless the caller ends it explicitly, a rotated-out secret still
    // in its grace period blocks the update, so of two concurrent rotations the second
    // matches no row (under READ COMMITTED it re-checks the row the first one changed)
    // instead of silently cutting the first one's grace short.
    let grace_may_end_before = if end_grace {
        DateTime::<Utc>::MAX_UTC
    } else {
        now
    };
    let target = api_keys::table
        .filter(api_keys::tenant_id.eq(tenant.0))
        .filter(api_keys::id.eq(id.as_str()))
        .filter(api_keys::revoke_time.is_null())
        .filter(
            api_keys::previous_secret_expire_time
                .is_null()
                .or(api_keys::previous_secret_expire_time.le(grace_may_end_before)),
        );
    let row: ApiKeyRow = match previous_until {
        Some(until) => {
            diesel::update(target)
                .set((
                    api_keys::previous_secret_hash.eq(api_keys::secret_hash.nullable()),
                    api_keys::previous_secret_expire_time.eq(until),
                    api_keys::secret_hash.eq(new_hash),
                    api_keys::update_time.eq(now),
                ))
                .returning(ApiKeyRow::as_returning())
                .get_result(conn)
                .await?
        }
        None => {
            diesel::update(target)
                .set((
                    api_keys::previous_secret_hash.eq(None::<String>),
                    api_keys::previous_secret_expire_time.eq(None::<DateTime<Utc>>),
                    api_keys::secret_hash.eq(new_hash),
                    api_keys::update_time.eq(now),
                ))
                .returning(ApiKeyRow::as_returning())
                .get_result(conn)
                .await?
        }
    };
    row.try_into()
}

/// Deletes the key and returns it as it was (its `api_key.deleted` event names it).
pub async fn delete(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    id: &KeyId,
) -> Result<ApiKey, StoreError> {
    let row: ApiKeyRow = diesel::delete(
        api_keys::table
            .filter(api_keys::tenant_id.eq(tenant.0))
            .filter(api_keys::id.eq(id.as_str())),
    )
    .returning(ApiKeyRow::as_returning())
    .get_result(conn)
    .await?;
    row.try_into()
}

/// The verifier's lookup, by key id alone, with the tenant's plan and limits.
pub async fn find_for_auth(
    conn: &mut AsyncPgConnection,
    id: &KeyId,
) -> Result<Option<AuthRecord>, StoreError> {
    #[derive(Queryable)]
    struct Row {
        id: String,
        tenant_id: Uuid,
        environment: String,
        scopes: Vec<String>,
        allowed_cidrs: Vec<IpNetwork>,
        secret_hash: String,
        previous_secret_hash: Option<String>,
        previous_secret_expire_time: Option<DateTime<Utc>>,
        expire_time: Option<DateTime<Utc>>,
        revoke_time: Option<DateTime<Utc>>,
        key_limits: (Option<i32>, Option<i32>, Option<i32>, Option<i32>),
        plan: String,
        tenant_limits: (Option<i32>, Option<i32>, Option<i32>, Option<i32>),
        tenant_quotas: (Option<i64>, Option<i64>),
    }
    let row: Option<Row> = api_keys::table
        .inner_join(tenants::table)
        .filter(api_keys::id.eq(id.as_str()))
        .select((
            api_keys::id,
            api_keys::tenant_id,
            api_keys::environment,
            api_keys::scopes,
            api_keys::allowed_cidrs,
            api_keys::secret_hash,
            api_keys::previous_secret_hash,
            api_keys::previous_secret_expire_time,
            api_keys::expire_time,
            api_keys::revoke_time,
            (
                api_keys::rate_limit_per_minute,
                api_keys::rate_limit_per_hour,
                api_keys::rate_limit_per_day,
                api_keys::rate_limit_burst,
            ),
            tenants::plan,
            (
                tenants::rate_limit_per_minute,
                tenants::rate_limit_per_hour,
                tenants::rate_limit_per_day,
                tenants::rate_limit_burst,
            ),
            (
                tenants::quota_monthly_requests,
                tenants::quota_monthly_generations,
            ),
        ))
        .first(conn)
        .await
        .optional()?;
    row.map(|r| {
        let (km, kh, kd, kb) = r.key_limits;
        let (tm, th, td, tb) = r.tenant_limits;
        Ok(AuthRecord {
            key_id: KeyId::new_unchecked(r.id),
            tenant_id: TenantId(r.tenant_id),
            environment: parse_environment(&r.environment)?,
            scopes: parse_scopes(&r.scopes)?,
            allowed_cidrs: r.allowed_cidrs,
            secret_hash: r.secret_hash,
            previous_secret_hash: r.previous_secret_hash,
            previous_secret_expire_time: r.previous_secret_expire_time,
            expire_time: r.expire_time,
            revoke_time: r.revoke_time,
            plan: crate::tenants::store::parse_plan(&r.plan)?,
            key_limits: LimitOverrides::from_columns(km, kh, kd, kb),
            tenant_limits: LimitOverrides::from_columns(tm, th, td, tb),
            tenant_quotas: QuotaOverrides::from_columns(r.tenant_quotas.0, r.tenant_quotas.1),
        })
    })
    .transpose()
}

/// Writes a batch of last-use times in one statement; a time never moves backwards.
pub async fn touch_last_used(
    conn: &mut AsyncPgConnection,
    batch: &[(KeyId, DateTime<Utc>)],
) -> Result<usize, StoreError> {
    use diesel::sql_types::{Array, Text, Timestamptz};
    if batch.is_empty() {
        return Ok(0);
    }
    let ids: Vec<String> = batch.iter().map(|(id, _)| id.to_string()).collect();
    let times: Vec<DateTime<Utc>> = batch.iter().map(|(_, t)| *t).collect();
    Ok(diesel::sql_query(
        "UPDATE api_keys AS k SET last_used_time = GREATEST(k.last_used_time, u.t) \
         FROM unnest($1::text[], $2::timestamptz[]) AS u(id, t) WHERE k.id = u.id",
    )
    .bind::<Array<Text>, _>(ids)
    .bind::<Array<Timestamptz>, _>(times)
    .execute(conn)
    .await?)
}

/// Drops the hashes of rotated-out secrets whose grace period has ended.
pub async fn purge_expired_previous_secrets(
    conn: &mut AsyncPgConnection,
    now: DateTime<Utc>,
) -> Result<usize, StoreError> {
    Ok(
        diesel::update(api_keys::table.filter(api_keys::previous_secret_expire_time.le(now)))
            .set((
                api_keys::previous_secret_hash.eq(None::<String>),
                api_keys::previous_secret_expire_time.eq(None::<DateTime<Utc>>),
            ))
            .execute(conn)
            .await?,
    )
}

/// At most `limit` live keys of any tenant expiring in `(now, until]` that have no
/// `api_key.expiring` notice for their current expire_time, soonest first.
pub async fn expiring_without_notice(
    conn: &mut AsyncPgConnection,
    now: DateTime<Utc>,
    until: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<ApiKey>, StoreError> {
    let noticed = api_key_expiring_notices::table
        .filter(api_key_expiring_notices::api_key_id.eq(api_keys::id))
        .filter(
            api_key_expiring_notices::expire_time
                .nullable()
                .eq(api_keys::expire_time),
        );
    let rows: Vec<ApiKeyRow> = api_keys::table
        .filter(api_keys::revoke_time.is_null())
        .filter(api_keys::expire_time.gt(now))
        .filter(api_keys::expire_time.le(until))
        .filter(diesel::dsl::not(diesel::dsl::exists(noticed)))
        .order((api_keys::expire_time.asc(), api_keys::id.asc()))
        .limit(limit)
        .select(ApiKeyRow::as_select())
        .load(conn)
        .await?;
    rows.into_iter().map(ApiKey::try_from).collect()
}

/// Records the `api_key.expiring` notice of key `id` for `expire_time`; false if it was
/// already recorded (by this or another worker).
pub async fn insert_expiring_notice(
    conn: &mut AsyncPgConnection,
    id: &KeyId,
    expire_time: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let inserted = diesel::insert_into(api_key_expiring_notices::table)
        .values((
            api_key_expiring_notices::api_key_id.eq(id.as_str()),
            api_key_expiring_notices::expire_time.eq(expire_time),
        ))
        .on_conflict_do_nothing()
        .execute(conn)
        .await?;
    Ok(inserted == 1)
}
