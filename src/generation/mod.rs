//! The generation proxy (issue 8): creative-AI generations charged in credits when created
//! and handed to the platform's AI orchestrator over RabbitMQ through the outbox
//! ([`service`], [`grpc`] for `devgate.v1.GenerationProxy`), and reads of the platform's
//! Asset and User/Team services ([`upstream`]). The worker applies the orchestrator's
//! progress and results ([`updates`]) and fails what never ends ([`sweep`]).

pub mod config;
pub mod directory;
pub mod grpc;
pub mod model;
pub mod service;
pub mod store;
pub mod sweep;
pub mod updates;
pub mod upstream;
pub mod watch;

pub use config::GenerationConfig;

use crate::{
    auth::AuthError, db::StoreError, events::EventError, idempotency::IdempotencyError,
    ratelimit::RateLimitError, validation::Violations,
};

/// Everything that can go wrong here; mapped to a gRPC status in `crate::status`.
#[derive(Debug, thiserror::Error)]
pub enum GenerationError {
    #[error("invalid request: {0}")]
    Invalid(Violations),
    #[error("generation {0} not found")]
    NotFound(String),
    /// Cancel of a generation that already ended.
    #[error(
        "generation {id} already ended ({state}); only queued or running generations can be cancelled"
    )]
    Ended { id: String, state: &'static str },
    /// The balance is lower than the cost; nothing was charged.
    #[error("insufficient credits: balance {balance}, cost {cost}")]
    InsufficientCredits { balance: i64, cost: i64 },
    /// The monthly generations quota is used up (the same answer as the request quota).
    #[error(transparent)]
    Quota(#[from] RateLimitError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Event(#[from] EventError),
    #[error(transparent)]
    Idempotency(#[from] IdempotencyError),
}

impl From<Violations> for GenerationError {
    fn from(v: Violations) -> Self {
        GenerationError::Invalid(v)
    }
}

/// Lets diesel-async transactions return this error directly.
impl From<diesel::result::Error> for GenerationError {
    fn from(e: diesel::result::Error) -> Self {
        GenerationError::Store(e.into())
    }
}
