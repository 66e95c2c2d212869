//! The results consumer (worker role): the orchestrator's GenerationUpdates from the durable
//! queue `<prefix>.generation.updates`, each applied in ONE Postgres transaction on the
//! locked row and acknowledged after the commit.
//!
//! Delivery is at least once and in any order (proto/upstream/orchestrator/v1), so an update
//! is applied only when it moves the generation forward: its `sequence` is above the last
//! one applied AND its state is a step of QUEUED → RUNNING → SUCCEEDED | FAILED | CANCELLED
//! (a RUNNING update on a running generation carries progress). Anything else — a
//! duplicate, a late update, anything after the end (e.g. the CANCELLED answer to devgate's
//! own cancel) — is acknowledged and ignored. What each step writes:
//! * leaving QUEUED (RUNNING, or straight to SUCCEEDED / FAILED): `start_time`,
//!   `generation.started`;
//! * SUCCEEDED: assets, result URLs, progress 100, `end_time`, `generation.completed`, and the
//!   metered usage (`generation_seconds`, `generation_outputs`, once per generation);
//! * FAILED / CANCELLED: the error, `end_time`, the credits refunded once (the same ledger
//!   idempotency id as a developer's cancel), `generation.failed` / `generation.cancelled`;
//!   after the commit the monthly generations quota is given back, only by the transaction
//!   that refunded.
//!
//! A body that is not a well-formed update, an unknown generation and another tenant's
//! generation are acknowledged and logged (poison messages must not loop). When Postgres
//! cannot be reached the message is requeued after a backoff that grows while failures
//! last, so nothing is lost and nothing spins.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use chrono::Utc;
use diesel_async::{AsyncConnection, AsyncPgConnection};
use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicNackOptions, QueueDeclareOptions},
};
use prost::{Message, Name};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{
    GenerationError,
    model::{self, Generation, State},
    service::{Generations, refund_credits},
    store::{self, Change},
};
use crate::{
    db::{self, StoreError},
    events::EventError,
    identity::TenantId,
    mq::{Mq, MqError},
    proto::upstream::orchestrator::v1::{GenerationState, GenerationUpdate, routing},
    usage::store::{MeteredRecord, record_metered},
};

/// Updates applied at once by one consumer (also its prefetch). Updates of one generation
/// serialize on its row lock; the sequence rule makes their commit order irrelevant.
const CONCURRENCY: usize = 8;
const RECONNECT_MAX: Duration = Duration::from_secs(10);
/// Requeue delays while Postgres fails: doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// At most this many assets in one update (the `generation.completed` catalog limit).
const MAX_ASSETS: usize = 64;
const MAX_URL_CHARS: usize = 2048;
const MAX_ERROR_CODE_CHARS: usize = 64;
const MAX_ERROR_MESSAGE_CHARS: usize = 1000;
/// Who cancelled, in `generation.cancelled`, when the orchestrator did.
const ORCHESTRATOR: &str = "service:orchestrator";
/// Who recorded the metered usage of a generation.
const METERED_BY: &str = "devgate";

/// A GenerationUpdate decoded and checked: every field devgate stores is valid.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub generation_id: Uuid,
    pub tenant: TenantId,
    pub sequence: i64,
    pub state: State,
    pub progress: i32,
    pub asset_ids: Vec<String>,
    pub result_urls: Vec<String>,
    /// FAILED and CANCELLED: (UPPER_SNAKE code, message).
    pub error: Option<(String, String)>,
    /// (compute seconds, outputs), as the orchestrator reported them.
    pub usage: Option<(u64, u32)>,
}

