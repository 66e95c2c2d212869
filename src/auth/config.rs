//! The auth section of the configuration; `crate::config` reads it from the environment.

use std::{path::PathBuf, time::Duration};

use secrecy::SecretString;

use super::service_token::ServiceCallers;

/// The auth section (JWT, trusted proxies, internal callers), composed by `crate::config`.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub jwt_hs256_secret: Option<SecretString>,
    pub jwt_public_key_path: Option<PathBuf>,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub jwt_leeway: Duration,
    /// Who may call the internal listener, and which RPCs.
    pub service_callers: ServiceCallers,
    /// TLS (and optionally mTLS) of the internal listener.
    pub internal_tls: Option<InternalTls>,
}

/// Files of the internal listener's TLS setup.
#[derive(Debug, Clone)]
pub struct InternalTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Client certificates from this CA authenticate internal callers (mTLS).
    pub client_ca: Option<PathBuf>,
}
