//! Rotation never ends a secret by accident: a zero or malformed grace means the default,
//! ending it now is an explicit field, and a rotation cannot cut an earlier rotation's
//! grace short (compare-and-swap), even when two race.

use devgate::proto::v1;
use tonic::Code;
use tonic_types::StatusExt;
use uuid::Uuid;

use crate::harness::{envoy::Envoy, *};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_or_empty_grace_means_the_default() {
    let w = World::new().await;
    let tenant = Uuid::new_v4();
    let (key, old) = create_key(&w.app, tenant, &["*"]).await;
    let rotated = rotate(&w.app, tenant, &key.id, Some(0)).await.unwrap();
    let until = rotated
        .api_key
        .unwrap()
        .previous_secret_expire_time
        .unwrap();
    let in_a_day = chrono::Utc::now().timestamp() + 86_400;
    assert!((until.seconds - in_a_day).abs() < 60, "default 24h grace");
    assert!(
        verify(&w.app, &old).await.valid,
        "the old secret keeps working"
    );

    // Through Envoy, `{"grace_period":{}}` (which the transcoder reads as zero) is the
    // default too; here on a second key, since the first is now in its grace.
    let (key2, old2) = create_key(&w.app, tenant, &["*"]).await;
    let envoy = Envoy::start(w.app.public).await;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/api-keys/{}:rotate", envoy.base, key2.id))
        .bearer_auth(admin_token(tenant))
        .header("content-type", "application/json")
        .body(r#"{"grace_period":{}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    assert!(
        verify(&w.app, &old2).await.valid,
        "old secret survives {{}}"
    );

    // A grace together with end_grace_now contradicts itself.
    let err = w
        .app
        .public_client()
        .await
        .rotate_api_key(bearer(
            v1::RotateApiKeyRequest {
                id: key2.id.clone(),
                grace_period: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
                end_grace_now: true,
            },
            &admin_token(tenant),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_cannot_cut_an_earlier_grace_short() {
    let w = World::new().await;
    let tenant = Uuid::new_v4();
    let (key, first) = create_key(&w.app, tenant, &["*"]).await;
    let second = rotate(&w.app, tenant, &key.id, Some(3600)).await.unwrap();

    // Rotating again would drop `first` before its grace ends: refused, with the end.
    let err = rotate(&w.app, tenant, &key.id, None).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let details = err.get_error_details();
    let info = details.error_info().unwrap();
    assert_eq!(info.reason, "PREVIOUS_SECRET_IN_GRACE");
    assert!(info.metadata.contains_key("previous_secret_expire_time"));
    assert!(verify(&w.app, &first).await.valid);
    assert!(verify(&w.app, &second.secret).await.valid);

    // Ending it is the caller's explicit choice: only the newest secret works after.
    let third = rotate_ending_grace(&w.app, tenant, &key.id).await.unwrap();
    assert!(!verify(&w.app, &first).await.valid);
    assert!(!verify(&w.app, &second.secret).await.valid);
    assert!(verify(&w.app, &third.secret).await.valid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rotations_do_not_silently_overwrite_each_other() {
    let w = World::new().await;
    let replica = w.replica().await;
    let tenant = Uuid::new_v4();
    for round in 0..3 {
        let (key, original) = create_key(&w.app, tenant, &["*"]).await;
        let (a, b) = tokio::join!(
            rotate(&w.app, tenant, &key.id, Some(3600)),
            rotate(&replica, tenant, &key.id, Some(3600)),
        );
        let (won, lost) = match (a, b) {
            (Ok(won), Err(lost)) | (Err(lost), Ok(won)) => (won, lost),
            (Ok(_), Ok(_)) => panic!("round {round}: both rotations succeeded"),
            (Err(a), Err(b)) => panic!("round {round}: both failed: {a:?} {b:?}"),
        };
        assert!(
            matches!(lost.code(), Code::FailedPrecondition | Code::Aborted),
            "{lost:?}"
        );
        // The winner's grace holds: the original and the new secret both work.
        assert!(verify(&w.app, &original).await.valid, "round {round}");
        assert!(verify(&w.app, &won.secret).await.valid, "round {round}");
    }
}
