//! ApiKeyService emits `api_key.*` events through the outbox in the transaction of the
//! change: exactly one per real change, valid against the catalog, never carrying a secret,
//! none for a no-op or a refused change, and only in the key's own tenant.

use devgate::{
    events::Catalog,
    proto::v1::{self, api_key_service_client::ApiKeyServiceClient},
};
use diesel::{ExpressionMethods, QueryDsl};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use serde_json::Value;
use tonic::{Code, transport::Channel};
use tonic_types::StatusExt;
use uuid::Uuid;

use crate::harness::*;

async fn db(app: &TestApp) -> AsyncPgConnection {
    AsyncPgConnection::establish(&app.settings.vars["DEVGATE_DATABASE_URL"])
        .await
        .expect("connect to the test database")
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

fn types(log: &[(String, Value)]) -> Vec<&str> {
    log.iter().map(|(t, _)| t.as_str()).collect()
}

async fn create(
    client: &mut ApiKeyServiceClient<Channel>,
    token: &str,
    name: &str,
) -> v1::CreateApiKeyResponse {
    client
        .create_api_key(bearer(
            create_request(name, &["api_keys:read", "usage:read"]),
            token,
        ))
        .await
        .expect("create key")
        .into_inner()
}

fn update(patch: v1::ApiKey, paths: &[&str]) -> v1::UpdateApiKeyRequest {
    v1::UpdateApiKeyRequest {
        api_key: Some(patch),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }),
    }
}

