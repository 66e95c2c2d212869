//! The request log in Postgres: the batch INSERT used by the writer, and the usage queries.
//! Every query filters by tenant; time ranges are `[from, to)`.

use chrono::{DateTime, Duration as TimeDelta, Utc};
use diesel::{
    prelude::*,
    sql_types::{
        Array, BigInt, Double, Inet, Integer, Nullable, SmallInt, Text, Timestamptz,
        Uuid as SqlUuid,
    },
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use ipnetwork::IpNetwork;
use uuid::Uuid;

use super::model::{BreakdownRow, GroupBy, LogFilter, RequestRecord, StatusClasses, UsageSummary};
use crate::{
    db::{StoreError, schema::api_request_logs},
    identity::TenantId,
};

/// The writer's INSERT: one array per column, unnested into rows, so a batch binds 18
/// parameters whatever its size (diesel's multi-row VALUES binds 18 per row: 9 000 for 500
/// rows, each serialized, sent and parsed on its own). A row already stored (a retry after
/// a commit whose acknowledgement was lost) is skipped.
const INSERT_SQL: &str = "INSERT INTO api_request_logs (id, time, tenant_id, api_key_id, \
     user_id, rpc, http_method, http_path, grpc_code, http_status, error_code, latency_us, \
     request_bytes, response_bytes, client_ip, user_agent, cost, service_caller) \
     SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::uuid[], $4::text[], $5::text[], \
     $6::text[], $7::text[], $8::text[], $9::int2[], $10::int2[], $11::text[], $12::int4[], \
     $13::int4[], $14::int4[], $15::inet[], $16::text[], $17::int8[], $18::text[]) \
     ON CONFLICT DO NOTHING";

/// A batch of records as one array per column (borrowing their text).
#[derive(Default)]
struct Columns<'a> {
    id: Vec<Uuid>,
    time: Vec<DateTime<Utc>>,
    tenant_id: Vec<Uuid>,
    api_key_id: Vec<Option<&'a str>>,
    user_id: Vec<Option<&'a str>>,
    rpc: Vec<&'a str>,
    http_method: Vec<Option<&'a str>>,
    http_path: Vec<Option<&'a str>>,
    grpc_code: Vec<i16>,
    http_status: Vec<i16>,
    error_code: Vec<Option<&'a str>>,
    latency_us: Vec<i32>,
    request_bytes: Vec<i32>,
    response_bytes: Vec<i32>,
    client_ip: Vec<Option<IpNetwork>>,
    user_agent: Vec<Option<&'a str>>,
    cost: Vec<i64>,
    service_caller: Vec<Option<&'a str>>,
}

impl<'a> Columns<'a> {
    fn push(&mut self, r: &'a RequestRecord) {
        self.id.push(r.id);
        self.time.push(r.time);
        self.tenant_id.push(r.tenant_id.0);
        self.api_key_id.push(r.api_key_id.as_deref());
        self.user_id.push(r.user_id.as_deref());
        self.rpc.push(&r.rpc);
        self.http_method.push(r.http_method.as_deref());
        self.http_path.push(r.http_path.as_deref());
        self.grpc_code.push(r.grpc_code);
        self.http_status.push(r.http_status);
        self.error_code.push(r.error_code.as_deref());
        self.latency_us.push(r.latency_us);
        self.request_bytes.push(r.request_bytes);
        self.response_bytes.push(r.response_bytes);
        self.client_ip.push(r.client_ip.map(IpNetwork::from));
        self.user_agent.push(r.user_agent.as_deref());
        self.cost.push(r.cost);
        self.service_caller.push(r.service_caller.as_deref());
    }
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = api_request_logs, check_for_backend(diesel::pg::Pg))]
struct RequestRow {
    id: Uuid,
    time: DateTime<Utc>,
    tenant_id: Uuid,
    api_key_id: Option<String>,
    user_id: Option<String>,
    rpc: String,
    http_method: Option<String>,
    http_path: Option<String>,
    grpc_code: i16,
    http_status: i16,
    error_code: Option<String>,
    latency_us: i32,
    request_bytes: i32,
    response_bytes: i32,
    client_ip: Option<IpNetwork>,
    user_agent: Option<String>,
    cost: i64,
    service_caller: Option<String>,
}

