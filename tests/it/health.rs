//! gRPC health per service: SERVING only while Postgres answers and the process is not
//! draining; `devgate.liveness` stays SERVING through a database outage.

use std::{net::SocketAddr, time::Duration};

use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use uuid::Uuid;

use crate::harness::{proxy::Proxy, *};

const SERVICES: [&str; 5] = [
    "",
    "devgate.v1.ApiKeyService",
    "devgate.v1.UsageService",
    "devgate.v1.WebhookService",
    "devgate.v1.GenerationProxy",
];

async fn status(addr: SocketAddr, service: &str) -> ServingStatus {
    let reply = HealthClient::new(channel(addr).await)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health answers")
        .into_inner();
    ServingStatus::try_from(reply.status).unwrap()
}

/// Every readiness name on both listeners has `want`.
async fn all_are(app: &TestApp, want: ServingStatus) -> bool {
    for addr in [app.public, app.internal] {
        for service in SERVICES {
            if status(addr, service).await != want {
                return false;
            }
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_is_not_serving_while_postgres_is_unreachable() {
    let db = TestDb::create().await;
    let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let proxied = db.url().replace("127.0.0.1:5432", &proxy.addr.to_string());
    assert_ne!(proxied, db.url());
    let prefix = format!("devgate-test:{}:", Uuid::new_v4().simple());
    let app =
        TestApp::spawn(Settings::new(&db, &prefix).set("DEVGATE_DATABASE_URL", &proxied)).await;

    wait_until(Duration::from_secs(10), || {
        all_are(&app, ServingStatus::Serving)
    })
    .await;
    proxy.cut();
    wait_until(Duration::from_secs(10), || {
        all_are(&app, ServingStatus::NotServing)
    })
    .await;
    assert_eq!(
        status(app.public, "devgate.liveness").await,
        ServingStatus::Serving,
        "liveness does not depend on the database"
    );
    proxy.restore();
    wait_until(Duration::from_secs(10), || {
        all_are(&app, ServingStatus::Serving)
    })
    .await;
    app.stop().await;
    db::delete_redis_prefix(&prefix);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_turns_not_serving_when_draining_starts() {
    let db = TestDb::create().await;
    let prefix = format!("devgate-test:{}:", Uuid::new_v4().simple());
    let app = TestApp::spawn(Settings::new(&db, &prefix)).await;
    wait_until(Duration::from_secs(10), || {
        all_are(&app, ServingStatus::Serving)
    })
    .await;
    // Watch streams opened before shutdown stay open while the server drains.
    let mut streams = Vec::new();
    for service in SERVICES {
        let mut stream = HealthClient::new(channel(app.public).await)
            .watch(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = stream.message().await.unwrap().unwrap();
        assert_eq!(first.status(), ServingStatus::Serving, "{service:?}");
        streams.push((service, stream));
    }
    drop(app); // cancels the shutdown token; the instance drains in the background
    for (service, mut stream) in streams {
        let next = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("a status change while draining")
            .unwrap()
            .unwrap();
        assert_eq!(next.status(), ServingStatus::NotServing, "{service:?}");
    }
    db::delete_redis_prefix(&prefix);
}
