//! The timeout sweep (worker role): a generation still queued or running
//! `DEVGATE_GENERATION_TIMEOUT` after it was created is FAILED with error code `TIMEOUT` and
//! refunded (credits once, and the monthly quota), `generation.failed` is emitted and the
//! orchestrator is told to stop (a GenerationCancel through the outbox) — all in the
//! transaction of its batch. Rows are taken oldest first with `FOR UPDATE SKIP LOCKED`, so
//! sweepers on several workers share the work and never wait on a row an update holds; an
//! update that arrives afterwards finds the generation ended and is ignored.

use std::time::Duration;

use chrono::Utc;
use diesel_async::AsyncConnection;
use tokio_util::sync::CancellationToken;

use super::{
    GenerationError,
    model::{self, Generation, State},
    service::{Generations, enqueue_cancel, refund_credits},
    store::{self, Change},
};
use crate::db;

/// Generations failed per transaction.
const BATCH: i64 = 100;
/// The error code of a timed-out generation (the catalog's public code `timeout`).
pub const TIMEOUT_CODE: &str = "TIMEOUT";
const CANCEL_REASON: &str = "timed out in devgate";

/// How often the sweep runs for a timeout: a quarter of it, from 200 ms to a minute, so a
/// generation ends at most a quarter late.
pub fn interval(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(200), Duration::from_secs(60))
}

impl Generations {
    /// One pass: fails and refunds every generation past the timeout, a batch per
    /// transaction. Returns how many it failed.
    pub async fn sweep_timed_out(&self) -> Result<usize, GenerationError> {
        self.emitter.catalog().await?;
        let timeout = self.config.timeout;
        let message = format!(
            "no result from the orchestrator within {}",
            humantime::format_duration(timeout)
        );
        let mut total = 0;
        loop {
            let now = Utc::now();
            // A timeout beyond chrono's range times nothing out.
            let Some(cutoff) = chrono::Duration::from_std(timeout)
                .ok()
                .and_then(|t| now.checked_sub_signed(t))
            else {
                return Ok(total);
            };
            let mut conn = db::connect(&self.pool).await?;
            let failed = conn
                .transaction::<_, GenerationError, _>(async |c| {
                    let expired = store::lock_timed_out(c, cutoff, BATCH).await?;
                    let mut failed = Vec::with_capacity(expired.len());
                    for (current, last_sequence) in expired {
                        let refunded = refund_credits(c, &current).await?;
                        let generation = store::apply(
                            c,
                            current.id,
                            &Change {
                                state: State::Failed,
                                progress: current.progress,
                                last_sequence,
                                refunded: true,
                                asset_ids: &[],
                                result_urls: &[],
                                error_code: Some(TIMEOUT_CODE),
                                error_message: Some(&message),
                                start_time: current.start_time,
                                end_time: Some(now),
                                now,
                            },
                        )
                        .await?;
                        enqueue_cancel(c, &self.config.jobs_exchange, &generation, CANCEL_REASON)
                            .await?;
                        self.emitter
                            .emit(
                                c,
                                generation.tenant_id,
                                "generation.failed",
                                model::failed_payload(&generation, refunded),
                            )
                            .await?;
                        failed.push((generation, !current.refunded));
                    }
                    Ok(failed)
                })
                .await?;
            drop(conn);
            let batch = failed.len();
            for (g, quota) in &failed {
                self.after_timeout(g, *quota).await;
            }
            total += batch;
            if (batch as i64) < BATCH {
                return Ok(total);
            }
        }
    }

    async fn after_timeout(&self, g: &Generation, give_back_quota: bool) {
        tracing::warn!(generation_id = %g.id, tenant = %g.tenant_id, "generation timed out; failed and refunded");
        self.changes.publish(g.id).await;
        if give_back_quota {
            self.refund_quota(g.tenant_id, u64::try_from(g.count).unwrap_or(0))
                .await;
        }
    }

    /// Sweeps every [`interval`] until `stop`.
    pub async fn run_timeout_sweep(&self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(interval(self.config.timeout));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => match self.sweep_timed_out().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(generations = n, "timed-out generations failed and refunded"),
                    Err(e) => tracing::warn!(error = %e, "generation timeout sweep failed; will retry"),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_runs_a_quarter_of_the_timeout_within_bounds() {
        assert_eq!(interval(Duration::from_secs(900)), Duration::from_secs(60));
        assert_eq!(interval(Duration::from_secs(2)), Duration::from_millis(500));
        assert_eq!(
            interval(Duration::from_millis(100)),
            Duration::from_millis(200)
        );
    }
}
