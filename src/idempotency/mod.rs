//! Idempotency-Key for every create RPC, with Stripe's semantics: per (tenant, key), kept
//! 24 h; the same key with the same request answers as the first time (same id, no second
//! effect, metadata `idempotent-replayed: true`); with another request INVALID_ARGUMENT on
//! `idempotency_key`; while the first is still running ABORTED (retryable).
//!
//! A service uses it in a few lines, inside its own transaction:
//!
//! ```ignore
//! let guard = match self.idempotency.begin(tenant, claim).await? {
//!     Outcome::Proceed(guard) => guard,
//!     Outcome::Replay(replay) => return Err(replay.already_exists("webhook endpoint").into()),
//! };
//! let result = conn.transaction(async |c| {
//!     let row = store::insert(c, …).await?;
//!     guard.complete(c, &response, &row.id).await?; // or complete_withheld for secrets
//!     Ok(row)
//! }).await;
//! guard.finish(&result).await; // a failure releases the key so the client may retry
//! ```
//!
//! A create whose response holds no secret stores it (`guard.complete(c, &response, id)`)
//! and replays it: `replay.response::<v1::Generation>()?` decoded, sent by the grpc layer as
//! `idempotency::replayed(message)` (which sets the `idempotent-replayed` header).
//!
//! The reservation is a statement of its own (so concurrent attempts meet on the row before
//! any work starts); the completion is part of the caller's transaction, so the record
//! exists exactly when the work committed. Not a feature: features import it, it imports
//! only infrastructure (db, identity, validation).

pub mod model;
pub mod store;

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::Utc;
use diesel_async::AsyncPgConnection;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use model::{Claim, IdempotencyKey, METADATA_KEY, REPLAYED_HEADER};

use crate::{
    db::{self, PgPool, StoreError},
    identity::TenantId,
    validation::Violations,
};

