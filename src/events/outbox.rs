//! The transactional outbox: an event is an `events` row plus an `outbox` row written in the
//! caller's transaction, so a state change and the event it causes commit together or not
//! at all. The [relay](super::relay) publishes committed outbox rows to RabbitMQ.

use chrono::{DateTime, Utc};
use diesel::{
    BoolExpressionMethods, ExpressionMethods, OptionalExtension, QueryDsl, Queryable,
    QueryableByName, Selectable, SelectableHelper,
    sql_types::{Jsonb, Nullable, Text, Uuid as SqlUuid},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    db::{StoreError, schema::events},
    identity::TenantId,
    tenants,
};

/// What a publisher (PublishEvent, or devgate itself) asks to emit.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub tenant: TenantId,
    pub event_type: String,
    pub payload: serde_json::Value,
    /// The publisher's key: a repeat returns the first event instead of a new one.
    pub idempotency_id: Option<String>,
    /// Who emitted it: `service:<caller>` or `devgate`.
    pub source: String,
    /// A test event (SendTestEvent): delivered to this endpoint only, whatever it subscribes to.
    pub endpoint_id: Option<Uuid>,
}

/// An event of the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: Uuid,
    pub tenant: TenantId,
    pub event_type: String,
    pub payload: serde_json::Value,
    pub idempotency_id: Option<String>,
    pub source: String,
    pub create_time: DateTime<Utc>,
    /// Set for a test event: its only recipient.
    pub endpoint_id: Option<Uuid>,
}

/// An `events` row as diesel reads it.
#[derive(Queryable, QueryableByName, Selectable)]
#[diesel(table_name = events, check_for_backend(diesel::pg::Pg))]
pub(crate) struct EventRow {
    id: Uuid,
    tenant_id: Uuid,
    event_type: String,
    payload: serde_json::Value,
    idempotency_id: Option<String>,
    source: String,
    create_time: DateTime<Utc>,
    endpoint_id: Option<Uuid>,
}

impl From<EventRow> for Event {
    fn from(row: EventRow) -> Self {
        Event {
            id: row.id,
            tenant: TenantId(row.tenant_id),
            event_type: row.event_type,
            payload: row.payload,
            idempotency_id: row.idempotency_id,
            source: row.source,
            create_time: row.create_time,
            endpoint_id: row.endpoint_id,
        }
    }
}

impl Event {
    /// The body published to RabbitMQ.
    pub fn message(&self) -> EventMessage {
        EventMessage {
            id: self.id,
            tenant_id: self.tenant.0,
            event_type: self.event_type.clone(),
            source: self.source.clone(),
            idempotency_id: self.idempotency_id.clone(),
            create_time: self.create_time,
            data: self.payload.clone(),
            endpoint_id: self.endpoint_id,
        }
    }
}

/// The JSON body of every message on `<prefix>.events` (content type `application/json`,
/// AMQP `message_id` = `id`, routing key = `type`). Consumers deduplicate by `id`: the relay
/// publishes at least once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventMessage {
    pub id: Uuid,
    pub tenant_id: Uuid,
    #[serde(rename = "type")]
    pub event_type: String,
    pub source: String,
    pub idempotency_id: Option<String>,
    pub create_time: DateTime<Utc>,
    pub data: serde_json::Value,
    /// Only on test events (SendTestEvent): the one endpoint it is for. Internal consumers
    /// may skip such events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_id: Option<Uuid>,
}