impl From<RequestRow> for RequestRecord {
    fn from(r: RequestRow) -> Self {
        RequestRecord {
            id: r.id,
            time: r.time,
            tenant_id: TenantId(r.tenant_id),
            api_key_id: r.api_key_id,
            user_id: r.user_id,
            rpc: r.rpc,
            http_method: r.http_method,
            http_path: r.http_path,
            grpc_code: r.grpc_code,
            http_status: r.http_status,
            error_code: r.error_code,
            latency_us: r.latency_us,
            request_bytes: r.request_bytes,
            response_bytes: r.response_bytes,
            client_ip: r.client_ip.map(|n| n.ip()),
            user_agent: r.user_agent,
            cost: r.cost,
            service_caller: r.service_caller,
        }
    }
}

/// One INSERT of `records` ([`INSERT_SQL`]); rows already stored are skipped, so retries
/// are idempotent. Returns the rows inserted.
pub(crate) async fn insert_rows<'a>(
    conn: &mut AsyncPgConnection,
    records: impl Iterator<Item = &'a RequestRecord>,
) -> Result<usize, StoreError> {
    let mut c = Columns::default();
    for r in records {
        c.push(r);
    }
    if c.id.is_empty() {
        return Ok(0);
    }
    let inserted = diesel::sql_query(INSERT_SQL)
        .bind::<Array<SqlUuid>, _>(c.id)
        .bind::<Array<Timestamptz>, _>(c.time)
        .bind::<Array<SqlUuid>, _>(c.tenant_id)
        .bind::<Array<Nullable<Text>>, _>(c.api_key_id)
        .bind::<Array<Nullable<Text>>, _>(c.user_id)
        .bind::<Array<Text>, _>(c.rpc)
        .bind::<Array<Nullable<Text>>, _>(c.http_method)
        .bind::<Array<Nullable<Text>>, _>(c.http_path)
        .bind::<Array<SmallInt>, _>(c.grpc_code)
        .bind::<Array<SmallInt>, _>(c.http_status)
        .bind::<Array<Nullable<Text>>, _>(c.error_code)
        .bind::<Array<Integer>, _>(c.latency_us)
        .bind::<Array<Integer>, _>(c.request_bytes)
        .bind::<Array<Integer>, _>(c.response_bytes)
        .bind::<Array<Nullable<Inet>>, _>(c.client_ip)
        .bind::<Array<Nullable<Text>>, _>(c.user_agent)
        .bind::<Array<BigInt>, _>(c.cost)
        .bind::<Array<Nullable<Text>>, _>(c.service_caller)
        .execute(conn)
        .await?;
    Ok(inserted)
}

#[derive(QueryableByName)]
struct SummarySqlRow {
    #[diesel(sql_type = BigInt)]
    requests: i64,
    #[diesel(sql_type = BigInt)]
    errors: i64,
    #[diesel(sql_type = BigInt)]
    cost_total: i64,
    #[diesel(sql_type = BigInt)]
    status_2xx: i64,
    #[diesel(sql_type = BigInt)]
    status_4xx: i64,
    #[diesel(sql_type = BigInt)]
    status_5xx: i64,
    #[diesel(sql_type = Nullable<Double>)]
    latency_p50_us: Option<f64>,
    #[diesel(sql_type = Nullable<Double>)]
    latency_p99_us: Option<f64>,
}

#[derive(QueryableByName)]
struct BreakdownSqlRow {
    #[diesel(sql_type = Text)]
    key: String,
    #[diesel(sql_type = BigInt)]
    requests: i64,
    #[diesel(sql_type = BigInt)]
    errors: i64,
    #[diesel(sql_type = BigInt)]
    cost: i64,
}

const SUMMARY_SQL: &str = r#"
SELECT count(*) AS requests,
       count(*) FILTER (WHERE grpc_code <> 0) AS errors,
       coalesce(sum(cost), 0)::int8 AS cost_total,
       count(*) FILTER (WHERE http_status BETWEEN 200 AND 299) AS status_2xx,
       count(*) FILTER (WHERE http_status BETWEEN 400 AND 499) AS status_4xx,
       count(*) FILTER (WHERE http_status BETWEEN 500 AND 599) AS status_5xx,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_us) AS latency_p50_us,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_us) AS latency_p99_us
FROM api_request_logs
WHERE tenant_id = $1 AND "time" >= $2 AND "time" < $3
"#;

