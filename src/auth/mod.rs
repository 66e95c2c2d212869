//! Identity and authorization: one [`Principal`] per call, resolved by [`layer::AuthLayer`]
//! before the handler runs; handlers ask it for the scope they need.

pub mod config;
pub mod jwt;
pub mod layer;
pub mod mtls;
pub mod service_token;

use std::{net::IpAddr, sync::Arc, time::Duration};

use http::HeaderMap;

use crate::{
    api_keys::verifier::{KeyVerifier, VerifyFailure},
    db::StoreError,
    identity::{Scope, Scopes, TenantId},
    ratelimit::Limits,
    tenants::TenantDirectory,
};

/// How long a tenant's limits for user calls are trusted without re-reading them: user
/// calls are rate limited before every handler, so they must not read Postgres each time.
const USER_LIMITS_TTL: Duration = Duration::from_secs(30);

/// Who is calling.
#[derive(Debug, Clone)]
pub enum Principal {
    /// A developer's API key (`x-api-key` or `authorization: Bearer dg_…`).
    ApiKey(KeyPrincipal),
    /// A developer-portal user (`authorization: Bearer <JWT>`).
    User(UserPrincipal),
    /// An internal service on the internal listener, authenticated by its service token
    /// or client certificate.
    Service(ServiceIdentity),
}

/// A configured internal caller that authenticated.
#[derive(Debug, Clone)]
pub struct ServiceIdentity {
    pub name: Arc<str>,
}

/// A verified API key is the principal of the calls made with it.
pub use crate::api_keys::verifier::VerifiedKey as KeyPrincipal;

#[derive(Debug, Clone)]
pub struct UserPrincipal {
    pub tenant_id: TenantId,
    pub user_id: String,
    pub roles: Vec<String>,
    /// Derived from roles: `admin` holds `*`, every other member the read scopes.
    pub scopes: Scopes,
}

/// Why a call was not authenticated or not authorized.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing credentials: send x-api-key or authorization: Bearer")]
    MissingCredentials,
    #[error("invalid credentials: {0}")]
    InvalidCredentials(String),
    #[error("api key rejected: {0}")]
    KeyRejected(VerifyFailure),
    #[error("too many failed attempts for this key; retry later")]
    TooManyAttempts { retry_after: Duration },
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("this method is only available to internal services")]
    InternalOnly,
    #[error("unknown service token")]
    UnknownServiceToken,
    #[error("internal caller {caller} may not call {rpc}")]
    RpcNotAllowed { caller: String, rpc: String },
    #[error("this method acts on a tenant and needs a tenant principal (API key or user)")]
    NoTenant,
    #[error("authentication backend unavailable: {0}")]
    Unavailable(String),
}

impl From<StoreError> for AuthError {
    fn from(e: StoreError) -> Self {
        AuthError::Unavailable(e.to_string())
    }
}

impl Principal {
    pub fn tenant_id(&self) -> Result<TenantId, AuthError> {
        match self {
            Principal::ApiKey(k) => Ok(k.tenant_id),
            Principal::User(u) => Ok(u.tenant_id),
            Principal::Service(_) => Err(AuthError::NoTenant),
        }
    }

    /// The scopes held; a service holds every scope.
    pub fn scopes(&self) -> Scopes {
        match self {
            Principal::ApiKey(k) => k.scopes.clone(),
            Principal::User(u) => u.scopes.clone(),
            Principal::Service(_) => Scopes::all(),
        }
    }

    /// Fails unless the principal holds `scope`.
    pub fn require(&self, scope: Scope) -> Result<(), AuthError> {
        if self.scopes().grants(scope) {
            Ok(())
        } else {
            Err(AuthError::PermissionDenied(format!(
                "requires scope {scope}"
            )))
        }
    }

    /// The tenant, after checking `scope`: the usual first line of a tenant RPC.
    pub fn tenant_with(&self, scope: Scope) -> Result<TenantId, AuthError> {
        let tenant = self.tenant_id()?;
        self.require(scope)?;
        Ok(tenant)
    }

    pub fn require_internal(&self) -> Result<(), AuthError> {
        match self {
            Principal::Service(_) => Ok(()),
            _ => Err(AuthError::InternalOnly),
        }
    }

    /// How the principal is recorded on rows it creates: `user:<id>`, `api_key:<id>`,
    /// `service:<caller name>`.
    pub fn actor(&self) -> String {
        match self {
            Principal::ApiKey(k) => format!("api_key:{}", k.key_id),
            Principal::User(u) => format!("user:{}", u.user_id),
            Principal::Service(s) => format!("service:{}", s.name),
        }
    }

    /// The internal caller's name, for the request log.
    pub fn service_name(&self) -> Option<&str> {
        match self {
            Principal::Service(s) => Some(&s.name),
            _ => None,
        }
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
