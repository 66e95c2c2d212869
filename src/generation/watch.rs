//! Changes of generations across replicas: whoever commits a change publishes the id on a
//! Redis channel of its own; a WatchGeneration on any replica is woken and re-reads the row,
//! so the stream shows what Postgres holds, never a message's copy of it.
//!
//! One Redis connection per process carries every watcher: it subscribes to the pattern of
//! all generation channels and wakes the watchers of the id a message names. (A connection
//! per watcher would put a replica's Redis connections at the mercy of its open streams.)
//! Whenever that subscription (re)starts, every watcher is woken once (a change published
//! while it was not active is then read); without it watchers recheck every
//! [`RECHECK_INTERVAL`].

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock, Weak},
    time::Duration,
};

use futures_util::StreamExt;
use tokio::sync::watch;
use uuid::Uuid;

use crate::kv::Redis;

/// How often a watcher re-reads the row even without a message: a publish lost while Redis
/// was away still reaches the watcher this late.
pub const RECHECK_INTERVAL: Duration = Duration::from_secs(5);
/// How often the listener checks that its process still has watchers' hub (tests start and
/// drop many applications in one process).
const ALIVE_CHECK: Duration = Duration::from_secs(1);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Changes {
    redis: Redis,
    hub: Arc<Hub>,
}

/// The watchers of this process, by generation, and the listener that wakes them.
#[derive(Default)]
struct Hub {
    /// A counter per watched generation; every wake-up bumps it.
    watched: Mutex<HashMap<Uuid, watch::Sender<u64>>>,
    listener: OnceLock<()>,
}

impl Hub {
    fn wake(&self, id: Uuid) {
        if let Some(tx) = self.lock().get(&id) {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    fn wake_all(&self) {
        for tx in self.lock().values() {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, watch::Sender<u64>>> {
        // A panic while holding the map cannot leave it inconsistent: keep using it.
        self.watched.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Wakes a watcher when its generation may have changed; unregisters on drop.
pub struct Subscription {
    id: Uuid,
    rx: watch::Receiver<u64>,
    hub: Arc<Hub>,
}

impl Changes {
    pub fn new(redis: Redis) -> Self {
        Self {
            redis,
            hub: Arc::new(Hub::default()),
        }
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

    /// Registers a watcher of `id`. Call it before the watcher reads the row, so no change
    /// between the read and the registration goes unseen.
    pub async fn subscribe(&self, id: Uuid) -> Subscription {
        self.hub.listener.get_or_init(|| {
            tokio::spawn(listen(
                self.redis.clone(),
                self.redis.key("generation:changed:"),
                Arc::downgrade(&self.hub),
            ));
        });
        let rx = self
            .hub
            .lock()
            .entry(id)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        Subscription {
            id,
            rx,
            hub: self.hub.clone(),
        }
    }
}

impl Subscription {
    /// Returns when the generation may have changed: a wake-up arrived, or the recheck
    /// interval passed.
    pub async fn changed(&mut self) {
        tokio::select! {
            _ = self.rx.changed() => {}
            _ = tokio::time::sleep(RECHECK_INTERVAL) => {}
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut watched = self.hub.lock();
        // This receiver still counts until the fields drop, after this body.
        if watched
            .get(&self.id)
            .is_some_and(|tx| tx.receiver_count() <= 1)
        {
            watched.remove(&self.id);
        }
    }
}

/// The pattern of every channel under `prefix`, with Redis's glob characters escaped.
fn pattern(prefix: &str) -> String {
    let mut p = String::with_capacity(prefix.len() + 2);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('*');
    p
}

/// The one subscription of this process: wakes the watchers named by each message until the
/// hub is dropped; reconnects with backoff and wakes everyone after a reconnect.
async fn listen(redis: Redis, prefix: String, hub: Weak<Hub>) {
    let mut delay = Duration::from_millis(100);
    loop {
        if hub.strong_count() == 0 {
            return;
        }
        let subscribed = async {
            let mut pubsub = redis.pubsub().await?;
            pubsub.psubscribe(pattern(&prefix)).await?;
            Ok::<_, redis::RedisError>(pubsub)
        }
        .await;
        let mut pubsub = match subscribed {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to generation changes; watchers recheck every {RECHECK_INTERVAL:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RECONNECT_MAX);
                continue;
            }
        };
        delay = Duration::from_millis(100);
        if let Some(hub) = hub.upgrade() {
            // What was published before this subscription was active (or while the last one
            // was away): each watcher re-reads once.
            hub.wake_all();
        }
        let mut messages = pubsub.on_message();
        loop {
            let message = tokio::select! {
                m = messages.next() => m,
                _ = tokio::time::sleep(ALIVE_CHECK) => {
                    if hub.strong_count() == 0 { return; }
                    continue;
                }
            };
            let Some(message) = message else { break };
            let Some(hub) = hub.upgrade() else { return };
            if let Some(id) = message
                .get_channel_name()
                .strip_prefix(prefix.as_str())
                .and_then(|id| Uuid::parse_str(id).ok())
            {
                hub.wake(id);
            }
        }
        tracing::warn!("the generation changes subscription ended; reconnecting");
    }
}

#[cfg(test)]
mod tests {
    use super::pattern;

    #[test]
    fn the_pattern_escapes_the_prefix() {
        assert_eq!(
            pattern("devgate:generation:changed:"),
            "devgate:generation:changed:*"
        );
        assert_eq!(pattern("a*b?[c]\\:"), "a\\*b\\?\\[c\\]\\\\:*");
    }
}
