//! Idempotency-Key on the create RPCs (Stripe's semantics) against real Postgres and Envoy:
//! 200 concurrent creates over 50 keys make exactly 50 endpoints; a used key with another
//! request is 400 on `idempotency_key`; a key in flight is 409 (ABORTED) until the first
//! request ends; replays of secret-bearing creates answer ALREADY_EXISTS naming the first
//! id; keys expire after 24 h; tenants' keys never collide; a crashed attempt's reservation
//! is taken over, and an attempt that lost its reservation commits nothing.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{TimeDelta, Utc};
use devgate::{
    app::Roles,
    db::schema::{events, idempotency_keys as ik, webhook_endpoints},
    idempotency::model::RequestHash,
    proto::v1::{self, webhook_service_client::WebhookServiceClient},
};
use diesel::{ExpressionMethods, QueryDsl};
use diesel_async::RunQueryDsl;
use reqwest::{StatusCode, header::HeaderMap};
use serde_json::{Value, json};
use tonic::{Code, Request, Status, transport::Channel};
use tonic_types::StatusExt;
use uuid::Uuid;

use crate::harness::{envoy::Edge, *};

/// A public address: IP literals need no DNS and pass the SSRF guard.
const URL: &str = "https://93.184.215.14/hooks";
const CREATE_ENDPOINT_RPC: &str = "devgate.v1.WebhookService/CreateWebhookEndpoint";

/// An API-only instance: no worker delivers to the endpoints or sweeps the keys.
async fn api_only() -> World {
    World::with_roles(Roles::API, |s| s).await
}

fn with_key<T>(msg: T, token: &str, key: &str) -> Request<T> {
    let mut req = bearer(msg, token);
    req.metadata_mut()
        .insert("idempotency-key", key.parse().unwrap());
    req
}

fn endpoint_req(path: &str) -> v1::CreateWebhookEndpointRequest {
    v1::CreateWebhookEndpointRequest {
        url: format!("{URL}/{path}"),
        event_types: vec!["generation.*".into()],
        headers: BTreeMap::from([("x-team".to_string(), "render".to_string())]),
        ..Default::default()
    }
}

async fn webhooks(app: &TestApp) -> WebhookServiceClient<Channel> {
    WebhookServiceClient::new(channel(app.public).await)
}

/// How a create was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Created(String),
    /// A replay: ALREADY_EXISTS naming the first request's endpoint.
    Replayed(String),
    /// ABORTED: the first request with the key is still running.
    InFlight,
}

fn answer(r: Result<tonic::Response<v1::CreateWebhookEndpointResponse>, Status>) -> Answer {
    match r {
        Ok(resp) => {
            assert!(resp.metadata().get("idempotent-replayed").is_none());
            let resp = resp.into_inner();
            assert!(resp.secret.starts_with("whsec_"));
            Answer::Created(resp.webhook_endpoint.unwrap().id)
        }
        Err(s) if s.code() == Code::AlreadyExists => Answer::Replayed(replayed_id(&s)),
        Err(s) if s.code() == Code::Aborted => {
            assert_eq!(s.metadata().get("retry-after").unwrap(), "1", "{s:?}");
            Answer::InFlight
        }
        Err(s) => panic!("unexpected answer: {s:?}"),
    }
}

/// The id a replay names, checked to be marked as a replay everywhere it should be.
fn replayed_id(s: &Status) -> String {
    assert_eq!(s.code(), Code::AlreadyExists, "{s:?}");
    assert_eq!(s.metadata().get("idempotent-replayed").unwrap(), "true");
    let info = s
        .get_error_details()
        .error_info()
        .cloned()
        .expect("ErrorInfo");
    assert_eq!(info.reason, "IDEMPOTENT_REPLAY");
    let id = info.metadata["resource_id"].clone();
    assert!(s.message().contains(&id), "{s:?}");
    id
}

fn violated_fields(s: &Status) -> Vec<String> {
    s.get_error_details()
        .bad_request()
        .unwrap_or_else(|| panic!("BadRequest details in {s:?}"))
        .field_violations
        .iter()
        .map(|f| f.field.clone())
        .collect()
}

async fn create_endpoint(app: &TestApp, token: &str, key: &str, path: &str) -> Answer {
    answer(
        webhooks(app)
            .await
            .create_webhook_endpoint(with_key(endpoint_req(path), token, key))
            .await,
    )
}

