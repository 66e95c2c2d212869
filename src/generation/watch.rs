//! Changes of generations across replicas: whoever commits a change publishes the id on a
//! Redis channel of its own; a WatchGeneration on any replica subscribes to it and re-reads
//! the row, so the stream shows what Postgres holds, never a message's copy of it.

use std::time::Duration;

use futures_util::StreamExt;
use uuid::Uuid;

use crate::kv::Redis;

/// How often a watcher re-reads the row even without a message: a publish lost while Redis
/// was away (or a watcher that could not subscribe) still sees the change this late.
pub const RECHECK_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Changes {
    redis: Redis,
}

/// Wakes a watcher when its generation may have changed.
pub struct Subscription {
    messages: Option<redis::aio::PubSub>,
}

impl Changes {
    pub fn new(redis: Redis) -> Self {
        Self { redis }
    }

    fn channel(&self, id: Uuid) -> String {
        self.redis.key(&format!("generation:changed:{id}"))
    }

    /// Tells every watcher of `id`, on every replica, to re-read it. Call it after the
    /// change committed. If Redis is down watchers see it at their next recheck.
    pub async fn publish(&self, id: Uuid) {
        let mut conn = self.redis.conn();
        let result: redis::RedisResult<i64> = redis::cmd("PUBLISH")
            .arg(self.channel(id))
            .arg("changed")
            .query_async(&mut conn)
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, generation_id = %id, "could not publish a generation change; watchers see it at their next recheck");
        }
    }

    /// Subscribes before the watcher reads the row, so no change between the read and the
    /// subscription goes unseen. Without Redis the watcher only rechecks.
    pub async fn subscribe(&self, id: Uuid) -> Subscription {
        let channel = self.channel(id);
        let subscribed = async {
            let mut pubsub = self.redis.pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        }
        .await;
        match subscribed {
            Ok(pubsub) => Subscription {
                messages: Some(pubsub),
            },
            Err(e) => {
                tracing::warn!(error = %e, generation_id = %id, "cannot subscribe to generation changes; the watcher rechecks only");
                Subscription { messages: None }
            }
        }
    }
}

impl Subscription {
    /// Returns when the generation may have changed: a message arrived, or the recheck
    /// interval passed.
    pub async fn changed(&mut self) {
        let recheck = tokio::time::sleep(RECHECK_INTERVAL);
        match self.messages.as_mut() {
            Some(pubsub) => {
                let mut messages = pubsub.on_message();
                let lost = tokio::select! {
                    message = messages.next() => message.is_none(),
                    _ = recheck => false,
                };
                drop(messages);
                if lost {
                    // The connection ended: from now on, rechecks only.
                    self.messages = None;
                }
            }
            None => recheck.await,
        }
    }
}
