//! Redis: one multiplexed, self-reconnecting connection per process, the deployment's key
//! prefix, and pub/sub subscriptions.

use std::{sync::Arc, time::Duration};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::ExposeSecret;

use crate::config::RedisConfig;

/// How long one Redis call may take before the caller treats Redis as down.
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub struct Redis {
    client: redis::Client,
    conn: ConnectionManager,
    prefix: Arc<str>,
}

impl Redis {
    /// Prepares the connection without dialling: Redis may be down when the process starts;
    /// the manager connects on first use and reconnects after failures.
    pub fn connect(config: &RedisConfig) -> redis::RedisResult<Self> {
        let client = redis::Client::open(config.url.expose_secret())?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)?;
        Ok(Self {
            client,
            conn,
            prefix: config.prefix.as_str().into(),
        })
    }

    /// A cheap clone of the shared multiplexed connection.
    pub fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// The key or channel name `name` under this deployment's prefix.
    pub fn key(&self, name: &str) -> String {
        format!("{}{}", self.prefix, name)
    }

    /// A dedicated connection for SUBSCRIBE (pub/sub cannot share the multiplexed one).
    pub async fn pubsub(&self) -> redis::RedisResult<redis::aio::PubSub> {
        tokio::time::timeout(RESPONSE_TIMEOUT * 4, self.client.get_async_pubsub())
            .await
            .map_err(|_| {
                redis::RedisError::from((redis::ErrorKind::Io, "timed out connecting for pub/sub"))
            })?
    }
}

/// Logs a Redis outage once when it starts and once when it ends, however many calls fail
/// in between (a log line per failed call would flood the logs exactly when they matter).
pub struct OutageLog {
    what: &'static str,
    down: std::sync::atomic::AtomicBool,
}

impl OutageLog {
    /// `what` names the feature that degrades, e.g. "rate limiting".
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            down: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The value on success; `None` (after logging a start of outage) on failure.
    pub fn observe<T>(&self, result: redis::RedisResult<T>) -> Option<T> {
        use std::sync::atomic::Ordering;
        match result {
            Ok(v) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    tracing::info!(feature = self.what, "redis is back");
                }
                Some(v)
            }
            Err(e) => {
                if !self.down.swap(true, Ordering::Relaxed) {
                    tracing::warn!(feature = self.what, error = %e, "redis unavailable: degraded until it returns");
                }
                None
            }
        }
    }

    pub fn is_down(&self) -> bool {
        self.down.load(std::sync::atomic::Ordering::Relaxed)
    }
}
