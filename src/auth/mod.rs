//! Authorization: one [`Principal`] per call, resolved by the edge's auth layer
//! (`crate::edge::auth`) before the handler runs; handlers ask it for the scope they need.
//! The credential checks that need no feature (JWTs, service tokens, mTLS) live here too.

pub mod config;
pub mod jwt;
pub mod mtls;
pub mod service_token;

use std::{sync::Arc, time::Duration};

use tonic::Status;

use crate::{
    db::StoreError,
    identity::{Environment, KeyId, Plan, Scope, Scopes, TenantId, TokenError},
    ratelimit::{Limits, QuotaLimits},
};

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

/// A verified API key: the principal of the calls made with it.
#[derive(Debug, Clone)]
pub struct KeyPrincipal {
    pub tenant_id: TenantId,
    pub key_id: KeyId,
    pub scopes: Scopes,
    pub plan: Plan,
    pub environment: Environment,
    /// Effective limits: the key's overrides over the tenant's over the plan's defaults.
    pub limits: Limits,
    /// The tenant's monthly quotas: its overrides over the plan's.
    pub quotas: QuotaLimits,
}

#[derive(Debug, Clone)]
pub struct UserPrincipal {
    pub tenant_id: TenantId,
    pub user_id: String,
    pub roles: Vec<String>,
    /// Derived from roles: `admin` holds `*`, every other member the read scopes.
    pub scopes: Scopes,
}

/// Why a well-formed request's token does not authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyFailure {
    #[error("malformed key: {0}")]
    Malformed(TokenError),
    #[error("unknown key or wrong secret")]
    NotFound,
    #[error("key revoked")]
    Revoked,
    #[error("key expired")]
    Expired,
    #[error("client address not in the key's allowed networks")]
    IpNotAllowed,
    #[error("too many failed attempts for this key")]
    TooManyAttempts { retry_after: Duration },
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

/// The principal the auth layer resolved for this call.
pub fn principal<T>(req: &tonic::Request<T>) -> Result<&Principal, Status> {
    req.extensions().get::<Principal>().ok_or_else(|| {
        Status::internal("no principal on the request: the auth layer is not installed")
    })
}
