//! The tower layer that resolves the [`Principal`] of every call before the handler runs
//! and stores it in the request extensions.

use std::{
    net::IpAddr,
    sync::Arc,
    task::{Context, Poll},
};

use futures_util::future::BoxFuture;
use tonic::{Status, transport::server::TcpConnectInfo};
use tower::{Layer, Service};

use super::{Authenticator, Principal, UserPrincipal};
use crate::{
    ratelimit::{Decision, RateLimitError, RateLimiter},
    usage::layer::CallIdentity,
};

/// Which listener the layer guards.
#[derive(Clone)]
pub enum Listener {
    /// Behind Envoy: API keys and user JWTs.
    Public {
        authenticator: Arc<Authenticator>,
        limiter: Arc<RateLimiter>,
        trust_forwarded_for: bool,
    },
    /// Trusted network only: every caller is [`Principal::Service`].
    Internal,
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
                Listener::Internal => (Ok(Principal::Service), None),
                Listener::Public {
                    authenticator,
                    limiter,
                    trust_forwarded_for,
                } => {
                    let ip = client_ip(&req, *trust_forwarded_for);
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
                    (Principal::ApiKey(key), _) => Some(limiter.admit(key, 1).await),
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
            key_id: bucket,
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
        Principal::Service => return ext,
    };
    ext.insert(id);
    ext
}

/// The caller's address: the last `x-forwarded-for` hop (the one Envoy appended) when the
/// listener is behind Envoy, else the TCP peer.
pub(crate) fn client_ip<B>(req: &http::Request<B>, trust_forwarded_for: bool) -> Option<IpAddr> {
    if trust_forwarded_for {
        // Only the last hop: earlier ones were written by the client and can be forged.
        let last_hop = req
            .headers()
            .get_all("x-forwarded-for")
            .iter()
            .next_back()
            .map(|v| {
                v.to_str()
                    .ok()
                    .and_then(|v| v.rsplit(',').next())
                    .map(str::trim)
            });
        if let Some(hop) = last_hop {
            return hop.and_then(|h| h.parse().ok());
        }
    }
    req.extensions()
        .get::<TcpConnectInfo>()
        .and_then(|info| info.remote_addr())
        .map(|a| a.ip())
}

/// The principal the layer resolved for this call.
pub fn principal<T>(req: &tonic::Request<T>) -> Result<&Principal, Status> {
    req.extensions().get::<Principal>().ok_or_else(|| {
        Status::internal("no principal on the request: the auth layer is not installed")
    })
}