/// Everything that can go wrong here; mapped to a gRPC status in `crate::status`.
#[derive(Debug, thiserror::Error)]
pub enum IdempotencyError {
    #[error("invalid request: {0}")]
    Invalid(Violations),
    /// The key was used for another request (or another RPC).
    #[error(
        "idempotency key {key:?} was already used with a different request{}; use a new key for a new request",
        if *same_rpc { String::new() } else { format!(" ({rpc})") }
    )]
    OtherRequest {
        key: IdempotencyKey,
        rpc: String,
        same_rpc: bool,
    },
    /// The first request with the key is still running; retrying is safe.
    #[error("a request with idempotency key {0:?} is still in progress; retry shortly")]
    InFlight(IdempotencyKey),
    /// This attempt outlived its lease and a retry took the key over; nothing of this
    /// attempt committed.
    #[error(
        "the request with idempotency key {0:?} took too long and was taken over by a retry; retry to get its result"
    )]
    LeaseLost(IdempotencyKey),
    /// A replay of an RPC whose response holds a secret: the secret is never stored, so
    /// the answer names what the first request created instead.
    #[error(
        "idempotency key {key:?} already created {resource} {resource_id}; its secret was shown only in the first response"
    )]
    Replayed {
        key: IdempotencyKey,
        resource: &'static str,
        resource_id: String,
    },
    /// A stored response no longer decodes (a field changed type across a deploy).
    #[error("stored response of idempotency key {key:?}: {source}")]
    Decode {
        key: IdempotencyKey,
        #[source]
        source: prost::DecodeError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<diesel::result::Error> for IdempotencyError {
    fn from(e: diesel::result::Error) -> Self {
        IdempotencyError::Store(e.into())
    }
}

/// The request's `idempotency-key` metadata made into a claim on `rpc`, or None without the
/// metadata. Call it after validating the request: a request refused by validation does not
/// use up its key.
pub fn claim<T: prost::Message>(
    req: &tonic::Request<T>,
    rpc: &'static str,
) -> Result<Option<Claim>, IdempotencyError> {
    let mut values = req.metadata().get_all(METADATA_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(IdempotencyError::Invalid(Violations::one(
            model::FIELD,
            "send one Idempotency-Key header, not several",
        )));
    }
    let key = IdempotencyKey::parse(value.as_bytes()).map_err(IdempotencyError::Invalid)?;
    Ok(Some(Claim::new(key, rpc, req.get_ref())))
}

/// A response replayed from its stored encoding, marked `idempotent-replayed: true`.
pub fn replayed<T>(message: T) -> tonic::Response<T> {
    let mut response = tonic::Response::new(message);
    mark_replayed(response.metadata_mut());
    response
}

pub fn mark_replayed(metadata: &mut tonic::metadata::MetadataMap) {
    metadata.insert(
        REPLAYED_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
}

/// What to do with a request.
pub enum Outcome {
    /// Do the work; complete the guard in its transaction.
    Proceed(Guard),
    /// The same request completed before: answer from this.
    Replay(Replay),
}

/// A completed first request.
#[derive(Debug)]
pub struct Replay {
    pub key: IdempotencyKey,
    /// The encoded first response; None for an RPC whose response held a secret.
    pub response: Option<Vec<u8>>,
    /// The id of what the first request created.
    pub resource_id: String,
}

impl Replay {
    /// The answer for an RPC whose response holds a secret: ALREADY_EXISTS naming what the
    /// first request created (`resource`: "api key", "webhook endpoint").
    pub fn already_exists(self, resource: &'static str) -> IdempotencyError {
        IdempotencyError::Replayed {
            key: self.key,
            resource,
            resource_id: self.resource_id,
        }
    }

    /// The first response, decoded (send it with [`replayed`]). An RPC that stored no
    /// response answers [`Replay::already_exists`] instead.
    pub fn response<M: prost::Message + Default>(&self) -> Result<Option<M>, IdempotencyError> {
        self.response
            .as_deref()
            .map(M::decode)
            .transpose()
            .map_err(|source| IdempotencyError::Decode {
                key: self.key.clone(),
                source,
            })
    }
}

/// A pause point for tests: a future awaited once, after a key was reserved.
type PausePoint = Pin<Box<dyn Future<Output = ()> + Send>>;

/// How many times a reservation is retried when the row it conflicted with was deleted
/// (released) before it could be read.
const RESERVE_ATTEMPTS: usize = 3;
/// How often the worker deletes keys past their retention, and in batches of how many.
const SWEEP_INTERVAL: Duration = Duration::from_secs(300);
const SWEEP_BATCH: i64 = 1000;
/// What an ABORTED answer suggests as the wait before a retry.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The idempotency keys of every create RPC (cheap to clone).
#[derive(Clone)]
pub struct Idempotency {
    pool: PgPool,
    pause_after_reserving: Arc<Mutex<Option<PausePoint>>>,
}

impl Idempotency {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            pause_after_reserving: Arc::new(Mutex::new(None)),
        }
    }

    /// Reserves the claim's key for this attempt, or says how the key was used before.
    /// Without a claim (no `Idempotency-Key`) it always proceeds, with a guard that does
    /// nothing.
    pub async fn begin(
        &self,
        tenant: TenantId,
        claim: Option<Claim>,
    ) -> Result<Outcome, IdempotencyError> {
        let Some(claim) = claim else {
            return Ok(Outcome::Proceed(Guard { held: None }));
        };
        let lease_id = Uuid::new_v4();
        let mut conn = db::connect(&self.pool).await?;
        for _ in 0..RESERVE_ATTEMPTS {
            let now = Utc::now();
            let reserve = store::Reserve {
                tenant,
                key: claim.key.as_str(),
                rpc: claim.rpc,
                request_hash: &claim.hash.0,
                lease_id,
                now,
                lease_until: now + model::LEASE,
                expire_time: now + model::RETENTION,
            };
            if store::reserve(&mut conn, &reserve).await? {
                drop(conn);
                let guard = Guard {
                    held: Some(Held {
                        pool: self.pool.clone(),
                        tenant,
                        key: claim.key,
                        lease_id,
                        settled: false,
                    }),
                };
                self.paused().await;
                return Ok(Outcome::Proceed(guard));
            }
            let Some(record) = store::find(&mut conn, tenant, claim.key.as_str()).await? else {
                // Released between the two statements: try to reserve again.
                continue;
            };
            return match record.verdict(&claim) {
                model::Verdict::Replay {
                    response,
                    resource_id,
                } => Ok(Outcome::Replay(Replay {
                    key: claim.key,
                    response,
                    resource_id,
                })),
                model::Verdict::OtherRequest { rpc } => Err(IdempotencyError::OtherRequest {
                    key: claim.key,
                    same_rpc: rpc == claim.rpc,
                    rpc,
                }),
                model::Verdict::InFlight => Err(IdempotencyError::InFlight(claim.key)),
            };
        }
        // The key keeps changing hands: as good as in flight.
        Err(IdempotencyError::InFlight(claim.key))
    }

    async fn paused(&self) {
        let pause = self
            .pause_after_reserving
            .lock()
            .expect("pause point")
            .take();
        if let Some(pause) = pause {
            pause.await;
        }
    }

    /// Test hook: the next attempt that reserves a key first awaits `until`, holding the
    /// key in flight.
    #[doc(hidden)]
    pub fn pause_once_after_reserving(&self, until: impl Future<Output = ()> + Send + 'static) {
        *self.pause_after_reserving.lock().expect("pause point") = Some(Box::pin(until));
    }

    /// Deletes keys past their retention until none is left; returns how many.
    pub async fn purge_expired(&self) -> Result<usize, StoreError> {
        let mut total = 0;
        loop {
            let mut conn = db::connect(&self.pool).await?;
            let n = store::delete_expired(&mut conn, Utc::now(), SWEEP_BATCH).await?;
            total += n;
            if (n as i64) < SWEEP_BATCH {
                return Ok(total);
            }
        }
    }

    /// The worker's sweep: deletes expired keys every few minutes until `stop`.
    pub async fn run_sweeper(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => match self.purge_expired().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(keys = n, "deleted expired idempotency keys"),
                    Err(e) => tracing::warn!(error = %e, "idempotency key sweep failed; will retry"),
                },
            }
        }
    }
}