fn rotate(id: &str, end_grace_now: bool) -> v1::RotateApiKeyRequest {
    v1::RotateApiKeyRequest {
        id: id.into(),
        grace_period: None,
        end_grace_now,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_events_one_per_change_and_none_for_no_ops() {
    let w = World::new().await;
    let tenant = Uuid::new_v4();
    let admin = admin_token(tenant);
    let mut client = ApiKeyServiceClient::new(channel(w.app.public).await);
    let mut conn = db(&w.app).await;
    let catalog = Catalog::load(&mut conn).await.unwrap();
    let mut secrets = Vec::new();

    // Create.
    let created = create(&mut client, &admin, "ci deploys").await;
    let key = created.api_key.unwrap();
    secrets.push(created.secret);
    let log = events(&mut conn, tenant).await;
    assert_eq!(types(&log), ["api_key.created"]);
    let p = &log[0].1;
    assert_eq!(p["api_key_id"], key.id.as_str());
    assert_eq!(p["name"], "ci deploys");
    assert_eq!(p["environment"], "test");
    assert_eq!(
        p["scopes"],
        serde_json::json!(["api_keys:read", "usage:read"])
    );
    assert_eq!(p["created_by"], "user:admin-user");
    assert_eq!(p["expire_time"], Value::Null);

    // Update two fields: one event naming both.
    let patch = v1::ApiKey {
        id: key.id.clone(),
        name: "renamed".into(),
        scopes: vec!["api_keys:read".into()],
        ..Default::default()
    };
    client
        .update_api_key(bearer(update(patch.clone(), &["name", "scopes"]), &admin))
        .await
        .unwrap();
    let log = events(&mut conn, tenant).await;
    assert_eq!(types(&log), ["api_key.created", "api_key.updated"]);
    let p = &log[1].1;
    assert_eq!(p["changed_fields"], serde_json::json!(["name", "scopes"]));
    assert_eq!(p["name"], "renamed");
    assert_eq!(p["updated_by"], "user:admin-user");

    // The same values again change nothing: no event. Only the differing field is listed.
    client
        .update_api_key(bearer(update(patch, &["name", "scopes"]), &admin))
        .await
        .unwrap();
    assert_eq!(events(&mut conn, tenant).await.len(), 2, "no-op update");
    let patch = v1::ApiKey {
        id: key.id.clone(),
        name: "renamed".into(),
        description: "now described".into(),
        ..Default::default()
    };
    client
        .update_api_key(bearer(update(patch, &["name", "description"]), &admin))
        .await
        .unwrap();
    let log = events(&mut conn, tenant).await;
    assert_eq!(log.len(), 3);
    assert_eq!(
        log[2].1["changed_fields"],
        serde_json::json!(["description"])
    );

    // An expiry with nanoseconds Postgres rounds away: setting it again is still a no-op.
    let expire = prost_types::Timestamp {
        seconds: chrono::Utc::now().timestamp() + 86_400,
        nanos: 123_456_789,
    };
    let patch = v1::ApiKey {
        id: key.id.clone(),
        expire_time: Some(expire),
        ..Default::default()
    };
    for _ in 0..2 {
        client
            .update_api_key(bearer(update(patch.clone(), &["expire_time"]), &admin))
            .await
            .unwrap();
    }
    let log = events(&mut conn, tenant).await;
    assert_eq!(log.len(), 4, "the repeated expiry is a no-op");
    assert_eq!(
        log[3].1["changed_fields"],
        serde_json::json!(["expire_time"])
    );

    // A refused update (granting a scope the caller lacks) writes nothing.
    let scoped = client
        .create_api_key(bearer(
            create_request("limited", &["api_keys:read", "api_keys:write"]),
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    secrets.push(scoped.secret.clone());
    let scoped_id = scoped.api_key.unwrap().id;
    let patch = v1::ApiKey {
        id: scoped_id.clone(),
        scopes: vec!["webhooks:write".into()],
        ..Default::default()
    };
    let err = client
        .update_api_key(api_key(update(patch, &["scopes"]), &scoped.secret))
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::PermissionDenied),
        "{:?}: {}",
        err.code(),
        err.message()
    );
    let log = events(&mut conn, tenant).await;
    assert_eq!(log.len(), 5, "only the second key's creation");
    assert_eq!(log[4].0, "api_key.created");

    // Rotate with the default grace: the old secret's end is in the event.
    let rotated = client
        .rotate_api_key(bearer(rotate(&key.id, false), &admin))
        .await
        .unwrap()
        .into_inner();
    secrets.push(rotated.secret);
    let log = events(&mut conn, tenant).await;
    assert_eq!(log.len(), 6);
    assert_eq!(log[5].0, "api_key.rotated");
    assert!(log[5].1["previous_secret_expire_time"].is_string());
    assert_eq!(log[5].1["rotated_by"], "user:admin-user");

    // Rotating again during the grace is refused, and writes no event.
    let err = client
        .rotate_api_key(bearer(rotate(&key.id, false), &admin))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        err.get_details_error_info().unwrap().reason,
        "PREVIOUS_SECRET_IN_GRACE"
    );
    assert_eq!(events(&mut conn, tenant).await.len(), 6, "refused rotation");

    // Ending the grace now: the event says the old secret stopped (null).
    let rotated = client
        .rotate_api_key(bearer(rotate(&key.id, true), &admin))
        .await
        .unwrap()
        .into_inner();
    secrets.push(rotated.secret);
    let log = events(&mut conn, tenant).await;
    assert_eq!(log.len(), 7);
    assert_eq!(log[6].0, "api_key.rotated");
    assert_eq!(log[6].1["previous_secret_expire_time"], Value::Null);

    // Revoke: an event the first time only.
    for _ in 0..2 {
        client
            .revoke_api_key(bearer(
                v1::RevokeApiKeyRequest {
                    id: key.id.clone(),
                    reason: "leaked in a log".into(),
                },
                &admin,
            ))
            .await
            .unwrap();
    }
    let log = events(&mut conn, tenant).await;
    assert_eq!(log.len(), 8, "the repeated revoke is a no-op");
    assert_eq!(log[7].0, "api_key.revoked");
    assert_eq!(log[7].1["reason"], "leaked in a log");
    assert_eq!(log[7].1["revoked_by"], "user:admin-user");

    // A revoked key cannot rotate: refused, no event.
    let err = client
        .rotate_api_key(bearer(rotate(&key.id, true), &admin))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(events(&mut conn, tenant).await.len(), 8);

    // Delete; deleting again is NotFound and writes nothing.
    for expect_ok in [true, false] {
        let r = client
            .delete_api_key(bearer(
                v1::DeleteApiKeyRequest { id: key.id.clone() },
                &admin,
            ))
            .await;
        assert_eq!(r.is_ok(), expect_ok, "{r:?}");
    }
    let log = events(&mut conn, tenant).await;
    assert_eq!(
        types(&log),
        [
            "api_key.created",
            "api_key.updated",
            "api_key.updated",
            "api_key.updated",
            "api_key.created",
            "api_key.rotated",
            "api_key.rotated",
            "api_key.revoked",
            "api_key.deleted",
        ]
    );
    assert_eq!(log[8].1["api_key_id"], key.id.as_str());
    assert_eq!(log[8].1["name"], "renamed");
    assert_eq!(log[8].1["deleted_by"], "user:admin-user");

    // Every payload satisfies its catalog schema and carries no secret, whole or in part.
    for (event_type, payload) in &log {
        catalog
            .validate(event_type, payload)
            .unwrap_or_else(|e| panic!("{event_type}: {e}: {payload}"));
        let text = payload.to_string();
        for secret in &secrets {
            let tail = &secret[secret.len() - 20..];
            assert!(!text.contains(tail), "{event_type} leaks a secret");
        }
        assert!(!text.contains("hash"), "{event_type}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_events_are_tenant_scoped() {
    let w = World::new().await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let (admin_a, admin_b) = (admin_token(a), admin_token(b));
    let mut client = ApiKeyServiceClient::new(channel(w.app.public).await);
    let mut conn = db(&w.app).await;

    let key = create(&mut client, &admin_a, "tenant a")
        .await
        .api_key
        .unwrap();
    create(&mut client, &admin_b, "tenant b").await;

    // Tenant B's admin cannot change A's key, and nothing is written for either tenant.
    let patch = v1::ApiKey {
        id: key.id.clone(),
        name: "taken over".into(),
        ..Default::default()
    };
    let attempts = [
        client
            .update_api_key(bearer(update(patch, &["name"]), &admin_b))
            .await
            .map(|_| ()),
        client
            .rotate_api_key(bearer(rotate(&key.id, true), &admin_b))
            .await
            .map(|_| ()),
        client
            .revoke_api_key(bearer(
                v1::RevokeApiKeyRequest {
                    id: key.id.clone(),
                    reason: String::new(),
                },
                &admin_b,
            ))
            .await
            .map(|_| ()),
        client
            .delete_api_key(bearer(
                v1::DeleteApiKeyRequest { id: key.id.clone() },
                &admin_b,
            ))
            .await
            .map(|_| ()),
    ];
    for r in attempts {
        assert_eq!(r.unwrap_err().code(), Code::NotFound);
    }
    let log_a = events(&mut conn, a).await;
    let log_b = events(&mut conn, b).await;
    assert_eq!(types(&log_a), ["api_key.created"]);
    assert_eq!(types(&log_b), ["api_key.created"]);
    assert_eq!(log_a[0].1["api_key_id"], key.id.as_str());
    assert_ne!(log_b[0].1["api_key_id"], key.id.as_str());

    // A's own revoke (no reason given) lands in A's log only; the reason is left out.
    client
        .revoke_api_key(bearer(
            v1::RevokeApiKeyRequest {
                id: key.id.clone(),
                reason: String::new(),
            },
            &admin_a,
        ))
        .await
        .unwrap();
    let log_a = events(&mut conn, a).await;
    assert_eq!(types(&log_a), ["api_key.created", "api_key.revoked"]);
    assert!(log_a[1].1.get("reason").is_none());
    assert_eq!(events(&mut conn, b).await.len(), 1);
}
