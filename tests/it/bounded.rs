//! Bounded work per request (issue 6, section 5): bad input never yields a 5xx, error
//! details stay small whatever the request's size, queries stay within what the indexes
//! serve, user calls are rate limited, and the request log records what the client got.

use devgate::proto::internal::v1 as internal;
use std::time::Duration;

use devgate::{
    identity::{Plan, TenantId},
    proto::v1::{self, usage_service_client::UsageServiceClient},
    ratelimit::{LimitOverrides, QuotaOverrides},
    tenants::TenantDirectory,
};
use diesel::{QueryableByName, sql_types::Text};
use diesel_async::RunQueryDsl;
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::harness::{envoy::Edge, *};

/// Requests that report what the client received, sizes included.
impl Edge {
    async fn send_reply(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: &str,
    ) -> Reply {
        let resp = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let headers_len: usize = resp
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len())
            .sum();
        let text = resp.text().await.unwrap();
        Reply {
            status,
            headers_len,
            text,
        }
    }

    async fn post_reply(&self, path: &str, token: &str, body: &str) -> Reply {
        self.send_reply(reqwest::Method::POST, path, token, body)
            .await
    }

    async fn get_reply(&self, path: &str, token: &str) -> Reply {
        self.send_reply(reqwest::Method::GET, path, token, "").await
    }
}

struct Reply {
    status: StatusCode,
    headers_len: usize,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
}

fn unknown_scopes(n: usize, len: usize) -> Vec<String> {
    (0..n).map(|i| format!("{i}:{}", "s".repeat(len))).collect()
}

/// The issue's reproduction: 200 unknown scopes from a read-only member answered 502 (the
/// error details overflowed Envoy's header limit). Authorization comes first now: 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bad_requests_are_refused_small_through_envoy() {
    let e = Edge::start().await;
    let tenant = Uuid::new_v4();
    let member = user_token(tenant, "reader", &[]);
    let body = json!({
        "name": "x",
        "scopes": unknown_scopes(200, 40),
        "environment": "ENVIRONMENT_LIVE",
    })
    .to_string();
    let r = e.post_reply("/v1/api-keys", &member, &body).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);

    // An admin gets 400 with at most 20 short violations, even for ~1 MiB of bad input.
    let admin = admin_token(tenant);
    let cidrs: Vec<String> = (0..5000).map(|i| format!("banana-{i}")).collect();
    let body = json!({
        "name": "n".repeat(10_000),
        "description": "d".repeat(100_000),
        "scopes": unknown_scopes(2000, 400),
        "allowed_cidrs": cidrs,
        "environment": "ENVIRONMENT_LIVE",
    })
    .to_string();
    assert!(
        body.len() > 900_000 && body.len() < 1_048_576,
        "{}",
        body.len()
    );
    let r = e.post_reply("/v1/api-keys", &admin, &body).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    let json = r.json();
    let violations = json["details"][0]["field_violations"].as_array().unwrap();
    assert!(violations.len() <= 20, "{} violations", violations.len());
    assert!(
        violations.iter().any(|v| v["field"] == "scopes"),
        "{violations:?}"
    );
    assert!(
        r.text.len() < 16 * 1024,
        "error body of {} bytes",
        r.text.len()
    );
    assert!(
        r.headers_len < 16 * 1024,
        "headers of {} bytes",
        r.headers_len
    );

    // One scope of 100 kB is named, not echoed.
    let body = json!({
        "name": "x",
        "scopes": ["x".repeat(100_000)],
        "environment": "ENVIRONMENT_LIVE",
    })
    .to_string();
    let r = e.post_reply("/v1/api-keys", &admin, &body).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text.len() < 4096, "error body of {} bytes", r.text.len());

    // Update: a huge mask and huge lists, by a member (403) and by an admin (400, small).
    let (key, _) = create_key(&e.world.app, tenant, &["usage:read"]).await;
    let paths: Vec<String> = (0..400).map(|i| format!("no_such_field_{i}")).collect();
    let body = json!({
        "id": key.id,
        "scopes": unknown_scopes(1000, 100),
        "allowed_cidrs": (0..1000).map(|i| format!("x{i}")).collect::<Vec<_>>(),
    })
    .to_string();
    let path = format!("/v1/api-keys/{}?update_mask={}", key.id, paths.join(","));
    let r = e
        .send_reply(reqwest::Method::PATCH, &path, &member, &body)
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
    let r = e
        .send_reply(reqwest::Method::PATCH, &path, &admin, &body)
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    let violations = r.json()["details"][0]["field_violations"]
        .as_array()
        .unwrap()
        .len();
    assert!(violations <= 20, "{violations} violations");
    assert!(
        r.text.len() < 16 * 1024,
        "error body of {} bytes",
        r.text.len()
    );
    let path = format!("/v1/api-keys/{}?update_mask=scopes,allowed_cidrs", key.id);
    let r = e
        .send_reply(reqwest::Method::PATCH, &path, &admin, &body)
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert!(
        r.text.len() < 16 * 1024,
        "error body of {} bytes",
        r.text.len()
    );
}

