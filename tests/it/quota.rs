//! Monthly quotas: counted per tenant in Redis on the hot path, refused with
//! RESOURCE_EXHAUSTED (QuotaFailure, retry at the month's end), reconciled from Postgres.

use devgate::proto::internal::v1 as internal;
use std::time::Duration;

use devgate::{
    kv::Redis,
    proto::v1::{self, usage_service_client::UsageServiceClient},
    ratelimit::Quotas,
};
use tonic::Code;
use tonic_types::StatusExt;
use uuid::Uuid;

use crate::harness::{redis_server::RedisServer, *};

async fn set_quota(
    app: &TestApp,
    tenant: Uuid,
    monthly_requests: i64,
    limits: Option<v1::RateLimits>,
) {
    app.internal_usage()
        .await
        .set_plan(internal::SetPlanRequest {
            tenant_id: tenant.to_string(),
            plan: v1::Plan::Standard as i32,
            rate_limits: limits,
            quotas: Some(v1::Quotas {
                monthly_requests,
                monthly_generations: 0,
            }),
        })
        .await
        .unwrap();
}

async fn requests_used(app: &TestApp, tenant: Uuid) -> i64 {
    let status = UsageServiceClient::new(channel(app.public).await)
        .get_quota_status(bearer(v1::GetQuotaStatusRequest {}, &admin_token(tenant)))
        .await
        .unwrap()
        .into_inner();
    status
        .quotas
        .iter()
        .find(|q| q.name == "monthly_requests")
        .expect("requests quota")
        .used
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monthly_request_quota_is_enforced() {
    let w = World::new().await;
    let tenant = Uuid::new_v4();
    let (_, token) = create_key(&w.app, tenant, &["*"]).await;
    set_quota(&w.app, tenant, 3, None).await;
    let mut keys = w.app.public_client().await;
    for _ in 0..3 {
        keys.list_api_keys(api_key(v1::ListApiKeysRequest::default(), &token))
            .await
            .unwrap();
    }
    let refused = keys
        .list_api_keys(api_key(v1::ListApiKeysRequest::default(), &token))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let details = refused.get_error_details();
    assert_eq!(details.error_info().unwrap().reason, "QUOTA_EXHAUSTED");
    assert_eq!(
        details.quota_failure().unwrap().violations[0].subject,
        format!("tenant:{tenant}")
    );
    assert!(details.retry_info().unwrap().retry_delay.unwrap() <= Duration::from_secs(31 * 86_400));
    assert!(refused.metadata().get("retry-after").is_some());
    // User sessions do not count and still work; the status shows the quota used up.
    let status = UsageServiceClient::new(channel(w.app.public).await)
        .get_quota_status(bearer(v1::GetQuotaStatusRequest {}, &admin_token(tenant)))
        .await
        .unwrap()
        .into_inner();
    let q = status
        .quotas
        .iter()
        .find(|q| q.name == "monthly_requests")
        .unwrap();
    assert_eq!((q.limit, q.used, q.remaining), (3, 3, 0));
    assert!(q.reset_time.is_some());
    // Another tenant is unaffected.
    let (_, other) = create_key(&w.app, Uuid::new_v4(), &["*"]).await;
    keys.list_api_keys(api_key(v1::ListApiKeysRequest::default(), &other))
        .await
        .unwrap();
    // Raising the quota takes effect at once.
    set_quota(&w.app, tenant, 10, None).await;
    keys.list_api_keys(api_key(v1::ListApiKeysRequest::default(), &token))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_calls_do_not_use_the_quota() {
    let w = World::new().await;
    let tenant = Uuid::new_v4();
    let mut req = create_request("burst one", &["*"]);
    req.rate_limits = Some(v1::RateLimits {
        per_minute: 6,
        burst: 1,
        ..Default::default()
    });
    let (_, token) = create_key_with(&w.app, tenant, req).await;
    let mut keys = w.app.public_client().await;
    let mut codes = Vec::new();
    for _ in 0..5 {
        codes.push(
            keys.list_api_keys(api_key(v1::ListApiKeysRequest::default(), &token))
                .await
                .err()
                .map(|s| s.code()),
        );
    }
    assert_eq!(
        codes,
        vec![
            None,
            Some(Code::ResourceExhausted),
            Some(Code::ResourceExhausted),
            Some(Code::ResourceExhausted),
            Some(Code::ResourceExhausted)
        ]
    );
    assert_eq!(requests_used(&w.app, tenant).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_are_reconciled_from_postgres_after_redis_loses_them() {
    let redis = RedisServer::start().await;
    let w = World::with(|s| s.set("DEVGATE_REDIS_URL", &redis.url())).await;
    let tenant = Uuid::new_v4();
    let (_, token) = create_key(&w.app, tenant, &["*"]).await;
    let mut keys = w.app.public_client().await;
    for _ in 0..4 {
        keys.list_api_keys(api_key(v1::ListApiKeysRequest::default(), &token))
            .await
            .unwrap();
    }
    assert_eq!(requests_used(&w.app, tenant).await, 4);
    // Wait until the request log has the four calls, then lose Redis' data.
    let config = w.app.settings.config();
    let pool = devgate::db::pool(&config.database);
    let usage = devgate::usage::UsageStore::new(pool.clone());
    let month = devgate::ratelimit::quota::month_bounds(chrono::Utc::now()).0;
    wait_until(Duration::from_secs(10), || async {
        usage
            .key_requests_per_tenant(month)
            .await
            .unwrap()
            .iter()
            .any(|(t, n)| t.0 == tenant && *n == 4)
    })
    .await;
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = redis::cmd("FLUSHALL").query(&mut conn).unwrap();
    assert_eq!(
        requests_used(&w.app, tenant).await,
        0,
        "the counter is gone"
    );
    // What the worker does every minute.
    let quotas = Quotas::new(Redis::connect(&config.redis).unwrap());
    assert!(quotas.reconcile_requests(&pool).await.unwrap().tenants >= 1);
    assert_eq!(requests_used(&w.app, tenant).await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consuming_verifications_count_against_the_quota() {
    let w = World::new().await;
    let tenant = Uuid::new_v4();
    let (_, token) = create_key(&w.app, tenant, &["*"]).await;
    set_quota(&w.app, tenant, 2, None).await;
    let mut internal = w.app.internal_client().await;
    let consume = || internal::VerifyApiKeyRequest {
        token: token.clone(),
        consume: true,
        operation: "POST /v2/render".into(),
        ..Default::default()
    };
    for _ in 0..2 {
        assert!(
            internal
                .verify_api_key(consume())
                .await
                .unwrap()
                .into_inner()
                .valid
        );
    }
    let refused = internal
        .verify_api_key(consume())
        .await
        .unwrap()
        .into_inner();
    assert!(!refused.valid);
    assert_eq!(
        reason(&refused),
        internal::VerifyFailureReason::QuotaExhausted
    );
    assert!(refused.rate_limit.is_some());
    assert_eq!(requests_used(&w.app, tenant).await, 2);
}
