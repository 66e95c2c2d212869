//! The one place where errors become gRPC statuses. Field errors carry
//! `google.rpc.BadRequest`, refusals `google.rpc.ErrorInfo` (domain `devgate`), throttling
//! `RetryInfo` and a `retry-after` header. Unexpected errors are logged with their cause
//! chain and answered as an opaque INTERNAL.

use std::{collections::HashMap, time::Duration};

use tonic::{Code, Status, metadata::MetadataValue};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::{
    api_keys::ApiKeyError,
    auth::{AuthError, VerifyFailure},
    credits::CreditError,
    db::StoreError,
    events::EventError,
    generation::GenerationError,
    generation::directory::DirectoryError,
    generation::upstream::UpstreamError,
    idempotency::{self, IdempotencyError},
    mq::MqError,
    ratelimit::{RateLimitError, model::retry_after_secs},
    usage::service::UsageError,
    validation::Violations,
    webhooks::WebhookError,
};

const DOMAIN: &str = "devgate";

fn error_info(code: Code, message: impl Into<String>, reason: &str) -> Status {
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, DOMAIN, HashMap::new()),
    )
}

fn bad_request(v: &Violations) -> Status {
    let violations: Vec<FieldViolation> = v
        .iter()
        .map(|f| FieldViolation::new(&f.field, &f.description))
        .collect();
    Status::with_error_details(
        Code::InvalidArgument,
        format!("invalid request: {v}"),
        ErrorDetails::with_bad_request(violations),
    )
}

fn retry_later(code: Code, message: impl Into<String>, reason: &str, after: Duration) -> Status {
    let mut details = ErrorDetails::with_retry_info(Some(after));
    details.set_error_info(reason, DOMAIN, HashMap::new());
    let mut status = Status::with_error_details(code, message, details);
    let secs = after.as_secs().max(1).to_string();
    status.metadata_mut().insert(
        "retry-after",
        MetadataValue::try_from(secs.as_str()).expect("digits are ASCII"),
    );
    status
}

/// Logs the whole cause chain; the client learns nothing but that it failed.
fn internal(e: &(dyn std::error::Error + 'static)) -> Status {
    let mut chain = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        source = s.source();
    }
    tracing::error!(error = %chain, "internal error");
    Status::internal("internal error")
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => Status::not_found("not found"),
            StoreError::Conflict(what) => error_info(
                Code::AlreadyExists,
                format!("already exists ({what})"),
                "ALREADY_EXISTS",
            ),
            StoreError::Unavailable(why) => {
                tracing::warn!(error = %why, "database unavailable");
                retry_later(
                    Code::Unavailable,
                    "database temporarily unavailable",
                    "DATABASE_UNAVAILABLE",
                    Duration::from_secs(1),
                )
            }
            e @ StoreError::Query(_) => internal(&e),
        }
    }
}

