//! Identity, tenancy and authorization on the public and internal listeners.

use devgate::proto::internal::v1 as internal;
use devgate::proto::v1;
use tonic::{Code, Request};
use tonic_types::StatusExt;
use uuid::Uuid;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_key_is_not_found_on_every_rpc() {
    let w = World::new().await;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let (key, token) = create_key(&w.app, alice, &["*"]).await;
    let bob_admin = admin_token(bob);
    let (_, bob_key) = create_key(&w.app, bob, &["*"]).await;
    let mut c = w.app.public_client().await;
    let id = key.id.clone();

    for credential in [Cred::Bearer(&bob_admin), Cred::Key(&bob_key)] {
        let codes = [
            c.get_api_key(credential.on(v1::GetApiKeyRequest { id: id.clone() }))
                .await
                .unwrap_err()
                .code(),
            c.update_api_key(credential.on(v1::UpdateApiKeyRequest {
                api_key: Some(v1::ApiKey {
                    id: id.clone(),
                    name: "pwned".into(),
                    ..Default::default()
                }),
                update_mask: None,
            }))
            .await
            .unwrap_err()
            .code(),
            c.revoke_api_key(credential.on(v1::RevokeApiKeyRequest {
                id: id.clone(),
                reason: String::new(),
            }))
            .await
            .unwrap_err()
            .code(),
            c.rotate_api_key(credential.on(v1::RotateApiKeyRequest {
                id: id.clone(),
                grace_period: None,
                end_grace_now: false,
            }))
            .await
            .unwrap_err()
            .code(),
            c.delete_api_key(credential.on(v1::DeleteApiKeyRequest { id: id.clone() }))
                .await
                .unwrap_err()
                .code(),
        ];
        assert_eq!(codes, [Code::NotFound; 5]);
        let listed = c
            .list_api_keys(credential.on(v1::ListApiKeysRequest::default()))
            .await
            .unwrap()
            .into_inner();
        assert!(
            listed.api_keys.iter().all(|k| k.id != id),
            "bob never lists alice's keys"
        );
    }
    // A missing id answers exactly like a foreign one.
    let missing = c
        .get_api_key(bearer(
            v1::GetApiKeyRequest {
                id: "AAAAAAAAAAAA".into(),
            },
            &bob_admin,
        ))
        .await
        .unwrap_err();
    let foreign = c
        .get_api_key(bearer(v1::GetApiKeyRequest { id: id.clone() }, &bob_admin))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), foreign.code());
    assert_eq!(
        missing.message().replace("AAAAAAAAAAAA", &id),
        foreign.message()
    );
    // Alice's key still works and was not renamed.
    assert!(verify(&w.app, &token).await.valid);
    let mine = c
        .get_api_key(bearer(v1::GetApiKeyRequest { id }, &admin_token(alice)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.name, "test key");
}

