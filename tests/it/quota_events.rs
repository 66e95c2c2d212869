//! devgate's own notices: `usage.quota.warning` (80 %) and `usage.quota.exceeded` at most
//! once per tenant, quota and month — across replicas, concurrent calls and the worker's
//! re-checks — and `api_key.expiring` once per key and expire_time.

use std::{sync::Arc, time::Duration};

use chrono::{SecondsFormat, Utc};
use devgate::{
    api_keys::expiring::ExpiringNotices,
    db::PgPool,
    events::{Catalog, emitter::Emitter},
    identity::TenantId,
    kv::Redis,
    proto::{
        internal::v1 as internal,
        v1::{self, webhook_service_client::WebhookServiceClient},
    },
    ratelimit::{Metric, QuotaLevel, Quotas, quota::month_bounds},
    usage::notices::QuotaNotices,
};
use diesel::{ExpressionMethods, QueryDsl};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde_json::Value;
use tonic::Code;
use uuid::Uuid;

use crate::harness::*;

async fn db(app: &TestApp) -> AsyncPgConnection {
    AsyncPgConnection::establish(&app.settings.vars["DEVGATE_DATABASE_URL"])
        .await
        .expect("connect to the test database")
}

/// Payloads of the tenant's events of `event_type`, oldest first.
async fn events_of(conn: &mut AsyncPgConnection, tenant: Uuid, event_type: &str) -> Vec<Value> {
    use devgate::db::schema::events::dsl as e;
    e::events
        .filter(e::tenant_id.eq(tenant))
        .filter(e::event_type.eq(event_type))
        .order((e::create_time.asc(), e::id.asc()))
        .select(e::payload)
        .load(conn)
        .await
        .unwrap()
}

/// The free plan (generous rate limits in tests) with a monthly request quota of `requests`.
async fn set_request_quota(app: &TestApp, tenant: Uuid, requests: i64) {
    app.internal_usage()
        .await
        .set_plan(internal::SetPlanRequest {
            tenant_id: tenant.to_string(),
            plan: v1::Plan::Free as i32,
            rate_limits: None,
            quotas: Some(v1::Quotas {
                monthly_requests: requests,
                monthly_generations: 0,
            }),
        })
        .await
        .unwrap();
}

async fn call(app: &TestApp, token: &str) -> Result<(), tonic::Status> {
    app.public_client()
        .await
        .list_api_keys(api_key(v1::ListApiKeysRequest::default(), token))
        .await
        .map(|_| ())
}

/// What the worker runs after each reconciliation, built like the worker builds it.
struct Worker {
    pool: PgPool,
    quotas: Quotas,
    notices: QuotaNotices,
}

impl Worker {
    fn new(app: &TestApp) -> Worker {
        let config = app.settings.config();
        let pool = devgate::db::pool(&config.database);
        Worker {
            quotas: Quotas::new(Redis::connect(&config.redis).unwrap()),
            notices: QuotaNotices::new(
                pool.clone(),
                Arc::new(Emitter::new(pool.clone())),
                config.rate_limits.quotas,
            ),
            pool,
        }
    }

    /// One reconciliation pass and its notice check; the events the check appended.
    async fn pass(&self) -> usize {
        self.quotas.reconcile_requests(&self.pool).await.unwrap();
        self.notices.check(&self.quotas).await.unwrap()
    }
}

fn counter_key(prefix: &str, tenant: Uuid) -> String {
    let month = month_bounds(Utc::now()).0;
    format!(
        "{prefix}quota:{{{tenant}}}:monthly_requests:{}",
        month.format("%Y-%m")
    )
}

fn set_counter(key: &str, value: i64) {
    let mut conn = redis::Client::open(redis_url())
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .query(&mut conn)
        .unwrap();
}

