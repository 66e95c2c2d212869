//! Webhooks (issue 7): tenants' endpoints (the WebhookService: [`service`], [`grpc`]),
//! Standard Webhooks signing, endpoint secrets encrypted at rest, and the SSRF guard (URL
//! validation and the delivery HTTP client).

pub mod config;
pub mod delivery;
pub mod grpc;
pub mod model;
pub mod secret_box;
pub mod service;
pub mod signing;
pub mod ssrf;
pub mod store;

pub use config::{RetrySchedule, WebhookDeliveryConfig, WebhookSecurityConfig};

use crate::{
    auth::AuthError, db::StoreError, events::EventError, idempotency::IdempotencyError,
    mq::MqError, validation::Violations,
};

/// Everything that can go wrong managing endpoints; mapped to a gRPC status in
/// `crate::status`.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("invalid request: {0}")]
    Invalid(Violations),
    #[error("webhook endpoint {0} not found")]
    NotFound(String),
    #[error("event {0} not found")]
    EventNotFound(String),
    #[error("webhook delivery {0} not found")]
    DeliveryNotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// No key ring: secrets can be neither stored nor read.
    #[error("webhook secrets cannot be stored or read: DEVGATE_ENCRYPTION_KEYS is not configured")]
    EncryptionNotConfigured,
    /// A rotated-out secret still signs: another rotation would end its grace silently.
    #[error(
        "webhook endpoint {id} was rotated recently: its previous secret signs until {until}; rotate again after that, or set end_grace_now to end it now"
    )]
    GraceInProgress {
        id: String,
        until: chrono::DateTime<chrono::Utc>,
    },
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Event(#[from] EventError),
    /// RabbitMQ did not take a delivery task (RetryWebhookDelivery, RecoverWebhookDeliveries).
    #[error(transparent)]
    Mq(#[from] MqError),
    #[error(transparent)]
    Idempotency(#[from] IdempotencyError),
    #[error("secret at rest: {0}")]
    SecretBox(#[from] secret_box::SecretBoxError),
    #[error("secret: {0}")]
    Signing(#[from] signing::SigningError),
}

impl From<Violations> for WebhookError {
    fn from(v: Violations) -> Self {
        WebhookError::Invalid(v)
    }
}

/// Lets diesel-async transactions return this error directly.
impl From<diesel::result::Error> for WebhookError {
    fn from(e: diesel::result::Error) -> Self {
        WebhookError::Store(e.into())
    }
}
