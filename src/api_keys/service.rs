//! API-key management: the rules (tenancy, scopes, grace periods) between the gRPC layer
//! and the store. Every state change writes its `api_key.*` event to the outbox in the
//! same transaction (`api_key.expiring` is a scheduled event, not emitted here).

use std::{net::IpAddr, sync::Arc, time::Duration};

use chrono::Utc;
use diesel_async::AsyncConnection;

use super::{
    ApiKeyError,
    config::ApiKeyConfig,
    hashing::SecretHasher,
    invalidation::Invalidations,
    model::{ApiKey, ApiKeyChanges, KeyState, ListFilter, NewApiKey, events},
    store::{self, Cursor, InsertKey},
    token::{self, NewToken},
    verifier::KeyVerifier,
};
use crate::identity::KeyId;
use crate::{
    auth::{KeyPrincipal, Principal, VerifyFailure},
    db::{self, PgPool, StoreError},
    events::emitter::Emitter,
    idempotency::{Claim, Guard, Idempotency, Outcome},
    identity::TenantId,
    identity::{Scope, Scopes},
    ratelimit::{Decision, LimitOverrides, PlanLimits, RateLimitError, RateLimiter},
    tenants::TenantDirectory,
    usage::{RequestLog, RequestRecord},
    validation::Violations,
    webhooks::model::actor,
};

/// One page of keys and the cursor after its last row.
pub struct Page {
    pub keys: Vec<ApiKey>,
    pub next: Option<Cursor>,
}

pub struct ApiKeys {
    pool: PgPool,
    hasher: Arc<SecretHasher>,
    verifier: Arc<KeyVerifier>,
    invalidations: Invalidations,
    config: ApiKeyConfig,
    tenants: TenantDirectory,
    plans: PlanLimits,
    limiter: Arc<RateLimiter>,
    request_log: RequestLog,
    /// Checks and appends the `api_key.*` events (one compiled catalog per process).
    emitter: Arc<Emitter>,
    /// Idempotency-Key of CreateApiKey.
    idempotency: Idempotency,
}

/// How keys are metered: the plans' limits (a key may only lower them), and the limiter
/// and request log a consuming verification spends from and records in.
pub struct Metering {
    pub plans: PlanLimits,
    pub limiter: Arc<RateLimiter>,
    pub request_log: RequestLog,
}

