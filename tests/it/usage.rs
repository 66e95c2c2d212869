//! UsageService end to end: calls are recorded by the usage layer, and summaries,
//! breakdowns, request logs, quota status, plans and credits read them back.

use devgate::proto::internal::v1 as internal;
use std::time::Duration;

use devgate::proto::v1::{self, usage_service_client::UsageServiceClient};
use tonic::{Code, Request};
use uuid::Uuid;

use crate::harness::{envoy::Envoy, *};

async fn usage_client(addr: std::net::SocketAddr) -> UsageServiceClient<tonic::transport::Channel> {
    UsageServiceClient::new(channel(addr).await)
}

fn ts(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_recorded_and_aggregated_exactly() {
    let w = World::new().await;
    let tenant = Uuid::new_v4();
    let admin = admin_token(tenant);
    let (key, token) = create_key(&w.app, tenant, &["*"]).await;
    let mut keys = w.app.public_client().await;
    for _ in 0..5 {
        keys.list_api_keys(api_key(v1::ListApiKeysRequest::default(), &token))
            .await
            .unwrap();
    }
    for _ in 0..2 {
        let err = keys
            .get_api_key(api_key(
                v1::GetApiKeyRequest {
                    id: "AAAAAAAAAAAA".into(),
                },
                &token,
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
    }
    // Everything after `end` (the reads below) is outside the period asked about.
    let end = chrono::Utc::now();
    let mut usage = usage_client(w.app.public).await;
    let period = |req: v1::GetUsageSummaryRequest| {
        bearer(
            v1::GetUsageSummaryRequest {
                end_time: Some(ts(end)),
                ..req
            },
            &admin,
        )
    };
    wait_until(Duration::from_secs(10), || {
        let mut usage = usage.clone();
        let req = period(v1::GetUsageSummaryRequest::default());
        async move {
            usage
                .get_usage_summary(req)
                .await
                .unwrap()
                .into_inner()
                .requests
                == 8
        }
    })
    .await;
    let s = usage
        .get_usage_summary(period(v1::GetUsageSummaryRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (s.requests, s.errors, s.cost),
        (8, 2, 7),
        "1 user call (create) + 7 key calls, 1 token each"
    );
    assert_eq!((s.status_2xx, s.status_4xx, s.status_5xx), (6, 2, 0));
    assert!(s.latency_p99_ms >= s.latency_p50_ms && s.latency_p50_ms > 0.0);

    let breakdown = |group_by: v1::UsageGroupBy| {
        let mut usage = usage.clone();
        let req = bearer(
            v1::GetUsageBreakdownRequest {
                group_by: group_by as i32,
                end_time: Some(ts(end)),
                ..Default::default()
            },
            &admin,
        );
        async move {
            let rows = usage
                .get_usage_breakdown(req)
                .await
                .unwrap()
                .into_inner()
                .rows;
            rows.into_iter()
                .map(|r| (r.key, r.requests, r.errors, r.cost))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        breakdown(v1::UsageGroupBy::ApiKey).await,
        vec![(String::new(), 1, 0, 0), (key.id.clone(), 7, 2, 7)]
    );
    assert_eq!(
        breakdown(v1::UsageGroupBy::Endpoint).await,
        vec![
            (
                "/devgate.v1.ApiKeyService/CreateApiKey".to_string(),
                1,
                0,
                0
            ),
            ("/devgate.v1.ApiKeyService/GetApiKey".to_string(), 2, 2, 2),
            ("/devgate.v1.ApiKeyService/ListApiKeys".to_string(), 5, 0, 5),
        ]
    );
    let days = breakdown(v1::UsageGroupBy::Day).await;
    assert_eq!(days.len(), 1);
    assert_eq!((days[0].1, days[0].2), (8, 2));

    // The log, newest first, paginated, with the details of each call.
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = usage
            .list_request_logs(bearer(
                v1::ListRequestLogsRequest {
                    page_size: 3,
                    page_token: page_token.clone(),
                    end_time: Some(ts(end)),
                    ..Default::default()
                },
                &admin,
            ))
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.request_logs);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen.len(), 8);
    assert!(seen.windows(2).all(|p| (
        p[0].time.as_ref().unwrap().seconds,
        p[0].time.as_ref().unwrap().nanos
    ) >= (
        p[1].time.as_ref().unwrap().seconds,
        p[1].time.as_ref().unwrap().nanos
    )));
    let not_found = &seen[0];
    assert_eq!(not_found.rpc, "/devgate.v1.ApiKeyService/GetApiKey");
    assert_eq!((not_found.grpc_code, not_found.http_status), (5, 404));
    assert_eq!(not_found.error_code, "API_KEY_NOT_FOUND");
    assert_eq!(not_found.api_key_id, key.id);
    let listed = seen
        .iter()
        .find(|l| l.rpc.ends_with("ListApiKeys"))
        .unwrap();
    assert!(
        listed.request_bytes >= 5 && listed.response_bytes > 5,
        "sizes of the gRPC frames: {listed:?}"
    );
    assert_eq!(listed.client_ip, "127.0.0.1");
    assert!(
        listed.user_agent.starts_with("tonic"),
        "{}",
        listed.user_agent
    );
    let created = seen.last().unwrap();
    assert_eq!(
        (created.user_id.as_str(), created.api_key_id.as_str()),
        ("admin-user", "")
    );

    // Filters.
    let only_errors = usage
        .list_request_logs(bearer(
            v1::ListRequestLogsRequest {
                grpc_code: 5,
                end_time: Some(ts(end)),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(only_errors.request_logs.len(), 2);

    // Another tenant sees none of it (only, once flushed, its own usage calls made here).
    let other = admin_token(Uuid::new_v4());
    let own_call = |rpc: &str| rpc.starts_with("/devgate.v1.UsageService/");
    let s = usage
        .get_usage_summary(bearer(v1::GetUsageSummaryRequest::default(), &other))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.requests, 0);
    let logs = usage
        .list_request_logs(bearer(v1::ListRequestLogsRequest::default(), &other))
        .await
        .unwrap()
        .into_inner();
    assert!(
        logs.request_logs
            .iter()
            .all(|l| own_call(&l.rpc) && l.api_key_id.is_empty()),
        "{logs:?}"
    );
    for group_by in [
        v1::UsageGroupBy::ApiKey,
        v1::UsageGroupBy::Endpoint,
        v1::UsageGroupBy::Day,
    ] {
        let rows = usage
            .get_usage_breakdown(bearer(
                v1::GetUsageBreakdownRequest {
                    group_by: group_by as i32,
                    ..Default::default()
                },
                &other,
            ))
            .await
            .unwrap()
            .into_inner()
            .rows;
        assert!(
            rows.iter()
                .all(|r| r.key != key.id && !r.key.contains("ApiKeyService")),
            "{group_by:?}: {rows:?}"
        );
    }
    // A filter naming the other tenant's key finds nothing either.
    let logs = usage
        .list_request_logs(bearer(
            v1::ListRequestLogsRequest {
                api_key_id: key.id.clone(),
                ..Default::default()
            },
            &other,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(logs.request_logs.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_calls_record_method_path_and_refusals() {
    let w = World::new().await;
    let envoy = Envoy::start(w.app.public).await;
    let tenant = Uuid::new_v4();
    let mut req = create_request("limited", &["*"]);
    req.rate_limits = Some(v1::RateLimits {
        per_minute: 6,
        burst: 2,
        ..Default::default()
    });
    let (_, token) = create_key_with(&w.app, tenant, req).await;
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(
            http.get(format!("{}/v1/api-keys", envoy.base))
                .header("x-api-key", &token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses, vec![200, 200, 429]);
    let admin = admin_token(tenant);
    let mut usage = usage_client(w.app.public).await;
    let list = |code: Option<i32>| {
        let mut usage = usage.clone();
        let req = bearer(
            v1::ListRequestLogsRequest {
                grpc_code: code.unwrap_or(0),
                has_grpc_code: code.is_some(),
                rpc: "/devgate.v1.ApiKeyService/ListApiKeys".into(),
                ..Default::default()
            },
            &admin,
        );
        async move {
            usage
                .list_request_logs(req)
                .await
                .unwrap()
                .into_inner()
                .request_logs
        }
    };
    wait_until(Duration::from_secs(10), || async {
        list(None).await.len() == 3
    })
    .await;
    let refused = list(Some(8)).await;
    assert_eq!(refused.len(), 1);
    assert_eq!(
        (refused[0].http_status, refused[0].error_code.as_str()),
        (429, "RATE_LIMITED")
    );
    assert_eq!(
        (
            refused[0].http_method.as_str(),
            refused[0].http_path.as_str()
        ),
        ("GET", "/v1/api-keys")
    );
    assert_eq!(list(Some(0)).await.len(), 2, "has_grpc_code filters on OK");

    // The REST edge serves the usage API too.
    let summary: serde_json::Value = http
        .get(format!("{}/v1/usage", envoy.base))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        summary["requests"]
            .as_str()
            .unwrap()
            .parse::<i64>()
            .unwrap()
            >= 4,
        "int64 is a JSON string: {summary}"
    );
    let quota = http
        .get(format!("{}/v1/quota", envoy.base))
        .header("x-api-key", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(quota.status(), 429, "the quota endpoint costs a call too");
    // SetPlan and GrantCredits are not reachable through Envoy.
    let resp = http
        .post(format!("{}/devgate.v1.UsageService/SetPlan", envoy.base))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let _ = usage
        .get_quota_status(bearer(v1::GetQuotaStatusRequest {}, &admin))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_credits_and_quota_status() {
    let w = World::new().await;
    let tenant = Uuid::new_v4();
    let (key, token) = create_key(&w.app, tenant, &["*"]).await;
    let mut internal = w.app.internal_usage().await;
    let mut public = usage_client(w.app.public).await;

    // Internal-only RPCs are refused on the public listener.
    let set_plan = internal::SetPlanRequest {
        tenant_id: tenant.to_string(),
        plan: v1::Plan::Enterprise as i32,
        rate_limits: Some(v1::RateLimits {
            per_minute: 7,
            per_hour: 700,
            per_day: 7000,
            burst: 3,
        }),
        quotas: None,
    };
    // The public listener does not serve the internal package at all.
    let err = internal::usage_service_client::UsageServiceClient::new(channel(w.app.public).await)
        .set_plan(bearer(set_plan.clone(), &admin_token(tenant)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);

    // The key was verified and cached under the default plan; SetPlan reaches it at once.
    assert_eq!(verify(&w.app, &token).await.plan, v1::Plan::Free as i32);
    let t = internal.set_plan(set_plan).await.unwrap().into_inner();
    assert_eq!(t.plan, v1::Plan::Enterprise as i32);
    assert_eq!(
        verify(&w.app, &token).await.plan,
        v1::Plan::Enterprise as i32
    );

    // Credits: idempotent grants.
    let grant = |id: &str| internal::GrantCreditsRequest {
        tenant_id: tenant.to_string(),
        amount: 500,
        reason: "welcome".into(),
        reference: "inv-1".into(),
        idempotency_id: id.into(),
    };
    let first = internal
        .grant_credits(grant("g-1"))
        .await
        .unwrap()
        .into_inner();
    let again = internal
        .grant_credits(grant("g-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((first.id, first.balance_after), (again.id, 500));
    let mut conflicting = grant("g-1");
    conflicting.amount = 1;
    assert_eq!(
        internal
            .grant_credits(conflicting)
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists
    );
    let mut bad = grant("");
    bad.amount = -5;
    assert_eq!(
        internal.grant_credits(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    // Quota status with the key: its windows (tenant limits now), spent calls, the balance.
    let status = public
        .get_quota_status(api_key(v1::GetQuotaStatusRequest {}, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.plan, v1::Plan::Enterprise as i32);
    assert_eq!(status.rate_limits.unwrap().per_minute, 7);
    assert_eq!(status.credit_balance, 500);
    let minute = status
        .windows
        .iter()
        .find(|w| w.window == "minute")
        .unwrap();
    assert_eq!(
        (minute.limit, minute.remaining),
        (7, 2),
        "burst 3, this call spent one"
    );
    // With a user token: the tenant's limits, no per-key windows.
    let status = public
        .get_quota_status(bearer(v1::GetQuotaStatusRequest {}, &admin_token(tenant)))
        .await
        .unwrap()
        .into_inner();
    assert!(status.windows.is_empty());
    assert_eq!(status.rate_limits.unwrap().burst, 3);

    // Unknown group_by and a bad period are precise errors.
    let err = public
        .get_usage_breakdown(api_key(v1::GetUsageBreakdownRequest::default(), &token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let _ = key;
    let mut backwards = Request::new(v1::GetUsageSummaryRequest {
        start_time: Some(prost_types::Timestamp {
            seconds: 2_000_000_000,
            nanos: 0,
        }),
        end_time: Some(prost_types::Timestamp {
            seconds: 1_000_000_000,
            nanos: 0,
        }),
    });
    backwards.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", admin_token(tenant)).parse().unwrap(),
    );
    assert_eq!(
        public
            .get_usage_summary(backwards)
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metered_usage_is_recorded_once_per_idempotency_id() {
    let w = World::new().await;
    let tenant = Uuid::new_v4();
    let mut internal = w.app.internal_usage().await;
    let record = |id: &str, quantity: i64| internal::RecordUsageRequest {
        tenant_id: tenant.to_string(),
        metric: "generation_seconds".into(),
        quantity,
        idempotency_id: id.into(),
        ..Default::default()
    };
    assert!(
        internal
            .record_usage(record("job-1", 30))
            .await
            .unwrap()
            .into_inner()
            .recorded
    );
    assert!(
        !internal
            .record_usage(record("job-1", 30))
            .await
            .unwrap()
            .into_inner()
            .recorded,
        "a retry counts once"
    );
    assert!(
        internal
            .record_usage(record("job-2", 12))
            .await
            .unwrap()
            .into_inner()
            .recorded
    );
    let mut bad = record("job-3", 0);
    bad.metric = "Generation Seconds".into();
    let err = internal.record_usage(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let fields: Vec<String> = tonic_types::StatusExt::get_error_details(&err)
        .bad_request()
        .unwrap()
        .field_violations
        .iter()
        .map(|f| f.field.clone())
        .collect();
    assert_eq!(fields, vec!["metric", "quantity"]);
    // Only internal callers may record.
    let err = internal::usage_service_client::UsageServiceClient::new(channel(w.app.public).await)
        .record_usage(bearer(record("job-4", 1), &admin_token(tenant)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);

    let summary = usage_client(w.app.public)
        .await
        .get_usage_summary(bearer(
            v1::GetUsageSummaryRequest::default(),
            &admin_token(tenant),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        summary.metered,
        vec![v1::MeteredUsage {
            metric: "generation_seconds".into(),
            quantity: 42
        }]
    );
}
