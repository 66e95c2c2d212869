//! The internal listener: every caller authenticates (service token or mTLS client
//! certificate) and may call only the RPCs configured for it; what it creates names it.
//! And the client address: x-forwarded-for counts only from a trusted proxy.

use devgate::{auth::service_token::config_entry, proto::internal::v1 as internal, proto::v1};
use diesel::{QueryableByName, sql_types::Text};
use diesel_async::RunQueryDsl;
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};
use uuid::Uuid;

use crate::harness::{envoy::Envoy, *};

const BILLING_TOKEN: &str = "dgs_billing-service-token-for-the-internal-tests-0001";

/// The test suite's caller (every RPC) and `billing`, allowed GrantCredits only.
fn callers() -> String {
    format!(
        "{};{}",
        config_entry("test-suite", SERVICE_TOKEN, &[]),
        config_entry(
            "billing",
            BILLING_TOKEN,
            &["UsageService/GrantCredits".into()]
        ),
    )
}

fn grant(tenant: Uuid, id: &str) -> internal::GrantCreditsRequest {
    internal::GrantCreditsRequest {
        tenant_id: tenant.to_string(),
        amount: 10,
        reason: "monthly allowance".into(),
        reference: String::new(),
        idempotency_id: id.into(),
    }
}

fn usage_as(channel: Channel, token: &str) -> InternalUsage {
    internal::usage_service_client::UsageServiceClient::with_interceptor(
        channel,
        ServiceAuth::new(token),
    )
}