impl From<IdempotencyError> for Status {
    fn from(e: IdempotencyError) -> Self {
        let message = e.to_string();
        match e {
            IdempotencyError::Invalid(v) => bad_request(&v),
            IdempotencyError::OtherRequest { .. } => Status::with_error_details(
                Code::InvalidArgument,
                message.clone(),
                ErrorDetails::with_bad_request(vec![FieldViolation::new(
                    idempotency::model::FIELD,
                    message,
                )]),
            ),
            IdempotencyError::InFlight(_) | IdempotencyError::LeaseLost(_) => retry_later(
                Code::Aborted,
                message,
                "IDEMPOTENCY_KEY_IN_USE",
                idempotency::RETRY_AFTER,
            ),
            IdempotencyError::Replayed {
                key, resource_id, ..
            } => {
                let metadata = HashMap::from([
                    ("idempotency_key".to_string(), key.to_string()),
                    ("resource_id".to_string(), resource_id),
                ]);
                let mut status = Status::with_error_details(
                    Code::AlreadyExists,
                    message,
                    ErrorDetails::with_error_info("IDEMPOTENT_REPLAY", DOMAIN, metadata),
                );
                idempotency::mark_replayed(status.metadata_mut());
                status
            }
            IdempotencyError::Store(s) => s.into(),
            e @ IdempotencyError::Decode { .. } => internal(&e),
        }
    }
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Self {
        let message = e.to_string();
        match e {
            AuthError::MissingCredentials => {
                error_info(Code::Unauthenticated, message, "MISSING_CREDENTIALS")
            }
            AuthError::InvalidCredentials(_) => {
                error_info(Code::Unauthenticated, message, "INVALID_CREDENTIALS")
            }
            AuthError::KeyRejected(failure) => {
                let (code, reason) = match failure {
                    VerifyFailure::Malformed(_) => (Code::Unauthenticated, "API_KEY_MALFORMED"),
                    VerifyFailure::NotFound => (Code::Unauthenticated, "API_KEY_INVALID"),
                    VerifyFailure::Revoked => (Code::Unauthenticated, "API_KEY_REVOKED"),
                    VerifyFailure::Expired => (Code::Unauthenticated, "API_KEY_EXPIRED"),
                    VerifyFailure::IpNotAllowed => {
                        (Code::PermissionDenied, "API_KEY_IP_NOT_ALLOWED")
                    }
                    VerifyFailure::TooManyAttempts { retry_after } => {
                        return retry_later(
                            Code::ResourceExhausted,
                            message,
                            "API_KEY_TOO_MANY_ATTEMPTS",
                            retry_after,
                        );
                    }
                };
                error_info(code, message, reason)
            }
            AuthError::TooManyAttempts { retry_after } => retry_later(
                Code::ResourceExhausted,
                message,
                "API_KEY_TOO_MANY_ATTEMPTS",
                retry_after,
            ),
            AuthError::PermissionDenied(_) => {
                error_info(Code::PermissionDenied, message, "PERMISSION_DENIED")
            }
            AuthError::InternalOnly => error_info(Code::PermissionDenied, message, "INTERNAL_ONLY"),
            AuthError::UnknownServiceToken => {
                error_info(Code::Unauthenticated, message, "SERVICE_TOKEN_INVALID")
            }
            AuthError::RpcNotAllowed { .. } => {
                error_info(Code::PermissionDenied, message, "RPC_NOT_ALLOWED")
            }
            AuthError::NoTenant => error_info(Code::PermissionDenied, message, "TENANT_REQUIRED"),
            AuthError::Unavailable(why) => {
                tracing::warn!(error = %why, "authentication backend unavailable");
                retry_later(
                    Code::Unavailable,
                    "authentication temporarily unavailable",
                    "AUTH_UNAVAILABLE",
                    Duration::from_secs(1),
                )
            }
        }
    }
}

impl From<RateLimitError> for Status {
    fn from(e: RateLimitError) -> Self {
        match e {
            RateLimitError::Exceeded { subject, decision } => {
                let tight = decision
                    .windows
                    .iter()
                    .find(|w| w.remaining == 0)
                    .unwrap_or(decision.tightest());
                let what = format!(
                    "{} calls per {} s ({} window)",
                    tight.window.limit, tight.window.seconds, tight.window.name
                );
                let retry = decision.retry_after.unwrap_or_default();
                let mut details = ErrorDetails::with_retry_info(Some(retry));
                details.set_error_info("RATE_LIMITED", DOMAIN, HashMap::new());
                details.add_quota_failure_violation(subject, what.clone());
                let mut status = Status::with_error_details(
                    Code::ResourceExhausted,
                    format!(
                        "rate limit exceeded: {what}; retry in {} s",
                        retry_after_secs(retry)
                    ),
                    details,
                );
                for (name, value) in decision.headers() {
                    if let Ok(value) = MetadataValue::try_from(value.as_str()) {
                        status.metadata_mut().insert(name, value);
                    }
                }
                status
            }
            RateLimitError::QuotaExhausted { tenant, usage } => {
                let until = (usage.reset - chrono::Utc::now())
                    .to_std()
                    .unwrap_or_default();
                let what = format!("{} of {} used this month", usage.used, usage.limit);
                let mut details = ErrorDetails::with_retry_info(Some(until));
                details.set_error_info("QUOTA_EXHAUSTED", DOMAIN, HashMap::new());
                details.add_quota_failure_violation(
                    format!("tenant:{tenant}"),
                    format!("{}: {what}", usage.metric.as_str()),
                );
                let mut status = Status::with_error_details(
                    Code::ResourceExhausted,
                    format!(
                        "monthly quota exhausted ({}: {what}); it resets at {}",
                        usage.metric.as_str(),
                        usage.reset.to_rfc3339()
                    ),
                    details,
                );
                if let Ok(v) = MetadataValue::try_from(retry_after_secs(until).to_string().as_str())
                {
                    status.metadata_mut().insert("retry-after", v);
                }
                status
            }
            RateLimitError::Unavailable => retry_later(
                Code::Unavailable,
                "rate limiting temporarily unavailable",
                "RATE_LIMIT_UNAVAILABLE",
                Duration::from_secs(1),
            ),
            e @ RateLimitError::Script(_) => internal(&e),
        }
    }
}

