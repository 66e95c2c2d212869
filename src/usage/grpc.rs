//! The tonic implementation of `devgate.v1.UsageService`: validate and convert, call the
//! service, convert back.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{
    GroupBy, LogFilter, RequestRecord,
    service::{Period, Usage, UsageError},
    store::MeteredRecord,
};
use crate::{
    api_keys::grpc::{plan_to_proto, rate_limits_from_proto, rate_limits_to_proto},
    auth::{Principal, Scope, layer::principal},
    pagination,
    proto::{
        convert::{from_timestamp, opt_timestamp, timestamp},
        internal::v1::{
            self as internal, usage_service_server::UsageService as InternalUsageService,
        },
        v1::{self, usage_service_server::UsageService},
    },
    ratelimit::{LimitOverrides, Limits, QuotaOverrides},
    tenants::{Plan, TenantId},
    validation::Violations,
};

pub struct UsageGrpc {
    usage: Arc<Usage>,
}

impl UsageGrpc {
    pub fn new(usage: Arc<Usage>) -> Self {
        Self { usage }
    }
}

type RpcResult<T> = Result<Response<T>, Status>;

/// Largest quantity of one metered record: 10^12 leaves room for 9 million maximal records
/// in one sum before `bigint` overflows, far beyond a 93-day query's worth.
pub const MAX_QUANTITY: i64 = 1_000_000_000_000;

/// Longest period one usage query may span: the monthly partitions and the
/// (tenant, ..., time) indexes serve a quarter with a bounded scan.
pub const MAX_QUERY_DAYS: i64 = 93;

/// The scope check the service repeats, done before any validation.
fn authorize(principal: &Principal, scope: Scope) -> Result<(), Status> {
    principal
        .tenant_with(scope)
        .map(drop)
        .map_err(|e| UsageError::from(e).into())
}

#[tonic::async_trait]
impl UsageService for UsageGrpc {
    async fn get_usage_summary(
        &self,
        req: Request<v1::GetUsageSummaryRequest>,
    ) -> RpcResult<v1::UsageSummary> {
        let principal = principal(&req)?;
        authorize(principal, Scope::UsageRead)?;
        let r = req.get_ref();
        let mut v = Violations::new();
        let period = period(r.start_time.as_ref(), r.end_time.as_ref(), &mut v);
        v.into_result(()).map_err(UsageError::from)?;
        let summary = self.usage.summary(principal, period).await?;
        let s = summary.calls;
        let ms = |us: Option<f64>| us.map(|u| u / 1000.0).unwrap_or(0.0);
        Ok(Response::new(v1::UsageSummary {
            start_time: Some(timestamp(period.from)),
            end_time: Some(timestamp(period.to)),
            requests: s.requests,
            errors: s.errors,
            cost: s.cost_total,
            status_2xx: s.by_status_class.status_2xx,
            status_4xx: s.by_status_class.status_4xx,
            status_5xx: s.by_status_class.status_5xx,
            latency_p50_ms: ms(s.latency_p50_us),
            latency_p99_ms: ms(s.latency_p99_us),
            credits_used: summary.credits_used,
            metered: summary
                .metered
                .into_iter()
                .map(|(metric, quantity)| v1::MeteredUsage { metric, quantity })
                .collect(),
        }))
    }

