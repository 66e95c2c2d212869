//! The WebhookService: every REST path through the real Envoy, grpcurl on the public
//! listener, tenant isolation for every RPC, scopes, validation naming fields, secrets shown
//! and rotated with a grace, the per-tenant limit under concurrency, and one
//! `webhook_endpoint.*` event per change, each valid against its catalog schema.

use std::time::Duration;

use devgate::{
    events::Catalog,
    proto::v1::{self, webhook_service_client::WebhookServiceClient},
    webhooks::{model::MAX_ENDPOINTS_PER_TENANT, signing::Secret, store},
};
use diesel::{ExpressionMethods, QueryDsl};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tonic::{Code, transport::Channel};
use tonic_types::StatusExt;
use uuid::Uuid;

use devgate::app::Roles;

use crate::harness::{envoy::Edge, *};

/// A public address: IP literals need no DNS (the test machine has none) and pass the guard.
const URL: &str = "https://93.184.215.14/hooks/devgate";

/// These tests are about the API: no worker, so nothing is ever sent to their endpoints'
/// (public) URLs.
async fn api_only() -> World {
    World::with_roles(Roles::API, |s| s).await
}

async fn client(app: &TestApp) -> WebhookServiceClient<Channel> {
    WebhookServiceClient::new(channel(app.public).await)
}

async fn db(app: &TestApp) -> AsyncPgConnection {
    AsyncPgConnection::establish(&app.settings.vars["DEVGATE_DATABASE_URL"])
        .await
        .expect("connect to the test database")
}

fn create_req(url: &str, types: &[&str]) -> v1::CreateWebhookEndpointRequest {
    v1::CreateWebhookEndpointRequest {
        url: url.into(),
        event_types: types.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    }
}

async fn create(app: &TestApp, token: &str) -> v1::CreateWebhookEndpointResponse {
    client(app)
        .await
        .create_webhook_endpoint(bearer(create_req(URL, &["generation.*"]), token))
        .await
        .expect("create endpoint")
        .into_inner()
}

/// (type, payload) of the tenant's events, oldest first.
async fn events(conn: &mut AsyncPgConnection, tenant: Uuid) -> Vec<(String, Value)> {
    use devgate::db::schema::events::dsl as e;
    e::events
        .filter(e::tenant_id.eq(tenant))
        .order((e::create_time.asc(), e::id.asc()))
        .select((e::event_type, e::payload))
        .load(conn)
        .await
        .unwrap()
}