async fn endpoint_ids(app: &TestApp, tenant: Uuid) -> BTreeSet<String> {
    webhook_endpoints::table
        .filter(webhook_endpoints::tenant_id.eq(tenant))
        .select(webhook_endpoints::id)
        .load::<Uuid>(&mut app.db().await)
        .await
        .unwrap()
        .into_iter()
        .map(|id| id.to_string())
        .collect()
}

/// Moves a key's expiry to the past, as 24 hours would.
async fn expire(app: &TestApp, tenant: Uuid, key: &str) {
    let n = diesel::update(
        ik::table
            .filter(ik::tenant_id.eq(tenant))
            .filter(ik::key.eq(key)),
    )
    .set(ik::expire_time.eq(Utc::now() - TimeDelta::seconds(1)))
    .execute(&mut app.db().await)
    .await
    .unwrap();
    assert_eq!(n, 1);
}

/// A pause point holding the next reserved key in flight: (reached, go).
fn hold_next_reservation(
    app: &TestApp,
) -> (
    tokio::sync::oneshot::Receiver<()>,
    tokio::sync::oneshot::Sender<()>,
) {
    let (reached_tx, reached_rx) = tokio::sync::oneshot::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    app.idempotency().pause_once_after_reserving(async move {
        let _ = reached_tx.send(());
        let _ = go_rx.await;
    });
    (reached_rx, go_tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_creates_over_fifty_keys_make_fifty_endpoints() {
    let w = World::with_roles(Roles::API, |s| {
        s.set("DEVGATE_DATABASE_POOL_SIZE", "16")
            .set("DEVGATE_DATABASE_CONNECT_TIMEOUT", "10s")
    })
    .await;
    let tenant = Uuid::new_v4();
    let token = admin_token(tenant);
    let channel = channel(w.app.public).await;
    let mut calls = Vec::new();
    for i in 0..200 {
        let key = format!("order-{}", i % 50);
        let mut client = WebhookServiceClient::new(channel.clone());
        let token = token.clone();
        calls.push(tokio::spawn(async move {
            // ABORTED is retryable: retry until the key's first request has ended.
            let mut aborted = 0;
            loop {
                let req = with_key(endpoint_req(&key), &token, &key);
                match answer(client.create_webhook_endpoint(req).await) {
                    Answer::InFlight => {
                        aborted += 1;
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                    settled => return (key, settled, aborted),
                }
            }
        }));
    }
    let mut per_key: BTreeMap<String, Vec<Answer>> = BTreeMap::new();
    let mut aborted = 0;
    for call in calls {
        let (key, settled, n) = call.await.unwrap();
        per_key.entry(key).or_default().push(settled);
        aborted += n;
    }
    assert_eq!(per_key.len(), 50);
    let mut created = BTreeSet::new();
    for (key, answers) in &per_key {
        let ids: Vec<&String> = answers
            .iter()
            .filter_map(|a| match a {
                Answer::Created(id) => Some(id),
                _ => None,
            })
            .collect();
        assert_eq!(ids.len(), 1, "{key}: exactly one create, got {answers:?}");
        for a in answers {
            match a {
                Answer::Created(id) | Answer::Replayed(id) => {
                    assert_eq!(id, ids[0], "{key}: {answers:?}")
                }
                Answer::InFlight => unreachable!("retried until settled"),
            }
        }
        created.insert(ids[0].clone());
    }
    assert_eq!(created.len(), 50);
    assert_eq!(endpoint_ids(&w.app, tenant).await, created);
    // One event per endpoint, and every key completed naming its endpoint.
    let mut conn = w.app.db().await;
    let events: i64 = events::table
        .filter(events::tenant_id.eq(tenant))
        .filter(events::event_type.eq("webhook_endpoint.created"))
        .count()
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(events, 50);
    let keys: Vec<(String, String, Option<String>)> = ik::table
        .filter(ik::tenant_id.eq(tenant))
        .select((ik::key, ik::state, ik::resource_id))
        .load(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 50);
    for (_, state, resource_id) in &keys {
        assert_eq!(state, "completed");
        assert!(created.contains(resource_id.as_ref().unwrap()));
    }
    eprintln!("200 creates over 50 keys: {aborted} ABORTED answers retried");

    // A create that fails releases its key: the retry runs again (the tenant is at its
    // endpoint limit now) instead of finding the key in flight or replaying a failure.
    for _ in 0..2 {
        let refused = webhooks(&w.app)
            .await
            .create_webhook_endpoint(with_key(endpoint_req("over"), &token, "order-over"))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    }
    let left: i64 = ik::table
        .filter(ik::tenant_id.eq(tenant))
        .filter(ik::key.eq("order-over"))
        .count()
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, 0);
}

/// A REST POST through Envoy, with an `Idempotency-Key` header when given.
async fn post(
    http: reqwest::Client,
    url: String,
    token: String,
    key: Option<String>,
    body: Value,
) -> (StatusCode, HeaderMap, Value) {
    let mut req = http.post(url).bearer_auth(token).json(&body);
    if let Some(key) = key {
        req = req.header("Idempotency-Key", key);
    }
    let resp = req.send().await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let body = resp.json().await.unwrap();
    (status, headers, body)
}

fn error_info(body: &Value) -> &Value {
    body["details"]
        .as_array()
        .unwrap_or_else(|| panic!("details in {body}"))
        .iter()
        .find(|d| d["@type"] == "type.googleapis.com/google.rpc.ErrorInfo")
        .unwrap_or_else(|| panic!("ErrorInfo in {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_envoy_a_key_replays_refuses_another_body_and_is_409_in_flight() {
    let e = Edge::on(api_only().await).await;
    let tenant = Uuid::new_v4();
    let token = admin_token(tenant);
    let url = e.url("/v1/webhooks");
    let send = |key: Option<&str>, body: Value| {
        post(
            e.http.clone(),
            url.clone(),
            token.clone(),
            key.map(str::to_string),
            body,
        )
    };
    let body_a = json!({"url": format!("{URL}/a"), "event_types": ["generation.*"]});

    let (status, headers, created) = send(Some("order-1"), body_a.clone()).await;
    assert_eq!(status, StatusCode::OK, "{created}");
    assert!(headers.get("idempotent-replayed").is_none());
    let id = created["webhook_endpoint"]["id"]
        .as_str()
        .unwrap()
        .to_string();

    // The same request again: 409 naming the endpoint, marked as a replay; no secret.
    let (status, headers, replay) = send(Some("order-1"), body_a.clone()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{replay}");
    assert_eq!(headers.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(replay["code"], 6, "ALREADY_EXISTS: {replay}");
    assert_eq!(error_info(&replay)["reason"], "IDEMPOTENT_REPLAY");
    assert_eq!(error_info(&replay)["metadata"]["resource_id"], id.as_str());
    assert_eq!(
        error_info(&replay)["metadata"]["idempotency_key"],
        "order-1"
    );
    assert!(!replay.to_string().contains("whsec_"));

    // Another request under the used key: 400 on idempotency_key, naming the key.
    let body_b = json!({"url": format!("{URL}/b"), "event_types": ["generation.*"]});
    let (status, _, refused) = send(Some("order-1"), body_b.clone()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert_eq!(
        refused["details"][0]["field_violations"][0]["field"],
        "idempotency_key"
    );
    assert!(refused["message"].as_str().unwrap().contains("order-1"));

    // A malformed key is refused before anything is done.
    let long = "k".repeat(256);
    let (status, _, refused) = send(Some(&long), body_b.clone()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert_eq!(
        refused["details"][0]["field_violations"][0]["field"],
        "idempotency_key"
    );

    // Without a key every request creates.
    let (status, _, unkeyed) = send(None, body_a.clone()).await;
    assert_eq!(status, StatusCode::OK, "{unkeyed}");
    assert_ne!(unkeyed["webhook_endpoint"]["id"], id.as_str());

    // While the first request with a key is running, the same request is 409 (ABORTED,
    // retryable); once it has finished, the retry is its replay.
    let (reached, go) = hold_next_reservation(&e.world.app);
    let first = tokio::spawn(send(Some("order-2"), body_b.clone()));
    reached.await.unwrap();
    let (status, headers, busy) = send(Some("order-2"), body_b.clone()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{busy}");
    assert_eq!(busy["code"], 10, "ABORTED: {busy}");
    assert_eq!(headers.get("retry-after").unwrap(), "1");
    assert!(headers.get("idempotent-replayed").is_none());
    go.send(()).unwrap();
    let (status, _, created) = first.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{created}");
    let id2 = created["webhook_endpoint"]["id"].as_str().unwrap();
    let (status, headers, replay) = send(Some("order-2"), body_b).await;
    assert_eq!(status, StatusCode::CONFLICT, "{replay}");
    assert_eq!(headers.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(error_info(&replay)["metadata"]["resource_id"], id2);

    assert_eq!(endpoint_ids(&e.world.app, tenant).await.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_create_api_key_names_the_first_key_and_creates_no_other() {
    let w = api_only().await;
    let tenant = Uuid::new_v4();
    let token = admin_token(tenant);
    let mut keys = w.app.public_client().await;
    let req = create_request("ci deploys", &["api_keys:read"]);

    let first = keys
        .create_api_key(with_key(req.clone(), &token, "deploy-7"))
        .await
        .unwrap();
    assert!(first.metadata().get("idempotent-replayed").is_none());
    let first = first.into_inner();
    let id = first.api_key.unwrap().id;

    let replay = keys
        .create_api_key(with_key(req.clone(), &token, "deploy-7"))
        .await
        .unwrap_err();
    assert_eq!(replayed_id(&replay), id);
    assert!(!replay.message().contains(&first.secret));

    // Another request under the key, and the key on another create RPC: 400.
    let other = create_request("ci deploys", &["api_keys:read", "usage:read"]);
    let refused = keys
        .create_api_key(with_key(other, &token, "deploy-7"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&refused), ["idempotency_key"]);
    let refused = webhooks(&w.app)
        .await
        .create_webhook_endpoint(with_key(endpoint_req("x"), &token, "deploy-7"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&refused), ["idempotency_key"]);
    assert!(
        refused
            .message()
            .contains("devgate.v1.ApiKeyService/CreateApiKey"),
        "{refused:?}"
    );

    let listed = keys
        .list_api_keys(bearer(v1::ListApiKeysRequest::default(), &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.api_keys.len(), 1);
    assert_eq!(listed.api_keys[0].id, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_expire_after_24_hours_and_are_swept() {
    let w = api_only().await;
    let tenant = Uuid::new_v4();
    let token = admin_token(tenant);
    let Answer::Created(old) = create_endpoint(&w.app, &token, "k-old", "a").await else {
        panic!("created")
    };
    let Answer::Created(kept) = create_endpoint(&w.app, &token, "k-kept", "b").await else {
        panic!("created")
    };

    // Past its 24 hours (not swept yet) a key is free: another request with it creates.
    expire(&w.app, tenant, "k-old").await;
    let Answer::Created(new) = create_endpoint(&w.app, &token, "k-old", "c").await else {
        panic!("created")
    };
    assert_ne!(new, old);
    assert_eq!(
        create_endpoint(&w.app, &token, "k-old", "c").await,
        Answer::Replayed(new)
    );

    // The sweep deletes expired keys only.
    expire(&w.app, tenant, "k-old").await;
    assert_eq!(w.app.idempotency().purge_expired().await.unwrap(), 1);
    let left: Vec<String> = ik::table
        .filter(ik::tenant_id.eq(tenant))
        .select(ik::key)
        .load(&mut w.app.db().await)
        .await
        .unwrap();
    assert_eq!(left, ["k-kept"]);
    assert_eq!(
        create_endpoint(&w.app, &token, "k-kept", "b").await,
        Answer::Replayed(kept)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_keys_never_collide() {
    let w = api_only().await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let (token_a, token_b) = (admin_token(a), admin_token(b));
    // The same key and the same request in two tenants: two endpoints.
    let Answer::Created(id_a) = create_endpoint(&w.app, &token_a, "shared", "same").await else {
        panic!("created")
    };
    let Answer::Created(id_b) = create_endpoint(&w.app, &token_b, "shared", "same").await else {
        panic!("created")
    };
    assert_ne!(id_a, id_b);
    // Each tenant's replay names its own endpoint.
    assert_eq!(
        create_endpoint(&w.app, &token_a, "shared", "same").await,
        Answer::Replayed(id_a.clone())
    );
    assert_eq!(
        create_endpoint(&w.app, &token_b, "shared", "same").await,
        Answer::Replayed(id_b.clone())
    );
    // Another tenant's request under a key is not "another request" here.
    let c = Uuid::new_v4();
    let token_c = admin_token(c);
    let Answer::Created(id_c) = create_endpoint(&w.app, &token_c, "shared", "other").await else {
        panic!("created")
    };
    assert_eq!(endpoint_ids(&w.app, a).await, BTreeSet::from([id_a]));
    assert_eq!(endpoint_ids(&w.app, b).await, BTreeSet::from([id_b]));
    assert_eq!(endpoint_ids(&w.app, c).await, BTreeSet::from([id_c]));
}

/// Writes a reservation as an attempt of `req` leaves it, with its lease ending at `until`.
async fn reservation(
    app: &TestApp,
    tenant: Uuid,
    key: &str,
    req: &v1::CreateWebhookEndpointRequest,
    until: chrono::DateTime<Utc>,
) {
    let now = Utc::now();
    diesel::insert_into(ik::table)
        .values((
            ik::tenant_id.eq(tenant),
            ik::key.eq(key),
            ik::rpc.eq(CREATE_ENDPOINT_RPC),
            ik::request_hash.eq(RequestHash::of(CREATE_ENDPOINT_RPC, req).0.to_vec()),
            ik::state.eq("in_flight"),
            ik::lease_id.eq(Uuid::new_v4()),
            ik::lease_until.eq(until),
            ik::create_time.eq(now),
            ik::expire_time.eq(now + TimeDelta::hours(24)),
        ))
        .execute(&mut app.db().await)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_attempt_is_taken_over_once_its_lease_has_ended() {
    let w = api_only().await;
    let tenant = Uuid::new_v4();
    let token = admin_token(tenant);
    // A live reservation (its attempt is running elsewhere): ABORTED.
    let running = Utc::now() + TimeDelta::seconds(60);
    reservation(&w.app, tenant, "k-running", &endpoint_req("r"), running).await;
    assert_eq!(
        create_endpoint(&w.app, &token, "k-running", "r").await,
        Answer::InFlight
    );
    // A reservation whose lease ended without completing (the process died): taken over.
    let ended = Utc::now() - TimeDelta::seconds(1);
    reservation(&w.app, tenant, "k-crashed", &endpoint_req("c"), ended).await;
    let Answer::Created(id) = create_endpoint(&w.app, &token, "k-crashed", "c").await else {
        panic!("created")
    };
    assert_eq!(
        create_endpoint(&w.app, &token, "k-crashed", "c").await,
        Answer::Replayed(id.clone())
    );
    assert_eq!(endpoint_ids(&w.app, tenant).await, BTreeSet::from([id]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_that_lost_its_lease_commits_nothing() {
    let w = api_only().await;
    let tenant = Uuid::new_v4();
    let token = admin_token(tenant);
    // The first attempt reserves the key and stalls past its lease...
    let (reached, go) = hold_next_reservation(&w.app);
    let slow = tokio::spawn({
        let (client, token) = (webhooks(&w.app).await, token.clone());
        async move {
            let mut client = client;
            answer(
                client
                    .create_webhook_endpoint(with_key(endpoint_req("s"), &token, "k-slow"))
                    .await,
            )
        }
    });
    reached.await.unwrap();
    diesel::update(
        ik::table
            .filter(ik::tenant_id.eq(tenant))
            .filter(ik::key.eq("k-slow")),
    )
    .set(ik::lease_until.eq(Utc::now() - TimeDelta::seconds(1)))
    .execute(&mut w.app.db().await)
    .await
    .unwrap();
    // ...a retry takes the key over and creates the endpoint...
    let Answer::Created(id) = create_endpoint(&w.app, &token, "k-slow", "s").await else {
        panic!("created")
    };
    // ...and the first attempt, resumed, cannot complete: ABORTED, its work rolled back.
    go.send(()).unwrap();
    assert_eq!(slow.await.unwrap(), Answer::InFlight);
    assert_eq!(
        create_endpoint(&w.app, &token, "k-slow", "s").await,
        Answer::Replayed(id.clone())
    );
    assert_eq!(endpoint_ids(&w.app, tenant).await, BTreeSet::from([id]));
}
