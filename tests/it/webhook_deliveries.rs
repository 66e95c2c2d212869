//! The delivery RPCs of the WebhookService (SendTestEvent, ListWebhookDeliveries,
//! GetWebhookDelivery, RetryWebhookDelivery, RecoverWebhookDeliveries) and the deliveries
//! shown with ListEvents/GetEvent: paging and filters, validation naming fields, NOT_FOUND
//! across tenants for every RPC, scopes, the manual tasks retry and recover put on the
//! test's RabbitMQ deliveries queue, every REST path through Envoy and one grpcurl call.
//!
//! Deliveries and attempts are seeded with SQL (the worker that makes them is tested on its
//! own). Every world here runs the API role only: no relay, fan-out or delivery worker
//! touches the rows or consumes the queue while a test reads them.

use chrono::{DateTime, TimeDelta, Utc};
use devgate::{
    app::Roles,
    db::schema::{events, webhook_attempts, webhook_deliveries},
    proto::v1::{self, webhook_service_client::WebhookServiceClient},
};
use diesel::{ExpressionMethods, QueryDsl};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use lapin::options::BasicGetOptions;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tonic::{Code, transport::Channel};
use uuid::Uuid;

use crate::harness::{envoy::Edge, *};

/// Loopback is allowed in tests (DEVGATE_WEBHOOK_ALLOWED_CIDRS) and port 9 is closed: should
/// anything ever try a delivery here, it stays on this machine.
const URL: &str = "http://127.0.0.1:9/hooks";

/// An API-only world whose endpoints may point at loopback ([`URL`]).
async fn api_world() -> World {
    World::with_roles(Roles::API, loopback_allowed).await
}

fn loopback_allowed(s: Settings) -> Settings {
    s.set("DEVGATE_WEBHOOK_ALLOWED_CIDRS", "127.0.0.0/8")
}

async fn client(app: &TestApp) -> WebhookServiceClient<Channel> {
    WebhookServiceClient::new(channel(app.public).await)
}

/// Creates an endpoint (subscribed to `generation.*`) as `token`; returns its id.
async fn endpoint(app: &TestApp, token: &str) -> String {
    let req = v1::CreateWebhookEndpointRequest {
        url: URL.into(),
        event_types: vec!["generation.*".into()],
        ..Default::default()
    };
    client(app)
        .await
        .create_webhook_endpoint(bearer(req, token))
        .await
        .expect("create endpoint")
        .into_inner()
        .webhook_endpoint
        .unwrap()
        .id
}

fn uuid(s: &str) -> Uuid {
    Uuid::parse_str(s).unwrap()
}

/// A UUIDv7 of `time` (ids sort like the times).
fn v7_at(time: DateTime<Utc>) -> Uuid {
    Uuid::new_v7(uuid::Timestamp::from_unix(
        uuid::NoContext,
        time.timestamp() as u64,
        time.timestamp_subsec_nanos(),
    ))
}

/// An event straight into `events` (not the outbox: nothing relays it).
async fn insert_event(
    conn: &mut AsyncPgConnection,
    tenant: Uuid,
    event_type: &str,
    time: DateTime<Utc>,
) -> Uuid {
    let id = v7_at(time);
    diesel::insert_into(events::table)
        .values((
            events::id.eq(id),
            events::tenant_id.eq(tenant),
            events::event_type.eq(event_type),
            events::payload.eq(json!({"n": 1})),
            events::source.eq("service:test"),
            events::create_time.eq(time),
        ))
        .execute(conn)
        .await
        .unwrap();
    id
}

/// A delivery row as the worker would leave it.
struct Seed<'a> {
    tenant: Uuid,
    endpoint: &'a str,
    event: Uuid,
    event_type: &'a str,
    status: &'a str,
    attempts: i32,
    time: DateTime<Utc>,
}

async fn insert_delivery(conn: &mut AsyncPgConnection, s: Seed<'_>) -> Uuid {
    use webhook_deliveries::dsl as d;
    let id = v7_at(s.time);
    let tried = (s.attempts > 0).then_some(s.time + TimeDelta::seconds(1));
    let next = (s.status == "pending").then_some(s.time + TimeDelta::minutes(5));
    diesel::insert_into(webhook_deliveries::table)
        .values((
            d::id.eq(id),
            d::tenant_id.eq(s.tenant),
            d::endpoint_id.eq(uuid(s.endpoint)),
            d::event_id.eq(s.event),
            d::event_type.eq(s.event_type),
            d::status.eq(s.status),
            d::attempts.eq(s.attempts),
            d::next_attempt_time.eq(next),
            d::last_attempt_time.eq(tried),
            d::last_status_code.eq(tried.map(|_| 500)),
            d::last_error.eq(tried.map(|_| "status 500")),
            d::create_time.eq(s.time),
            d::update_time.eq(s.time),
        ))
        .execute(conn)
        .await
        .unwrap();
    id
}

/// An event of `event_type` at `time` and its delivery to `endpoint`.
async fn seed(
    conn: &mut AsyncPgConnection,
    tenant: Uuid,
    endpoint: &str,
    event_type: &str,
    status: &str,
    attempts: i32,
    time: DateTime<Utc>,
) -> (Uuid, Uuid) {
    let event = insert_event(conn, tenant, event_type, time).await;
    let delivery = insert_delivery(
        conn,
        Seed {
            tenant,
            endpoint,
            event,
            event_type,
            status,
            attempts,
            time,
        },
    )
    .await;
    (event, delivery)
}

