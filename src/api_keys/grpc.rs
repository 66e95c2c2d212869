//! The tonic implementations of `devgate.v1.ApiKeyService` and
//! `devgate.internal.v1.ApiKeyService`: validate and convert, call the
//! service, convert back. No rules live here.

use std::{net::IpAddr, sync::Arc};

use chrono::{DateTime, Utc};
use tonic::{Request, Response, Status};

use super::{
    ApiKeyError,
    model::{self, ApiKey, ApiKeyChanges, KeyState, ListFilter, NewApiKey},
    service::{ApiKeys, Refusal, Verification},
};
use crate::identity::{Environment, KeyId};
use crate::{
    auth::{VerifyFailure, principal},
    idempotency,
    identity::Scope,
    pagination,
    proto::{
        convert::{from_duration, from_timestamp, opt_timestamp, timestamp},
        internal::v1::{
            self as internal, api_key_service_server::ApiKeyService as InternalApiKeyService,
        },
        v1::{self, api_key_service_server::ApiKeyService},
    },
    ratelimit::{
        grpc::{plan_to_proto, rate_limits_from_proto, rate_limits_to_proto},
        model::retry_after_secs,
    },
    validation::Violations,
};

pub struct ApiKeyGrpc {
    keys: Arc<ApiKeys>,
}

impl ApiKeyGrpc {
    pub fn new(keys: Arc<ApiKeys>) -> Self {
        Self { keys }
    }
}

/// The RPC an idempotency key of CreateApiKey is bound to.
const CREATE_API_KEY: &str = "devgate.v1.ApiKeyService/CreateApiKey";

/// The most a consuming verification may cost.
const MAX_COST: u32 = 1000;

type RpcResult<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl ApiKeyService for ApiKeyGrpc {
    async fn create_api_key(
        &self,
        req: Request<v1::CreateApiKeyRequest>,
    ) -> RpcResult<v1::CreateApiKeyResponse> {
        let principal = principal(&req)?;
        // Authorize before validating: a caller who may not create learns nothing more, and
        // no validation work is done for them.
        authorize(principal, Scope::ApiKeysWrite)?;
        let new = new_api_key(req.get_ref(), Utc::now()).map_err(ApiKeyError::from)?;
        let claim = idempotency::claim(&req, CREATE_API_KEY)?;
        let (key, token) = self.keys.create(principal, new, claim).await?;
        Ok(Response::new(v1::CreateApiKeyResponse {
            api_key: Some(to_proto(&key)),
            secret: token.token,
        }))
    }

    async fn list_api_keys(
        &self,
        req: Request<v1::ListApiKeysRequest>,
    ) -> RpcResult<v1::ListApiKeysResponse> {
        let principal = principal(&req)?;
        authorize(principal, Scope::ApiKeysRead)?;
        let r = req.get_ref();
        let mut v = Violations::new();
        let page_size = pagination::page_size(r.page_size, &mut v);
        let after = pagination::decode_token(&r.page_token, &mut v);
        let filter = ListFilter {
            state: optional_state(r.state, "state", &mut v),
            environment: optional_environment(r.environment, "environment", &mut v),
        };
        v.into_result(()).map_err(ApiKeyError::from)?;
        let page = self.keys.list(principal, filter, after, page_size).await?;
        Ok(Response::new(v1::ListApiKeysResponse {
            api_keys: page.keys.iter().map(to_proto).collect(),
            next_page_token: page
                .next
                .as_ref()
                .map(pagination::encode_token)
                .unwrap_or_default(),
        }))
    }

    async fn get_api_key(&self, req: Request<v1::GetApiKeyRequest>) -> RpcResult<v1::ApiKey> {
        let principal = principal(&req)?;
        authorize(principal, Scope::ApiKeysRead)?;
        let id = key_id(&req.get_ref().id, "id")?;
        let key = self.keys.get(principal, &id).await?;
        Ok(Response::new(to_proto(&key)))
    }

    async fn update_api_key(&self, req: Request<v1::UpdateApiKeyRequest>) -> RpcResult<v1::ApiKey> {
        let principal = principal(&req)?;
        authorize(principal, Scope::ApiKeysWrite)?;
        let r = req.get_ref();
        let Some(patch) = &r.api_key else {
            return Err(ApiKeyError::Invalid(Violations::one(
                "api_key",
                "required: the key's id and new values",
            ))
            .into());
        };
        let id = key_id(&patch.id, "api_key.id")?;
        let changes =
            changes(patch, r.update_mask.as_ref(), Utc::now()).map_err(ApiKeyError::from)?;
        let key = self.keys.update(principal, &id, changes).await?;
        Ok(Response::new(to_proto(&key)))
    }

    async fn revoke_api_key(&self, req: Request<v1::RevokeApiKeyRequest>) -> RpcResult<v1::ApiKey> {
        let principal = principal(&req)?;
        authorize(principal, Scope::ApiKeysWrite)?;
        let r = req.get_ref();
        let id = key_id(&r.id, "id")?;
        let mut v = Violations::new();
        v.check(
            r.reason.chars().count() <= model::MAX_REVOKE_REASON_CHARS,
            "reason",
            "at most 500 characters",
        );
        v.into_result(()).map_err(ApiKeyError::from)?;
        let key = self.keys.revoke(principal, &id, r.reason.trim()).await?;
        Ok(Response::new(to_proto(&key)))
    }

    async fn rotate_api_key(
        &self,
        req: Request<v1::RotateApiKeyRequest>,
    ) -> RpcResult<v1::RotateApiKeyResponse> {
        let principal = principal(&req)?;
        authorize(principal, Scope::ApiKeysWrite)?;
        let r = req.get_ref();
        let id = key_id(&r.id, "id")?;
        let max = self.keys.config().rotation_grace_max;
        // Unset or zero (`{}` in JSON, which the transcoder reads as zero) is the default
        // grace: ending a secret at once is only ever the explicit `end_grace_now`.
        let grace = match r.grace_period.as_ref().map(from_duration) {
            None => None,
            Some(Some(g)) if g.is_zero() => None,
            Some(Some(_)) if r.end_grace_now => {
                return Err(ApiKeyError::Invalid(Violations::one(
                    "grace_period",
                    "must be unset when end_grace_now is true",
                ))
                .into());
            }
            Some(Some(g)) if g <= max => Some(g),
            Some(Some(_)) => {
                let msg = format!("at most {}", humantime::format_duration(max));
                return Err(ApiKeyError::Invalid(Violations::one("grace_period", msg)).into());
            }
            Some(None) => {
                return Err(ApiKeyError::Invalid(Violations::one(
                    "grace_period",
                    "must not be negative",
                ))
                .into());
            }
        };
        let (key, token) = self
            .keys
            .rotate(principal, &id, grace, r.end_grace_now)
            .await?;
        Ok(Response::new(v1::RotateApiKeyResponse {
            api_key: Some(to_proto(&key)),
            secret: token.token,
        }))
    }

    async fn delete_api_key(&self, req: Request<v1::DeleteApiKeyRequest>) -> RpcResult<()> {
        let principal = principal(&req)?;
        authorize(principal, Scope::ApiKeysWrite)?;
        let id = key_id(&req.get_ref().id, "id")?;
        self.keys.delete(principal, &id).await?;
        Ok(Response::new(()))
    }
}