impl From<CreditError> for Status {
    fn from(e: CreditError) -> Self {
        match e {
            CreditError::Invalid(v) => bad_request(&v),
            CreditError::InsufficientCredits { balance, requested } => {
                let metadata = HashMap::from([
                    ("balance".to_string(), balance.to_string()),
                    ("requested".to_string(), requested.to_string()),
                ]);
                Status::with_error_details(
                    Code::FailedPrecondition,
                    format!("insufficient credits: balance {balance}, requested {requested}"),
                    ErrorDetails::with_error_info("INSUFFICIENT_CREDITS", DOMAIN, metadata),
                )
            }
            CreditError::Conflict(_) => {
                error_info(Code::AlreadyExists, e.to_string(), "IDEMPOTENCY_KEY_REUSED")
            }
            CreditError::Store(s) => s.into(),
        }
    }
}

impl From<UsageError> for Status {
    fn from(e: UsageError) -> Self {
        match e {
            UsageError::Invalid(v) => bad_request(&v),
            UsageError::Auth(a) => a.into(),
            UsageError::Store(s) => s.into(),
            UsageError::Credits(c) => c.into(),
            UsageError::RateLimit(r) => r.into(),
        }
    }
}

impl From<ApiKeyError> for Status {
    fn from(e: ApiKeyError) -> Self {
        match e {
            ApiKeyError::Invalid(v) => bad_request(&v),
            ApiKeyError::NotFound(_) => {
                error_info(Code::NotFound, e.to_string(), "API_KEY_NOT_FOUND")
            }
            ApiKeyError::PermissionDenied(_) => {
                error_info(Code::PermissionDenied, e.to_string(), "PERMISSION_DENIED")
            }
            ApiKeyError::FailedPrecondition(_) => error_info(
                Code::FailedPrecondition,
                e.to_string(),
                "FAILED_PRECONDITION",
            ),
            ApiKeyError::GraceInProgress { until, .. } => Status::with_error_details(
                Code::FailedPrecondition,
                e.to_string(),
                ErrorDetails::with_error_info(
                    "PREVIOUS_SECRET_IN_GRACE",
                    DOMAIN,
                    HashMap::from([(
                        "previous_secret_expire_time".to_string(),
                        until.to_rfc3339(),
                    )]),
                ),
            ),
            ApiKeyError::Aborted(_) => {
                error_info(Code::Aborted, e.to_string(), "CONCURRENT_CHANGE")
            }
            ApiKeyError::Auth(a) => a.into(),
            ApiKeyError::RateLimit(r) => r.into(),
            ApiKeyError::Store(s) => s.into(),
            ApiKeyError::Event(ev) => ev.into(),
            ApiKeyError::Idempotency(i) => i.into(),
            e @ ApiKeyError::Hashing(_) => internal(&e),
        }
    }
}

