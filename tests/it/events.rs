//! The tenant's event log: PublishEvent on the internal listener (service tokens, callers
//! allowed or not, validation naming fields, Stripe-like idempotency), each published event
//! on RabbitMQ exactly once, and ListEvents/GetEvent through the real Envoy (paging,
//! filters, tenant isolation, scopes); grpcurl against the internal listener.

use std::time::Duration;

use devgate::{
    auth::service_token::config_entry,
    events::outbox::EventMessage,
    mq::{Mq, MqConfig, QueueType},
    proto::internal::v1::{self as internal, webhook_service_client::WebhookServiceClient},
    proto::json::json_to_struct,
};
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tonic::Code;
use tonic_types::StatusExt;
use uuid::Uuid;

use crate::harness::{envoy::Edge, *};

const PIPELINE_TOKEN: &str = "dgs_pipeline-service-token-for-the-events-tests-00001";
const BILLING_TOKEN: &str = "dgs_billing-service-token-for-the-events-tests-000001";

type Publisher = WebhookServiceClient<Intercepted>;

/// `test-suite` (every RPC), `pipeline` (PublishEvent only), `billing` (GrantCredits only).
fn callers() -> String {
    format!(
        "{};{};{}",
        config_entry("test-suite", SERVICE_TOKEN, &[]),
        config_entry(
            "pipeline",
            PIPELINE_TOKEN,
            &["WebhookService/PublishEvent".into()]
        ),
        config_entry(
            "billing",
            BILLING_TOKEN,
            &["UsageService/GrantCredits".into()]
        ),
    )
}

async fn publisher(app: &TestApp, token: &str) -> Publisher {
    WebhookServiceClient::with_interceptor(channel(app.internal).await, ServiceAuth::new(token))
}

fn publish_req(
    tenant: Uuid,
    event_type: &str,
    payload: Value,
    key: &str,
) -> internal::PublishEventRequest {
    internal::PublishEventRequest {
        tenant_id: tenant.to_string(),
        event_type: event_type.into(),
        payload: json_to_struct(&payload),
        idempotency_id: key.into(),
    }
}

fn low_balance(balance: i64) -> Value {
    json!({"balance": balance, "threshold": 200, "check_time": "2026-11-23T10:20:00Z"})
}

fn fields(status: &tonic::Status) -> Vec<String> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    field_violations(status)
}

/// A queue bound with `#` to the events exchange of `prefix` (declared here, as the relay
/// would), consuming without acks.
async fn bind_queue(prefix: &str) -> (lapin::Channel, lapin::Consumer) {
    let mq = Mq::new(MqConfig {
        url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_string().into(),
        queue_type: QueueType::Classic,
        prefix: prefix.to_string(),
    });
    let (channel, consumer, _) = crate::harness::mq::bind_all(&mq, "events-test").await;
    (channel, consumer)
}

