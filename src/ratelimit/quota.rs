//! Monthly quotas per tenant (API-key requests, generations), counted in Redis on the hot
//! path and reconciled from Postgres by the worker, so a Redis restart loses at most the
//! calls since the last reconciliation.

use std::{collections::HashMap, fmt, str::FromStr, sync::Arc, time::Duration};

use chrono::{DateTime, Datelike, TimeZone, Utc};
use futures_util::StreamExt;

use crate::{
    db::{PgPool, StoreError},
    identity::{Plan, TenantId},
    kv::{OutageLog, Redis},
};

/// Counts, refusing an increment that would pass the limit (and then taking it back).
/// KEYS[1] the counter; ARGV: amount, limit, expiry (ms since the epoch).
/// Returns {allowed (1/0), used after the call}.
const CONSUME: &str = r"
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
if n == tonumber(ARGV[1]) then redis.call('PEXPIREAT', KEYS[1], ARGV[3]) end
if n > tonumber(ARGV[2]) then
  redis.call('DECRBY', KEYS[1], ARGV[1])
  return {0, n - tonumber(ARGV[1])}
end
return {1, n}";

/// Raises a counter to at least ARGV[1] (never lowers it). KEYS[1]; ARGV: count, expiry.
const RAISE: &str = r"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[2])
  return tonumber(ARGV[1])
end
return current";

/// What a tenant may use per calendar month (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaLimits {
    pub monthly_requests: u64,
    pub monthly_generations: u64,
}

/// `monthly_requests/monthly_generations`, e.g. `200000/1000` (the config syntax).
impl FromStr for QuotaLimits {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let [r, g] = super::model::parse_positive_parts(
            s,
            "monthly_requests/monthly_generations, e.g. 200000/1000",
        )?;
        Ok(QuotaLimits {
            monthly_requests: r,
            monthly_generations: g,
        })
    }
}

impl fmt::Display for QuotaLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.monthly_requests, self.monthly_generations)
    }
}

/// Tenant overrides of the plan's quotas (`None`: the plan decides).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaOverrides {
    pub monthly_requests: Option<u64>,
    pub monthly_generations: Option<u64>,
}

impl QuotaOverrides {
    /// Quota columns (NULL or positive, by CHECK) as overrides.
    pub fn from_columns(requests: Option<i64>, generations: Option<i64>) -> Self {
        let positive = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok());
        QuotaOverrides {
            monthly_requests: positive(requests),
            monthly_generations: positive(generations),
        }
    }

    pub fn apply(&self, base: QuotaLimits) -> QuotaLimits {
        QuotaLimits {
            monthly_requests: self.monthly_requests.unwrap_or(base.monthly_requests),
            monthly_generations: self.monthly_generations.unwrap_or(base.monthly_generations),
        }
    }
}

/// Default quotas of every plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanQuotas {
    pub free: QuotaLimits,
    pub standard: QuotaLimits,
    pub professional: QuotaLimits,
    pub business: QuotaLimits,
    pub enterprise: QuotaLimits,
}

impl PlanQuotas {
    pub fn of(&self, plan: Plan) -> QuotaLimits {
        match plan {
            Plan::Free => self.free,
            Plan::Standard => self.standard,
            Plan::Professional => self.professional,
            Plan::Business => self.business,
            Plan::Enterprise => self.enterprise,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Requests,
    Generations,
}

impl Metric {
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Requests => "monthly_requests",
            Metric::Generations => "monthly_generations",
        }
    }
}

/// One quota after a call (or a read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaUsage {
    pub metric: Metric,
    pub allowed: bool,
    pub limit: u64,
    pub used: u64,
    /// When the month, and with it the quota, starts over.
    pub reset: DateTime<Utc>,
}

impl QuotaUsage {
    pub fn remaining(&self) -> u64 {
        self.limit.saturating_sub(self.used)
    }
}