/// `devgate.internal.v1.ApiKeyService`: verification for the platform's services. The auth
/// layer has already checked the caller's service token and that it may call this RPC.
/// Header slots of a VerifyApiKey response: up to 6 rate-limit headers, and room for
/// those tonic and the layers add.
const RESPONSE_HEADERS: usize = 12;

#[tonic::async_trait]
impl InternalApiKeyService for ApiKeyGrpc {
    async fn verify_api_key(
        &self,
        req: Request<internal::VerifyApiKeyRequest>,
    ) -> RpcResult<internal::VerifyApiKeyResponse> {
        let principal = principal(&req)?;
        principal.require_internal().map_err(ApiKeyError::from)?;
        let r = req.get_ref();
        let mut v = Violations::new();
        v.check(!r.token.is_empty(), "token", "required");
        let required: Option<Scope> = match r.required_scope.as_str() {
            "" => None,
            s => s
                .parse()
                .map_err(|e: crate::identity::UnknownScope| v.add("required_scope", e.to_string()))
                .ok(),
        };
        let client_ip: Option<IpAddr> = match r.client_ip.as_str() {
            "" => None,
            s => s
                .parse()
                .map_err(|_| v.add("client_ip", "not an IPv4 or IPv6 address"))
                .ok(),
        };
        let cost = match r.cost {
            0 => 1,
            c => c,
        };
        v.check(cost <= MAX_COST, "cost", format!("at most {MAX_COST}"));
        v.into_result(()).map_err(ApiKeyError::from)?;

        let checked = self
            .keys
            .verify_for_service(
                principal,
                &Verification {
                    token: &r.token,
                    required_scope: required,
                    client_ip,
                    consume: r.consume.then_some(cost),
                    operation: &r.operation,
                },
            )
            .await?;
        let Some(key) = checked.key else {
            let reason = checked
                .refusal
                .map_or(internal::VerifyFailureReason::Unspecified, refusal_to_proto);
            return Ok(Response::new(internal::VerifyApiKeyResponse {
                valid: false,
                failure_reason: reason as i32,
                ..Default::default()
            }));
        };
        let reason = checked
            .refusal
            .map_or(internal::VerifyFailureReason::Unspecified, refusal_to_proto);
        let rate_limit = checked.decision.as_ref().map(|decision| {
            let tight = decision.tightest();
            internal::RateLimitStatus {
                window: tight.window.name.to_string(),
                limit: tight.window.limit,
                remaining: tight.remaining,
                reset_seconds: tight.reset,
                retry_after_seconds: decision.retry_after.map(retry_after_secs).unwrap_or(0),
            }
        });
        // Sized for the rate-limit headers and what tonic and the layers add (content-type,
        // x-request-id): growing a header map rehashes it, on every consuming call.
        let mut headers = http::HeaderMap::with_capacity(RESPONSE_HEADERS);
        for (name, value) in checked.decision.map(|d| d.headers()).unwrap_or_default() {
            if let Ok(value) = http::HeaderValue::try_from(value) {
                headers.insert(name, value);
            }
        }
        Ok(Response::from_parts(
            tonic::metadata::MetadataMap::from_headers(headers),
            internal::VerifyApiKeyResponse {
                valid: checked.refusal.is_none(),
                failure_reason: reason as i32,
                tenant_id: key.tenant_id.to_string(),
                key_id: key.key_id.to_string(),
                scopes: key.scopes.to_strings(),
                plan: plan_to_proto(key.plan) as i32,
                environment: environment_to_proto(key.environment) as i32,
                rate_limit,
            },
            tonic::Extensions::default(),
        ))
    }
}

