//! Tenants: the isolation boundary. A tenant row is created on first authenticated use by
//! one of its users; every other table is filtered by the principal's tenant.

use std::{fmt, str::FromStr, time::Duration};

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use uuid::Uuid;

use crate::db::{PgPool, StoreError, schema::tenants};

/// A tenant's id (a UUID chosen by the platform's auth service).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(pub Uuid);

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for TenantId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(TenantId)
    }
}

/// A tenant's commercial plan, stored as its lowercase name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Plan {
    Free,
    Standard,
    Professional,
    Business,
    Enterprise,
}

impl Plan {
    pub fn as_str(self) -> &'static str {
        match self {
            Plan::Free => "free",
            Plan::Standard => "standard",
            Plan::Professional => "professional",
            Plan::Business => "business",
            Plan::Enterprise => "enterprise",
        }
    }
}

impl FromStr for Plan {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "free" => Plan::Free,
            "standard" => Plan::Standard,
            "professional" => Plan::Professional,
            "business" => Plan::Business,
            "enterprise" => Plan::Enterprise,
            other => {
                return Err(StoreError::Unavailable(format!(
                    "unknown plan {other:?} in tenants table"
                )));
            }
        })
    }
}

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