fn field_violations(status: &tonic::Status) -> Vec<(String, String)> {
    status
        .get_error_details()
        .bad_request()
        .unwrap_or_else(|| panic!("BadRequest details in {status:?}"))
        .field_violations
        .iter()
        .map(|f| (f.field.clone(), f.description.clone()))
        .collect()
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

fn unix(rfc3339: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339.as_str().unwrap())
        .unwrap()
        .timestamp()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_every_rest_path_through_envoy() {
    let e = Edge::on(api_only().await).await;
    let tenant = Uuid::new_v4();
    let token = admin_token(tenant);
    use Method as M;

    // Create: the endpoint and its secret.
    let (status, created) = rest(
        &e,
        M::POST,
        "/v1/webhooks",
        &token,
        Some(json!({
            "url": URL,
            "description": "orders service",
            "event_types": ["generation.*", "credits.low"],
            "headers": {"X-Team": "render"},
            "rate_limit_per_second": 25
        })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let ep = &created["webhook_endpoint"];
    let id = ep["id"].as_str().unwrap().to_string();
    assert_eq!(Uuid::parse_str(&id).unwrap().get_version_num(), 7);
    assert_eq!(ep["url"], URL);
    assert_eq!(ep["headers"], json!({"x-team": "render"}));
    assert_eq!(ep["rate_limit_per_second"], 25);
    assert_eq!(ep["state"], "WEBHOOK_ENDPOINT_STATE_ENABLED");
    assert_eq!(ep["created_by"], "user:admin-user");
    let secret = created["secret"].as_str().unwrap().to_string();
    Secret::parse(&secret).expect("a whsec_ secret of 24-64 bytes");

    // List and get.
    let (status, listed) = rest(&e, M::GET, "/v1/webhooks?page_size=10", &token, None).await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    assert_eq!(listed["webhook_endpoints"][0]["id"], id.as_str());
    assert_eq!(listed["next_page_token"], "");
    let (status, listed) = rest(
        &e,
        M::GET,
        "/v1/webhooks?state=WEBHOOK_ENDPOINT_STATE_DISABLED",
        &token,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["webhook_endpoints"], json!([]));
    let (status, got) = rest(&e, M::GET, &format!("/v1/webhooks/{id}"), &token, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["description"], "orders service");

    // The secret, again.
    let (status, shown) = rest(
        &e,
        M::GET,
        &format!("/v1/webhooks/{id}/secret"),
        &token,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{shown}");
    assert_eq!(shown["secret"], secret.as_str());
    assert_eq!(shown["previous_secret_expire_time"], Value::Null);

    // Update with a field mask: only the named field changes.
    let (status, updated) = rest(
        &e,
        M::PATCH,
        &format!("/v1/webhooks/{id}?update_mask=eventTypes"),
        &token,
        Some(json!({"event_types": ["*"], "description": "ignored: not in the mask"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(updated["event_types"], json!(["*"]));
    assert_eq!(updated["description"], "orders service");

    // Rotate with a one-hour grace: the old secret keeps signing until then.
    let before = chrono::Utc::now().timestamp();
    let (status, rotated) = rest(
        &e,
        M::POST,
        &format!("/v1/webhooks/{id}:rotateSecret"),
        &token,
        Some(json!({"grace_period": "3600s"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let new_secret = rotated["secret"].as_str().unwrap().to_string();
    assert_ne!(new_secret, secret);
    let (_, shown) = rest(
        &e,
        M::GET,
        &format!("/v1/webhooks/{id}/secret"),
        &token,
        None,
    )
    .await;
    assert_eq!(shown["secret"], new_secret.as_str());
    let grace_end = unix(&shown["previous_secret_expire_time"]);
    assert!(
        (before + 3600..=before + 3605).contains(&grace_end),
        "{shown}"
    );
    // Rotating again during the grace would cut it short: refused, naming its end.
    let (status, refused) = rest(
        &e,
        M::POST,
        &format!("/v1/webhooks/{id}:rotateSecret"),
        &token,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert_eq!(refused["details"][0]["reason"], "PREVIOUS_SECRET_IN_GRACE");
    // `{}` is the default grace (24h), not "no grace", once the earlier grace is ended.
    let (status, ended) = rest(
        &e,
        M::POST,
        &format!("/v1/webhooks/{id}:rotateSecret"),
        &token,
        Some(json!({"end_grace_now": true})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{ended}");
    assert_eq!(
        ended["webhook_endpoint"]["previous_secret_expire_time"],
        Value::Null
    );
    let (_, rotated) = rest(
        &e,
        M::POST,
        &format!("/v1/webhooks/{id}:rotateSecret"),
        &token,
        Some(json!({})),
    )
    .await;
    let day = unix(&rotated["webhook_endpoint"]["previous_secret_expire_time"])
        - chrono::Utc::now().timestamp();
    assert!((86_390..=86_400).contains(&day), "{rotated}");

    // Enable after an automatic disable: the failure count starts again.
    {
        let mut conn = db(&e.world.app).await;
        let id = Uuid::parse_str(&id).unwrap();
        store::disable(
            &mut conn,
            devgate::identity::TenantId(tenant),
            id,
            "consecutive_failures",
            chrono::Utc::now(),
        )
        .await
        .unwrap();
        use devgate::db::schema::webhook_endpoints::dsl as w;
        diesel::update(w::webhook_endpoints.filter(w::id.eq(id)))
            .set(w::consecutive_failures.eq(10))
            .execute(&mut conn)
            .await
            .unwrap();
    }
    let (_, disabled) = rest(&e, M::GET, &format!("/v1/webhooks/{id}"), &token, None).await;
    assert_eq!(disabled["state"], "WEBHOOK_ENDPOINT_STATE_DISABLED");
    assert_eq!(disabled["disabled_reason"], "consecutive_failures");
    assert_eq!(disabled["consecutive_failures"], 10);
    let (status, enabled) = rest(
        &e,
        M::POST,
        &format!("/v1/webhooks/{id}:enable"),
        &token,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{enabled}");
    assert_eq!(enabled["state"], "WEBHOOK_ENDPOINT_STATE_ENABLED");
    assert_eq!(enabled["consecutive_failures"], 0);
    assert_eq!(enabled["disabled_reason"], "");

    // The catalog.
    let (status, types) = rest(&e, M::GET, "/v1/event-types?page_size=5", &token, None).await;
    assert_eq!(status, StatusCode::OK, "{types}");
    assert_eq!(types["event_types"].as_array().unwrap().len(), 5);
    assert_ne!(types["next_page_token"], "");
    let (status, one) = rest(
        &e,
        M::GET,
        "/v1/event-types/webhook_endpoint.created",
        &token,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{one}");
    assert_eq!(one["category"], "webhook_endpoint");
    assert_eq!(one["schema"]["type"], "object");
    assert_eq!(one["sample"]["url"], "https://hooks.example.com/devgate");
    let (status, missing) = rest(&e, M::GET, "/v1/event-types/nope.never", &token, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{missing}");
    assert_eq!(missing["details"][0]["reason"], "EVENT_TYPE_NOT_FOUND");

    // Validation errors name the fields.
    let (status, bad) = rest(
        &e,
        M::POST,
        "/v1/webhooks",
        &token,
        Some(json!({
            "url": "http://127.0.0.1:8080/hook",
            "event_types": ["generaton.*"],
            "headers": {"Webhook-Id": "x"}
        })),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    let mut fields = rest_fields(&bad);
    fields.sort();
    assert_eq!(
        fields,
        ["event_types[0]", "headers[\"Webhook-Id\"]", "url"],
        "{bad}"
    );

    // Delete: gone, and a second delete is 404.
    let (status, _) = rest(&e, M::DELETE, &format!("/v1/webhooks/{id}"), &token, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = rest(&e, M::GET, &format!("/v1/webhooks/{id}"), &token, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = rest(&e, M::DELETE, &format!("/v1/webhooks/{id}"), &token, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // One event per change, each valid against its own schema.
    let mut conn = db(&e.world.app).await;
    let log = events(&mut conn, tenant).await;
    let types: Vec<&str> = log.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        types,
        [
            "webhook_endpoint.created",
            "webhook_endpoint.updated",
            "webhook_endpoint.secret_rotated",
            "webhook_endpoint.secret_rotated",
            "webhook_endpoint.secret_rotated",
            "webhook_endpoint.enabled",
            "webhook_endpoint.deleted",
        ]
    );
    let catalog = Catalog::load(&mut conn).await.unwrap();
    for (t, payload) in &log {
        catalog
            .validate(t, payload)
            .unwrap_or_else(|e| panic!("{t}: {e}: {payload}"));
        assert_eq!(payload["webhook_endpoint_id"], id.as_str(), "{t}");
    }
    assert_eq!(log[1].1["changed_fields"], json!(["event_types"]));
    assert_eq!(log[1].1["updated_by"], "user:admin-user");
    assert_eq!(
        unix(&log[2].1["previous_secret_expire_time"]),
        grace_end,
        "the event names the grace end"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_tenant_isolation_scopes_and_grpcurl() {
    let w = api_only().await;
    let app = &w.app;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let (admin_a, admin_b) = (admin_token(a), admin_token(b));
    let created = create(app, &admin_a).await;
    let id = created.webhook_endpoint.unwrap().id;
    let mut c = client(app).await;

    // Another tenant's id is NOT_FOUND for every RPC that takes one.
    let not_found = |r: Result<(), tonic::Status>, rpc: &str| {
        let status = r.expect_err(rpc);
        assert_eq!(status.code(), Code::NotFound, "{rpc}: {status:?}");
        assert!(!status.message().contains(&a.to_string()), "{rpc}");
    };
    let get = v1::GetWebhookEndpointRequest { id: id.clone() };
    not_found(
        c.get_webhook_endpoint(bearer(get, &admin_b))
            .await
            .map(drop),
        "get",
    );
    let patch = v1::UpdateWebhookEndpointRequest {
        webhook_endpoint: Some(v1::WebhookEndpoint {
            id: id.clone(),
            description: "stolen".into(),
            ..Default::default()
        }),
        update_mask: None,
    };
    not_found(
        c.update_webhook_endpoint(bearer(patch, &admin_b))
            .await
            .map(drop),
        "update",
    );
    let del = v1::DeleteWebhookEndpointRequest { id: id.clone() };
    not_found(
        c.delete_webhook_endpoint(bearer(del, &admin_b))
            .await
            .map(drop),
        "delete",
    );
    let sec = v1::GetWebhookSecretRequest { id: id.clone() };
    not_found(
        c.get_webhook_secret(bearer(sec, &admin_b)).await.map(drop),
        "secret",
    );
    let rot = v1::RotateWebhookSecretRequest {
        id: id.clone(),
        ..Default::default()
    };
    not_found(
        c.rotate_webhook_secret(bearer(rot, &admin_b))
            .await
            .map(drop),
        "rotate",
    );
    let en = v1::EnableWebhookEndpointRequest { id: id.clone() };
    not_found(
        c.enable_webhook_endpoint(bearer(en, &admin_b))
            .await
            .map(drop),
        "enable",
    );
    let listed = c
        .list_webhook_endpoints(bearer(v1::ListWebhookEndpointsRequest::default(), &admin_b))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.webhook_endpoints.is_empty());
    // Nothing of tenant A changed, and B's failed attempts emitted nothing.
    let still = c
        .get_webhook_endpoint(bearer(
            v1::GetWebhookEndpointRequest { id: id.clone() },
            &admin_a,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(still.description, "");
    let mut conn = db(app).await;
    assert_eq!(events(&mut conn, a).await.len(), 1);
    assert!(events(&mut conn, b).await.is_empty());

    // A member (read scopes) reads endpoints and the catalog, but changes nothing and sees
    // no secret. Authorization comes before validation: an invalid write is still 403.
    let member = user_token(a, "viewer", &["member"]);
    c.list_webhook_endpoints(bearer(v1::ListWebhookEndpointsRequest::default(), &member))
        .await
        .expect("member lists");
    c.get_webhook_endpoint(bearer(
        v1::GetWebhookEndpointRequest { id: id.clone() },
        &member,
    ))
    .await
    .expect("member gets");
    c.list_event_types(bearer(v1::ListEventTypesRequest::default(), &member))
        .await
        .expect("member lists event types");
    let denied = |r: Result<tonic::Response<()>, tonic::Status>, rpc: &str| {
        assert_refused(
            &r.expect_err(rpc),
            Code::PermissionDenied,
            "PERMISSION_DENIED",
        );
    };
    denied(
        c.create_webhook_endpoint(bearer(create_req("not a url", &["nope"]), &member))
            .await
            .map(|r| r.map(drop)),
        "create",
    );
    denied(
        c.get_webhook_secret(bearer(
            v1::GetWebhookSecretRequest { id: id.clone() },
            &member,
        ))
        .await
        .map(|r| r.map(drop)),
        "secret",
    );
    denied(
        c.rotate_webhook_secret(bearer(
            v1::RotateWebhookSecretRequest {
                id: id.clone(),
                ..Default::default()
            },
            &member,
        ))
        .await
        .map(|r| r.map(drop)),
        "rotate",
    );
    denied(
        c.enable_webhook_endpoint(bearer(
            v1::EnableWebhookEndpointRequest { id: id.clone() },
            &member,
        ))
        .await
        .map(|r| r.map(drop)),
        "enable",
    );
    denied(
        c.delete_webhook_endpoint(bearer(
            v1::DeleteWebhookEndpointRequest { id: id.clone() },
            &member,
        ))
        .await,
        "delete",
    );

    // API keys: exactly the scopes they hold.
    let (_, read_key) = create_key(app, a, &["webhooks:read"]).await;
    let (_, write_key) = create_key(app, a, &["webhooks:write"]).await;
    let (_, usage_key) = create_key(app, a, &["usage:read"]).await;
    c.get_webhook_endpoint(api_key(
        v1::GetWebhookEndpointRequest { id: id.clone() },
        &read_key,
    ))
    .await
    .expect("webhooks:read gets");
    let refused = c
        .create_webhook_endpoint(api_key(create_req(URL, &["*"]), &read_key))
        .await
        .unwrap_err();
    assert_refused(&refused, Code::PermissionDenied, "PERMISSION_DENIED");
    assert!(refused.message().contains("webhooks:write"), "{refused:?}");
    let by_key = c
        .create_webhook_endpoint(api_key(create_req(URL, &["*"]), &write_key))
        .await
        .expect("webhooks:write creates")
        .into_inner();
    assert!(
        by_key
            .webhook_endpoint
            .unwrap()
            .created_by
            .starts_with("api_key:")
    );
    let refused = c
        .list_webhook_endpoints(api_key(
            v1::ListWebhookEndpointsRequest::default(),
            &write_key,
        ))
        .await
        .unwrap_err();
    assert_refused(&refused, Code::PermissionDenied, "PERMISSION_DENIED");
    for rpc in ["list", "event types"] {
        let r = match rpc {
            "list" => c
                .list_webhook_endpoints(api_key(
                    v1::ListWebhookEndpointsRequest::default(),
                    &usage_key,
                ))
                .await
                .map(drop),
            _ => c
                .get_event_type(api_key(
                    v1::GetEventTypeRequest {
                        name: "webhook.test".into(),
                    },
                    &usage_key,
                ))
                .await
                .map(drop),
        };
        assert_refused(&r.unwrap_err(), Code::PermissionDenied, "PERMISSION_DENIED");
    }
    // No credentials at all.
    let anonymous = c
        .list_event_types(v1::ListEventTypesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);

    // grpcurl sees the service, with its comments, on the public listener only.
    let public = app.public.to_string();
    let internal = app.internal.to_string();
    let (described, internal_list) = tokio::task::spawn_blocking(move || {
        let run = |args: &[&str]| {
            let out = std::process::Command::new(envoy::grpcurl_binary())
                .args(args)
                .output()
                .expect("run grpcurl");
            assert!(out.status.success(), "{args:?}: {out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        (
            run(&[
                "-plaintext",
                &public,
                "describe",
                "devgate.v1.WebhookService",
            ]),
            run(&["-plaintext", &internal, "list"]),
        )
    })
    .await
    .unwrap();
    for rpc in [
        "CreateWebhookEndpoint",
        "ListWebhookEndpoints",
        "GetWebhookEndpoint",
        "UpdateWebhookEndpoint",
        "DeleteWebhookEndpoint",
        "GetWebhookSecret",
        "RotateWebhookSecret",
        "EnableWebhookEndpoint",
        "ListEventTypes",
        "GetEventType",
    ] {
        assert!(
            described.contains(&format!("rpc {rpc} (")),
            "{rpc}: {described}"
        );
    }
    assert!(described.contains("Scope: `webhooks:write`"), "{described}");
    assert!(
        !internal_list.contains("devgate.v1.WebhookService"),
        "{internal_list}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_validation_limits_and_events() {
    let w = api_only().await;
    let app = &w.app;
    let tenant = Uuid::new_v4();
    let token = admin_token(tenant);
    let mut c = client(app).await;

    // Every bad field named at once; addresses the guard refuses are named with why.
    let mut req = create_req(
        "http://169.254.169.254/latest/meta-data",
        &["*", "bogus.type"],
    );
    req.description = "d".repeat(1001);
    req.rate_limit_per_second = 1001;
    req.headers = [
        ("Host".to_string(), "evil".to_string()),
        ("Content-Type".to_string(), "text/plain".to_string()),
        ("x-ok".to_string(), "fine".to_string()),
    ]
    .into();
    let status = c
        .create_webhook_endpoint(bearer(req, &token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let mut got = field_violations(&status);
    got.sort();
    let fields: Vec<&str> = got.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(
        fields,
        [
            "description",
            "event_types[1]",
            "headers[\"Content-Type\"]",
            "headers[\"Host\"]",
            "rate_limit_per_second",
            "url",
        ]
    );
    let url_why = &got.iter().find(|(f, _)| f == "url").unwrap().1;
    assert!(url_why.contains("link-local"), "{url_why}");

    for (url, why) in [
        ("", "required"),
        ("not a url", "not an absolute URL"),
        ("ftp://93.184.215.14/x", "http or https"),
        ("https://user:pw@93.184.215.14/x", "user name or password"),
        ("http://10.1.2.3/x", "private"),
        ("http://[::ffff:127.0.0.1]/x", "loopback"),
        ("http://100.64.0.1/x", "CGNAT"),
    ] {
        let status = c
            .create_webhook_endpoint(bearer(create_req(url, &["*"]), &token))
            .await
            .unwrap_err();
        let v = field_violations(&status);
        assert_eq!(v.len(), 1, "{url}: {v:?}");
        assert_eq!(v[0].0, "url", "{url}");
        assert!(v[0].1.contains(why), "{url}: {v:?}");
    }
    let long = format!("https://93.184.215.14/{}", "a".repeat(2048));
    let status = c
        .create_webhook_endpoint(bearer(create_req(&long, &["*"]), &token))
        .await
        .unwrap_err();
    assert!(field_violations(&status)[0].1.contains("longer than"));
    let status = c
        .create_webhook_endpoint(bearer(create_req(URL, &[]), &token))
        .await
        .unwrap_err();
    assert_eq!(field_violations(&status)[0].0, "event_types");

    // Update: unknown mask paths and bad values are named under webhook_endpoint.
    let id = create(app, &token).await.webhook_endpoint.unwrap().id;
    let status = c
        .update_webhook_endpoint(bearer(
            v1::UpdateWebhookEndpointRequest {
                webhook_endpoint: Some(v1::WebhookEndpoint {
                    id: id.clone(),
                    url: "http://127.0.0.1/x".into(),
                    event_types: vec!["generation.completed.*".into()],
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["url".into(), "event_types".into(), "state".into()],
                }),
            },
            &token,
        ))
        .await
        .unwrap_err();
    let mut fields: Vec<String> = field_violations(&status)
        .into_iter()
        .map(|(f, _)| f)
        .collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            "update_mask",
            "webhook_endpoint.event_types[0]",
            "webhook_endpoint.url"
        ]
    );
    let status = c
        .get_webhook_endpoint(bearer(
            v1::GetWebhookEndpointRequest { id: "we_1".into() },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(field_violations(&status)[0].0, "id");
    let status = c
        .rotate_webhook_secret(bearer(
            v1::RotateWebhookSecretRequest {
                id: id.clone(),
                grace_period: Some(prost_types::Duration {
                    seconds: 8 * 24 * 3600,
                    nanos: 0,
                }),
                end_grace_now: false,
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(field_violations(&status)[0].0, "grace_period");

    // Clearing the rate limit needs the mask (0 is "unset" without one); an update that
    // changes nothing emits no event; enabling an enabled endpoint emits none either.
    let unchanged = c
        .update_webhook_endpoint(bearer(
            v1::UpdateWebhookEndpointRequest {
                webhook_endpoint: Some(v1::WebhookEndpoint {
                    id: id.clone(),
                    rate_limit_per_second: 0,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["rate_limit_per_second".into()],
                }),
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unchanged.rate_limit_per_second, 0);
    c.enable_webhook_endpoint(bearer(
        v1::EnableWebhookEndpointRequest { id: id.clone() },
        &token,
    ))
    .await
    .unwrap();
    let mut conn = db(app).await;
    assert_eq!(events(&mut conn, tenant).await.len(), 1, "only the create");

    // The per-tenant limit holds under concurrent creates: the tenant row is locked.
    for _ in 1..MAX_ENDPOINTS_PER_TENANT - 2 {
        create(app, &token).await;
    }
    let racers = (0..6).map(|_| {
        let (app_public, token) = (app.public, token.clone());
        tokio::spawn(async move {
            WebhookServiceClient::new(channel(app_public).await)
                .create_webhook_endpoint(bearer(create_req(URL, &["*"]), &token))
                .await
        })
    });
    let results = futures_util::future::join_all(racers).await;
    let ok = results
        .iter()
        .filter(|r| r.as_ref().unwrap().is_ok())
        .count();
    assert_eq!(ok, 2, "exactly up to the limit");
    for r in results {
        if let Err(status) = r.unwrap() {
            assert_refused(&status, Code::FailedPrecondition, "FAILED_PRECONDITION");
            assert!(status.message().contains("at most 50"), "{status:?}");
        }
    }
    // Refused creates rolled back: one event per endpoint that exists.
    let log = events(&mut conn, tenant).await;
    assert_eq!(log.len() as i64, MAX_ENDPOINTS_PER_TENANT);
    // Paging through all 50, newest first, each once.
    let mut seen = Vec::new();
    let mut token_page = String::new();
    loop {
        let page = c
            .list_webhook_endpoints(bearer(
                v1::ListWebhookEndpointsRequest {
                    page_size: 7,
                    page_token: token_page.clone(),
                    state: 0,
                },
                &token,
            ))
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.webhook_endpoints.into_iter().map(|e| e.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token_page = page.next_page_token;
    }
    assert_eq!(seen.len() as i64, MAX_ENDPOINTS_PER_TENANT);
    let mut sorted = seen.clone();
    sorted.sort_by(|x, y| y.cmp(x));
    sorted.dedup();
    assert_eq!(seen, sorted, "newest first, no repeats");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_event_types_page_through_the_catalog() {
    let w = api_only().await;
    let token = admin_token(Uuid::new_v4());
    let mut c = client(&w.app).await;
    let mut conn = db(&w.app).await;
    let catalog = Catalog::load(&mut conn).await.unwrap();

    let mut names = Vec::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .list_event_types(bearer(
                v1::ListEventTypesRequest {
                    page_size: 4,
                    page_token: page_token.clone(),
                    category: String::new(),
                },
                &token,
            ))
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.event_types.len() <= 4);
        for t in &page.event_types {
            assert!(t.schema.is_some() && t.sample.is_some(), "{}", t.name);
            assert_eq!(catalog.version(&t.name), Some(t.version));
        }
        names.extend(page.event_types.into_iter().map(|t| t.name));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(names.len(), catalog.len(), "every type once");
    assert_eq!(pages, catalog.len().div_ceil(4));
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "name order");

    let webhook_types = c
        .list_event_types(bearer(
            v1::ListEventTypesRequest {
                category: "webhook_endpoint".into(),
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    let got: Vec<String> = webhook_types
        .event_types
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(got, catalog.expand("webhook_endpoint.*"));

    let bad = c
        .list_event_types(bearer(
            v1::ListEventTypesRequest {
                page_token: "garbage".into(),
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(field_violations(&bad)[0].0, "page_token");
    let missing = c
        .get_event_type(bearer(
            v1::GetEventTypeRequest {
                name: "generation.exploded".into(),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_refused(&missing, Code::NotFound, "EVENT_TYPE_NOT_FOUND");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_need_the_key_ring_for_secrets() {
    let w = World::with(|s| s.set("DEVGATE_ENCRYPTION_KEYS", "")).await;
    let token = admin_token(Uuid::new_v4());
    let status = client(&w.app)
        .await
        .create_webhook_endpoint(bearer(create_req(URL, &["*"]), &token))
        .await
        .unwrap_err();
    assert_refused(
        &status,
        Code::FailedPrecondition,
        "ENCRYPTION_NOT_CONFIGURED",
    );
    assert!(
        status.message().contains("DEVGATE_ENCRYPTION_KEYS"),
        "{status:?}"
    );
    // Nothing was written.
    let mut conn = db(&w.app).await;
    use devgate::db::schema::webhook_endpoints::dsl as we;
    let n: i64 = we::webhook_endpoints
        .count()
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 0);
    // Reads that need no secret still work.
    tokio::time::timeout(
        Duration::from_secs(5),
        client(&w.app)
            .await
            .list_webhook_endpoints(bearer(v1::ListWebhookEndpointsRequest::default(), &token)),
    )
    .await
    .unwrap()
    .unwrap();
}
