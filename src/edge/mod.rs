//! Per-call concerns at the edge of the service: the request context (caller identity,
//! client IP), the auth layer that resolves it and the usage layer that records each call. Above the features: it imports them,
//! they import none of it except the client-IP and context types.

use client_ip::TrustedProxies;

pub mod auth;
pub mod client_ip;
pub mod context;
pub mod usage;

/// The edge's section of the configuration, composed by `crate::config`.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// Peers whose x-forwarded-for is believed (Envoy).
    pub trusted_proxies: TrustedProxies,
}