impl ApiKeys {
    // Each argument is a collaborator the service is built from; bundling them would only
    // move the list into a struct literal at the one call site (app.rs).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        pool: PgPool,
        hasher: Arc<SecretHasher>,
        verifier: Arc<KeyVerifier>,
        invalidations: Invalidations,
        config: ApiKeyConfig,
        tenants: TenantDirectory,
        metering: Metering,
        emitter: Arc<Emitter>,
        idempotency: Idempotency,
    ) -> Self {
        Self {
            pool,
            hasher,
            verifier,
            invalidations,
            config,
            tenants,
            plans: metering.plans,
            limiter: metering.limiter,
            request_log: metering.request_log,
            emitter,
            idempotency,
        }
    }

    pub fn verifier(&self) -> &Arc<KeyVerifier> {
        &self.verifier
    }

    pub fn config(&self) -> &ApiKeyConfig {
        &self.config
    }

    /// Creates a key and returns it with its token (the only time the token exists in clear).
    /// With an idempotency claim, a repeat of a created key's request answers
    /// ALREADY_EXISTS naming the key (its token is never stored for a replay).
    pub async fn create(
        &self,
        principal: &Principal,
        new: NewApiKey,
        claim: Option<Claim>,
    ) -> Result<(ApiKey, NewToken), ApiKeyError> {
        let tenant = principal.tenant_with(Scope::ApiKeysWrite)?;
        ensure_covers(principal, &new.scopes, "create a key with")?;
        self.check_limits(tenant, &new.rate_limits).await?;
        self.emitter.catalog().await?;
        let guard = match self.idempotency.begin(tenant, claim).await? {
            Outcome::Proceed(guard) => guard,
            Outcome::Replay(replay) => return Err(replay.already_exists("api key").into()),
        };
        let created = self.insert_key(principal, tenant, &new, &guard).await;
        guard.finish(&created).await;
        let (key, token) = created?;
        tracing::info!(tenant = %tenant, key_id = %key.id, actor = %principal.actor(), "api key created");
        Ok((key, token))
    }

    /// The key row, its event and the idempotency record, in one transaction.
    async fn insert_key(
        &self,
        principal: &Principal,
        tenant: TenantId,
        new: &NewApiKey,
        guard: &Guard,
    ) -> Result<(ApiKey, NewToken), ApiKeyError> {
        // A 71-bit random id practically never collides; retry once if it does.
        for attempt in 0..2 {
            let id = token::new_key_id();
            let token = token::generate(new.environment, &id);
            let secret_hash = self.hasher.hash(token.secret()).await?;
            let insert = InsertKey {
                id: &id,
                tenant_id: tenant,
                new,
                secret_hash,
                created_by: principal.actor(),
                now: Utc::now(),
            };
            let mut conn = db::connect(&self.pool).await?;
            let created = conn
                .transaction::<_, ApiKeyError, _>(async |c| {
                    let key = store::insert(c, insert).await?;
                    self.emitter
                        .emit(c, tenant, "api_key.created", events::created(&key))
                        .await?;
                    guard.complete_withheld(c, key.id.as_str()).await?;
                    Ok(key)
                })
                .await;
            match created {
                Ok(key) => return Ok((key, token)),
                Err(ApiKeyError::Store(StoreError::Conflict(_))) if attempt == 0 => continue,
                Err(e) => return Err(e),
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    pub async fn list(
        &self,
        principal: &Principal,
        filter: ListFilter,
        after: Option<Cursor>,
        page_size: i64,
    ) -> Result<Page, ApiKeyError> {
        let tenant = principal.tenant_with(Scope::ApiKeysRead)?;
        // One extra row tells whether another page follows.
        let mut keys = store::list(
            &mut *db::connect(&self.pool).await?,
            tenant,
            filter,
            after.as_ref(),
            page_size + 1,
            Utc::now(),
        )
        .await?;
        let next = if keys.len() as i64 > page_size {
            keys.truncate(page_size as usize);
            keys.last().map(|k| Cursor {
                create_time: k.create_time,
                id: k.id.to_string(),
            })
        } else {
            None
        };
        Ok(Page { keys, next })
    }

    pub async fn get(&self, principal: &Principal, id: &KeyId) -> Result<ApiKey, ApiKeyError> {
        let tenant = principal.tenant_with(Scope::ApiKeysRead)?;
        self.find(tenant, id).await
    }

    pub async fn update(
        &self,
        principal: &Principal,
        id: &KeyId,
        changes: ApiKeyChanges,
    ) -> Result<ApiKey, ApiKeyError> {
        let tenant = principal.tenant_with(Scope::ApiKeysWrite)?;
        let current = self.managed(principal, tenant, id).await?;
        if let Some(scopes) = &changes.scopes {
            ensure_covers(principal, scopes, "grant")?;
        }
        if let Some(limits) = &changes.rate_limits {
            self.check_limits(tenant, limits).await?;
        }
        if changes.is_empty() {
            return Ok(current);
        }
        self.emitter.catalog().await?;
        let by = actor(principal.actor());
        let mut conn = db::connect(&self.pool).await?;
        // The row is locked while compared, so the event names exactly what this call changed.
        let (key, changed) = conn
            .transaction::<_, ApiKeyError, _>(async |c| {
                let current = store::get_for_update(c, tenant, id)
                    .await
                    .map_err(|e| not_found(e, id))?;
                ensure_covers(principal, &current.scopes, "manage a key with")?;
                let changed = changes.changed_fields(&current);
                if changed.is_empty() {
                    return Ok((current, false));
                }
                let key = store::update(c, tenant, id, &changes, Utc::now())
                    .await
                    .map_err(|e| not_found(e, id))?;
                self.emitter
                    .emit(
                        c,
                        tenant,
                        "api_key.updated",
                        events::updated(&key, &changed, &by),
                    )
                    .await?;
                Ok((key, true))
            })
            .await?;
        drop(conn);
        if changed {
            self.broadcast(id).await;
        }
        Ok(key)
    }

    pub async fn revoke(
        &self,
        principal: &Principal,
        id: &KeyId,
        reason: &str,
    ) -> Result<ApiKey, ApiKeyError> {
        let tenant = principal.tenant_with(Scope::ApiKeysWrite)?;
        self.managed(principal, tenant, id).await?;
        self.emitter.catalog().await?;
        let by = actor(principal.actor());
        let mut conn = db::connect(&self.pool).await?;
        // Only the first revocation changes the key, so only it emits `api_key.revoked`.
        let key = conn
            .transaction::<_, ApiKeyError, _>(async |c| {
                let (key, first) = store::revoke(c, tenant, id, reason, Utc::now())
                    .await
                    .map_err(|e| not_found(e, id))?;
                if first {
                    self.emitter
                        .emit(c, tenant, "api_key.revoked", events::revoked(&key, &by))
                        .await?;
                }
                Ok(key)
            })
            .await?;
        drop(conn);
        self.broadcast(id).await;
        tracing::info!(tenant = %tenant, key_id = %id, actor = %principal.actor(), "api key revoked");
        Ok(key)
    }

    /// A new secret; the previous one keeps working for `grace` (default from config).
    /// `end_grace` ends it now, and also any earlier secret still in its grace; without it,
    /// rotating while an earlier secret is in its grace is refused with that grace's end.
    pub async fn rotate(
        &self,
        principal: &Principal,
        id: &KeyId,
        grace: Option<Duration>,
        end_grace: bool,
    ) -> Result<(ApiKey, NewToken), ApiKeyError> {
        let tenant = principal.tenant_with(Scope::ApiKeysWrite)?;
        let current = self.managed(principal, tenant, id).await?;
        let now = Utc::now();
        ensure_rotatable(&current, id, end_grace, now)?;
        let grace = grace.unwrap_or(self.config.rotation_grace_default);
        let previous_until = (!end_grace)
            .then(|| now + chrono::Duration::from_std(grace).expect("grace is bounded"));
        let token = token::generate(current.environment, id);
        let hash = self.hasher.hash(token.secret()).await?;
        self.emitter.catalog().await?;
        let by = actor(principal.actor());
        // Bound first: the connection goes back to the pool before `find` takes another.
        let rotated = {
            let mut conn = db::connect(&self.pool).await?;
            conn.transaction::<_, ApiKeyError, _>(async |c| {
                let key = match store::rotate(c, tenant, id, &hash, previous_until, end_grace, now)
                    .await
                {
                    Ok(key) => key,
                    // No row changed: nothing to emit; the caller finds out why.
                    Err(StoreError::NotFound) => return Ok(None),
                    Err(other) => return Err(other.into()),
                };
                self.emitter
                    .emit(c, tenant, "api_key.rotated", events::rotated(&key, &by))
                    .await?;
                Ok(Some(key))
            })
            .await?
        };
        let Some(key) = rotated else {
            // Revoked, deleted or rotated by someone else since it was read: say which.
            let latest = self.find(tenant, id).await?;
            ensure_rotatable(&latest, id, end_grace, Utc::now())?;
            return Err(ApiKeyError::Aborted(format!(
                "api key {id} changed during the rotation; retry"
            )));
        };
        self.broadcast(id).await;
        tracing::info!(tenant = %tenant, key_id = %id, actor = %principal.actor(), grace_s = if end_grace { 0 } else { grace.as_secs() }, "api key rotated");
        Ok((key, token))
    }

    pub async fn delete(&self, principal: &Principal, id: &KeyId) -> Result<(), ApiKeyError> {
        let tenant = principal.tenant_with(Scope::ApiKeysWrite)?;
        self.managed(principal, tenant, id).await?;
        self.emitter.catalog().await?;
        let by = actor(principal.actor());
        let mut conn = db::connect(&self.pool).await?;
        conn.transaction::<_, ApiKeyError, _>(async |c| {
            let key = store::delete(c, tenant, id)
                .await
                .map_err(|e| not_found(e, id))?;
            self.emitter
                .emit(
                    c,
                    tenant,
                    "api_key.deleted",
                    events::deleted(&key, &by, Utc::now()),
                )
                .await?;
            Ok(())
        })
        .await?;
        drop(conn);
        self.broadcast(id).await;
        tracing::info!(tenant = %tenant, key_id = %id, actor = %principal.actor(), "api key deleted");
        Ok(())
    }

    /// A key's own limits may only lower what its tenant's plan grants (raising is
    /// SetPlan's), and the limits the key ends up with must be consistent.
    async fn check_limits(
        &self,
        tenant: TenantId,
        own: &LimitOverrides,
    ) -> Result<(), ApiKeyError> {
        if own.is_empty() {
            return Ok(());
        }
        let record = self.tenants.get(tenant).await?;
        let ceiling = record.limits.apply(self.plans.of(record.plan));
        let mut v = Violations::new();
        for (field, value, max) in own.above(ceiling) {
            v.add(
                format!("rate_limits.{field}"),
                format!(
                    "{value} is above the {} plan's {max}: a key may only lower its tenant's limits",
                    record.plan.as_str()
                ),
            );
        }
        for (field, why) in own.lower(ceiling).inconsistencies() {
            v.add(
                format!("rate_limits.{field}"),
                format!(
                    "{why} (burst ≤ per_minute ≤ per_hour ≤ per_day, unset fields follow the plan)"
                ),
            );
        }
        v.into_result(()).map_err(ApiKeyError::from)
    }

    async fn find(&self, tenant: TenantId, id: &KeyId) -> Result<ApiKey, ApiKeyError> {
        store::get(&mut *db::connect(&self.pool).await?, tenant, id)
            .await
            .map_err(|e| not_found(e, id))
    }

    /// The key, if the principal may manage it: a key principal may only manage keys whose
    /// scopes it holds itself (else rotating a broader key would hand over its secret).
    async fn managed(
        &self,
        principal: &Principal,
        tenant: TenantId,
        id: &KeyId,
    ) -> Result<ApiKey, ApiKeyError> {
        let key = self.find(tenant, id).await?;
        ensure_covers(principal, &key.scopes, "manage a key with")?;
        Ok(key)
    }

    async fn broadcast(&self, id: &KeyId) {
        self.verifier.invalidate(id);
        self.invalidations.publish(id).await;
    }
}

fn ensure_covers(principal: &Principal, requested: &Scopes, what: &str) -> Result<(), ApiKeyError> {
    let missing = principal.scopes().missing_from(requested);
    if missing.is_empty() {
        Ok(())
    } else {
        let names: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
        Err(ApiKeyError::PermissionDenied(format!(
            "cannot {what} scopes the caller does not hold: {}",
            names.join(", ")
        )))
    }
}

/// Whether `key` may be rotated now: active, and no earlier secret still in its grace
/// period unless the caller ends it.
fn ensure_rotatable(
    key: &ApiKey,
    id: &KeyId,
    end_grace: bool,
    now: chrono::DateTime<Utc>,
) -> Result<(), ApiKeyError> {
    match key.state(now) {
        KeyState::Active => {}
        KeyState::Revoked => {
            return Err(ApiKeyError::FailedPrecondition(format!(
                "api key {id} is revoked and cannot be rotated"
            )));
        }
        KeyState::Expired => {
            return Err(ApiKeyError::FailedPrecondition(format!(
                "api key {id} has expired and cannot be rotated"
            )));
        }
    }
    match key.previous_secret_expire_time {
        Some(until) if until > now && !end_grace => Err(ApiKeyError::GraceInProgress {
            id: id.to_string(),
            until,
        }),
        _ => Ok(()),
    }
}

fn not_found(e: StoreError, id: &KeyId) -> ApiKeyError {
    match e {
        StoreError::NotFound => ApiKeyError::NotFound(id.to_string()),
        other => other.into(),
    }
}

/// A verification an internal service asks for on behalf of one of its calls.
pub struct Verification<'a> {
    pub token: &'a str,
    pub required_scope: Option<Scope>,
    pub client_ip: Option<IpAddr>,
    /// Consume: take this many tokens from the key's buckets and one request from its
    /// tenant's monthly quota, and record the gated call as the key's usage.
    pub consume: Option<u32>,
    /// The caller's operation name, recorded for a consuming verification.
    pub operation: &'a str,
}

/// Why a verification says no.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Key(VerifyFailure),
    InsufficientScope,
    RateLimited,
    QuotaExhausted,
}

