//! Test infrastructure: per-test databases and Redis prefixes, in-process devgate
//! instances, gRPC clients with credentials, Envoy and grpcurl processes.

pub mod db;
pub mod envoy;
pub mod mq;
pub mod proxy;
pub mod receiver;
pub mod redis_cluster;
pub mod redis_server;
pub mod upstream_sim;

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use devgate::{
    Application, Config,
    api_keys::verifier::KeyVerifier,
    app::Roles,
    proto::{
        internal::v1 as internal,
        v1::{self, api_key_service_client::ApiKeyServiceClient},
    },
};
use tokio_util::sync::CancellationToken;
use tonic::{Request, transport::Channel};
use uuid::Uuid;

pub use db as dbx;
pub use db::TestDb;

pub const JWT_SECRET: &str = "test-only-jwt-secret-for-devgate-integration-tests";

/// The service token of the internal caller `test-suite` (allowed every internal RPC);
/// instances know only its SHA-256 (DEVGATE_SERVICE_TOKENS).
pub const SERVICE_TOKEN: &str = "dgs_test-suite-service-token-0123456789abcdefghij";

/// The key ring of test instances (DEVGATE_ENCRYPTION_KEYS): webhook secrets at rest.
/// Test-only, publicly known.
pub const TEST_ENCRYPTION_KEYS: &str = "test1:Aty+isNmurhM6bReR8GwlhCp1kblzzefqbirNJYFDsg=";

/// The source address of the tests' Envoy towards devgate (envoy/envoy.yaml): the only
/// trusted proxy, so direct callers on 127.0.0.1 cannot forge x-forwarded-for.
pub const TRUSTED_PROXY: &str = "127.0.0.2/32";

