//! `last_used_time` without a write per request: verifications drop (key, time) into a
//! bounded channel; one task folds them per key and writes a batch per interval.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::store;
use crate::db::{self, PgPool, StoreError};
use crate::identity::KeyId;

const CHANNEL_CAPACITY: usize = 65_536;

#[derive(Clone)]
pub struct LastUsedRecorder {
    tx: mpsc::Sender<(KeyId, DateTime<Utc>)>,
    dropped: Arc<AtomicU64>,
}

impl LastUsedRecorder {
    /// The recorder and the flusher task's receiving end.
    pub fn new() -> (Self, LastUsedFlusher) {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let dropped = Arc::new(AtomicU64::new(0));
        (
            Self {
                tx,
                dropped: dropped.clone(),
            },
            LastUsedFlusher { rx, dropped },
        )
    }

    /// Never waits: when the channel is full the use is counted as dropped (last_used_time
    /// is informational; the request must not pay for it).
    pub fn record(&self, key: &KeyId, at: DateTime<Utc>) {
        if self.tx.try_send((key.clone(), at)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

pub struct LastUsedFlusher {
    rx: mpsc::Receiver<(KeyId, DateTime<Utc>)>,
    dropped: Arc<AtomicU64>,
}

impl LastUsedFlusher {
    /// Runs until `shutdown`, then writes what is pending and returns.
    pub async fn run(mut self, pool: PgPool, interval: Duration, shutdown: CancellationToken) {
        let mut pending: HashMap<KeyId, DateTime<Utc>> = HashMap::new();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => flush(&pool, &mut pending, &self.dropped).await,
                Some((key, at)) = self.rx.recv() => {
                    let slot = pending.entry(key).or_insert(at);
                    if at > *slot { *slot = at; }
                }
            }
        }
        while let Ok((key, at)) = self.rx.try_recv() {
            let slot = pending.entry(key).or_insert(at);
            if at > *slot {
                *slot = at;
            }
        }
        flush(&pool, &mut pending, &self.dropped).await;
    }
}

async fn flush(pool: &PgPool, pending: &mut HashMap<KeyId, DateTime<Utc>>, dropped: &AtomicU64) {
    let lost = dropped.swap(0, Ordering::Relaxed);
    if lost > 0 {
        tracing::warn!(
            lost,
            "last-used channel was full; some last_used_time updates were skipped"
        );
    }
    if pending.is_empty() {
        return;
    }
    let batch: Vec<(KeyId, DateTime<Utc>)> = pending.drain().collect();
    let written = async { store::touch_last_used(&mut *db::connect(pool).await?, &batch).await };
    match written.await as Result<usize, StoreError> {
        Ok(n) => tracing::debug!(keys = n, "last_used_time written"),
        // Keep the newest time per key for the next round; the database may be back by then.
        Err(e) => {
            tracing::warn!(error = %e, keys = batch.len(), "writing last_used_time failed; will retry");
            pending.extend(batch);
        }
    }
}
