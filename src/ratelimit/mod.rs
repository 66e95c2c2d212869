//! Rate limits: per-plan (and per-key) token buckets for the minute, hour and day, decided
//! in one Redis round trip per call, reported in `ratelimit*` headers on every API-key
//! response.

pub mod limiter;
pub mod model;

pub use limiter::RateLimiter;
pub use model::{Decision, LimitOverrides, Limits, PlanLimits};

#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    /// The call would exceed a window; the decision says which and for how long.
    #[error("rate limit exceeded for api key {key_id}")]
    Exceeded { key_id: String, decision: Decision },
    /// Redis is down and the limiter is configured to fail closed.
    #[error("rate limiting unavailable")]
    Unavailable,
    #[error("rate-limit script answered unexpectedly: {0}")]
    Script(String),
}
