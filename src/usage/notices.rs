//! `usage.quota.warning` (80 %) and `usage.quota.exceeded`: sent at most once per tenant,
//! quota and month, however many replicas count calls at once.
//!
//! The limiter detects a crossing from the counter value its quota check already returns
//! (before < level ≤ after: exactly one call sees it) and hands it to [`QuotaNotices`], which
//! writes the event on a spawned task, so no call waits for Postgres. A `quota_notices` row
//! is inserted in the transaction of the event (ON CONFLICT DO NOTHING: no row, no event),
//! which makes every sender idempotent — and lets the worker's check after each quota
//! reconciliation send what a crossing could not (Postgres down, process stopped, a counter
//! restored past a level).

use std::{collections::HashSet, sync::Arc};

use chrono::{DateTime, SecondsFormat, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};
use futures_util::StreamExt;
use serde_json::json;
use uuid::Uuid;

use crate::{
    db::{
        self, PgPool, StoreError,
        schema::{quota_notices, tenants},
    },
    events::{EventError, emitter::Emitter},
    identity::{Plan, TenantId},
    ratelimit::{
        Crossing, CrossingSink, Metric, PlanQuotas, QuotaLevel, QuotaOverrides, Quotas,
        quota::{ReconciledMonth, WARNING_PERCENT, levels_reached, month_bounds},
    },
};

/// Counters the worker's check reads at once.
const READ_CONCURRENCY: usize = 64;

/// Sending fails only on Postgres or the catalog; the worker's next check retries
/// (worker and background only, never a gRPC status).
#[derive(Debug, thiserror::Error)]
pub enum QuotaNoticeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Event(#[from] EventError),
}

/// Lets diesel-async transactions return this error directly.
impl From<diesel::result::Error> for QuotaNoticeError {
    fn from(e: diesel::result::Error) -> Self {
        QuotaNoticeError::Store(e.into())
    }
}

pub fn event_type(level: QuotaLevel) -> &'static str {
    match level {
        QuotaLevel::Warning => "usage.quota.warning",
        QuotaLevel::Exceeded => "usage.quota.exceeded",
    }
}

/// Cheap to clone: the hot path clones it into each spawned send.
#[derive(Clone)]
pub struct QuotaNotices {
    pool: PgPool,
    emitter: Arc<Emitter>,
    /// To know a tenant's limits in the worker's check (the hot path passes its own).
    plans: PlanQuotas,
}

/// The hot path's side: one spawned send per crossing (a handful per tenant and month).
impl CrossingSink for QuotaNotices {
    fn crossed(&self, c: Crossing) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this
                .record(c.tenant, c.metric, c.month, c.limit, c.used, &c.levels)
                .await
            {
                tracing::warn!(tenant = %c.tenant, quota = c.metric.as_str(), error = %e,
                    "quota notice not sent; the worker's quota check will send it");
            }
        });
    }
}

impl QuotaNotices {
    pub fn new(pool: PgPool, emitter: Arc<Emitter>, plans: PlanQuotas) -> Self {
        Self {
            pool,
            emitter,
            plans,
        }
    }

    /// Sends the notices of `levels` for the quota of `month` unless already sent, each with
    /// its `quota_notices` row, in one transaction. Returns how many events it appended.
    pub async fn record(
        &self,
        tenant: TenantId,
        metric: Metric,
        month: DateTime<Utc>,
        limit: u64,
        used: u64,
        levels: &[QuotaLevel],
    ) -> Result<usize, QuotaNoticeError> {
        if levels.is_empty() {
            return Ok(0);
        }
        // Loaded before the transaction: no connection is held while schemas compile.
        self.emitter.catalog().await?;
        let (start, end) = month_bounds(month);
        let mut conn = db::connect(&self.pool).await?;
        conn.transaction::<_, QuotaNoticeError, _>(async |c| {
            crate::tenants::store::ensure(c, tenant).await?;
            let mut plan: Option<Plan> = None;
            let mut appended = 0;
            for level in levels {
                let inserted = diesel::insert_into(quota_notices::table)
                    .values((
                        quota_notices::tenant_id.eq(tenant.0),
                        quota_notices::metric.eq(metric.as_str()),
                        quota_notices::month.eq(start.date_naive()),
                        quota_notices::level.eq(level.as_str()),
                        quota_notices::quota_limit.eq(as_i64(limit)),
                        quota_notices::used.eq(as_i64(used)),
                    ))
                    .on_conflict_do_nothing()
                    .execute(c)
                    .await?;
                if inserted == 0 {
                    continue;
                }
                let plan = match plan {
                    Some(p) => p,
                    None => *plan.insert(crate::tenants::store::get(c, tenant).await?.plan),
                };
                let payload = payload(*level, metric, limit, used, (start, end), plan);
                self.emitter
                    .emit(c, tenant, event_type(*level), payload)
                    .await?;
                appended += 1;
            }
            Ok(appended)
        })
        .await
    }