/// Inserts the event and its outbox row on `conn` — call it inside the transaction of the
/// state change that causes the event. Returns the event and whether it is a duplicate: a
/// repeat of `(tenant, idempotency_id)` inserts nothing and returns the first event (also
/// under concurrent repeats: the unique index makes the second wait for the first's commit).
pub async fn append(
    conn: &mut AsyncPgConnection,
    new: NewEvent,
) -> Result<(Event, bool), StoreError> {
    tenants::store::ensure(conn, new.tenant).await?;
    // One statement: the event and its outbox row are atomic even without a transaction.
    let inserted: Option<EventRow> = diesel::sql_query(
        "WITH ins AS ( \
             INSERT INTO events (id, tenant_id, event_type, payload, idempotency_id, source, \
                                 endpoint_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (tenant_id, idempotency_id) DO NOTHING \
             RETURNING * \
         ), queued AS ( \
             INSERT INTO outbox (event_id) SELECT id FROM ins \
         ) \
         SELECT * FROM ins",
    )
    .bind::<SqlUuid, _>(Uuid::now_v7())
    .bind::<SqlUuid, _>(new.tenant.0)
    .bind::<Text, _>(&new.event_type)
    .bind::<Jsonb, _>(&new.payload)
    .bind::<Nullable<Text>, _>(new.idempotency_id.as_deref())
    .bind::<Text, _>(&new.source)
    .bind::<Nullable<SqlUuid>, _>(new.endpoint_id)
    .get_result(conn)
    .await
    .optional()?;
    if let Some(event) = inserted {
        return Ok((event.into(), false));
    }
    // Only a conflict inserts nothing, and only a key can conflict.
    let key = new
        .idempotency_id
        .as_deref()
        .ok_or_else(|| StoreError::Conflict("events_pkey".into()))?;
    let first = events::table
        .filter(events::tenant_id.eq(new.tenant.0))
        .filter(events::idempotency_id.eq(key))
        .select(EventRow::as_select())
        .first(conn)
        .await?;
    Ok((first.into(), true))
}

/// [`append`] for many events at once, for [`crate::db::group::GroupCommit`]: PublishEvent
/// calls that arrive together share one statement and one commit (and the outbox trigger's
/// one `NOTIFY`), each caller still getting its own event and duplicate flag.
pub struct Append(pub NewEvent);

/// The events of one batch, one array per column, unnested into rows (so a batch binds
/// seven parameters whatever its size). Tenants are created on first use like [`append`]
/// does (`tenants::store::ensure`); a data-modifying CTE's rows are visible to the foreign
/// keys of its siblings.
const APPEND_MANY: &str = "WITH input AS ( \
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::jsonb[], $5::text[], \
                              $6::text[], $7::uuid[]) \
             AS u(id, tenant_id, event_type, payload, idempotency_id, source, endpoint_id) \
     ), new_tenants AS ( \
         INSERT INTO tenants (id) SELECT DISTINCT tenant_id FROM input ON CONFLICT DO NOTHING \
     ), ins AS ( \
         INSERT INTO events (id, tenant_id, event_type, payload, idempotency_id, source, \
                             endpoint_id) \
         SELECT * FROM input \
         ON CONFLICT (tenant_id, idempotency_id) DO NOTHING \
         RETURNING * \
     ), queued AS ( \
         INSERT INTO outbox (event_id) SELECT id FROM ins ORDER BY id \
     ) \
     SELECT * FROM ins";

impl crate::db::group::GroupWrite for Append {
    type Output = (Event, bool);
    const NAME: &'static str = "the event appender";
    /// Enough to carry thousands of events per second on a few hundred commits.
    const MAX_BATCH: usize = 500;

