//! Rate limits: per-plan (and per-key) token buckets for the minute, hour and day, decided
//! in one Redis round trip per call, reported in `ratelimit*` headers on every API-key
//! response.

pub mod grpc;
pub mod limiter;
pub mod model;
pub mod quota;

pub use limiter::RateLimiter;
pub use model::{Decision, LimitOverrides, Limits, PlanLimits};
pub use quota::{
    Crossing, CrossingSink, Metric, PlanQuotas, QuotaLevel, QuotaLimits, QuotaOverrides,
    QuotaUsage, Quotas, ReconcileStats,
};

/// The rate-limit and quota section, composed by `crate::config`.
#[derive(Debug, Clone)]
pub struct RateLimitConfig {
    pub plans: PlanLimits,
    pub quotas: PlanQuotas,
    pub fail_closed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    /// The call would exceed a window; the decision says which and for how long.
    /// `subject` is whose buckets: `api_key:<id>` or `user:<id>`.
    #[error("rate limit exceeded for {subject}")]
    Exceeded { subject: String, decision: Decision },
    /// The tenant's monthly quota is used up.
    #[error("monthly quota exhausted for tenant {tenant}")]
    QuotaExhausted {
        tenant: crate::identity::TenantId,
        usage: QuotaUsage,
    },
    /// Redis is down and the limiter is configured to fail closed.
    #[error("rate limiting unavailable")]
    Unavailable,
    #[error("rate-limit script answered unexpectedly: {0}")]
    Script(String),
}
