//! The tower layer that resolves the [`Principal`] of every call before the handler runs
//! and stores it in the request extensions; the [`Authenticator`] that turns a public call's
//! credentials (API key or user JWT) into one.

use std::{
    net::IpAddr,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures_util::future::BoxFuture;
use http::HeaderMap;
use tonic::Status;
use tower::{Layer, Service};

use super::{client_ip::TrustedProxies, context::CallIdentity};
use crate::{
    api_keys::verifier::KeyVerifier,
    auth::{
        AuthError, Principal, ServiceIdentity, UserPrincipal, VerifyFailure, jwt, mtls,
        service_token::{INTERNAL_PACKAGE, ServiceCallers},
    },
    db::StoreError,
    identity::TenantId,
    ratelimit::{Decision, Limits, RateLimitError, RateLimiter},
    tenants::TenantDirectory,
};

/// How long a tenant's limits for user calls are trusted without re-reading them: user
/// calls are rate limited before every handler, so they must not read Postgres each time.
const USER_LIMITS_TTL: Duration = Duration::from_secs(30);

/// Which listener the layer guards.
#[derive(Clone)]
pub enum Listener {
    /// Behind Envoy: API keys and user JWTs.
    Public {
        authenticator: Arc<Authenticator>,
        limiter: Arc<RateLimiter>,
        trusted_proxies: TrustedProxies,
    },
    /// The platform's services: each call carries a service token (or a client
    /// certificate) of a configured caller allowed to call that RPC.
    Internal { callers: Arc<ServiceCallers> },
}

#[derive(Clone)]
pub struct AuthLayer {
    listener: Listener,
}

impl AuthLayer {
    pub fn new(listener: Listener) -> Self {
        Self { listener }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            listener: self.listener.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    listener: Listener,
}

impl<S, B> Service<http::Request<B>> for AuthService<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The ready inner service goes into the future; a fresh clone stays for next time.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let listener = self.listener.clone();
        Box::pin(async move {
            // Health checks and reflection are open, as grpcurl and probes expect.
            if req.uri().path().starts_with("/grpc.") {
                return inner.call(req).await;
            }
            let (principal, limiter) = match &listener {
                Listener::Internal { callers } => (authenticate_service(&req, callers), None),
                Listener::Public {
                    authenticator,
                    limiter,
                    trusted_proxies,
                } => {
                    let ip = trusted_proxies.of_request(&req);
                    (
                        authenticator.authenticate(req.headers(), ip).await,
                        Some(limiter),
                    )
                }
            };
            let principal = match principal {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(error = %e, path = req.uri().path(), "call not authenticated");
                    return Ok(Status::from(e).into_http());
                }
            };
            let identity = identity(&principal);
            // Every API-key and user call pays one token, before the handler runs.
            let mut rate_headers = Vec::new();
            if let Some(limiter) = limiter {
                let admitted = match (&principal, &listener) {
                    (Principal::ApiKey(key), _) => Some(
                        limiter
                            .admit(
                                key.tenant_id,
                                key.key_id.as_str(),
                                &key.limits,
                                &key.quotas,
                                1,
                            )
                            .await,
                    ),
                    // DEVGATE_RATE_LIMIT_FAIL_CLOSED is about API keys: while Redis (or the
                    // tenant's limits) cannot be read, portal users keep working.
                    (Principal::User(user), Listener::Public { authenticator, .. }) => {
                        match admit_user(authenticator, limiter, user).await {
                            Err(RateLimitError::Unavailable) => None,
                            admitted => Some(admitted),
                        }
                    }
                    _ => None,
                };
                match admitted {
                    Some(Ok(decision)) => rate_headers = decision.headers(),
                    Some(Err(refused)) => {
                        let mut response = Status::from(refused).into_http();
                        response.extensions_mut().extend(identity);
                        return Ok(response);
                    }
                    None => {}
                }
            }
            req.extensions_mut().insert(principal);
            let mut response = inner.call(req).await?;
            response.extensions_mut().extend(identity);
            for (name, value) in rate_headers {
                if let Ok(value) = http::HeaderValue::from_str(&value) {
                    response.headers_mut().insert(name, value);
                }
            }
            Ok(response)
        })
    }
}

/// One user call: a token from the (tenant, user) bucket, sized by the tenant's plan.
/// Not the monthly request quota: that is the tenant's paid API allowance, and the portal
/// must stay usable (to read usage, rotate keys) when it is used up.
async fn admit_user(
    authenticator: &Authenticator,
    limiter: &RateLimiter,
    user: &UserPrincipal,
) -> Result<Decision, RateLimitError> {
    let limits = authenticator
        .user_limits(user.tenant_id)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "tenant limits unavailable");
            RateLimitError::Unavailable
        })?;
    // "user:" keeps the bucket apart from every key's (key ids are base62 only).
    let bucket = format!("user:{}", user.user_id);
    let decision = limiter.check(user.tenant_id, &bucket, &limits, 1).await?;
    if decision.allowed {
        Ok(decision)
    } else {
        Err(RateLimitError::Exceeded {
            subject: bucket,
            decision,
        })
    }
}

/// What the usage layer records about the caller; none for services (their calls are
/// recorded by the RPCs that act for a tenant, e.g. consuming verifications).
fn identity(principal: &Principal) -> http::Extensions {
    let mut ext = http::Extensions::new();
    let id = match principal {
        Principal::ApiKey(k) => CallIdentity {
            tenant_id: k.tenant_id,
            api_key_id: Some(k.key_id.to_string()),
            user_id: None,
            cost: 1,
        },
        Principal::User(u) => CallIdentity {
            tenant_id: u.tenant_id,
            api_key_id: None,
            user_id: Some(u.user_id.clone()),
            cost: 0,
        },
        Principal::Service(_) => return ext,
    };
    ext.insert(id);
    ext
}

