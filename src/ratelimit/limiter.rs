//! The limiter: one Lua script, one Redis round trip per call, every window of the key
//! decided atomically; an in-process token bucket while Redis is down (fail open), or
//! UNAVAILABLE when configured to fail closed.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use super::{
    Metric, QuotaLimits, QuotaUsage, Quotas, RateLimitError,
    model::{Decision, Limits, Window, WindowState},
    quota::{expiry, month_bounds},
};
use crate::{
    identity::TenantId,
    kv::{OutageLog, Redis},
};

/// The script, also run by `benches/redis_limit_baseline.sh` for the physical limit.
pub const SCRIPT: &str = include_str!("token_bucket.lua");

/// Per window: tokens left and when they were counted (ms since the epoch).
type LocalBuckets = [(f64, u64); 3];

pub struct RateLimiter {
    redis: Redis,
    script: redis::Script,
    fail_closed: bool,
    outage: OutageLog,
    quotas: Quotas,
    /// Fallback buckets while Redis is down: per key id, per window (tokens, at ms).
    local: moka::sync::Cache<String, Arc<Mutex<LocalBuckets>>>,
}

impl RateLimiter {
    pub fn new(redis: Redis, fail_closed: bool) -> Self {
        Self {
            quotas: Quotas::new(redis.clone()),
            redis,
            script: redis::Script::new(SCRIPT),
            fail_closed,
            outage: OutageLog::new("rate limiting"),
            local: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(86_400))
                .build(),
        }
    }

    pub fn quotas(&self) -> &Quotas {
        &self.quotas
    }

    /// `sink` is told whenever a call takes its tenant's quota past a level.
    pub fn with_crossings(self, sink: Arc<dyn super::CrossingSink>) -> Self {
        Self {
            quotas: self.quotas.with_crossings(sink),
            ..self
        }
    }

    /// One API-key call: `cost` tokens from each of the key's windows and one request from
    /// its tenant's monthly quota, both in the same script (nothing is taken unless both
    /// have room).
    pub async fn admit(
        &self,
        tenant: TenantId,
        key_id: &str,
        limits: &Limits,
        quotas: &QuotaLimits,
        cost: u32,
    ) -> Result<Decision, RateLimitError> {
        let quota = Some((Metric::Requests, quotas.monthly_requests));
        let (decision, usage) = self.run(tenant, key_id, limits, cost, quota).await?;
        if let Some(usage) = usage.filter(|u| !u.allowed) {
            return Err(RateLimitError::QuotaExhausted { tenant, usage });
        }
        if decision.allowed {
            Ok(decision)
        } else {
            Err(RateLimitError::Exceeded {
                subject: format!("api_key:{key_id}"),
                decision,
            })
        }
    }

    /// Takes `cost` tokens from every window of the key, or none if any window lacks them
    /// (cost 0 reads the windows without spending).
    pub async fn check(
        &self,
        tenant: TenantId,
        key_id: &str,
        limits: &Limits,
        cost: u32,
    ) -> Result<Decision, RateLimitError> {
        Ok(self.run(tenant, key_id, limits, cost, None).await?.0)
    }

    async fn run(
        &self,
        tenant: TenantId,
        key_id: &str,
        limits: &Limits,
        cost: u32,
        quota: Option<(Metric, u64)>,
    ) -> Result<(Decision, Option<QuotaUsage>), RateLimitError> {
        let windows = limits.windows();
        let (month, reset) = month_bounds(chrono::Utc::now());
        // KEYS[2] is always a real counter of the same tenant, even when no quota is checked
        // (the script then leaves it alone): Redis Cluster refuses a script whose keys map to
        // different slots (CROSSSLOT), and both keys are hash-tagged by tenant.
        let metric = quota.map_or(Metric::Requests, |(metric, _)| metric);
        let (units, limit) = quota.map_or((0, 0), |(_, limit)| (1, limit));
        // The EVALSHA command built directly, its keys and arguments written once into the
        // command's buffer (`Script::key`/`arg` keep each in a Vec of its own first, and
        // copy them again): this runs on every API-key call.
        let mut cmd = redis::Cmd::with_capacity(16, 256);
        cmd.arg("EVALSHA")
            .arg(self.script.get_hash())
            .arg(2)
            .arg(bucket_key(&self.redis, tenant, key_id))
            .arg(self.quotas.key(tenant, metric, month))
            .arg(cost)
            .arg(units)
            .arg(limit)
            .arg(expiry(reset));
        for w in &windows {
            cmd.arg(w.capacity).arg(rate_per_ms(w));
        }
        let mut conn = self.redis.conn();
        let reply = match cmd.query_async::<Vec<i64>>(&mut conn).await {
            // Not loaded (a new or flushed Redis): load it and send the call again, as
            // `ScriptInvocation::invoke_async` does.
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                match self.script.load_async(&mut conn).await {
                    Ok(_) => cmd.query_async(&mut conn).await,
                    Err(e) => Err(e),
                }
            }
            other => other,
        };
        match self.outage.observe(reply) {
            Some(reply) => {
                let decision = decision_from_reply(&windows, &reply)?;
                let usage = quota.map(|(metric, limit)| QuotaUsage {
                    metric,
                    allowed: reply[1] == 1,
                    limit,
                    used: reply[2].max(0) as u64,
                    reset,
                });
                // Admitted: the script counted `units`; a refused call counted nothing.
                if let Some(usage) = usage.filter(|u| u.allowed && decision.allowed) {
                    self.quotas.observe(tenant, month, &usage, units);
                }
                Ok((decision, usage))
            }
            None if self.fail_closed => Err(RateLimitError::Unavailable),
            // Quotas fail open: the worker's reconciliation restores the count later.
            None => Ok((self.check_locally(key_id, &windows, cost), None)),
        }
    }

    /// The same buckets in this process: limits hold per replica until Redis is back.
    fn check_locally(&self, key_id: &str, windows: &[Window; 3], cost: u32) -> Decision {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let state = self.local.get_with(key_id.to_string(), || {
            Arc::new(Mutex::new(windows.map(|w| (f64::from(w.capacity), now))))
        });
        let mut buckets = state.lock().expect("local bucket lock");
        let cost = f64::from(cost);
        let mut left = [0f64; 3];
        for (i, w) in windows.iter().enumerate() {
            let (tokens, at) = buckets[i];
            left[i] =
                f64::from(w.capacity).min(tokens + now.saturating_sub(at) as f64 * rate_per_ms(w));
        }
        let allowed = left.iter().all(|t| *t >= cost);
        let mut states = Vec::with_capacity(3);
        let mut retry_ms = 0f64;
        for (i, w) in windows.iter().enumerate() {
            if allowed {
                left[i] -= cost;
            } else if left[i] < cost {
                retry_ms = retry_ms.max((cost - left[i]) / rate_per_ms(w));
            }
            buckets[i] = (left[i], now);
            states.push(WindowState {
                window: *w,
                remaining: left[i].max(0.0).floor() as u64,
                reset: ((f64::from(w.capacity) - left[i]) / rate_per_ms(w) / 1000.0).ceil() as u64,
            });
        }
        Decision {
            allowed,
            windows: states,
            retry_after: (!allowed).then(|| Duration::from_millis(retry_ms.ceil() as u64)),
        }
    }
}