    /// The worker's check, after a reconciliation pass of `quotas`: every tenant with
    /// requests this month whose counters (or, while Redis is down, Postgres's count of
    /// requests) have reached a level without its notice gets it now. Generations are made
    /// by API-key calls, so their tenants are among these. Returns the events appended.
    pub async fn check(&self, quotas: &Quotas) -> Result<usize, QuotaNoticeError> {
        let (month, _) = month_bounds(Utc::now());
        let Some(ReconciledMonth {
            month: counted,
            totals,
        }) = quotas.reconciled().await
        else {
            return Ok(0);
        };
        if counted != month || totals.is_empty() {
            return Ok(0);
        }
        let ids: Vec<Uuid> = totals.keys().map(|t| t.0).collect();
        let (rows, sent) = {
            let mut conn = db::connect(&self.pool).await?;
            let rows: Vec<TenantQuotaRow> = tenants::table
                .filter(tenants::id.eq_any(&ids))
                .select(TenantQuotaRow::as_select())
                .load(&mut conn)
                .await?;
            let sent: Vec<(Uuid, String, String)> = quota_notices::table
                .filter(quota_notices::month.eq(month.date_naive()))
                .filter(quota_notices::tenant_id.eq_any(&ids))
                .select((
                    quota_notices::tenant_id,
                    quota_notices::metric,
                    quota_notices::level,
                ))
                .load(&mut conn)
                .await?;
            (rows, sent)
        };
        let sent: HashSet<(Uuid, String, String)> = sent.into_iter().collect();
        let is_sent = |tenant: TenantId, metric: Metric, level: QuotaLevel| {
            sent.contains(&(
                tenant.0,
                metric.as_str().to_string(),
                level.as_str().to_string(),
            ))
        };
        let mut candidates = Vec::new();
        for row in rows {
            let plan = crate::tenants::store::parse_plan(&row.plan)?;
            let limits = QuotaOverrides::from_columns(
                row.quota_monthly_requests,
                row.quota_monthly_generations,
            )
            .apply(self.plans.of(plan));
            let tenant = TenantId(row.id);
            for (metric, limit) in [
                (Metric::Requests, limits.monthly_requests),
                (Metric::Generations, limits.monthly_generations),
            ] {
                if !QuotaLevel::ALL.iter().all(|l| is_sent(tenant, metric, *l)) {
                    candidates.push((tenant, metric, limit));
                }
            }
        }
        let totals = &totals;
        let counted = futures_util::stream::iter(candidates)
            .map(|(tenant, metric, limit)| async move {
                let in_redis = quotas.read(tenant, metric, limit).await.map(|u| u.used);
                let logged = match metric {
                    Metric::Requests => totals.get(&tenant).copied().unwrap_or(0),
                    Metric::Generations => 0,
                };
                (tenant, metric, limit, in_redis.unwrap_or(0).max(logged))
            })
            .buffer_unordered(READ_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        let mut appended = 0;
        for (tenant, metric, limit, used) in counted {
            let mut levels = levels_reached(used, limit);
            levels.retain(|l| !is_sent(tenant, metric, *l));
            appended += self
                .record(tenant, metric, month, limit, used, &levels)
                .await?;
        }
        Ok(appended)
    }
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = tenants, check_for_backend(diesel::pg::Pg))]
struct TenantQuotaRow {
    id: Uuid,
    plan: String,
    quota_monthly_requests: Option<i64>,
    quota_monthly_generations: Option<i64>,
}

fn as_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The catalog's `usage.quota.*` payload (`threshold_percent` only in the warning).
fn payload(
    level: QuotaLevel,
    metric: Metric,
    limit: u64,
    used: u64,
    (start, end): (DateTime<Utc>, DateTime<Utc>),
    plan: Plan,
) -> serde_json::Value {
    let time = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Secs, true);
    let mut p = json!({
        "quota": metric.as_str(),
        "limit": limit,
        "used": used,
        "period_start": time(start),
        "period_end": time(end),
        "plan": plan.as_str(),
    });
    if level == QuotaLevel::Warning {
        p["threshold_percent"] = WARNING_PERCENT.into();
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_name_the_period_and_plan() {
        let start = "2026-11-01T00:00:00Z".parse().unwrap();
        let end = "2026-12-01T00:00:00Z".parse().unwrap();
        let p = payload(
            QuotaLevel::Warning,
            Metric::Requests,
            100,
            80,
            (start, end),
            Plan::Standard,
        );
        assert_eq!(
            p,
            json!({"quota": "monthly_requests", "limit": 100, "used": 80,
                   "period_start": "2026-11-01T00:00:00Z", "period_end": "2026-12-01T00:00:00Z",
                   "plan": "standard", "threshold_percent": 80})
        );
        let p = payload(
            QuotaLevel::Exceeded,
            Metric::Generations,
            5,
            5,
            (start, end),
            Plan::Free,
        );
        assert!(p.get("threshold_percent").is_none());
        assert_eq!(p["quota"], "monthly_generations");
    }
}
