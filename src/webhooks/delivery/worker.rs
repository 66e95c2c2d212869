//! The delivery worker: consumes `<prefix>.webhooks.deliveries` with up to
//! `DEVGATE_WEBHOOK_CONCURRENCY` tasks in flight, and for each one claims the delivery (a
//! lease), POSTs the signed event with the SSRF-guarded client, logs the attempt, and either
//! finishes the delivery or queues the next attempt on a delay queue. The incoming task is
//! acknowledged only after that: a crash repeats at most the attempt in flight.
//!
//! Order of effects after an attempt: (1) the next task is published and confirmed, (2) the
//! delivery row is updated, (3) the task is acked. A crash between (1) and (2) leaves two
//! tasks; the delivery's attempt count makes the later one a duplicate that is dropped.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, SecondsFormat, Utc};
use diesel_async::AsyncConnection;
use lapin::{
    message::Delivery as AmqpMessage,
    options::{BasicAckOptions, BasicNackOptions},
};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use url::Url;

use super::{
    Attempt, ErrorKind, MAX_RESPONSE_BYTES,
    queue::{Queues, Task, TaskQueue, jitter, round_delay},
    store::{self, Blocked, Claim, Claimed, Recorded, Success},
};
use crate::{
    db::{self, PgPool, StoreError, batch::BatchLog, group::GroupCommit},
    events::{EventError, emitter::Emitter},
    identity::TenantId,
    kv::Redis,
    mq::{Mq, MqError},
    webhooks::{
        config::{MAX_RETRY_DELAY, WebhookDeliveryConfig},
        model::disabled_payload,
        secret_box::{KeyRing, row_context},
        signing::{self, Secret},
        ssrf::{GuardedClient, SsrfError},
        store as endpoints,
    },
};

/// Beyond the HTTP timeout, how long a claimed delivery stays leased to its worker.
const LEASE_MARGIN: Duration = Duration::from_secs(10);
/// A failed step (Postgres or RabbitMQ down) waits this long before the task is requeued.
const STEP_RETRY: Duration = Duration::from_secs(1);
/// Reconnect backoff of the consumer.
const RECONNECT_MAX: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Mq(#[from] MqError),
    #[error(transparent)]
    Event(#[from] EventError),
}

impl From<diesel::result::Error> for DeliveryError {
    fn from(e: diesel::result::Error) -> Self {
        DeliveryError::Store(e.into())
    }
}

/// What one attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Delivered,
    /// `410 Gone`: the endpoint asked not to be called again.
    Gone,
    /// Try again later; a `Retry-After` the endpoint sent, if any.
    Failed {
        retry_after: Option<Duration>,
    },
}

/// Everything a worker process needs to deliver (cheap to clone).
#[derive(Clone)]
pub struct DeliveryWorker {
    pool: PgPool,
    tasks: TaskQueue,
    client: GuardedClient,
    keys: Option<KeyRing>,
    config: Arc<WebhookDeliveryConfig>,
    emitter: Arc<Emitter>,
    attempt_log: BatchLog<Attempt>,
    redis: Redis,
    /// Claims, made in groups.
    claims: GroupCommit<Claim>,
    /// Successes, committed in groups before their tasks are acked.
    successes: GroupCommit<Success>,
    /// The per-endpoint rate limit ([`SPACING`]).
    spacing: redis::Script,
}

/// The per-endpoint rate limit: deliveries spaced at least `ARGV[1]` µs apart (a GCRA with
/// no burst), so an endpoint limited to N per second never gets more than N in any second,
/// boundaries included (a fixed one-second window lets 2N through across one). Answers 0
/// (go, the slot is taken) or the µs to wait for the next free slot. Redis's clock, so
/// replicas agree.
const SPACING: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local next_free = tonumber(redis.call('GET', KEYS[1]) or '0')
if next_free > now then
    return next_free - now
end
redis.call('SET', KEYS[1], now + interval, 'PX', math.floor(interval / 1000) + 1000)
return 0
";

/// Connections the claimer and the success writer each use at most (one batch each).
const GROUP_WRITERS: usize = 3;

