//! The tenant directory: creates tenant rows on first sight and reads and sets plans,
//! over [`super::store`].

use std::time::Duration;

use super::{model::TenantRecord, store};
use crate::{
    db::{self, PgPool, StoreError},
    identity::{Plan, TenantId},
    ratelimit::{LimitOverrides, QuotaOverrides},
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
        store::ensure(&mut *db::connect(&self.pool).await?, tenant).await?;
        self.known.insert(tenant, ()).await;
        Ok(())
    }

    /// The tenant's plan and limits; a tenant never seen yet is on the free plan.
    pub async fn get(&self, tenant: TenantId) -> Result<TenantRecord, StoreError> {
        self.ensure(tenant).await?;
        store::get(&mut *db::connect(&self.pool).await?, tenant).await
    }

    /// Sets the plan and the tenant's own limits (creating the tenant if needed).
    pub async fn set_plan(
        &self,
        tenant: TenantId,
        plan: Plan,
        limits: LimitOverrides,
        quotas: QuotaOverrides,
        actor: &str,
    ) -> Result<TenantRecord, StoreError> {
        let mut conn = db::connect(&self.pool).await?;
        let record = store::set_plan(&mut conn, tenant, plan, limits, quotas, actor).await?;
        self.known.insert(tenant, ()).await;
        Ok(record)
    }
}