/// Decodes an update body and checks it; `Err` says why it cannot be applied.
pub fn decode(body: &[u8]) -> Result<Update, String> {
    let u = GenerationUpdate::decode(body).map_err(|e| format!("not a GenerationUpdate: {e}"))?;
    let generation_id =
        Uuid::parse_str(&u.generation_id).map_err(|_| "generation_id is not a UUID".to_string())?;
    let tenant = Uuid::parse_str(&u.tenant_id)
        .map(TenantId)
        .map_err(|_| "tenant_id is not a UUID".to_string())?;
    let sequence = i64::try_from(u.sequence)
        .ok()
        .filter(|s| *s >= 1)
        .ok_or_else(|| format!("sequence {} is not from 1 to 2^63-1", u.sequence))?;
    let state = match GenerationState::try_from(u.state) {
        Ok(GenerationState::Queued) => State::Queued,
        Ok(GenerationState::Running) => State::Running,
        Ok(GenerationState::Succeeded) => State::Succeeded,
        Ok(GenerationState::Failed) => State::Failed,
        Ok(GenerationState::Cancelled) => State::Cancelled,
        Ok(GenerationState::Unspecified) | Err(_) => {
            return Err(format!("state {} is not a generation state", u.state));
        }
    };
    let progress = i32::try_from(u.progress)
        .ok()
        .filter(|p| *p <= 100)
        .ok_or_else(|| format!("progress {} is above 100", u.progress))?;
    if state == State::Succeeded {
        if u.asset_ids.is_empty() || u.asset_ids.len() > MAX_ASSETS {
            return Err(format!(
                "SUCCEEDED with {} assets (1 to {MAX_ASSETS})",
                u.asset_ids.len()
            ));
        }
        if u.result_urls.len() != u.asset_ids.len() {
            return Err("result_urls and asset_ids differ in length".into());
        }
        if let Some(bad) = u.asset_ids.iter().find(|a| Uuid::parse_str(a).is_err()) {
            return Err(format!("asset id {bad:?} is not a UUID"));
        }
        if !u.result_urls.iter().all(|r| web_url(r)) {
            return Err("a result URL is not an http(s) URL of at most 2048 characters".into());
        }
    }
    let error = matches!(state, State::Failed | State::Cancelled).then(|| {
        let (code, message) = u.error.map(|e| (e.code, e.message)).unwrap_or_default();
        let code = if upper_snake(&code) {
            code
        } else if state == State::Cancelled {
            "CANCELLED".into()
        } else {
            // Missing or malformed: still a failure, refunded; the public code is `internal`.
            "UNKNOWN".into()
        };
        let message = match message.trim() {
            "" if state == State::Cancelled => "cancelled by the orchestrator".to_string(),
            "" => "the orchestrator gave no reason".to_string(),
            m => m.chars().take(MAX_ERROR_MESSAGE_CHARS).collect(),
        };
        (code, message)
    });
    Ok(Update {
        generation_id,
        tenant,
        sequence,
        state,
        progress,
        asset_ids: if state == State::Succeeded {
            u.asset_ids
        } else {
            Vec::new()
        },
        result_urls: if state == State::Succeeded {
            u.result_urls
        } else {
            Vec::new()
        },
        error,
        usage: u.usage.map(|usage| (usage.seconds, usage.outputs)),
    })
}

fn upper_snake(code: &str) -> bool {
    let mut bytes = code.bytes();
    code.len() <= MAX_ERROR_CODE_CHARS
        && bytes.next().is_some_and(|b| b.is_ascii_uppercase())
        && bytes.all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

fn web_url(s: &str) -> bool {
    s.len() <= MAX_URL_CHARS
        && url::Url::parse(s).is_ok_and(|u| matches!(u.scheme(), "https" | "http"))
}

/// Why an update is not applied (`None`: apply it). A pure function of the locked row's
/// state and last sequence: the forward-only rule.
pub fn ignored_because(
    current: State,
    last_sequence: i64,
    update: &Update,
) -> Option<&'static str> {
    if current.is_terminal() {
        return Some("the generation already ended");
    }
    if update.sequence <= last_sequence {
        return Some("not newer than the last update applied");
    }
    if update.state == State::Queued {
        return Some("QUEUED is not a step forward");
    }
    None
}

