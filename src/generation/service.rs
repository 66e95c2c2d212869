//! The rules of the generation proxy between the gRPC layer and the store: tenancy, the
//! monthly generations quota, and the one transaction that charges a generation, stores it
//! and queues its job and its `generation.queued` event (and the one that cancels it).

use std::sync::Arc;

use chrono::Utc;
use diesel_async::{AsyncConnection, AsyncPgConnection};
use prost::Message;
use uuid::Uuid;

use super::{
    GenerationConfig, GenerationError,
    model::{self, Generation, NewGeneration},
    store::{self, GenerationFilter, InsertGeneration},
    watch::Changes,
};
use crate::{
    auth::Principal,
    credits::store::{self as credits, Applied, NewEntry},
    db::{self, PgPool, StoreError},
    events::{
        emitter::Emitter,
        outbox::{self, OutboxMessage},
    },
    idempotency::{Claim, Idempotency, Outcome},
    identity::{Scope, TenantId},
    proto::{
        convert::timestamp,
        upstream::orchestrator::v1::{self as orchestrator, routing},
    },
    ratelimit::{Metric, PlanQuotas, RateLimitError, RateLimiter},
    tenants::TenantDirectory,
};

/// The ledger reasons of a charge and of its refund.
const CHARGE_REASON: &str = "generation";
const REFUND_REASON: &str = "generation_refund";
/// Who writes devgate's own ledger entries (refunds).
const DEVGATE: &str = "devgate";
/// The AMQP `type` of the orchestrator messages: their protobuf full names.
const JOB_TYPE: &str = "upstream.orchestrator.v1.GenerationJob";
const CANCEL_TYPE: &str = "upstream.orchestrator.v1.GenerationCancel";
const CANCEL_REASON: &str = "cancelled by the developer";

/// What a create answered: a new generation, or the first response of its Idempotency-Key.
pub enum Created<M> {
    New(Box<Generation>),
    Replayed(M),
}

/// One page of generations and the id to continue before.
pub struct Page {
    pub generations: Vec<Generation>,
    pub next: Option<Uuid>,
}

pub struct Generations {
    pub(super) pool: PgPool,
    pub(super) config: GenerationConfig,
    pub(super) emitter: Arc<Emitter>,
    idempotency: Idempotency,
    limiter: Arc<RateLimiter>,
    /// Portal users' quota: the tenant's overrides over its plan's.
    tenants: TenantDirectory,
    plan_quotas: PlanQuotas,
    /// Tells WatchGeneration streams on every replica that a generation changed.
    pub(super) changes: Changes,
}

impl Generations {
    pub fn new(
        pool: PgPool,
        config: GenerationConfig,
        emitter: Arc<Emitter>,
        idempotency: Idempotency,
        limiter: Arc<RateLimiter>,
        (tenants, plan_quotas): (TenantDirectory, PlanQuotas),
        changes: Changes,
    ) -> Self {
        Self {
            pool,
            config,
            emitter,
            idempotency,
            limiter,
            tenants,
            plan_quotas,
            changes,
        }
    }

    /// Who publishes generation changes (the results consumer calls it after each commit).
    pub fn changes(&self) -> &Changes {
        &self.changes
    }

    pub fn config(&self) -> &GenerationConfig {
        &self.config
    }

