//! grpcurl (1.8.6, reflection v1alpha) against both listeners.

use std::process::Command;

use uuid::Uuid;

use crate::harness::{envoy::grpcurl_binary, *};

fn grpcurl(args: &[&str]) -> String {
    let binary = grpcurl_binary();
    assert!(
        binary.exists(),
        "grpcurl not found at {} (deploy/local/test.sh installs it)",
        binary.display()
    );
    let out = Command::new(&binary)
        .args(args)
        .output()
        .expect("run grpcurl");
    assert!(
        out.status.success(),
        "grpcurl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_describe_and_call() {
    let w = World::new().await;
    let public = w.app.public.to_string();
    let internal = w.app.internal.to_string();

    let services = tokio::task::spawn_blocking({
        let public = public.clone();
        move || grpcurl(&["-plaintext", &public, "list"])
    })
    .await
    .unwrap();
    assert!(
        services.lines().any(|l| l == "devgate.v1.ApiKeyService"),
        "{services}"
    );
    assert!(
        services.lines().any(|l| l == "grpc.health.v1.Health"),
        "{services}"
    );

    let described = tokio::task::spawn_blocking({
        let public = public.clone();
        move || {
            grpcurl(&[
                "-plaintext",
                &public,
                "describe",
                "devgate.v1.ApiKeyService",
            ])
        }
    })
    .await
    .unwrap();
    assert!(described.contains("rpc CreateApiKey"), "{described}");
    let message = tokio::task::spawn_blocking({
        let public = public.clone();
        move || grpcurl(&["-plaintext", &public, "describe", "devgate.v1.ApiKey"])
    })
    .await
    .unwrap();
    assert!(
        message.contains("Public key id"),
        "field comments reach grpcurl: {message}"
    );

    let tenant = Uuid::new_v4();
    let auth = format!("authorization: Bearer {}", admin_token(tenant));
    let created = tokio::task::spawn_blocking({
        let public = public.clone();
        move || {
            grpcurl(&[
                "-plaintext",
                "-H",
                &auth,
                "-d",
                r#"{"name":"from grpcurl","scopes":["usage:read"],"environment":"ENVIRONMENT_LIVE"}"#,
                &public,
                "devgate.v1.ApiKeyService/CreateApiKey",
            ])
        }
    })
    .await
    .unwrap();
    let created: serde_json::Value = serde_json::from_str(&created).unwrap();
    let secret = created["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("dg_live_"));

    // The internal listener lists only the internal package, and needs a service token.
    let internal_services = tokio::task::spawn_blocking({
        let internal = internal.clone();
        move || grpcurl(&["-plaintext", &internal, "list"])
    })
    .await
    .unwrap();
    assert!(
        internal_services
            .lines()
            .any(|l| l == "devgate.internal.v1.ApiKeyService"),
        "{internal_services}"
    );
    assert!(
        !internal_services
            .lines()
            .any(|l| l.starts_with("devgate.v1.")),
        "{internal_services}"
    );
    assert!(
        !services.lines().any(|l| l.starts_with("devgate.internal.")),
        "{services}"
    );
    let verified = tokio::task::spawn_blocking(move || {
        let body = serde_json::json!({"token": secret, "requiredScope": "usage:read"}).to_string();
        let refused = Command::new(grpcurl_binary())
            .args(["-plaintext", "-d", &body, &internal])
            .arg("devgate.internal.v1.ApiKeyService/VerifyApiKey")
            .output()
            .unwrap();
        let refused = String::from_utf8_lossy(&refused.stderr).to_string();
        assert!(refused.contains("Unauthenticated"), "{refused}");
        grpcurl(&[
            "-plaintext",
            "-H",
            &format!("authorization: Bearer {SERVICE_TOKEN}"),
            "-d",
            &body,
            &internal,
            "devgate.internal.v1.ApiKeyService/VerifyApiKey",
        ])
    })
    .await
    .unwrap();
    let verified: serde_json::Value = serde_json::from_str(&verified).unwrap();
    assert_eq!(verified["valid"], true);
    assert_eq!(verified["tenantId"], tenant.to_string());

    let health = tokio::task::spawn_blocking(move || {
        grpcurl(&["-plaintext", &public, "grpc.health.v1.Health/Check"])
    })
    .await
    .unwrap();
    assert!(health.contains("SERVING"));
}
