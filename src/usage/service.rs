//! The UsageService rules: tenancy and scopes, default periods, plans and credits.

use std::sync::Arc;

use chrono::{DateTime, Datelike, TimeZone, Utc};
use uuid::Uuid;

use super::{
    BreakdownRow, GroupBy, LogFilter, RequestRecord, UsageStore, UsageSummary, store::MeteredRecord,
};
use crate::{
    api_keys::invalidation::Invalidations,
    api_keys::verifier::KeyVerifier,
    auth::{AuthError, Principal, Scope},
    credits::{CreditError, Credits, LedgerEntry},
    db::StoreError,
    ratelimit::{
        Decision, LimitOverrides, Limits, Metric, PlanLimits, PlanQuotas, QuotaOverrides,
        QuotaUsage, RateLimitError, RateLimiter,
    },
    tenants::{Plan, TenantDirectory, TenantId, TenantRecord},
    validation::Violations,
};

/// Everything that can go wrong in this module; mapped to a gRPC status in `crate::status`.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("invalid request: {0}")]
    Invalid(Violations),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Credits(#[from] CreditError),
    #[error(transparent)]
    RateLimit(#[from] RateLimitError),
}

impl From<Violations> for UsageError {
    fn from(v: Violations) -> Self {
        UsageError::Invalid(v)
    }
}

/// What GetUsageSummary answers.
pub struct Summary {
    pub calls: UsageSummary,
    pub credits_used: i64,
    /// (metric, quantity), by metric.
    pub metered: Vec<(String, i64)>,
}

/// A tenant's limits and where it stands: the windows are a key's (peeked, nothing spent).
pub struct QuotaStatus {
    pub plan: Plan,
    pub limits: Limits,
    pub windows: Option<Decision>,
    pub credit_balance: i64,
    /// Empty while Redis is unreachable.
    pub quotas: Vec<QuotaUsage>,
}

pub struct Usage {
    store: UsageStore,
    credits: Credits,
    tenants: TenantDirectory,
    limiter: Arc<RateLimiter>,
    plans: PlanLimits,
    plan_quotas: PlanQuotas,
    verifier: Arc<KeyVerifier>,
    invalidations: Invalidations,
}

impl Usage {
    pub fn new(
        store: UsageStore,
        credits: Credits,
        tenants: TenantDirectory,
        limiter: Arc<RateLimiter>,
        (plans, plan_quotas): (PlanLimits, PlanQuotas),
        verifier: Arc<KeyVerifier>,
        invalidations: Invalidations,
    ) -> Self {
        Self {
            plan_quotas,
            store,
            credits,
            tenants,
            limiter,
            plans,
            verifier,
            invalidations,
        }
    }

    /// Totals, the credits spent and the metered usage in the period.
    pub async fn summary(
        &self,
        principal: &Principal,
        period: Period,
    ) -> Result<Summary, UsageError> {
        let tenant = principal.tenant_with(Scope::UsageRead)?;
        let (calls, credits_used, metered) = tokio::try_join!(
            async {
                Ok::<_, UsageError>(self.store.summary(tenant, period.from, period.to).await?)
            },
            async {
                Ok::<_, UsageError>(self.credits.spent(tenant, period.from, period.to).await?)
            },
            async {
                Ok::<_, UsageError>(
                    self.store
                        .metered_totals(tenant, period.from, period.to)
                        .await?,
                )
            },
        )?;
        Ok(Summary {
            calls,
            credits_used,
            metered,
        })
    }

    /// Internal: metered usage from another service, counted once per idempotency id.
    pub async fn record_metered(
        &self,
        principal: &Principal,
        record: &MeteredRecord<'_>,
    ) -> Result<bool, UsageError> {
        principal.require_internal()?;
        self.tenants.ensure(record.tenant).await?;
        Ok(self.store.record_metered(record).await?)
    }

    pub async fn breakdown(
        &self,
        principal: &Principal,
        period: Period,
        group_by: GroupBy,
        limit: i64,
        after: Option<&str>,
    ) -> Result<Vec<BreakdownRow>, UsageError> {
        let tenant = principal.tenant_with(Scope::UsageRead)?;
        Ok(self
            .store
            .breakdown(tenant, period.from, period.to, group_by, limit, after)
            .await?)
    }

    pub async fn list(
        &self,
        principal: &Principal,
        filter: &LogFilter,
        limit: i64,
        before: Option<(DateTime<Utc>, Uuid)>,
    ) -> Result<Vec<RequestRecord>, UsageError> {
        let tenant = principal.tenant_with(Scope::UsageRead)?;
        Ok(self.store.list(tenant, filter, limit, before).await?)
    }

    pub async fn quota_status(&self, principal: &Principal) -> Result<QuotaStatus, UsageError> {
        let tenant = principal.tenant_with(Scope::UsageRead)?;
        let credit_balance = self.credits.balance(tenant).await?;
        let (plan, limits, quota_limits, windows) = match principal {
            Principal::ApiKey(key) => {
                // Cost 0: reads the buckets without spending (the call itself paid one).
                let windows = self
                    .limiter
                    .check(key.tenant_id, key.key_id.as_str(), &key.limits, 0)
                    .await?;
                (key.plan, key.limits, key.quotas, Some(windows))
            }
            _ => {
                let record = self.tenants.get(tenant).await?;
                let limits = record.limits.apply(self.plans.of(record.plan));
                (
                    record.plan,
                    limits,
                    record.quotas.apply(self.plan_quotas.of(record.plan)),
                    None,
                )
            }
        };
        let counters = self.limiter.quotas();
        let (requests, generations) = tokio::join!(
            counters.read(tenant, Metric::Requests, quota_limits.monthly_requests),
            counters.read(
                tenant,
                Metric::Generations,
                quota_limits.monthly_generations
            ),
        );
        let quotas = requests.into_iter().chain(generations).collect();
        Ok(QuotaStatus {
            plan,
            limits,
            windows,
            credit_balance,
            quotas,
        })
    }

    /// Internal: a tenant's plan and own limits; every replica re-reads its keys' limits.
    pub async fn set_plan(
        &self,
        principal: &Principal,
        tenant: TenantId,
        plan: Plan,
        limits: LimitOverrides,
        quotas: QuotaOverrides,
    ) -> Result<TenantRecord, UsageError> {
        principal.require_internal()?;
        let mut v = Violations::new();
        for (field, why) in limits.apply(self.plans.of(plan)).inconsistencies() {
            v.add(
                format!("rate_limits.{field}"),
                format!(
                    "{why} (burst ≤ per_minute ≤ per_hour ≤ per_day; unset fields follow the plan)"
                ),
            );
        }
        v.into_result(())?;
        let record = self
            .tenants
            .set_plan(tenant, plan, limits, quotas, &principal.actor())
            .await?;
        self.verifier.invalidate_tenant(tenant);
        self.invalidations.publish_tenant(tenant).await;
        tracing::info!(tenant = %tenant, plan = plan.as_str(), actor = %principal.actor(), "plan set");
        Ok(record)
    }

    /// Internal: adds credits, once per idempotency id.
    pub async fn grant_credits(
        &self,
        principal: &Principal,
        tenant: TenantId,
        amount: i64,
        reason: &str,
        reference: &str,
        idempotency_id: &str,
    ) -> Result<LedgerEntry, UsageError> {
        principal.require_internal()?;
        self.tenants.ensure(tenant).await?;
        Ok(self
            .credits
            .grant_as(
                &principal.actor(),
                tenant,
                amount,
                reason,
                reference,
                idempotency_id,
            )
            .await?)
    }
}

/// `[from, to)`.
#[derive(Debug, Clone, Copy)]
pub struct Period {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

impl Period {
    /// Defaults: from the start of the current UTC month, to now.
    pub fn new(
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
        v: &mut Violations,
    ) -> Period {
        let now = Utc::now();
        let month_start = Utc
            .with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
            .single()
            .unwrap_or(now);
        let period = Period {
            from: from.unwrap_or(month_start),
            to: to.unwrap_or(now),
        };
        v.check(
            period.from < period.to,
            "start_time",
            "must be before end_time",
        );
        v.check(
            period.to - period.from <= chrono::Duration::days(400),
            "end_time",
            "a period spans at most 400 days",
        );
        period
    }
}