pub struct Quotas {
    redis: Redis,
    consume: redis::Script,
    raise: redis::Script,
    outage: OutageLog,
    /// The reconciler's watermark; the lock also keeps two passes from overlapping.
    reconciled: tokio::sync::Mutex<Option<Watermark>>,
    /// Told when a counted call takes a quota past a level (None: nobody listens).
    crossings: Option<Arc<dyn CrossingSink>>,
}

/// `usage.quota.warning` is due once this share of a quota is used.
pub const WARNING_PERCENT: u64 = 80;

/// How far a quota is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuotaLevel {
    /// [`WARNING_PERCENT`] of the limit or more.
    Warning,
    /// All of it.
    Exceeded,
}

impl QuotaLevel {
    /// Lowest first.
    pub const ALL: [QuotaLevel; 2] = [QuotaLevel::Warning, QuotaLevel::Exceeded];

    pub fn as_str(self) -> &'static str {
        match self {
            QuotaLevel::Warning => "warning",
            QuotaLevel::Exceeded => "exceeded",
        }
    }
}

/// How many levels `used` of `limit` has reached (each level implies the ones below it; a
/// limit of 0 is never reached: quotas are positive).
fn height(used: u64, limit: u64) -> usize {
    if limit == 0 {
        0
    } else if used >= limit {
        2
    } else if u128::from(used) * 100 >= u128::from(limit) * u128::from(WARNING_PERCENT) {
        1
    } else {
        0
    }
}

/// The levels `used` of `limit` has reached, lowest first.
pub fn levels_reached(used: u64, limit: u64) -> Vec<QuotaLevel> {
    QuotaLevel::ALL[..height(used, limit)].to_vec()
}

/// The levels a count going from `before` to `after` crossed: of all concurrent calls
/// (on every replica: the counter is one Redis key), only the one whose increment passed a
/// level sees it. Allocates only on a crossing (it runs on every counted call).
pub fn levels_crossed(before: u64, after: u64, limit: u64) -> Vec<QuotaLevel> {
    let (from, to) = (height(before, limit), height(after, limit));
    if to > from {
        QuotaLevel::ALL[from..to].to_vec()
    } else {
        Vec::new()
    }
}

/// A counted call took a quota of `month` past `levels`; the counter is at `used`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crossing {
    pub tenant: TenantId,
    pub metric: Metric,
    pub month: DateTime<Utc>,
    pub limit: u64,
    pub used: u64,
    pub levels: Vec<QuotaLevel>,
}

/// Told of each crossing on the hot path (devgate sends `usage.quota.*` notices): must
/// return at once and do its I/O elsewhere.
pub trait CrossingSink: Send + Sync {
    fn crossed(&self, crossing: Crossing);
}

/// What the reconciler has counted of a month: requests per tenant logged in Postgres.
#[derive(Debug, Clone)]
pub struct ReconciledMonth {
    pub month: DateTime<Utc>,
    pub totals: HashMap<TenantId, u64>,
}

impl Quotas {
    pub fn new(redis: Redis) -> Self {
        Self {
            redis,
            consume: redis::Script::new(CONSUME),
            raise: redis::Script::new(RAISE),
            outage: OutageLog::new("quotas"),
            reconciled: tokio::sync::Mutex::new(None),
            crossings: None,
        }
    }

    /// `sink` is told whenever a counted call takes a quota past a level.
    pub fn with_crossings(mut self, sink: Arc<dyn CrossingSink>) -> Self {
        self.crossings = Some(sink);
        self
    }

    /// After `units` were counted and the counter of `month` is at `usage.used`: tells the
    /// sink of the levels that increment crossed (two comparisons; no I/O here).
    pub(crate) fn observe(
        &self,
        tenant: TenantId,
        month: DateTime<Utc>,
        usage: &QuotaUsage,
        units: u64,
    ) {
        let Some(sink) = &self.crossings else { return };
        let levels = levels_crossed(usage.used.saturating_sub(units), usage.used, usage.limit);
        if !levels.is_empty() {
            sink.crossed(Crossing {
                tenant,
                metric: usage.metric,
                month,
                limit: usage.limit,
                used: usage.used,
                levels,
            });
        }
    }