impl From<EventError> for Status {
    fn from(e: EventError) -> Self {
        match e {
            EventError::UnknownType(_) => {
                error_info(Code::NotFound, e.to_string(), "EVENT_TYPE_NOT_FOUND")
            }
            EventError::InvalidPayload(v) | EventError::InvalidPattern(v) => bad_request(&v),
            EventError::Store(s) => s.into(),
            e @ (EventError::BadSchema { .. } | EventError::OwnEventInvalid { .. }) => internal(&e),
        }
    }
}

/// RabbitMQ down or not confirming: the caller may retry (what was queued before the
/// failure is deduplicated by the consumers).
impl From<MqError> for Status {
    fn from(e: MqError) -> Self {
        tracing::warn!(error = %e, "RabbitMQ unavailable");
        retry_later(
            Code::Unavailable,
            "message queue temporarily unavailable",
            "MESSAGE_QUEUE_UNAVAILABLE",
            Duration::from_secs(1),
        )
    }
}

impl From<WebhookError> for Status {
    fn from(e: WebhookError) -> Self {
        match e {
            WebhookError::Invalid(v) => bad_request(&v),
            WebhookError::NotFound(_) => {
                error_info(Code::NotFound, e.to_string(), "WEBHOOK_ENDPOINT_NOT_FOUND")
            }
            WebhookError::EventNotFound(_) => {
                error_info(Code::NotFound, e.to_string(), "EVENT_NOT_FOUND")
            }
            WebhookError::DeliveryNotFound(_) => {
                error_info(Code::NotFound, e.to_string(), "WEBHOOK_DELIVERY_NOT_FOUND")
            }
            WebhookError::FailedPrecondition(_) => error_info(
                Code::FailedPrecondition,
                e.to_string(),
                "FAILED_PRECONDITION",
            ),
            WebhookError::EncryptionNotConfigured => error_info(
                Code::FailedPrecondition,
                e.to_string(),
                "ENCRYPTION_NOT_CONFIGURED",
            ),
            WebhookError::GraceInProgress { until, .. } => Status::with_error_details(
                Code::FailedPrecondition,
                e.to_string(),
                ErrorDetails::with_error_info(
                    "PREVIOUS_SECRET_IN_GRACE",
                    DOMAIN,
                    HashMap::from([(
                        "previous_secret_expire_time".to_string(),
                        until.to_rfc3339(),
                    )]),
                ),
            ),
            WebhookError::Auth(a) => a.into(),
            WebhookError::Store(s) => s.into(),
            WebhookError::Event(ev) => ev.into(),
            WebhookError::Mq(m) => m.into(),
            WebhookError::Idempotency(i) => i.into(),
            e @ (WebhookError::SecretBox(_) | WebhookError::Signing(_)) => internal(&e),
        }
    }
}

/// The Asset and User/Team services' failures: never a hang, never an opaque INTERNAL for
/// what the caller can act on. A deadline is answered as UNAVAILABLE (devgate's own budget
/// ran out, the client may retry), an open breaker with the rest of its cooldown.
impl From<UpstreamError> for Status {
    fn from(e: UpstreamError) -> Self {
        let message = e.to_string();
        match e {
            // ASSET_NOT_FOUND, USER_NOT_FOUND, TEAM_NOT_FOUND (and PROJECT_NOT_FOUND).
            UpstreamError::NotFound { kind, .. } => error_info(
                Code::NotFound,
                message,
                &format!("{}_NOT_FOUND", kind.to_ascii_uppercase()),
            ),
            UpstreamError::InvalidArgument(v) => bad_request(&v),
            // The cause (transport errors) is logged, not sent.
            UpstreamError::Unavailable { service, .. } => {
                tracing::warn!(error = %message, "upstream unavailable");
                retry_later(
                    Code::Unavailable,
                    format!("the {service} is temporarily unavailable"),
                    "UPSTREAM_UNAVAILABLE",
                    Duration::from_secs(1),
                )
            }
            UpstreamError::DeadlineExceeded { .. } => {
                tracing::warn!(error = %message, "upstream deadline exceeded");
                retry_later(
                    Code::Unavailable,
                    message,
                    "UPSTREAM_DEADLINE_EXCEEDED",
                    Duration::from_secs(1),
                )
            }
            UpstreamError::CircuitOpen { retry_after, .. } => retry_later(
                Code::Unavailable,
                message,
                "UPSTREAM_CIRCUIT_OPEN",
                retry_after,
            ),
            UpstreamError::NotConfigured(_) => {
                tracing::warn!(error = %message, "upstream not configured");
                error_info(Code::Unavailable, message, "UPSTREAM_NOT_CONFIGURED")
            }
            e @ (UpstreamError::Unexpected { .. } | UpstreamError::BadAnswer { .. }) => {
                internal(&e)
            }
        }
    }
}