/// What applying one update did.
#[derive(Debug)]
pub enum Outcome {
    Applied {
        generation: Box<Generation>,
        /// Generations to give back to the monthly quota (the transaction refunded).
        quota_refund: u64,
    },
    /// Acknowledged without a change (a duplicate, late or backward update).
    Ignored(&'static str),
    /// Acknowledged and logged: no generation of that id, or another tenant's.
    Dropped(&'static str),
}

impl Generations {
    /// Applies one update in one transaction on the locked row, then (after the commit)
    /// tells watchers and gives back the quota of a refunded generation.
    pub async fn apply_update(&self, update: &Update) -> Result<Outcome, GenerationError> {
        // Loaded before the transaction: no connection is held while schemas compile.
        self.emitter.catalog().await?;
        let mut conn = db::connect(&self.pool).await?;
        let outcome = conn
            .transaction::<_, GenerationError, _>(async |c| self.apply_locked(c, update).await)
            .await?;
        drop(conn);
        if let Outcome::Applied {
            generation,
            quota_refund,
        } = &outcome
        {
            self.changes.publish(generation.id).await;
            self.refund_quota(generation.tenant_id, *quota_refund).await;
        }
        Ok(outcome)
    }

    async fn apply_locked(
        &self,
        c: &mut AsyncPgConnection,
        update: &Update,
    ) -> Result<Outcome, GenerationError> {
        let Some((current, last_sequence)) = store::lock(c, update.generation_id).await? else {
            return Ok(Outcome::Dropped("no generation has this id"));
        };
        if current.tenant_id != update.tenant {
            return Ok(Outcome::Dropped("the generation belongs to another tenant"));
        }
        if let Some(why) = ignored_because(current.state, last_sequence, update) {
            return Ok(Outcome::Ignored(why));
        }
        let now = Utc::now();
        let state = update.state;
        let terminal = state.is_terminal();
        let ends_unpaid = matches!(state, State::Failed | State::Cancelled);
        // Work that succeeded or failed was started, even if its RUNNING update was lost.
        let starts = current.state == State::Queued && state != State::Cancelled;
        let refunded = if ends_unpaid {
            refund_credits(c, &current).await?
        } else {
            0
        };
        let (error_code, error_message) = match &update.error {
            Some((code, message)) => (Some(code.as_str()), Some(message.as_str())),
            None => (None, None),
        };
        let generation = store::apply(
            c,
            current.id,
            &Change {
                state,
                progress: if state == State::Succeeded {
                    100
                } else {
                    current.progress.max(update.progress)
                },
                last_sequence: update.sequence,
                refunded: current.refunded || ends_unpaid,
                asset_ids: &update.asset_ids,
                result_urls: &update.result_urls,
                error_code,
                error_message,
                start_time: current.start_time.or(starts.then_some(now)),
                end_time: terminal.then_some(now),
                now,
            },
        )
        .await?;
        let tenant = generation.tenant_id;
        if starts {
            self.emitter
                .emit(
                    c,
                    tenant,
                    "generation.started",
                    model::started_payload(&generation),
                )
                .await?;
        }
        match state {
            State::Succeeded => {
                self.record_usage(c, &generation, update.usage).await?;
                self.emitter
                    .emit(
                        c,
                        tenant,
                        "generation.completed",
                        model::completed_payload(&generation),
                    )
                    .await?;
            }
            State::Failed => {
                self.emitter
                    .emit(
                        c,
                        tenant,
                        "generation.failed",
                        model::failed_payload(&generation, refunded),
                    )
                    .await?;
            }
            State::Cancelled => {
                let reason = generation.error_message.clone().unwrap_or_default();
                self.emitter
                    .emit(
                        c,
                        tenant,
                        "generation.cancelled",
                        model::cancelled_payload(&generation, ORCHESTRATOR, &reason, refunded),
                    )
                    .await?;
            }
            State::Queued | State::Running => {}
        }
        let quota_refund = if ends_unpaid && !current.refunded {
            u64::try_from(generation.count).unwrap_or(0)
        } else {
            0
        };
        Ok(Outcome::Applied {
            generation: Box::new(generation),
            quota_refund,
        })
    }

    /// The metered usage of a completed generation, once per generation and metric (the
    /// idempotency id names both), in the update's transaction. Zero quantities are not
    /// usage and are not stored.
    async fn record_usage(
        &self,
        c: &mut AsyncPgConnection,
        g: &Generation,
        usage: Option<(u64, u32)>,
    ) -> Result<(), StoreError> {
        let (seconds, outputs) = usage.unwrap_or((0, 0));
        let api_key_id = g.created_by.strip_prefix("api_key:");
        for (metric, quantity) in [
            ("generation_seconds", seconds),
            ("generation_outputs", u64::from(outputs)),
        ] {
            let Ok(quantity) = i64::try_from(quantity) else {
                continue;
            };
            if quantity == 0 {
                continue;
            }
            let idempotency_id = format!("generation:{}:{metric}", g.id);
            record_metered(
                c,
                &MeteredRecord {
                    tenant: g.tenant_id,
                    api_key_id,
                    metric,
                    quantity,
                    idempotency_id: &idempotency_id,
                    time: g.end_time.unwrap_or(g.update_time),
                    recorded_by: METERED_BY,
                },
            )
            .await?;
        }
        Ok(())
    }
}

/// Whether retrying cannot help: a bug in what devgate builds (an event its own catalog
/// refuses) or a row a constraint refuses. Such an update is acknowledged and logged; the
/// timeout sweep still ends (and refunds) its generation.
fn permanent(e: &GenerationError) -> bool {
    use diesel::result::{DatabaseErrorKind as K, Error};
    let store = match e {
        GenerationError::Event(
            EventError::OwnEventInvalid { .. }
            | EventError::BadSchema { .. }
            | EventError::UnknownType(_),
        ) => return true,
        GenerationError::Store(s) | GenerationError::Event(EventError::Store(s)) => s,
        _ => return false,
    };
    matches!(
        store,
        StoreError::Query(Error::DatabaseError(
            K::CheckViolation | K::NotNullViolation | K::ForeignKeyViolation,
            _
        ))
    )
}

/// Consumes `<prefix>.generation.updates` until stopped (the worker role).
#[derive(Clone)]
pub struct UpdateConsumer {
    generations: Arc<Generations>,
    mq: Mq,
    /// Consecutive failed applications: the requeue delay grows with it.
    failures: Arc<AtomicU32>,
}

impl UpdateConsumer {
    pub fn new(generations: Arc<Generations>, mq: Mq) -> Self {
        Self {
            generations,
            mq,
            failures: Arc::default(),
        }
    }

    /// The queue's name under the deployment's RabbitMQ prefix.
    pub fn queue(&self) -> String {
        routing::updates_queue(&self.mq.config().prefix)
    }

    /// Consumes until `stop`, reconnecting with backoff.
    pub async fn run(self, stop: CancellationToken) {
        while !stop.is_cancelled() {
            let Some(channel) = self.mq.wait_channel(RECONNECT_MAX, &stop).await else {
                break;
            };
            if let Err(e) = self.consume(&channel, &stop).await {
                tracing::warn!(error = %e, "generation updates consumer stopped; reconnecting");
                self.mq.reset().await;
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            // Best effort: the channel may be gone with its connection.
            let _ = channel.close(200, "updates consumer stopped".into()).await;
        }
    }

    /// Declares the durable queue (the orchestrator publishes to it through the default
    /// exchange) and consumes it.
    async fn consume(
        &self,
        channel: &lapin::Channel,
        stop: &CancellationToken,
    ) -> Result<(), MqError> {
        let queue = self.queue();
        self.mq.note_queue(&queue);
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                self.mq.config().queue_type.arguments(),
            )
            .await
            .map_err(|source| MqError::Declare {
                what: format!("queue {queue}"),
                source,
            })?;
        Mq::consume_concurrently(
            channel,
            &queue,
            "devgate-generation-updates",
            CONCURRENCY,
            stop,
            |_, message| self.handle(message, stop),
        )
        .await
    }

    async fn handle(&self, message: Delivery, stop: &CancellationToken) {
        let kind = message.properties.kind().as_ref().map(|k| k.to_string());
        let expected = GenerationUpdate::full_name();
        let update = match kind {
            Some(kind) if kind != expected => Err(format!("AMQP type {kind:?}, not {expected}")),
            _ => decode(&message.data),
        };
        let update = match update {
            Ok(update) => update,
            Err(why) => {
                tracing::warn!(reason = %why, bytes = message.data.len(), "malformed generation update dropped");
                ack(&message).await;
                return;
            }
        };
        let id = update.generation_id;
        match self.generations.apply_update(&update).await {
            Ok(outcome) => {
                self.failures.store(0, Ordering::Relaxed);
                match outcome {
                    Outcome::Applied { generation, .. } => tracing::info!(
                        generation_id = %id,
                        tenant = %generation.tenant_id,
                        sequence = update.sequence,
                        state = generation.state.as_str(),
                        progress = generation.progress,
                        "generation update applied"
                    ),
                    Outcome::Ignored(why) => tracing::debug!(
                        generation_id = %id,
                        sequence = update.sequence,
                        state = update.state.as_str(),
                        reason = why,
                        "generation update ignored"
                    ),
                    Outcome::Dropped(why) => tracing::warn!(
                        generation_id = %id,
                        tenant = %update.tenant,
                        reason = why,
                        "generation update dropped"
                    ),
                }
                ack(&message).await;
            }
            Err(e) if permanent(&e) => {
                tracing::error!(error = %e, generation_id = %id, sequence = update.sequence, "generation update cannot be applied; dropped (the timeout sweep ends the generation)");
                ack(&message).await;
            }
            Err(e) => {
                let failures = self.failures.fetch_add(1, Ordering::Relaxed);
                let delay = retry_delay(failures);
                tracing::warn!(error = %e, generation_id = %id, retry_in_ms = delay.as_millis() as u64, "generation update not applied; requeued");
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(delay) => {}
                }
                let requeue = BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                };
                // A failed nack (the channel is gone) requeues it as well.
                let _ = message.acker.nack(requeue).await;
            }
        }
    }
}

