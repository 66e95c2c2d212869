//! Webhooks (issue 7). This part: Standard Webhooks signing, endpoint secrets encrypted at
//! rest, and the SSRF guard (URL validation and the delivery HTTP client).

pub mod config;
pub mod secret_box;
pub mod signing;
pub mod ssrf;

pub use config::WebhookSecurityConfig;
