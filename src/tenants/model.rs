//! A tenant as the features see it.

use chrono::{DateTime, Utc};

use crate::{
    identity::{Plan, TenantId},
    ratelimit::{LimitOverrides, QuotaOverrides},
};

/// A tenant's plan and its own limits.
#[derive(Debug, Clone)]
pub struct TenantRecord {
    pub id: TenantId,
    pub plan: Plan,
    pub limits: LimitOverrides,
    pub quotas: QuotaOverrides,
    pub create_time: DateTime<Utc>,
    pub update_time: DateTime<Utc>,
    /// Who set the plan last (`service:<caller>`); None until SetPlan is called.
    pub plan_updated_by: Option<String>,
}
