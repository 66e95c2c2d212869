//! Idempotency keys in Postgres. Every query names the tenant; completing and releasing
//! also name the attempt's lease, so only the attempt that holds a key can settle it.

use chrono::{DateTime, Utc};
use diesel::{prelude::*, upsert::excluded};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::model::{Record, RecordState};
use crate::{
    db::{StoreError, schema::idempotency_keys as ik},
    identity::TenantId,
};

const IN_FLIGHT: &str = "in_flight";
const COMPLETED: &str = "completed";

/// A reservation to insert (or to take over an abandoned or expired key with).
pub struct Reserve<'a> {
    pub tenant: TenantId,
    pub key: &'a str,
    pub rpc: &'a str,
    pub request_hash: &'a [u8],
    pub lease_id: Uuid,
    pub now: DateTime<Utc>,
    pub lease_until: DateTime<Utc>,
    pub expire_time: DateTime<Utc>,
}

/// Inserts the key `in_flight`, or takes it over when the row there is dead: an attempt
/// whose lease expired without completing (it crashed, so nothing of it committed) or a
/// key past its retention that the sweep has not deleted yet. One statement: concurrent
/// attempts serialise on the row, and exactly one of them gets the key. Returns whether
/// this attempt holds it now.
pub async fn reserve(conn: &mut AsyncPgConnection, r: &Reserve<'_>) -> Result<bool, StoreError> {
    let upsert = diesel::insert_into(ik::table)
        .values((
            ik::tenant_id.eq(r.tenant.0),
            ik::key.eq(r.key),
            ik::rpc.eq(r.rpc),
            ik::request_hash.eq(r.request_hash),
            ik::state.eq(IN_FLIGHT),
            ik::lease_id.eq(r.lease_id),
            ik::lease_until.eq(r.lease_until),
            ik::create_time.eq(r.now),
            ik::expire_time.eq(r.expire_time),
        ))
        .on_conflict((ik::tenant_id, ik::key))
        .do_update()
        .set((
            ik::rpc.eq(excluded(ik::rpc)),
            ik::request_hash.eq(excluded(ik::request_hash)),
            ik::state.eq(IN_FLIGHT),
            ik::lease_id.eq(excluded(ik::lease_id)),
            ik::lease_until.eq(excluded(ik::lease_until)),
            ik::response.eq(None::<Vec<u8>>),
            ik::resource_id.eq(None::<String>),
            ik::create_time.eq(excluded(ik::create_time)),
            ik::expire_time.eq(excluded(ik::expire_time)),
        ));
    // `ON CONFLICT … DO UPDATE … WHERE`: the row is taken over only when it is dead.
    let taken: Option<Uuid> = diesel::query_dsl::methods::FilterDsl::filter(
        upsert,
        ik::state
            .eq(IN_FLIGHT)
            .and(ik::lease_until.lt(r.now))
            .or(ik::expire_time.le(r.now)),
    )
    .returning(ik::lease_id)
    .get_result(conn)
    .await
    .optional()?;
    Ok(taken.is_some())
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = ik, check_for_backend(diesel::pg::Pg))]
struct RecordRow {
    rpc: String,
    request_hash: Vec<u8>,
    state: String,
    response: Option<Vec<u8>>,
    resource_id: Option<String>,
}

/// The key's record, if it exists.
pub async fn find(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    key: &str,
) -> Result<Option<Record>, StoreError> {
    let row: Option<RecordRow> = ik::table
        .filter(ik::tenant_id.eq(tenant.0).and(ik::key.eq(key)))
        .select(RecordRow::as_select())
        .first(conn)
        .await
        .optional()?;
    row.map(|row| {
        let state = match (row.state.as_str(), row.resource_id) {
            (IN_FLIGHT, _) => RecordState::InFlight,
            (COMPLETED, Some(resource_id)) => RecordState::Completed {
                response: row.response,
                resource_id,
            },
            (other, _) => {
                return Err(StoreError::Unavailable(format!(
                    "idempotency key in state {other:?} without a resource id"
                )));
            }
        };
        Ok(Record {
            rpc: row.rpc,
            hash: row.request_hash,
            state,
        })
    })
    .transpose()
}

/// Flips the attempt's reservation to `completed` (in the caller's transaction, with the
/// work it records). False: the attempt no longer holds the key (its lease was taken over).
pub async fn complete(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    key: &str,
    lease_id: Uuid,
    response: Option<&[u8]>,
    resource_id: &str,
) -> Result<bool, StoreError> {
    let n = diesel::update(
        ik::table.filter(
            ik::tenant_id
                .eq(tenant.0)
                .and(ik::key.eq(key))
                .and(ik::lease_id.eq(lease_id))
                .and(ik::state.eq(IN_FLIGHT)),
        ),
    )
    .set((
        ik::state.eq(COMPLETED),
        ik::lease_until.eq(None::<DateTime<Utc>>),
        ik::response.eq(response),
        ik::resource_id.eq(resource_id),
    ))
    .execute(conn)
    .await?;
    Ok(n == 1)
}

/// Deletes the attempt's reservation if it still holds it and has not completed, so the
/// client may retry at once. Returns whether a row was deleted.
pub async fn release(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    key: &str,
    lease_id: Uuid,
) -> Result<bool, StoreError> {
    let n = diesel::delete(
        ik::table.filter(
            ik::tenant_id
                .eq(tenant.0)
                .and(ik::key.eq(key))
                .and(ik::lease_id.eq(lease_id))
                .and(ik::state.eq(IN_FLIGHT)),
        ),
    )
    .execute(conn)
    .await?;
    Ok(n == 1)
}

/// Deletes up to `limit` keys past their retention; returns how many.
pub async fn delete_expired(
    conn: &mut AsyncPgConnection,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<usize, StoreError> {
    use diesel::sql_types::{BigInt, Timestamptz};
    // Bounded batches: a backlog is deleted in short statements, not one long one.
    Ok(diesel::sql_query(
        "DELETE FROM idempotency_keys WHERE ctid = ANY (ARRAY(
             SELECT ctid FROM idempotency_keys WHERE expire_time <= $1 LIMIT $2))",
    )
    .bind::<Timestamptz, _>(now)
    .bind::<BigInt, _>(limit)
    .execute(conn)
    .await?)
}
