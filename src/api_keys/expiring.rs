//! `api_key.expiring`: a worker task finds live keys expiring within
//! DEVGATE_API_KEY_EXPIRING_NOTICE and emits one event per key and expire_time. The
//! notice row is inserted in the event's transaction under the key's row lock, so several
//! workers never send one twice, and a key whose expire_time changes may get a new one.

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use diesel_async::AsyncConnection;
use tokio_util::sync::CancellationToken;

use super::{
    ApiKeyError,
    model::{KeyState, events},
    store,
};
use crate::{
    db::{self, PgPool},
    events::emitter::Emitter,
};

/// Keys read per query; a pass reads until none is left.
const BATCH: i64 = 500;

/// The schema's bound on `days_left`; the configuration keeps the notice within it.
pub const MAX_NOTICE_DAYS: u64 = 30;

pub struct ExpiringNotices {
    pool: PgPool,
    emitter: Arc<Emitter>,
    notice: Duration,
}

impl ExpiringNotices {
    pub fn new(pool: PgPool, emitter: Arc<Emitter>, notice: Duration) -> Self {
        Self {
            pool,
            emitter,
            notice,
        }
    }

    /// One pass over every tenant's keys; returns how many events it emitted.
    pub async fn pass(&self) -> Result<usize, ApiKeyError> {
        let window = chrono::Duration::from_std(self.notice)
            .unwrap_or(chrono::Duration::days(MAX_NOTICE_DAYS as i64));
        // Loaded before any transaction: no connection is held while schemas compile.
        self.emitter.catalog().await?;
        let mut emitted = 0;
        loop {
            let now = Utc::now();
            let mut conn = db::connect(&self.pool).await?;
            let keys = store::expiring_without_notice(&mut conn, now, now + window, BATCH).await?;
            let (read, before) = (keys.len(), emitted);
            for found in keys {
                let sent = conn
                    .transaction::<_, ApiKeyError, _>(async |c| {
                        // Under the key's lock, as it is now: an update or revocation since
                        // the scan wins.
                        let key = store::get_for_update(c, found.tenant_id, &found.id).await?;
                        let now = Utc::now();
                        let Some(expire_time) = key
                            .expire_time
                            .filter(|t| key.state(now) == KeyState::Active && *t <= now + window)
                        else {
                            return Ok(false);
                        };
                        if !store::insert_expiring_notice(c, &key.id, expire_time).await? {
                            return Ok(false);
                        }
                        let days_left = (expire_time - now)
                            .num_days()
                            .clamp(0, MAX_NOTICE_DAYS as i64);
                        self.emitter
                            .emit(
                                c,
                                key.tenant_id,
                                "api_key.expiring",
                                events::expiring(&key, expire_time, days_left),
                            )
                            .await?;
                        Ok(true)
                    })
                    .await;
                match sent {
                    Ok(true) => emitted += 1,
                    Ok(false) => {}
                    // Deleted since the scan.
                    Err(ApiKeyError::Store(crate::db::StoreError::NotFound)) => {}
                    Err(e) => return Err(e),
                }
            }
            // A short batch was the last; a batch that sent nothing (another worker did)
            // would only be read again.
            if read < BATCH as usize || emitted == before {
                return Ok(emitted);
            }
        }
    }

    /// Runs a pass every `interval` until `stop`.
    pub async fn run(&self, interval: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => match self.pass().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(keys = n, "api_key.expiring events emitted"),
                    Err(e) => tracing::warn!(error = %e, "api_key.expiring pass failed; will retry"),
                },
            }
        }
    }
}
