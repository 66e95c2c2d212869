//! Generations in Postgres. Every query filters by tenant; each function takes the caller's
//! connection so a change, its ledger entry, its outbox rows and its event share one
//! transaction.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::model::{Generation, NewGeneration, State};
use crate::{
    db::{StoreError, schema::generations},
    identity::TenantId,
};

#[derive(Debug, Queryable, Selectable)]
#[diesel(table_name = generations, check_for_backend(diesel::pg::Pg))]
struct GenerationRow {
    id: Uuid,
    tenant_id: Uuid,
    kind: String,
    prompt: String,
    output_format: String,
    style: serde_json::Value,
    count: i32,
    project_id: String,
    metadata: serde_json::Value,
    state: String,
    progress: i32,
    cost: i64,
    refunded: bool,
    asset_ids: Vec<String>,
    result_urls: Vec<String>,
    error_code: Option<String>,
    error_message: Option<String>,
    created_by: String,
    create_time: DateTime<Utc>,
    start_time: Option<DateTime<Utc>>,
    end_time: Option<DateTime<Utc>>,
    update_time: DateTime<Utc>,
}

impl TryFrom<GenerationRow> for Generation {
    type Error = StoreError;
    fn try_from(row: GenerationRow) -> Result<Self, StoreError> {
        let metadata: BTreeMap<String, String> = serde_json::from_value(row.metadata)
            .map_err(|e| StoreError::Unavailable(format!("generations.metadata: {e}")))?;
        let state = State::parse(&row.state).ok_or_else(|| {
            StoreError::Unavailable(format!("generations.state: unknown {:?}", row.state))
        })?;
        Ok(Generation {
            id: row.id,
            tenant_id: TenantId(row.tenant_id),
            kind: row.kind,
            prompt: row.prompt,
            output_format: row.output_format,
            style: row.style,
            count: row.count,
            project_id: row.project_id,
            metadata,
            state,
            progress: row.progress,
            cost: row.cost,
            refunded: row.refunded,
            asset_ids: row.asset_ids,
            result_urls: row.result_urls,
            error_code: row.error_code,
            error_message: row.error_message,
            created_by: row.created_by,
            create_time: row.create_time,
            start_time: row.start_time,
            end_time: row.end_time,
            update_time: row.update_time,
        })
    }
}

/// A generation to insert, already charged `cost`.
pub struct InsertGeneration<'a> {
    pub id: Uuid,
    pub tenant_id: TenantId,
    pub new: &'a NewGeneration,
    pub cost: i64,
    pub created_by: &'a str,
    pub now: DateTime<Utc>,
}

pub async fn insert(
    conn: &mut AsyncPgConnection,
    g: InsertGeneration<'_>,
) -> Result<Generation, StoreError> {
    use generations::dsl as t;
    let metadata = serde_json::to_value(&g.new.metadata).expect("a string map serializes");
    diesel::insert_into(generations::table)
        .values((
            t::id.eq(g.id),
            t::tenant_id.eq(g.tenant_id.0),
            t::kind.eq(&g.new.kind),
            t::prompt.eq(&g.new.prompt),
            t::output_format.eq(&g.new.output_format),
            t::style.eq(&g.new.style),
            t::count.eq(g.new.count),
            t::project_id.eq(&g.new.project_id),
            t::metadata.eq(metadata),
            t::state.eq(State::Queued.as_str()),
            t::cost.eq(g.cost),
            t::created_by.eq(g.created_by),
            t::create_time.eq(g.now),
            t::update_time.eq(g.now),
        ))
        .returning(GenerationRow::as_returning())
        .get_result(conn)
        .await?
        .try_into()
}

/// The tenant's generation (`NotFound` for another tenant's id).
pub async fn get(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    id: Uuid,
) -> Result<Generation, StoreError> {
    generations::table
        .filter(generations::tenant_id.eq(tenant.0))
        .filter(generations::id.eq(id))
        .select(GenerationRow::as_select())
        .first(conn)
        .await?
        .try_into()
}

/// Like [`get`], row-locked until the transaction ends: state changes of one generation
/// apply one after another.
pub async fn get_for_update(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    id: Uuid,
) -> Result<Generation, StoreError> {
    generations::table
        .filter(generations::tenant_id.eq(tenant.0))
        .filter(generations::id.eq(id))
        .select(GenerationRow::as_select())
        .for_update()
        .first(conn)
        .await?
        .try_into()
}

/// What ListGenerations filters on.
#[derive(Debug, Default, Clone)]
pub struct GenerationFilter {
    pub state: Option<State>,
    pub project_id: Option<String>,
}