    /// The month the last reconciliation pass counted, with its per-tenant totals (None
    /// before the first pass).
    pub async fn reconciled(&self) -> Option<ReconciledMonth> {
        self.reconciled
            .lock()
            .await
            .as_ref()
            .map(|w| ReconciledMonth {
                month: w.month,
                totals: w.totals.clone(),
            })
    }

    /// The counter of `metric` for `tenant` in the month starting at `month`.
    pub(crate) fn key(&self, tenant: TenantId, metric: Metric, month: DateTime<Utc>) -> String {
        // Hash-tagged by tenant; a new key per month, so nothing needs resetting.
        // `YYYY-MM` by hand: chrono's `format("%Y-%m")` parses its pattern on every call.
        self.redis.key_fmt(format_args!(
            "quota:{{{tenant}}}:{}:{:04}-{:02}",
            metric.as_str(),
            month.year(),
            month.month()
        ))
    }

    /// Counts `amount` against the quota unless that would pass `limit`. `None` when Redis
    /// is down: quotas fail open (the reconciliation restores the count later).
    pub async fn consume(
        &self,
        tenant: TenantId,
        metric: Metric,
        amount: u64,
        limit: u64,
    ) -> Option<QuotaUsage> {
        let (month, reset) = month_bounds(Utc::now());
        let mut conn = self.redis.conn();
        let reply: redis::RedisResult<(i64, i64)> = self
            .consume
            .key(self.key(tenant, metric, month))
            .arg(amount)
            .arg(limit)
            .arg(expiry(reset))
            .invoke_async(&mut conn)
            .await;
        let (allowed, used) = self.outage.observe(reply)?;
        let usage = QuotaUsage {
            metric,
            allowed: allowed == 1,
            limit,
            used: used.max(0) as u64,
            reset,
        };
        if usage.allowed {
            self.observe(tenant, month, &usage, amount);
        }
        Some(usage)
    }

    /// Gives back what a refused call took (it was refused by the rate limiter after all).
    pub async fn refund(&self, tenant: TenantId, metric: Metric, amount: u64) {
        let (month, _) = month_bounds(Utc::now());
        let mut conn = self.redis.conn();
        let reply: redis::RedisResult<i64> = redis::cmd("DECRBY")
            .arg(self.key(tenant, metric, month))
            .arg(amount)
            .query_async(&mut conn)
            .await;
        self.outage.observe(reply);
    }

    /// The month's usage without counting anything.
    pub async fn read(&self, tenant: TenantId, metric: Metric, limit: u64) -> Option<QuotaUsage> {
        let (month, reset) = month_bounds(Utc::now());
        let mut conn = self.redis.conn();
        let reply: redis::RedisResult<Option<i64>> = redis::cmd("GET")
            .arg(self.key(tenant, metric, month))
            .query_async(&mut conn)
            .await;
        let used = self.outage.observe(reply)?.unwrap_or(0).max(0) as u64;
        Some(QuotaUsage {
            metric,
            allowed: used < limit,
            limit,
            used,
            reset,
        })
    }

