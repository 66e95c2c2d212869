//! The request log as a library: the batching writer (flush on size, interval and shutdown,
//! never waiting when full, bounded retries while Postgres is away), the usage queries
//! (summary, breakdown, listing) on a hand-made data set, and the monthly partitions.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use chrono::{DateTime, Datelike, Months, SecondsFormat, TimeZone, Utc};
use devgate::{
    db::PgPool,
    identity::TenantId,
    usage::{
        BreakdownRow, GroupBy, LogFilter, RequestLog, RequestRecord, StatusClasses, WriterStats,
        http_status_for,
        log::{maintain_partitions, rows_in_default_partition},
        store,
    },
};
use diesel::{
    QueryableByName,
    sql_types::{BigInt, Text},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::harness::{TestDb, proxy::Proxy, wait_until};

const LIST: &str = "/devgate.v1.ApiKeyService/ListApiKeys";
const CREATE: &str = "/devgate.v1.ApiKeyService/CreateApiKey";
const GET: &str = "/devgate.v1.ApiKeyService/GetApiKey";
const KEY_1: &str = "aaaaaaaaaaa1";
const KEY_2: &str = "bbbbbbbbbbb2";

fn pool_for(url: &str) -> PgPool {
    devgate::db::pool(
        &devgate::Config::from_lookup(|k| (k == "DEVGATE_DATABASE_URL").then(|| url.to_string()))
            .unwrap()
            .database,
    )
}

fn pool(db: &TestDb) -> PgPool {
    pool_for(db.url())
}

fn new_tenant() -> TenantId {
    TenantId(Uuid::new_v4())
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Name {
    #[diesel(sql_type = Text)]
    name: String,
}

async fn count(pool: &PgPool, where_sql: &str) -> i64 {
    let mut conn = pool.get().await.unwrap();
    let row: Count = diesel::sql_query(format!(
        "SELECT count(*) AS n FROM api_request_logs WHERE {where_sql}"
    ))
    .get_result(&mut conn)
    .await
    .unwrap();
    row.n
}

async fn rows_of(pool: &PgPool, tenant: TenantId) -> i64 {
    count(pool, &format!("tenant_id = '{tenant}'")).await
}

async fn names(pool: &PgPool, sql: &str) -> Vec<String> {
    let mut conn = pool.get().await.unwrap();
    let rows: Vec<Name> = diesel::sql_query(sql).load(&mut conn).await.unwrap();
    rows.into_iter().map(|r| r.name).collect()
}

/// The names of api_request_logs' partitions, sorted.
async fn partitions(pool: &PgPool) -> Vec<String> {
    names(
        pool,
        "SELECT c.relname::text AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'api_request_logs'::regclass ORDER BY 1",
    )
    .await
}

fn month_start(t: DateTime<Utc>) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0)
        .unwrap()
}