/// Adds a caller's `authorization: Bearer <service token>` to every internal call.
#[derive(Clone)]
pub struct ServiceAuth(pub tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl ServiceAuth {
    pub fn new(token: &str) -> Self {
        Self(format!("Bearer {token}").parse().unwrap())
    }
}

impl tonic::service::Interceptor for ServiceAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub type Intercepted = tonic::service::interceptor::InterceptedService<Channel, ServiceAuth>;
/// `devgate.internal.v1.ApiKeyService` as the `test-suite` caller.
pub type InternalKeys = internal::api_key_service_client::ApiKeyServiceClient<Intercepted>;
/// `devgate.internal.v1.UsageService` as the `test-suite` caller.
pub type InternalUsage = internal::usage_service_client::UsageServiceClient<Intercepted>;

pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn redis_url() -> String {
    std::env::var("DEVGATE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Settings of one test instance; tests change fields before spawning.
#[derive(Clone)]
pub struct Settings {
    pub vars: HashMap<String, String>,
}

impl Settings {
    pub fn new(db: &TestDb, redis_prefix: &str) -> Self {
        let service_tokens =
            devgate::auth::service_token::config_entry("test-suite", SERVICE_TOKEN, &[]);
        let vars = [
            ("DEVGATE_ENVIRONMENT", "development"),
            ("DEVGATE_PUBLIC_ADDR", "127.0.0.1:0"),
            ("DEVGATE_INTERNAL_ADDR", "127.0.0.1:0"),
            ("DEVGATE_DATABASE_URL", db.url()),
            ("DEVGATE_DATABASE_POOL_SIZE", "4"),
            ("DEVGATE_DATABASE_CONNECT_TIMEOUT", "2s"),
            ("DEVGATE_REDIS_URL", &redis_url()),
            ("DEVGATE_REDIS_PREFIX", redis_prefix),
            ("DEVGATE_JWT_HS256_SECRET", JWT_SECRET),
            ("DEVGATE_TRUSTED_PROXIES", TRUSTED_PROXY),
            ("DEVGATE_SERVICE_TOKENS", &service_tokens),
            ("DEVGATE_LAST_USED_FLUSH_INTERVAL", "200ms"),
            ("DEVGATE_USAGE_FLUSH_INTERVAL", "100ms"),
            ("DEVGATE_SHUTDOWN_GRACE", "2s"),
            ("DEVGATE_ENCRYPTION_KEYS", TEST_ENCRYPTION_KEYS),
            // Every test its own exchange and queues (deleted when its World drops).
            (
                "DEVGATE_RABBITMQ_PREFIX",
                &format!("devgate-test-{}", Uuid::new_v4().simple()),
            ),
            // Generous plan defaults, so tests that are not about rate limits never meet
            // them; rate-limit tests set small per-key limits.
            ("DEVGATE_PLAN_FREE", "100000/1000000/10000000/10000"),
            ("DEVGATE_QUOTA_FREE", "100000000/100000"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Self { vars }
    }

    pub fn set(mut self, key: &str, value: &str) -> Self {
        self.vars.insert(key.to_string(), value.to_string());
        self
    }

    pub fn config(&self) -> Config {
        Config::from_lookup(|k| self.vars.get(k).cloned()).expect("test config is valid")
    }
}

/// One running devgate (API and worker roles) on free ports.
pub struct TestApp {
    pub public: SocketAddr,
    pub internal: SocketAddr,
    pub settings: Settings,
    verifier: Arc<KeyVerifier>,
    idempotency: devgate::idempotency::Idempotency,
    mq: devgate::mq::Mq,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub async fn spawn(settings: Settings) -> TestApp {
        Self::spawn_as(settings, Roles::ALL).await
    }

    /// An instance with only `roles`: with `Roles::API` no relay, fan-out or delivery worker
    /// runs, so a test owns the outbox and the delivery queues.
    pub async fn spawn_as(settings: Settings, roles: Roles) -> TestApp {
        init_logging();
        let app = Application::build(settings.config(), roles)
            .await
            .expect("application builds");
        let public = app.public_addr().unwrap();
        let internal = app.internal_addr().unwrap();
        let verifier = app.key_verifier();
        let idempotency = app.idempotency();
        let mq = app.mq();
        let shutdown = app.shutdown_token();
        let task = tokio::spawn(app.run());
        TestApp {
            public,
            internal,
            settings,
            verifier,
            idempotency,
            mq,
            shutdown,
            task: Some(task),
        }
    }

    /// Waits until revocations from other instances reach this one (pub/sub subscribed).
    pub async fn wait_invalidations_live(&self) {
        wait_until(Duration::from_secs(10), || async {
            self.verifier.invalidations_live()
        })
        .await;
    }

    pub fn invalidations_live(&self) -> bool {
        self.verifier.invalidations_live()
    }

    /// A connection to the instance's (test) database.
    pub async fn db(&self) -> diesel_async::AsyncPgConnection {
        use diesel_async::AsyncConnection;
        diesel_async::AsyncPgConnection::establish(&self.settings.vars["DEVGATE_DATABASE_URL"])
            .await
            .expect("connect to the test database")
    }

    /// The instance's RabbitMQ handle (its prefix, the queues it declared).
    pub fn mq(&self) -> &devgate::mq::Mq {
        &self.mq
    }

    /// The instance's key verifier (argon2 run counter, test pause points).
    pub fn verifier(&self) -> &Arc<KeyVerifier> {
        &self.verifier
    }

    /// The instance's idempotency keys (test pause point, the sweep).
    pub fn idempotency(&self) -> &devgate::idempotency::Idempotency {
        &self.idempotency
    }

    pub async fn public_client(&self) -> ApiKeyServiceClient<Channel> {
        ApiKeyServiceClient::new(channel(self.public).await)
    }

    /// The internal key service, as the `test-suite` caller.
    pub async fn internal_client(&self) -> InternalKeys {
        internal::api_key_service_client::ApiKeyServiceClient::with_interceptor(
            channel(self.internal).await,
            ServiceAuth::new(SERVICE_TOKEN),
        )
    }

    /// The internal usage service, as the `test-suite` caller.
    pub async fn internal_usage(&self) -> InternalUsage {
        internal::usage_service_client::UsageServiceClient::with_interceptor(
            channel(self.internal).await,
            ServiceAuth::new(SERVICE_TOKEN),
        )
    }

    /// Stops the instance and waits for it to drain.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.expect("app task").expect("app ran cleanly");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to devgate")
}

/// A test's world: its database, Redis prefix and first instance.
pub struct World {
    /// Held so the database lives as long as the world.
    _db: TestDb,
    pub prefix: String,
    pub app: TestApp,
}

impl World {
    pub async fn new() -> World {
        Self::with(|s| s).await
    }

    pub async fn with(configure: impl FnOnce(Settings) -> Settings) -> World {
        Self::with_roles(Roles::ALL, configure).await
    }

    /// A world whose instance runs only `roles` (see [`TestApp::spawn_as`]).
    pub async fn with_roles(roles: Roles, configure: impl FnOnce(Settings) -> Settings) -> World {
        let db = TestDb::create().await;
        let prefix = format!("devgate-test:{}:", Uuid::new_v4().simple());
        let app = TestApp::spawn_as(configure(Settings::new(&db, &prefix)), roles).await;
        app.wait_invalidations_live().await;
        World {
            _db: db,
            prefix,
            app,
        }
    }

    /// Another instance on the same database and Redis prefix (a second replica).
    pub async fn replica(&self) -> TestApp {
        let app = TestApp::spawn(self.app.settings.clone()).await;
        app.wait_invalidations_live().await;
        app
    }
}

impl Drop for World {
    fn drop(&mut self) {
        db::delete_redis_prefix(&self.prefix);
        self.app.shutdown.cancel();
        mq::delete_declared(self.app.mq());
    }
}

/// A user JWT for `tenant`.
pub fn user_token(tenant: Uuid, user: &str, roles: &[&str]) -> String {
    let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
    devgate::auth::jwt::mint_hs256(JWT_SECRET, tenant, user, &roles, Duration::from_secs(3600))
        .unwrap()
}

pub fn admin_token(tenant: Uuid) -> String {
    user_token(tenant, "admin-user", &["admin"])
}

/// `msg` with `authorization: Bearer <token>`.
pub fn bearer<T>(msg: T, token: &str) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

/// `msg` with `x-api-key: <key>`.
pub fn api_key<T>(msg: T, key: &str) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert("x-api-key", key.parse().unwrap());
    req
}

pub fn create_request(name: &str, scopes: &[&str]) -> v1::CreateApiKeyRequest {
    v1::CreateApiKeyRequest {
        name: name.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        environment: v1::Environment::Test as i32,
        ..Default::default()
    }
}

/// Creates a key as the tenant's admin; returns (key, token).
pub async fn create_key(app: &TestApp, tenant: Uuid, scopes: &[&str]) -> (v1::ApiKey, String) {
    create_key_with(app, tenant, create_request("test key", scopes)).await
}

pub async fn create_key_with(
    app: &TestApp,
    tenant: Uuid,
    req: v1::CreateApiKeyRequest,
) -> (v1::ApiKey, String) {
    let resp = app
        .public_client()
        .await
        .create_api_key(bearer(req, &admin_token(tenant)))
        .await
        .expect("create key")
        .into_inner();
    (resp.api_key.unwrap(), resp.secret)
}

/// Revokes key `id` as the tenant's admin.
pub async fn revoke(app: &TestApp, tenant: Uuid, id: &str) -> Result<v1::ApiKey, tonic::Status> {
    let req = v1::RevokeApiKeyRequest {
        id: id.into(),
        reason: String::new(),
    };
    app.public_client()
        .await
        .revoke_api_key(bearer(req, &admin_token(tenant)))
        .await
        .map(|r| r.into_inner())
}

/// Rotates key `id` as the tenant's admin, with a grace period in seconds (None: default).
pub async fn rotate(
    app: &TestApp,
    tenant: Uuid,
    id: &str,
    grace_secs: Option<i64>,
) -> Result<v1::RotateApiKeyResponse, tonic::Status> {
    let grace_period = grace_secs.map(|seconds| prost_types::Duration { seconds, nanos: 0 });
    let req = v1::RotateApiKeyRequest {
        id: id.into(),
        grace_period,
        end_grace_now: false,
    };
    app.public_client()
        .await
        .rotate_api_key(bearer(req, &admin_token(tenant)))
        .await
        .map(|r| r.into_inner())
}

/// Rotates key `id` as the tenant's admin, ending every previous secret's grace at once.
pub async fn rotate_ending_grace(
    app: &TestApp,
    tenant: Uuid,
    id: &str,
) -> Result<v1::RotateApiKeyResponse, tonic::Status> {
    let req = v1::RotateApiKeyRequest {
        id: id.into(),
        grace_period: None,
        end_grace_now: true,
    };
    app.public_client()
        .await
        .rotate_api_key(bearer(req, &admin_token(tenant)))
        .await
        .map(|r| r.into_inner())
}

/// Verifies `token` on the internal listener.
pub async fn verify(app: &TestApp, token: &str) -> internal::VerifyApiKeyResponse {
    verify_from(app, token, "").await
}

/// Verifies `token` for a client at `ip` ("" for unknown).
pub async fn verify_from(app: &TestApp, token: &str, ip: &str) -> internal::VerifyApiKeyResponse {
    app.internal_client()
        .await
        .verify_api_key(internal::VerifyApiKeyRequest {
            token: token.into(),
            client_ip: ip.into(),
            ..Default::default()
        })
        .await
        .expect("verify answers")
        .into_inner()
}

pub fn reason(r: &internal::VerifyApiKeyResponse) -> internal::VerifyFailureReason {
    internal::VerifyFailureReason::try_from(r.failure_reason).unwrap()
}

/// Polls `check` until it holds or `limit` passes (then panics).
pub async fn wait_until<F, Fut>(limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `TEST_LOG=1` shows the service's logs.
fn init_logging() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter("info,devgate=debug")
                .with_test_writer()
                .try_init();
        }
    });
}

/// Asserts a refusal's gRPC code and its google.rpc.ErrorInfo reason.
pub fn assert_refused(status: &tonic::Status, code: tonic::Code, reason: &str) {
    use tonic_types::StatusExt;
    assert_eq!(status.code(), code, "{status:?}");
    let details = status.get_error_details();
    assert_eq!(
        details.error_info().expect("ErrorInfo details").reason,
        reason
    );
}

/// The fields a refusal's google.rpc.BadRequest names, in order.
pub fn field_violations(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .bad_request()
        .unwrap_or_else(|| panic!("BadRequest details in {status:?}"))
        .field_violations
        .iter()
        .map(|f| f.field.clone())
        .collect()
}

/// A `devgate worker` process (the real binary) with a test instance's settings: what a
/// `kill -9` can hit. Killed when dropped.
pub struct WorkerProcess {
    child: std::process::Child,
}

impl WorkerProcess {
    /// Starts the worker with `settings` (another database URL, e.g. through a proxy, may
    /// be set there first).
    pub fn spawn(settings: &Settings) -> WorkerProcess {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_devgate"));
        command
            .arg("worker")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(&settings.vars)
            .env(
                "DEVGATE_LOG",
                std::env::var("TEST_LOG").map_or("error".into(), |_| "info".to_string()),
            )
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        WorkerProcess {
            child: command.spawn().expect("spawn devgate worker"),
        }
    }

    /// SIGKILL: no drain, no flush, no acks — a crash.
    pub fn kill9(mut self) {
        self.child.kill().expect("kill -9 the worker");
        self.child.wait().expect("reap the worker");
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
