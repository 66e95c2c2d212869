//! End to end through the real Envoy (the committed envoy/envoy.yaml) with an HTTP client.

use devgate::proto::internal::v1 as internal;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::harness::{envoy::Edge, *};

impl Edge {
    /// `method path` with `authorization: Bearer <credential>` and an optional JSON body.
    async fn call(
        &self,
        method: Method,
        path: &str,
        credential: &str,
        body: Option<Value>,
    ) -> reqwest::Response {
        let mut req = self
            .http
            .request(method, self.url(path))
            .bearer_auth(credential);
        if let Some(body) = body {
            req = req.json(&body);
        }
        req.send().await.unwrap()
    }

    async fn get(&self, path: &str, credential: &str) -> reqwest::Response {
        self.call(Method::GET, path, credential, None).await
    }

    /// GET with the key in `x-api-key` (the other credential header).
    async fn get_with_key(&self, path: &str, key: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .header("x-api-key", key)
            .send()
            .await
            .unwrap()
    }

    async fn post(&self, path: &str, credential: &str, body: Value) -> reqwest::Response {
        self.call(Method::POST, path, credential, Some(body)).await
    }
}

async fn json_of(resp: reqwest::Response) -> Value {
    let text = resp.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_lifecycle_through_envoy() {
    let e = Edge::start().await;
    let tenant = Uuid::new_v4();
    let token = admin_token(tenant);

    // Create.
    let resp = e
        .post(
            "/v1/api-keys",
            &token,
            json!({"name": "my first key", "scopes": ["*"], "environment": "ENVIRONMENT_TEST"}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers().get("x-request-id").is_some(),
        "request id on REST responses"
    );
    assert!(
        resp.headers().get("grpc-status").is_none(),
        "grpc-status is not leaked on success"
    );
    let created = json_of(resp).await;
    let id = created["api_key"]["id"].as_str().unwrap().to_string();
    let secret = created["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("dg_test_"));
    assert_eq!(created["api_key"]["state"], "API_KEY_STATE_ACTIVE");
    assert_eq!(created["api_key"]["environment"], "ENVIRONMENT_TEST");
    assert!(
        created["api_key"]["create_time"]
            .as_str()
            .unwrap()
            .ends_with('Z'),
        "RFC 3339 timestamps, snake_case fields"
    );

    // Use the key: list.
    let resp = e.get_with_key("/v1/api-keys", &secret).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let listed = json_of(resp).await;
    assert_eq!(listed["api_keys"][0]["id"], id.as_str());
    assert!(
        !listed.to_string().contains(&secret),
        "secrets are never listed"
    );

    // Bearer form of the key, query filters, get.
    let resp = e
        .get(
            "/v1/api-keys?page_size=10&environment=ENVIRONMENT_TEST&state=API_KEY_STATE_ACTIVE",
            &secret,
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = e.get(&format!("/v1/api-keys/{id}"), &secret).await;
    assert_eq!(json_of(resp).await["name"], "my first key");

    // Update (PATCH with the key's fields as the body).
    let resp = e
        .call(
            Method::PATCH,
            &format!("/v1/api-keys/{id}"),
            &token,
            Some(json!({"name": "ci key", "description": "deploys"})),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let updated = json_of(resp).await;
    assert_eq!(updated["name"], "ci key");
    assert_eq!(updated["description"], "deploys");
    let resp = e
        .call(
            Method::PATCH,
            &format!("/v1/api-keys/{id}?update_mask=description"),
            &token,
            Some(json!({"name": "ignored", "description": "only this"})),
        )
        .await;
    let updated = json_of(resp).await;
    assert_eq!(
        (updated["name"].as_str(), updated["description"].as_str()),
        (Some("ci key"), Some("only this"))
    );

    // Rotate: both secrets work during the grace period.
    let resp = e
        .post(
            &format!("/v1/api-keys/{id}:rotate"),
            &token,
            json!({"grace_period": "3600s"}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let rotated = json_of(resp).await;
    let new_secret = rotated["secret"].as_str().unwrap().to_string();
    assert_ne!(new_secret, secret);
    for s in [&secret, &new_secret] {
        let resp = e.get_with_key("/v1/api-keys", s).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }

    // Revoke, then 401 with a JSON error.
    let resp = e
        .post(
            &format!("/v1/api-keys/{id}:revoke"),
            &token,
            json!({"reason": "rotating out"}),
        )
        .await;
    assert_eq!(json_of(resp).await["state"], "API_KEY_STATE_REVOKED");
    let resp = e.get_with_key("/v1/api-keys", &new_secret).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(
        resp.headers().get("x-request-id").is_some(),
        "request id on errors too"
    );
    let body = json_of(resp).await;
    assert_eq!(body["code"], 16);
    assert_eq!(
        body["details"][0]["@type"],
        "type.googleapis.com/google.rpc.ErrorInfo"
    );
    assert_eq!(body["details"][0]["reason"], "API_KEY_REVOKED");

    // Delete.
    let resp = e
        .call(Method::DELETE, &format!("/v1/api-keys/{id}"), &token, None)
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = e.get(&format!("/v1/api-keys/{id}"), &token).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_errors_are_precise() {
    let e = Edge::start().await;
    let token = admin_token(Uuid::new_v4());
    let post = |body: &str| {
        e.http
            .post(e.url("/v1/api-keys"))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };

    // Bad JSON.
    let resp = post("{\"name\": ").await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    // An unknown enum value.
    let resp = post(r#"{"name":"x","scopes":["*"],"environment":"ENVIRONMENT_PROD"}"#)
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    // Missing fields: every one named in google.rpc.BadRequest.
    let resp = post("{}").await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body = json_of(resp).await;
    assert_eq!(body["code"], 3);
    let detail = &body["details"][0];
    assert_eq!(detail["@type"], "type.googleapis.com/google.rpc.BadRequest");
    let fields: Vec<&str> = detail["field_violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, vec!["name", "scopes", "environment"]);
    // An unknown scope.
    let resp = post(r#"{"name":"x","scopes":["root"],"environment":"ENVIRONMENT_LIVE"}"#)
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(
        json_of(resp).await["message"]
            .as_str()
            .unwrap()
            .contains("unknown scope")
    );

    // No credentials.
    let resp = e.http.get(e.url("/v1/api-keys")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        json_of(resp).await["details"][0]["reason"],
        "MISSING_CREDENTIALS"
    );

    // Another tenant's key: 404, exactly like a missing one.
    let other = admin_token(Uuid::new_v4());
    let resp = e
        .post(
            "/v1/api-keys",
            &other,
            json!({"name": "theirs", "scopes": ["*"], "environment": "ENVIRONMENT_LIVE"}),
        )
        .await;
    let theirs = json_of(resp).await["api_key"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let resp = e.get(&format!("/v1/api-keys/{theirs}"), &token).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let resp = e
        .call(
            Method::DELETE,
            &format!("/v1/api-keys/{theirs}"),
            &token,
            None,
        )
        .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    // Permission denied.
    let member = user_token(Uuid::new_v4(), "bob", &[]);
    let resp = e
        .post(
            "/v1/api-keys",
            &member,
            json!({"name": "x", "scopes": ["*"], "environment": "ENVIRONMENT_LIVE"}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    // Unknown query parameters are rejected; unknown paths are 404.
    let resp = e.get("/v1/api-keys?colour=blue", &token).await;
    assert!(resp.status().is_client_error(), "{}", resp.status());
    let resp = e.get("/v1/nothing-here", &token).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_rpcs_and_browsers() {
    let e = Edge::start().await;
    // VerifyApiKey is not routed, neither as REST nor as raw gRPC through Envoy.
    let resp = e
        .http
        .post(e.url("/devgate.v1.ApiKeyService/VerifyApiKey"))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let addr: std::net::SocketAddr = e.base.trim_start_matches("http://").parse().unwrap();
    let mut through_envoy =
        devgate::proto::v1::api_key_service_client::ApiKeyServiceClient::new(channel(addr).await);
    let (_, token) = create_key(&e.world.app, Uuid::new_v4(), &["*"]).await;
    let err = internal::api_key_service_client::ApiKeyServiceClient::new(channel(addr).await)
        .verify_api_key(internal::VerifyApiKeyRequest {
            token: token.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
    // Public RPCs pass through Envoy as raw gRPC, with their status intact.
    let listed = through_envoy
        .list_api_keys(api_key(
            devgate::proto::v1::ListApiKeysRequest::default(),
            &token,
        ))
        .await
        .unwrap();
    assert_eq!(listed.into_inner().api_keys.len(), 1);
    let err = through_envoy
        .list_api_keys(devgate::proto::v1::ListApiKeysRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    // CORS preflight for a browser client.
    let resp = e
        .http
        .request(reqwest::Method::OPTIONS, e.url("/v1/api-keys"))
        .header("origin", "https://portal.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    assert_eq!(
        resp.headers().get("access-control-allow-origin").unwrap(),
        "https://portal.example"
    );
    let allowed = resp
        .headers()
        .get("access-control-allow-headers")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(allowed.contains("authorization"));
    // The actual response exposes the request id to the page.
    let resp = e
        .http
        .get(e.url("/v1/api-keys"))
        .header("origin", "https://portal.example")
        .header("x-api-key", &token)
        .send()
        .await
        .unwrap();
    let exposed = resp
        .headers()
        .get("access-control-expose-headers")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(exposed.contains("x-request-id"));
}