/// The breakdown key as SQL; byte-ordered (COLLATE "C") so that SQL's order and keyset
/// comparisons match Rust's `String` order. Time buckets format as RFC 3339 in UTC.
fn key_sql(group_by: GroupBy) -> &'static str {
    match group_by {
        GroupBy::ApiKey => r#"coalesce(api_key_id, '') COLLATE "C""#,
        GroupBy::Endpoint => r#"rpc COLLATE "C""#,
        GroupBy::Day => {
            r#"to_char(date_trunc('day', "time" AT TIME ZONE 'UTC'), 'YYYY-MM-DD"T"HH24:MI:SS"Z"') COLLATE "C""#
        }
        GroupBy::Hour => {
            r#"to_char(date_trunc('hour', "time" AT TIME ZONE 'UTC'), 'YYYY-MM-DD"T"HH24:MI:SS"Z"') COLLATE "C""#
        }
    }
}

/// Writes `records` now, in INSERTs of at most [`super::log::MAX_BATCH_SIZE`] rows,
/// bypassing the channel (backfills, tests). Rows already stored are skipped. Returns
/// the rows inserted.
pub async fn insert(
    conn: &mut AsyncPgConnection,
    records: &[RequestRecord],
) -> Result<usize, StoreError> {
    let mut inserted = 0;
    for chunk in records.chunks(super::log::MAX_BATCH_SIZE) {
        inserted += insert_rows(conn, chunk.iter()).await?;
    }
    Ok(inserted)
}

/// Totals of the tenant's calls in `[from, to)`.
pub async fn summary(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<UsageSummary, StoreError> {
    let row: SummarySqlRow = diesel::sql_query(SUMMARY_SQL)
        .bind::<SqlUuid, _>(tenant.0)
        .bind::<Timestamptz, _>(from)
        .bind::<Timestamptz, _>(to)
        .get_result(conn)
        .await?;
    Ok(UsageSummary {
        requests: row.requests,
        errors: row.errors,
        cost_total: row.cost_total,
        by_status_class: StatusClasses {
            status_2xx: row.status_2xx,
            status_4xx: row.status_4xx,
            status_5xx: row.status_5xx,
        },
        latency_p50_us: row.latency_p50_us,
        latency_p99_us: row.latency_p99_us,
    })
}

/// The tenant's calls in `[from, to)` grouped by `group_by`, ordered by key (byte
/// order), at most `limit` groups with a key greater than `after` (the last key of
/// the previous page).
pub async fn breakdown(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    group_by: GroupBy,
    limit: i64,
    after: Option<&str>,
) -> Result<Vec<BreakdownRow>, StoreError> {
    // For time buckets the cursor also narrows the scanned range (partition pruning).
    let bucket = match group_by {
        GroupBy::Day => Some(TimeDelta::days(1)),
        GroupBy::Hour => Some(TimeDelta::hours(1)),
        GroupBy::ApiKey | GroupBy::Endpoint => None,
    };
    let from = match (bucket, after) {
        (Some(len), Some(after)) => DateTime::parse_from_rfc3339(after)
            .ok()
            .and_then(|t| t.with_timezone(&Utc).checked_add_signed(len))
            .map_or(from, |next| next.max(from)),
        _ => from,
    };
    let key = key_sql(group_by);
    let mut sql = format!(
        "SELECT key, count(*) AS requests, \
                count(*) FILTER (WHERE grpc_code <> 0) AS errors, \
                coalesce(sum(cost), 0)::int8 AS cost \
         FROM (SELECT {key} AS key, grpc_code, cost FROM api_request_logs \
               WHERE tenant_id = $1 AND \"time\" >= $2 AND \"time\" < $3) AS calls"
    );
    if after.is_some() {
        sql.push_str(" WHERE key > $5");
    }
    sql.push_str(" GROUP BY key ORDER BY key LIMIT $4");
    let mut query = diesel::sql_query(sql)
        .into_boxed()
        .bind::<SqlUuid, _>(tenant.0)
        .bind::<Timestamptz, _>(from)
        .bind::<Timestamptz, _>(to)
        .bind::<BigInt, _>(limit.max(0));
    if let Some(after) = after {
        query = query.bind::<Text, _>(after.to_string());
    }
    let rows: Vec<BreakdownSqlRow> = query.load(conn).await?;
    Ok(rows
        .into_iter()
        .map(|r| BreakdownRow {
            key: r.key,
            requests: r.requests,
            errors: r.errors,
            cost: r.cost,
        })
        .collect())
}

/// The tenant's calls matching `filter`, newest first: at most `limit` of them older
/// than `before` (the (time, id) of the last record of the previous page).
pub async fn list(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    filter: &LogFilter,
    limit: i64,
    before: Option<(DateTime<Utc>, Uuid)>,
) -> Result<Vec<RequestRecord>, StoreError> {
    use api_request_logs as t;
    let mut query = t::table.filter(t::tenant_id.eq(tenant.0)).into_boxed();
    if let Some(key) = &filter.api_key_id {
        query = query.filter(t::api_key_id.eq(key));
    }
    if let Some(code) = filter.grpc_code {
        query = query.filter(t::grpc_code.eq(code));
    }
    if let Some(rpc) = &filter.rpc {
        query = query.filter(t::rpc.eq(rpc));
    }
    if let Some(from) = filter.from {
        query = query.filter(t::time.ge(from));
    }
    if let Some(to) = filter.to {
        query = query.filter(t::time.lt(to));
    }
    if let Some((time, id)) = before {
        // `time <= $t` bounds the index scan; the OR breaks ties on the id.
        query = query
            .filter(t::time.le(time))
            .filter(t::time.lt(time).or(t::id.lt(id)));
    }
    let rows: Vec<RequestRow> = query
        .order((t::time.desc(), t::id.desc()))
        .limit(limit.max(0))
        .select(RequestRow::as_select())
        .load(conn)
        .await?;
    Ok(rows.into_iter().map(RequestRecord::from).collect())
}

#[derive(diesel::QueryableByName)]
struct TenantCount {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    tenant_id: Uuid,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    requests: i64,
}

/// API-key calls per tenant since `from` that counted against the monthly quota
/// (refusals by the limiter itself, RESOURCE_EXHAUSTED, did not).
pub async fn key_requests_per_tenant(
    conn: &mut AsyncPgConnection,
    from: DateTime<Utc>,
) -> Result<Vec<(TenantId, i64)>, StoreError> {
    let rows: Vec<TenantCount> = diesel::sql_query(
        "SELECT tenant_id, count(*) AS requests FROM api_request_logs \
         WHERE time >= $1 AND api_key_id IS NOT NULL AND grpc_code <> 8 GROUP BY tenant_id",
    )
    .bind::<Timestamptz, _>(from)
    .load(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (TenantId(r.tenant_id), r.requests))
        .collect())
}