impl DeliveryWorker {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        pool: PgPool,
        tasks: TaskQueue,
        client: GuardedClient,
        keys: Option<KeyRing>,
        config: WebhookDeliveryConfig,
        emitter: Arc<Emitter>,
        attempt_log: BatchLog<Attempt>,
        redis: Redis,
    ) -> Self {
        Self {
            claims: GroupCommit::spawn(pool.clone(), GROUP_WRITERS),
            successes: GroupCommit::spawn(pool.clone(), GROUP_WRITERS),
            spacing: redis::Script::new(SPACING),
            pool,
            tasks,
            client,
            keys,
            config: Arc::new(config),
            emitter,
            attempt_log,
            redis,
        }
    }

    /// Consumes tasks until `stop`, reconnecting to RabbitMQ with backoff; in-flight
    /// deliveries finish before it returns.
    pub async fn run(self, stop: CancellationToken) {
        let mq = self.tasks.mq().clone();
        let queues = self.tasks.queues().clone();
        while !stop.is_cancelled() {
            let Some(channel) = mq.wait_channel(RECONNECT_MAX, &stop).await else {
                return;
            };
            match self.consume(&channel, &queues, &stop).await {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "webhook delivery consumer stopped; reconnecting");
                    mq.reset().await;
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(STEP_RETRY) => {}
                    }
                }
            }
            // Best effort: the channel may be gone with its connection.
            let _ = channel.close(200, "delivery consumer stopped".into()).await;
        }
    }

    async fn consume(
        &self,
        channel: &lapin::Channel,
        queues: &Queues,
        stop: &CancellationToken,
    ) -> Result<(), MqError> {
        queues.declare(self.tasks.mq(), channel).await?;
        Mq::consume_concurrently(
            channel,
            &queues.deliveries,
            "devgate-delivery",
            self.config.concurrency,
            stop,
            |_, message| self.handle(message),
        )
        .await
    }

    /// One task, acked when done (or dropped as unreadable), requeued after a failed step.
    async fn handle(&self, message: AmqpMessage) {
        let task: Task = match serde_json::from_slice(&message.data) {
            Ok(task) => task,
            Err(e) => {
                tracing::error!(error = %e, "unreadable delivery task dropped");
                let _ = message.acker.ack(BasicAckOptions::default()).await;
                return;
            }
        };
        match self.process(task).await {
            Ok(()) => {
                // A lost ack redelivers the task, which then finds its attempt made: a no-op.
                let _ = message.acker.ack(BasicAckOptions::default()).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, delivery_id = %task.delivery_id, "webhook delivery step failed; the task is requeued");
                tokio::time::sleep(STEP_RETRY).await;
                let _ = message
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await;
            }
        }
    }

    /// Claims, attempts, schedules and records one task.
    pub async fn process(&self, task: Task) -> Result<(), DeliveryError> {
        let lease = self.config.timeout + LEASE_MARGIN;
        let claimed = {
            let claim = Claim {
                id: task.delivery_id,
                attempt: task.attempt,
                manual: task.manual,
                lease,
            };
            match self.claims.submit(claim).await? {
                Some(c) => c,
                None => {
                    let mut conn = db::connect(&self.pool).await?;
                    return match store::blocked(
                        &mut conn,
                        task.delivery_id,
                        task.attempt,
                        task.manual,
                    )
                    .await?
                    {
                        Blocked::Stale => Ok(()),
                        Blocked::Leased(left) => {
                            let wait = left.max(Duration::from_secs(1));
                            Ok(self.tasks.publish(&[task], Some(wait)).await?)
                        }
                    };
                }
            }
        };
        let was_pending = claimed.status == "pending";
        let test_target = claimed.target_endpoint_id == Some(claimed.endpoint_id);
        if claimed.endpoint_disabled && !test_target {
            let mut conn = db::connect(&self.pool).await?;
            let recorded = Recorded {
                status: "failed",
                attempts: claimed.attempts,
                next_attempt_time: None,
                last_attempt_time: None,
                last_status_code: None,
                last_error: Some("endpoint disabled"),
            };
            store::record(&mut conn, claimed.id, &recorded).await?;
            return Ok(());
        }
        if let Err(wait) = self.admit(&claimed).await {
            let mut conn = db::connect(&self.pool).await?;
            // Over the endpoint's rate: back when its next slot is free (spread a little, so
            // the tasks waiting for one endpoint do not all return at once), uncounted.
            let wait = wait + Duration::from_millis(fastrand::u64(0..=wait.as_millis() as u64));
            self.tasks.publish(&[task], Some(wait)).await?;
            store::release(&mut conn, claimed.id).await?;
            return Ok(());
        }

        let number = claimed.attempts + 1;
        let (attempt, verdict) = self.attempt(&claimed, number, task.manual).await;
        let (status_code, error) = (
            attempt.status_code,
            attempt
                .error_kind
                .map(|k| describe(k, attempt.status_code, attempt.error_message.as_deref())),
        );
        let attempt_time = attempt.attempt_time;
        self.attempt_log.record(attempt);

        let mut recorded = Recorded {
            status: "failed",
            attempts: number,
            next_attempt_time: None,
            last_attempt_time: Some(attempt_time),
            last_status_code: status_code,
            last_error: error.as_deref(),
        };
        match verdict {
            Verdict::Delivered => {
                self.successes
                    .submit(Success {
                        id: claimed.id,
                        attempts: number,
                        attempt_time,
                        status_code,
                    })
                    .await?;
            }
            Verdict::Gone => {
                let mut conn = db::connect(&self.pool).await?;
                conn.transaction::<(), DeliveryError, _>(async |conn| {
                    store::record(conn, claimed.id, &recorded).await?;
                    if !claimed.endpoint_disabled {
                        self.disable(conn, &claimed, "gone", None, status_code)
                            .await?;
                    }
                    Ok(())
                })
                .await?;
            }
            Verdict::Failed { retry_after } => {
                let schedule = &self.config.retry_schedule.0;
                let step = (number - 1) as usize;
                if was_pending && step < schedule.len() {
                    let mut delay = jitter(schedule[step]);
                    if let Some(asked) = retry_after
                        && asked > delay
                    {
                        delay = asked.min(MAX_RETRY_DELAY);
                    }
                    let delay = round_delay(delay);
                    let next = Task {
                        delivery_id: claimed.id,
                        attempt: number + 1,
                        manual: false,
                    };
                    self.tasks.publish(&[next], Some(delay)).await?;
                    recorded.status = "pending";
                    recorded.next_attempt_time = Some(
                        attempt_time
                            + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX),
                    );
                    let mut conn = db::connect(&self.pool).await?;
                    store::record(&mut conn, claimed.id, &recorded).await?;
                } else {
                    let mut conn = db::connect(&self.pool).await?;
                    conn.transaction::<(), DeliveryError, _>(async |conn| {
                        store::record(conn, claimed.id, &recorded).await?;
                        // A manual attempt of an already failed delivery is not a new failure.
                        if was_pending
                            && let Some(run) =
                                store::count_failure(conn, claimed.endpoint_id).await?
                            && self.config.disable_after > 0
                            && run >= self.config.disable_after as i32
                        {
                            self.disable(
                                conn,
                                &claimed,
                                "consecutive_failures",
                                Some(run),
                                status_code,
                            )
                            .await?;
                        }
                        Ok(())
                    })
                    .await?;
                }
            }
        }
        Ok(())
    }

    /// Disables the endpoint and emits `webhook_endpoint.disabled` in the caller's transaction.
    async fn disable(
        &self,
        conn: &mut diesel_async::AsyncPgConnection,
        claimed: &Claimed,
        reason: &str,
        consecutive_failures: Option<i32>,
        last_status_code: Option<i32>,
    ) -> Result<(), DeliveryError> {
        let tenant = TenantId(claimed.tenant_id);
        let endpoint =
            endpoints::disable(conn, tenant, claimed.endpoint_id, reason, Utc::now()).await?;
        tracing::warn!(webhook_endpoint_id = %endpoint.id, reason, "webhook endpoint disabled");
        let payload = disabled_payload(&endpoint, reason, consecutive_failures, last_status_code);
        self.emitter
            .emit(conn, tenant, "webhook_endpoint.disabled", payload)
            .await?;
        Ok(())
    }

    /// The endpoint's `rate_limit_per_second` (0 = none): a one-second window counted in
    /// Redis, shared by every worker. Redis down → admitted (a delay beats a stall).
    async fn admit(&self, claimed: &Claimed) -> Result<(), Duration> {
        let Ok(per_second) = u64::try_from(claimed.rate_limit_per_second) else {
            return Ok(());
        };
        if per_second == 0 {
            return Ok(());
        }
        let key = self
            .redis
            .key_fmt(format_args!("whrl:{}", claimed.endpoint_id));
        let mut conn = self.redis.conn();
        let wait: redis::RedisResult<i64> = self
            .spacing
            .key(key)
            .arg(1_000_000 / per_second)
            .invoke_async(&mut conn)
            .await;
        match wait {
            Ok(us) if us > 0 => Err(Duration::from_micros(us.unsigned_abs())),
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::debug!(error = %e, "webhook rate limit unavailable; admitting");
                Ok(())
            }
        }
    }

    /// Makes the HTTP attempt; never fails (a failure is an attempt too).
    async fn attempt(&self, c: &Claimed, number: i32, manual: bool) -> (Attempt, Verdict) {
        let now = Utc::now();
        let mut attempt = Attempt {
            delivery_id: c.id,
            attempt: number,
            tenant: TenantId(c.tenant_id),
            endpoint_id: c.endpoint_id,
            attempt_time: now,
            url: c.url.clone(),
            status_code: None,
            response_headers: Vec::new(),
            response_body: String::new(),
            latency_ms: 0,
            error_kind: None,
            error_message: None,
            manual,
        };
        let request = match self.request(c, now) {
            Ok(r) => r,
            Err(message) => {
                attempt.error_kind = Some(ErrorKind::Other);
                attempt.error_message = Some(message);
                return (attempt, Verdict::Failed { retry_after: None });
            }
        };
        let started = Instant::now();
        let sent = self.client.execute(request).await;
        let verdict = match sent {
            Ok(response) => {
                let status = response.status();
                attempt.status_code = Some(i32::from(status.as_u16()));
                let retry_after = retry_after(response.headers(), Utc::now());
                let mut budget = MAX_RESPONSE_BYTES;
                for (name, value) in response.headers() {
                    let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                    let size = name.as_str().len() + value.len();
                    if size > budget {
                        break;
                    }
                    budget -= size;
                    attempt
                        .response_headers
                        .push((name.as_str().to_string(), value));
                }
                match read_capped(response, budget).await {
                    Ok(body) => attempt.response_body = body,
                    Err(e) => {
                        // The status decides; a body that broke off is noted, not fatal.
                        attempt.error_message = Some(format!("reading the response body: {e}"));
                    }
                }
                if status.is_success() {
                    attempt.error_message = None;
                    Verdict::Delivered
                } else {
                    attempt.error_kind = Some(ErrorKind::Status);
                    if status == reqwest::StatusCode::GONE {
                        Verdict::Gone
                    } else {
                        Verdict::Failed { retry_after }
                    }
                }
            }
            Err(e) => {
                let (kind, message) = classify(&e);
                attempt.error_kind = Some(kind);
                attempt.error_message = Some(message);
                Verdict::Failed { retry_after: None }
            }
        };
        attempt.latency_ms = started.elapsed().as_millis().min(i32::MAX as u128) as i32;
        (attempt, verdict)
    }

    /// The signed POST: body `{"type","timestamp","data"}`, the endpoint's headers, then the
    /// Standard Webhooks headers (custom headers can never name those: validation refuses).
    fn request(&self, c: &Claimed, now: DateTime<Utc>) -> Result<reqwest::Request, String> {
        let keys = self.keys.as_ref().ok_or(
            "DEVGATE_ENCRYPTION_KEYS is not configured: the signing secret cannot be read",
        )?;
        let context = row_context(c.tenant_id, c.endpoint_id);
        let open = |stored: &str| -> Result<Secret, String> {
            let bytes = keys
                .open(stored, &context)
                .map_err(|e| format!("signing secret: {e}"))?;
            Secret::from_bytes(bytes).map_err(|e| format!("signing secret: {e}"))
        };
        let current = open(&c.secret_ciphertext)?;
        let previous = match (&c.previous_secret_ciphertext, c.previous_secret_expire_time) {
            (Some(stored), Some(until)) if until > now => Some((open(stored)?, until.timestamp())),
            _ => None,
        };
        let timestamp = now.timestamp();
        let secrets = signing::secrets_valid_at(
            &current,
            previous.as_ref().map(|(s, until)| (s, *until)),
            timestamp,
        );
        let body = body(&c.event_type, c.event_time, &c.payload)?;
        let msg_id = c.event_id.to_string();
        let signature = signing::sign(&secrets, &msg_id, timestamp, &body)
            .map_err(|e| format!("signing: {e}"))?;

        let mut headers = HeaderMap::new();
        if let Some(custom) = c.headers.as_object() {
            for (name, value) in custom {
                if let (Ok(name), Some(Ok(value))) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    value.as_str().map(HeaderValue::from_str),
                ) {
                    headers.insert(name, value);
                }
            }
        }
        let fixed = [
            ("content-type", "application/json".to_string()),
            ("webhook-id", msg_id),
            ("webhook-timestamp", timestamp.to_string()),
            ("webhook-signature", signature),
        ];
        for (name, value) in fixed {
            headers.insert(
                HeaderName::from_static(name),
                HeaderValue::from_str(&value).map_err(|e| format!("header {name}: {e}"))?,
            );
        }
        let url = Url::parse(&c.url).map_err(|e| format!("the endpoint URL: {e}"))?;
        let mut request = reqwest::Request::new(reqwest::Method::POST, url);
        *request.headers_mut() = headers;
        *request.body_mut() = Some(body.into());
        Ok(request)
    }
}