/// At most `limit` generations, newest first (UUIDv7 ids), older than `before`.
pub async fn list(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    filter: &GenerationFilter,
    before: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Generation>, StoreError> {
    let mut query = generations::table
        .filter(generations::tenant_id.eq(tenant.0))
        .select(GenerationRow::as_select())
        .order(generations::id.desc())
        .limit(limit)
        .into_boxed();
    if let Some(state) = filter.state {
        query = query.filter(generations::state.eq(state.as_str()));
    }
    if let Some(project) = &filter.project_id {
        query = query.filter(generations::project_id.eq(project.clone()));
    }
    if let Some(before) = before {
        query = query.filter(generations::id.lt(before));
    }
    query
        .load::<GenerationRow>(conn)
        .await?
        .into_iter()
        .map(Generation::try_from)
        .collect()
}

/// Moves a generation to CANCELLED, refunded (call it on the locked row, not terminal).
pub async fn cancel(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<Generation, StoreError> {
    use generations::dsl as t;
    diesel::update(generations::table)
        .filter(t::tenant_id.eq(tenant.0))
        .filter(t::id.eq(id))
        .set((
            t::state.eq(State::Cancelled.as_str()),
            t::refunded.eq(true),
            t::error_code.eq("CANCELLED"),
            t::error_message.eq("cancelled by the developer"),
            t::end_time.eq(now),
            t::update_time.eq(now),
        ))
        .returning(GenerationRow::as_returning())
        .get_result(conn)
        .await?
        .try_into()
}

/// The generation `id` of any tenant, with the sequence of its last applied update, row-locked
/// until the transaction ends; `None` for an unknown id. For the orchestrator's updates,
/// which name the tenant themselves: the caller compares it.
pub async fn lock(
    conn: &mut AsyncPgConnection,
    id: Uuid,
) -> Result<Option<(Generation, i64)>, StoreError> {
    let row: Option<(GenerationRow, i64)> = generations::table
        .filter(generations::id.eq(id))
        .select((GenerationRow::as_select(), generations::last_sequence))
        .for_update()
        .first(conn)
        .await
        .optional()?;
    row.map(|(row, sequence)| Generation::try_from(row).map(|g| (g, sequence)))
        .transpose()
}

/// Up to `limit` generations still queued or running that were created before `cutoff`,
/// oldest first, row-locked; rows another transaction holds are skipped (another worker's
/// sweep, or an update being applied), so sweepers never wait on each other.
pub async fn lock_timed_out(
    conn: &mut AsyncPgConnection,
    cutoff: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<(Generation, i64)>, StoreError> {
    // The predicate spelled as in generations_open_idx (constants, not binds), so the
    // planner can use that partial index.
    generations::table
        .filter(diesel::dsl::sql::<diesel::sql_types::Bool>(
            "state IN ('queued', 'running')",
        ))
        .filter(generations::create_time.lt(cutoff))
        .order(generations::create_time.asc())
        .limit(limit)
        .select((GenerationRow::as_select(), generations::last_sequence))
        .for_update()
        .skip_locked()
        .load::<(GenerationRow, i64)>(conn)
        .await?
        .into_iter()
        .map(|(row, sequence)| Generation::try_from(row).map(|g| (g, sequence)))
        .collect()
}

/// Every column a state change writes; the caller computes them from the locked row.
pub struct Change<'a> {
    pub state: State,
    pub progress: i32,
    pub last_sequence: i64,
    pub refunded: bool,
    pub asset_ids: &'a [String],
    pub result_urls: &'a [String],
    pub error_code: Option<&'a str>,
    pub error_message: Option<&'a str>,
    pub start_time: Option<DateTime<Utc>>,
    pub end_time: Option<DateTime<Utc>>,
    pub now: DateTime<Utc>,
}

/// Writes `change` to generation `id` (call it on the locked row).
pub async fn apply(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    change: &Change<'_>,
) -> Result<Generation, StoreError> {
    use generations::dsl as t;
    diesel::update(generations::table)
        .filter(t::id.eq(id))
        .set((
            t::state.eq(change.state.as_str()),
            t::progress.eq(change.progress),
            t::last_sequence.eq(change.last_sequence),
            t::refunded.eq(change.refunded),
            t::asset_ids.eq(change.asset_ids),
            t::result_urls.eq(change.result_urls),
            t::error_code.eq(change.error_code),
            t::error_message.eq(change.error_message),
            t::start_time.eq(change.start_time),
            t::end_time.eq(change.end_time),
            t::update_time.eq(change.now),
        ))
        .returning(GenerationRow::as_returning())
        .get_result(conn)
        .await?
        .try_into()
}