    async fn write(
        conn: &mut AsyncPgConnection,
        writes: &[Self],
    ) -> Result<Vec<(Event, bool)>, StoreError> {
        use diesel::sql_types::Array;
        // Keyed rows in key order, so two batches meeting on the same keys wait on each
        // other in one order instead of deadlocking.
        let mut order: Vec<usize> = (0..writes.len()).collect();
        order.sort_by(|&a, &b| {
            let (a, b) = (&writes[a].0, &writes[b].0);
            (a.tenant.0, &a.idempotency_id).cmp(&(b.tenant.0, &b.idempotency_id))
        });
        let ids: Vec<Uuid> = writes.iter().map(|_| Uuid::now_v7()).collect();
        let column = |f: &dyn Fn(usize) -> Uuid| order.iter().map(|&i| f(i)).collect::<Vec<_>>();
        let rows: Vec<EventRow> = diesel::sql_query(APPEND_MANY)
            .bind::<Array<SqlUuid>, _>(column(&|i| ids[i]))
            .bind::<Array<SqlUuid>, _>(column(&|i| writes[i].0.tenant.0))
            .bind::<Array<Text>, _>(
                order
                    .iter()
                    .map(|&i| writes[i].0.event_type.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind::<Array<Jsonb>, _>(
                order
                    .iter()
                    .map(|&i| &writes[i].0.payload)
                    .collect::<Vec<_>>(),
            )
            .bind::<Array<Nullable<Text>>, _>(
                order
                    .iter()
                    .map(|&i| writes[i].0.idempotency_id.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind::<Array<Text>, _>(
                order
                    .iter()
                    .map(|&i| writes[i].0.source.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind::<Array<Nullable<SqlUuid>>, _>(
                order
                    .iter()
                    .map(|&i| writes[i].0.endpoint_id)
                    .collect::<Vec<_>>(),
            )
            .load(conn)
            .await?;
        let mut inserted: std::collections::HashMap<Uuid, Event> = rows
            .into_iter()
            .map(|row| (row.id, Event::from(row)))
            .collect();
        let mut out = Vec::with_capacity(writes.len());
        for (write, id) in writes.iter().zip(&ids) {
            let answer = match inserted.remove(id) {
                Some(event) => (event, false),
                // Only a key conflicts: the first event with it (committed before this
                // statement ended, or inserted by this very batch).
                None => {
                    let key = write
                        .0
                        .idempotency_id
                        .as_deref()
                        .ok_or_else(|| StoreError::Conflict("events_pkey".into()))?;
                    let first = events::table
                        .filter(events::tenant_id.eq(write.0.tenant.0))
                        .filter(events::idempotency_id.eq(key))
                        .select(EventRow::as_select())
                        .first(conn)
                        .await?;
                    (first.into(), true)
                }
            };
            out.push(answer);
        }
        Ok(out)
    }
}

/// A message for another exchange than the events one, published by the relay once the
/// transaction that queued it commits (e.g. a generation job for the AI orchestrator).
#[derive(Debug, Clone)]
pub struct OutboxMessage<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub body: &'a [u8],
    pub content_type: &'a str,
    /// The AMQP `type` property, e.g. the protobuf message's full name.
    pub message_type: Option<&'a str>,
    /// The AMQP `message_id`: consumers deduplicate by it.
    pub message_id: &'a str,
}

/// Queues `message` on `conn` — call it inside the transaction of the change that causes it.
pub async fn enqueue(
    conn: &mut AsyncPgConnection,
    message: &OutboxMessage<'_>,
) -> Result<(), StoreError> {
    use crate::db::schema::outbox::dsl as o;
    diesel::insert_into(o::outbox)
        .values((
            o::exchange.eq(message.exchange),
            o::routing_key.eq(message.routing_key),
            o::body.eq(message.body),
            o::content_type.eq(message.content_type),
            o::message_type.eq(message.message_type),
            o::message_id.eq(message.message_id),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

/// One event of the tenant (`NotFound` for another tenant's id).
pub async fn get(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    id: Uuid,
) -> Result<Event, StoreError> {
    let row = events::table
        .filter(events::tenant_id.eq(tenant.0))
        .filter(events::id.eq(id))
        .select(EventRow::as_select())
        .first::<EventRow>(conn)
        .await?;
    Ok(row.into())
}

/// Which events of a tenant a listing returns.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub event_type: Option<String>,
    /// Inclusive.
    pub start_time: Option<DateTime<Utc>>,
    /// Exclusive.
    pub end_time: Option<DateTime<Utc>>,
}

/// A position in the log: events strictly older than (create_time, id) come next.
pub type Position = (DateTime<Utc>, Uuid);

/// At most `limit` events of the tenant, newest first, strictly older than `before`
/// (keyset on `(create_time, id)`, served by `events_tenant_time_idx`).
pub async fn list(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    filter: &EventFilter,
    before: Option<Position>,
    limit: i64,
) -> Result<Vec<Event>, StoreError> {
    let mut query = events::table
        .filter(events::tenant_id.eq(tenant.0))
        .into_boxed();
    if let Some(t) = &filter.event_type {
        query = query.filter(events::event_type.eq(t.clone()));
    }
    if let Some(start) = filter.start_time {
        query = query.filter(events::create_time.ge(start));
    }
    if let Some(end) = filter.end_time {
        query = query.filter(events::create_time.lt(end));
    }
    if let Some((time, id)) = before {
        query = query.filter(
            events::create_time
                .lt(time)
                .or(events::create_time.eq(time).and(events::id.lt(id))),
        );
    }
    let rows: Vec<EventRow> = query
        .order((events::create_time.desc(), events::id.desc()))
        .limit(limit)
        .select(EventRow::as_select())
        .load(conn)
        .await?;
    Ok(rows.into_iter().map(Event::from).collect())
}

/// Rows still waiting in the outbox (for metrics and tests).
pub async fn pending(conn: &mut AsyncPgConnection) -> Result<i64, StoreError> {
    use crate::db::schema::outbox;
    Ok(outbox::table.count().get_result(conn).await?)
}