    /// Charges and queues a generation. `respond` makes the response stored for a replay of
    /// the Idempotency-Key; a replay answers that stored response, charging nothing and
    /// counting nothing against the quota.
    pub async fn create<M: Message + Default>(
        &self,
        principal: &Principal,
        new: NewGeneration,
        claim: Option<Claim>,
        respond: fn(&Generation) -> M,
    ) -> Result<Created<M>, GenerationError> {
        let tenant = principal.tenant_with(Scope::GenerationsWrite)?;
        let spec = self.config.kinds.get(&new.kind).ok_or_else(|| {
            GenerationError::Invalid(crate::validation::Violations::one("kind", "unknown kind"))
        })?;
        let cost = spec.price * i64::from(new.count);
        // Load it before the transaction: no connection is held while compiling schemas.
        self.emitter.catalog().await?;
        let guard = match self.idempotency.begin(tenant, claim).await? {
            Outcome::Proceed(guard) => guard,
            Outcome::Replay(replay) => {
                let first = replay.response::<M>()?.ok_or_else(|| {
                    GenerationError::Store(StoreError::Unavailable(
                        "a generation's idempotency record holds no response".into(),
                    ))
                })?;
                return Ok(Created::Replayed(first));
            }
        };
        let count = u64::try_from(new.count).unwrap_or(1);
        let counted = match self.consume_quota(principal, tenant, count).await {
            Ok(counted) => counted,
            Err(e) => {
                let failed: Result<(), _> = Err(());
                guard.finish(&failed).await;
                return Err(e);
            }
        };
        let id = Uuid::now_v7();
        let actor = principal.actor();
        let mut conn = match db::connect(&self.pool).await {
            Ok(conn) => conn,
            Err(e) => {
                let failed: Result<(), _> = Err(());
                guard.finish(&failed).await;
                self.refund_quota(tenant, counted).await;
                return Err(e.into());
            }
        };
        let created = conn
            .transaction::<_, GenerationError, _>(async |c| {
                let reference = id.to_string();
                let idempotency_id = format!("generation:{id}");
                match credits::debit(
                    c,
                    &NewEntry {
                        tenant,
                        amount: cost,
                        reason: CHARGE_REASON,
                        reference: &reference,
                        idempotency_id: Some(&idempotency_id),
                        created_by: &actor,
                    },
                )
                .await?
                {
                    Applied::Inserted(_) | Applied::Existing(_) => {}
                    Applied::Insufficient { balance } => {
                        return Err(GenerationError::InsufficientCredits { balance, cost });
                    }
                }
                let generation = store::insert(
                    c,
                    InsertGeneration {
                        id,
                        tenant_id: tenant,
                        new: &new,
                        cost,
                        created_by: &actor,
                        now: Utc::now(),
                    },
                )
                .await?;
                let job = job(&generation);
                outbox::enqueue(
                    c,
                    &OutboxMessage {
                        exchange: &self.config.jobs_exchange,
                        routing_key: routing::JOB_ROUTING_KEY,
                        body: &job.encode_to_vec(),
                        content_type: routing::CONTENT_TYPE,
                        message_type: Some(JOB_TYPE),
                        message_id: &reference,
                    },
                )
                .await?;
                self.emitter
                    .emit(
                        c,
                        tenant,
                        "generation.queued",
                        model::queued_payload(&generation),
                    )
                    .await?;
                guard.complete(c, &respond(&generation), &reference).await?;
                Ok(generation)
            })
            .await;
        drop(conn);
        guard.finish(&created).await;
        match created {
            Ok(generation) => {
                tracing::info!(tenant = %tenant, generation_id = %generation.id, kind = %generation.kind, cost, actor = %actor, "generation queued");
                Ok(Created::New(Box::new(generation)))
            }
            Err(e) => {
                self.refund_quota(tenant, counted).await;
                Err(e)
            }
        }
    }

    /// Counts `count` generations against the tenant's month. `Ok(0)` when Redis is down
    /// (quotas fail open) so that nothing is refunded later.
    async fn consume_quota(
        &self,
        principal: &Principal,
        tenant: TenantId,
        count: u64,
    ) -> Result<u64, GenerationError> {
        let limit = match principal {
            Principal::ApiKey(key) => key.quotas.monthly_generations,
            _ => {
                let record = self.tenants.get(tenant).await?;
                record
                    .quotas
                    .apply(self.plan_quotas.of(record.plan))
                    .monthly_generations
            }
        };
        match self
            .limiter
            .quotas()
            .consume(tenant, Metric::Generations, count, limit)
            .await
        {
            None => Ok(0),
            Some(usage) if usage.allowed => Ok(count),
            Some(usage) => Err(RateLimitError::QuotaExhausted { tenant, usage }.into()),
        }
    }