    /// Raises this month's request counters to what Postgres recorded (after a Redis restart
    /// or flush the counters would otherwise start from zero). Counters only ever go up.
    ///
    /// Incremental: the first pass of a process (and of a month) counts the whole month;
    /// later passes read only the request-log rows committed since the previous pass and add
    /// them to per-tenant totals kept here, then raise every tenant's counter to its total
    /// (so a flushed Redis is restored even for tenants with no new rows).
    ///
    /// The watermark is a transaction id, not a time: rows carry the id of the transaction
    /// that inserted them (`insert_xid`), and each pass reads the ids in
    /// `[previous horizon, horizon)`, where the horizon is the xmin of a fresh snapshot —
    /// every transaction below it has ended, so nothing below it can still appear. Late or
    /// batched inserts (the writer buffers through Postgres outages, with call times long
    /// past) are therefore counted exactly once, when they commit; a long-running
    /// transaction anywhere on the server only delays counting until it ends. A time-based
    /// watermark with a safe lag would miss rows buffered for longer than the lag.
    pub async fn reconcile_requests(&self, pool: &PgPool) -> Result<ReconcileStats, StoreError> {
        let (month, reset) = month_bounds(Utc::now());
        let mut state = self.reconciled.lock().await;
        let previous = state.as_ref().filter(|w| w.month == month);
        let (horizon, counts) =
            committed_key_requests(pool, month, reset, previous.map(|w| w.horizon.as_str()))
                .await?;
        let full = previous.is_none();
        let mut next = match state.take() {
            Some(w) if !full => w,
            _ => Watermark {
                month,
                horizon: String::new(),
                totals: HashMap::new(),
            },
        };
        next.horizon = horizon;
        let mut rows_read = 0u64;
        for (tenant, n) in counts {
            rows_read += n;
            *next.totals.entry(tenant).or_default() += n;
        }
        let totals: Vec<(TenantId, u64)> = next.totals.iter().map(|(t, n)| (*t, *n)).collect();
        *state = Some(next);
        drop(state);

        let raised = futures_util::stream::iter(totals)
            .map(|(tenant, total)| async move {
                let mut conn = self.redis.conn();
                let reply: redis::RedisResult<i64> = self
                    .raise
                    .key(self.key(tenant, Metric::Requests, month))
                    .arg(total)
                    .arg(expiry(reset))
                    .invoke_async(&mut conn)
                    .await;
                reply
            })
            .buffer_unordered(RAISE_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        let mut tenants = 0;
        for reply in raised {
            if self.outage.observe(reply).is_some() {
                tenants += 1;
            }
        }
        Ok(ReconcileStats {
            full,
            rows_read,
            tenants,
        })
    }
}

/// Counters raised at once by a reconciliation pass.
const RAISE_CONCURRENCY: usize = 64;

/// What one reconciliation pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconcileStats {
    /// The pass counted the whole month (first pass of the process or of the month).
    pub full: bool,
    /// Request-log rows the pass counted: after the first pass, only rows new since the last.
    pub rows_read: u64,
    /// Tenants whose counter Redis confirmed is at least what Postgres recorded.
    pub tenants: usize,
}

/// Where the last pass stopped, and what it counted so far this month.
struct Watermark {
    month: DateTime<Utc>,
    /// xid8 as text: rows from transactions below it are counted.
    horizon: String,
    totals: HashMap<TenantId, u64>,
}

#[derive(diesel::QueryableByName)]
struct Horizon {
    #[diesel(sql_type = diesel::sql_types::Text)]
    xid: String,
}

#[derive(diesel::QueryableByName)]
struct TenantRequests {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    tenant_id: uuid::Uuid,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    requests: i64,
}