    async fn get_usage_breakdown(
        &self,
        req: Request<v1::GetUsageBreakdownRequest>,
    ) -> RpcResult<v1::GetUsageBreakdownResponse> {
        let principal = principal(&req)?;
        authorize(principal, Scope::UsageRead)?;
        let r = req.get_ref();
        let mut v = Violations::new();
        let period = period(r.start_time.as_ref(), r.end_time.as_ref(), &mut v);
        let group_by = match v1::UsageGroupBy::try_from(r.group_by) {
            Ok(v1::UsageGroupBy::ApiKey) => Some(GroupBy::ApiKey),
            Ok(v1::UsageGroupBy::Endpoint) => Some(GroupBy::Endpoint),
            Ok(v1::UsageGroupBy::Day) => Some(GroupBy::Day),
            Ok(v1::UsageGroupBy::Hour) => Some(GroupBy::Hour),
            _ => {
                v.add(
                    "group_by",
                    "required: USAGE_GROUP_BY_API_KEY, _ENDPOINT, _DAY or _HOUR",
                );
                None
            }
        };
        let limit = pagination::page_size(r.page_size, &mut v);
        let after: Option<String> = pagination::decode_token(&r.page_token, &mut v);
        v.into_result(()).map_err(UsageError::from)?;
        let group_by = group_by.expect("validated");
        let mut rows = self
            .usage
            .breakdown(principal, period, group_by, limit + 1, after.as_deref())
            .await?;
        let next = if rows.len() as i64 > limit {
            rows.truncate(limit as usize);
            rows.last().map(|row| pagination::encode_token(&row.key))
        } else {
            None
        };
        Ok(Response::new(v1::GetUsageBreakdownResponse {
            rows: rows
                .into_iter()
                .map(|row| v1::UsageBreakdownRow {
                    key: row.key,
                    requests: row.requests,
                    errors: row.errors,
                    cost: row.cost,
                })
                .collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn get_quota_status(
        &self,
        req: Request<v1::GetQuotaStatusRequest>,
    ) -> RpcResult<v1::QuotaStatus> {
        let principal = principal(&req)?;
        authorize(principal, Scope::UsageRead)?;
        let status = self.usage.quota_status(principal).await?;
        let windows = status
            .windows
            .map(|d| {
                d.windows
                    .iter()
                    .map(|w| v1::RateWindowStatus {
                        window: w.window.name.to_string(),
                        limit: w.window.limit,
                        remaining: w.remaining,
                        reset_seconds: w.reset,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Response::new(v1::QuotaStatus {
            plan: plan_to_proto(status.plan) as i32,
            rate_limits: Some(limits_to_proto(&status.limits)),
            windows,
            credit_balance: status.credit_balance,
            quotas: status
                .quotas
                .iter()
                .map(|q| v1::QuotaUsage {
                    name: q.metric.as_str().to_string(),
                    limit: i64::try_from(q.limit).unwrap_or(i64::MAX),
                    used: i64::try_from(q.used).unwrap_or(i64::MAX),
                    remaining: i64::try_from(q.remaining()).unwrap_or(i64::MAX),
                    reset_time: Some(timestamp(q.reset)),
                })
                .collect(),
        }))
    }

    async fn list_request_logs(
        &self,
        req: Request<v1::ListRequestLogsRequest>,
    ) -> RpcResult<v1::ListRequestLogsResponse> {
        let principal = principal(&req)?;
        authorize(principal, Scope::UsageRead)?;
        let r = req.get_ref();
        let mut v = Violations::new();
        let limit = pagination::page_size(r.page_size, &mut v);
        let before: Option<(DateTime<Utc>, Uuid)> = pagination::decode_token(&r.page_token, &mut v);
        let time = |t: Option<&prost_types::Timestamp>, field: &str, v: &mut Violations| {
            t.and_then(|t| {
                from_timestamp(t).or_else(|| {
                    v.add(field, "not a valid timestamp");
                    None
                })
            })
        };
        let grpc_code = if r.has_grpc_code || r.grpc_code != 0 {
            v.check(
                (0..=16).contains(&r.grpc_code),
                "grpc_code",
                "a gRPC status code, 0 to 16",
            );
            Some(r.grpc_code as i16)
        } else {
            None
        };
        let to = time(r.end_time.as_ref(), "end_time", &mut v);
        // No start: the last MAX_QUERY_DAYS before the end, so a filter that matches
        // nothing still scans a bounded range.
        let from = time(r.start_time.as_ref(), "start_time", &mut v).unwrap_or_else(|| {
            to.unwrap_or_else(Utc::now) - chrono::Duration::days(MAX_QUERY_DAYS)
        });
        if let Some(to) = to {
            check_span(from, to, &mut v);
        }
        v.check(
            r.api_key_id.len() <= 64,
            "api_key_id",
            "at most 64 characters",
        );
        v.check(r.rpc.len() <= 200, "rpc", "at most 200 characters");
        let filter = LogFilter {
            api_key_id: (!r.api_key_id.is_empty()).then(|| r.api_key_id.clone()),
            grpc_code,
            rpc: (!r.rpc.is_empty()).then(|| r.rpc.clone()),
            from: Some(from),
            to,
        };
        v.into_result(()).map_err(UsageError::from)?;
        let mut logs = self
            .usage
            .list(principal, &filter, limit + 1, before)
            .await?;
        let next = if logs.len() as i64 > limit {
            logs.truncate(limit as usize);
            logs.last()
                .map(|l| pagination::encode_token(&(l.time, l.id)))
        } else {
            None
        };
        Ok(Response::new(v1::ListRequestLogsResponse {
            request_logs: logs.iter().map(log_to_proto).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }
}

/// `devgate.internal.v1.UsageService`: plans, credit grants and metered usage from the
/// platform's services. The auth layer has already checked the caller's service token and
/// that it may call the RPC.
#[tonic::async_trait]
impl InternalUsageService for UsageGrpc {
    async fn set_plan(
        &self,
        req: Request<internal::SetPlanRequest>,
    ) -> RpcResult<internal::Tenant> {
        let principal = principal(&req)?;
        let r = req.get_ref();
        let mut v = Violations::new();
        let tenant = tenant_id(&r.tenant_id, &mut v);
        let plan = match v1::Plan::try_from(r.plan) {
            Ok(v1::Plan::Free) => Some(Plan::Free),
            Ok(v1::Plan::Standard) => Some(Plan::Standard),
            Ok(v1::Plan::Professional) => Some(Plan::Professional),
            Ok(v1::Plan::Business) => Some(Plan::Business),
            Ok(v1::Plan::Enterprise) => Some(Plan::Enterprise),
            _ => {
                v.add(
                    "plan",
                    "required: PLAN_FREE, _STANDARD, _PROFESSIONAL, _BUSINESS or _ENTERPRISE",
                );
                None
            }
        };
        let limits: LimitOverrides =
            rate_limits_from_proto(r.rate_limits.as_ref(), "rate_limits", &mut v);
        let quotas = r.quotas.as_ref().map_or(QuotaOverrides::default(), |q| {
            v.check(
                q.monthly_requests >= 0 && q.monthly_generations >= 0,
                "quotas",
                "must not be negative",
            );
            QuotaOverrides {
                monthly_requests: u64::try_from(q.monthly_requests).ok().filter(|n| *n > 0),
                monthly_generations: u64::try_from(q.monthly_generations).ok().filter(|n| *n > 0),
            }
        });
        v.into_result(()).map_err(UsageError::from)?;
        let (tenant, plan) = (tenant.expect("validated"), plan.expect("validated"));
        let record = self
            .usage
            .set_plan(principal, tenant, plan, limits, quotas)
            .await?;
        Ok(Response::new(internal::Tenant {
            id: record.id.to_string(),
            plan: plan_to_proto(record.plan) as i32,
            rate_limits: rate_limits_to_proto(&record.limits),
            create_time: Some(timestamp(record.create_time)),
            update_time: Some(timestamp(record.update_time)),
            updated_by: record.plan_updated_by.unwrap_or_default(),
            quotas: Some(v1::Quotas {
                monthly_requests: record
                    .quotas
                    .monthly_requests
                    .map_or(0, |n| i64::try_from(n).unwrap_or(i64::MAX)),
                monthly_generations: record
                    .quotas
                    .monthly_generations
                    .map_or(0, |n| i64::try_from(n).unwrap_or(i64::MAX)),
            }),
        }))
    }

    async fn grant_credits(
        &self,
        req: Request<internal::GrantCreditsRequest>,
    ) -> RpcResult<internal::CreditLedgerEntry> {
        let principal = principal(&req)?;
        let r = req.get_ref();
        let mut v = Violations::new();
        let tenant = tenant_id(&r.tenant_id, &mut v);
        // The ledger's own bound, checked here too so no work starts on a wild amount.
        v.check(
            (1..=crate::credits::service::MAX_AMOUNT).contains(&r.amount),
            "amount",
            format!(
                "must be between 1 and {}",
                crate::credits::service::MAX_AMOUNT
            ),
        );
        v.into_result(()).map_err(UsageError::from)?;
        let entry = self
            .usage
            .grant_credits(
                principal,
                tenant.expect("validated"),
                r.amount,
                &r.reason,
                &r.reference,
                &r.idempotency_id,
            )
            .await?;
        Ok(Response::new(internal::CreditLedgerEntry {
            id: entry.id,
            tenant_id: entry.tenant_id.to_string(),
            amount: entry.amount,
            reason: entry.reason,
            reference: entry.reference,
            idempotency_id: entry.idempotency_id.unwrap_or_default(),
            balance_after: entry.balance_after,
            create_time: Some(timestamp(entry.create_time)),
            created_by: entry.created_by,
        }))
    }

    async fn record_usage(
        &self,
        req: Request<internal::RecordUsageRequest>,
    ) -> RpcResult<internal::RecordUsageResponse> {
        let principal = principal(&req)?;
        let r = req.get_ref();
        let mut v = Violations::new();
        let tenant = tenant_id(&r.tenant_id, &mut v);
        v.check(
            valid_metric(&r.metric),
            "metric",
            "required: lower_snake_case, e.g. generation_seconds",
        );
        v.check(
            (1..=MAX_QUANTITY).contains(&r.quantity),
            "quantity",
            format!("must be between 1 and {MAX_QUANTITY}"),
        );
        v.check(
            (1..=200).contains(&r.idempotency_id.chars().count()),
            "idempotency_id",
            "required: 1 to 200 characters",
        );
        v.check(
            r.api_key_id.len() <= 64,
            "api_key_id",
            "at most 64 characters",
        );
        let now = Utc::now();
        let time = match &r.time {
            None => now,
            Some(t) => match from_timestamp(t) {
                Some(at)
                    if at <= now + chrono::Duration::seconds(60)
                        && at >= now - chrono::Duration::days(7) =>
                {
                    at
                }
                _ => {
                    v.add("time", "must be a valid time within the last 7 days");
                    now
                }
            },
        };
        v.into_result(()).map_err(UsageError::from)?;
        let record = MeteredRecord {
            tenant: tenant.expect("validated"),
            api_key_id: (!r.api_key_id.is_empty()).then_some(r.api_key_id.as_str()),
            metric: &r.metric,
            quantity: r.quantity,
            idempotency_id: &r.idempotency_id,
            time,
            recorded_by: &principal.actor(),
        };
        let recorded = self.usage.record_metered(principal, &record).await?;
        Ok(Response::new(internal::RecordUsageResponse { recorded }))
    }
}

/// Metric names: lower_snake_case, like the migration's CHECK.
fn valid_metric(m: &str) -> bool {
    let mut chars = m.chars();
    matches!(chars.next(), Some('a'..='z'))
        && m.len() <= 63
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn period(
    start: Option<&prost_types::Timestamp>,
    end: Option<&prost_types::Timestamp>,
    v: &mut Violations,
) -> Period {
    let mut at = |t: Option<&prost_types::Timestamp>, field: &str| {
        t.and_then(|t| {
            let parsed = from_timestamp(t);
            v.check(parsed.is_some(), field, "not a valid timestamp");
            parsed
        })
    };
    let (from, to) = (at(start, "start_time"), at(end, "end_time"));
    let period = Period::new(from, to, v);
    check_span(period.from, period.to, v);
    period
}

fn check_span(from: DateTime<Utc>, to: DateTime<Utc>, v: &mut Violations) {
    v.check(
        to - from <= chrono::Duration::days(MAX_QUERY_DAYS),
        "end_time",
        format!("a query spans at most {MAX_QUERY_DAYS} days; split longer periods"),
    );
}

fn tenant_id(raw: &str, v: &mut Violations) -> Option<TenantId> {
    let parsed = raw.parse::<TenantId>().ok();
    v.check(parsed.is_some(), "tenant_id", "required: the tenant's UUID");
    parsed
}

fn limits_to_proto(l: &Limits) -> v1::RateLimits {
    v1::RateLimits {
        per_minute: l.per_minute,
        per_hour: l.per_hour,
        per_day: l.per_day,
        burst: l.burst,
    }
}

fn log_to_proto(l: &RequestRecord) -> v1::RequestLog {
    v1::RequestLog {
        id: l.id.to_string(),
        time: opt_timestamp(Some(l.time)),
        api_key_id: l.api_key_id.clone().unwrap_or_default(),
        user_id: l.user_id.clone().unwrap_or_default(),
        rpc: l.rpc.clone(),
        http_method: l.http_method.clone().unwrap_or_default(),
        http_path: l.http_path.clone().unwrap_or_default(),
        grpc_code: i32::from(l.grpc_code),
        http_status: i32::from(l.http_status),
        error_code: l.error_code.clone().unwrap_or_default(),
        latency_us: l.latency_us,
        request_bytes: l.request_bytes,
        response_bytes: l.response_bytes,
        client_ip: l.client_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        user_agent: l.user_agent.clone().unwrap_or_default(),
        cost: l.cost,
    }
}
