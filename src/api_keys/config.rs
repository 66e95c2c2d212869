//! The API-key section of the configuration; `crate::config` reads it from the environment.

use std::time::Duration;

/// argon2id cost parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Argon2Params {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

/// The `DEVGATE_API_KEY_*` section, composed by `crate::config`.
#[derive(Debug, Clone)]
pub struct ApiKeyConfig {
    pub argon2: Argon2Params,
    pub hash_concurrency: usize,
    pub cache_ttl: Duration,
    pub cache_capacity: u64,
    pub failure_limit: u32,
    pub failure_window: Duration,
    pub last_used_flush_interval: Duration,
    pub rotation_grace_default: Duration,
    pub rotation_grace_max: Duration,
    /// Keys expiring within this get one `api_key.expiring` event.
    pub expiring_notice: Duration,
    /// How often the worker looks for such keys.
    pub expiring_check_interval: Duration,
}
