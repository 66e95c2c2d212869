//! Rate limits: exact under concurrency across replicas, refill, per-key overrides, the
//! headers (gRPC and through Envoy), consuming verifications, and Redis outages.

use std::{sync::Arc, time::Duration};

use devgate::proto::v1;
use tonic::Code;
use tonic_types::StatusExt;
use uuid::Uuid;

use crate::harness::{envoy::Envoy, redis_server::RedisServer, *};

/// A key of `tenant` with its own limits (per minute/hour/day/burst).
async fn limited_key(app: &TestApp, tenant: Uuid, limits: [u32; 4]) -> (v1::ApiKey, String) {
    let mut req = create_request("limited", &["*"]);
    req.rate_limits = Some(v1::RateLimits {
        per_minute: limits[0],
        per_hour: limits[1],
        per_day: limits[2],
        burst: limits[3],
    });
    create_key_with(app, tenant, req).await
}

async fn list(
    app: &TestApp,
    key: &str,
) -> Result<tonic::Response<v1::ListApiKeysResponse>, tonic::Status> {
    app.public_client()
        .await
        .list_api_keys(api_key(
            v1::ListApiKeysRequest {
                page_size: 1,
                ..Default::default()
            },
            key,
        ))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_on_two_replicas_get_exactly_the_burst() {
    let w = World::new().await;
    let b = w.replica().await;
    let tenant = Uuid::new_v4();
    // 6 per minute = one token every 10 s: during this test only the burst is available.
    let (_, key) = limited_key(&w.app, tenant, [6, 100_000, 1_000_000, 20]).await;
    let clients = [w.app.public_client().await, b.public_client().await];
    let key: Arc<str> = key.into();
    let started = std::time::Instant::now();
    let mut calls = Vec::new();
    for i in 0..200 {
        let mut client = clients[i % 2].clone();
        let key = key.clone();
        calls.push(tokio::spawn(async move {
            client
                .list_api_keys(api_key(
                    v1::ListApiKeysRequest {
                        page_size: 1,
                        ..Default::default()
                    },
                    &key,
                ))
                .await
                .map(|_| ())
        }));
    }
    let mut admitted = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(()) => admitted += 1,
            Err(status) => assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}"),
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the refill of one token must not fall inside the test"
    );
    assert_eq!(
        admitted, 20,
        "burst 20, no refill yet: exactly 20 of 200 across both replicas"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buckets_refill_and_overrides_are_per_key() {
    let w = World::new().await;
    let tenant = Uuid::new_v4();
    // 60 per minute = one token per second; burst 2.
    let (key, token) = limited_key(&w.app, tenant, [60, 100_000, 1_000_000, 2]).await;
    assert!(list(&w.app, &token).await.is_ok());
    assert!(list(&w.app, &token).await.is_ok());
    let refused = list(&w.app, &token).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(
        list(&w.app, &token).await.is_ok(),
        "one token back after a second"
    );
    assert_eq!(
        list(&w.app, &token).await.unwrap_err().code(),
        Code::ResourceExhausted
    );

    // Another key of the same tenant follows the plan (generous in tests).
    let (_, other) = create_key(&w.app, tenant, &["*"]).await;
    for _ in 0..10 {
        assert!(list(&w.app, &other).await.is_ok());
    }
    // Raising the key's own limits takes effect at once (the update drops cached keys).
    let patch = v1::ApiKey {
        id: key.id.clone(),
        rate_limits: Some(v1::RateLimits {
            per_minute: 600,
            burst: 50,
            ..Default::default()
        }),
        ..Default::default()
    };
    let updated = w
        .app
        .public_client()
        .await
        .update_api_key(bearer(
            v1::UpdateApiKeyRequest {
                api_key: Some(patch),
                update_mask: None,
            },
            &admin_token(tenant),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.rate_limits.unwrap().burst, 50);
    let ok = list(&w.app, &token).await.unwrap();
    assert_eq!(ok.metadata().get("x-ratelimit-limit").unwrap(), "600");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_on_success_and_on_refusal() {
    let w = World::new().await;
    let tenant = Uuid::new_v4();
    let (_, token) = limited_key(&w.app, tenant, [100, 2000, 20000, 3]).await;
    let first = list(&w.app, &token).await.unwrap();
    let md = first.metadata();
    assert_eq!(
        md.get("ratelimit-policy").unwrap(),
        "\"minute\";q=100;w=60, \"hour\";q=2000;w=3600, \"day\";q=20000;w=86400"
    );
    assert_eq!(
        md.get("ratelimit")
            .unwrap()
            .to_str()
            .unwrap()
            .split(';')
            .take(2)
            .collect::<Vec<_>>(),
        ["\"minute\"", "r=2"]
    );
    assert_eq!(md.get("x-ratelimit-limit").unwrap(), "100");
    assert_eq!(md.get("x-ratelimit-remaining").unwrap(), "2");
    assert!(md.get("x-ratelimit-reset").is_some());
    list(&w.app, &token).await.unwrap();
    list(&w.app, &token).await.unwrap();
    let refused = list(&w.app, &token).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let details = refused.get_error_details();
    let retry = details
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo");
    assert!(
        retry <= Duration::from_secs(1),
        "one token per 0.6 s: {retry:?}"
    );
    assert_eq!(
        details.quota_failure().unwrap().violations[0].subject,
        format!("api_key:{}", token.split('_').nth(2).unwrap())
    );
    assert_eq!(details.error_info().unwrap().reason, "RATE_LIMITED");
    assert_eq!(refused.metadata().get("retry-after").unwrap(), "1");
    assert_eq!(
        refused.metadata().get("x-ratelimit-remaining").unwrap(),
        "0"
    );
    // Users (JWT) are not limited per key.
    let admin = admin_token(tenant);
    for _ in 0..5 {
        w.app
            .public_client()
            .await
            .list_api_keys(bearer(v1::ListApiKeysRequest::default(), &admin))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_clients_see_headers_and_429() {
    let w = World::new().await;
    let envoy = Envoy::start(w.app.public).await;
    let (_, token) = limited_key(&w.app, Uuid::new_v4(), [100, 2000, 20000, 2]).await;
    let http = reqwest::Client::new();
    let get = || {
        http.get(format!("{}/v1/api-keys", envoy.base))
            .header("x-api-key", &token)
            .send()
    };
    let ok = get().await.unwrap();
    assert_eq!(ok.status(), 200);
    assert!(
        ok.headers()
            .get("ratelimit-policy")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("\"minute\";q=100;w=60")
    );
    assert_eq!(ok.headers().get("x-ratelimit-remaining").unwrap(), "1");
    assert_eq!(get().await.unwrap().status(), 200);
    let refused = get().await.unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers().get("retry-after").unwrap(), "1");
    assert_eq!(refused.headers().get("x-ratelimit-remaining").unwrap(), "0");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["code"], 8);
    let types: Vec<&str> = body["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["@type"].as_str().unwrap())
        .collect();
    assert!(
        types.contains(&"type.googleapis.com/google.rpc.RetryInfo"),
        "{types:?}"
    );
    assert!(
        types.contains(&"type.googleapis.com/google.rpc.QuotaFailure"),
        "{types:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consuming_verification_gates_another_api() {
    let w = World::new().await;
    let (_, token) = limited_key(&w.app, Uuid::new_v4(), [60, 100_000, 1_000_000, 5]).await;
    let mut internal = w.app.internal_client().await;
    let consume = |cost: u32| v1::VerifyApiKeyRequest {
        token: token.clone(),
        consume: true,
        cost,
        ..Default::default()
    };
    for remaining in [3u64, 1] {
        let resp = internal.verify_api_key(consume(2)).await.unwrap();
        assert_eq!(
            resp.metadata()
                .get("x-ratelimit-remaining")
                .unwrap()
                .to_str()
                .unwrap(),
            remaining.to_string()
        );
        let body = resp.into_inner();
        assert!(body.valid);
        assert_eq!(body.rate_limit.unwrap().remaining, remaining);
    }
    let refused = internal
        .verify_api_key(consume(2))
        .await
        .unwrap()
        .into_inner();
    assert!(!refused.valid);
    assert_eq!(reason(&refused), v1::VerifyFailureReason::RateLimited);
    assert_eq!(refused.rate_limit.unwrap().retry_after_seconds, 1);
    // Without consume nothing is taken; the key is still valid.
    assert!(verify(&w.app, &token).await.valid);
    let err = internal.verify_api_key(consume(5000)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_open_to_local_buckets_then_recovers() {
    let mut redis = RedisServer::start().await;
    let w = World::with(|s| s.set("DEVGATE_REDIS_URL", &redis.url())).await;
    let tenant = Uuid::new_v4();
    let (_, token) = limited_key(&w.app, tenant, [6, 100_000, 1_000_000, 3]).await;
    assert!(list(&w.app, &token).await.is_ok());

    redis.stop();
    // In-process buckets take over: the same limits, per replica.
    for _ in 0..3 {
        assert!(list(&w.app, &token).await.is_ok(), "fail open");
    }
    assert_eq!(
        list(&w.app, &token).await.unwrap_err().code(),
        Code::ResourceExhausted
    );

    // Back on Redis (an empty one: the bucket starts full), including a flushed script cache.
    redis.restart().await;
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut conn).unwrap();
    wait_until(Duration::from_secs(10), || async {
        list(&w.app, &token).await.is_ok()
    })
    .await;
    let stored: i64 = redis::cmd("DBSIZE").query(&mut conn).unwrap();
    assert!(stored >= 1, "decisions are in Redis again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_refuses_key_calls_while_redis_is_down() {
    let mut redis = RedisServer::start().await;
    let w = World::with(|s| {
        s.set("DEVGATE_REDIS_URL", &redis.url())
            .set("DEVGATE_RATE_LIMIT_FAIL_CLOSED", "true")
    })
    .await;
    let tenant = Uuid::new_v4();
    let (_, token) = limited_key(&w.app, tenant, [600, 100_000, 1_000_000, 50]).await;
    assert!(list(&w.app, &token).await.is_ok());
    redis.stop();
    let err = list(&w.app, &token).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    // User sessions are not rate limited per key and keep working.
    w.app
        .public_client()
        .await
        .list_api_keys(bearer(
            v1::ListApiKeysRequest::default(),
            &admin_token(tenant),
        ))
        .await
        .unwrap();
    redis.restart().await;
    wait_until(Duration::from_secs(10), || async {
        list(&w.app, &token).await.is_ok()
    })
    .await;
}
