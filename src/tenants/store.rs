//! Tenants in Postgres: the tenant row, its plan and its own limits.

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::model::TenantRecord;
use crate::{
    db::{StoreError, schema::tenants},
    identity::{Plan, TenantId},
    ratelimit::{LimitOverrides, QuotaOverrides},
};

#[derive(Queryable, Selectable)]
#[diesel(table_name = tenants, check_for_backend(diesel::pg::Pg))]
struct TenantRow {
    id: Uuid,
    plan: String,
    rate_limit_per_minute: Option<i32>,
    rate_limit_per_hour: Option<i32>,
    rate_limit_per_day: Option<i32>,
    rate_limit_burst: Option<i32>,
    quota_monthly_requests: Option<i64>,
    quota_monthly_generations: Option<i64>,
    create_time: chrono::DateTime<chrono::Utc>,
    update_time: chrono::DateTime<chrono::Utc>,
    plan_updated_by: Option<String>,
}

fn record(row: TenantRow) -> Result<TenantRecord, StoreError> {
    Ok(TenantRecord {
        id: TenantId(row.id),
        plan: parse_plan(&row.plan)?,
        limits: LimitOverrides::from_columns(
            row.rate_limit_per_minute,
            row.rate_limit_per_hour,
            row.rate_limit_per_day,
            row.rate_limit_burst,
        ),
        quotas: QuotaOverrides::from_columns(
            row.quota_monthly_requests,
            row.quota_monthly_generations,
        ),
        create_time: row.create_time,
        update_time: row.update_time,
        plan_updated_by: row.plan_updated_by,
    })
}

/// Creates the tenant row unless it exists (idempotent, safe under races).
pub async fn ensure(conn: &mut AsyncPgConnection, tenant: TenantId) -> Result<(), StoreError> {
    diesel::insert_into(tenants::table)
        .values(tenants::id.eq(tenant.0))
        .on_conflict_do_nothing()
        .execute(conn)
        .await?;
    Ok(())
}

/// The tenant's plan and limits; `NotFound` before [`ensure`].
pub async fn get(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
) -> Result<TenantRecord, StoreError> {
    let row: TenantRow = tenants::table
        .filter(tenants::id.eq(tenant.0))
        .select(TenantRow::as_select())
        .first(conn)
        .await?;
    record(row)
}

/// Sets the plan and the tenant's own limits, creating the tenant row if needed.
pub async fn set_plan(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    plan: Plan,
    limits: LimitOverrides,
    quotas: QuotaOverrides,
    actor: &str,
) -> Result<TenantRecord, StoreError> {
    let col = |v: Option<u32>| v.map(|v| i32::try_from(v).unwrap_or(i32::MAX));
    let quota = |v: Option<u64>| v.map(|v| i64::try_from(v).unwrap_or(i64::MAX));
    let changes = (
        tenants::plan.eq(plan.as_str()),
        tenants::rate_limit_per_minute.eq(col(limits.per_minute)),
        tenants::rate_limit_per_hour.eq(col(limits.per_hour)),
        tenants::rate_limit_per_day.eq(col(limits.per_day)),
        tenants::rate_limit_burst.eq(col(limits.burst)),
        tenants::quota_monthly_requests.eq(quota(quotas.monthly_requests)),
        tenants::quota_monthly_generations.eq(quota(quotas.monthly_generations)),
        tenants::update_time.eq(chrono::Utc::now()),
        tenants::plan_updated_by.eq(actor),
    );
    let row: TenantRow = diesel::insert_into(tenants::table)
        .values((tenants::id.eq(tenant.0), changes))
        .on_conflict(tenants::id)
        .do_update()
        .set(changes)
        .returning(TenantRow::as_returning())
        .get_result(conn)
        .await?;
    record(row)
}

/// A stored plan name; an unknown one means the database is ahead of this binary.
pub(crate) fn parse_plan(name: &str) -> Result<Plan, StoreError> {
    name.parse()
        .map_err(|e| StoreError::Unavailable(format!("{e} in tenants table")))
}