/// `{"type","timestamp","data"}`, in that order (serde_json would sort the keys).
fn body(
    event_type: &str,
    time: DateTime<Utc>,
    data: &serde_json::Value,
) -> Result<Vec<u8>, String> {
    fn encode<T: serde::Serialize + ?Sized>(v: &T) -> Result<Vec<u8>, String> {
        serde_json::to_vec(v).map_err(|e| format!("encoding the body: {e}"))
    }
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(br#"{"type":"#);
    out.extend(encode(event_type)?);
    out.extend_from_slice(br#","timestamp":"#);
    out.extend(encode(&time.to_rfc3339_opts(SecondsFormat::Micros, true))?);
    out.extend_from_slice(br#","data":"#);
    out.extend(encode(data)?);
    out.push(b'}');
    Ok(out)
}

/// The body as text, at most `limit` bytes (cut on a character boundary).
async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<String, reqwest::Error> {
    let mut body = Vec::new();
    while body.len() < limit {
        match response.chunk().await? {
            Some(chunk) => {
                let take = chunk.len().min(limit - body.len());
                body.extend_from_slice(&chunk[..take]);
            }
            None => break,
        }
    }
    let mut text = String::from_utf8_lossy(&body).into_owned();
    if text.len() > limit {
        let mut cut = limit;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    Ok(text)
}

/// `Retry-After` as seconds or an HTTP date, capped at 24 h.
fn retry_after(headers: &HeaderMap, now: DateTime<Utc>) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            let at = httpdate::parse_http_date(value).ok()?;
            let at: DateTime<Utc> = at.into();
            (at - now).to_std().ok()?
        }
    };
    Some(wait.min(MAX_RETRY_DELAY))
}

/// The error kind of a failed send, and a message without secrets (URLs of endpoints are
/// the tenant's own).
fn classify(e: &SsrfError) -> (ErrorKind, String) {
    if e.is_refusal() {
        return (ErrorKind::RefusedBySsrfGuard, e.to_string());
    }
    match e {
        SsrfError::Unresolvable { .. } => (ErrorKind::Dns, e.to_string()),
        SsrfError::Transport(inner) => {
            let chain = error_chain(inner);
            let kind = if inner.is_timeout() {
                ErrorKind::Timeout
            } else if chain.contains("dns error") || chain.contains("does not resolve") {
                ErrorKind::Dns
            } else if chain.contains("certificate")
                || chain.contains("tls")
                || chain.contains("handshake")
            {
                ErrorKind::Tls
            } else if inner.is_connect() {
                ErrorKind::Connect
            } else {
                ErrorKind::Other
            };
            (kind, chain)
        }
        _ => (ErrorKind::Other, e.to_string()),
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.join(": ").to_lowercase()
}

/// `last_error` of a delivery: the kind, with the status for `status`.
fn describe(kind: ErrorKind, status: Option<i32>, message: Option<&str>) -> String {
    match (kind, status) {
        (ErrorKind::Status, Some(code)) => format!("status {code}"),
        _ => match message {
            Some(m) => format!(
                "{}: {}",
                kind.as_str(),
                m.chars().take(500).collect::<String>()
            ),
            None => kind.as_str().to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates_and_is_capped() {
        let now = Utc::now();
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("120"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(120)));
        h.insert("retry-after", HeaderValue::from_static("999999999"));
        assert_eq!(retry_after(&h, now), Some(MAX_RETRY_DELAY));
        let later = httpdate::fmt_http_date((now + chrono::Duration::seconds(600)).into());
        h.insert("retry-after", HeaderValue::from_str(&later).unwrap());
        let got = retry_after(&h, now).unwrap();
        assert!(
            (Duration::from_secs(598)..=Duration::from_secs(600)).contains(&got),
            "{got:?}"
        );
        h.insert("retry-after", HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h, now), None);
    }

    #[test]
    fn the_body_keeps_type_timestamp_data_in_order() {
        let time = "2026-11-23T10:00:00Z".parse().unwrap();
        let out = body("credits.low", time, &serde_json::json!({"b": 1, "a": "x"})).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"type":"credits.low","timestamp":"2026-11-23T10:00:00.000000Z","data":{"a":"x","b":1}}"#
        );
    }

    #[test]
    fn a_status_failure_reads_as_its_code() {
        assert_eq!(describe(ErrorKind::Status, Some(503), None), "status 503");
        assert_eq!(
            describe(ErrorKind::Timeout, None, Some("operation timed out")),
            "timeout: operation timed out"
        );
    }
}
