//! A key's own limits may only lower what its tenant's plan allows: higher values are
//! refused at create/update, keys stored before a plan went down are capped at use time,
//! limits must be consistent, and a consuming call may not cost more than the burst.

use devgate::proto::{internal::v1 as internal, v1};
use tonic::Code;
use tonic_types::StatusExt;
use uuid::Uuid;

use crate::harness::*;

fn limits(per_minute: u32, per_hour: u32, per_day: u32, burst: u32) -> Option<v1::RateLimits> {
    Some(v1::RateLimits {
        per_minute,
        per_hour,
        per_day,
        burst,
    })
}

/// The `ratelimit-policy` a call with `token` is answered with.
async fn policy_of(app: &TestApp, token: &str) -> String {
    let ok = app
        .public_client()
        .await
        .list_api_keys(api_key(v1::ListApiKeysRequest::default(), token))
        .await
        .unwrap();
    ok.metadata()
        .get("ratelimit-policy")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string()
}

/// The refused fields and their descriptions.
fn violations(status: &tonic::Status) -> Vec<(String, String)> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_error_details()
        .bad_request()
        .expect("BadRequest details")
        .field_violations
        .iter()
        .map(|f| (f.field.clone(), f.description.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_cannot_lift_its_plan() {
    // The test plan: 100000/1000000/10000000/10000 (harness Settings).
    let w = World::new().await;
    let tenant = Uuid::new_v4();
    let admin = admin_token(tenant);
    let mut req = create_request("greedy", &["*"]);
    req.rate_limits = limits(100_000_000, 0, 0, 0);
    let err = w
        .app
        .public_client()
        .await
        .create_api_key(bearer(req, &admin))
        .await
        .unwrap_err();
    let v = violations(&err);
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].0, "rate_limits.per_minute");
    assert!(v[0].1.contains("100000"), "names the ceiling: {}", v[0].1);

    // Inconsistent limits: a burst above the key's own minute rate.
    let mut req = create_request("odd", &["*"]);
    req.rate_limits = limits(10, 0, 0, 20);
    let err = w
        .app
        .public_client()
        .await
        .create_api_key(bearer(req, &admin))
        .await
        .unwrap_err();
    assert_eq!(violations(&err)[0].0, "rate_limits.burst");

    // Update is held to the same ceiling.
    let (key, token) = create_key(&w.app, tenant, &["*"]).await;
    let patch = v1::UpdateApiKeyRequest {
        api_key: Some(v1::ApiKey {
            id: key.id.clone(),
            rate_limits: limits(0, 0, 20_000_000, 0),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["rate_limits".into()],
        }),
    };
    let err = w
        .app
        .public_client()
        .await
        .update_api_key(bearer(patch, &admin))
        .await
        .unwrap_err();
    assert_eq!(violations(&err)[0].0, "rate_limits.per_day");

    // Lowering is the key's to do, and shows in its policy.
    let mut req = create_request("modest", &["*"]);
    req.rate_limits = limits(50, 0, 0, 5);
    let (_, modest) = create_key_with(&w.app, tenant, req).await;
    let policy = policy_of(&w.app, &modest).await;
    assert!(policy.starts_with("\"minute\";q=50;w=60"), "{policy}");

    // A consuming call that costs more than the burst could never pass: refused as such.
    let err = w
        .app
        .internal_client()
        .await
        .verify_api_key(internal::VerifyApiKeyRequest {
            token: modest.clone(),
            consume: true,
            cost: 6,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&err)[0].0, "cost");
    drop(token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_keys_are_capped_when_the_plan_goes_down() {
    let w = World::new().await;
    let tenant = Uuid::new_v4();
    let mut req = create_request("was fine", &["*"]);
    req.rate_limits = limits(500, 0, 0, 50);
    let (_, token) = create_key_with(&w.app, tenant, req).await;

    // SetPlan lowers the tenant below the key's stored values; SetPlan itself must be
    // consistent too.
    let mut internal = w.app.internal_usage().await;
    let err = internal
        .set_plan(internal::SetPlanRequest {
            tenant_id: tenant.to_string(),
            plan: v1::Plan::Free as i32,
            rate_limits: limits(10, 5, 0, 3),
            quotas: None,
        })
        .await
        .unwrap_err();
    assert_eq!(violations(&err)[0].0, "rate_limits.per_minute");
    internal
        .set_plan(internal::SetPlanRequest {
            tenant_id: tenant.to_string(),
            plan: v1::Plan::Free as i32,
            rate_limits: limits(10, 100, 1000, 3),
            quotas: None,
        })
        .await
        .unwrap();

    let policy = policy_of(&w.app, &token).await;
    assert_eq!(
        policy,
        "\"minute\";q=10;w=60, \"hour\";q=100;w=3600, \"day\";q=1000;w=86400"
    );
    // The burst is capped too: 3 calls in a row, not 50.
    let mut refused = 0;
    for _ in 0..5 {
        if w.app
            .public_client()
            .await
            .list_api_keys(api_key(v1::ListApiKeysRequest::default(), &token))
            .await
            .is_err()
        {
            refused += 1;
        }
    }
    assert!(
        refused >= 2,
        "only {refused} of 5 refused after a burst of 3"
    );
}