/// The tenant and scope check the service repeats, done before any validation.
fn authorize(principal: &crate::auth::Principal, scope: Scope) -> Result<(), Status> {
    principal
        .tenant_with(scope)
        .map(drop)
        .map_err(|e| ApiKeyError::from(e).into())
}

fn key_id(raw: &str, field: &str) -> Result<KeyId, Status> {
    raw.parse::<KeyId>()
        .map_err(|e| ApiKeyError::Invalid(Violations::one(field, e.to_string())).into())
}

fn new_api_key(r: &v1::CreateApiKeyRequest, now: DateTime<Utc>) -> Result<NewApiKey, Violations> {
    let mut v = Violations::new();
    let name = model::validate_name(&r.name, "name", &mut v);
    let description = model::validate_description(&r.description, "description", &mut v);
    let scopes = model::validate_scopes(&r.scopes, "scopes", &mut v);
    let environment = optional_environment(r.environment, "environment", &mut v);
    if environment.is_none() && r.environment == 0 {
        v.add(
            "environment",
            "required: ENVIRONMENT_LIVE or ENVIRONMENT_TEST",
        );
    }
    let expire_time = expire_time(r.expire_time.as_ref(), now, "expire_time", &mut v);
    let allowed_cidrs = model::validate_cidrs(&r.allowed_cidrs, "allowed_cidrs", &mut v);
    let rate_limits = rate_limits_from_proto(r.rate_limits.as_ref(), "rate_limits", &mut v);
    v.into_result(NewApiKey {
        name,
        description,
        scopes,
        environment: environment.unwrap_or(Environment::Test),
        expire_time,
        allowed_cidrs,
        rate_limits,
    })
}

/// The changes the mask names; with no mask, every field set to a non-empty value.
fn changes(
    patch: &v1::ApiKey,
    mask: Option<&prost_types::FieldMask>,
    now: DateTime<Utc>,
) -> Result<ApiKeyChanges, Violations> {
    const UPDATABLE: [&str; 6] = [
        "name",
        "description",
        "scopes",
        "expire_time",
        "allowed_cidrs",
        "rate_limits",
    ];
    let mut v = Violations::new();
    let present = [
        !patch.name.is_empty(),
        !patch.description.is_empty(),
        !patch.scopes.is_empty(),
        patch.expire_time.is_some(),
        !patch.allowed_cidrs.is_empty(),
        patch.rate_limits.is_some(),
    ];
    let named = crate::validation::update_paths(mask, &UPDATABLE, &present, &mut v);
    let mut c = ApiKeyChanges::default();
    for path in named {
        let field = format!("api_key.{path}");
        match path {
            "name" => c.name = Some(model::validate_name(&patch.name, &field, &mut v)),
            "description" => {
                c.description = Some(model::validate_description(
                    &patch.description,
                    &field,
                    &mut v,
                ))
            }
            "scopes" => c.scopes = Some(model::validate_scopes(&patch.scopes, &field, &mut v)),
            "expire_time" => {
                c.expire_time = Some(expire_time(patch.expire_time.as_ref(), now, &field, &mut v))
            }
            "allowed_cidrs" => {
                c.allowed_cidrs = Some(model::validate_cidrs(&patch.allowed_cidrs, &field, &mut v))
            }
            "rate_limits" => {
                c.rate_limits = Some(rate_limits_from_proto(
                    patch.rate_limits.as_ref(),
                    &field,
                    &mut v,
                ))
            }
            _ => {} // update_paths returns only the names above
        }
    }
    v.into_result(c)
}