    pub(super) async fn refund_quota(&self, tenant: TenantId, counted: u64) {
        if counted > 0 {
            self.limiter
                .quotas()
                .refund(tenant, Metric::Generations, counted)
                .await;
        }
    }

    pub async fn get(
        &self,
        principal: &Principal,
        id: Uuid,
    ) -> Result<Generation, GenerationError> {
        let tenant = principal.tenant_with(Scope::GenerationsRead)?;
        let mut conn = db::connect(&self.pool).await?;
        store::get(&mut conn, tenant, id)
            .await
            .map_err(|e| not_found(e, id))
    }

    pub async fn list(
        &self,
        principal: &Principal,
        filter: &GenerationFilter,
        before: Option<Uuid>,
        page_size: i64,
    ) -> Result<Page, GenerationError> {
        let tenant = principal.tenant_with(Scope::GenerationsRead)?;
        let mut conn = db::connect(&self.pool).await?;
        // One extra row tells whether another page follows.
        let mut generations = store::list(&mut conn, tenant, filter, before, page_size + 1).await?;
        let next = if generations.len() as i64 > page_size {
            generations.truncate(page_size as usize);
            generations.last().map(|g| g.id)
        } else {
            None
        };
        Ok(Page { generations, next })
    }

    /// Cancels a generation that has not ended: CANCELLED at once, refunded once, the
    /// orchestrator told to stop, `generation.cancelled` emitted — one transaction on the
    /// locked row, so a concurrent cancel (or update) waits and then sees it ended.
    pub async fn cancel(
        &self,
        principal: &Principal,
        id: Uuid,
    ) -> Result<Generation, GenerationError> {
        let tenant = principal.tenant_with(Scope::GenerationsWrite)?;
        self.emitter.catalog().await?;
        let actor = principal.actor();
        let mut conn = db::connect(&self.pool).await?;
        let cancelled = conn
            .transaction::<_, GenerationError, _>(async |c| {
                let current = store::get_for_update(c, tenant, id)
                    .await
                    .map_err(|e| not_found(e, id))?;
                if current.state.is_terminal() {
                    return Err(GenerationError::Ended {
                        id: id.to_string(),
                        state: current.state.as_str(),
                    });
                }
                let refunded = refund_credits(c, &current).await?;
                let generation = store::cancel(c, tenant, id, Utc::now()).await?;
                enqueue_cancel(c, &self.config.jobs_exchange, &generation, CANCEL_REASON).await?;
                self.emitter
                    .emit(
                        c,
                        tenant,
                        "generation.cancelled",
                        model::cancelled_payload(&generation, &actor, CANCEL_REASON, refunded),
                    )
                    .await?;
                Ok(generation)
            })
            .await?;
        drop(conn);
        self.changes.publish(id).await;
        // The quota counts work asked for this month; cancelled work gives it back.
        self.refund_quota(tenant, u64::try_from(cancelled.count).unwrap_or(0))
            .await;
        tracing::info!(tenant = %tenant, generation_id = %id, actor = %actor, "generation cancelled");
        Ok(cancelled)
    }
}

