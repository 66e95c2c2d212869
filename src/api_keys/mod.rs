//! API keys: creation, listing, update, revocation, rotation with a grace period, deletion,
//! and verification (the hot path of every key-authenticated call).

pub mod config;
pub mod expiring;
pub mod grpc;
pub mod hashing;
pub mod invalidation;
pub mod last_used;
pub mod model;
pub mod service;
pub mod store;
pub mod token;
pub mod verifier;

use crate::{
    auth::AuthError, db::StoreError, events::EventError, idempotency::IdempotencyError,
    ratelimit::RateLimitError, validation::Violations,
};

/// Everything that can go wrong in this module; mapped to a gRPC status in `crate::status`.
#[derive(Debug, thiserror::Error)]
pub enum ApiKeyError {
    #[error("invalid request: {0}")]
    Invalid(Violations),
    #[error("api key {0} not found")]
    NotFound(String),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// A rotated-out secret is still in its grace period: another rotation would end it.
    #[error(
        "api key {id} was rotated recently: its previous secret works until {until}; rotate again after that, or set end_grace_now to end it now"
    )]
    GraceInProgress {
        id: String,
        until: chrono::DateTime<chrono::Utc>,
    },
    /// A concurrent change won; retrying is safe.
    #[error("{0}")]
    Aborted(String),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    RateLimit(#[from] RateLimitError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Hashing(#[from] hashing::HashError),
    #[error(transparent)]
    Event(#[from] EventError),
    #[error(transparent)]
    Idempotency(#[from] IdempotencyError),
}

impl From<Violations> for ApiKeyError {
    fn from(v: Violations) -> Self {
        ApiKeyError::Invalid(v)
    }
}

impl From<ApiKeyError> for AuthError {
    fn from(e: ApiKeyError) -> Self {
        match e {
            ApiKeyError::Auth(a) => a,
            other => AuthError::Unavailable(other.to_string()),
        }
    }
}

/// Lets diesel-async transactions return this error directly.
impl From<diesel::result::Error> for ApiKeyError {
    fn from(e: diesel::result::Error) -> Self {
        ApiKeyError::Store(e.into())
    }
}
