//! The API-key lifecycle over gRPC on the public and internal listeners.

use devgate::proto::internal::v1 as internal;
use std::time::Duration;

use devgate::proto::v1;
use tonic::Code;
use tonic_types::StatusExt;
use uuid::Uuid;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_lifecycle() {
    let w = World::new().await;
    let tenant = Uuid::new_v4();
    let admin = admin_token(tenant);
    let mut client = w.app.public_client().await;

    // Create: the secret comes back once, in the token format.
    let mut req = create_request("ci deploys", &["api_keys:read", "usage:read"]);
    req.description = "used by the CI pipeline".into();
    req.allowed_cidrs = vec!["127.0.0.0/8".into(), "::1/128".into()];
    let created = client
        .create_api_key(bearer(req, &admin))
        .await
        .unwrap()
        .into_inner();
    let key = created.api_key.unwrap();
    let secret = created.secret;
    assert!(
        secret.starts_with(&format!("dg_test_{}_", key.id)),
        "token format"
    );
    assert_eq!(key.prefix, format!("dg_test_{}", key.id));
    assert_eq!(key.state, v1::ApiKeyState::Active as i32);
    assert_eq!(key.scopes, vec!["api_keys:read", "usage:read"]);
    assert_eq!(key.created_by, "user:admin-user");
    assert_eq!(key.allowed_cidrs, vec!["127.0.0.0/8", "::1/128"]);

    // Get and list never show the secret.
    let got = client
        .get_api_key(bearer(v1::GetApiKeyRequest { id: key.id.clone() }, &admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.name, "ci deploys");
    assert!(!format!("{got:?}").contains(&secret[secret.len() - 50..]));

    // The key authenticates itself (it holds api_keys:read) and sees its tenant's keys.
    let listed = client
        .list_api_keys(api_key(v1::ListApiKeysRequest::default(), &secret))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.api_keys.len(), 1);
    assert_eq!(listed.api_keys[0].id, key.id);

    // last_used_time is written in batches (flush interval 200 ms in tests).
    wait_until(Duration::from_secs(5), || {
        let mut c = client.clone();
        let (id, admin) = (key.id.clone(), admin.clone());
        async move {
            c.get_api_key(bearer(v1::GetApiKeyRequest { id }, &admin))
                .await
                .unwrap()
                .into_inner()
                .last_used_time
                .is_some()
        }
    })
    .await;

    // Update with a field mask: only the named field changes.
    let patch = v1::ApiKey {
        id: key.id.clone(),
        name: "renamed".into(),
        description: "ignored".into(),
        ..Default::default()
    };
    let updated = client
        .update_api_key(bearer(
            v1::UpdateApiKeyRequest {
                api_key: Some(patch),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["name".into()],
                }),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.name, "renamed");
    assert_eq!(updated.description, "used by the CI pipeline");

    // Without a mask, the non-empty fields change.
    let patch = v1::ApiKey {
        id: key.id.clone(),
        scopes: vec!["api_keys:read".into()],
        ..Default::default()
    };
    let updated = client
        .update_api_key(bearer(
            v1::UpdateApiKeyRequest {
                api_key: Some(patch),
                update_mask: None,
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.scopes, vec!["api_keys:read"]);
    assert_eq!(updated.name, "renamed");

    // Rotate: new secret works, old one works during the grace period.
    let rotated = client
        .rotate_api_key(bearer(
            v1::RotateApiKeyRequest {
                id: key.id.clone(),
                grace_period: None,
                end_grace_now: false,
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(rotated.secret, secret);
    let grace_end = rotated
        .api_key
        .as_ref()
        .unwrap()
        .previous_secret_expire_time
        .expect("grace end shown");
    let day = chrono::Utc::now().timestamp() + 86_400;
    assert!((grace_end.seconds - day).abs() < 60, "default grace is 24h");
    assert!(
        verify_from(&w.app, &rotated.secret, "127.0.0.1")
            .await
            .valid
    );
    assert!(verify_from(&w.app, &secret, "::1").await.valid);
    let outside = verify_from(&w.app, &secret, "192.0.2.1").await;
    assert_eq!(
        reason(&outside),
        internal::VerifyFailureReason::IpNotAllowed
    );
    let unknown = verify(&w.app, &secret).await;
    assert_eq!(
        reason(&unknown),
        internal::VerifyFailureReason::IpNotAllowed,
        "no address, no entry"
    );

    // Revoke: both secrets stop at once.
    let revoked = client
        .revoke_api_key(bearer(
            v1::RevokeApiKeyRequest {
                id: key.id.clone(),
                reason: "leaked in a log".into(),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.state, v1::ApiKeyState::Revoked as i32);
    assert_eq!(revoked.revoke_reason, "leaked in a log");
    for token in [&secret, &rotated.secret] {
        let r = verify(&w.app, token).await;
        assert!(!r.valid);
        assert_eq!(reason(&r), internal::VerifyFailureReason::Revoked);
        let err = client
            .list_api_keys(api_key(v1::ListApiKeysRequest::default(), token))
            .await
            .unwrap_err();
        assert_refused(&err, Code::Unauthenticated, "API_KEY_REVOKED");
    }
    // A revoked key cannot be rotated back to life.
    let err = client
        .rotate_api_key(bearer(
            v1::RotateApiKeyRequest {
                id: key.id.clone(),
                grace_period: None,
                end_grace_now: false,
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // Delete: gone.
    client
        .delete_api_key(bearer(
            v1::DeleteApiKeyRequest { id: key.id.clone() },
            &admin,
        ))
        .await
        .unwrap();
    let err = client
        .get_api_key(bearer(v1::GetApiKeyRequest { id: key.id.clone() }, &admin))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .delete_api_key(bearer(
            v1::DeleteApiKeyRequest { id: key.id.clone() },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_grace_ends_then_old_secret_is_refused() {
    let w = World::new().await;
    let tenant = Uuid::new_v4();
    let (key, old) = create_key(&w.app, tenant, &["*"]).await;
    let mut client = w.app.public_client().await;
    // The old token is cached before the rotation; the cache must still honour the grace end.
    assert!(verify(&w.app, &old).await.valid);
    let rotated = rotate(&w.app, tenant, &key.id, Some(2)).await.unwrap();
    assert!(
        verify(&w.app, &old).await.valid,
        "old secret works during the grace period"
    );
    assert!(
        client
            .list_api_keys(api_key(v1::ListApiKeysRequest::default(), &old))
            .await
            .is_ok()
    );
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let r = verify(&w.app, &old).await;
    assert!(!r.valid);
    assert_eq!(reason(&r), internal::VerifyFailureReason::NotFound);
    let err = client
        .list_api_keys(api_key(v1::ListApiKeysRequest::default(), &old))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(verify(&w.app, &rotated.secret).await.valid);

    // Ending the grace at once is explicit: the previous secret stops now.
    let again = rotate_ending_grace(&w.app, tenant, &key.id).await.unwrap();
    assert!(again.api_key.unwrap().previous_secret_expire_time.is_none());
    assert!(!verify(&w.app, &rotated.secret).await.valid);
    assert!(verify(&w.app, &again.secret).await.valid);

    // Longer than 7 days is refused.
    let err = rotate(&w.app, tenant, &key.id, Some(8 * 86_400))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.get_error_details()
            .bad_request()
            .unwrap()
            .field_violations[0]
            .field,
        "grace_period"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_ip_refused_and_insufficient_scope() {
    // The test client plays the trusted proxy (see internal.rs for untrusted peers).
    let w = World::with(|s| s.set("DEVGATE_TRUSTED_PROXIES", "127.0.0.1/32")).await;
    let tenant = Uuid::new_v4();
    let mut client = w.app.public_client().await;

    // Expiry.
    let mut req = create_request("short-lived", &["api_keys:read"]);
    let soon = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    req.expire_time = Some(prost_types::Timestamp {
        seconds: soon.timestamp(),
        nanos: soon.timestamp_subsec_nanos() as i32,
    });
    let (_, short) = create_key_with(&w.app, tenant, req).await;
    assert!(verify(&w.app, &short).await.valid);
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let r = verify(&w.app, &short).await;
    assert_eq!(
        reason(&r),
        internal::VerifyFailureReason::Expired,
        "cache entries end at the key's expiry"
    );
    let err = client
        .list_api_keys(api_key(v1::ListApiKeysRequest::default(), &short))
        .await
        .unwrap_err();
    assert_refused(&err, Code::Unauthenticated, "API_KEY_EXPIRED");
    let expired_list = client
        .list_api_keys(bearer(
            v1::ListApiKeysRequest {
                state: v1::ApiKeyState::Expired as i32,
                ..Default::default()
            },
            &admin_token(tenant),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(expired_list.api_keys.len(), 1);

    // IP allow-list: from a trusted proxy, the client address is its x-forwarded-for.
    let mut req = create_request("office only", &["api_keys:read"]);
    req.allowed_cidrs = vec!["203.0.113.0/24".into()];
    let (_, office) = create_key_with(&w.app, tenant, req).await;
    let from = |ip: &str| {
        let mut r = api_key(v1::ListApiKeysRequest::default(), &office);
        r.metadata_mut()
            .insert("x-forwarded-for", ip.parse().unwrap());
        r
    };
    assert!(client.list_api_keys(from("203.0.113.7")).await.is_ok());
    let err = client
        .list_api_keys(from("198.51.100.1"))
        .await
        .unwrap_err();
    assert_refused(&err, Code::PermissionDenied, "API_KEY_IP_NOT_ALLOWED");
    let mut internal = w.app.internal_client().await;
    let check = |ip: &str| internal::VerifyApiKeyRequest {
        token: office.clone(),
        client_ip: ip.into(),
        ..Default::default()
    };
    assert!(
        internal
            .verify_api_key(check("203.0.113.200"))
            .await
            .unwrap()
            .into_inner()
            .valid
    );
    let r = internal
        .verify_api_key(check("198.51.100.1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reason(&r), internal::VerifyFailureReason::IpNotAllowed);
    let err = internal
        .verify_api_key(check("not-an-ip"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Scopes: a usage:read key may not list keys; VerifyApiKey reports insufficient_scope.
    let (_, reader) = create_key(&w.app, tenant, &["usage:read"]).await;
    let err = client
        .list_api_keys(api_key(v1::ListApiKeysRequest::default(), &reader))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let r = internal
        .verify_api_key(internal::VerifyApiKeyRequest {
            token: reader.clone(),
            required_scope: "generations:write".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.valid);
    assert_eq!(reason(&r), internal::VerifyFailureReason::InsufficientScope);
    assert_eq!(r.tenant_id, tenant.to_string());
    let r = internal
        .verify_api_key(internal::VerifyApiKeyRequest {
            token: reader.clone(),
            required_scope: "usage:read".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.valid);
    assert_eq!(r.plan, v1::Plan::Free as i32);
    assert_eq!(r.environment, v1::Environment::Test as i32);
    let err = internal
        .verify_api_key(internal::VerifyApiKeyRequest {
            token: reader,
            required_scope: "usage:write".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Malformed and unknown tokens.
    let r = verify(&w.app, "dg_test_nonsense").await;
    assert_eq!(reason(&r), internal::VerifyFailureReason::Malformed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_on_one_instance_is_seen_by_another_at_once() {
    let w = World::new().await;
    let b = w.replica().await;
    let tenant = Uuid::new_v4();
    let (key, token) = create_key(&w.app, tenant, &["api_keys:read"]).await;
    // B verifies and caches the key.
    assert!(verify(&b, &token).await.valid);
    assert!(verify(&b, &token).await.valid);
    // A revokes.
    revoke(&w.app, tenant, &key.id).await.unwrap();
    // B refuses well before its cache TTL (30 s) would have expired the entry.
    wait_until(Duration::from_secs(2), || async {
        !verify(&b, &token).await.valid
    })
    .await;
    assert_eq!(
        reason(&verify(&b, &token).await),
        internal::VerifyFailureReason::Revoked
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_attempts_lock_the_key_id_before_hashing() {
    let w = World::with(|s| {
        s.set("DEVGATE_AUTH_FAILURE_LIMIT", "3")
            .set("DEVGATE_AUTH_FAILURE_WINDOW", "60s")
    })
    .await;
    let tenant = Uuid::new_v4();
    let (key, token) = create_key(&w.app, tenant, &["*"]).await;
    // Well-formed tokens (valid checksum) for the right key id with wrong secrets, from
    // 127.0.0.1: the network the public listener's calls below come from (the limiter
    // counts per key id and client network).
    let id: devgate::identity::KeyId = key.id.parse().unwrap();
    for _ in 0..3 {
        let wrong =
            devgate::api_keys::token::generate(devgate::identity::Environment::Test, &id).token;
        assert_eq!(
            reason(&verify_from(&w.app, &wrong, "127.0.0.1").await),
            internal::VerifyFailureReason::NotFound
        );
    }
    let wrong = devgate::api_keys::token::generate(devgate::identity::Environment::Test, &id).token;
    assert_eq!(
        reason(&verify_from(&w.app, &wrong, "127.0.0.1").await),
        internal::VerifyFailureReason::TooManyAttempts
    );
    // Locked: even the right secret is refused until the window passes (it was never cached).
    assert_eq!(
        reason(&verify_from(&w.app, &token, "127.0.0.1").await),
        internal::VerifyFailureReason::TooManyAttempts
    );
    let err = w
        .app
        .public_client()
        .await
        .list_api_keys(api_key(v1::ListApiKeysRequest::default(), &token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let retry_after: u64 = err
        .metadata()
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after));
    // Other keys are not affected.
    let (_, other) = create_key(&w.app, tenant, &["*"]).await;
    assert!(verify(&w.app, &other).await.valid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_and_filters() {
    let w = World::new().await;
    let tenant = Uuid::new_v4();
    let admin = admin_token(tenant);
    let mut ids = Vec::new();
    for i in 0..5 {
        let mut req = create_request(&format!("key {i}"), &["usage:read"]);
        if i % 2 == 0 {
            req.environment = v1::Environment::Live as i32;
        }
        ids.push(create_key_with(&w.app, tenant, req).await.0.id);
    }
    let mut client = w.app.public_client().await;
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_api_keys(bearer(
                v1::ListApiKeysRequest {
                    page_size: 2,
                    page_token: token.clone(),
                    ..Default::default()
                },
                &admin,
            ))
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        seen.extend(page.api_keys.into_iter().map(|k| k.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    ids.reverse();
    assert_eq!(seen, ids, "newest first, no duplicates, nothing missing");

    let live = client
        .list_api_keys(bearer(
            v1::ListApiKeysRequest {
                environment: v1::Environment::Live as i32,
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(live.api_keys.len(), 3);

    for bad in [
        v1::ListApiKeysRequest {
            page_token: "garbage".into(),
            ..Default::default()
        },
        v1::ListApiKeysRequest {
            page_size: 1000,
            ..Default::default()
        },
        v1::ListApiKeysRequest {
            state: 42,
            ..Default::default()
        },
    ] {
        let err = client.list_api_keys(bearer(bad, &admin)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.get_error_details().bad_request().is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_name_every_bad_field() {
    let w = World::new().await;
    let admin = admin_token(Uuid::new_v4());
    let mut client = w.app.public_client().await;
    let req = v1::CreateApiKeyRequest {
        name: String::new(),
        scopes: vec!["usage:read".into(), "usage:write".into()],
        environment: 0,
        allowed_cidrs: vec!["10.1.2.3/8".into()],
        expire_time: Some(prost_types::Timestamp {
            seconds: 1,
            nanos: 0,
        }),
        ..Default::default()
    };
    let err = client
        .create_api_key(bearer(req, &admin))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let details = err.get_error_details();
    let fields: Vec<&str> = details
        .bad_request()
        .unwrap()
        .field_violations
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    assert_eq!(
        fields,
        vec![
            "name",
            "scopes",
            "environment",
            "expire_time",
            "allowed_cidrs[0]"
        ]
    );

    let err = client
        .get_api_key(bearer(
            v1::GetApiKeyRequest {
                id: "../etc".into(),
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client
        .update_api_key(bearer(
            v1::UpdateApiKeyRequest {
                api_key: Some(v1::ApiKey {
                    id: "AAAAAAAAAAAA".into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["state".into()],
                }),
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.get_error_details()
            .bad_request()
            .unwrap()
            .field_violations[0]
            .field,
        "update_mask"
    );
}