fn keys_as(channel: Channel, token: &str) -> InternalKeys {
    internal::api_key_service_client::ApiKeyServiceClient::with_interceptor(
        channel,
        ServiceAuth::new(token),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_calls_need_a_known_token_allowed_the_rpc() {
    let w = World::with(|s| s.set("DEVGATE_SERVICE_TOKENS", &callers())).await;
    let tenant = Uuid::new_v4();
    let (_, key) = create_key(&w.app, tenant, &["*"]).await;
    let verify_req = || internal::VerifyApiKeyRequest {
        token: key.clone(),
        ..Default::default()
    };

    // No token: refused before the handler (was: any local process was a trusted service).
    let mut anonymous =
        internal::api_key_service_client::ApiKeyServiceClient::new(channel(w.app.internal).await);
    let err = anonymous.verify_api_key(verify_req()).await.unwrap_err();
    assert_refused(&err, Code::Unauthenticated, "MISSING_CREDENTIALS");
    let err =
        internal::usage_service_client::UsageServiceClient::new(channel(w.app.internal).await)
            .grant_credits(grant(tenant, "anonymous"))
            .await
            .unwrap_err();
    assert_refused(&err, Code::Unauthenticated, "MISSING_CREDENTIALS");

    // An unknown token, and an API key used as a service token.
    for token in ["dgs_not-a-configured-token", key.as_str()] {
        let err = keys_as(channel(w.app.internal).await, token)
            .verify_api_key(verify_req())
            .await
            .unwrap_err();
        assert_refused(&err, Code::Unauthenticated, "SERVICE_TOKEN_INVALID");
    }

    // billing may grant credits, and nothing else: not a token oracle, no plan changes.
    let billing = channel(w.app.internal).await;
    let err = keys_as(billing.clone(), BILLING_TOKEN)
        .verify_api_key(verify_req())
        .await
        .unwrap_err();
    assert_refused(&err, Code::PermissionDenied, "RPC_NOT_ALLOWED");
    let err = usage_as(billing.clone(), BILLING_TOKEN)
        .set_plan(internal::SetPlanRequest {
            tenant_id: tenant.to_string(),
            plan: v1::Plan::Enterprise as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_refused(&err, Code::PermissionDenied, "RPC_NOT_ALLOWED");
    let entry = usage_as(billing, BILLING_TOKEN)
        .grant_credits(grant(tenant, "g-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(entry.created_by, "service:billing");

    // The plan change names its caller too, and so do metered usage rows.
    let plan = w
        .app
        .internal_usage()
        .await
        .set_plan(internal::SetPlanRequest {
            tenant_id: tenant.to_string(),
            plan: v1::Plan::Standard as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plan.updated_by, "service:test-suite");
    w.app
        .internal_usage()
        .await
        .record_usage(internal::RecordUsageRequest {
            tenant_id: tenant.to_string(),
            metric: "generation_seconds".into(),
            quantity: 3,
            idempotency_id: "m-1".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    // A consuming verification is the key's usage, recorded with the gateway that gated it.
    let consumed = w
        .app
        .internal_client()
        .await
        .verify_api_key(internal::VerifyApiKeyRequest {
            token: key.clone(),
            consume: true,
            operation: "POST /v2/render".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(consumed.valid);

    #[derive(QueryableByName)]
    struct Who {
        #[diesel(sql_type = Text)]
        who: String,
    }
    let pool = devgate::db::pool(&w.app.settings.config().database);
    let mut conn = pool.get().await.unwrap();
    let query =
        |sql: &'static str| diesel::sql_query(sql).bind::<diesel::sql_types::Uuid, _>(tenant);
    let metered: Who = query("SELECT recorded_by AS who FROM metered_usage WHERE tenant_id = $1")
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(metered.who, "service:test-suite");
    let ledger: Who = query("SELECT created_by AS who FROM credit_ledger WHERE tenant_id = $1")
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(ledger.who, "service:billing");
    let logged = eventually(async || {
        let mut conn = pool.get().await.unwrap();
        let rows: Vec<Who> = diesel::sql_query(
            "SELECT service_caller AS who FROM api_request_logs \
             WHERE tenant_id = $1 AND rpc = 'POST /v2/render'",
        )
        .bind::<diesel::sql_types::Uuid, _>(tenant)
        .load(&mut conn)
        .await
        .unwrap();
        rows.into_iter().next().map(|r| r.who)
    })
    .await;
    assert_eq!(logged, "test-suite");
}

/// Polls `f` until it yields a value (the request log is written in batches).
async fn eventually<T>(mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing within 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A CA, a server certificate for `localhost` and client certificates named by DNS name.
struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new() -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "devgate test CA");
        let ca = params.self_signed(&ca_key).unwrap();
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
            ca,
            ca_key,
        };
        std::fs::write(pki.path("ca.pem"), pki.ca.pem()).unwrap();
        pki
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    /// (certificate PEM, key PEM) for `name`, signed by `issuer` (this CA by default).
    fn issue(
        &self,
        name: &str,
        issuer: Option<(&rcgen::Certificate, &rcgen::KeyPair)>,
    ) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let (ca, ca_key) = issuer.unwrap_or((&self.ca, &self.ca_key));
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .signed_by(&key, ca, ca_key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    async fn client(
        &self,
        addr: std::net::SocketAddr,
        identity: Option<(String, String)>,
    ) -> Channel {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.ca.pem()))
            .domain_name("localhost");
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        Channel::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .expect("TLS connection to the internal listener")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_client_certificates_name_the_caller() {
    let pki = Pki::new();
    let (server_cert, server_key) = pki.issue("localhost", None);
    std::fs::write(pki.path("server.pem"), server_cert).unwrap();
    std::fs::write(pki.path("server.key"), server_key).unwrap();
    // billing authenticates by certificate only (no token digest).
    let callers = format!(
        "{};billing:-:UsageService/GrantCredits",
        config_entry("test-suite", SERVICE_TOKEN, &[])
    );
    let w = World::with(|s| {
        s.set("DEVGATE_SERVICE_TOKENS", &callers)
            .set("DEVGATE_INTERNAL_TLS_CERT", &pki.path("server.pem"))
            .set("DEVGATE_INTERNAL_TLS_KEY", &pki.path("server.key"))
            .set("DEVGATE_INTERNAL_TLS_CLIENT_CA", &pki.path("ca.pem"))
    })
    .await;
    let tenant = Uuid::new_v4();
    let addr = w.app.internal;

    // The certificate names billing: it may grant, and the entry says who did.
    let billing = pki.client(addr, Some(pki.issue("billing", None))).await;
    let entry = internal::usage_service_client::UsageServiceClient::new(billing.clone())
        .grant_credits(grant(tenant, "mtls-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(entry.created_by, "service:billing");
    let err = internal::api_key_service_client::ApiKeyServiceClient::new(billing)
        .verify_api_key(internal::VerifyApiKeyRequest {
            token: "dg_test_x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_refused(&err, Code::PermissionDenied, "RPC_NOT_ALLOWED");

    // A valid certificate for a name nobody configured authenticates no one.
    let stranger = pki.client(addr, Some(pki.issue("stranger", None))).await;
    let err = internal::usage_service_client::UsageServiceClient::new(stranger)
        .grant_credits(grant(tenant, "mtls-2"))
        .await
        .unwrap_err();
    assert_refused(&err, Code::Unauthenticated, "INVALID_CREDENTIALS");

    // A certificate from another CA does not get through the handshake.
    let other_key = rcgen::KeyPair::generate().unwrap();
    let mut other = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    other.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other_ca = other.self_signed(&other_key).unwrap();
    let forged = pki.issue("billing", Some((&other_ca, &other_key)));
    let forged_channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(pki.ca.pem()))
                .domain_name("localhost")
                .identity(Identity::from_pem(forged.0, forged.1)),
        )
        .unwrap();
    let refused = match forged_channel.connect().await {
        Err(_) => true,
        Ok(channel) => internal::usage_service_client::UsageServiceClient::new(channel)
            .grant_credits(grant(tenant, "mtls-3"))
            .await
            .is_err(),
    };
    assert!(refused, "a certificate from another CA was accepted");

    // Without a certificate, service tokens still work over TLS.
    let plain = pki.client(addr, None).await;
    let plan = usage_as(plain, SERVICE_TOKEN)
        .set_plan(internal::SetPlanRequest {
            tenant_id: tenant.to_string(),
            plan: v1::Plan::Business as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plan.updated_by, "service:test-suite");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_counts_only_from_a_trusted_proxy() {
    let w = World::new().await;
    let tenant = Uuid::new_v4();
    let mut req = create_request("office only", &["api_keys:read"]);
    req.allowed_cidrs = vec!["203.0.113.0/24".into()];
    let (_, key) = create_key_with(&w.app, tenant, req).await;

    // A direct caller (127.0.0.1, not a trusted proxy) forging the header is refused.
    let mut forged = api_key(v1::ListApiKeysRequest::default(), &key);
    forged
        .metadata_mut()
        .insert("x-forwarded-for", "203.0.113.5".parse().unwrap());
    let err = w
        .app
        .public_client()
        .await
        .list_api_keys(forged)
        .await
        .unwrap_err();
    assert_refused(&err, Code::PermissionDenied, "API_KEY_IP_NOT_ALLOWED");

    // Through Envoy (dialling from the trusted 127.0.0.2) the client's own forgery sits
    // left of the address Envoy appended, so it is ignored as well.
    let envoy = Envoy::start(w.app.public).await;
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/api-keys", envoy.base))
        .header("x-api-key", &key)
        .header("x-forwarded-for", "203.0.113.5")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::FORBIDDEN);

    // A key open to every address works through Envoy, and its call is logged with the
    // address Envoy saw, never with Envoy's own hop or the forged one.
    let (_, open) = create_key(&w.app, tenant, &["api_keys:read"]).await;
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/api-keys", envoy.base))
        .header("x-api-key", &open)
        .header("x-forwarded-for", "203.0.113.5")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    #[derive(QueryableByName)]
    struct Ip {
        #[diesel(sql_type = Text)]
        ip: String,
    }
    let pool = devgate::db::pool(&w.app.settings.config().database);
    let seen = eventually(async || {
        let mut conn = pool.get().await.unwrap();
        let rows = diesel::sql_query(
            "SELECT host(client_ip) AS ip FROM api_request_logs \
             WHERE tenant_id = $1 AND http_path IS NOT NULL AND grpc_code = 0",
        )
        .bind::<diesel::sql_types::Uuid, _>(tenant)
        .load::<Ip>(&mut conn)
        .await
        .unwrap();
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    for row in &seen {
        assert_ne!(row.ip, "203.0.113.5");
        assert_ne!(row.ip, "127.0.0.2");
    }
}
