//! The GenerationProxy (Create, Get, List, Cancel): one transaction charges the credits,
//! stores the generation, queues the orchestrator's job and the `generation.queued` event;
//! Idempotency-Key under concurrency; validation, insufficient credits, the monthly
//! generations quota; cancel refunds once; tenant isolation; every REST path through Envoy.

use std::time::Duration;

use devgate::{
    events::Catalog,
    proto::{
        internal::v1 as internal,
        upstream::orchestrator::v1::{GenerationCancel, GenerationJob, routing},
        v1::{self, generation_proxy_client::GenerationProxyClient},
    },
};
use diesel::{ExpressionMethods, QueryDsl};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures_util::StreamExt;
use lapin::{
    options::{
        BasicConsumeOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    types::FieldTable,
};
use prost::Message;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tonic::{Code, transport::Channel};
use tonic_types::StatusExt;
use uuid::Uuid;

use devgate::app::Roles;

use crate::harness::{envoy::Edge, *};

pub(crate) async fn client(app: &TestApp) -> GenerationProxyClient<Channel> {
    GenerationProxyClient::new(channel(app.public).await)
}

pub(crate) fn image(count: i32) -> v1::CreateGenerationRequest {
    v1::CreateGenerationRequest {
        kind: "image".into(),
        prompt: "a lighthouse at dusk".into(),
        output_format: "png".into(),
        count,
        project_id: "proj-1".into(),
        metadata: [("order".to_string(), "42".to_string())].into(),
        ..Default::default()
    }
}

fn with_key<T>(mut req: tonic::Request<T>, key: &str) -> tonic::Request<T> {
    req.metadata_mut()
        .insert("idempotency-key", key.parse().unwrap());
    req
}

pub(crate) async fn grant(app: &TestApp, tenant: Uuid, amount: i64) {
    app.internal_usage()
        .await
        .grant_credits(internal::GrantCreditsRequest {
            tenant_id: tenant.to_string(),
            amount,
            reason: "test grant".into(),
            idempotency_id: format!("grant-{}", Uuid::new_v4()),
            ..Default::default()
        })
        .await
        .expect("grant credits");
}

pub(crate) async fn balance(conn: &mut AsyncPgConnection, tenant: Uuid) -> i64 {
    use devgate::db::schema::credit_balances::dsl as b;
    b::credit_balances
        .filter(b::tenant_id.eq(tenant))
        .select(b::balance)
        .first(conn)
        .await
        .unwrap()
}

/// (amount, reason, idempotency_id) of the tenant's ledger, oldest first.
pub(crate) async fn ledger(
    conn: &mut AsyncPgConnection,
    tenant: Uuid,
) -> Vec<(i64, String, Option<String>)> {
    use devgate::db::schema::credit_ledger::dsl as l;
    l::credit_ledger
        .filter(l::tenant_id.eq(tenant))
        .order(l::id.asc())
        .select((l::amount, l::reason, l::idempotency_id))
        .load(conn)
        .await
        .unwrap()
}

async fn generation_count(conn: &mut AsyncPgConnection, tenant: Uuid) -> i64 {
    use devgate::db::schema::generations::dsl as g;
    g::generations
        .filter(g::tenant_id.eq(tenant))
        .count()
        .get_result(conn)
        .await
        .unwrap()
}

/// (type, payload) of the tenant's events, oldest first.
pub(crate) async fn events(conn: &mut AsyncPgConnection, tenant: Uuid) -> Vec<(String, Value)> {
    use devgate::db::schema::events::dsl as e;
    e::events
        .filter(e::tenant_id.eq(tenant))
        .order((e::create_time.asc(), e::id.asc()))
        .select((e::event_type, e::payload))
        .load(conn)
        .await
        .unwrap()
}

/// A queue bound to the test's jobs exchange (declared as the relay declares it), and its
/// consumer; deleted with the returned guard's exchange at the end of the test.
pub(crate) struct Jobs {
    channel: lapin::Channel,
    consumer: lapin::Consumer,
    exchange: String,
}

impl Jobs {
    pub(crate) async fn bind(app: &TestApp) -> Jobs {
        let mq = app.mq();
        let exchange = routing::default_jobs_exchange(&mq.config().prefix);
        let channel = mq.channel().await.expect("RabbitMQ at 127.0.0.1:5672");
        channel
            .exchange_declare(
                exchange.as_str().into(),
                lapin::ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                queue.name().as_str().into(),
                exchange.as_str().into(),
                "generation.*".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let consumer = channel
            .basic_consume(
                queue.name().as_str().into(),
                "generations-test".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        Jobs {
            channel,
            consumer,
            exchange,
        }
    }

    /// The next message: (routing key, type, message id, body).
    pub(crate) async fn next(&mut self) -> (String, String, String, Vec<u8>) {
        let delivery = tokio::time::timeout(Duration::from_secs(30), self.consumer.next())
            .await
            .expect("a message within 30 s")
            .expect("consumer open")
            .expect("delivery");
        let p = &delivery.properties;
        assert_eq!(
            p.content_type().as_ref().map(|c| c.as_str()),
            Some(routing::CONTENT_TYPE)
        );
        (
            delivery.routing_key.as_str().to_string(),
            p.kind().as_ref().map(|k| k.to_string()).unwrap_or_default(),
            p.message_id()
                .as_ref()
                .map(|k| k.to_string())
                .unwrap_or_default(),
            delivery.data.clone(),
        )
    }

    pub(crate) async fn delete(self) {
        let _ = self
            .channel
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_create_charges_queues_emits_and_cancel_refunds_once() {
    let w = World::new().await;
    let mut jobs = Jobs::bind(&w.app).await;
    let tenant = Uuid::new_v4();
    grant(&w.app, tenant, 100).await;
    let (key, token) = create_key(&w.app, tenant, &["generations:write", "generations:read"]).await;
    let mut c = client(&w.app).await;

    let created = c
        .create_generation(api_key(image(2), &token))
        .await
        .expect("create")
        .into_inner();
    assert_eq!(created.state, v1::GenerationState::Queued as i32);
    assert_eq!((created.cost, created.count), (20, 2));
    assert_eq!(created.created_by, format!("api_key:{}", key.id));
    assert!(!created.refunded);
    let id = Uuid::parse_str(&created.id).unwrap();
    assert_eq!(id.get_version_num(), 7);

    let mut conn = w.app.db().await;
    assert_eq!(generation_count(&mut conn, tenant).await, 1);
    assert_eq!(balance(&mut conn, tenant).await, 80);
    let entries = ledger(&mut conn, tenant).await;
    assert_eq!(entries.len(), 2);
    assert_eq!(
        entries[1],
        (-20, "generation".into(), Some(format!("generation:{id}")))
    );

    // The job on the orchestrator's exchange, as the relay published it.
    let (routing_key, kind, message_id, body) = jobs.next().await;
    assert_eq!(routing_key, routing::JOB_ROUTING_KEY);
    assert_eq!(kind, "upstream.orchestrator.v1.GenerationJob");
    assert_eq!(message_id, created.id);
    let job = GenerationJob::decode(body.as_slice()).unwrap();
    assert_eq!(job.generation_id, created.id);
    assert_eq!(job.tenant_id, tenant.to_string());
    assert_eq!(
        (job.kind.as_str(), job.output_format.as_str(), job.count),
        ("image", "png", 2)
    );
    assert_eq!(job.prompt, "a lighthouse at dusk");
    assert_eq!(job.project_id, "proj-1");
    assert_eq!(job.metadata["order"], "42");
    assert_eq!(job.requested_by, created.created_by);

    // Get and List answer the same generation.
    let got = c
        .get_generation(api_key(
            v1::GetGenerationRequest {
                id: created.id.clone(),
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, created);

    // Cancel: CANCELLED, refunded once, the cancel message, the event.
    let cancel = |id: &str| api_key(v1::CancelGenerationRequest { id: id.to_string() }, &token);
    let cancelled = c
        .cancel_generation(cancel(&created.id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state, v1::GenerationState::Cancelled as i32);
    assert!(cancelled.refunded);
    assert_eq!(cancelled.error.as_ref().unwrap().code, "CANCELLED");
    assert!(cancelled.end_time.is_some());
    let again = c.cancel_generation(cancel(&created.id)).await.unwrap_err();
    assert_refused(&again, Code::FailedPrecondition, "GENERATION_ENDED");
    assert_eq!(balance(&mut conn, tenant).await, 100);
    let refunds: Vec<_> = ledger(&mut conn, tenant)
        .await
        .into_iter()
        .filter(|e| e.0 > 0 && e.1 == "generation_refund")
        .collect();
    assert_eq!(
        refunds,
        [(
            20,
            "generation_refund".into(),
            Some(format!("generation-refund:{id}"))
        )]
    );
    let (routing_key, kind, _, body) = jobs.next().await;
    assert_eq!(routing_key, routing::CANCEL_ROUTING_KEY);
    assert_eq!(kind, "upstream.orchestrator.v1.GenerationCancel");
    let message = GenerationCancel::decode(body.as_slice()).unwrap();
    assert_eq!(message.generation_id, created.id);
    assert_eq!(message.tenant_id, tenant.to_string());

    // The events, each valid against its catalog schema.
    let catalog = Catalog::load(&mut conn).await.unwrap();
    let generation_events: Vec<_> = events(&mut conn, tenant)
        .await
        .into_iter()
        .filter(|(t, _)| t.starts_with("generation."))
        .collect();
    let types: Vec<_> = generation_events.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(types, ["generation.queued", "generation.cancelled"]);
    for (t, payload) in &generation_events {
        catalog.validate(t, payload).unwrap();
        assert_eq!(payload["generation_id"], json!(created.id));
        assert_eq!(payload["api_key_id"], json!(key.id));
    }
    assert_eq!(generation_events[0].1["credits_charged"], json!(20));
    assert_eq!(generation_events[1].1["credits_refunded"], json!(20));
    jobs.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_refuse_bad_requests_naming_fields_and_insufficient_credits() {
    let w = World::with_roles(Roles::API, |s| s).await;
    let tenant = Uuid::new_v4();
    let token = admin_token(tenant);
    let mut c = client(&w.app).await;

    let bad = v1::CreateGenerationRequest {
        kind: "image".into(),
        prompt: "x".repeat(4001),
        output_format: "mp4".into(),
        count: 9,
        project_id: "p".repeat(201),
        metadata: (0..17).map(|i| (format!("k{i}"), "v".into())).collect(),
        ..Default::default()
    };
    let status = c.create_generation(bearer(bad, &token)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let fields = field_violations(&status);
    for f in ["prompt", "count", "output_format", "project_id", "metadata"] {
        assert!(fields.iter().any(|x| x == f), "{f} in {fields:?}");
    }
    let unknown = v1::CreateGenerationRequest {
        kind: "hologram".into(),
        ..image(1)
    };
    let status = c
        .create_generation(bearer(unknown, &token))
        .await
        .unwrap_err();
    assert_eq!(field_violations(&status), ["kind"]);
    // What Postgres cannot store (U+0000) is a bad request, not an internal error.
    let nul = v1::CreateGenerationRequest {
        prompt: "a\0b".into(),
        project_id: "p\0".into(),
        metadata: [("k".to_string(), "v\0".to_string())].into(),
        style: devgate::proto::json::json_to_struct(&serde_json::json!({"s": "\0"})),
        ..image(1)
    };
    let status = c.create_generation(bearer(nul, &token)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let mut fields = field_violations(&status);
    fields.sort();
    assert_eq!(fields, ["metadata[k]", "project_id", "prompt", "style.s"]);

    // 25 credits, a video costs 100: refused with the balance and the cost, nothing kept.
    grant(&w.app, tenant, 25).await;
    let video = v1::CreateGenerationRequest {
        kind: "video".into(),
        output_format: "mp4".into(),
        ..image(1)
    };
    let status = c
        .create_generation(with_key(bearer(video, &token), "video-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    let info = status.get_error_details().error_info().cloned().unwrap();
    assert_eq!(info.reason, "INSUFFICIENT_CREDITS");
    assert_eq!(info.metadata["balance"], "25");
    assert_eq!(info.metadata["cost"], "100");
    let mut conn = w.app.db().await;
    assert_eq!(generation_count(&mut conn, tenant).await, 0);
    assert_eq!(balance(&mut conn, tenant).await, 25);
    // The failure released the key: the same key works once the request can be paid.
    let ok = c
        .create_generation(with_key(bearer(image(2), &token), "video-1"))
        .await
        .expect("the released key is usable")
        .into_inner();
    assert_eq!(ok.cost, 20);
    assert_eq!(balance(&mut conn, tenant).await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_stop_at_the_monthly_quota_and_failed_creates_give_it_back() {
    let w = World::with_roles(Roles::API, |s| s.set("DEVGATE_QUOTA_FREE", "100000000/3")).await;
    let tenant = Uuid::new_v4();
    let (_, token) = create_key(&w.app, tenant, &["generations:write"]).await;
    let mut c = client(&w.app).await;

    // No credits: refused, and the quota it took is given back.
    let status = c
        .create_generation(api_key(image(3), &token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    grant(&w.app, tenant, 1000).await;
    c.create_generation(api_key(image(2), &token))
        .await
        .expect("2 of 3");
    let status = c
        .create_generation(api_key(image(2), &token))
        .await
        .unwrap_err();
    assert_refused(&status, Code::ResourceExhausted, "QUOTA_EXHAUSTED");
    let failure = status.get_error_details().quota_failure().cloned().unwrap();
    assert_eq!(failure.violations[0].subject, format!("tenant:{tenant}"));
    assert!(
        failure.violations[0]
            .description
            .contains("monthly_generations")
    );
    c.create_generation(api_key(image(1), &token))
        .await
        .expect("the last one fits");
    let mut conn = w.app.db().await;
    assert_eq!(generation_count(&mut conn, tenant).await, 2);
    assert_eq!(balance(&mut conn, tenant).await, 1000 - 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_200_concurrent_creates_over_50_keys_charge_50_times() {
    // A pool that waits long enough for 200 concurrent calls (as the idempotency test).
    let w = World::with_roles(Roles::API, |s| {
        s.set("DEVGATE_DATABASE_POOL_SIZE", "16")
            .set("DEVGATE_DATABASE_CONNECT_TIMEOUT", "10s")
    })
    .await;
    let tenant = Uuid::new_v4();
    let token = admin_token(tenant);
    grant(&w.app, tenant, 10_000).await;
    let channel = channel(w.app.public).await;

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let (channel, token) = (channel.clone(), token.clone());
        tasks.spawn(async move {
            let key = format!("key-{}", i % 50);
            let mut c = GenerationProxyClient::new(channel);
            // In flight (ABORTED) is the retryable answer while the first holds the key.
            loop {
                match c
                    .create_generation(with_key(bearer(image(1), &token), &key))
                    .await
                {
                    Ok(r) => return (key, r.into_inner().id),
                    Err(s) if s.code() == Code::Aborted => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    Err(s) => panic!("unexpected {s:?}"),
                }
            }
        });
    }
    let mut by_key = std::collections::HashMap::<String, String>::new();
    while let Some(done) = tasks.join_next().await {
        let (key, id) = done.unwrap();
        let first = by_key.entry(key.clone()).or_insert_with(|| id.clone());
        assert_eq!(
            *first, id,
            "every answer for {key} names the same generation"
        );
    }
    assert_eq!(by_key.len(), 50);
    let mut conn = w.app.db().await;
    assert_eq!(generation_count(&mut conn, tenant).await, 50);
    let debits = ledger(&mut conn, tenant)
        .await
        .into_iter()
        .filter(|e| e.0 < 0)
        .count();
    assert_eq!(debits, 50);
    assert_eq!(balance(&mut conn, tenant).await, 10_000 - 50 * 10);

    // A replay says so; another body with a used key is a bad request naming the key.
    let replay = GenerationProxyClient::new(channel.clone())
        .create_generation(with_key(bearer(image(1), &token), "key-7"))
        .await
        .unwrap();
    assert_eq!(
        replay.metadata().get("idempotent-replayed").unwrap(),
        "true"
    );
    assert_eq!(replay.into_inner().id, by_key["key-7"]);
    let status = GenerationProxyClient::new(channel)
        .create_generation(with_key(bearer(image(2), &token), "key-7"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(field_violations(&status), ["idempotency_key"]);
    assert_eq!(generation_count(&mut conn, tenant).await, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_are_isolated_between_tenants() {
    let w = World::with_roles(Roles::API, |s| s).await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    grant(&w.app, a, 100).await;
    let mut c = client(&w.app).await;
    let created = c
        .create_generation(bearer(image(1), &admin_token(a)))
        .await
        .unwrap()
        .into_inner();
    let other = admin_token(b);

    let status = c
        .get_generation(bearer(
            v1::GetGenerationRequest {
                id: created.id.clone(),
            },
            &other,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = c
        .cancel_generation(bearer(
            v1::CancelGenerationRequest {
                id: created.id.clone(),
            },
            &other,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let listed = c
        .list_generations(bearer(v1::ListGenerationsRequest::default(), &other))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.generations.is_empty());
    // Tenant b has no credits: its create is refused, a's balance untouched.
    let status = c
        .create_generation(bearer(image(1), &other))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    let mut conn = w.app.db().await;
    assert_eq!(balance(&mut conn, a).await, 90);
    // Still a's, unchanged.
    let mine = c
        .get_generation(bearer(
            v1::GetGenerationRequest {
                id: created.id.clone(),
            },
            &admin_token(a),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.state, v1::GenerationState::Queued as i32);

    // Scopes: a read-only key can neither create nor cancel.
    let (_, reader) = create_key(&w.app, a, &["generations:read"]).await;
    let status = c
        .create_generation(api_key(image(1), &reader))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = c
        .cancel_generation(api_key(
            v1::CancelGenerationRequest {
                id: created.id.clone(),
            },
            &reader,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

async fn rest(
    e: &Edge,
    method: Method,
    path: &str,
    token: &str,
    idempotency_key: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let mut req = e.http.request(method, e.url(path)).bearer_auth(token);
    if let Some(key) = idempotency_key {
        req = req.header("Idempotency-Key", key);
    }
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    };
    (status, headers, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_every_rest_path_through_envoy() {
    let e = Edge::on(World::with_roles(Roles::API, |s| s).await).await;
    let tenant = Uuid::new_v4();
    let token = admin_token(tenant);
    grant(&e.world.app, tenant, 1000).await;
    use Method as M;

    let body = json!({
        "kind": "image_hd",
        "prompt": "a lighthouse",
        "output_format": "webp",
        "count": 2,
        "style": {"palette": "warm", "steps": 30},
        "metadata": {"order": "7"}
    });
    let (status, headers, created) = rest(
        &e,
        M::POST,
        "/v1/generations",
        &token,
        Some("rest-1"),
        Some(body.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    assert!(headers.get("idempotent-replayed").is_none());
    assert_eq!(created["state"], "GENERATION_STATE_QUEUED");
    assert_eq!(created["cost"], "50");
    assert_eq!(created["style"], json!({"palette": "warm", "steps": 30}));
    let id = created["id"].as_str().unwrap().to_string();

    // The same request and key: the first response, marked as replayed.
    let (status, headers, replayed) = rest(
        &e,
        M::POST,
        "/v1/generations",
        &token,
        Some("rest-1"),
        Some(body.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(replayed, created);
    let mut other = body.clone();
    other["count"] = json!(1);
    let (status, _, refused) = rest(
        &e,
        M::POST,
        "/v1/generations",
        &token,
        Some("rest-1"),
        Some(other),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");

    let (status, _, bad) = rest(
        &e,
        M::POST,
        "/v1/generations",
        &token,
        None,
        Some(json!({"kind": "image", "prompt": "", "output_format": "png"})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(bad["details"][0]["field_violations"][0]["field"], "prompt");

    let (status, _, got) = rest(
        &e,
        M::GET,
        &format!("/v1/generations/{id}"),
        &token,
        None,
        None,
    )
    .await;
    assert_eq!((status, &got), (StatusCode::OK, &created));

    // A second one, then the list: newest first, paged, filtered.
    let (_, _, second) = rest(
        &e,
        M::POST,
        "/v1/generations",
        &token,
        None,
        Some(
            json!({"kind": "text", "prompt": "a haiku", "output_format": "md", "project_id": "p2"}),
        ),
    )
    .await;
    let (status, _, page) = rest(
        &e,
        M::GET,
        "/v1/generations?page_size=1",
        &token,
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["generations"][0]["id"], second["id"]);
    let next = page["next_page_token"].as_str().unwrap();
    let (_, _, page2) = rest(
        &e,
        M::GET,
        &format!("/v1/generations?page_size=1&page_token={next}"),
        &token,
        None,
        None,
    )
    .await;
    assert_eq!(page2["generations"][0]["id"], json!(id));
    assert_eq!(page2["next_page_token"], "");
    let (_, _, p2) = rest(
        &e,
        M::GET,
        "/v1/generations?project_id=p2",
        &token,
        None,
        None,
    )
    .await;
    assert_eq!(p2["generations"].as_array().unwrap().len(), 1);

    let (status, _, cancelled) = rest(
        &e,
        M::POST,
        &format!("/v1/generations/{id}:cancel"),
        &token,
        None,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["state"], "GENERATION_STATE_CANCELLED");
    assert_eq!(cancelled["refunded"], true);
    let (status, _, _) = rest(
        &e,
        M::POST,
        &format!("/v1/generations/{id}:cancel"),
        &token,
        None,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (_, _, listed) = rest(
        &e,
        M::GET,
        "/v1/generations?state=GENERATION_STATE_CANCELLED",
        &token,
        None,
        None,
    )
    .await;
    let ids: Vec<_> = listed["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].clone())
        .collect();
    assert_eq!(ids, [json!(id)]);

    let (status, _, _) = rest(
        &e,
        M::GET,
        &format!("/v1/generations/{}", Uuid::new_v4()),
        &token,
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = rest(&e, M::GET, "/v1/generations/nope", &token, None, None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let mut conn = e.world.app.db().await;
    assert_eq!(balance(&mut conn, tenant).await, 1000 - 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_watch_streams_a_change_made_on_another_replica() {
    let w = World::with_roles(Roles::API, |s| s).await;
    let other = w.replica().await;
    let tenant = Uuid::new_v4();
    let token = admin_token(tenant);
    grant(&w.app, tenant, 100).await;
    let mut c = client(&w.app).await;
    let created = c
        .create_generation(bearer(image(1), &token))
        .await
        .unwrap()
        .into_inner();
    let watch =
        |id: &str, token: &str| bearer(v1::WatchGenerationRequest { id: id.to_string() }, token);

    let mut stream = c
        .watch_generation(watch(&created.id, &token))
        .await
        .expect("watch")
        .into_inner();
    let first = stream.message().await.unwrap().expect("the current state");
    assert_eq!(first, created);
    // Cancelled on the other replica: this one's stream shows it, then ends.
    client(&other)
        .await
        .cancel_generation(bearer(
            v1::CancelGenerationRequest {
                id: created.id.clone(),
            },
            &token,
        ))
        .await
        .unwrap();
    let next = stream.message().await.unwrap().expect("the change");
    assert_eq!(next.state, v1::GenerationState::Cancelled as i32);
    assert!(next.refunded);
    assert!(
        stream.message().await.unwrap().is_none(),
        "ends after the terminal state"
    );

    // A terminal generation: its state, then the end. Another tenant: NOT_FOUND.
    let mut ended = c
        .watch_generation(watch(&created.id, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ended.message().await.unwrap().unwrap().state,
        v1::GenerationState::Cancelled as i32
    );
    assert!(ended.message().await.unwrap().is_none());
    let status = c
        .watch_generation(watch(&created.id, &admin_token(Uuid::new_v4())))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

/// A replica's streams share one Redis subscription: 24 streams over 4 generations (6 each,
/// on one replica) all see a cancel made on the other replica well before the 5 s recheck,
/// and a stream that ended leaves the others of its generation working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_many_watchers_share_one_subscription() {
    let w = World::with_roles(Roles::API, |s| s).await;
    let other = w.replica().await;
    let tenant = Uuid::new_v4();
    let token = admin_token(tenant);
    grant(&w.app, tenant, 100).await;
    let mut c = client(&w.app).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        let created = c
            .create_generation(bearer(image(1), &token))
            .await
            .unwrap()
            .into_inner();
        ids.push(created.id);
    }
    let mut streams = Vec::new();
    for id in &ids {
        for _ in 0..6 {
            let mut stream = c
                .watch_generation(bearer(
                    v1::WatchGenerationRequest { id: id.clone() },
                    &token,
                ))
                .await
                .expect("watch")
                .into_inner();
            let first = stream.message().await.unwrap().expect("the current state");
            assert_eq!(first.state, v1::GenerationState::Queued as i32);
            streams.push((id.clone(), stream));
        }
    }
    // One watcher of the first generation goes away before anything changes.
    streams.remove(0);
    for id in &ids {
        client(&other)
            .await
            .cancel_generation(bearer(
                v1::CancelGenerationRequest { id: id.clone() },
                &token,
            ))
            .await
            .unwrap();
    }
    let seen =
        futures_util::future::join_all(streams.into_iter().map(|(id, mut stream)| async move {
            // Under the 5 s recheck: the change came over the shared subscription.
            let next = tokio::time::timeout(Duration::from_secs(3), stream.message())
                .await
                .unwrap_or_else(|_| panic!("{id}: no change within 3 s"))
                .unwrap()
                .expect("the change");
            assert_eq!(next.id, id);
            assert_eq!(next.state, v1::GenerationState::Cancelled as i32);
            assert!(
                stream.message().await.unwrap().is_none(),
                "ends after the terminal state"
            );
        }))
        .await;
    assert_eq!(seen.len(), 23);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_watch_streams_through_envoy() {
    let e = Edge::on(World::with_roles(Roles::API, |s| s).await).await;
    let tenant = Uuid::new_v4();
    let token = admin_token(tenant);
    grant(&e.world.app, tenant, 100).await;
    let (_, _, created) = rest(
        &e,
        Method::POST,
        "/v1/generations",
        &token,
        None,
        Some(json!({"kind": "audio", "prompt": "rain", "output_format": "wav"})),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_string();

    let mut resp = e
        .http
        .get(e.url(&format!("/v1/generations/{id}:watch")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // The current state arrives while the call is still open.
    let mut body = Vec::new();
    while !String::from_utf8_lossy(&body).contains("GENERATION_STATE_QUEUED") {
        let chunk = resp
            .chunk()
            .await
            .unwrap()
            .expect("the first state is streamed");
        body.extend_from_slice(&chunk);
    }
    let (status, _, _) = rest(
        &e,
        Method::POST,
        &format!("/v1/generations/{id}:cancel"),
        &token,
        None,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    while let Some(chunk) = resp.chunk().await.unwrap() {
        body.extend_from_slice(&chunk);
    }
    let states: Vec<Value> = serde_json::from_slice(&body)
        .unwrap_or_else(|err| panic!("a JSON array ({err}): {}", String::from_utf8_lossy(&body)));
    let states: Vec<_> = states.iter().map(|g| g["state"].clone()).collect();
    assert_eq!(
        states,
        [
            json!("GENERATION_STATE_QUEUED"),
            json!("GENERATION_STATE_CANCELLED")
        ]
    );
}