/// The requeue delay after `failures` consecutive failures: doubling, capped, ± 10 %.
fn retry_delay(failures: u32) -> Duration {
    let base = RETRY_FIRST
        .saturating_mul(1 << failures.min(16))
        .min(RETRY_MAX);
    base.mul_f64(0.9 + fastrand::f64() * 0.2)
}

async fn ack(message: &Delivery) {
    // A failed ack (the channel is gone) redelivers the update, which is then ignored.
    if let Err(e) = message.acker.ack(BasicAckOptions::default()).await {
        tracing::debug!(error = %e, "ack of a generation update failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::upstream::orchestrator::v1::{GenerationError as Error, GenerationUsage};

    fn update(state: GenerationState, sequence: u64) -> GenerationUpdate {
        let mut u = GenerationUpdate {
            generation_id: Uuid::now_v7().to_string(),
            tenant_id: Uuid::new_v4().to_string(),
            sequence,
            progress: 40,
            ..Default::default()
        };
        u.set_state(state);
        u
    }

    fn decoded(u: &GenerationUpdate) -> Result<Update, String> {
        decode(&u.encode_to_vec())
    }

    #[test]
    fn a_success_needs_uuid_assets_with_one_url_each() {
        let mut u = update(GenerationState::Succeeded, 5);
        assert!(decoded(&u).unwrap_err().contains("0 assets"));
        u.asset_ids = vec![Uuid::new_v4().to_string()];
        assert!(decoded(&u).unwrap_err().contains("differ"));
        u.result_urls = vec!["ftp://x/y".into()];
        assert!(decoded(&u).unwrap_err().contains("URL"));
        u.result_urls = vec!["https://assets.example/a.png".into()];
        u.usage = Some(GenerationUsage {
            seconds: 3,
            outputs: 1,
        });
        let ok = decoded(&u).unwrap();
        assert_eq!(
            (ok.state, ok.sequence, ok.usage),
            (State::Succeeded, 5, Some((3, 1)))
        );
        u.asset_ids = vec!["asset-1".into()];
        assert!(decoded(&u).unwrap_err().contains("not a UUID"));
    }

    #[test]
    fn malformed_bodies_and_fields_are_refused() {
        assert!(decode(b"\xff\xff\xff").is_err());
        let mut u = update(GenerationState::Running, 1);
        u.generation_id = "g-1".into();
        assert!(decoded(&u).unwrap_err().contains("generation_id"));
        let mut u = update(GenerationState::Running, 0);
        assert!(decoded(&u).unwrap_err().contains("sequence"));
        u.sequence = 1;
        u.progress = 101;
        assert!(decoded(&u).unwrap_err().contains("progress"));
        let u = update(GenerationState::Unspecified, 1);
        assert!(decoded(&u).unwrap_err().contains("state"));
    }

    #[test]
    fn failures_keep_a_clean_code_and_a_bounded_message() {
        let mut u = update(GenerationState::Failed, 3);
        u.error = Some(Error {
            code: "CONTENT_POLICY".into(),
            message: "m".repeat(5000),
        });
        let d = decoded(&u).unwrap();
        let (code, message) = d.error.unwrap();
        assert_eq!((code.as_str(), message.len()), ("CONTENT_POLICY", 1000));
        u.error = Some(Error {
            code: "drop table;".into(),
            message: String::new(),
        });
        let (code, message) = decoded(&u).unwrap().error.unwrap();
        assert_eq!(code, "UNKNOWN");
        assert_eq!(message, "the orchestrator gave no reason");
        let mut c = update(GenerationState::Cancelled, 4);
        c.error = None;
        assert_eq!(decoded(&c).unwrap().error.unwrap().0, "CANCELLED");
    }

    #[test]
    fn only_forward_moves_with_a_higher_sequence_apply() {
        let at = |state, sequence| Update {
            generation_id: Uuid::nil(),
            tenant: TenantId(Uuid::nil()),
            sequence,
            state,
            progress: 0,
            asset_ids: vec![],
            result_urls: vec![],
            error: None,
            usage: None,
        };
        use State::*;
        assert_eq!(ignored_because(Queued, 0, &at(Running, 1)), None);
        assert_eq!(ignored_because(Running, 1, &at(Running, 2)), None);
        assert_eq!(ignored_because(Queued, 0, &at(Succeeded, 4)), None);
        assert_eq!(ignored_because(Running, 3, &at(Failed, 4)), None);
        assert!(ignored_because(Running, 2, &at(Running, 2)).is_some());
        assert!(ignored_because(Running, 3, &at(Running, 2)).is_some());
        assert!(ignored_because(Running, 1, &at(Queued, 2)).is_some());
        for ended in [Succeeded, Failed, Cancelled] {
            assert!(ignored_because(ended, 1, &at(Cancelled, 9)).is_some());
            assert!(ignored_because(ended, 1, &at(Succeeded, 9)).is_some());
        }
    }

    #[test]
    fn only_what_a_retry_cannot_fix_is_dropped() {
        use diesel::result::{DatabaseErrorKind as K, Error};
        let db = |kind| {
            GenerationError::Store(StoreError::Query(Error::DatabaseError(
                kind,
                Box::new("refused".to_string()),
            )))
        };
        assert!(permanent(&db(K::CheckViolation)));
        assert!(permanent(&GenerationError::Event(
            EventError::OwnEventInvalid {
                event_type: "generation.completed".into(),
                reason: "assets".into(),
            }
        )));
        assert!(!permanent(&db(K::SerializationFailure)));
        assert!(!permanent(&GenerationError::Store(
            StoreError::Unavailable("pool timed out".into())
        )));
        assert!(!permanent(&GenerationError::Event(EventError::Store(
            StoreError::Unavailable("closed".into())
        ))));
    }

    #[test]
    fn retry_delays_grow_and_stop_growing() {
        assert!(retry_delay(0) < Duration::from_millis(250));
        assert!(retry_delay(3) > Duration::from_millis(1400));
        assert!(retry_delay(40) <= RETRY_MAX.mul_f64(1.1));
    }
}
