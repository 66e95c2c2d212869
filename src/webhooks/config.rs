//! The webhook security section of the configuration; `crate::config` reads it from the
//! environment (`DEVGATE_ENCRYPTION_KEYS`, `DEVGATE_WEBHOOK_ALLOWED_CIDRS`).

use super::{secret_box::KeyRing, ssrf::AllowList};

/// Secrets at rest and the SSRF allow-list.
#[derive(Debug, Clone)]
pub struct WebhookSecurityConfig {
    /// `None` when unset: devgate runs, but nothing can store or read an endpoint secret
    /// (whatever needs one must refuse with a configuration error).
    pub encryption_keys: Option<KeyRing>,
    pub allowed_cidrs: AllowList,
}
