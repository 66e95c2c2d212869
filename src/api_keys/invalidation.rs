//! Cache invalidation across replicas: a revoke/rotate/update/delete publishes the key id on
//! a Redis channel; every replica drops its cached tokens of that key at once.

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::verifier::KeyVerifier;
use crate::identity::KeyId;
use crate::{identity::TenantId, kv::Redis};

/// Messages that name a tenant instead of a key id start with this.
const TENANT_PREFIX: &str = "tenant:";

#[derive(Clone)]
pub struct Invalidations {
    redis: Redis,
    channel: String,
}

impl Invalidations {
    pub fn new(redis: Redis) -> Self {
        let channel = redis.key("api_keys:invalidate");
        Self { redis, channel }
    }

    /// Tells every replica (this one included) to drop `key_id`. If Redis is down the other
    /// replicas learn it when their cache entries expire (DEVGATE_KEY_CACHE_TTL).
    pub async fn publish(&self, key_id: &KeyId) {
        self.send(key_id.as_str()).await;
    }

    /// Tells every replica to drop the cached keys of `tenant` (plan or limits changed).
    pub async fn publish_tenant(&self, tenant: TenantId) {
        self.send(&format!("{TENANT_PREFIX}{tenant}")).await;
    }

    async fn send(&self, payload: &str) {
        let mut conn = self.redis.conn();
        let result: redis::RedisResult<i64> = redis::cmd("PUBLISH")
            .arg(&self.channel)
            .arg(payload)
            .query_async(&mut conn)
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, target = %payload, "could not broadcast key invalidation; other replicas rely on the cache TTL");
        }
    }

    /// Listens until `shutdown`, resubscribing after any disconnect. After each
    /// (re)subscription the whole cache is dropped, since messages may have been missed.
    pub async fn listen(self, verifier: Arc<KeyVerifier>, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut subscribed = false;
            let session = async {
                let mut pubsub = self.redis.pubsub().await?;
                pubsub.subscribe(&self.channel).await?;
                subscribed = true;
                verifier.invalidate_all();
                verifier.set_invalidations_live(true);
                tracing::debug!(channel = %self.channel, "subscribed to key invalidations");
                let mut messages = pubsub.on_message();
                while let Some(msg) = messages.next().await {
                    let payload: String = msg.get_payload().unwrap_or_default();
                    if let Some(tenant) = payload
                        .strip_prefix(TENANT_PREFIX)
                        .and_then(|t| t.parse::<TenantId>().ok())
                    {
                        verifier.invalidate_tenant(tenant);
                    } else if let Ok(id) = payload.parse::<KeyId>() {
                        verifier.invalidate(&id);
                    } else {
                        verifier.invalidate_all();
                    }
                }
                Ok::<(), redis::RedisError>(())
            };
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                result = session => result,
            };
            verifier.set_invalidations_live(false);
            match result {
                Ok(()) => tracing::warn!("key invalidation subscription ended; resubscribing"),
                Err(e) => {
                    tracing::warn!(error = %e, "key invalidation subscription failed; retrying")
                }
            }
            backoff = if subscribed {
                Duration::from_millis(100)
            } else {
                (backoff * 2).min(Duration::from_secs(5))
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
        }
    }
}