fn rfc3339(t: chrono::DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_notices_are_sent_once_across_replicas_and_concurrent_calls() {
    let w = World::new().await;
    let replica = w.replica().await;
    let tenant = Uuid::new_v4();
    let (_, token) = create_key(&w.app, tenant, &["*"]).await;
    set_request_quota(&w.app, tenant, 20).await;

    // 20 calls at once, half on each replica: the quota's last unit goes to one of them.
    let calls = (0..20).map(|i| {
        let (app, token) = (if i % 2 == 0 { &w.app } else { &replica }, &token);
        async move { call(app, token).await }
    });
    let results = futures_util::future::join_all(calls).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    for app in [&w.app, &replica] {
        let refused = call(app, &token).await.unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted);
    }

    // The hot path's sends are spawned: wait for both, then let two workers (two replicas'
    // reconciliations) check at once, twice: nothing more is sent.
    let mut conn = db(&w.app).await;
    wait_until(Duration::from_secs(10), || async {
        let mut conn = db(&w.app).await;
        events_of(&mut conn, tenant, "usage.quota.exceeded")
            .await
            .len()
            == 1
            && events_of(&mut conn, tenant, "usage.quota.warning")
                .await
                .len()
                == 1
    })
    .await;
    let (a, b) = (Worker::new(&w.app), Worker::new(&replica));
    for _ in 0..2 {
        let (x, y) = tokio::join!(a.pass(), b.pass());
        assert_eq!((x, y), (0, 0));
    }

    // Senders racing for the same notice (here the generations quota, which nothing else
    // sends): the unique notice row lets exactly one append the event.
    let month = month_bounds(Utc::now()).0;
    let races = (0..16).map(|i| {
        let notices = if i % 2 == 0 { &a.notices } else { &b.notices };
        notices.record(
            TenantId(tenant),
            Metric::Generations,
            month,
            10,
            9,
            &[QuotaLevel::Warning],
        )
    });
    let appended: Vec<usize> = futures_util::future::try_join_all(races).await.unwrap();
    assert_eq!(appended.iter().sum::<usize>(), 1, "{appended:?}");

    let warnings = events_of(&mut conn, tenant, "usage.quota.warning").await;
    assert_eq!(warnings.len(), 2);
    assert_eq!(warnings[1]["quota"], "monthly_generations");
    let exceeded = events_of(&mut conn, tenant, "usage.quota.exceeded").await;
    assert_eq!((warnings.len(), exceeded.len()), (2, 1));
    let (start, end) = month_bounds(Utc::now());
    assert_eq!(
        warnings[0],
        serde_json::json!({
            "quota": "monthly_requests", "limit": 20, "used": 16, "threshold_percent": 80,
            "period_start": rfc3339(start), "period_end": rfc3339(end), "plan": "free",
        })
    );
    assert_eq!(exceeded[0]["used"], 20);
    assert_eq!(exceeded[0]["limit"], 20);
    let catalog = Catalog::load(&mut conn).await.unwrap();
    catalog
        .validate("usage.quota.warning", &warnings[0])
        .unwrap();
    catalog
        .validate("usage.quota.exceeded", &exceeded[0])
        .unwrap();

    // Tenants read them in their event log.
    let listed = WebhookServiceClient::new(channel(w.app.public).await)
        .list_events(bearer(
            v1::ListEventsRequest {
                event_type: "usage.quota.warning".into(),
                ..Default::default()
            },
            &admin_token(tenant),
        ))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|e| e.source == "devgate"));
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workers_check_sends_a_notice_the_hot_path_missed() {
    let w = World::new().await;
    let tenant = Uuid::new_v4();
    let (_, token) = create_key(&w.app, tenant, &["*"]).await;
    set_request_quota(&w.app, tenant, 10).await;
    let worker = Worker::new(&w.app);
    let mut conn = db(&w.app).await;

    // Two calls, logged and counted by the reconciliation (which checks the tenants it
    // counted; a transaction open elsewhere on the server may defer rows to a later pass).
    call(&w.app, &token).await.unwrap();
    call(&w.app, &token).await.unwrap();
    wait_until(Duration::from_secs(10), || async {
        worker.pass().await;
        let counted = worker.quotas.reconciled().await.unwrap();
        counted.totals.get(&TenantId(tenant)) == Some(&2)
    })
    .await;
    assert_eq!(worker.pass().await, 0, "2 of 10 reaches no threshold");

    // The counter passes 80 % without a call seeing the crossing (as when the hot path's
    // send failed, or a restored counter): the check sends the warning, once.
    let key = counter_key(&w.prefix, tenant);
    set_counter(&key, 9);
    worker.pass().await;
    let warnings = events_of(&mut conn, tenant, "usage.quota.warning").await;
    assert_eq!(warnings.len(), 1);
    assert_eq!(warnings[0]["used"], 9);
    assert_eq!(worker.pass().await, 0);
    assert!(
        events_of(&mut conn, tenant, "usage.quota.exceeded")
            .await
            .is_empty()
    );

    // Used up: the exceeded notice, once.
    set_counter(&key, 10);
    worker.pass().await;
    assert_eq!(worker.pass().await, 0);
    assert_eq!(
        events_of(&mut conn, tenant, "usage.quota.exceeded")
            .await
            .len(),
        1
    );
    assert_eq!(
        events_of(&mut conn, tenant, "usage.quota.warning")
            .await
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_expiring_soon_gets_one_notice_per_expire_time() {
    let w = World::with(|s| s.set("DEVGATE_API_KEY_EXPIRING_INTERVAL", "100ms")).await;
    let tenant = Uuid::new_v4();
    let admin = admin_token(tenant);
    let in_days = |days: i64| {
        let t = Utc::now() + chrono::Duration::days(days);
        Some(prost_types::Timestamp {
            seconds: t.timestamp(),
            nanos: 0,
        })
    };
    let key_expiring_in = |days: Option<i64>| {
        let mut req = create_request("ci deploys", &["api_keys:read"]);
        req.expire_time = days.and_then(in_days);
        create_key_with(&w.app, tenant, req)
    };
    let (soon, _) = key_expiring_in(Some(3)).await;
    let (later, _) = key_expiring_in(Some(30)).await;
    let (never, _) = key_expiring_in(None).await;
    let (revoked, _) = key_expiring_in(None).await;
    let mut conn = db(&w.app).await;
    // Revoked and given an expiry in the window in one statement: never a live key in it.
    {
        use devgate::db::schema::api_keys::dsl as k;
        diesel::update(k::api_keys.filter(k::id.eq(&revoked.id)))
            .set((
                k::revoke_time.eq(Some(Utc::now())),
                k::expire_time.eq(Some(Utc::now() + chrono::Duration::days(2))),
            ))
            .execute(&mut conn)
            .await
            .unwrap();
    }

    // The worker's task sends the notice; a further pass (of another worker) sends nothing.
    wait_until(Duration::from_secs(10), || async {
        let mut conn = db(&w.app).await;
        !events_of(&mut conn, tenant, "api_key.expiring")
            .await
            .is_empty()
    })
    .await;
    let config = w.app.settings.config();
    let pool = devgate::db::pool(&config.database);
    let other_worker = ExpiringNotices::new(
        pool.clone(),
        Arc::new(Emitter::new(pool)),
        config.api_keys.expiring_notice,
    );
    assert_eq!(other_worker.pass().await.unwrap(), 0);
    let log = events_of(&mut conn, tenant, "api_key.expiring").await;
    assert_eq!(log.len(), 1, "{log:?}");
    let expire_time = soon.expire_time.unwrap();
    let expected_expiry =
        chrono::DateTime::from_timestamp(expire_time.seconds, expire_time.nanos as u32)
            .unwrap()
            .to_rfc3339_opts(SecondsFormat::Micros, true);
    assert_eq!(
        log[0],
        serde_json::json!({
            "api_key_id": soon.id, "name": "ci deploys", "environment": "test",
            "expire_time": expected_expiry, "days_left": 2,
        })
    );
    Catalog::load(&mut conn)
        .await
        .unwrap()
        .validate("api_key.expiring", &log[0])
        .unwrap();
    for id in [&later.id, &never.id, &revoked.id] {
        assert!(log.iter().all(|p| p["api_key_id"] != id.as_str()));
    }

    // A new expiry in the window: one more notice, for it.
    w.app
        .public_client()
        .await
        .update_api_key(bearer(
            v1::UpdateApiKeyRequest {
                api_key: Some(v1::ApiKey {
                    id: soon.id.clone(),
                    expire_time: in_days(5),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["expire_time".into()],
                }),
            },
            &admin,
        ))
        .await
        .unwrap();
    wait_until(Duration::from_secs(10), || async {
        let mut conn = db(&w.app).await;
        events_of(&mut conn, tenant, "api_key.expiring").await.len() == 2
    })
    .await;
    assert_eq!(other_worker.pass().await.unwrap(), 0);
    let log = events_of(&mut conn, tenant, "api_key.expiring").await;
    assert_eq!(log.len(), 2);
    assert_eq!(log[1]["api_key_id"], soon.id.as_str());
    assert_eq!(log[1]["days_left"], 4);
}
