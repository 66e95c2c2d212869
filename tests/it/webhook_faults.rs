//! Faults with 2,000 events in flight, each ending with every event delivered at least once,
//! none lost, and duplicates carrying the same `webhook-id`: the worker process killed with
//! SIGKILL and restarted; its Postgres connections cut and restored; RabbitMQ stopped and
//! started (`rabbitmqctl stop_app` / `start_app`, which every test using the broker would
//! feel, so that one is `#[ignore]`d here and run alone by deploy/local/test.sh).
//!
//! The API runs in the test process (it accepts the events and writes the outbox); the relay,
//! fan-out and delivery worker run in a real `devgate worker` process.

use std::{collections::HashSet, time::Duration};

use devgate::{
    app::Roles,
    proto::internal::v1::{self as internal, webhook_service_client::WebhookServiceClient as Pub},
    proto::json::json_to_struct,
};
use futures_util::{StreamExt, stream};
use serde_json::json;
use uuid::Uuid;

use crate::harness::{proxy::Proxy, receiver::Receiver, *};

const EVENTS: usize = 2_000;
/// Publishes in flight at once.
const PUBLISHERS: usize = 32;

struct Scenario {
    world: World,
    receiver: Receiver,
    tenant: Uuid,
    endpoint: String,
}

/// An API-only world, a receiver and one endpoint subscribed to `credits.*`.
async fn scenario() -> Scenario {
    let world = World::with_roles(Roles::API, |s| {
        s.set("DEVGATE_WEBHOOK_ALLOWED_CIDRS", "127.0.0.0/8")
            .set("DEVGATE_WEBHOOK_TIMEOUT", "2s")
            .set(
                "DEVGATE_WEBHOOK_RETRY_SCHEDULE",
                "200ms,500ms,1s,2s,4s,8s,15s,30s",
            )
            .set("DEVGATE_OUTBOX_POLL_INTERVAL", "500ms")
            .set("DEVGATE_DATABASE_POOL_SIZE", "16")
    })
    .await;
    let receiver = Receiver::start().await;
    let tenant = Uuid::new_v4();
    let endpoint = receiver
        .subscribe(&world.app, tenant, "faults", &["credits.*"])
        .await;
    Scenario {
        world,
        receiver,
        tenant,
        endpoint,
    }
}

/// Publishes `EVENTS` events (`PUBLISHERS` at a time); returns their ids.
async fn publish_all(app_internal: std::net::SocketAddr, tenant: Uuid) -> Vec<String> {
    let publisher =
        Pub::with_interceptor(channel(app_internal).await, ServiceAuth::new(SERVICE_TOKEN));
    stream::iter(0..EVENTS)
        .map(|i| {
            let mut publisher = publisher.clone();
            async move {
                let request = internal::PublishEventRequest {
                    tenant_id: tenant.to_string(),
                    event_type: "credits.low".into(),
                    payload: json_to_struct(&json!({
                        "balance": i as i64,
                        "threshold": 200,
                        "check_time": "2026-11-23T10:20:00Z",
                    })),
                    idempotency_id: format!("fault-{i}"),
                };
                // As a client should: UNAVAILABLE carries RetryInfo, and the idempotency id
                // makes a repeat return the first event.
                for _ in 0..20 {
                    match publisher.publish_event(request.clone()).await {
                        Ok(r) => return r.into_inner().event.unwrap().id,
                        Err(e) if e.code() == tonic::Code::Unavailable => {
                            tokio::time::sleep(Duration::from_millis(500)).await
                        }
                        Err(e) => panic!("publish: {e:?}"),
                    }
                }
                panic!("publish kept answering UNAVAILABLE")
            }
        })
        .buffer_unordered(PUBLISHERS)
        .collect()
        .await
}

impl Scenario {
    async fn wait_received(&self, n: usize, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let got = self.receiver.summary("faults").await;
            if got.ids.len() >= n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} of {n} distinct events arrived within {within:?}",
                got.ids.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every published event arrived (at least once), verified; duplicates only as repeats
    /// of a known `webhook-id`; and every delivery row ends `succeeded`.
    async fn assert_none_lost(&self, published: &[String]) {
        self.wait_received(EVENTS, Duration::from_secs(180)).await;
        let got = self.receiver.summary("faults").await;
        let expected: HashSet<&str> = published.iter().map(String::as_str).collect();
        assert_eq!(expected.len(), EVENTS);
        let arrived: HashSet<&str> = got.ids.keys().map(String::as_str).collect();
        assert_eq!(arrived, expected, "every event arrived, nothing else did");
        assert_eq!(got.unverified, 0, "every delivery verifies");
        let duplicates = got.received - EVENTS;
        eprintln!(
            "{} deliveries for {EVENTS} events ({duplicates} duplicates)",
            got.received
        );
        let mut conn = self.world.app.db().await;
        use devgate::db::schema::webhook_deliveries::dsl as d;
        use diesel::{ExpressionMethods, QueryDsl};
        use diesel_async::RunQueryDsl;
        let endpoint = Uuid::parse_str(&self.endpoint).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let succeeded: i64 = d::webhook_deliveries
                .filter(d::endpoint_id.eq(endpoint))
                .filter(d::status.eq("succeeded"))
                .count()
                .get_result(&mut conn)
                .await
                .unwrap();
            if succeeded == EVENTS as i64 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{succeeded} of {EVENTS} deliveries succeeded"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test]
async fn faults_worker_killed_with_sigkill_loses_nothing() {
    let s = scenario().await;
    let worker = WorkerProcess::spawn(&s.world.app.settings);
    let publishing = tokio::spawn(publish_all(s.world.app.internal, s.tenant));
    s.wait_received(300, Duration::from_secs(120)).await;
    worker.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _worker = WorkerProcess::spawn(&s.world.app.settings);
    let published = publishing.await.unwrap();
    s.assert_none_lost(&published).await;
}

#[tokio::test]
async fn faults_postgres_cut_under_the_worker_loses_nothing() {
    let s = scenario().await;
    let db_addr = "127.0.0.1:5432".parse().unwrap();
    let proxy = Proxy::start(db_addr).await;
    let mut settings = s.world.app.settings.clone();
    let proxied =
        settings.vars["DEVGATE_DATABASE_URL"].replace("127.0.0.1:5432", &proxy.addr.to_string());
    settings = settings.set("DEVGATE_DATABASE_URL", &proxied);
    let _worker = WorkerProcess::spawn(&settings);
    let publishing = tokio::spawn(publish_all(s.world.app.internal, s.tenant));
    s.wait_received(300, Duration::from_secs(120)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.restore();
    let published = publishing.await.unwrap();
    s.assert_none_lost(&published).await;
}

fn rabbitmqctl(args: &[&str]) {
    let status = std::process::Command::new("rabbitmqctl")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("rabbitmqctl runs");
    assert!(status.success(), "rabbitmqctl {args:?}");
}

#[tokio::test]
#[ignore = "stops the shared RabbitMQ: deploy/local/test.sh runs it alone, after the suite"]
async fn faults_rabbitmq_stopped_and_started_loses_nothing() {
    let s = scenario().await;
    let _worker = WorkerProcess::spawn(&s.world.app.settings);
    let publishing = tokio::spawn(publish_all(s.world.app.internal, s.tenant));
    s.wait_received(300, Duration::from_secs(120)).await;
    rabbitmqctl(&["stop_app"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    let published = publishing.await.unwrap();
    s.assert_none_lost(&published).await;
}