fn partition_name(month: DateTime<Utc>) -> String {
    format!("api_request_logs_{}", month.format("%Y_%m"))
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn record(
    tenant: TenantId,
    time: DateTime<Utc>,
    key: Option<&str>,
    rpc: &str,
    code: i16,
    latency_us: i32,
    cost: i64,
) -> RequestRecord {
    RequestRecord {
        api_key_id: key.map(str::to_string),
        latency_us,
        cost,
        request_bytes: 10,
        response_bytes: 20,
        ..RequestRecord::at(time, tenant, rpc, code)
    }
}

#[test]
fn http_status_follows_envoy() {
    let expected = [
        (0, 200),
        (1, 499),
        (2, 500),
        (3, 400),
        (4, 504),
        (5, 404),
        (6, 409),
        (7, 403),
        (8, 429),
        (9, 400),
        (10, 409),
        (11, 400),
        (12, 501),
        (13, 500),
        (14, 503),
        (15, 500),
        (16, 401),
        (17, 500),
        (-1, 500),
    ];
    for (code, status) in expected {
        assert_eq!(http_status_for(code), status, "grpc code {code}");
        assert_eq!(RequestRecord::http_status_for(code), status);
    }
    let r = RequestRecord::new(new_tenant(), LIST, 8);
    assert_eq!(r.http_status, 429);
    assert_eq!(r.id.get_version_num(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_batches_and_flushes_everything_on_shutdown() {
    const N: usize = 2_000;
    let db = TestDb::create().await;
    let pool = pool(&db);
    let tenant = new_tenant();
    let (log, writer) = RequestLog::new();
    let shutdown = CancellationToken::new();
    let task =
        tokio::spawn(writer.run(pool.clone(), Duration::from_secs(1), 500, shutdown.clone()));

    for i in 0..N {
        let mut r = RequestRecord::new(tenant, LIST, if i % 10 == 0 { 5 } else { 0 });
        r.api_key_id = Some(KEY_1.into());
        r.latency_us = i as i32;
        log.record(r);
    }
    // Stop at once: whatever the size trigger has not written yet goes out in the final
    // flush.
    shutdown.cancel();
    let stats: WriterStats = task.await.unwrap();

    assert_eq!(log.dropped(), 0);
    assert_eq!(stats.rows_written, N as u64);
    assert_eq!(stats.rows_dropped, 0);
    assert_eq!(
        rows_of(&pool, tenant).await,
        N as i64,
        "every record stored"
    );
    assert!(
        (N as u64 / 500..=N as u64 / 100).contains(&stats.batches_written),
        "rows go out in batches of up to 500: {} INSERTs for {N} rows",
        stats.batches_written
    );
    assert_eq!(log.batches_written(), stats.batches_written);
    assert_eq!(log.rows_written(), N as u64);
    // After shutdown the channel is closed: recording counts as dropped, never waits.
    log.record(RequestRecord::new(tenant, LIST, 0));
    assert_eq!(log.dropped(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_flushes_on_interval_and_stores_every_field() {
    let db = TestDb::create().await;
    let pool = pool(&db);
    let tenant = new_tenant();
    let (log, writer) = RequestLog::new();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(writer.run(
        pool.clone(),
        Duration::from_millis(100),
        500,
        shutdown.clone(),
    ));

    let time = Utc::now() - chrono::Duration::minutes(1);
    let time = DateTime::from_timestamp_micros(time.timestamp_micros()).unwrap();
    let full = RequestRecord {
        api_key_id: Some(KEY_1.into()),
        user_id: Some("user-1".into()),
        http_method: Some("GET".into()),
        http_path: Some("/v1/apiKeys?page_size=2".into()),
        error_code: Some("API_KEY_NOT_FOUND".into()),
        latency_us: 1234,
        request_bytes: 56,
        response_bytes: 789,
        client_ip: Some(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7))),
        user_agent: Some("curl/8.5.0".into()),
        cost: 42,
        ..RequestRecord::at(time, tenant, GET, 5)
    };
    log.record(full.clone());
    // Postgres text cannot hold NUL: the writer replaces it rather than fail the batch.
    let nul = RequestRecord {
        user_agent: Some("evil\0agent".into()),
        ..RequestRecord::at(time - chrono::Duration::seconds(1), tenant, LIST, 0)
    };
    log.record(nul.clone());

    // Far below the batch size: the interval writes them, without a shutdown.
    wait_until(Duration::from_secs(10), || async {
        rows_of(&pool, tenant).await == 2
    })
    .await;
    let mut conn = pool.clone().get_owned().await.unwrap();
    let listed = store::list(&mut conn, tenant, &LogFilter::default(), 10, None)
        .await
        .unwrap();
    assert_eq!(listed[0], full, "every field round-trips");
    assert_eq!(listed[0].http_status, 404);
    assert_eq!(listed[1].user_agent.as_deref(), Some("evil\u{FFFD}agent"));

    shutdown.cancel();
    let stats = task.await.unwrap();
    assert_eq!(stats.rows_written, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_channel_drops_without_waiting() {
    let db = TestDb::create().await;
    let pool = pool(&db);
    let tenant = new_tenant();
    let (log, writer) = RequestLog::with_capacity(4);

    // No writer is running: the channel fills after 4 records.
    let started = Instant::now();
    for _ in 0..1_000 {
        log.record(RequestRecord::new(tenant, LIST, 0));
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_millis(200),
        "recording never waits ({elapsed:?})"
    );
    assert_eq!(log.dropped(), 996);
    assert_eq!(log.queued(), 4);

    // A writer started (and stopped) later still writes what was queued.
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    let stats = writer
        .run(pool.clone(), Duration::from_secs(1), 500, shutdown)
        .await;
    assert_eq!(stats.rows_written, 4);
    assert_eq!(rows_of(&pool, tenant).await, 4);
    assert_eq!(log.dropped(), 996);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_a_deep_queue_in_full_batches() {
    const N: usize = 20_000;
    let db = TestDb::create().await;
    let pool = pool(&db);
    let tenant = new_tenant();
    let (log, writer) = RequestLog::new();
    // Far more queued than the writer keeps while Postgres is away (10 × 500): with
    // Postgres up, none of it may be dropped.
    for _ in 0..N {
        log.record(RequestRecord::new(tenant, LIST, 0));
    }
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    let stats = writer
        .run(pool.clone(), Duration::from_secs(1), 500, shutdown)
        .await;
    assert_eq!(
        stats,
        WriterStats {
            batches_written: (N / 500) as u64,
            rows_written: N as u64,
            rows_dropped: 0,
        }
    );
    assert_eq!(log.dropped(), 0);
    assert_eq!(rows_of(&pool, tenant).await, N as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_insert_takes_more_rows_than_bind_parameters_allow_and_retries_store_once() {
    // 5 000 rows × 18 columns would be 90 000 bind parameters as a multi-row VALUES
    // (Postgres takes 65 535); as one array per column it is one statement of 18.
    const N: usize = 5_000;
    let db = TestDb::create().await;
    let pool = pool(&db);
    let tenant = new_tenant();
    let (log, writer) = RequestLog::new();
    let mut records = Vec::with_capacity(N);
    for i in 0..N {
        let mut r = RequestRecord::new(tenant, LIST, 0);
        // NULL and non-NULL in one array.
        r.api_key_id = (i % 2 == 0).then(|| KEY_1.to_string());
        r.client_ip = (i % 3 == 0).then_some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)));
        records.push(r.clone());
        log.record(r);
    }
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    let stats = writer
        .run(pool.clone(), Duration::from_secs(1), N, shutdown)
        .await;
    assert_eq!(
        stats,
        WriterStats {
            batches_written: 1,
            rows_written: N as u64,
            rows_dropped: 0,
        }
    );
    assert_eq!(rows_of(&pool, tenant).await, N as i64);
    assert_eq!(
        count(
            &pool,
            &format!("tenant_id = '{tenant}' AND api_key_id IS NULL AND client_ip IS NOT NULL")
        )
        .await,
        (0..N).filter(|i| i % 2 == 1 && i % 3 == 0).count() as i64
    );

    // A retry of rows already stored (a commit whose acknowledgement was lost) adds nothing.
    let mut conn = pool.clone().get_owned().await.unwrap();
    assert_eq!(store::insert(&mut conn, &records).await.unwrap(), 0);
    assert_eq!(rows_of(&pool, tenant).await, N as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_keeps_the_newest_rows_and_writes_them_when_postgres_returns() {
    let db = TestDb::create().await;
    let direct = pool(&db);
    let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let proxied_url = db.url().replace("127.0.0.1:5432", &proxy.addr.to_string());
    let proxied = devgate::db::pool(
        &devgate::Config::from_lookup(|k| match k {
            "DEVGATE_DATABASE_URL" => Some(proxied_url.clone()),
            "DEVGATE_DATABASE_CONNECT_TIMEOUT" => Some("300ms".into()),
            _ => None,
        })
        .unwrap()
        .database,
    );
    let tenant = new_tenant();
    let (log, writer) = RequestLog::with_capacity(10_000);
    let shutdown = CancellationToken::new();
    // batch_size 10: at most 100 rows wait while Postgres is away.
    let task = tokio::spawn(writer.run(proxied, Duration::from_millis(50), 10, shutdown.clone()));

    for _ in 0..5 {
        log.record(RequestRecord::new(tenant, LIST, 0));
    }
    wait_until(Duration::from_secs(10), || async {
        rows_of(&direct, tenant).await == 5
    })
    .await;

    proxy.cut();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut recorded = Vec::new();
    for i in 0..150 {
        let mut r = RequestRecord::new(tenant, CREATE, 0);
        r.latency_us = i;
        recorded.push(r.id);
        log.record(r);
    }
    // 150 buffered, 100 kept: the 50 oldest are dropped and counted.
    wait_until(Duration::from_secs(10), || async { log.dropped() == 50 }).await;
    assert_eq!(
        rows_of(&direct, tenant).await,
        5,
        "nothing written while cut"
    );

    proxy.restore();
    wait_until(Duration::from_secs(30), || async {
        rows_of(&direct, tenant).await == 105
    })
    .await;
    let kept: HashSet<String> = names(
        &direct,
        &format!(
            "SELECT id::text AS name FROM api_request_logs \
             WHERE tenant_id = '{tenant}' AND rpc = '{CREATE}'"
        ),
    )
    .await
    .into_iter()
    .collect();
    let newest: HashSet<String> = recorded[50..].iter().map(Uuid::to_string).collect();
    assert_eq!(kept, newest, "the newest 100 survive the outage");

    shutdown.cancel();
    let stats = task.await.unwrap();
    assert_eq!(stats.rows_written, 105);
    assert_eq!(stats.rows_dropped, 50);
    assert_eq!(log.dropped(), 50);
}

/// Tenant A's hand-made data set over the previous and the current month, with two keys
/// and user (keyless) calls; tenant B has one call with the same key id.
struct DataSet {
    a: TenantId,
    b: TenantId,
    prev: DateTime<Utc>,
    cur: DateTime<Utc>,
    end: DateTime<Utc>,
}

async fn load_data_set(conn: &mut AsyncPgConnection) -> DataSet {
    let cur = month_start(Utc::now());
    let prev = cur - Months::new(1);
    let end = cur + Months::new(1);
    let at = |base: DateTime<Utc>, day: i64, h: i64, m: i64, s: i64| {
        base + chrono::Duration::days(day)
            + chrono::Duration::hours(h)
            + chrono::Duration::minutes(m)
            + chrono::Duration::seconds(s)
    };
    let (a, b) = (new_tenant(), new_tenant());
    let rows = vec![
        // previous month
        record(a, at(prev, 2, 10, 15, 0), Some(KEY_1), LIST, 0, 100, 1),
        record(a, at(prev, 2, 10, 45, 0), Some(KEY_1), CREATE, 3, 200, 0),
        record(a, at(prev, 2, 11, 5, 0), Some(KEY_2), LIST, 0, 300, 2),
        record(a, at(prev, 5, 8, 0, 0), Some(KEY_2), LIST, 14, 400, 0),
        record(a, at(prev, 5, 8, 30, 0), None, CREATE, 0, 500, 5),
        // current month
        record(a, at(cur, 0, 0, 0, 0), Some(KEY_1), LIST, 0, 600, 3),
        record(a, at(cur, 0, 23, 59, 59), Some(KEY_1), CREATE, 8, 700, 0),
        record(a, at(cur, 1, 12, 0, 0), Some(KEY_2), GET, 13, 800, 10),
        // tenant B
        record(b, at(prev, 2, 10, 20, 0), Some(KEY_1), LIST, 7, 9_000, 100),
    ];
    assert_eq!(store::insert(&mut *conn, &rows).await.unwrap(), rows.len());
    DataSet {
        a,
        b,
        prev,
        cur,
        end,
    }
}

fn row(key: &str, requests: i64, errors: i64, cost: i64) -> BreakdownRow {
    BreakdownRow {
        key: key.to_string(),
        requests,
        errors,
        cost,
    }
}

fn close(actual: Option<f64>, expected: f64) -> bool {
    actual.is_some_and(|v| (v - expected).abs() < 1e-6)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summary_is_exact_and_per_tenant() {
    let db = TestDb::create().await;
    let mut conn = pool(&db).get_owned().await.unwrap();
    let d = load_data_set(&mut conn).await;

    let all = store::summary(&mut conn, d.a, d.prev, d.end).await.unwrap();
    assert_eq!(all.requests, 8);
    assert_eq!(all.errors, 4);
    assert_eq!(all.cost_total, 21);
    assert_eq!(
        all.by_status_class,
        StatusClasses {
            status_2xx: 4,
            status_4xx: 2,
            status_5xx: 2,
        }
    );
    // Latencies 100..=800 step 100: p50 interpolates 400/500, p99 sits at 0.93 of 700..800.
    assert!(close(all.latency_p50_us, 450.0), "{:?}", all.latency_p50_us);
    assert!(close(all.latency_p99_us, 793.0), "{:?}", all.latency_p99_us);

    // [cur, end): the current month only; `to` is exclusive, `from` inclusive.
    let month = store::summary(&mut conn, d.a, d.cur, d.end).await.unwrap();
    assert_eq!((month.requests, month.errors, month.cost_total), (3, 2, 13));
    assert_eq!(
        month.by_status_class,
        StatusClasses {
            status_2xx: 1,
            status_4xx: 1,
            status_5xx: 1,
        }
    );
    assert!(close(month.latency_p50_us, 700.0));
    assert!(close(month.latency_p99_us, 798.0));
    let before = store::summary(&mut conn, d.a, d.prev, d.cur).await.unwrap();
    assert_eq!(
        (before.requests, before.errors, before.cost_total),
        (5, 2, 8)
    );

    // Tenant B sees only its own call; a tenant without calls sees zeros.
    let b = store::summary(&mut conn, d.b, d.prev, d.end).await.unwrap();
    assert_eq!((b.requests, b.errors, b.cost_total), (1, 1, 100));
    assert_eq!(b.by_status_class.status_4xx, 1);
    assert!(close(b.latency_p50_us, 9_000.0));
    let none = store::summary(&mut conn, new_tenant(), d.prev, d.end)
        .await
        .unwrap();
    assert_eq!((none.requests, none.errors, none.cost_total), (0, 0, 0));
    assert_eq!(none.by_status_class, StatusClasses::default());
    assert_eq!((none.latency_p50_us, none.latency_p99_us), (None, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breakdowns_are_exact_ordered_and_paginated() {
    let db = TestDb::create().await;
    let mut conn = pool(&db).get_owned().await.unwrap();
    let d = load_data_set(&mut conn).await;
    let day = |base: DateTime<Utc>, n: i64| rfc3339(base + chrono::Duration::days(n));
    let hour = |base: DateTime<Utc>, n: i64, h: i64| {
        rfc3339(base + chrono::Duration::days(n) + chrono::Duration::hours(h))
    };

    let by_key = store::breakdown(&mut conn, d.a, d.prev, d.end, GroupBy::ApiKey, 100, None)
        .await
        .unwrap();
    assert_eq!(
        by_key,
        vec![row("", 1, 0, 5), row(KEY_1, 4, 2, 4), row(KEY_2, 3, 2, 12)]
    );

    let by_endpoint = store::breakdown(&mut conn, d.a, d.prev, d.end, GroupBy::Endpoint, 100, None)
        .await
        .unwrap();
    assert_eq!(
        by_endpoint,
        vec![row(CREATE, 3, 2, 5), row(GET, 1, 1, 10), row(LIST, 4, 1, 6)]
    );

    let by_day = store::breakdown(&mut conn, d.a, d.prev, d.end, GroupBy::Day, 100, None)
        .await
        .unwrap();
    let expected_days = vec![
        row(&day(d.prev, 2), 3, 1, 3),
        row(&day(d.prev, 5), 2, 1, 5),
        row(&day(d.cur, 0), 2, 1, 3),
        row(&day(d.cur, 1), 1, 1, 10),
    ];
    assert_eq!(by_day, expected_days);

    let by_hour = store::breakdown(&mut conn, d.a, d.prev, d.end, GroupBy::Hour, 100, None)
        .await
        .unwrap();
    assert_eq!(
        by_hour,
        vec![
            row(&hour(d.prev, 2, 10), 2, 1, 1),
            row(&hour(d.prev, 2, 11), 1, 0, 2),
            row(&hour(d.prev, 5, 8), 2, 1, 5),
            row(&hour(d.cur, 0, 0), 1, 0, 3),
            row(&hour(d.cur, 0, 23), 1, 1, 0),
            row(&hour(d.cur, 1, 12), 1, 1, 10),
        ]
    );

    // Keyset pages: one row at a time gives the same rows, then an empty page.
    for (group_by, expected) in [
        (GroupBy::Day, expected_days.clone()),
        (GroupBy::ApiKey, by_key.clone()),
        (GroupBy::Hour, by_hour.clone()),
    ] {
        let mut paged = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page =
                store::breakdown(&mut conn, d.a, d.prev, d.end, group_by, 2, after.as_deref())
                    .await
                    .unwrap();
            if page.is_empty() {
                break;
            }
            assert!(page.len() <= 2);
            after = Some(page.last().unwrap().key.clone());
            paged.extend(page);
        }
        assert_eq!(paged, expected, "{group_by:?} pages");
    }

    // The range narrows every grouping.
    let cur_keys = store::breakdown(&mut conn, d.a, d.cur, d.end, GroupBy::ApiKey, 100, None)
        .await
        .unwrap();
    assert_eq!(cur_keys, vec![row(KEY_1, 2, 1, 3), row(KEY_2, 1, 1, 10)]);

    // Tenant isolation: B has the same key id but sees only its own call.
    let b = store::breakdown(&mut conn, d.b, d.prev, d.end, GroupBy::ApiKey, 100, None)
        .await
        .unwrap();
    assert_eq!(b, vec![row(KEY_1, 1, 1, 100)]);
    for group_by in [
        GroupBy::ApiKey,
        GroupBy::Endpoint,
        GroupBy::Day,
        GroupBy::Hour,
    ] {
        let none = store::breakdown(&mut conn, new_tenant(), d.prev, d.end, group_by, 100, None)
            .await
            .unwrap();
        assert!(none.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_newest_first_without_duplicates() {
    let db = TestDb::create().await;
    let mut conn = pool(&db).get_owned().await.unwrap();
    let (a, b) = (new_tenant(), new_tenant());
    let base = Utc::now() - chrono::Duration::hours(1);
    let base = DateTime::from_timestamp(base.timestamp(), 0).unwrap();
    // 25 calls, three per timestamp (ties broken by id), alternating keys and codes.
    let mut rows: Vec<RequestRecord> = (0..25)
        .map(|i| {
            record(
                a,
                base + chrono::Duration::seconds(i / 3),
                Some(if i % 2 == 0 { KEY_1 } else { KEY_2 }),
                if i % 5 == 0 { CREATE } else { LIST },
                if i % 4 == 0 { 5 } else { 0 },
                i as i32,
                0,
            )
        })
        .collect();
    rows.push(record(b, base, Some(KEY_1), LIST, 0, 1, 0));
    store::insert(&mut conn, &rows).await.unwrap();
    let mut expected: Vec<RequestRecord> = rows.into_iter().filter(|r| r.tenant_id == a).collect();
    expected.sort_by_key(|r| std::cmp::Reverse((r.time, r.id)));

    async fn all_pages(
        conn: &mut AsyncPgConnection,
        tenant: TenantId,
        f: &LogFilter,
    ) -> Vec<RequestRecord> {
        let mut out: Vec<RequestRecord> = Vec::new();
        loop {
            let before = out.last().map(|r| (r.time, r.id));
            let page = store::list(&mut *conn, tenant, f, 7, before).await.unwrap();
            assert!(page.len() <= 7);
            if page.is_empty() {
                return out;
            }
            out.extend(page);
        }
    }

    let listed = all_pages(&mut conn, a, &LogFilter::default()).await;
    assert_eq!(listed, expected, "newest first, (time, id) order");
    let ids: HashSet<Uuid> = listed.iter().map(|r| r.id).collect();
    assert_eq!(ids.len(), 25, "no duplicates across pages");

    let by_key = LogFilter {
        api_key_id: Some(KEY_2.into()),
        ..Default::default()
    };
    let key_rows = all_pages(&mut conn, a, &by_key).await;
    let expected_key: Vec<_> = expected
        .iter()
        .filter(|r| r.api_key_id.as_deref() == Some(KEY_2))
        .cloned()
        .collect();
    assert_eq!(key_rows.len(), 12);
    assert_eq!(key_rows, expected_key);

    let errors = LogFilter {
        grpc_code: Some(5),
        rpc: Some(CREATE.into()),
        ..Default::default()
    };
    let error_rows = all_pages(&mut conn, a, &errors).await;
    let latencies: Vec<i32> = error_rows.iter().map(|r| r.latency_us).collect();
    assert_eq!(latencies, vec![20, 0], "i % 4 == 0 and i % 5 == 0");

    let window = LogFilter {
        from: Some(base + chrono::Duration::seconds(2)),
        to: Some(base + chrono::Duration::seconds(4)),
        ..Default::default()
    };
    let window_rows = all_pages(&mut conn, a, &window).await;
    let mut lat: Vec<i32> = window_rows.iter().map(|r| r.latency_us).collect();
    lat.sort();
    assert_eq!(lat, vec![6, 7, 8, 9, 10, 11], "[from, to)");

    // Tenant isolation.
    let b_rows = all_pages(&mut conn, b, &LogFilter::default()).await;
    assert_eq!(b_rows.len(), 1);
    assert!(
        all_pages(&mut conn, new_tenant(), &LogFilter::default())
            .await
            .is_empty()
    );
    assert!(
        all_pages(&mut conn, b, &by_key).await.is_empty(),
        "B never sees A's KEY_2 calls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monthly_partitions_are_created_dropped_and_used() {
    let db = TestDb::create().await;
    let pool = pool(&db);
    let mut conn = pool.clone().get_owned().await.unwrap();
    let now = Utc::now();
    let cur = month_start(now);
    let prev = cur - Months::new(1);
    let month = |n: u32| partition_name(cur + Months::new(n));

    // After the migration: from 90 days back to two months ahead, plus the default.
    let parts = partitions(&pool).await;
    for name in [partition_name(prev), month(0), month(1), month(2)] {
        assert!(parts.contains(&name), "{name} missing from {parts:?}");
    }
    assert!(parts.contains(&"api_request_logs_default".to_string()));
    assert!(!parts.contains(&month(3)));

    // Rows land in their month's partition, not in the default one.
    let tenant = new_tenant();
    let last_month = prev + chrono::Duration::days(10);
    store::insert(
        &mut conn,
        &[
            record(tenant, last_month, Some(KEY_1), LIST, 0, 1, 0),
            record(tenant, now, Some(KEY_1), LIST, 0, 1, 0),
            record(tenant, cur + Months::new(2), Some(KEY_1), LIST, 0, 1, 0),
        ],
    )
    .await
    .unwrap();
    let homes = names(
        &pool,
        &format!(
            "SELECT tableoid::regclass::text AS name FROM api_request_logs \
             WHERE tenant_id = '{tenant}' ORDER BY \"time\""
        ),
    )
    .await;
    assert_eq!(homes, vec![partition_name(prev), month(0), month(2)]);
    assert_eq!(rows_in_default_partition(&pool).await.unwrap(), 0);

    // A row beyond the partitions goes to the default partition instead of failing.
    let far = cur + Months::new(5) + chrono::Duration::days(3);
    store::insert(&mut conn, &[record(tenant, far, None, GET, 0, 1, 0)])
        .await
        .unwrap();
    assert_eq!(rows_in_default_partition(&pool).await.unwrap(), 1);

    // Retention 0: every month that ended is dropped (with its rows); ahead months are
    // created, and the stray row moves from the default partition into its new month.
    maintain_partitions(&pool, 6, Duration::ZERO).await.unwrap();
    let parts = partitions(&pool).await;
    assert!(!parts.contains(&partition_name(prev)), "{parts:?}");
    let expected: Vec<String> = (0..=6)
        .map(month)
        .chain(["api_request_logs_default".to_string()])
        .collect();
    assert_eq!(parts, expected);
    assert_eq!(rows_in_default_partition(&pool).await.unwrap(), 0);
    let homes = names(
        &pool,
        &format!(
            "SELECT tableoid::regclass::text AS name FROM api_request_logs \
             WHERE tenant_id = '{tenant}' ORDER BY \"time\""
        ),
    )
    .await;
    assert_eq!(homes, vec![month(0), month(2), month(5)]);
    assert_eq!(
        count(&pool, &format!("\"time\" < '{}'", rfc3339(cur))).await,
        0,
        "last month's row went with its partition"
    );

    // Idempotent.
    maintain_partitions(&pool, 6, Duration::ZERO).await.unwrap();
    assert_eq!(partitions(&pool).await, expected);
}
