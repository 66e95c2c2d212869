//! The delivery pipeline end to end: PublishEvent → outbox → relay → RabbitMQ → fan-out →
//! delivery worker → a real receiver process that verifies every signature with the official
//! Standard Webhooks library. Retries on a shortened schedule, Retry-After, 410 Gone,
//! auto-disable and the `webhook_endpoint.disabled` event, secret rotation, custom headers,
//! the per-endpoint rate limit, and the SSRF guard at connect time.

use std::time::Duration;

use devgate::{
    proto::json::json_to_struct,
    proto::{
        internal::v1::{self as internal, webhook_service_client::WebhookServiceClient as Pub},
        v1::{self, webhook_service_client::WebhookServiceClient},
    },
};
use diesel::{ExpressionMethods, QueryDsl};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde_json::{Value, json};
use tonic::transport::Channel;
use uuid::Uuid;

use crate::harness::{
    receiver::{Receiver, respond},
    *,
};

async fn client(app: &TestApp) -> WebhookServiceClient<Channel> {
    WebhookServiceClient::new(channel(app.public).await)
}

async fn db(app: &TestApp) -> AsyncPgConnection {
    AsyncPgConnection::establish(&app.settings.vars["DEVGATE_DATABASE_URL"])
        .await
        .expect("connect to the test database")
}

/// Creates an endpoint for `tenant`; returns (id, secret).
async fn endpoint(
    app: &TestApp,
    tenant: Uuid,
    url: &str,
    types: &[&str],
    headers: &[(&str, &str)],
    rate_limit: u32,
) -> (String, String) {
    let created = client(app)
        .await
        .create_webhook_endpoint(bearer(
            v1::CreateWebhookEndpointRequest {
                url: url.into(),
                event_types: types.iter().map(|t| t.to_string()).collect(),
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                rate_limit_per_second: rate_limit,
                ..Default::default()
            },
            &admin_token(tenant),
        ))
        .await
        .expect("create endpoint")
        .into_inner();
    (created.webhook_endpoint.unwrap().id, created.secret)
}

/// Publishes `credits.low` for `tenant` as the test-suite service; returns the event id.
async fn publish(app: &TestApp, tenant: Uuid, balance: i64) -> String {
    let mut publisher =
        Pub::with_interceptor(channel(app.internal).await, ServiceAuth::new(SERVICE_TOKEN));
    publisher
        .publish_event(internal::PublishEventRequest {
            tenant_id: tenant.to_string(),
            event_type: "credits.low".into(),
            payload: json_to_struct(
                &json!({"balance": balance, "threshold": 200, "check_time": "2026-11-23T10:20:00Z"}),
            ),
            idempotency_id: Uuid::new_v4().to_string(),
        })
        .await
        .expect("publish")
        .into_inner()
        .event
        .unwrap()
        .id
}

/// (status, attempts, last_error) of the delivery of `event` to `endpoint`.
async fn delivery(
    conn: &mut AsyncPgConnection,
    event: &str,
    endpoint: &str,
) -> Option<(String, i32, Option<String>)> {
    use devgate::db::schema::webhook_deliveries::dsl as d;
    d::webhook_deliveries
        .filter(d::event_id.eq(Uuid::parse_str(event).unwrap()))
        .filter(d::endpoint_id.eq(Uuid::parse_str(endpoint).unwrap()))
        .select((d::status, d::attempts, d::last_error))
        .first(conn)
        .await
        .ok()
}