impl From<DirectoryError> for Status {
    fn from(e: DirectoryError) -> Self {
        match e {
            DirectoryError::Invalid(v) => bad_request(&v),
            DirectoryError::Auth(a) => a.into(),
            DirectoryError::Upstream(u) => u.into(),
        }
    }
}

impl From<GenerationError> for Status {
    fn from(e: GenerationError) -> Self {
        match e {
            GenerationError::Invalid(v) => bad_request(&v),
            GenerationError::NotFound(_) => {
                error_info(Code::NotFound, e.to_string(), "GENERATION_NOT_FOUND")
            }
            GenerationError::Ended { .. } => {
                error_info(Code::FailedPrecondition, e.to_string(), "GENERATION_ENDED")
            }
            GenerationError::InsufficientCredits { balance, cost } => {
                let metadata = HashMap::from([
                    ("balance".to_string(), balance.to_string()),
                    ("cost".to_string(), cost.to_string()),
                ]);
                Status::with_error_details(
                    Code::FailedPrecondition,
                    e.to_string(),
                    ErrorDetails::with_error_info("INSUFFICIENT_CREDITS", DOMAIN, metadata),
                )
            }
            GenerationError::Quota(q) => q.into(),
            GenerationError::Auth(a) => a.into(),
            GenerationError::Store(s) => s.into(),
            GenerationError::Event(ev) => ev.into(),
            GenerationError::Idempotency(i) => i.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_violations_become_bad_request_details() {
        let mut v = Violations::new();
        v.add("name", "required");
        v.add("scopes", "unknown scope \"x\"");
        let status: Status = ApiKeyError::Invalid(v).into();
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let br = details.bad_request().expect("BadRequest details");
        assert_eq!(br.field_violations.len(), 2);
        assert_eq!(br.field_violations[0].field, "name");
    }

    #[test]
    fn throttling_carries_retry_info_and_header() {
        let status: Status = AuthError::TooManyAttempts {
            retry_after: Duration::from_secs(42),
        }
        .into();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.metadata().get("retry-after").unwrap(), "42");
        assert!(status.get_error_details().retry_info().is_some());
    }

    #[test]
    fn store_errors_do_not_leak() {
        let status: Status = StoreError::Query(diesel::result::Error::RollbackTransaction).into();
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
    }

    #[test]
    fn upstream_failures_are_retryable_unavailable() {
        use crate::generation::upstream::Service;
        let status: Status = UpstreamError::CircuitOpen {
            service: Service::Assets,
            retry_after: Duration::from_secs(7),
        }
        .into();
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.metadata().get("retry-after").unwrap(), "7");
        let retry = status.get_error_details().retry_info().cloned().unwrap();
        assert_eq!(retry.retry_delay, Some(Duration::from_secs(7)));
        let status: Status = UpstreamError::DeadlineExceeded {
            service: Service::UserTeam,
            timeout: Duration::from_secs(2),
        }
        .into();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.get_error_details().retry_info().is_some());
        let status: Status = UpstreamError::Unexpected {
            service: Service::Assets,
            rpc: "GetAsset",
            status: Status::permission_denied("secret detail"),
        }
        .into();
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("secret detail"));
    }
}
