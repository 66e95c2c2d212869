//! Faults: Redis and Postgres going away and coming back, and shutdown flushing what it
//! holds.

use devgate::proto::internal::v1 as internal;
use std::{net::SocketAddr, time::Duration};

use devgate::proto::v1;
use tonic::Code;
use uuid::Uuid;

use crate::harness::{proxy::Proxy, redis_server::RedisServer, *};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_degrades_then_recovers() {
    let mut redis = RedisServer::start().await;
    let w = World::with(|s| s.set("DEVGATE_REDIS_URL", &redis.url())).await;
    let b = w.replica().await;
    let tenant = Uuid::new_v4();
    let (key, token) = create_key(&w.app, tenant, &["*"]).await;
    assert!(verify(&b, &token).await.valid);

    redis.stop();
    wait_until(Duration::from_secs(5), || async {
        !w.app.invalidations_live() && !b.invalidations_live()
    })
    .await;
    // Without Redis: keys still verify (the failed-attempt limiter fails open) and can be managed.
    let (second, second_token) = create_key(&w.app, tenant, &["*"]).await;
    assert!(verify(&w.app, &second_token).await.valid);
    assert!(verify(&b, &token).await.valid);
    // A revocation still takes effect at once on the instance that made it.
    revoke(&w.app, tenant, &second.id)
        .await
        .expect("revoking works without redis");
    assert!(!verify(&w.app, &second_token).await.valid);

    // Redis returns: both instances resubscribe (dropping their caches, since broadcasts may
    // have been missed) and revocations propagate again.
    redis.restart().await;
    w.app.wait_invalidations_live().await;
    b.wait_invalidations_live().await;
    assert!(verify(&b, &token).await.valid);
    revoke(&w.app, tenant, &key.id).await.unwrap();
    wait_until(Duration::from_secs(2), || async {
        !verify(&b, &token).await.valid
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_answers_unavailable_then_recovers() {
    let db = TestDb::create().await;
    let db_addr: SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let proxy = Proxy::start(db_addr).await;
    let proxied = db.url().replace("127.0.0.1:5432", &proxy.addr.to_string());
    assert_ne!(
        proxied,
        db.url(),
        "the test database URL goes through 127.0.0.1:5432"
    );
    let prefix = format!("devgate-test:{}:", Uuid::new_v4().simple());
    let app =
        TestApp::spawn(Settings::new(&db, &prefix).set("DEVGATE_DATABASE_URL", &proxied)).await;
    let tenant = Uuid::new_v4();
    let (_, cached) = create_key(&app, tenant, &["*"]).await;
    assert!(verify(&app, &cached).await.valid);
    let (_, uncached) = create_key(&app, tenant, &["*"]).await;

    proxy.cut();
    let mut c = app.public_client().await;
    let started = std::time::Instant::now();
    let err = c
        .create_api_key(bearer(
            create_request("during outage", &["*"]),
            &admin_token(tenant),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "fails fast instead of hanging"
    );
    let err = app
        .internal_client()
        .await
        .verify_api_key(internal::VerifyApiKeyRequest {
            token: uncached.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    // Keys verified before the outage keep working from the cache.
    assert!(verify(&app, &cached).await.valid);

    proxy.restore();
    wait_until(Duration::from_secs(15), || {
        let mut c = c.clone();
        async move {
            c.create_api_key(bearer(
                create_request("after", &["*"]),
                &admin_token(tenant),
            ))
            .await
            .is_ok()
        }
    })
    .await;
    assert!(verify(&app, &uncached).await.valid);
    app.stop().await;
    dbx::delete_redis_prefix(&prefix);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_pending_last_used_times() {
    let db = TestDb::create().await;
    let prefix = format!("devgate-test:{}:", Uuid::new_v4().simple());
    let settings = Settings::new(&db, &prefix).set("DEVGATE_LAST_USED_FLUSH_INTERVAL", "1h");
    let app = TestApp::spawn(settings.clone()).await;
    let reader = TestApp::spawn(settings).await;
    let tenant = Uuid::new_v4();
    let (key, token) = create_key(&app, tenant, &["*"]).await;
    assert!(verify(&app, &token).await.valid);
    app.stop().await;
    let got = reader
        .public_client()
        .await
        .get_api_key(bearer(
            v1::GetApiKeyRequest { id: key.id },
            &admin_token(tenant),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        got.last_used_time.is_some(),
        "the buffered use was written on shutdown"
    );
    reader.stop().await;
    dbx::delete_redis_prefix(&prefix);
}