/// Every task on the test's deliveries queue, taken off it, in queue order.
async fn take_tasks(app: &TestApp) -> Vec<Value> {
    let channel = app
        .mq()
        .channel()
        .await
        .expect("RabbitMQ at 127.0.0.1:5672");
    let queue = app.mq().queue_name("webhooks.deliveries");
    let mut tasks = Vec::new();
    while let Some(m) = channel
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        assert_eq!(
            m.delivery.properties.delivery_mode(),
            &Some(2),
            "persistent"
        );
        tasks.push(serde_json::from_slice(&m.delivery.data).unwrap());
    }
    tasks
}

fn manual_task(delivery: Uuid, attempt: i32) -> Value {
    json!({"delivery_id": delivery.to_string(), "attempt": attempt, "manual": true})
}

fn ts(t: DateTime<Utc>) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    })
}

fn ids(deliveries: &[v1::WebhookDelivery]) -> Vec<Uuid> {
    deliveries.iter().map(|d| uuid(&d.id)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_send_test_event_writes_the_event_and_its_pending_delivery() {
    let w = api_world().await;
    let app = &w.app;
    let tenant = Uuid::new_v4();
    let token = admin_token(tenant);
    let id = endpoint(app, &token).await;
    let mut c = client(app).await;

    // Default type: `webhook.test` naming this endpoint and the send time, for it only.
    let req = v1::SendTestEventRequest {
        id: id.clone(),
        event_type: String::new(),
    };
    let sent = c
        .send_test_event(bearer(req, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(uuid(&sent.id).get_version_num(), 7);
    assert_eq!(sent.webhook_id, id);
    assert_eq!(sent.event_type, "webhook.test");
    assert_eq!(sent.status(), v1::WebhookDeliveryStatus::Pending);
    assert_eq!(sent.attempts, 0);
    assert_eq!(sent.last_attempt_time, None);
    assert!(sent.attempt_log.is_empty());

    let mut conn = app.db().await;
    let (endpoint_id, event_type, payload, source, key): (
        Option<Uuid>,
        String,
        Value,
        String,
        Option<String>,
    ) = events::table
        .filter(events::id.eq(uuid(&sent.event_id)))
        .select((
            events::endpoint_id,
            events::event_type,
            events::payload,
            events::source,
            events::idempotency_id,
        ))
        .first(&mut conn)
        .await
        .unwrap();
    assert_eq!(endpoint_id, Some(uuid(&id)), "targeted at the endpoint");
    assert_eq!(event_type, "webhook.test");
    let sample: Value = devgate::db::schema::event_types::table
        .filter(devgate::db::schema::event_types::name.eq("webhook.test"))
        .select(devgate::db::schema::event_types::sample)
        .first(&mut conn)
        .await
        .unwrap();
    assert_eq!(payload["message"], sample["message"]);
    assert_eq!(payload["webhook_endpoint_id"], id.as_str());
    let send_time: DateTime<Utc> = payload["send_time"].as_str().unwrap().parse().unwrap();
    assert!((Utc::now() - send_time).num_seconds().abs() < 60);
    assert_eq!(source, "user:admin-user");
    assert_eq!(key, None);
    // The event is in the outbox (the fan-out queues its first attempt when it gets there).
    let queued: i64 = devgate::db::schema::outbox::table
        .filter(devgate::db::schema::outbox::event_id.eq(uuid(&sent.event_id)))
        .count()
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(queued, 1);
    let (status, attempts, endpoint_of): (String, i32, Uuid) = webhook_deliveries::table
        .filter(webhook_deliveries::id.eq(uuid(&sent.id)))
        .select((
            webhook_deliveries::status,
            webhook_deliveries::attempts,
            webhook_deliveries::endpoint_id,
        ))
        .first(&mut conn)
        .await
        .unwrap();
    assert_eq!((status.as_str(), attempts), ("pending", 0));
    assert_eq!(endpoint_of, uuid(&id));

    // A named type sends its own sample, even to a disabled endpoint that does not
    // subscribe to it.
    devgate::webhooks::store::disable(
        &mut conn,
        devgate::identity::TenantId(tenant),
        uuid(&id),
        "manual",
        Utc::now(),
    )
    .await
    .unwrap();
    let req = v1::SendTestEventRequest {
        id: id.clone(),
        event_type: "credits.low".into(),
    };
    let low = c
        .send_test_event(bearer(req, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(low.event_type, "credits.low");
    assert_ne!(low.event_id, sent.event_id);

    // The event log shows each event's delivery.
    let got = c
        .get_event(bearer(
            v1::GetEventRequest {
                id: sent.event_id.clone(),
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.source, "user:admin-user");
    assert_eq!(
        got.deliveries,
        vec![v1::EventDelivery {
            webhook_id: id.clone(),
            delivery_id: sent.id.clone(),
            status: v1::WebhookDeliveryStatus::Pending as i32,
            attempts: 0,
            last_attempt_time: None,
        }]
    );
    let listed = c
        .list_events(bearer(v1::ListEventsRequest::default(), &token))
        .await
        .unwrap()
        .into_inner()
        .events;
    let deliveries_of = |event_id: &str| -> Vec<String> {
        listed
            .iter()
            .find(|e| e.id == event_id)
            .unwrap_or_else(|| panic!("{event_id} listed"))
            .deliveries
            .iter()
            .map(|d| d.delivery_id.clone())
            .collect()
    };
    assert_eq!(deliveries_of(&sent.event_id), [sent.id.as_str()]);
    assert_eq!(deliveries_of(&low.event_id), [low.id.as_str()]);
    // The endpoint's own `webhook_endpoint.created` event went to no endpoint.
    let created = listed
        .iter()
        .find(|e| e.event_type == "webhook_endpoint.created")
        .unwrap();
    assert!(created.deliveries.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_list_pages_filters_and_get_shows_the_attempt_log() {
    let w = api_world().await;
    let app = &w.app;
    let tenant = Uuid::new_v4();
    let token = admin_token(tenant);
    let (a, b) = (endpoint(app, &token).await, endpoint(app, &token).await);
    let mut conn = app.db().await;
    let t0 = Utc::now() - TimeDelta::days(10);
    let hour = TimeDelta::hours(1);
    let mut seeded = Vec::new();
    for (i, (event_type, status, attempts)) in [
        ("generation.completed", "succeeded", 1),
        ("generation.failed", "failed", 5),
        ("generation.completed", "pending", 2),
        ("generation.completed", "failed", 5),
        ("generation.queued", "succeeded", 1),
    ]
    .into_iter()
    .enumerate()
    {
        let time = t0 + hour * i as i32;
        seeded.push(seed(&mut conn, tenant, &a, event_type, status, attempts, time).await);
    }
    let d = |i: usize| seeded[i].1;
    // The same event also went to endpoint b: not in a's listing.
    let b_delivery = insert_delivery(
        &mut conn,
        Seed {
            tenant,
            endpoint: &b,
            event: seeded[3].0,
            event_type: "generation.completed",
            status: "succeeded",
            attempts: 1,
            time: t0 + hour * 3 + TimeDelta::milliseconds(1),
        },
    )
    .await;

    let mut c = client(app).await;
    let (lister, list_token) = (c.clone(), token.clone());
    let list = |r: v1::ListWebhookDeliveriesRequest| {
        let (mut c, token) = (lister.clone(), list_token.clone());
        async move {
            c.list_webhook_deliveries(bearer(r, &token))
                .await
                .map(|r| r.into_inner())
        }
    };
    let base = v1::ListWebhookDeliveriesRequest {
        webhook_id: a.clone(),
        ..Default::default()
    };

    // Pages of two, newest first.
    let mut pages = Vec::new();
    let mut token_in = String::new();
    loop {
        let page = list(v1::ListWebhookDeliveriesRequest {
            page_size: 2,
            page_token: token_in.clone(),
            ..base.clone()
        })
        .await
        .unwrap();
        assert!(page.deliveries.iter().all(|x| x.attempt_log.is_empty()));
        pages.push(ids(&page.deliveries));
        if page.next_page_token.is_empty() {
            break;
        }
        token_in = page.next_page_token;
    }
    assert_eq!(
        pages,
        vec![vec![d(4), d(3)], vec![d(2), d(1)], vec![d(0)]],
        "newest first"
    );

    // Filters: status, event type, time window (end exclusive), and together with paging.
    let failed = list(v1::ListWebhookDeliveriesRequest {
        status: v1::WebhookDeliveryStatus::Failed as i32,
        ..base.clone()
    })
    .await
    .unwrap();
    assert_eq!(ids(&failed.deliveries), [d(3), d(1)]);
    let completed = list(v1::ListWebhookDeliveriesRequest {
        event_type: "generation.completed".into(),
        ..base.clone()
    })
    .await
    .unwrap();
    assert_eq!(ids(&completed.deliveries), [d(3), d(2), d(0)]);
    let window = list(v1::ListWebhookDeliveriesRequest {
        start_time: ts(t0 + hour),
        end_time: ts(t0 + hour * 3),
        ..base.clone()
    })
    .await
    .unwrap();
    assert_eq!(ids(&window.deliveries), [d(2), d(1)]);
    let first = list(v1::ListWebhookDeliveriesRequest {
        status: v1::WebhookDeliveryStatus::Failed as i32,
        event_type: "generation.failed".into(),
        page_size: 1,
        ..base.clone()
    })
    .await
    .unwrap();
    assert_eq!(ids(&first.deliveries), [d(1)]);
    assert_eq!(first.next_page_token, "");
    let pending = &list(v1::ListWebhookDeliveriesRequest {
        status: v1::WebhookDeliveryStatus::Pending as i32,
        ..base.clone()
    })
    .await
    .unwrap()
    .deliveries[0];
    assert_eq!(pending.attempts, 2);
    assert_eq!(pending.last_status_code, 500);
    assert_eq!(pending.last_error, "status 500");
    assert!(pending.next_attempt_time.is_some());
    // Only pending deliveries show a next attempt.
    assert!(failed.deliveries[0].next_attempt_time.is_none());
    let b_listed = list(v1::ListWebhookDeliveriesRequest {
        webhook_id: b.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(ids(&b_listed.deliveries), [b_delivery]);

    // Get: the delivery with every attempt, oldest first (inserted out of order).
    use webhook_attempts::dsl as at;
    for (attempt, code, headers, kind, trigger) in [
        (
            2,
            Some(500),
            json!({"content-type": "text/plain", "retry-after": "30"}),
            "status",
            "manual",
        ),
        (1, None, json!({}), "timeout", "scheduled"),
    ] {
        diesel::insert_into(webhook_attempts::table)
            .values((
                at::delivery_id.eq(d(3)),
                at::attempt.eq(attempt),
                at::tenant_id.eq(tenant),
                at::endpoint_id.eq(uuid(&a)),
                at::attempt_time.eq(t0 + hour * 3 + TimeDelta::minutes(attempt.into())),
                at::url.eq(URL),
                at::status_code.eq(code),
                at::response_headers.eq(headers),
                at::response_body.eq(if code.is_some() { "oops" } else { "" }),
                at::latency_ms.eq(40 * attempt),
                at::error_kind.eq(kind),
                at::error_message.eq(format!("attempt {attempt} failed")),
                at::trigger.eq(trigger),
            ))
            .execute(&mut conn)
            .await
            .unwrap();
    }
    let got = c
        .get_webhook_delivery(bearer(
            v1::GetWebhookDeliveryRequest {
                webhook_id: a.clone(),
                id: d(3).to_string(),
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.event_id, seeded[3].0.to_string());
    assert_eq!(got.status(), v1::WebhookDeliveryStatus::Failed);
    let log = &got.attempt_log;
    assert_eq!(log.iter().map(|x| x.attempt).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(log[0].status_code, 0, "no response");
    assert_eq!(log[0].error_kind, "timeout");
    assert_eq!(log[0].trigger, "scheduled");
    assert!(log[0].response_headers.is_empty());
    assert_eq!(log[1].status_code, 500);
    assert_eq!(log[1].response_headers["retry-after"], "30");
    assert_eq!(log[1].response_headers["content-type"], "text/plain");
    assert_eq!(log[1].response_body, "oops");
    assert_eq!(log[1].latency_ms, 80);
    assert_eq!(log[1].error_message, "attempt 2 failed");
    assert_eq!(log[1].trigger, "manual");
    assert_eq!(log[1].url, URL);

    // A delivery of the tenant's other endpoint is not found under this one.
    let other = c
        .get_webhook_delivery(bearer(
            v1::GetWebhookDeliveryRequest {
                webhook_id: a.clone(),
                id: b_delivery.to_string(),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_refused(&other, Code::NotFound, "WEBHOOK_DELIVERY_NOT_FOUND");

    // The event sent to both endpoints shows both deliveries in the log.
    let event = c
        .get_event(bearer(
            v1::GetEventRequest {
                id: seeded[3].0.to_string(),
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut shown: Vec<(String, i32, i32)> = event
        .deliveries
        .iter()
        .map(|x| (x.webhook_id.clone(), x.status, x.attempts))
        .collect();
    shown.sort();
    let mut expected = vec![
        (a.clone(), v1::WebhookDeliveryStatus::Failed as i32, 5),
        (b.clone(), v1::WebhookDeliveryStatus::Succeeded as i32, 1),
    ];
    expected.sort();
    assert_eq!(shown, expected);
    assert!(
        event
            .deliveries
            .iter()
            .all(|x| x.last_attempt_time.is_some())
    );
    let listed = c
        .list_events(bearer(
            v1::ListEventsRequest {
                event_type: "generation.completed".into(),
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner()
        .events;
    let counts: Vec<usize> = listed.iter().map(|e| e.deliveries.len()).collect();
    assert_eq!(counts, [2, 1, 1], "newest first: d3 (a and b), d2, d0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_validation_names_the_fields() {
    let w = api_world().await;
    let app = &w.app;
    let tenant = Uuid::new_v4();
    let token = admin_token(tenant);
    let id = endpoint(app, &token).await;
    let mut c = client(app).await;
    let now = Utc::now();

    let bad = c
        .list_webhook_deliveries(bearer(
            v1::ListWebhookDeliveriesRequest {
                webhook_id: "we_1".into(),
                page_size: 101,
                page_token: "not-a-token".into(),
                status: 42,
                event_type: "x".repeat(201),
                start_time: ts(now),
                end_time: ts(now - TimeDelta::hours(1)),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let mut fields = field_violations(&bad);
    fields.sort();
    assert_eq!(
        fields,
        [
            "end_time",
            "event_type",
            "page_size",
            "page_token",
            "status",
            "webhook_id"
        ]
    );
    let wide = c
        .list_webhook_deliveries(bearer(
            v1::ListWebhookDeliveriesRequest {
                webhook_id: id.clone(),
                start_time: ts(now - TimeDelta::days(94)),
                end_time: ts(now),
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(field_violations(&wide), ["end_time"]);
    let invalid_time = c
        .list_webhook_deliveries(bearer(
            v1::ListWebhookDeliveriesRequest {
                webhook_id: id.clone(),
                start_time: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1,
                }),
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(field_violations(&invalid_time), ["start_time"]);

    let get = c
        .get_webhook_delivery(bearer(
            v1::GetWebhookDeliveryRequest {
                webhook_id: "nope".into(),
                id: "nope".into(),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(field_violations(&get), ["webhook_id", "id"]);
    let retry = c
        .retry_webhook_delivery(bearer(
            v1::RetryWebhookDeliveryRequest {
                webhook_id: id.clone(),
                id: "d_1".into(),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(field_violations(&retry), ["id"]);

    let test_event = |event_type: String| v1::SendTestEventRequest {
        id: id.clone(),
        event_type,
    };
    let unknown = c
        .send_test_event(bearer(test_event("nope.never".into()), &token))
        .await
        .unwrap_err();
    assert_eq!(field_violations(&unknown), ["event_type"]);
    assert!(unknown.message().contains("nope.never"), "{unknown:?}");
    let long = c
        .send_test_event(bearer(test_event("g.".repeat(101)), &token))
        .await
        .unwrap_err();
    assert_eq!(field_violations(&long), ["event_type"]);
    let bad_id = c
        .send_test_event(bearer(
            v1::SendTestEventRequest {
                id: "x".into(),
                event_type: String::new(),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(field_violations(&bad_id), ["id"]);

    let recover =
        |id: &str, since: Option<prost_types::Timestamp>| v1::RecoverWebhookDeliveriesRequest {
            id: id.to_string(),
            since,
        };
    for (req, fields) in [
        (recover(&id, None), vec!["since"]),
        (recover(&id, ts(now + TimeDelta::hours(1))), vec!["since"]),
        (recover(&id, ts(now - TimeDelta::days(15))), vec!["since"]),
        (recover("x", ts(now)), vec!["id"]),
        (recover("", None), vec!["id", "since"]),
    ] {
        let status = c
            .recover_webhook_deliveries(bearer(req.clone(), &token))
            .await
            .unwrap_err();
        assert_eq!(field_violations(&status), fields, "{req:?}");
    }
    let recent = c
        .recover_webhook_deliveries(bearer(recover(&id, ts(now - TimeDelta::days(13))), &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(recent.recovered, 0, "nothing failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_of_another_tenant_are_not_found_and_scopes_hold() {
    let w = api_world().await;
    let app = &w.app;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let (admin_a, admin_b) = (admin_token(a), admin_token(b));
    let id = endpoint(app, &admin_a).await;
    let empty = endpoint(app, &admin_a).await;
    let mut conn = app.db().await;
    let (_, delivery) = seed(
        &mut conn,
        a,
        &id,
        "generation.failed",
        "failed",
        5,
        Utc::now() - TimeDelta::hours(1),
    )
    .await;
    let delivery = delivery.to_string();
    let mut c = client(app).await;

    // Tenant b learns nothing of a's endpoint or delivery: NOT_FOUND for all five RPCs.
    let not_found = |r: Result<(), tonic::Status>, rpc: &str| {
        let status = r.expect_err(rpc);
        assert_eq!(status.code(), Code::NotFound, "{rpc}: {status:?}");
        assert!(!status.message().contains(&a.to_string()), "{rpc}");
    };
    let test = v1::SendTestEventRequest {
        id: id.clone(),
        event_type: String::new(),
    };
    not_found(
        c.send_test_event(bearer(test, &admin_b)).await.map(drop),
        "test",
    );
    let recover = v1::RecoverWebhookDeliveriesRequest {
        id: id.clone(),
        since: ts(Utc::now() - TimeDelta::days(1)),
    };
    not_found(
        c.recover_webhook_deliveries(bearer(recover.clone(), &admin_b))
            .await
            .map(drop),
        "recover",
    );
    // Also an endpoint without deliveries: an empty page would tell it exists.
    for webhook_id in [&id, &empty] {
        let list = v1::ListWebhookDeliveriesRequest {
            webhook_id: webhook_id.clone(),
            ..Default::default()
        };
        not_found(
            c.list_webhook_deliveries(bearer(list, &admin_b))
                .await
                .map(drop),
            "list",
        );
    }
    let get = v1::GetWebhookDeliveryRequest {
        webhook_id: id.clone(),
        id: delivery.clone(),
    };
    not_found(
        c.get_webhook_delivery(bearer(get.clone(), &admin_b))
            .await
            .map(drop),
        "get",
    );
    let retry = v1::RetryWebhookDeliveryRequest {
        webhook_id: id.clone(),
        id: delivery.clone(),
    };
    not_found(
        c.retry_webhook_delivery(bearer(retry.clone(), &admin_b))
            .await
            .map(drop),
        "retry",
    );
    // b's own endpoint with a's delivery id: still not found.
    let own = endpoint(app, &admin_b).await;
    let crossed = v1::GetWebhookDeliveryRequest {
        webhook_id: own.clone(),
        id: delivery.clone(),
    };
    not_found(
        c.get_webhook_delivery(bearer(crossed, &admin_b))
            .await
            .map(drop),
        "get under b's endpoint",
    );
    let crossed = v1::RetryWebhookDeliveryRequest {
        webhook_id: own,
        id: delivery.clone(),
    };
    not_found(
        c.retry_webhook_delivery(bearer(crossed, &admin_b))
            .await
            .map(drop),
        "retry under b's endpoint",
    );
    // a's events do not show up for b, nor their deliveries.
    let b_events = c
        .list_events(bearer(v1::ListEventsRequest::default(), &admin_b))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(b_events.iter().all(|e| e.deliveries.is_empty()));
    // a sees its empty endpoint's (empty) listing.
    let listed = c
        .list_webhook_deliveries(bearer(
            v1::ListWebhookDeliveriesRequest {
                webhook_id: empty.clone(),
                ..Default::default()
            },
            &admin_a,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.deliveries.is_empty());

    // A read-only key reads, and may not test, retry or recover.
    let (_, reader) = create_key(app, a, &["webhooks:read"]).await;
    let list = v1::ListWebhookDeliveriesRequest {
        webhook_id: id.clone(),
        ..Default::default()
    };
    let seen = c
        .list_webhook_deliveries(api_key(list.clone(), &reader))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seen.deliveries.len(), 1);
    c.get_webhook_delivery(api_key(get.clone(), &reader))
        .await
        .unwrap();
    let denied = |r: Result<(), tonic::Status>, rpc: &str| {
        let status = r.expect_err(rpc);
        assert_refused(&status, Code::PermissionDenied, "PERMISSION_DENIED");
    };
    let test = v1::SendTestEventRequest {
        id: id.clone(),
        event_type: String::new(),
    };
    denied(
        c.send_test_event(api_key(test, &reader)).await.map(drop),
        "test",
    );
    denied(
        c.retry_webhook_delivery(api_key(retry.clone(), &reader))
            .await
            .map(drop),
        "retry",
    );
    denied(
        c.recover_webhook_deliveries(api_key(recover.clone(), &reader))
            .await
            .map(drop),
        "recover",
    );
    // A key without any webhooks scope reads nothing either.
    let (_, stranger) = create_key(app, a, &["usage:read"]).await;
    denied(
        c.list_webhook_deliveries(api_key(list, &stranger))
            .await
            .map(drop),
        "list",
    );
    denied(
        c.get_webhook_delivery(api_key(get, &stranger))
            .await
            .map(drop),
        "get",
    );
    // A write key may (the task is checked in the RabbitMQ test).
    let (_, writer) = create_key(app, a, &["webhooks:write"]).await;
    c.retry_webhook_delivery(api_key(retry, &writer))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_retry_and_recover_queue_manual_tasks_on_rabbitmq() {
    let w = api_world().await;
    let app = &w.app;
    let tenant = Uuid::new_v4();
    let token = admin_token(tenant);
    let (id, other) = (endpoint(app, &token).await, endpoint(app, &token).await);
    let mut c = client(app).await;
    let now = Utc::now();

    // A test event's delivery: SendTestEvent itself queues nothing (the fan-out does), the
    // retry queues attempt 1, manual.
    let sent = c
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
    let retry = |webhook_id: &str, delivery: Uuid| v1::RetryWebhookDeliveryRequest {
        webhook_id: webhook_id.to_string(),
        id: delivery.to_string(),
    };
    let retried = c
        .retry_webhook_delivery(bearer(retry(&id, uuid(&sent.id)), &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried.id, sent.id);
    assert_eq!(retried.status(), v1::WebhookDeliveryStatus::Pending);
    assert_eq!(take_tasks(app).await, [manual_task(uuid(&sent.id), 1)]);

    // Failed deliveries: two of this endpoint since T, one before T, one of another
    // endpoint, one that succeeded.
    let mut conn = app.db().await;
    let since = now - TimeDelta::days(3);
    let (_, old) = seed(
        &mut conn,
        tenant,
        &id,
        "generation.failed",
        "failed",
        5,
        now - TimeDelta::days(4),
    )
    .await;
    let (_, f1) = seed(
        &mut conn,
        tenant,
        &id,
        "generation.failed",
        "failed",
        5,
        now - TimeDelta::days(2),
    )
    .await;
    let (_, f2) = seed(
        &mut conn,
        tenant,
        &id,
        "generation.completed",
        "failed",
        6,
        now - TimeDelta::hours(1),
    )
    .await;
    seed(
        &mut conn,
        tenant,
        &other,
        "generation.failed",
        "failed",
        5,
        now - TimeDelta::days(1),
    )
    .await;
    let (_, ok) = seed(
        &mut conn,
        tenant,
        &id,
        "generation.queued",
        "succeeded",
        1,
        now - TimeDelta::days(1),
    )
    .await;

    // Retry of a failed delivery: returned as it is (failed, 5 attempts), attempt 6 queued.
    let retried = c
        .retry_webhook_delivery(bearer(retry(&id, f1), &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried.status(), v1::WebhookDeliveryStatus::Failed);
    assert_eq!(retried.attempts, 5);
    assert_eq!(take_tasks(app).await, [manual_task(f1, 6)]);
    // A succeeded delivery may be sent again too.
    c.retry_webhook_delivery(bearer(retry(&id, ok), &token))
        .await
        .unwrap();
    assert_eq!(take_tasks(app).await, [manual_task(ok, 2)]);

    // Recover: the failed ones since T, oldest first.
    let recovered = c
        .recover_webhook_deliveries(bearer(
            v1::RecoverWebhookDeliveriesRequest {
                id: id.clone(),
                since: ts(since),
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(recovered.recovered, 2);
    assert_eq!(
        take_tasks(app).await,
        [manual_task(f1, 6), manual_task(f2, 7)]
    );

    // Disabled: no retry or recover, except the endpoint's own test events.
    devgate::webhooks::store::disable(
        &mut conn,
        devgate::identity::TenantId(tenant),
        uuid(&id),
        "consecutive_failures",
        Utc::now(),
    )
    .await
    .unwrap();
    let refused = c
        .retry_webhook_delivery(bearer(retry(&id, old), &token))
        .await
        .unwrap_err();
    assert_refused(&refused, Code::FailedPrecondition, "FAILED_PRECONDITION");
    assert!(refused.message().contains("enable it first"), "{refused:?}");
    let refused = c
        .recover_webhook_deliveries(bearer(
            v1::RecoverWebhookDeliveriesRequest {
                id: id.clone(),
                since: ts(since),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_refused(&refused, Code::FailedPrecondition, "FAILED_PRECONDITION");
    c.retry_webhook_delivery(bearer(retry(&id, uuid(&sent.id)), &token))
        .await
        .unwrap();
    assert_eq!(take_tasks(app).await, [manual_task(uuid(&sent.id), 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_recover_queues_every_failed_delivery_in_chunks() {
    let w = api_world().await;
    let app = &w.app;
    let tenant = Uuid::new_v4();
    let token = admin_token(tenant);
    let id = endpoint(app, &token).await;
    let mut conn = app.db().await;
    // 1,201 failed deliveries (three publish chunks), each of its own event.
    diesel::sql_query(
        "WITH ev AS ( \
             INSERT INTO events (id, tenant_id, event_type, payload, source, create_time) \
             SELECT gen_random_uuid(), $1, 'generation.failed', '{}', 'service:test', \
                    now() - make_interval(secs => n) \
             FROM generate_series(1, 1201) AS n \
             RETURNING id, create_time \
         ) \
         INSERT INTO webhook_deliveries (id, tenant_id, endpoint_id, event_id, event_type, \
                                         status, attempts, create_time) \
         SELECT gen_random_uuid(), $1, $2, id, 'generation.failed', 'failed', 5, create_time \
         FROM ev",
    )
    .bind::<diesel::sql_types::Uuid, _>(tenant)
    .bind::<diesel::sql_types::Uuid, _>(uuid(&id))
    .execute(&mut conn)
    .await
    .unwrap();
    let recovered = client(app)
        .await
        .recover_webhook_deliveries(bearer(
            v1::RecoverWebhookDeliveriesRequest {
                id: id.clone(),
                since: ts(Utc::now() - TimeDelta::days(1)),
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(recovered.recovered, 1201);
    let tasks = take_tasks(app).await;
    assert_eq!(tasks.len(), 1201);
    let distinct: std::collections::HashSet<&str> = tasks
        .iter()
        .map(|t| t["delivery_id"].as_str().unwrap())
        .collect();
    assert_eq!(distinct.len(), 1201);
    assert!(
        tasks
            .iter()
            .all(|t| t["attempt"] == 6 && t["manual"] == true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_retry_answers_unavailable_while_rabbitmq_is_down() {
    // Nothing listens on port 1: every connect is refused at once.
    let w = World::with_roles(Roles::API, |s| {
        loopback_allowed(s).set("DEVGATE_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
    })
    .await;
    let app = &w.app;
    let tenant = Uuid::new_v4();
    let token = admin_token(tenant);
    let id = endpoint(app, &token).await;
    let mut conn = app.db().await;
    let (_, failed) = seed(
        &mut conn,
        tenant,
        &id,
        "generation.failed",
        "failed",
        5,
        Utc::now() - TimeDelta::hours(1),
    )
    .await;
    let mut c = client(app).await;
    let down = c
        .retry_webhook_delivery(bearer(
            v1::RetryWebhookDeliveryRequest {
                webhook_id: id.clone(),
                id: failed.to_string(),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_refused(&down, Code::Unavailable, "MESSAGE_QUEUE_UNAVAILABLE");
    assert!(down.metadata().get("retry-after").is_some());
    let down = c
        .recover_webhook_deliveries(bearer(
            v1::RecoverWebhookDeliveriesRequest {
                id: id.clone(),
                since: ts(Utc::now() - TimeDelta::days(1)),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_refused(&down, Code::Unavailable, "MESSAGE_QUEUE_UNAVAILABLE");
    // Reads and SendTestEvent need no RabbitMQ.
    c.send_test_event(bearer(
        v1::SendTestEventRequest {
            id: id.clone(),
            event_type: String::new(),
        },
        &token,
    ))
    .await
    .unwrap();
}

async fn rest(
    e: &Edge,
    method: Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = e.http.request(method, e.url(path)).bearer_auth(token);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    };
    (status, body)
}

fn rest_fields(body: &Value) -> Vec<String> {
    body["details"][0]["field_violations"]
        .as_array()
        .unwrap_or_else(|| panic!("BadRequest details in {body}"))
        .iter()
        .map(|v| v["field"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_every_rest_path_through_envoy_and_grpcurl() {
    let e = Edge::on(api_world().await).await;
    let app = &e.world.app;
    let tenant = Uuid::new_v4();
    let token = admin_token(tenant);
    let id = endpoint(app, &token).await;
    use Method as M;

    // Test event.
    let (status, sent) = rest(
        &e,
        M::POST,
        &format!("/v1/webhooks/{id}:test"),
        &token,
        Some(json!({"event_type": "credits.low"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{sent}");
    assert_eq!(sent["webhook_id"], id.as_str());
    assert_eq!(sent["event_type"], "credits.low");
    assert_eq!(sent["status"], "WEBHOOK_DELIVERY_STATUS_PENDING");
    assert_eq!(sent["attempts"], 0);
    let delivery = sent["id"].as_str().unwrap().to_string();
    let event = sent["event_id"].as_str().unwrap().to_string();
    let (status, bad) = rest(
        &e,
        M::POST,
        &format!("/v1/webhooks/{id}:test"),
        &token,
        Some(json!({"event_type": "nope.never"})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    assert_eq!(rest_fields(&bad), ["event_type"]);

    // List (with a filter) and get.
    let (status, listed) = rest(
        &e,
        M::GET,
        &format!(
            "/v1/webhooks/{id}/deliveries?status=WEBHOOK_DELIVERY_STATUS_PENDING&event_type=credits.low&page_size=10"
        ),
        &token,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    assert_eq!(listed["deliveries"][0]["id"], delivery.as_str());
    assert_eq!(listed["next_page_token"], "");
    let (status, none) = rest(
        &e,
        M::GET,
        &format!("/v1/webhooks/{id}/deliveries?status=WEBHOOK_DELIVERY_STATUS_FAILED"),
        &token,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(none["deliveries"], json!([]));
    let (status, got) = rest(
        &e,
        M::GET,
        &format!("/v1/webhooks/{id}/deliveries/{delivery}"),
        &token,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["event_id"], event.as_str());
    assert_eq!(got["attempt_log"], json!([]));

    // The event log shows the delivery.
    let (status, logged) = rest(&e, M::GET, &format!("/v1/events/{event}"), &token, None).await;
    assert_eq!(status, StatusCode::OK, "{logged}");
    assert_eq!(logged["deliveries"][0]["delivery_id"], delivery.as_str());
    assert_eq!(logged["deliveries"][0]["webhook_id"], id.as_str());
    assert_eq!(
        logged["deliveries"][0]["status"],
        "WEBHOOK_DELIVERY_STATUS_PENDING"
    );
    let (status, log) = rest(
        &e,
        M::GET,
        "/v1/events?event_type=credits.low",
        &token,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{log}");
    assert_eq!(
        log["events"][0]["deliveries"][0]["delivery_id"],
        delivery.as_str()
    );

    // Retry: the task reaches the test's deliveries queue.
    let (status, retried) = rest(
        &e,
        M::POST,
        &format!("/v1/webhooks/{id}/deliveries/{delivery}:retry"),
        &token,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{retried}");
    assert_eq!(retried["id"], delivery.as_str());
    assert_eq!(take_tasks(app).await, [manual_task(uuid(&delivery), 1)]);

    // Recover: a failed delivery since yesterday.
    let mut conn = app.db().await;
    let (_, failed) = seed(
        &mut conn,
        tenant,
        &id,
        "generation.failed",
        "failed",
        5,
        Utc::now() - TimeDelta::hours(2),
    )
    .await;
    let since = (Utc::now() - TimeDelta::days(1)).to_rfc3339();
    let (status, recovered) = rest(
        &e,
        M::POST,
        &format!("/v1/webhooks/{id}:recover"),
        &token,
        Some(json!({ "since": since })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{recovered}");
    assert_eq!(recovered["recovered"], 1);
    assert_eq!(take_tasks(app).await, [manual_task(failed, 6)]);
    let (status, bad) = rest(
        &e,
        M::POST,
        &format!("/v1/webhooks/{id}:recover"),
        &token,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    assert_eq!(rest_fields(&bad), ["since"]);

    // Another tenant: 404 on every path.
    let stranger = admin_token(Uuid::new_v4());
    for (method, path, body) in [
        (M::POST, format!("/v1/webhooks/{id}:test"), Some(json!({}))),
        (
            M::POST,
            format!("/v1/webhooks/{id}:recover"),
            Some(json!({ "since": since })),
        ),
        (M::GET, format!("/v1/webhooks/{id}/deliveries"), None),
        (
            M::GET,
            format!("/v1/webhooks/{id}/deliveries/{delivery}"),
            None,
        ),
        (
            M::POST,
            format!("/v1/webhooks/{id}/deliveries/{delivery}:retry"),
            Some(json!({})),
        ),
    ] {
        let (status, body) = rest(&e, method, &path, &stranger, body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
    }

    // grpcurl on the public listener.
    let public = app.public.to_string();
    let data = json!({"webhook_id": id}).to_string();
    let header = format!("authorization: Bearer {token}");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(envoy::grpcurl_binary())
            .args([
                "-plaintext",
                "-H",
                &header,
                "-d",
                &data,
                &public,
                "devgate.v1.WebhookService/ListWebhookDeliveries",
            ])
            .output()
            .expect("run grpcurl")
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let found: Vec<&str> = listed["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(found.len(), 2);
    assert!(found.contains(&delivery.as_str()), "{listed}");
    assert!(found.contains(&failed.to_string().as_str()), "{listed}");
}
