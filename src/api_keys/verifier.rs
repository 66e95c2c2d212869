//! Token verification, the hot path of every API-key call:
//! parse + checksum → cache (SHA-256 of the token) → failed-attempt limit (Redis) →
//! lookup by key id → argon2id (bounded, blocking pool) → revoked/expired → IP allow-list.

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use ipnetwork::IpNetwork;

use super::{
    ApiKeyError,
    config::ApiKeyConfig,
    hashing::SecretHasher,
    last_used::LastUsedRecorder,
    model::ip_allowed,
    store::{self, AuthRecord},
    token,
};
use crate::auth::{KeyPrincipal as VerifiedKey, VerifyFailure};
use crate::identity::{Environment, KeyId};
use crate::{
    db::{self, PgPool},
    identity::TenantId,
    kv::{OutageLog, Redis},
    ratelimit::{PlanLimits, PlanQuotas},
};

struct CachedKey {
    key: VerifiedKey,
    allowed_cidrs: Vec<IpNetwork>,
    /// The entry must not outlive the key's expiry or the grace of the secret it matched.
    valid_until: Option<DateTime<Utc>>,
}

type TokenDigest = [u8; 32];

pub struct KeyVerifier {
    pool: PgPool,
    hasher: Arc<SecretHasher>,
    cache: moka::future::Cache<TokenDigest, Arc<CachedKey>>,
    failures: FailureLimiter,
    last_used: LastUsedRecorder,
    plans: PlanLimits,
    quotas: PlanQuotas,
    /// Whether the pub/sub invalidation listener is subscribed right now.
    invalidations_live: AtomicBool,
}

impl KeyVerifier {
    pub fn new(
        pool: PgPool,
        hasher: Arc<SecretHasher>,
        redis: Redis,
        last_used: LastUsedRecorder,
        config: &ApiKeyConfig,
        plans: PlanLimits,
        quotas: PlanQuotas,
    ) -> Self {
        let cache = moka::future::Cache::builder()
            .max_capacity(config.cache_capacity)
            .time_to_live(config.cache_ttl)
            .support_invalidation_closures()
            .build();
        Self {
            pool,
            hasher,
            cache,
            failures: FailureLimiter::new(redis, config.failure_limit, config.failure_window),
            last_used,
            plans,
            quotas,
            invalidations_live: AtomicBool::new(false),
        }
    }

    /// `Ok(Err(_))` is an answer about the token; `Err(_)` means it could not be decided
    /// (database unavailable, ...).
    pub async fn verify(
        &self,
        presented: &str,
        client_ip: Option<IpAddr>,
    ) -> Result<Result<VerifiedKey, VerifyFailure>, ApiKeyError> {
        let parsed = match token::parse(presented) {
            Ok(p) => p,
            Err(e) => return Ok(Err(VerifyFailure::Malformed(e))),
        };
        let digest = digest(presented);
        let now = Utc::now();
        if let Some(hit) = self.cache.get(&digest).await {
            if hit.valid_until.is_none_or(|t| t > now) {
                return Ok(self.admit(&hit, client_ip, now));
            }
            self.cache.invalidate(&digest).await;
        }

        if let Some(retry_after) = self.failures.locked(&parsed.key_id).await {
            return Ok(Err(VerifyFailure::TooManyAttempts { retry_after }));
        }
        let record =
            store::find_for_auth(&mut *db::connect(&self.pool).await?, &parsed.key_id).await?;
        let Some(record) = record else {
            self.failures.record(&parsed.key_id).await;
            return Ok(Err(VerifyFailure::NotFound));
        };
        let Some(valid_until) = self
            .match_secret(&record, parsed.environment, parsed.secret, now)
            .await?
        else {
            self.failures.record(&parsed.key_id).await;
            return Ok(Err(VerifyFailure::NotFound));
        };
        if record.revoke_time.is_some() {
            return Ok(Err(VerifyFailure::Revoked));
        }
        if record.expire_time.is_some_and(|t| t <= now) {
            return Ok(Err(VerifyFailure::Expired));
        }
        let entry = Arc::new(CachedKey {
            key: VerifiedKey {
                tenant_id: record.tenant_id,
                key_id: record.key_id,
                scopes: record.scopes,
                plan: record.plan,
                environment: record.environment,
                quotas: record.tenant_quotas.apply(self.quotas.of(record.plan)),
                // The tenant's limits (its plan's, raised or lowered by SetPlan), lowered
                // by the key's own: a key never lifts what its plan allows.
                limits: record
                    .key_limits
                    .lower(record.tenant_limits.apply(self.plans.of(record.plan))),
            },
            allowed_cidrs: record.allowed_cidrs,
            valid_until: [valid_until, record.expire_time]
                .into_iter()
                .flatten()
                .min(),
        });
        self.cache.insert(digest, entry.clone()).await;
        Ok(self.admit(&entry, client_ip, now))
    }

