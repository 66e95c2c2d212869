//! Tenants: the isolation boundary. A tenant row is created on first authenticated use by
//! one of its users; every other table is filtered by the principal's tenant.

use std::time::Duration;

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use uuid::Uuid;

use crate::{
    db::{PgPool, StoreError, schema::tenants},
    identity::{Plan, TenantId},
};

/// Creates tenant rows on first sight, remembering which exist so the hot path does not
/// write on every call.
#[derive(Clone)]
pub struct TenantDirectory {
    pool: PgPool,
    known: moka::future::Cache<TenantId, ()>,
}

impl TenantDirectory {
    pub fn new(pool: PgPool) -> Self {
        let known = moka::future::Cache::builder()
            .max_capacity(100_000)
            .time_to_live(Duration::from_secs(3600))
            .build();
        Self { pool, known }
    }

    /// Makes sure the tenant row exists (idempotent, safe under races).
    pub async fn ensure(&self, tenant: TenantId) -> Result<(), StoreError> {
        if self.known.contains_key(&tenant) {
            return Ok(());
        }
        let mut conn = self.pool.get().await?;
        diesel::insert_into(tenants::table)
            .values(tenants::id.eq(tenant.0))
            .on_conflict_do_nothing()
            .execute(&mut conn)
            .await?;
        self.known.insert(tenant, ()).await;
        Ok(())
    }
}

/// A tenant's plan and its own limits.
#[derive(Debug, Clone)]
pub struct TenantRecord {
    pub id: TenantId,
    pub plan: Plan,
    pub limits: crate::ratelimit::LimitOverrides,
    pub quotas: crate::ratelimit::QuotaOverrides,
    pub create_time: chrono::DateTime<chrono::Utc>,
    pub update_time: chrono::DateTime<chrono::Utc>,
    /// Who set the plan last (`service:<caller>`); None until SetPlan is called.
    pub plan_updated_by: Option<String>,
}

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
    use crate::api_keys::store::{overrides, quota_overrides};
    Ok(TenantRecord {
        id: TenantId(row.id),
        plan: parse_plan(&row.plan)?,
        limits: overrides(
            row.rate_limit_per_minute,
            row.rate_limit_per_hour,
            row.rate_limit_per_day,
            row.rate_limit_burst,
        ),
        quotas: quota_overrides(row.quota_monthly_requests, row.quota_monthly_generations),
        create_time: row.create_time,
        update_time: row.update_time,
        plan_updated_by: row.plan_updated_by,
    })
}

impl TenantDirectory {
    /// The tenant's plan and limits; a tenant never seen yet is on the free plan.
    pub async fn get(&self, tenant: TenantId) -> Result<TenantRecord, StoreError> {
        self.ensure(tenant).await?;
        let mut conn = self.pool.get().await?;
        let row: TenantRow = tenants::table
            .filter(tenants::id.eq(tenant.0))
            .select(TenantRow::as_select())
            .first(&mut conn)
            .await?;
        record(row)
    }

    /// Sets the plan and the tenant's own limits (creating the tenant if needed).
    pub async fn set_plan(
        &self,
        tenant: TenantId,
        plan: Plan,
        limits: crate::ratelimit::LimitOverrides,
        quotas: crate::ratelimit::QuotaOverrides,
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
        let mut conn = self.pool.get().await?;
        let row: TenantRow = diesel::insert_into(tenants::table)
            .values((tenants::id.eq(tenant.0), changes))
            .on_conflict(tenants::id)
            .do_update()
            .set(changes)
            .returning(TenantRow::as_returning())
            .get_result(&mut conn)
            .await?;
        self.known.insert(tenant, ()).await;
        record(row)
    }
}

/// A stored plan name; an unknown one means the database is ahead of this binary.
pub(crate) fn parse_plan(name: &str) -> Result<Plan, StoreError> {
    name.parse()
        .map_err(|e| StoreError::Unavailable(format!("{e} in tenants table")))
}