/// API-key calls per tenant in `[month, next)` that counted against the quota (refusals by
/// the limiter, RESOURCE_EXHAUSTED, did not), from transactions in `[since, horizon)`
/// (`since` None: everything below the horizon, and rows logged before `insert_xid`
/// existed). Returns the new horizon too.
async fn committed_key_requests(
    pool: &PgPool,
    month: DateTime<Utc>,
    next: DateTime<Utc>,
    since: Option<&str>,
) -> Result<(String, Vec<(TenantId, u64)>), StoreError> {
    use diesel::sql_types::{Text, Timestamptz};
    use diesel_async::RunQueryDsl;

    const COUNT: &str = "SELECT tenant_id, count(*) AS requests FROM api_request_logs \
        WHERE time >= $1 AND time < $2 AND api_key_id IS NOT NULL AND grpc_code <> 8 AND ";
    let mut conn = pool.get().await?;
    // Taken first: whatever is below it has committed (or aborted) before the count starts,
    // so the count, even on a later snapshot, sees all of it.
    let horizon: Horizon =
        diesel::sql_query("SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS xid")
            .get_result(&mut conn)
            .await?;
    let rows: Vec<TenantRequests> = match since {
        Some(since) => {
            diesel::sql_query(format!(
                "{COUNT} insert_xid >= $3::text::xid8 AND insert_xid < $4::text::xid8 \
                 GROUP BY tenant_id"
            ))
            .bind::<Timestamptz, _>(month)
            .bind::<Timestamptz, _>(next)
            .bind::<Text, _>(since)
            .bind::<Text, _>(&horizon.xid)
            .load(&mut conn)
            .await?
        }
        None => {
            diesel::sql_query(format!(
                "{COUNT} (insert_xid IS NULL OR insert_xid < $3::text::xid8) GROUP BY tenant_id"
            ))
            .bind::<Timestamptz, _>(month)
            .bind::<Timestamptz, _>(next)
            .bind::<Text, _>(&horizon.xid)
            .load(&mut conn)
            .await?
        }
    };
    Ok((
        horizon.xid,
        rows.into_iter()
            .map(|r| (TenantId(r.tenant_id), r.requests.max(0) as u64))
            .collect(),
    ))
}

/// The first instant of `now`'s month and of the next one (UTC).
pub fn month_bounds(now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let start = Utc
        .with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
        .single()
        .expect("valid date");
    let (y, m) = if now.month() == 12 {
        (now.year() + 1, 1)
    } else {
        (now.year(), now.month() + 1)
    };
    let next = Utc
        .with_ymd_and_hms(y, m, 1, 0, 0, 0)
        .single()
        .expect("valid date");
    (start, next)
}

/// Counters outlive their month by a week, so a late reconciliation still finds them.
pub(crate) fn expiry(reset: DateTime<Utc>) -> i64 {
    (reset + Duration::from_secs(7 * 86_400)).timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_applies() {
        let q: QuotaLimits = "200000/1000".parse().unwrap();
        assert_eq!(
            q,
            QuotaLimits {
                monthly_requests: 200_000,
                monthly_generations: 1000
            }
        );
        assert!("1/0".parse::<QuotaLimits>().is_err());
        assert!("12".parse::<QuotaLimits>().is_err());
        let o = QuotaOverrides {
            monthly_requests: Some(5),
            monthly_generations: None,
        };
        assert_eq!(
            o.apply(q),
            QuotaLimits {
                monthly_requests: 5,
                monthly_generations: 1000
            }
        );
    }

    #[test]
    fn levels() {
        use QuotaLevel::*;
        assert_eq!(levels_reached(79, 100), []);
        assert_eq!(levels_reached(80, 100), [Warning]);
        assert_eq!(levels_reached(100, 100), [Warning, Exceeded]);
        assert_eq!(levels_reached(5, 0), []);
        // 80 % of 3 is 2.4: the third call reaches both.
        assert_eq!(levels_reached(2, 3), []);
        assert_eq!(levels_reached(3, 3), [Warning, Exceeded]);
        assert_eq!(levels_reached(u64::MAX, u64::MAX), [Warning, Exceeded]);
    }

    #[test]
    fn only_the_increment_that_passes_a_level_crosses_it() {
        use QuotaLevel::*;
        assert_eq!(levels_crossed(78, 79, 100), []);
        assert_eq!(levels_crossed(79, 80, 100), [Warning]);
        assert_eq!(levels_crossed(80, 81, 100), []);
        assert_eq!(levels_crossed(99, 100, 100), [Exceeded]);
        assert_eq!(levels_crossed(0, 1, 1), [Warning, Exceeded]);
        assert_eq!(levels_crossed(70, 100, 100), [Warning, Exceeded]);
    }

    #[test]
    fn months() {
        let t = Utc.with_ymd_and_hms(2026, 12, 31, 23, 59, 59).unwrap();
        let (start, next) = month_bounds(t);
        assert_eq!(start, Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap());
        assert_eq!(next, Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap());
    }
}