/// The answer: the key (when it authenticated), why it is refused (if it is), and for a
/// consuming verification the rate-limit windows after it.
pub struct Checked {
    pub key: Option<KeyPrincipal>,
    pub refusal: Option<Refusal>,
    pub decision: Option<Decision>,
}

/// The most a consuming verification's operation name keeps, in characters.
const MAX_OPERATION_CHARS: usize = 200;

impl ApiKeys {
    /// Internal `VerifyApiKey`: authenticates `token`, checks the scope, and when consuming
    /// admits the call through the same buckets and monthly quota as the key's own calls and
    /// records it in the request log under the caller's operation.
    pub async fn verify_for_service(
        &self,
        principal: &Principal,
        req: &Verification<'_>,
    ) -> Result<Checked, ApiKeyError> {
        principal.require_internal()?;
        let key = match self.verifier.verify(req.token, req.client_ip).await? {
            Ok(key) => key,
            Err(failure) => {
                return Ok(Checked {
                    key: None,
                    refusal: Some(Refusal::Key(failure)),
                    decision: None,
                });
            }
        };
        if let Some(cost) = req.consume
            && cost > key.limits.burst
        {
            // More than the bucket ever holds: the call could never be admitted.
            return Err(ApiKeyError::Invalid(Violations::one(
                "cost",
                format!(
                    "{cost} exceeds the key's burst ({}): such a call could never pass",
                    key.limits.burst
                ),
            )));
        }
        let mut refusal = match req.required_scope {
            Some(scope) if !key.scopes.grants(scope) => Some(Refusal::InsufficientScope),
            _ => None,
        };
        let mut decision = None;
        if let Some(cost) = req.consume
            && refusal.is_none()
        {
            let admitted = match self
                .limiter
                .admit(
                    key.tenant_id,
                    key.key_id.as_str(),
                    &key.limits,
                    &key.quotas,
                    cost,
                )
                .await
            {
                Ok(decision) => decision,
                Err(RateLimitError::Exceeded { decision, .. }) => {
                    refusal = Some(Refusal::RateLimited);
                    decision
                }
                Err(RateLimitError::QuotaExhausted { .. }) => {
                    // No window state to report: peek at it without spending.
                    refusal = Some(Refusal::QuotaExhausted);
                    self.limiter
                        .check(key.tenant_id, key.key_id.as_str(), &key.limits, 0)
                        .await?
                }
                Err(e) => return Err(e.into()),
            };
            self.record_consumed(principal, req, &key, cost, refusal);
            decision = Some(admitted);
        }
        Ok(Checked {
            key: Some(key),
            refusal,
            decision,
        })
    }

    /// The gated call is the key's usage: record it under the caller's operation name.
    fn record_consumed(
        &self,
        principal: &Principal,
        req: &Verification<'_>,
        key: &KeyPrincipal,
        cost: u32,
        refusal: Option<Refusal>,
    ) {
        let allowed = refusal.is_none();
        let operation = match req.operation.trim() {
            "" => "/devgate.internal.v1.ApiKeyService/VerifyApiKey",
            op => op,
        };
        let code = if allowed {
            0
        } else {
            tonic::Code::ResourceExhausted as i16
        };
        let mut record = RequestRecord::new(
            key.tenant_id,
            operation
                .chars()
                .take(MAX_OPERATION_CHARS)
                .collect::<String>(),
            code,
        );
        record.api_key_id = Some(key.key_id.to_string());
        record.client_ip = req.client_ip;
        record.service_caller = principal.service_name().map(str::to_string);
        record.cost = if allowed { i64::from(cost) } else { 0 };
        record.error_code = match refusal {
            Some(Refusal::RateLimited) => Some("RATE_LIMITED".to_string()),
            Some(Refusal::QuotaExhausted) => Some("QUOTA_EXHAUSTED".to_string()),
            _ => None,
        };
        self.request_log.record(record);
    }
}
