//! API-key management: the rules (tenancy, scopes, grace periods) between the gRPC layer
//! and the store.

use std::{sync::Arc, time::Duration};

use chrono::Utc;

use super::{
    ApiKeyError,
    hashing::SecretHasher,
    invalidation::Invalidations,
    model::{ApiKey, ApiKeyChanges, KeyId, KeyState, ListFilter, NewApiKey},
    store::{ApiKeyStore, Cursor, InsertKey},
    token::{self, NewToken},
    verifier::KeyVerifier,
};
use crate::{
    auth::{Principal, Scope, Scopes},
    config::ApiKeyConfig,
    db::StoreError,
    ratelimit::{LimitOverrides, PlanLimits},
    tenants::{TenantDirectory, TenantId},
    validation::Violations,
};

/// One page of keys and the cursor after its last row.
pub struct Page {
    pub keys: Vec<ApiKey>,
    pub next: Option<Cursor>,
}

pub struct ApiKeys {
    store: ApiKeyStore,
    hasher: Arc<SecretHasher>,
    verifier: Arc<KeyVerifier>,
    invalidations: Invalidations,
    config: ApiKeyConfig,
    tenants: TenantDirectory,
    plans: PlanLimits,
}

impl ApiKeys {
    pub fn new(
        store: ApiKeyStore,
        hasher: Arc<SecretHasher>,
        verifier: Arc<KeyVerifier>,
        invalidations: Invalidations,
        config: ApiKeyConfig,
        tenants: TenantDirectory,
        plans: PlanLimits,
    ) -> Self {
        Self {
            store,
            hasher,
            verifier,
            invalidations,
            config,
            tenants,
            plans,
        }
    }

    pub fn verifier(&self) -> &Arc<KeyVerifier> {
        &self.verifier
    }

    pub fn config(&self) -> &ApiKeyConfig {
        &self.config
    }

    /// Creates a key and returns it with its token (the only time the token exists in clear).
    pub async fn create(
        &self,
        principal: &Principal,
        new: NewApiKey,
    ) -> Result<(ApiKey, NewToken), ApiKeyError> {
        let tenant = principal.tenant_with(Scope::ApiKeysWrite)?;
        ensure_covers(principal, &new.scopes, "create a key with")?;
        self.check_limits(tenant, &new.rate_limits).await?;
        // A 71-bit random id practically never collides; retry once if it does.
        for attempt in 0..2 {
            let id = token::new_key_id();
            let token = token::generate(new.environment, &id);
            let secret_hash = self.hasher.hash(token.secret()).await?;
            let insert = InsertKey {
                id: &id,
                tenant_id: tenant,
                new: &new,
                secret_hash,
                created_by: principal.actor(),
                now: Utc::now(),
            };
            match self.store.insert(insert).await {
                Ok(key) => {
                    tracing::info!(tenant = %tenant, key_id = %key.id, actor = %principal.actor(), "api key created");
                    return Ok((key, token));
                }
                Err(StoreError::Conflict(_)) if attempt == 0 => continue,
                Err(e) => return Err(e.into()),
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
        let mut keys = self
            .store
            .list(tenant, filter, after.as_ref(), page_size + 1, Utc::now())
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
        let key = self
            .store
            .update(tenant, id, &changes, Utc::now())
            .await
            .map_err(|e| not_found(e, id))?;
        self.broadcast(id).await;
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
        let key = self
            .store
            .revoke(tenant, id, reason, Utc::now())
            .await
            .map_err(|e| not_found(e, id))?;
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
        let key = match self
            .store
            .rotate(tenant, id, &hash, previous_until, end_grace, now)
            .await
        {
            Ok(key) => key,
            // Revoked, deleted or rotated by someone else since it was read: say which.
            Err(StoreError::NotFound) => {
                let latest = self.find(tenant, id).await?;
                ensure_rotatable(&latest, id, end_grace, Utc::now())?;
                return Err(ApiKeyError::Aborted(format!(
                    "api key {id} changed during the rotation; retry"
                )));
            }
            Err(other) => return Err(other.into()),
        };
        self.broadcast(id).await;
        tracing::info!(tenant = %tenant, key_id = %id, actor = %principal.actor(), grace_s = if end_grace { 0 } else { grace.as_secs() }, "api key rotated");
        Ok((key, token))
    }

    pub async fn delete(&self, principal: &Principal, id: &KeyId) -> Result<(), ApiKeyError> {
        let tenant = principal.tenant_with(Scope::ApiKeysWrite)?;
        self.managed(principal, tenant, id).await?;
        self.store
            .delete(tenant, id)
            .await
            .map_err(|e| not_found(e, id))?;
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
        self.store
            .get(tenant, id)
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