/// Usage queries are limited to 93 days per call, and a member without usage:read... every
/// member reads usage, so the order is checked with an API key lacking the scope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_queries_are_bounded_and_authorized_first() {
    let w = World::new().await;
    let tenant = Uuid::new_v4();
    let admin = admin_token(tenant);
    let mut usage = UsageServiceClient::new(channel(w.app.public).await);
    let now = chrono::Utc::now();
    let ts = |t: chrono::DateTime<chrono::Utc>| prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    };
    let long = v1::GetUsageSummaryRequest {
        start_time: Some(ts(now - chrono::Duration::days(200))),
        end_time: Some(ts(now)),
    };
    let status = usage
        .get_usage_summary(bearer(long, &admin))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("93 days"), "{}", status.message());
    let ok = v1::GetUsageSummaryRequest {
        start_time: Some(ts(now - chrono::Duration::days(93))),
        end_time: Some(ts(now)),
    };
    usage.get_usage_summary(bearer(ok, &admin)).await.unwrap();
    let breakdown = v1::GetUsageBreakdownRequest {
        start_time: Some(ts(now - chrono::Duration::days(200))),
        end_time: Some(ts(now)),
        group_by: v1::UsageGroupBy::Day as i32,
        ..Default::default()
    };
    let status = usage
        .get_usage_breakdown(bearer(breakdown.clone(), &admin))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let logs = v1::ListRequestLogsRequest {
        start_time: Some(ts(now - chrono::Duration::days(200))),
        end_time: Some(ts(now)),
        ..Default::default()
    };
    let status = usage
        .list_request_logs(bearer(logs.clone(), &admin))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // A key without usage:read learns nothing about its request's validity: 403 first.
    let (_, keys_only) = create_key(&w.app, tenant, &["api_keys:read"]).await;
    let status = usage
        .get_usage_summary(api_key(long, &keys_only))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let status = usage
        .get_usage_breakdown(api_key(breakdown, &keys_only))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let status = usage
        .list_request_logs(api_key(logs, &keys_only))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
}

/// Metered quantities are bounded: two maximal records used to overflow the summary's sum
/// (a 500 on GetUsageSummary).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metered_quantities_cannot_overflow_sums() {
    let w = World::new().await;
    let tenant = Uuid::new_v4();
    let mut internal = w.app.internal_usage().await;
    let record = |quantity: i64, id: &str| internal::RecordUsageRequest {
        tenant_id: tenant.to_string(),
        metric: "generation_seconds".into(),
        quantity,
        idempotency_id: id.into(),
        ..Default::default()
    };
    let status = internal
        .record_usage(record(i64::MAX, "a"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let max = devgate::usage::grpc::MAX_QUANTITY;
    for id in ["b", "c", "d"] {
        assert!(
            internal
                .record_usage(record(max, id))
                .await
                .unwrap()
                .into_inner()
                .recorded
        );
    }
    let summary = UsageServiceClient::new(channel(w.app.public).await)
        .get_usage_summary(bearer(
            v1::GetUsageSummaryRequest::default(),
            &admin_token(tenant),
        ))
        .await
        .expect("sums of bounded quantities fit")
        .into_inner();
    assert_eq!(summary.metered[0].quantity, 3 * max);

    let grant = |amount: i64| internal::GrantCreditsRequest {
        tenant_id: tenant.to_string(),
        amount,
        reason: "test".into(),
        idempotency_id: format!("g{amount}"),
        ..Default::default()
    };
    let status = internal.grant_credits(grant(i64::MAX)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let status = internal.grant_credits(grant(-5)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
}

/// User (JWT) calls pay a token from a (tenant, user) bucket sized by the tenant's plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_calls_are_rate_limited_per_tenant_and_user() {
    let w = World::new().await;
    let tenant = Uuid::new_v4();
    let pool = devgate::db::pool(&w.app.settings.config().database);
    TenantDirectory::new(pool)
        .set_plan(
            TenantId(tenant),
            Plan::Free,
            LimitOverrides {
                per_minute: Some(3),
                burst: Some(3),
                ..Default::default()
            },
            QuotaOverrides::default(),
            "service:test-suite",
        )
        .await
        .unwrap();
    let mut keys = w.app.public_client().await;
    let alice = user_token(tenant, "alice", &["admin"]);
    let list = || v1::ListApiKeysRequest::default();
    for _ in 0..3 {
        let resp = keys.list_api_keys(bearer(list(), &alice)).await.unwrap();
        assert!(resp.metadata().get("x-ratelimit-remaining").is_some());
    }
    let status = keys
        .list_api_keys(bearer(list(), &alice))
        .await
        .unwrap_err();
    assert_refused(&status, tonic::Code::ResourceExhausted, "RATE_LIMITED");
    assert!(status.metadata().get("retry-after").is_some());
    let details = tonic_types::StatusExt::get_error_details(&status);
    assert_eq!(
        details.quota_failure().unwrap().violations[0].subject,
        "user:alice"
    );
    // Another user of the tenant has a bucket of their own.
    let bob = user_token(tenant, "bob", &[]);
    keys.list_api_keys(bearer(list(), &bob)).await.unwrap();
    // A user of another tenant (plan defaults) is not affected.
    let carol = user_token(Uuid::new_v4(), "alice", &[]);
    keys.list_api_keys(bearer(list(), &carol)).await.unwrap();
}

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = Text)]
    line: String,
}