enum Cred<'a> {
    Bearer(&'a str),
    Key(&'a str),
}

impl Cred<'_> {
    fn on<T>(&self, msg: T) -> Request<T> {
        match self {
            Cred::Bearer(t) => bearer(msg, t),
            Cred::Key(k) => api_key(msg, k),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_only_grant_scopes_they_hold() {
    let w = World::new().await;
    let tenant = Uuid::new_v4();
    let (_, manager) = create_key(
        &w.app,
        tenant,
        &["api_keys:write", "api_keys:read", "usage:read"],
    )
    .await;
    let mut c = w.app.public_client().await;

    let child = c
        .create_api_key(api_key(create_request("child", &["usage:read"]), &manager))
        .await
        .unwrap()
        .into_inner();
    let child = child.api_key.unwrap();
    assert!(child.created_by.starts_with("api_key:"));
    for scopes in [
        &["webhooks:write"][..],
        &["*"],
        &["usage:read", "generations:write"],
    ] {
        let err = c
            .create_api_key(api_key(create_request("escalate", scopes), &manager))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{scopes:?}");
    }
    // It cannot rotate (and so take over) or revoke a broader key either.
    let (root, _) = create_key(&w.app, tenant, &["*"]).await;
    let err = c
        .rotate_api_key(api_key(
            v1::RotateApiKeyRequest {
                id: root.id.clone(),
                grace_period: None,
                end_grace_now: false,
            },
            &manager,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = c
        .update_api_key(api_key(
            v1::UpdateApiKeyRequest {
                api_key: Some(v1::ApiKey {
                    id: child.id.clone(),
                    scopes: vec!["*".into()],
                    ..Default::default()
                }),
                update_mask: None,
            },
            &manager,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "cannot widen a key past its own scopes"
    );
    // Unknown scopes are invalid, not denied.
    let err = c
        .create_api_key(api_key(create_request("typo", &["usage:reed"]), &manager))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_read_admins_manage() {
    let w = World::new().await;
    let tenant = Uuid::new_v4();
    let member = user_token(tenant, "bob", &["developer"]);
    let mut c = w.app.public_client().await;
    let err = c
        .create_api_key(bearer(create_request("nope", &["usage:read"]), &member))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("api_keys:write"));
    create_key(&w.app, tenant, &["usage:read"]).await;
    let listed = c
        .list_api_keys(bearer(v1::ListApiKeysRequest::default(), &member))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.api_keys.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_required_and_checked() {
    let w = World::new().await;
    let mut c = w.app.public_client().await;
    let err = c
        .list_api_keys(v1::ListApiKeysRequest::default())
        .await
        .unwrap_err();
    assert_refused(&err, Code::Unauthenticated, "MISSING_CREDENTIALS");

    for (header, value, reason) in [
        ("authorization", "Basic Zm9vOmJhcg==", "INVALID_CREDENTIALS"),
        ("authorization", "Bearer not-a-jwt", "INVALID_CREDENTIALS"),
        ("x-api-key", "dg_live_123", "API_KEY_MALFORMED"),
    ] {
        let mut req = Request::new(v1::ListApiKeysRequest::default());
        req.metadata_mut().insert(header, value.parse().unwrap());
        let err = c.list_api_keys(req).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{value}");
        assert_eq!(err.get_error_details().error_info().unwrap().reason, reason);
    }
    // A JWT signed with another secret.
    let forged = devgate::auth::jwt::mint_hs256(
        "some-other-secret-some-other-secret-0000",
        Uuid::new_v4(),
        "mallory",
        &["admin".into()],
        std::time::Duration::from_secs(60),
    )
    .unwrap();
    let err = c
        .list_api_keys(bearer(v1::ListApiKeysRequest::default(), &forged))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_listener_serves_only_its_own_package() {
    let w = World::new().await;
    let tenant = Uuid::new_v4();
    let (_, token) = create_key(&w.app, tenant, &["*"]).await;
    // The public listener has no internal RPCs, whatever the credential.
    let err =
        internal::api_key_service_client::ApiKeyServiceClient::new(channel(w.app.public).await)
            .verify_api_key(api_key(
                internal::VerifyApiKeyRequest {
                    token: token.clone(),
                    ..Default::default()
                },
                &token,
            ))
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    // The internal listener has no public RPCs, even for an authenticated caller.
    let mut public_on_internal = v1::api_key_service_client::ApiKeyServiceClient::with_interceptor(
        channel(w.app.internal).await,
        ServiceAuth::new(SERVICE_TOKEN),
    );
    let err = public_on_internal
        .list_api_keys(v1::ListApiKeysRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_returned_and_propagated() {
    let w = World::new().await;
    let mut c = w.app.public_client().await;
    let resp = c
        .list_api_keys(bearer(
            v1::ListApiKeysRequest::default(),
            &admin_token(Uuid::new_v4()),
        ))
        .await
        .unwrap();
    let generated = resp
        .metadata()
        .get("x-request-id")
        .expect("request id")
        .to_str()
        .unwrap()
        .to_string();
    assert!(Uuid::parse_str(&generated).is_ok());
    let mut req = bearer(
        v1::ListApiKeysRequest::default(),
        &admin_token(Uuid::new_v4()),
    );
    req.metadata_mut()
        .insert("x-request-id", "trace-me-123".parse().unwrap());
    let resp = c.list_api_keys(req).await.unwrap();
    assert_eq!(resp.metadata().get("x-request-id").unwrap(), "trace-me-123");
    // Errors carry it too.
    let err = c
        .list_api_keys(v1::ListApiKeysRequest::default())
        .await
        .unwrap_err();
    assert!(err.metadata().get("x-request-id").is_some());
}