fn expire_time(
    t: Option<&prost_types::Timestamp>,
    now: DateTime<Utc>,
    field: &str,
    v: &mut Violations,
) -> Option<DateTime<Utc>> {
    let t = t?;
    match from_timestamp(t) {
        Some(at) => {
            model::validate_expire_time(at, now, field, v);
            Some(at)
        }
        None => {
            v.add(field, "not a valid timestamp");
            None
        }
    }
}

fn optional_environment(raw: i32, field: &str, v: &mut Violations) -> Option<Environment> {
    match v1::Environment::try_from(raw) {
        Ok(v1::Environment::Unspecified) => None,
        Ok(v1::Environment::Live) => Some(Environment::Live),
        Ok(v1::Environment::Test) => Some(Environment::Test),
        Err(_) => {
            v.add(field, format!("unknown environment {raw}"));
            None
        }
    }
}

fn optional_state(raw: i32, field: &str, v: &mut Violations) -> Option<KeyState> {
    match v1::ApiKeyState::try_from(raw) {
        Ok(v1::ApiKeyState::Unspecified) => None,
        Ok(v1::ApiKeyState::Active) => Some(KeyState::Active),
        Ok(v1::ApiKeyState::Revoked) => Some(KeyState::Revoked),
        Ok(v1::ApiKeyState::Expired) => Some(KeyState::Expired),
        Err(_) => {
            v.add(field, format!("unknown state {raw}"));
            None
        }
    }
}

pub fn to_proto(key: &ApiKey) -> v1::ApiKey {
    let now = Utc::now();
    v1::ApiKey {
        id: key.id.to_string(),
        prefix: key.prefix(),
        name: key.name.clone(),
        description: key.description.clone(),
        scopes: key.scopes.to_strings(),
        environment: environment_to_proto(key.environment) as i32,
        state: match key.state(now) {
            KeyState::Active => v1::ApiKeyState::Active,
            KeyState::Revoked => v1::ApiKeyState::Revoked,
            KeyState::Expired => v1::ApiKeyState::Expired,
        } as i32,
        allowed_cidrs: key.allowed_cidrs.iter().map(ToString::to_string).collect(),
        expire_time: opt_timestamp(key.expire_time),
        create_time: Some(timestamp(key.create_time)),
        update_time: Some(timestamp(key.update_time)),
        last_used_time: opt_timestamp(key.last_used_time),
        revoke_time: opt_timestamp(key.revoke_time),
        revoke_reason: key.revoke_reason.clone().unwrap_or_default(),
        previous_secret_expire_time: opt_timestamp(key.live_previous_secret_expire_time(now)),
        created_by: key.created_by.clone(),
        rate_limits: rate_limits_to_proto(&key.rate_limits),
    }
}

fn environment_to_proto(e: Environment) -> v1::Environment {
    match e {
        Environment::Live => v1::Environment::Live,
        Environment::Test => v1::Environment::Test,
    }
}

fn refusal_to_proto(r: Refusal) -> internal::VerifyFailureReason {
    match r {
        Refusal::Key(f) => failure_to_proto(f),
        Refusal::InsufficientScope => internal::VerifyFailureReason::InsufficientScope,
        Refusal::RateLimited => internal::VerifyFailureReason::RateLimited,
        Refusal::QuotaExhausted => internal::VerifyFailureReason::QuotaExhausted,
    }
}

fn failure_to_proto(f: VerifyFailure) -> internal::VerifyFailureReason {
    match f {
        VerifyFailure::Malformed(_) => internal::VerifyFailureReason::Malformed,
        VerifyFailure::NotFound => internal::VerifyFailureReason::NotFound,
        VerifyFailure::Revoked => internal::VerifyFailureReason::Revoked,
        VerifyFailure::Expired => internal::VerifyFailureReason::Expired,
        VerifyFailure::IpNotAllowed => internal::VerifyFailureReason::IpNotAllowed,
        VerifyFailure::TooManyAttempts { .. } => internal::VerifyFailureReason::TooManyAttempts,
    }
}
