//! Token verification, the hot path of every API-key call:
//! parse + checksum → cache (SHA-256 of the token) → failed-attempt limit (Redis, per key id
//! and client network) → lookup by key id → argon2id (bounded, blocking pool) →
//! revoked/expired → IP allow-list.
//!
//! argon2 runs only the first time a replica sees a token and after a rotation: a cache
//! entry remembers which stored hash the token matched, so when the entry goes stale (TTL,
//! broadcast) the row is re-read and the token re-admitted if that hash is still there.

use std::{
    future::Future,
    hash::{DefaultHasher, Hash, Hasher},
    net::IpAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use ipnetwork::IpNetwork;
use moka::ops::compute::Op;

use super::{
    ApiKeyError,
    config::ApiKeyConfig,
    hashing::SecretHasher,
    last_used::LastUsedRecorder,
    model::ip_allowed,
    store::{self, AuthRecord},
    token::{self, ParsedToken},
};
use crate::auth::{KeyPrincipal as VerifiedKey, VerifyFailure};
use crate::identity::{Environment, KeyId};
use crate::{
    db::{self, PgPool, StoreError},
    identity::TenantId,
    kv::{OutageLog, Redis},
    ratelimit::{PlanLimits, PlanQuotas},
};

/// How long a refusal of a correct secret (revoked or expired key) is served from the cache
/// before the row is read again; broadcasts clear it sooner.
const NEGATIVE_TTL: Duration = Duration::from_secs(5);

/// Times a verification re-reads the row when a broadcast for its key lands meanwhile.
const MAX_SETTLE_ATTEMPTS: usize = 3;

/// What one token is known to be: the stored hash it was proven to match and the answer
/// that row gave. The proof outlives freshness: a stale entry is re-checked against the row
/// (no argon2) instead of being dropped.
struct CachedKey {
    /// The PHC string this token matched (the current secret or a rotated-out one in grace).
    matched_hash: Arc<str>,
    /// Admitted, or refused with a correct secret (revoked / expired: the negative cache).
    answer: Result<VerifiedKey, VerifyFailure>,
    allowed_cidrs: Vec<IpNetwork>,
    /// An admission must not outlive the key's expiry or the grace of the secret it matched.
    valid_until: Option<DateTime<Utc>>,
    /// Served without any I/O until then.
    fresh_until: Instant,
    /// The invalidation epochs this entry was built under; any broadcast for its key, its
    /// tenant or everything changes the current value and forces a re-read.
    stamp: Stamp,
    /// Set while one caller re-reads a stale entry; the others keep serving it meanwhile.
    refreshing: AtomicBool,
}

impl CachedKey {
    /// `Some` for the one caller that gets to refresh this stale entry.
    fn claim_refresh(&self) -> Option<RefreshClaim<'_>> {
        self.refreshing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .ok()
            .map(|_| RefreshClaim(&self.refreshing))
    }
}

/// Releases the refresh claim even when the refreshing call is cancelled.
struct RefreshClaim<'a>(&'a AtomicBool);

impl Drop for RefreshClaim<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

type TokenDigest = [u8; 32];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Freshness {
    Fresh,
    /// Past its TTL but within the stale window, and no broadcast touched it.
    Stale,
    /// Must be re-read before it answers again.
    Revalidate,
}

/// What a verification settled on.
enum Settled {
    Entry {
        entry: Arc<CachedKey>,
        cache: bool,
    },
    /// Not cached: an unknown key, a wrong secret, a locked key id.
    Refused(VerifyFailure),
}

/// A pause point for tests (a future awaited once, just before an entry is cached).
type PausePoint = Pin<Box<dyn Future<Output = ()> + Send>>;