async fn wait_delivery_status(app: &TestApp, event: &str, endpoint: &str, status: &str) -> i32 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut conn = db(app).await;
    loop {
        match delivery(&mut conn, event, endpoint).await {
            Some((s, n, _)) if s == status => return n,
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "delivery of {event} to {endpoint} not {status} within 30s: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// (attempt, status_code, error_kind) of a delivery's attempt log.
async fn attempt_log(app: &TestApp, event: &str) -> Vec<(i32, Option<i32>, Option<String>)> {
    use devgate::db::schema::{webhook_attempts::dsl as a, webhook_deliveries::dsl as d};
    let mut conn = db(app).await;
    let delivery: Uuid = d::webhook_deliveries
        .filter(d::event_id.eq(Uuid::parse_str(event).unwrap()))
        .select(d::id)
        .first(&mut conn)
        .await
        .unwrap();
    a::webhook_attempts
        .filter(a::delivery_id.eq(delivery))
        .order(a::attempt.asc())
        .select((a::attempt, a::status_code, a::error_kind))
        .load(&mut conn)
        .await
        .unwrap()
}

/// Deliveries may reach the receiver on 127.0.0.1 (as in the local stack).
fn local(s: Settings) -> Settings {
    s.set("DEVGATE_WEBHOOK_ALLOWED_CIDRS", "127.0.0.0/8")
}

fn retrying(s: Settings) -> Settings {
    local(s).set("DEVGATE_WEBHOOK_RETRY_SCHEDULE", "200ms,400ms")
}

#[tokio::test]
async fn delivery_signed_with_the_standard_and_custom_headers() {
    let world = World::with(retrying).await;
    let receiver = Receiver::start().await;
    let tenant = Uuid::new_v4();
    let (id, secret) = endpoint(
        &world.app,
        tenant,
        &receiver.url("a"),
        &["credits.*"],
        &[("x-team", "blue")],
        0,
    )
    .await;
    let (other, _) = endpoint(
        &world.app,
        tenant,
        &receiver.url("other"),
        &["generation.*"],
        &[],
        0,
    )
    .await;
    receiver.configure("a", &[&secret], vec![], None).await;

    let event = publish(&world.app, tenant, 150).await;
    let got = receiver.wait_for("a", 1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1);
    let d = &got[0];
    assert_eq!(d.verified_by, vec![0], "the reference library verifies it");
    assert_eq!(d.webhook_id(), event);
    assert_eq!(d.headers["x-team"], "blue");
    assert_eq!(d.headers["content-type"], "application/json");
    let body = d.json();
    assert_eq!(body["type"], "credits.low");
    assert_eq!(body["data"]["balance"], 150);
    assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        wait_delivery_status(&world.app, &event, &id, "succeeded").await,
        1
    );
    // Not subscribed: no delivery row at all.
    let mut conn = db(&world.app).await;
    assert_eq!(delivery(&mut conn, &event, &other).await, None);
    // The attempt log (batched) gets the attempt.
    wait_until(Duration::from_secs(10), || async {
        attempt_log(&world.app, &event).await == vec![(1, Some(200), None)]
    })
    .await;
}

#[tokio::test]
async fn failed_attempts_retry_on_the_schedule_with_the_same_webhook_id() {
    let world = World::with(retrying).await;
    let receiver = Receiver::start().await;
    let tenant = Uuid::new_v4();
    let (id, secret) = endpoint(
        &world.app,
        tenant,
        &receiver.url("r"),
        &["credits.*"],
        &[],
        0,
    )
    .await;
    receiver
        .configure("r", &[&secret], vec![respond(500), respond(502)], None)
        .await;
    let event = publish(&world.app, tenant, 10).await;
    assert_eq!(
        wait_delivery_status(&world.app, &event, &id, "succeeded").await,
        3
    );
    let got = receiver.log("r").await;
    assert_eq!(got.len(), 3);
    assert!(
        got.iter()
            .all(|d| d.webhook_id() == event && d.verified_by == vec![0])
    );
    // 200 ms then 400 ms, each ±10 % (rounded up to two digits of ms).
    let gaps: Vec<f64> = got.windows(2).map(|w| w[1].time - w[0].time).collect();
    assert!(gaps[0] >= 0.18 && gaps[1] >= 0.36, "{gaps:?}");
    wait_until(Duration::from_secs(10), || async {
        let log = attempt_log(&world.app, &event).await;
        log == vec![
            (1, Some(500), Some("status".into())),
            (2, Some(502), Some("status".into())),
            (3, Some(200), None),
        ]
    })
    .await;
}

#[tokio::test]
async fn retry_after_is_honoured_and_exhaustion_fails_the_delivery() {
    let world = World::with(retrying).await;
    let receiver = Receiver::start().await;
    let tenant = Uuid::new_v4();
    let (id, secret) = endpoint(
        &world.app,
        tenant,
        &receiver.url("ra"),
        &["credits.*"],
        &[],
        0,
    )
    .await;
    receiver
        .configure(
            "ra",
            &[&secret],
            vec![json!({"status": 503, "retry_after": 2})],
            Some(respond(500)),
        )
        .await;
    let event = publish(&world.app, tenant, 10).await;
    assert_eq!(
        wait_delivery_status(&world.app, &event, &id, "failed").await,
        3
    );
    let got = receiver.log("ra").await;
    assert_eq!(got.len(), 3, "one attempt and two retries");
    assert!(
        got[1].time - got[0].time >= 1.9,
        "Retry-After: 2 beats the 200 ms step"
    );
    let mut conn = db(&world.app).await;
    let (_, _, error) = delivery(&mut conn, &event, &id).await.unwrap();
    assert_eq!(error.as_deref(), Some("status 500"));
}

#[tokio::test]
async fn gone_disables_at_once_and_the_other_endpoints_hear_of_it() {
    let world = World::with(retrying).await;
    let receiver = Receiver::start().await;
    let tenant = Uuid::new_v4();
    let (gone, gone_secret) = endpoint(
        &world.app,
        tenant,
        &receiver.url("gone"),
        &["credits.*"],
        &[],
        0,
    )
    .await;
    let (_watcher, watcher_secret) = endpoint(
        &world.app,
        tenant,
        &receiver.url("watcher"),
        &["webhook_endpoint.disabled"],
        &[],
        0,
    )
    .await;
    receiver
        .configure("gone", &[&gone_secret], vec![], Some(respond(410)))
        .await;
    receiver
        .configure("watcher", &[&watcher_secret], vec![], None)
        .await;
    let event = publish(&world.app, tenant, 10).await;
    assert_eq!(
        wait_delivery_status(&world.app, &event, &gone, "failed").await,
        1
    );
    let heard = receiver
        .wait_for("watcher", 1, Duration::from_secs(30))
        .await;
    let body = heard[0].json();
    assert_eq!(body["type"], "webhook_endpoint.disabled");
    assert_eq!(body["data"]["webhook_endpoint_id"], gone);
    assert_eq!(body["data"]["reason"], "gone");
    assert_eq!(body["data"]["last_status_code"], 410);
    assert_eq!(heard[0].verified_by, vec![0]);
    let ep = client(&world.app)
        .await
        .get_webhook_endpoint(bearer(
            v1::GetWebhookEndpointRequest { id: gone.clone() },
            &admin_token(tenant),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ep.disabled_reason, "gone");
    // Later events are not sent to it.
    let later = publish(&world.app, tenant, 5).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut conn = db(&world.app).await;
    assert_eq!(delivery(&mut conn, &later, &gone).await, None);
    assert_eq!(receiver.log("gone").await.len(), 1);
}

#[tokio::test]
async fn consecutive_exhausted_deliveries_disable_the_endpoint_until_enabled() {
    let world = World::with(|s| {
        local(s)
            .set("DEVGATE_WEBHOOK_RETRY_SCHEDULE", "100ms")
            .set("DEVGATE_WEBHOOK_DISABLE_AFTER", "2")
    })
    .await;
    let receiver = Receiver::start().await;
    let tenant = Uuid::new_v4();
    let (id, secret) = endpoint(
        &world.app,
        tenant,
        &receiver.url("d"),
        &["credits.*"],
        &[],
        0,
    )
    .await;
    receiver
        .configure("d", &[&secret], vec![], Some(respond(500)))
        .await;
    let first = publish(&world.app, tenant, 1).await;
    wait_delivery_status(&world.app, &first, &id, "failed").await;
    async fn ep(app: &TestApp, tenant: Uuid, id: &str) -> v1::WebhookEndpoint {
        client(app)
            .await
            .get_webhook_endpoint(bearer(
                v1::GetWebhookEndpointRequest { id: id.into() },
                &admin_token(tenant),
            ))
            .await
            .unwrap()
            .into_inner()
    }
    assert_eq!(
        ep(&world.app, tenant, &id).await.disabled_reason,
        "",
        "one failure is not a run"
    );
    let second = publish(&world.app, tenant, 2).await;
    wait_delivery_status(&world.app, &second, &id, "failed").await;
    let disabled = ep(&world.app, tenant, &id).await;
    assert_eq!(disabled.disabled_reason, "consecutive_failures");
    assert_eq!(disabled.consecutive_failures, 2);
    // The event is in the log (no other endpoint to deliver it to).
    let mut conn = db(&world.app).await;
    use devgate::db::schema::events::dsl as e;
    let payloads: Vec<Value> = e::events
        .filter(e::tenant_id.eq(tenant))
        .filter(e::event_type.eq("webhook_endpoint.disabled"))
        .select(e::payload)
        .load(&mut conn)
        .await
        .unwrap();
    assert_eq!(payloads.len(), 1);
    assert_eq!(payloads[0]["consecutive_failures"], 2);

    let enabled = client(&world.app)
        .await
        .enable_webhook_endpoint(bearer(
            v1::EnableWebhookEndpointRequest { id: id.clone() },
            &admin_token(tenant),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(enabled.consecutive_failures, 0);
    receiver.configure("d", &[&secret], vec![], None).await;
    let third = publish(&world.app, tenant, 3).await;
    wait_delivery_status(&world.app, &third, &id, "succeeded").await;
}

#[tokio::test]
async fn both_secrets_sign_during_a_rotation_grace_then_only_the_new_one() {
    let world = World::with(local).await;
    let receiver = Receiver::start().await;
    let tenant = Uuid::new_v4();
    let (id, old) = endpoint(
        &world.app,
        tenant,
        &receiver.url("rot"),
        &["credits.*"],
        &[],
        0,
    )
    .await;
    let new = client(&world.app)
        .await
        .rotate_webhook_secret(bearer(
            v1::RotateWebhookSecretRequest {
                id: id.clone(),
                ..Default::default()
            },
            &admin_token(tenant),
        ))
        .await
        .unwrap()
        .into_inner()
        .secret;
    receiver.configure("rot", &[&old, &new], vec![], None).await;
    publish(&world.app, tenant, 1).await;
    let got = receiver.wait_for("rot", 1, Duration::from_secs(30)).await;
    assert_eq!(got[0].verified_by, vec![0, 1], "old and new both verify");
    assert_eq!(got[0].headers["webhook-signature"].split(' ').count(), 2);

    let newer = client(&world.app)
        .await
        .rotate_webhook_secret(bearer(
            v1::RotateWebhookSecretRequest {
                id: id.clone(),
                end_grace_now: true,
                ..Default::default()
            },
            &admin_token(tenant),
        ))
        .await
        .unwrap()
        .into_inner()
        .secret;
    receiver
        .configure("rot", &[&old, &new, &newer], vec![], None)
        .await;
    publish(&world.app, tenant, 2).await;
    let got = receiver.wait_for("rot", 2, Duration::from_secs(30)).await;
    // end_grace_now: the previous secrets stop signing at once; only the newest verifies.
    assert_eq!(got[1].verified_by, vec![2]);
    assert_eq!(got[1].headers["webhook-signature"].split(' ').count(), 1);
}

#[tokio::test]
async fn the_endpoint_rate_limit_spreads_deliveries_without_failures() {
    let world = World::with(local).await;
    let receiver = Receiver::start().await;
    let tenant = Uuid::new_v4();
    let (id, secret) = endpoint(
        &world.app,
        tenant,
        &receiver.url("rl"),
        &["credits.*"],
        &[],
        4,
    )
    .await;
    receiver.configure("rl", &[&secret], vec![], None).await;
    let mut events = Vec::new();
    for i in 0..12 {
        events.push(publish(&world.app, tenant, i).await);
    }
    let got = receiver.wait_for("rl", 12, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 12);
    // At most 4 in any one second.
    let mut per_second = std::collections::HashMap::new();
    for d in &got {
        *per_second.entry(d.time as i64).or_insert(0) += 1;
    }
    assert!(per_second.values().all(|&n| n <= 4), "{per_second:?}");
    // Spaced, not bunched: 12 at 4 per second span at least 11 × 250 ms (less some jitter).
    let times: Vec<f64> = got.iter().map(|d| d.time).collect();
    let span = times.iter().cloned().fold(f64::MIN, f64::max)
        - times.iter().cloned().fold(f64::MAX, f64::min);
    assert!(span >= 2.5, "12 deliveries within {span:.2} s");
    for event in &events {
        assert_eq!(
            wait_delivery_status(&world.app, event, &id, "succeeded").await,
            1
        );
    }
}

#[tokio::test]
async fn the_guard_refuses_at_connect_time_what_validation_let_through() {
    // No allow-list: loopback is refused. The endpoint's URL is changed under devgate's
    // feet (as DNS rebinding would change an address) to the receiver on 127.0.0.1.
    let world = World::with(|s| {
        s.set("DEVGATE_WEBHOOK_ALLOWED_CIDRS", "")
            .set("DEVGATE_WEBHOOK_RETRY_SCHEDULE", "10ms")
    })
    .await;
    let receiver = Receiver::start().await;
    let tenant = Uuid::new_v4();
    let (id, _) = endpoint(
        &world.app,
        tenant,
        "https://93.184.215.14/hooks",
        &["credits.*"],
        &[],
        0,
    )
    .await;
    let mut conn = db(&world.app).await;
    use devgate::db::schema::webhook_endpoints::dsl as w;
    diesel::update(w::webhook_endpoints.filter(w::id.eq(Uuid::parse_str(&id).unwrap())))
        .set(w::url.eq(receiver.url("ssrf")))
        .execute(&mut conn)
        .await
        .unwrap();
    let event = publish(&world.app, tenant, 1).await;
    wait_delivery_status(&world.app, &event, &id, "failed").await;
    wait_until(Duration::from_secs(10), || async {
        let refused = Some("refused_by_ssrf_guard".to_string());
        attempt_log(&world.app, &event).await
            == vec![(1, None, refused.clone()), (2, None, refused)]
    })
    .await;
    assert!(receiver.log("ssrf").await.is_empty(), "nothing reached it");
}

#[tokio::test]
async fn test_events_manual_retry_and_recover_go_through_the_worker() {
    let world = World::with(|s| local(s).set("DEVGATE_WEBHOOK_RETRY_SCHEDULE", "50ms")).await;
    let receiver = Receiver::start().await;
    let tenant = Uuid::new_v4();
    let token = admin_token(tenant);
    // Subscribed to nothing a test event is: the test event reaches it anyway.
    let (id, secret) = endpoint(
        &world.app,
        tenant,
        &receiver.url("m"),
        &["generation.*"],
        &[],
        0,
    )
    .await;
    receiver.configure("m", &[&secret], vec![], None).await;
    let mut api = client(&world.app).await;
    let sent = api
        .send_test_event(bearer(
            v1::SendTestEventRequest {
                id: id.clone(),
                event_type: String::new(),
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    let got = receiver.wait_for("m", 1, Duration::from_secs(30)).await;
    assert_eq!(got[0].json()["type"], "webhook.test");
    assert_eq!(got[0].webhook_id(), sent.event_id);
    assert_eq!(got[0].verified_by, vec![0]);
    wait_delivery_status(&world.app, &sent.event_id, &id, "succeeded").await;

    // Two test events that fail for good (two attempts each).
    receiver
        .configure("m", &[&secret], vec![], Some(respond(500)))
        .await;
    let mut failed = Vec::new();
    for _ in 0..2 {
        let d = api
            .send_test_event(bearer(
                v1::SendTestEventRequest {
                    id: id.clone(),
                    event_type: "credits.low".into(),
                },
                &token,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            wait_delivery_status(&world.app, &d.event_id, &id, "failed").await,
            2
        );
        failed.push(d);
    }
    receiver.configure("m", &[&secret], vec![], None).await;

    // A manual retry: one more attempt, the same webhook-id, now succeeded.
    api.retry_webhook_delivery(bearer(
        v1::RetryWebhookDeliveryRequest {
            webhook_id: id.clone(),
            id: failed[0].id.clone(),
        },
        &token,
    ))
    .await
    .unwrap();
    assert_eq!(
        wait_delivery_status(&world.app, &failed[0].event_id, &id, "succeeded").await,
        3
    );
    // Recover sends the rest (only the one still failed).
    let recovered = api
        .recover_webhook_deliveries(bearer(
            v1::RecoverWebhookDeliveriesRequest {
                id: id.clone(),
                since: Some(prost_types::Timestamp {
                    seconds: chrono::Utc::now().timestamp() - 3600,
                    nanos: 0,
                }),
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(recovered.recovered, 1);
    assert_eq!(
        wait_delivery_status(&world.app, &failed[1].event_id, &id, "succeeded").await,
        3
    );
    let log = receiver.log("m").await;
    for d in &failed {
        let copies: Vec<_> = log
            .iter()
            .filter(|r| r.webhook_id() == d.event_id)
            .collect();
        assert_eq!(copies.len(), 3, "two failures and the manual attempt");
        assert!(copies.iter().all(|r| r.verified_by == vec![0]));
    }
    // The delivery shows every attempt, the manual one marked.
    let shown = api
        .get_webhook_delivery(bearer(
            v1::GetWebhookDeliveryRequest {
                webhook_id: id.clone(),
                id: failed[1].id.clone(),
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.status, v1::WebhookDeliveryStatus::Succeeded as i32);
    wait_until(Duration::from_secs(10), || {
        let mut api = api.clone();
        let (id, delivery, token) = (id.clone(), failed[1].id.clone(), token.clone());
        async move {
            let d = api
                .get_webhook_delivery(bearer(
                    v1::GetWebhookDeliveryRequest {
                        webhook_id: id,
                        id: delivery,
                    },
                    &token,
                ))
                .await
                .unwrap()
                .into_inner();
            d.attempt_log
                .iter()
                .map(|a| (a.attempt, a.status_code, a.trigger.as_str()))
                .collect::<Vec<_>>()
                == vec![
                    (1, 500, "scheduled"),
                    (2, 500, "scheduled"),
                    (3, 200, "manual"),
                ]
        }
    })
    .await;
}

#[tokio::test]
async fn the_fan_out_sees_endpoint_changes_at_once() {
    let world = World::with(local).await;
    let receiver = Receiver::start().await;
    let tenant = Uuid::new_v4();
    let token = admin_token(tenant);
    let (id, secret) = endpoint(
        &world.app,
        tenant,
        &receiver.url("c"),
        &["credits.*"],
        &[],
        0,
    )
    .await;
    receiver.configure("c", &[&secret], vec![], None).await;
    let first = publish(&world.app, tenant, 1).await;
    wait_delivery_status(&world.app, &first, &id, "succeeded").await;
    // The tenant's endpoints are cached now; unsubscribe from credits.* and add a second one.
    let mut api = client(&world.app).await;
    api.update_webhook_endpoint(bearer(
        v1::UpdateWebhookEndpointRequest {
            webhook_endpoint: Some(v1::WebhookEndpoint {
                id: id.clone(),
                event_types: vec!["generation.*".into()],
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["event_types".into()],
            }),
        },
        &token,
    ))
    .await
    .unwrap();
    let (second, second_secret) = endpoint(
        &world.app,
        tenant,
        &receiver.url("c2"),
        &["credits.*"],
        &[],
        0,
    )
    .await;
    receiver
        .configure("c2", &[&second_secret], vec![], None)
        .await;
    let later = publish(&world.app, tenant, 2).await;
    wait_delivery_status(&world.app, &later, &second, "succeeded").await;
    let mut conn = db(&world.app).await;
    assert_eq!(delivery(&mut conn, &later, &id).await, None, "unsubscribed");
    assert_eq!(receiver.log("c").await.len(), 1);
}

#[tokio::test]
async fn retries_work_on_quorum_queues_too() {
    let world = World::with(|s| retrying(s).set("DEVGATE_RABBITMQ_QUEUE_TYPE", "quorum")).await;
    let receiver = Receiver::start().await;
    let tenant = Uuid::new_v4();
    let (id, secret) = endpoint(
        &world.app,
        tenant,
        &receiver.url("q"),
        &["credits.*"],
        &[],
        0,
    )
    .await;
    receiver
        .configure("q", &[&secret], vec![respond(500)], None)
        .await;
    let event = publish(&world.app, tenant, 1).await;
    assert_eq!(
        wait_delivery_status(&world.app, &event, &id, "succeeded").await,
        2
    );
}