/// Every message until none arrived for `quiet` (at least one within 20 s).
async fn drain(
    consumer: &mut lapin::Consumer,
    quiet: Duration,
) -> Vec<(String, String, EventMessage)> {
    let mut got = Vec::new();
    loop {
        let wait = if got.is_empty() {
            Duration::from_secs(20)
        } else {
            quiet
        };
        match tokio::time::timeout(wait, consumer.next()).await {
            Ok(Some(d)) => {
                let d = d.expect("delivery");
                got.push((
                    d.properties.message_id().as_ref().unwrap().to_string(),
                    d.routing_key.to_string(),
                    serde_json::from_slice(&d.data).expect("the body is an event"),
                ));
            }
            Ok(None) => panic!("the consumer ended"),
            Err(_) if got.is_empty() => panic!("no event reached RabbitMQ"),
            Err(_) => return got,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_publish_auth_validation_idempotency_and_rabbitmq() {
    let prefix = format!("devgate-test-{}", Uuid::new_v4().simple());
    let w = World::with(|s| {
        s.set("DEVGATE_SERVICE_TOKENS", &callers())
            .set("DEVGATE_RABBITMQ_PREFIX", &prefix)
    })
    .await;
    let app = &w.app;
    let (_mq_channel, mut consumer) = bind_queue(&prefix).await;
    let tenant = Uuid::new_v4();
    let mut pipeline = publisher(app, PIPELINE_TOKEN).await;

    // No token: 401; a caller not allowed PublishEvent: 403; nothing is appended.
    let mut anonymous = WebhookServiceClient::new(channel(app.internal).await);
    let status = anonymous
        .publish_event(publish_req(tenant, "credits.low", low_balance(180), "k-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = publisher(app, BILLING_TOKEN)
        .await
        .publish_event(publish_req(tenant, "credits.low", low_balance(180), "k-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    // The public listener does not serve it at all, even to an authenticated tenant admin.
    let status = WebhookServiceClient::with_interceptor(
        channel(app.public).await,
        ServiceAuth::new(&admin_token(tenant)),
    )
    .publish_event(publish_req(tenant, "credits.low", low_balance(180), "k-1"))
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");

    // Allowed by an explicit list: the event, its source naming the caller.
    let first = pipeline
        .publish_event(publish_req(tenant, "credits.low", low_balance(180), "k-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.duplicate);
    let event = first.event.clone().unwrap();
    assert_eq!(Uuid::parse_str(&event.id).unwrap().get_version_num(), 7);
    assert_eq!(event.event_type, "credits.low");
    assert_eq!(event.source, "service:pipeline");
    assert_eq!(event.idempotency_id, "k-1");
    assert_eq!(event.payload, json_to_struct(&low_balance(180)));

    // The same key and event again: the first event, marked a duplicate.
    let again = pipeline
        .publish_event(publish_req(tenant, "credits.low", low_balance(180), "k-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(again.duplicate);
    assert_eq!(again.event, first.event);

    // The same key with another payload or type: refused, naming idempotency_id.
    for (event_type, payload) in [
        ("credits.low", low_balance(10)),
        (
            "credits.exhausted",
            json!({"balance": 0, "last_ledger_entry_id": 9, "exhaust_time": "2026-11-23T10:20:00Z"}),
        ),
    ] {
        let status = pipeline
            .publish_event(publish_req(tenant, event_type, payload, "k-1"))
            .await
            .unwrap_err();
        assert_eq!(fields(&status), ["idempotency_id"], "{status:?}");
        assert!(status.message().contains(&event.id), "{status:?}");
    }
    // The same key in another tenant is another event.
    let other = pipeline
        .publish_event(publish_req(
            Uuid::new_v4(),
            "credits.low",
            low_balance(180),
            "k-1",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!other.duplicate);
    let other_event = other.event.unwrap();
    assert_ne!(other_event.id, event.id);

    // Unknown type: a bad request on event_type (not a missing resource).
    let status = pipeline
        .publish_event(publish_req(tenant, "credits.stolen", low_balance(1), "k-2"))
        .await
        .unwrap_err();
    assert_eq!(fields(&status), ["event_type"], "{status:?}");

    // Schema violations name the payload's paths; values are not echoed.
    let status = pipeline
        .publish_event(publish_req(
            tenant,
            "credits.low",
            json!({"balance": -5, "threshold": "many", "check_time": "2026-11-23T10:20:00Z", "secret_note": "hunter2"}),
            "k-3",
        ))
        .await
        .unwrap_err();
    let found = fields(&status);
    for field in ["payload.balance", "payload.threshold"] {
        assert!(found.iter().any(|f| f == field), "{field}: {found:?}");
    }
    assert!(found.iter().all(|f| f.starts_with("payload")), "{found:?}");
    assert!(!format!("{status:?}").contains("hunter2"), "{status:?}");

    // Missing fields, all at once; an id of 201 characters; a payload over 256 KiB.
    let status = pipeline
        .publish_event(internal::PublishEventRequest::default())
        .await
        .unwrap_err();
    let mut found = fields(&status);
    found.sort();
    assert_eq!(
        found,
        ["event_type", "idempotency_id", "payload", "tenant_id"]
    );
    let status = pipeline
        .publish_event(publish_req(
            tenant,
            "credits.low",
            low_balance(1),
            &"k".repeat(201),
        ))
        .await
        .unwrap_err();
    assert_eq!(fields(&status), ["idempotency_id"]);
    // What Postgres cannot store is a bad request, not an internal error: a control
    // character in the id, a NUL in a payload string or key.
    let status = pipeline
        .publish_event(publish_req(tenant, "credits.low", low_balance(1), "k\0nul"))
        .await
        .unwrap_err();
    assert_eq!(fields(&status), ["idempotency_id"]);
    let status = pipeline
        .publish_event(publish_req(
            tenant,
            "credits.low",
            json!({"balance": 1, "threshold": 2, "check_time": "a\0b", "x\0": 1}),
            "k-nul",
        ))
        .await
        .unwrap_err();
    let mut found = fields(&status);
    found.sort();
    found.dedup();
    assert!(
        found.contains(&"payload.check_time".to_string()),
        "{found:?}"
    );
    assert!(found.contains(&"payload.x\u{0}".to_string()), "{found:?}");
    let big =
        json!({"balance": 1, "threshold": 2, "check_time": "x", "pad": "p".repeat(256 * 1024)});
    let status = pipeline
        .publish_event(publish_req(tenant, "credits.low", big, "k-4"))
        .await
        .unwrap_err();
    assert_eq!(fields(&status), ["payload"], "{status:?}");
    assert!(
        format!("{:?}", status.get_error_details().bad_request()).contains("256 KiB"),
        "{status:?}"
    );
    // Under the limit, a large payload is judged by its schema.
    let status = pipeline
        .publish_event(publish_req(
            tenant,
            "generation.completed",
            json!({"pad": "p".repeat(200 * 1024)}),
            "k-5",
        ))
        .await
        .unwrap_err();
    assert!(
        fields(&status).iter().all(|f| f.starts_with("payload")),
        "{status:?}"
    );

    // Explicit lists are enforced: pipeline may not record usage.
    let status = internal::usage_service_client::UsageServiceClient::with_interceptor(
        channel(app.internal).await,
        ServiceAuth::new(PIPELINE_TOKEN),
    )
    .record_usage(internal::RecordUsageRequest {
        tenant_id: tenant.to_string(),
        metric: "generation_seconds".into(),
        quantity: 1,
        idempotency_id: "u-1".into(),
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // A `*` caller may publish too.
    let star = publisher(app, SERVICE_TOKEN)
        .await
        .publish_event(publish_req(
            tenant,
            "credits.exhausted",
            json!({"balance": 0, "last_ledger_entry_id": 9, "exhaust_time": "2026-11-23T10:20:00Z"}),
            "k-6",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(star.event.as_ref().unwrap().source, "service:test-suite");

    // grpcurl with the service token: a duplicate of k-1; the internal listener lists the
    // internal service only.
    let (addr, t) = (app.internal.to_string(), tenant.to_string());
    let (published, listed) = tokio::task::spawn_blocking(move || {
        let run = |args: &[&str]| {
            let out = std::process::Command::new(envoy::grpcurl_binary())
                .args(args)
                .output()
                .expect("run grpcurl");
            assert!(out.status.success(), "{args:?}: {out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        let body = json!({
            "tenant_id": t,
            "event_type": "credits.low",
            "payload": low_balance(180),
            "idempotency_id": "k-1",
        })
        .to_string();
        let auth = format!("authorization: Bearer {PIPELINE_TOKEN}");
        (
            run(&[
                "-plaintext",
                "-H",
                &auth,
                "-d",
                &body,
                &addr,
                "devgate.internal.v1.WebhookService/PublishEvent",
            ]),
            run(&["-plaintext", &addr, "list"]),
        )
    })
    .await
    .unwrap();
    let published: Value = serde_json::from_str(&published).unwrap();
    assert_eq!(published["duplicate"], true, "{published}");
    assert_eq!(published["event"]["id"], event.id.as_str(), "{published}");
    assert!(
        listed.contains("devgate.internal.v1.WebhookService"),
        "{listed}"
    );
    assert!(!listed.contains("devgate.v1.WebhookService"), "{listed}");

    // On RabbitMQ: each event exactly once (repeats and refusals publish nothing).
    let got = drain(&mut consumer, Duration::from_secs(2)).await;
    let mut ids: Vec<&str> = got.iter().map(|(id, _, _)| id.as_str()).collect();
    ids.sort();
    let mut expected = vec![
        event.id.as_str(),
        other_event.id.as_str(),
        star.event.as_ref().unwrap().id.as_str(),
    ];
    expected.sort();
    assert_eq!(
        ids,
        expected,
        "{:?}",
        got.iter().map(|g| &g.2).collect::<Vec<_>>()
    );
    let (_, routing_key, body) = got.iter().find(|(id, _, _)| *id == event.id).unwrap();
    assert_eq!(routing_key, "credits.low");
    assert_eq!(body.tenant_id, tenant);
    assert_eq!(body.source, "service:pipeline");
    assert_eq!(body.idempotency_id.as_deref(), Some("k-1"));
    assert_eq!(body.data, low_balance(180));
}

/// Concurrent PublishEvent calls are committed in groups (several events per statement and
/// commit): 300 calls, each of 100 (tenant, key) pairs three times at once, give exactly 100
/// events, each answered to its three callers with one id (one of them not a duplicate), and
/// each published once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_are_grouped_and_each_key_is_one_event() {
    let prefix = format!("devgate-test-{}", Uuid::new_v4().simple());
    let w = World::with(|s| {
        s.set("DEVGATE_SERVICE_TOKENS", &callers())
            .set("DEVGATE_RABBITMQ_PREFIX", &prefix)
    })
    .await;
    let app = &w.app;
    let (_mq_channel, mut consumer) = bind_queue(&prefix).await;
    let pipeline = publisher(app, PIPELINE_TOKEN).await;
    let tenants = [Uuid::new_v4(), Uuid::new_v4()];
    let calls: Vec<(Uuid, String)> = (0..3)
        .flat_map(|_| {
            tenants
                .iter()
                .flat_map(|t| (0..50).map(move |k| (*t, format!("key-{k}"))))
        })
        .collect();
    let answers: Vec<(Uuid, String, internal::PublishEventResponse)> =
        futures_util::stream::iter(calls)
            .map(|(tenant, key)| {
                let mut client = pipeline.clone();
                async move {
                    let answer = client
                        .publish_event(publish_req(tenant, "credits.low", low_balance(1), &key))
                        .await
                        .unwrap_or_else(|s| panic!("{tenant}/{key}: {s:?}"))
                        .into_inner();
                    (tenant, key, answer)
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
    let mut by_key: std::collections::HashMap<(Uuid, String), Vec<(String, bool)>> =
        std::collections::HashMap::new();
    for (tenant, key, answer) in answers {
        let event = answer.event.expect("the event");
        assert_eq!(event.idempotency_id, key);
        by_key
            .entry((tenant, key))
            .or_default()
            .push((event.id, answer.duplicate));
    }
    assert_eq!(by_key.len(), 100);
    for (key, answers) in &by_key {
        assert_eq!(answers.len(), 3, "{key:?}");
        assert!(
            answers.iter().all(|(id, _)| *id == answers[0].0),
            "{key:?}: {answers:?}"
        );
        let firsts = answers.iter().filter(|(_, duplicate)| !duplicate).count();
        assert_eq!(firsts, 1, "{key:?}: {answers:?}");
    }
    let published = drain(&mut consumer, Duration::from_secs(2)).await;
    let mut ids: Vec<&str> = published.iter().map(|(id, _, _)| id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 100, "each event published, none twice");
    assert_eq!(published.len(), 100);
    let mut expected: Vec<&str> = by_key.values().map(|a| a[0].0.as_str()).collect();
    expected.sort();
    assert_eq!(ids, expected);
}

async fn rest(e: &Edge, path: &str, token: &str) -> (StatusCode, Value) {
    let resp = e
        .http
        .request(Method::GET, e.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|err| panic!("not JSON ({err}): {text}"));
    (status, body)
}

fn ids(body: &Value) -> Vec<String> {
    body["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .map(|e| e["id"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_list_and_get_through_envoy() {
    let e = Edge::start().await;
    let app = &e.world.app;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let mut p = publisher(app, SERVICE_TOKEN).await;
    // Five events of tenant A (oldest first), one of tenant B.
    let mut published = Vec::new();
    for i in 0..5 {
        let req = if i % 2 == 0 {
            publish_req(a, "credits.low", low_balance(i), &format!("a-{i}"))
        } else {
            publish_req(
                a,
                "credits.exhausted",
                json!({"balance": 0, "last_ledger_entry_id": i + 1, "exhaust_time": "2026-11-23T10:20:00Z"}),
                &format!("a-{i}"),
            )
        };
        let event = p
            .publish_event(req)
            .await
            .unwrap()
            .into_inner()
            .event
            .unwrap();
        published.push(event);
    }
    let foreign = p
        .publish_event(publish_req(b, "credits.low", low_balance(7), "b-0"))
        .await
        .unwrap()
        .into_inner()
        .event
        .unwrap();
    let newest_first: Vec<String> = published.iter().rev().map(|e| e.id.clone()).collect();
    let token = admin_token(a);

    // Pages of two, newest first, every event once.
    let mut seen = Vec::new();
    let mut page_token = String::new();
    for page in 0.. {
        let (status, body) = rest(
            &e,
            &format!("/v1/events?page_size=2&page_token={page_token}"),
            &token,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let got = ids(&body);
        assert!(got.len() <= 2, "{body}");
        seen.extend(got);
        page_token = body["next_page_token"].as_str().unwrap_or("").to_string();
        if page_token.is_empty() {
            break;
        }
        assert!(page < 3, "too many pages");
    }
    assert_eq!(seen, newest_first);

    // The JSON shape.
    let (_, body) = rest(&e, "/v1/events?page_size=1", &token).await;
    let newest = &body["events"][0];
    assert_eq!(newest["event_type"], "credits.low");
    assert_eq!(newest["payload"], low_balance(4));
    assert_eq!(newest["source"], "service:test-suite");
    assert_eq!(newest["idempotency_id"], "a-4");
    assert!(
        newest["create_time"].as_str().unwrap().ends_with('Z'),
        "{newest}"
    );

    // Filters: by type; by time (start inclusive, end exclusive).
    let (status, body) = rest(&e, "/v1/events?event_type=credits.exhausted", &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        ids(&body),
        [newest_first[1].clone(), newest_first[3].clone()]
    );
    let time_of = |i: usize| {
        let t = published[i].create_time.unwrap();
        chrono::DateTime::from_timestamp(t.seconds, t.nanos as u32)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    };
    let (status, body) = rest(
        &e,
        &format!(
            "/v1/events?start_time={}&end_time={}",
            time_of(1),
            time_of(3)
        ),
        &token,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        ids(&body),
        [published[2].id.clone(), published[1].id.clone()]
    );
    let (status, body) = rest(
        &e,
        "/v1/events?start_time=2026-01-01T00:00:00Z&end_time=2026-04-04T00:00:01Z",
        &token,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        body["details"][0]["field_violations"][0]["field"], "end_time",
        "{body}"
    );
    let (status, body) = rest(&e, "/v1/events?page_token=garbage", &token).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // GetEvent; another tenant's event is 404 like a missing one; a non-UUID is 400.
    let (status, body) = rest(&e, &format!("/v1/events/{}", published[0].id), &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["id"], published[0].id.as_str());
    assert_eq!(body["payload"], low_balance(0));
    let (status, body) = rest(&e, &format!("/v1/events/{}", foreign.id), &token).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _) = rest(&e, &format!("/v1/events/{}", Uuid::now_v7()), &token).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = rest(&e, "/v1/events/evt_1", &token).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Tenant B sees only its own event.
    let (_, body) = rest(&e, "/v1/events", &admin_token(b)).await;
    assert_eq!(ids(&body), [foreign.id.as_str()]);

    // Scopes: webhooks:read lists; a key without it is refused.
    let (key, reader) = create_key(app, a, &["webhooks:read"]).await;
    let (status, body) = rest(&e, "/v1/events", &reader).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The five published, and newest the key's own `api_key.created`.
    assert_eq!(ids(&body).len(), 6);
    assert_eq!(body["events"][0]["event_type"], "api_key.created", "{body}");
    assert_eq!(body["events"][0]["payload"]["api_key_id"], key.id.as_str());
    let (_, other) = create_key(app, a, &["usage:read"]).await;
    let (status, body) = rest(&e, &format!("/v1/events/{}", published[0].id), &other).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
}