pub struct KeyVerifier {
    pool: PgPool,
    hasher: Arc<SecretHasher>,
    cache: moka::future::Cache<TokenDigest, Arc<CachedKey>>,
    ttl: Duration,
    epochs: Epochs,
    failures: FailureLimiter,
    last_used: LastUsedRecorder,
    plans: PlanLimits,
    quotas: PlanQuotas,
    /// Whether the pub/sub invalidation listener is subscribed right now.
    invalidations_live: AtomicBool,
    pause_before_caching: Mutex<Option<PausePoint>>,
    /// When a token's verification last found the database unavailable, and why: callers
    /// that queued behind that verification share its answer instead of each waiting for
    /// a connection in turn.
    undecided: moka::sync::Cache<TokenDigest, Arc<(Instant, String)>>,
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
        // No moka TTL: freshness is per entry, and an expired proof would cost argon2 again.
        let cache = moka::future::Cache::builder()
            .max_capacity(config.cache_capacity)
            .build();
        Self {
            pool,
            hasher,
            cache,
            ttl: config.cache_ttl,
            epochs: Epochs::new(),
            failures: FailureLimiter::new(redis, config.failure_limit, config.failure_window),
            last_used,
            plans,
            quotas,
            invalidations_live: AtomicBool::new(false),
            pause_before_caching: Mutex::new(None),
            undecided: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(10))
                .build(),
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
        if let Some(hit) = self.cache.get(&digest).await {
            let now = Utc::now();
            match self.freshness(&hit, now, Instant::now()) {
                Freshness::Fresh => return Ok(self.answer(&hit, client_ip, now)),
                Freshness::Stale => {
                    let Some(_claim) = hit.claim_refresh() else {
                        return Ok(self.answer(&hit, client_ip, now));
                    };
                    match self.flight(digest, &parsed, client_ip).await {
                        Ok(settled) => return Ok(self.settled(settled, client_ip)),
                        Err(e) => {
                            // Still within the stale window: answer as before the refresh.
                            tracing::warn!(error = %e, key_id = %parsed.key_id, "could not re-read a stale key; serving the cached answer");
                            return Ok(self.answer(&hit, client_ip, now));
                        }
                    }
                }
                Freshness::Revalidate => {}
            }
        }
        let settled = self.flight(digest, &parsed, client_ip).await?;
        Ok(self.settled(settled, client_ip))
    }

    /// Settles a token with its cache entry locked (moka's per-key compute), so concurrent
    /// callers of one token wait for one verification and then read its entry.
    async fn flight(
        &self,
        digest: TokenDigest,
        parsed: &ParsedToken<'_>,
        client_ip: Option<IpAddr>,
    ) -> Result<Settled, ApiKeyError> {
        let arrived = Instant::now();
        let mut outcome: Option<Result<Settled, ApiKeyError>> = None;
        let slot = &mut outcome;
        self.cache
            .entry(digest)
            .and_compute_with(|current| async move {
                if let Some(failed) = self.undecided.get(&digest)
                    && failed.0 >= arrived
                {
                    // The verification this caller waited for found no database.
                    *slot = Some(Err(StoreError::Unavailable(failed.1.clone()).into()));
                    return Op::Nop;
                }
                let current = current.map(|e| e.into_value());
                if let Some(c) = &current
                    && self.freshness(c, Utc::now(), Instant::now()) == Freshness::Fresh
                {
                    // Settled by the caller this one waited for.
                    *slot = Some(Ok(Settled::Entry {
                        entry: c.clone(),
                        cache: true,
                    }));
                    return Op::Nop;
                }
                let result = self.settle(parsed, current.as_deref(), client_ip).await;
                let op = match &result {
                    Ok(Settled::Entry { entry, cache: true }) => Op::Put(entry.clone()),
                    Ok(_) if current.is_some() => Op::Remove,
                    Ok(_) => Op::Nop,
                    // Undecided (database down): keep what we had.
                    Err(e) => {
                        if let ApiKeyError::Store(StoreError::Unavailable(why)) = e {
                            self.undecided
                                .insert(digest, Arc::new((Instant::now(), why.clone())));
                        }
                        Op::Nop
                    }
                };
                *slot = Some(result);
                op
            })
            .await;
        outcome.expect("the compute closure always runs")
    }

    /// Decides on a token: with a proof (`known`), re-reads the row and re-admits without
    /// hashing if the proven hash is still stored; otherwise runs the limiter and argon2.
    async fn settle(
        &self,
        parsed: &ParsedToken<'_>,
        known: Option<&CachedKey>,
        client_ip: Option<IpAddr>,
    ) -> Result<Settled, ApiKeyError> {
        let mut proof = known.map(|k| k.matched_hash.clone());
        let mut reservation: Option<Reservation> = None;
        let mut last = None;
        for _ in 0..MAX_SETTLE_ATTEMPTS {
            let before = self.epochs.before(&parsed.key_id);
            let now = Utc::now();
            if proof.is_none() && reservation.is_none() {
                match self.failures.reserve(&parsed.key_id, client_ip).await {
                    Ok(r) => reservation = Some(r),
                    Err(retry_after) => {
                        return Ok(Settled::Refused(VerifyFailure::TooManyAttempts {
                            retry_after,
                        }));
                    }
                }
            }
            let record =
                store::find_for_auth(&mut *db::connect(&self.pool).await?, &parsed.key_id).await?;
            let Some(record) = record else {
                // A failed attempt when this call was a guess (its reservation stays spent).
                return Ok(Settled::Refused(VerifyFailure::NotFound));
            };
            let proven = proof
                .as_ref()
                .and_then(|hash| proven_match(&record, parsed.environment, hash, now));
            let (matched_hash, grace_end) = match proven {
                Some(m) => m,
                None => {
                    if reservation.is_none() {
                        match self.failures.reserve(&parsed.key_id, client_ip).await {
                            Ok(r) => reservation = Some(r),
                            Err(retry_after) => {
                                return Ok(Settled::Refused(VerifyFailure::TooManyAttempts {
                                    retry_after,
                                }));
                            }
                        }
                    }
                    match self
                        .match_secret(&record, parsed.environment, parsed.secret, now)
                        .await?
                    {
                        Some(m) => m,
                        None => return Ok(Settled::Refused(VerifyFailure::NotFound)),
                    }
                }
            };
            if let Some(r) = reservation.take() {
                // A correct secret is not a failed attempt.
                self.failures.refund(r).await;
            }
            proof = Some(matched_hash.clone());
            let pause = self
                .pause_before_caching
                .lock()
                .expect("pause point")
                .take();
            if let Some(pause) = pause {
                pause.await;
            }
            let tenant_stripe = stripe(&record.tenant_id);
            let entry = Arc::new(self.entry(record, matched_hash, grace_end, now));
            // Cache only if no broadcast for this key landed since the row was read: a
            // revoke handled meanwhile would otherwise be undone by this insert.
            if let Some(stamp) = self.epochs.stamp_if_unchanged(&before, tenant_stripe) {
                let mut entry = Arc::into_inner(entry).expect("not shared yet");
                entry.stamp = stamp;
                return Ok(Settled::Entry {
                    entry: Arc::new(entry),
                    cache: true,
                });
            }
            last = Some(entry);
        }
        let entry = last.expect("at least one attempt");
        Ok(Settled::Entry {
            entry,
            cache: false,
        })
    }

    fn entry(
        &self,
        record: AuthRecord,
        matched_hash: Arc<str>,
        grace_end: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> CachedKey {
        let answer = if record.revoke_time.is_some() {
            Err(VerifyFailure::Revoked)
        } else if record.expire_time.is_some_and(|t| t <= now) {
            Err(VerifyFailure::Expired)
        } else {
            Ok(VerifiedKey {
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
            })
        };
        let fresh_for = if answer.is_ok() {
            self.ttl
        } else {
            self.ttl.min(NEGATIVE_TTL)
        };
        CachedKey {
            matched_hash,
            answer,
            allowed_cidrs: record.allowed_cidrs,
            valid_until: [grace_end, record.expire_time].into_iter().flatten().min(),
            fresh_until: Instant::now() + fresh_for,
            stamp: Stamp::NEVER,
            refreshing: AtomicBool::new(false),
        }
    }

    fn freshness(&self, entry: &CachedKey, now: DateTime<Utc>, at: Instant) -> Freshness {
        if self.epochs.current(&entry.stamp) != entry.stamp.value {
            return Freshness::Revalidate;
        }
        if entry.answer.is_ok() && entry.valid_until.is_some_and(|t| t <= now) {
            return Freshness::Revalidate;
        }
        if at < entry.fresh_until {
            return Freshness::Fresh;
        }
        // Stale entries are served only while broadcasts arrive: without them a revocation
        // elsewhere is learnt only by re-reading, so the TTL must stay the bound.
        if self.invalidations_live() && at < entry.fresh_until + self.ttl {
            return Freshness::Stale;
        }
        Freshness::Revalidate
    }

    /// `Some((hash, grace end))` when the secret matches: no grace end for the current
    /// secret, the grace end for a rotated-out one; `None` when nothing matches.
    async fn match_secret(
        &self,
        record: &AuthRecord,
        environment: Environment,
        secret: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<(Arc<str>, Option<DateTime<Utc>>)>, ApiKeyError> {
        if record.environment != environment {
            return Ok(None);
        }
        if self.hasher.verify(secret, &record.secret_hash).await? {
            return Ok(Some((record.secret_hash.as_str().into(), None)));
        }
        if let (Some(previous), Some(until)) = (
            &record.previous_secret_hash,
            record.previous_secret_expire_time,
        ) && until > now
            && self.hasher.verify(secret, previous).await?
        {
            return Ok(Some((previous.as_str().into(), Some(until))));
        }
        Ok(None)
    }

    fn settled(
        &self,
        settled: Settled,
        client_ip: Option<IpAddr>,
    ) -> Result<VerifiedKey, VerifyFailure> {
        match settled {
            Settled::Entry { entry, .. } => self.answer(&entry, client_ip, Utc::now()),
            Settled::Refused(failure) => Err(failure),
        }
    }

    fn answer(
        &self,
        entry: &CachedKey,
        client_ip: Option<IpAddr>,
        now: DateTime<Utc>,
    ) -> Result<VerifiedKey, VerifyFailure> {
        let key = entry.answer.as_ref().map_err(|f| *f)?;
        if !ip_allowed(&entry.allowed_cidrs, client_ip) {
            return Err(VerifyFailure::IpNotAllowed);
        }
        self.last_used.record(&key.key_id, now);
        Ok(key.clone())
    }

    /// Every cached token of `key_id` is re-read before it answers again (revoked, rotated,
    /// updated or deleted). The proof of which hash a token matched stays, so a re-read
    /// costs a row lookup, not argon2.
    pub fn invalidate(&self, key_id: &KeyId) {
        self.epochs.bump_key(key_id);
    }

    /// Every cached token of a tenant's keys is re-read (its plan or limits changed).
    pub fn invalidate_tenant(&self, tenant: TenantId) {
        self.epochs.bump_tenant(tenant);
    }

    /// Everything is re-read: after a pub/sub gap, messages may have been missed.
    pub fn invalidate_all(&self) {
        self.epochs.bump_all();
    }

    pub(crate) fn set_invalidations_live(&self, live: bool) {
        self.invalidations_live.store(live, Ordering::Release);
    }

    /// Whether revocations from other replicas reach this one right now.
    pub fn invalidations_live(&self) -> bool {
        self.invalidations_live.load(Ordering::Acquire)
    }

    /// The plans' default limits (the user rate limit sizes its buckets from them).
    pub fn plans(&self) -> &PlanLimits {
        &self.plans
    }

    /// argon2id computations so far on this replica (verifications and new secrets).
    pub fn hash_runs(&self) -> u64 {
        self.hasher.runs()
    }

    /// Test hook: the next verification that is about to cache an entry first awaits
    /// `until` (after it read the row and matched the secret), to force a race with a
    /// broadcast.
    #[doc(hidden)]
    pub fn pause_once_before_caching(&self, until: impl Future<Output = ()> + Send + 'static) {
        *self.pause_before_caching.lock().expect("pause point") = Some(Box::pin(until));
    }
}

/// The proven hash, if the row still holds it as the current secret or as a rotated-out
/// secret in grace.
fn proven_match(
    record: &AuthRecord,
    environment: Environment,
    hash: &Arc<str>,
    now: DateTime<Utc>,
) -> Option<(Arc<str>, Option<DateTime<Utc>>)> {
    if record.environment != environment {
        return None;
    }
    if record.secret_hash == **hash {
        return Some((hash.clone(), None));
    }
    match (
        &record.previous_secret_hash,
        record.previous_secret_expire_time,
    ) {
        (Some(previous), Some(until)) if **previous == **hash && until > now => {
            Some((hash.clone(), Some(until)))
        }
        _ => None,
    }
}

const STRIPES: usize = 1024;

fn stripe(value: &impl Hash) -> usize {
    let mut h = DefaultHasher::new();
    value.hash(&mut h);
    (h.finish() % STRIPES as u64) as usize
}

/// Invalidation epochs: counters per key-id stripe, per tenant stripe and for everything,
/// bumped by broadcasts. Striped so memory stays fixed; a collision only costs a re-read.
/// Counters only grow, so the sum of an entry's three counters changes iff one of them did.
struct Epochs {
    keys: Box<[AtomicU64]>,
    tenants: Box<[AtomicU64]>,
    /// Bumped (before the tenant's stripe) on every tenant broadcast: a verification does
    /// not know the tenant before it reads the row.
    any_tenant: AtomicU64,
    all: AtomicU64,
}

/// The epochs seen before a row was read.
struct Before {
    key_stripe: usize,
    key: u64,
    any_tenant: u64,
    all: u64,
}

#[derive(Debug, Clone, Copy)]
struct Stamp {
    key_stripe: usize,
    tenant_stripe: usize,
    value: u64,
}

impl Stamp {
    /// Matches no current epoch sum; replaced before an entry is cached.
    const NEVER: Stamp = Stamp {
        key_stripe: 0,
        tenant_stripe: 0,
        value: u64::MAX,
    };
}

impl Epochs {
    fn new() -> Self {
        let counters = || (0..STRIPES).map(|_| AtomicU64::new(0)).collect();
        Self {
            keys: counters(),
            tenants: counters(),
            any_tenant: AtomicU64::new(0),
            all: AtomicU64::new(0),
        }
    }

    fn before(&self, key_id: &KeyId) -> Before {
        let key_stripe = stripe(key_id);
        Before {
            key_stripe,
            key: self.keys[key_stripe].load(Ordering::SeqCst),
            any_tenant: self.any_tenant.load(Ordering::SeqCst),
            all: self.all.load(Ordering::SeqCst),
        }
    }

    /// The stamp for an entry built from a row read after `before`, or `None` when a
    /// broadcast landed since (the row may predate it).
    fn stamp_if_unchanged(&self, before: &Before, tenant_stripe: usize) -> Option<Stamp> {
        let tenant = self.tenants[tenant_stripe].load(Ordering::SeqCst);
        let unchanged = self.keys[before.key_stripe].load(Ordering::SeqCst) == before.key
            && self.any_tenant.load(Ordering::SeqCst) == before.any_tenant
            && self.all.load(Ordering::SeqCst) == before.all;
        unchanged.then(|| Stamp {
            key_stripe: before.key_stripe,
            tenant_stripe,
            value: before.key.wrapping_add(tenant).wrapping_add(before.all),
        })
    }

    fn current(&self, stamp: &Stamp) -> u64 {
        self.keys[stamp.key_stripe]
            .load(Ordering::Acquire)
            .wrapping_add(self.tenants[stamp.tenant_stripe].load(Ordering::Acquire))
            .wrapping_add(self.all.load(Ordering::Acquire))
    }

    fn bump_key(&self, key_id: &KeyId) {
        self.keys[stripe(key_id)].fetch_add(1, Ordering::SeqCst);
    }

    fn bump_tenant(&self, tenant: TenantId) {
        self.any_tenant.fetch_add(1, Ordering::SeqCst);
        self.tenants[stripe(&tenant)].fetch_add(1, Ordering::SeqCst);
    }

    fn bump_all(&self) {
        self.all.fetch_add(1, Ordering::SeqCst);
    }
}

fn digest(token: &str) -> TokenDigest {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// The failed-attempt bucket of a client address: its IPv4 /24 or IPv6 /64 (IPv4-mapped
/// IPv6 counts as IPv4), so one host's neighbours share a bucket; an unknown address is a
/// bucket of its own.
fn client_network(ip: Option<IpAddr>) -> String {
    let ip = match ip {
        Some(IpAddr::V6(v6)) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        other => other.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
    };
    match (ip, ip.is_unspecified()) {
        (_, true) => "unknown".to_string(),
        (IpAddr::V4(v4), _) => {
            let [a, b, c, _] = v4.octets();
            format!("{a}.{b}.{c}.0/24")
        }
        (IpAddr::V6(v6), _) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

/// A slot taken in a failed-attempt bucket before argon2 work; refunded when the secret
/// turns out correct. `None` when Redis was unreachable (nothing to refund).
struct Reservation(Option<String>);

/// Counts failed verifications per (key id, client network) in Redis; past the limit that
/// pair is refused before any database or argon2 work, so a known key id cannot be used to
/// burn CPU, and a stranger who knows a public key id cannot lock its owner out from
/// another network. The check and the increment are one script, so concurrent guesses
/// cannot overshoot the limit. When Redis is down the limiter lets calls through (the
/// hashing semaphore still bounds the CPU) and says so once per outage.
struct FailureLimiter {
    redis: Redis,
    limit: u32,
    window: Duration,
    reserve: redis::Script,
    refund: redis::Script,
    outage: OutageLog,
}

impl FailureLimiter {
    fn new(redis: Redis, limit: u32, window: Duration) -> Self {
        // Returns 0 (taken) or the remaining lock time in ms.
        let reserve = redis::Script::new(
            "local n = tonumber(redis.call('GET', KEYS[1]) or '0') \
             if n >= tonumber(ARGV[1]) then \
               local ttl = redis.call('PTTL', KEYS[1]) \
               if ttl < 1 then ttl = 1 end \
               return ttl \
             end \
             n = redis.call('INCR', KEYS[1]) \
             if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end \
             return 0",
        );
        let refund = redis::Script::new(
            "local n = tonumber(redis.call('GET', KEYS[1]) or '0') \
             if n > 0 then redis.call('DECR', KEYS[1]) end \
             return n",
        );
        Self {
            redis,
            limit,
            window,
            reserve,
            refund,
            outage: OutageLog::new("failed-attempt limiting"),
        }
    }

    fn key(&self, id: &KeyId, client_ip: Option<IpAddr>) -> String {
        // Hash-tagged by key id, so it lands on one slot in Redis Cluster.
        let network = client_network(client_ip);
        self.redis
            .key_fmt(format_args!("authfail:{{{id}}}:{network}"))
    }

    /// Takes one attempt, or says how long the (key id, network) pair stays locked.
    async fn reserve(
        &self,
        id: &KeyId,
        client_ip: Option<IpAddr>,
    ) -> Result<Reservation, Duration> {
        let key = self.key(id, client_ip);
        let mut conn = self.redis.conn();
        let result: redis::RedisResult<i64> = self
            .reserve
            .key(&key)
            .arg(self.limit)
            .arg(self.window.as_millis() as u64)
            .invoke_async(&mut conn)
            .await;
        match self.outage.observe(result) {
            Some(0) => Ok(Reservation(Some(key))),
            Some(ttl_ms) => Err(Duration::from_millis(ttl_ms.max(1000) as u64)),
            None => Ok(Reservation(None)),
        }
    }

    async fn refund(&self, reservation: Reservation) {
        let Some(key) = reservation.0 else { return };
        let mut conn = self.redis.conn();
        let result: redis::RedisResult<i64> = self.refund.key(key).invoke_async(&mut conn).await;
        self.outage.observe(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_networks() {
        let net = |s: &str| client_network(Some(s.parse().unwrap()));
        assert_eq!(net("192.0.2.10"), "192.0.2.0/24");
        assert_eq!(net("192.0.2.10"), net("192.0.2.250"));
        assert_ne!(net("192.0.2.10"), net("192.0.3.10"));
        assert_eq!(net("::ffff:192.0.2.7"), "192.0.2.0/24");
        assert_eq!(net("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64");
        assert_ne!(net("2001:db8:1:2::1"), net("2001:db8:1:3::1"));
        assert_eq!(client_network(None), "unknown");
        assert_eq!(net("0.0.0.0"), "unknown");
    }

    #[test]
    fn epochs_detect_broadcasts_between_read_and_insert() {
        let epochs = Epochs::new();
        let id = KeyId::new_unchecked("abcdefghijkl".into());
        let tenant = TenantId(uuid::Uuid::new_v4());
        let before = epochs.before(&id);
        let stamp = epochs
            .stamp_if_unchanged(&before, stripe(&tenant))
            .expect("nothing happened");
        assert_eq!(epochs.current(&stamp), stamp.value);
        epochs.bump_tenant(tenant);
        assert_ne!(epochs.current(&stamp), stamp.value, "tenant broadcast");
        assert!(
            epochs
                .stamp_if_unchanged(&before, stripe(&tenant))
                .is_none()
        );
        let before = epochs.before(&id);
        epochs.bump_key(&id);
        assert!(
            epochs.stamp_if_unchanged(&before, 0).is_none(),
            "key broadcast"
        );
        let before = epochs.before(&id);
        epochs.bump_all();
        assert!(
            epochs.stamp_if_unchanged(&before, 0).is_none(),
            "everything"
        );
    }
}
