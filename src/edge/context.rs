//! The per-call request context the edge layers share: who called (the auth layer puts a
//! [`CallIdentity`] in the response's extensions, the usage layer records it) and from where
//! (the client IP, read through [`super::client_ip::TrustedProxies`] by both).

use crate::identity::TenantId;

/// Who made a call, as the auth layer resolved it (put in the response's extensions).
#[derive(Debug, Clone)]
pub struct CallIdentity {
    pub tenant_id: TenantId,
    pub api_key_id: Option<String>,
    pub user_id: Option<String>,
    /// Tokens the call cost (rate-limit units).
    pub cost: i64,
}