/// Authenticates an internal caller: by its client certificate when the listener verified
/// one (mTLS), else by its service token; then checks that it may call this RPC.
fn authenticate_service<B>(
    req: &http::Request<B>,
    callers: &ServiceCallers,
) -> Result<Principal, AuthError> {
    let caller = match mtls::peer_name(req) {
        Some(name) => callers.by_name(&name).ok_or_else(|| {
            AuthError::InvalidCredentials(format!(
                "client certificate {name:?} names no configured caller"
            ))
        })?,
        None => {
            let token = bearer_token(req.headers())?;
            callers
                .by_token(token)
                .ok_or(AuthError::UnknownServiceToken)?
        }
    };
    if let Some(rpc) = req
        .uri()
        .path()
        .strip_prefix('/')
        .and_then(|p| p.strip_prefix(INTERNAL_PACKAGE))
        .and_then(|p| p.strip_prefix('.'))
        && !caller.may_call(rpc)
    {
        return Err(AuthError::RpcNotAllowed {
            caller: caller.name.to_string(),
            rpc: rpc.to_string(),
        });
    }
    Ok(Principal::Service(ServiceIdentity {
        name: caller.name.clone(),
    }))
}

/// The token of `authorization: Bearer <token>`.
fn bearer_token(headers: &http::HeaderMap) -> Result<&str, AuthError> {
    let value = headers
        .get(http::header::AUTHORIZATION)
        .ok_or(AuthError::MissingCredentials)?
        .to_str()
        .map_err(|_| AuthError::InvalidCredentials("authorization is not ASCII".into()))?;
    match value.trim().split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        _ => Err(AuthError::InvalidCredentials(
            "authorization must be `Bearer <service token>`".into(),
        )),
    }
}

/// Resolves the principal of a public-listener call from its headers.
pub struct Authenticator {
    keys: Arc<KeyVerifier>,
    jwt: Option<jwt::JwtVerifier>,
    tenants: TenantDirectory,
    /// Each tenant's effective limits (its overrides over its plan's), for user calls.
    user_limits: moka::future::Cache<TenantId, Limits>,
}

impl Authenticator {
    pub fn new(
        keys: Arc<KeyVerifier>,
        jwt: Option<jwt::JwtVerifier>,
        tenants: TenantDirectory,
    ) -> Self {
        let user_limits = moka::future::Cache::builder()
            .max_capacity(100_000)
            .time_to_live(USER_LIMITS_TTL)
            .build();
        Self {
            keys,
            jwt,
            tenants,
            user_limits,
        }
    }

    /// The limits of a tenant's users: the tenant's overrides over its plan's defaults, as
    /// for its keys (without a key's own overrides). Cached for [`USER_LIMITS_TTL`].
    pub async fn user_limits(&self, tenant: TenantId) -> Result<Limits, AuthError> {
        self.user_limits
            .try_get_with(tenant, async {
                let record = self.tenants.get(tenant).await?;
                Ok::<_, StoreError>(record.limits.apply(self.keys.plans().of(record.plan)))
            })
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))
    }

    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        client_ip: Option<IpAddr>,
    ) -> Result<Principal, AuthError> {
        match credential(headers)? {
            Credential::ApiKey(token) => {
                let key = self
                    .keys
                    .verify(token, client_ip)
                    .await
                    .map_err(AuthError::from)?
                    .map_err(|f| match f {
                        VerifyFailure::TooManyAttempts { retry_after } => {
                            AuthError::TooManyAttempts { retry_after }
                        }
                        other => AuthError::KeyRejected(other),
                    })?;
                Ok(Principal::ApiKey(key))
            }
            Credential::Jwt(token) => {
                let verifier = self.jwt.as_ref().ok_or_else(|| {
                    AuthError::InvalidCredentials(
                        "user tokens are not accepted: no JWT key is configured".into(),
                    )
                })?;
                let user = verifier.verify(token)?;
                self.tenants.ensure(user.tenant_id).await?;
                Ok(Principal::User(user))
            }
        }
    }
}

enum Credential<'a> {
    ApiKey(&'a str),
    Jwt(&'a str),
}

/// `x-api-key: dg_…` or `authorization: Bearer dg_…` is a key; any other bearer is a JWT.
fn credential(headers: &HeaderMap) -> Result<Credential<'_>, AuthError> {
    let text = |name: &str| -> Result<Option<&str>, AuthError> {
        headers
            .get(name)
            .map(|v| {
                v.to_str()
                    .map(str::trim)
                    .map_err(|_| AuthError::InvalidCredentials(format!("{name} is not ASCII")))
            })
            .transpose()
    };
    if let Some(key) = text("x-api-key")? {
        return Ok(Credential::ApiKey(key));
    }
    let Some(authorization) = text("authorization")? else {
        return Err(AuthError::MissingCredentials);
    };
    let (scheme, token) = authorization.split_once(' ').unwrap_or((authorization, ""));
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthError::InvalidCredentials(
            "authorization must be `Bearer <token>`".into(),
        ));
    }
    let token = token.trim();
    Ok(if token.starts_with("dg_") {
        Credential::ApiKey(token)
    } else {
        Credential::Jwt(token)
    })
}