impl Generations {
    /// The generation now, then each change until it ends: a stream that closes after the
    /// terminal state (or when the receiver is dropped). NOT_FOUND before anything is sent
    /// for an id that is not the tenant's.
    pub async fn watch(
        self: &Arc<Self>,
        principal: &Principal,
        id: Uuid,
    ) -> Result<tokio::sync::mpsc::Receiver<Result<Generation, GenerationError>>, GenerationError>
    {
        let tenant = principal.tenant_with(Scope::GenerationsRead)?;
        let mut subscription = self.changes.subscribe(id).await;
        let current = self.read(tenant, id).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let this = self.clone();
        tokio::spawn(async move {
            let mut last = current;
            if tx.send(Ok(last.clone())).await.is_err() {
                return;
            }
            while !last.state.is_terminal() {
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = subscription.changed() => {}
                }
                match this.read(tenant, id).await {
                    Ok(now) if now == last => {}
                    Ok(now) => {
                        last = now;
                        if tx.send(Ok(last.clone())).await.is_err() {
                            return;
                        }
                    }
                    // A database blip: the next wake-up reads again.
                    Err(GenerationError::Store(StoreError::Unavailable(e))) => {
                        tracing::debug!(error = %e, generation_id = %id, "watch could not re-read; will retry");
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }

    async fn read(&self, tenant: TenantId, id: Uuid) -> Result<Generation, GenerationError> {
        let mut conn = db::connect(&self.pool).await?;
        store::get(&mut conn, tenant, id)
            .await
            .map_err(|e| not_found(e, id))
    }
}

/// Gives a generation's credits back, once: the row's `refunded` flag is set in the same
/// transaction, and the ledger entry's idempotency id (`generation-refund:<id>`) makes a
/// second refund of one generation a no-op whatever path (cancel, a FAILED or CANCELLED
/// update, the timeout sweep) tries it. Returns the credits this call gave back.
pub(super) async fn refund_credits(
    c: &mut AsyncPgConnection,
    g: &Generation,
) -> Result<i64, GenerationError> {
    if g.refunded || g.cost <= 0 {
        return Ok(0);
    }
    let reference = g.id.to_string();
    let refund_id = format!("generation-refund:{}", g.id);
    let applied = credits::credit(
        c,
        &NewEntry {
            tenant: g.tenant_id,
            amount: g.cost,
            reason: REFUND_REASON,
            reference: &reference,
            idempotency_id: Some(&refund_id),
            created_by: DEVGATE,
        },
    )
    .await?;
    match applied {
        Applied::Inserted(_) => Ok(g.cost),
        // The ledger has it although the flag said no: nothing more to give back.
        Applied::Existing(_) | Applied::Insufficient { .. } => {
            tracing::warn!(generation_id = %g.id, "refund already in the ledger; not refunded twice");
            Ok(0)
        }
    }
}

/// Queues a GenerationCancel for the orchestrator in the caller's transaction (a cancelled
/// or timed-out generation: the orchestrator stops work that nobody will pay for).
pub(super) async fn enqueue_cancel(
    c: &mut AsyncPgConnection,
    jobs_exchange: &str,
    g: &Generation,
    reason: &str,
) -> Result<(), StoreError> {
    let message = orchestrator::GenerationCancel {
        generation_id: g.id.to_string(),
        tenant_id: g.tenant_id.to_string(),
        reason: reason.into(),
    };
    let message_id = format!("cancel:{}", g.id);
    outbox::enqueue(
        c,
        &OutboxMessage {
            exchange: jobs_exchange,
            routing_key: routing::CANCEL_ROUTING_KEY,
            body: &message.encode_to_vec(),
            content_type: routing::CONTENT_TYPE,
            message_type: Some(CANCEL_TYPE),
            message_id: &message_id,
        },
    )
    .await
}

/// The orchestrator's job for a generation.
fn job(g: &Generation) -> orchestrator::GenerationJob {
    orchestrator::GenerationJob {
        generation_id: g.id.to_string(),
        tenant_id: g.tenant_id.to_string(),
        kind: g.kind.clone(),
        prompt: g.prompt.clone(),
        output_format: g.output_format.clone(),
        style: crate::proto::json::json_to_struct(&g.style),
        count: u32::try_from(g.count).unwrap_or(1),
        project_id: g.project_id.clone(),
        metadata: g
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        requested_by: g.created_by.clone(),
        create_time: Some(timestamp(g.create_time)),
    }
}

fn not_found(e: StoreError, id: Uuid) -> GenerationError {
    match e {
        StoreError::NotFound => GenerationError::NotFound(id.to_string()),
        e => e.into(),
    }
}