/// An attempt's hold on its key. Complete it in the transaction that does the work; then
/// [`Guard::finish`] it with the transaction's result. Dropped unfinished (the call was
/// cancelled), it releases the key in the background.
pub struct Guard {
    held: Option<Held>,
}

struct Held {
    pool: PgPool,
    tenant: TenantId,
    key: IdempotencyKey,
    lease_id: Uuid,
    settled: bool,
}

impl Guard {
    /// Records the response in the caller's transaction. Fails with ABORTED if this
    /// attempt lost its key to a retry, which rolls the caller's work back.
    pub async fn complete<M: prost::Message>(
        &self,
        conn: &mut AsyncPgConnection,
        response: &M,
        resource_id: &str,
    ) -> Result<(), IdempotencyError> {
        self.settle(conn, Some(&response.encode_to_vec()), resource_id)
            .await
    }

    /// Like [`Guard::complete`] for an RPC whose response holds a secret: only the id of
    /// what was created is kept, and a replay answers ALREADY_EXISTS naming it.
    pub async fn complete_withheld(
        &self,
        conn: &mut AsyncPgConnection,
        resource_id: &str,
    ) -> Result<(), IdempotencyError> {
        self.settle(conn, None, resource_id).await
    }

    async fn settle(
        &self,
        conn: &mut AsyncPgConnection,
        response: Option<&[u8]>,
        resource_id: &str,
    ) -> Result<(), IdempotencyError> {
        let Some(h) = &self.held else {
            return Ok(());
        };
        if store::complete(
            conn,
            h.tenant,
            h.key.as_str(),
            h.lease_id,
            response,
            resource_id,
        )
        .await?
        {
            Ok(())
        } else {
            Err(IdempotencyError::LeaseLost(h.key.clone()))
        }
    }

    /// After the work's transaction: a failure releases the key at once so the client may
    /// retry with it (what failed left nothing behind). Releasing after a commit would be
    /// a no-op (the row is completed), so the result only saves the query.
    pub async fn finish<T, E>(mut self, result: &Result<T, E>) {
        let Some(h) = self.held.as_mut() else {
            return;
        };
        h.settled = true;
        if result.is_err() {
            release(h.pool.clone(), h.tenant, h.key.clone(), h.lease_id).await;
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let Some(h) = self.held.take() else {
            return;
        };
        if h.settled {
            return;
        }
        // Cancelled between reserving and finishing: whatever it did committed or not;
        // releasing only deletes a reservation that did not complete.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(release(h.pool, h.tenant, h.key, h.lease_id));
        }
    }
}

/// Deletes a reservation that did not complete. On failure the lease runs out instead, and
/// the next retry after it takes the key over.
async fn release(pool: PgPool, tenant: TenantId, key: IdempotencyKey, lease_id: Uuid) {
    let released = async {
        let mut conn = db::connect(&pool).await?;
        store::release(&mut conn, tenant, key.as_str(), lease_id).await
    };
    if let Err(e) = released.await {
        tracing::warn!(error = %e, tenant = %tenant, "could not release an idempotency key; it frees itself when its lease ends");
    }
}