    /// `Some(grace end)` when the secret matches: `Some(None)` for the current secret,
    /// `Some(Some(t))` for a rotated-out one still in grace; `None` when nothing matches.
    async fn match_secret(
        &self,
        record: &AuthRecord,
        environment: Environment,
        secret: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<Option<DateTime<Utc>>>, ApiKeyError> {
        if record.environment != environment {
            return Ok(None);
        }
        if self.hasher.verify(secret, &record.secret_hash).await? {
            return Ok(Some(None));
        }
        if let (Some(previous), Some(until)) = (
            &record.previous_secret_hash,
            record.previous_secret_expire_time,
        ) && until > now
            && self.hasher.verify(secret, previous).await?
        {
            return Ok(Some(Some(until)));
        }
        Ok(None)
    }

    fn admit(
        &self,
        entry: &CachedKey,
        client_ip: Option<IpAddr>,
        now: DateTime<Utc>,
    ) -> Result<VerifiedKey, VerifyFailure> {
        if !ip_allowed(&entry.allowed_cidrs, client_ip) {
            return Err(VerifyFailure::IpNotAllowed);
        }
        self.last_used.record(&entry.key.key_id, now);
        Ok(entry.key.clone())
    }

    /// Drops every cached token of `key_id` (revoked, rotated, updated or deleted).
    pub fn invalidate(&self, key_id: &KeyId) {
        let key_id = key_id.clone();
        if let Err(e) = self
            .cache
            .invalidate_entries_if(move |_, entry| entry.key.key_id == key_id)
        {
            tracing::error!(error = %e, "cache invalidation failed; clearing the whole cache");
            self.cache.invalidate_all();
        }
    }

    /// The plans' default limits (user calls are limited by them too).
    pub fn plans(&self) -> &PlanLimits {
        &self.plans
    }

    /// Drops every cached token of a tenant's keys (its plan or limits changed).
    pub fn invalidate_tenant(&self, tenant: TenantId) {
        if let Err(e) = self
            .cache
            .invalidate_entries_if(move |_, entry| entry.key.tenant_id == tenant)
        {
            tracing::error!(error = %e, "cache invalidation failed; clearing the whole cache");
            self.cache.invalidate_all();
        }
    }

    /// Drops everything: after a pub/sub gap, messages may have been missed.
    pub fn invalidate_all(&self) {
        self.cache.invalidate_all();
    }

    pub(crate) fn set_invalidations_live(&self, live: bool) {
        self.invalidations_live.store(live, Ordering::Release);
    }

    /// Whether revocations from other replicas reach this one right now.
    pub fn invalidations_live(&self) -> bool {
        self.invalidations_live.load(Ordering::Acquire)
    }
}

fn digest(token: &str) -> TokenDigest {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// Counts failed verifications per key id in Redis; past the limit the id is refused before
/// any database or argon2 work, so a known key id cannot be used to burn CPU.
/// When Redis is down the limiter lets calls through (the hashing semaphore still bounds
/// the CPU) and says so once per outage.
struct FailureLimiter {
    redis: Redis,
    limit: u32,
    window: Duration,
    script: redis::Script,
    outage: OutageLog,
}

impl FailureLimiter {
    fn new(redis: Redis, limit: u32, window: Duration) -> Self {
        let script = redis::Script::new(
            "local n = redis.call('INCR', KEYS[1]) \
             if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end \
             return n",
        );
        Self {
            redis,
            limit,
            window,
            script,
            outage: OutageLog::new("failed-attempt limiting"),
        }
    }

    fn key(&self, id: &KeyId) -> String {
        // Hash-tagged by key id, so it lands on one slot in Redis Cluster.
        self.redis.key(&format!("authfail:{{{id}}}"))
    }

    async fn locked(&self, id: &KeyId) -> Option<Duration> {
        let mut conn = self.redis.conn();
        let key = self.key(id);
        let result: redis::RedisResult<(Option<u32>, i64)> = redis::pipe()
            .get(&key)
            .pttl(&key)
            .query_async(&mut conn)
            .await;
        match self.outage.observe(result) {
            Some((Some(n), ttl_ms)) if n >= self.limit => {
                Some(Duration::from_millis(ttl_ms.max(1000) as u64))
            }
            _ => None,
        }
    }

    async fn record(&self, id: &KeyId) {
        let mut conn = self.redis.conn();
        let result: redis::RedisResult<u32> = self
            .script
            .key(self.key(id))
            .arg(self.window.as_millis() as u64)
            .invoke_async(&mut conn)
            .await;
        self.outage.observe(result);
    }
}