#[derive(diesel::QueryableByName)]
struct MeteredTotal {
    #[diesel(sql_type = diesel::sql_types::Text)]
    metric: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    quantity: i64,
}

/// One RecordUsage call.
pub struct MeteredRecord<'a> {
    pub tenant: TenantId,
    pub api_key_id: Option<&'a str>,
    pub metric: &'a str,
    pub quantity: i64,
    pub idempotency_id: &'a str,
    pub time: DateTime<Utc>,
    /// The internal caller that recorded it (`service:<name>`).
    pub recorded_by: &'a str,
}

/// Stores metered usage once per (tenant, idempotency id); false for a repeat.
pub async fn record_metered(
    conn: &mut AsyncPgConnection,
    r: &MeteredRecord<'_>,
) -> Result<bool, StoreError> {
    use crate::db::schema::metered_usage as m;
    let inserted = diesel::insert_into(m::table)
        .values((
            m::tenant_id.eq(r.tenant.0),
            m::idempotency_id.eq(r.idempotency_id),
            m::api_key_id.eq(r.api_key_id),
            m::metric.eq(r.metric),
            m::quantity.eq(r.quantity),
            m::time.eq(r.time),
            m::recorded_by.eq(r.recorded_by),
        ))
        .on_conflict_do_nothing()
        .execute(conn)
        .await?;
    Ok(inserted == 1)
}

/// Metered usage in `[from, to)`, summed per metric, by metric name.
pub async fn metered_totals(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<(String, i64)>, StoreError> {
    let rows: Vec<MeteredTotal> = diesel::sql_query(
        "SELECT metric, LEAST(SUM(quantity), 9223372036854775807)::bigint AS quantity FROM metered_usage \
         WHERE tenant_id = $1 AND time >= $2 AND time < $3 GROUP BY metric ORDER BY metric",
    )
    .bind::<SqlUuid, _>(tenant.0)
    .bind::<Timestamptz, _>(from)
    .bind::<Timestamptz, _>(to)
    .load(conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.metric, r.quantity)).collect())
}