/// Bodies that Envoy refuses (it answers 400 itself) were logged as grpc_code 13 / HTTP 500
/// and counted as server errors by GET /v1/usage. No client saw those 500s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_envoy_refuses_are_not_logged_as_server_errors() {
    let e = Edge::start().await;
    let tenant = Uuid::new_v4();
    let admin = admin_token(tenant);
    let bad_bodies = [
        r#"{"":1}"#,
        r#"{"name":"x","":1}"#,
        r#"{"name":"ok","scopes":["*"],"environment":"ENVIRONMENT_TEST","":1}"#,
        r#"{"name":"ok","scopes":["*"],"environment":"ENVIRONMENT_TEST","description":"x","":{"a":1}}"#,
        r#"{"name": "#,
        r#"{"name":"x","scopes":["*"],"environment":"ENVIRONMENT_PROD"}"#,
        r#"[1,2,3]"#,
        "not json at all",
        r#"{"name":"x","scopes":"*"}"#,
    ];
    for body in bad_bodies {
        let r = e.post_reply("/v1/api-keys", &admin, body).await;
        assert!(
            r.status.is_client_error(),
            "{body}: {} {}",
            r.status,
            r.text
        );
    }
    let (key, _) = create_key(&e.world.app, tenant, &["usage:read"]).await;
    let big = format!(r#"{{"name":"{}","":1}}"#, "n".repeat(200_000));
    for path in [
        format!("/v1/api-keys/{}:revoke", key.id),
        format!("/v1/api-keys/{}:rotate", key.id),
        "/v1/api-keys".to_string(),
    ] {
        for body in bad_bodies.iter().copied().chain([big.as_str()]) {
            let r = e.post_reply(&path, &admin, body).await;
            assert!(r.status.as_u16() < 500, "{path} {body:.40}: {}", r.status);
        }
    }
    for body in bad_bodies.iter().copied().chain([big.as_str()]) {
        let r = e
            .send_reply(
                reqwest::Method::PATCH,
                &format!("/v1/api-keys/{}", key.id),
                &admin,
                body,
            )
            .await;
        assert!(r.status.as_u16() < 500, "PATCH {body:.40}: {}", r.status);
    }
    // One good call, so there is something to see once the writer flushed.
    let r = e
        .post_reply(
            "/v1/api-keys",
            &admin,
            r#"{"name":"ok","scopes":["*"],"environment":"ENVIRONMENT_TEST"}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let pool = devgate::db::pool(&e.world.app.settings.config().database);
    let rows = || async {
        let mut conn = pool.get().await.unwrap();
        let rows: Vec<Row> = diesel::sql_query(format!(
            "SELECT rpc || ' ' || grpc_code::text || ' ' || http_status::text || ' ' || coalesce(error_code, '') \
             AS line FROM api_request_logs WHERE tenant_id = '{tenant}' ORDER BY time"
        ))
        .load(&mut conn)
        .await
        .unwrap();
        rows.into_iter().map(|r| r.line).collect::<Vec<_>>()
    };
    wait_until(Duration::from_secs(10), || async {
        rows().await.iter().any(|l| l.ends_with("0 200 "))
    })
    .await;
    // Let any late record of the refused calls arrive too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lines = rows().await;
    assert!(
        lines.iter().all(|l| !l.contains(" 5")),
        "server errors no client saw: {lines:?}"
    );
    let r = e.get_reply("/v1/usage", &admin).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let summary = r.json();
    assert_eq!(summary["status_5xx"], "0", "{summary}");
}

/// Every pooled connection carries the configured statement_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_have_a_statement_timeout() {
    let db = TestDb::create().await;
    let config = devgate::Config::from_lookup(|k| match k {
        "DEVGATE_DATABASE_URL" => Some(db.url().to_string()),
        "DEVGATE_DATABASE_STATEMENT_TIMEOUT" => Some("750ms".into()),
        _ => None,
    })
    .unwrap();
    let pool = devgate::db::pool(&config.database);
    let mut conn = pool.get().await.unwrap();
    let row: Row = diesel::sql_query("SELECT current_setting('statement_timeout') AS line")
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(row.line, "750ms");
    let started = std::time::Instant::now();
    let err = diesel::sql_query("SELECT pg_sleep(5)::text AS line")
        .get_result::<Row>(&mut conn)
        .await
        .err()
        .expect("the statement is cancelled");
    assert!(started.elapsed() < Duration::from_secs(3), "{err}");
    assert!(err.to_string().contains("statement timeout"), "{err}");
}