/// The key's bucket hash, hash-tagged by tenant like the quota counters.
fn bucket_key(redis: &Redis, tenant: TenantId, key_id: &str) -> String {
    redis.key_fmt(format_args!("rl:{{{tenant}}}:{key_id}"))
}

fn rate_per_ms(w: &Window) -> f64 {
    f64::from(w.limit) / (w.seconds as f64 * 1000.0)
}

fn decision_from_reply(windows: &[Window; 3], reply: &[i64]) -> Result<Decision, RateLimitError> {
    if reply.len() != 3 + 3 * windows.len() {
        return Err(RateLimitError::Script(format!(
            "unexpected reply {reply:?}"
        )));
    }
    let allowed = reply[0] == 1;
    let mut retry_ms = 0i64;
    let states = windows
        .iter()
        .zip(reply[3..].chunks_exact(3))
        .map(|(w, r)| {
            retry_ms = retry_ms.max(r[2]);
            WindowState {
                window: *w,
                remaining: r[0].max(0) as u64,
                reset: (r[1].max(0) as u64).div_ceil(1000),
            }
        })
        .collect();
    Ok(Decision {
        allowed,
        windows: states,
        retry_after: (!allowed).then(|| Duration::from_millis(retry_ms.max(0) as u64)),
    })
}
