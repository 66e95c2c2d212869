//! Typed configuration from `DEVGATE_*` environment variables, validated once at start.
//!
//! Every variable is listed in [`VARIABLES`] (name, default, meaning); the README's
//! configuration table is that list. A bad value stops the process with a message naming
//! the variable.

use std::{net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use secrecy::SecretString;

use crate::{
    api_keys::config::{ApiKeyConfig, Argon2Params},
    auth::config::{AuthConfig, InternalTls},
    db::DatabaseConfig,
    edge::EdgeConfig,
    events::relay::RelayConfig,
    generation::upstream::{UpstreamConfig, parse_endpoint},
    generation::{
        GenerationConfig,
        config::{Formats, KindCatalog, Prices},
    },
    kv::RedisConfig,
    mq::{MqConfig, QueueType},
    proto::upstream::orchestrator::v1::routing,
    ratelimit::{Limits, PlanLimits, PlanQuotas, QuotaLimits, RateLimitConfig},
    telemetry::{LogConfig, LogFormat},
    usage::UsageConfig,
    webhooks::{WebhookDeliveryConfig, WebhookSecurityConfig},
};

/// `(name, default, meaning)` of every variable devgate reads. An empty default means
/// "unset unless given".
pub const VARIABLES: &[(&str, &str, &str)] = &[
    (
        "DEVGATE_ENV_FILE",
        "",
        "A file of KEY=value lines read before the environment (same as --env-file); real environment variables win.",
    ),
    (
        "DEVGATE_ENVIRONMENT",
        "production",
        "`development` or `production`. Production-only rules (https-only webhook URLs) key off it as those features land.",
    ),
    (
        "DEVGATE_PUBLIC_ADDR",
        "127.0.0.1:50051",
        "Public gRPC listener (behind Envoy): API keys and user JWTs.",
    ),
    (
        "DEVGATE_INTERNAL_ADDR",
        "127.0.0.1:50052",
        "Internal gRPC listener for trusted services (VerifyApiKey, ...). Never expose it.",
    ),
    (
        "DEVGATE_DATABASE_URL",
        "postgres://postgres:postgres@127.0.0.1:5432/devgate",
        "Postgres connection URL.",
    ),
    (
        "DEVGATE_DATABASE_POOL_SIZE",
        "16",
        "Maximum Postgres connections per process.",
    ),
    (
        "DEVGATE_DATABASE_CONNECT_TIMEOUT",
        "5s",
        "How long a request waits for a pooled connection before UNAVAILABLE.",
    ),
    (
        "DEVGATE_DATABASE_STATEMENT_TIMEOUT",
        "15s",
        "Postgres statement_timeout of every pooled connection: a longer statement is cancelled (0s: no limit). Migrations are not subject to it.",
    ),
    (
        "DEVGATE_REDIS_URL",
        "redis://127.0.0.1:6379",
        "Redis URL (failed-attempt limiter, cache invalidation pub/sub).",
    ),
    (
        "DEVGATE_REDIS_CLUSTER_NODES",
        "",
        "Comma-separated redis:// URLs of some Redis Cluster nodes; when set, devgate uses the cluster and ignores DEVGATE_REDIS_URL.",
    ),
    (
        "DEVGATE_REDIS_PREFIX",
        "devgate:",
        "Prefix of every Redis key and channel, so several deployments (or tests) share one Redis.",
    ),
    (
        "DEVGATE_RABBITMQ_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        "RabbitMQ URL (the vhost URL-encoded: `%2f` is `/`). devgate connects on first use and reconnects with backoff; `serve` keeps answering while it is down.",
    ),
    (
        "DEVGATE_RABBITMQ_QUEUE_TYPE",
        "classic",
        "`classic` or `quorum`: the type of every queue devgate declares (quorum queues replicate across a RabbitMQ cluster).",
    ),
    (
        "DEVGATE_RABBITMQ_PREFIX",
        "devgate",
        "Prefix of devgate's exchanges and queues; events go to the topic exchange `<prefix>.events` with the event type as routing key.",
    ),
    (
        "DEVGATE_OUTBOX_BATCH_SIZE",
        "500",
        "Outbox rows the relay claims, publishes (with publisher confirms) and deletes per transaction.",
    ),
    (
        "DEVGATE_OUTBOX_POLL_INTERVAL",
        "1s",
        "The relay wakes on NOTIFY when events commit, and also looks for outbox rows this often.",
    ),
    (
        "DEVGATE_OUTBOX_CONFIRM_TIMEOUT",
        "10s",
        "How long the relay waits for RabbitMQ to confirm a batch before rolling it back and retrying.",
    ),
    (
        "DEVGATE_JWT_HS256_SECRET",
        "",
        "Shared secret for HS256 user JWTs (at least 32 bytes). Also signs `devgate dev-token`.",
    ),
    (
        "DEVGATE_JWT_PUBLIC_KEY_PATH",
        "",
        "PEM public key (RSA or Ed25519) for RS256/EdDSA user JWTs from the auth service.",
    ),
    (
        "DEVGATE_JWT_ISSUER",
        "",
        "If set, user JWTs must carry this `iss`.",
    ),
    (
        "DEVGATE_JWT_AUDIENCE",
        "",
        "If set, user JWTs must carry this `aud` (as a string or in an array).",
    ),
    (
        "DEVGATE_JWT_LEEWAY",
        "30s",
        "Clock skew allowed when checking a user JWT's `exp` and `nbf`.",
    ),
    (
        "DEVGATE_TRUSTED_PROXIES",
        "127.0.0.1/32,::1/128",
        "Comma-separated CIDRs of the proxies (Envoy) whose x-forwarded-for is believed. From any other TCP peer the header is ignored and the peer address is the client IP; from a trusted peer the client IP is the right-most x-forwarded-for address that is not itself a trusted proxy. `none`: never read the header.",
    ),
    (
        "DEVGATE_SERVICE_TOKENS",
        "",
        "Internal callers, `;`-separated `NAME:SHA256:RPCS` entries: the caller's name, the SHA-256 (hex) of its service token (or `-` for a caller that authenticates only with a client certificate), and `*` or a comma-separated list of the internal RPCs it may call (e.g. `UsageService/GrantCredits`). `devgate service-token` prints one. Empty: every internal call is refused.",
    ),
    (
        "DEVGATE_INTERNAL_TLS_CERT",
        "",
        "PEM certificate chain of the internal listener. With DEVGATE_INTERNAL_TLS_KEY it serves TLS instead of cleartext h2c.",
    ),
    (
        "DEVGATE_INTERNAL_TLS_KEY",
        "",
        "PEM private key of the internal listener's certificate.",
    ),
    (
        "DEVGATE_INTERNAL_TLS_CLIENT_CA",
        "",
        "PEM CA bundle for client certificates on the internal listener (mTLS). A caller presenting a certificate issued by it is the DEVGATE_SERVICE_TOKENS caller whose NAME is the certificate's first DNS subject alternative name; callers without a certificate still use service tokens.",
    ),
    (
        "DEVGATE_ARGON2_MEMORY_KIB",
        "19456",
        "argon2id memory cost of key secret hashes (OWASP: 19 MiB).",
    ),
    ("DEVGATE_ARGON2_ITERATIONS", "2", "argon2id time cost."),
    ("DEVGATE_ARGON2_PARALLELISM", "1", "argon2id lanes."),
    (
        "DEVGATE_HASH_CONCURRENCY",
        "number of CPUs",
        "At most this many argon2 computations run at once (on blocking threads).",
    ),
    (
        "DEVGATE_KEY_CACHE_TTL",
        "30s",
        "How long a verified key is answered from the in-process cache without I/O; after that its row is re-read (no argon2 while the stored hash is unchanged), the stale entry being served meanwhile for at most one more TTL. Revocations reach every replica at once over Redis pub/sub.",
    ),
    (
        "DEVGATE_KEY_CACHE_CAPACITY",
        "100000",
        "Most verified tokens kept in the in-process cache.",
    ),
    (
        "DEVGATE_AUTH_FAILURE_LIMIT",
        "10",
        "Failed verifications per key id and client network (IPv4 /24, IPv6 /64) within the window before that pair is refused without hashing.",
    ),
    (
        "DEVGATE_AUTH_FAILURE_WINDOW",
        "5m",
        "Window of the failed-verification counter.",
    ),
    (
        "DEVGATE_LAST_USED_FLUSH_INTERVAL",
        "30s",
        "How often batched last_used_time updates are written.",
    ),
    (
        "DEVGATE_ROTATION_GRACE_DEFAULT",
        "24h",
        "Grace period of a rotated-out secret when the request names none.",
    ),
    (
        "DEVGATE_ROTATION_GRACE_MAX",
        "7d",
        "Longest grace period a rotation may ask for.",
    ),
    (
        "DEVGATE_API_KEY_EXPIRING_NOTICE",
        "7d",
        "Keys expiring within this (at most 30d) get one `api_key.expiring` event per expire_time, sent by the worker.",
    ),
    (
        "DEVGATE_API_KEY_EXPIRING_INTERVAL",
        "1m",
        "How often the worker looks for keys expiring within DEVGATE_API_KEY_EXPIRING_NOTICE.",
    ),
    (
        "DEVGATE_PLAN_FREE",
        "30/500/5000/5",
        "Default limits of the free plan: calls per minute/hour/day/burst.",
    ),
    (
        "DEVGATE_PLAN_STANDARD",
        "100/2000/20000/10",
        "Default limits of the standard plan (per minute/hour/day/burst).",
    ),
    (
        "DEVGATE_PLAN_PROFESSIONAL",
        "300/10000/100000/20",
        "Default limits of the professional plan (per minute/hour/day/burst).",
    ),
    (
        "DEVGATE_PLAN_BUSINESS",
        "1000/50000/500000/50",
        "Default limits of the business plan (per minute/hour/day/burst).",
    ),
    (
        "DEVGATE_PLAN_ENTERPRISE",
        "1000/50000/500000/50",
        "Limits of an enterprise tenant until SetPlan gives it its own (per minute/hour/day/burst).",
    ),
    (
        "DEVGATE_QUOTA_FREE",
        "10000/50",
        "Monthly quotas of the free plan: API-key requests/generations.",
    ),
    (
        "DEVGATE_QUOTA_STANDARD",
        "200000/1000",
        "Monthly quotas of the standard plan (requests/generations).",
    ),
    (
        "DEVGATE_QUOTA_PROFESSIONAL",
        "2000000/10000",
        "Monthly quotas of the professional plan (requests/generations).",
    ),
    (
        "DEVGATE_QUOTA_BUSINESS",
        "20000000/100000",
        "Monthly quotas of the business plan (requests/generations).",
    ),
    (
        "DEVGATE_QUOTA_ENTERPRISE",
        "20000000/100000",
        "Monthly quotas of an enterprise tenant until SetPlan gives it its own (requests/generations).",
    ),
    (
        "DEVGATE_RATE_LIMIT_FAIL_CLOSED",
        "false",
        "When Redis is down: false limits per replica in process (fail open); true refuses API-key calls with UNAVAILABLE.",
    ),
    (
        "DEVGATE_USAGE_RETENTION",
        "90d",
        "Request logs older than this are dropped, a month partition at a time, by the worker.",
    ),
    (
        "DEVGATE_USAGE_FLUSH_INTERVAL",
        "1s",
        "The request-log writer writes at least this often (and whenever a batch is full).",
    ),
    (
        "DEVGATE_USAGE_BATCH_SIZE",
        "500",
        "Rows per request-log INSERT (at most 10 000; one array per column, so no bind-parameter limit).",
    ),
    (
        "DEVGATE_USAGE_BUFFER",
        "65536",
        "Request records waiting to be written; when full, calls still succeed and the record is counted as dropped.",
    ),
    (
        "DEVGATE_ENCRYPTION_KEYS",
        "",
        "Key ring for secrets at rest (webhook signing secrets, AES-256-GCM): comma-separated `id:base64key` entries, each key 32 random bytes (`openssl rand -base64 32`); the first encrypts, every one decrypts, so a new key goes first and an old one stays until its rows are re-encrypted. Unset: no webhook secret can be stored or read.",
    ),
    (
        "DEVGATE_WEBHOOK_ALLOWED_CIDRS",
        "",
        "Comma-separated CIDRs that webhook deliveries may reach although they are loopback, private, link-local, CGNAT, … (refused by default, at endpoint creation and at connect time). Development only, e.g. `127.0.0.0/8` for a local receiver.",
    ),
    (
        "DEVGATE_WEBHOOK_CONCURRENCY",
        "256",
        "Webhook deliveries in flight per worker process (also its RabbitMQ prefetch). Most of a delivery is waiting for the endpoint, so this is high; their database writes are grouped, not one connection each.",
    ),
    (
        "DEVGATE_WEBHOOK_TIMEOUT",
        "30s",
        "How long one delivery attempt may take, connect to last byte; longer counts as a failed attempt (`timeout`).",
    ),
    (
        "DEVGATE_WEBHOOK_RETRY_SCHEDULE",
        "1m,5m,30m,2h,24h",
        "Waits before each retry of a failed delivery (each ±10 % jitter, 10ms to 24h, at most 20); after the last one the delivery is `failed`. A longer `Retry-After` from the endpoint is honoured (up to 24h).",
    ),
    (
        "DEVGATE_WEBHOOK_DISABLE_AFTER",
        "10",
        "Consecutive deliveries to one endpoint that exhausted their retries before it is disabled (and `webhook_endpoint.disabled` is emitted); 0 never disables.",
    ),
    (
        "DEVGATE_GENERATION_PRICES",
        "image=10,image_hd=25,video=100,audio=20,text=2",
        "The generation kinds and their price in credits per output (`kind=credits,…`); CreateGeneration charges price × count. Every kind needs formats in DEVGATE_GENERATION_FORMATS.",
    ),
    (
        "DEVGATE_GENERATION_FORMATS",
        "image=png|jpeg|webp,image_hd=png|jpeg|webp,video=mp4|webm,audio=mp3|wav,text=txt|md",
        "The output formats each generation kind makes (`kind=fmt|fmt,…`), the same kinds as DEVGATE_GENERATION_PRICES.",
    ),
    (
        "DEVGATE_GENERATION_JOBS_EXCHANGE",
        "",
        "The AI orchestrator's jobs exchange (topic): generation jobs (`generation.requested`) and cancels (`generation.cancel`) go there. Empty: `<DEVGATE_RABBITMQ_PREFIX>.generation.jobs`.",
    ),
    (
        "DEVGATE_GENERATION_TIMEOUT",
        "15m",
        "A generation with no terminal update from the orchestrator within this long after it was created is failed (`TIMEOUT`) and refunded by the worker's sweep, which runs every quarter of it (200 ms to 1 min).",
    ),
    (
        "DEVGATE_ASSET_SERVICE_ADDR",
        "",
        "gRPC endpoint of the platform's Asset service (`upstream.assets.v1.AssetService`, proto/upstream/), `http://host:port` or `host:port` (cleartext h2c), e.g. `http://127.0.0.1:50061` (the local stack's simulator). Unset: GetAsset/ListAssets answer UNAVAILABLE.",
    ),
    (
        "DEVGATE_USER_TEAM_SERVICE_ADDR",
        "",
        "gRPC endpoint of the platform's User/Team service (`upstream.users.v1.UserTeamService`, proto/upstream/), `http://host:port` or `host:port` (cleartext h2c), e.g. `http://127.0.0.1:50062` (the local stack's simulator). Unset: GetUser/GetTeam/ListTeamMembers answer UNAVAILABLE.",
    ),
    (
        "DEVGATE_UPSTREAM_TIMEOUT",
        "2s",
        "Deadline of every call to the Asset and User/Team services, retries on UNAVAILABLE included: a stopped or black-holed service answers UNAVAILABLE within it.",
    ),
    (
        "DEVGATE_UPSTREAM_BREAKER_FAILURES",
        "5",
        "Consecutive failed calls (UNAVAILABLE or past the deadline) that open an upstream's circuit breaker (1 to 1000); one breaker per upstream service and process.",
    ),
    (
        "DEVGATE_UPSTREAM_BREAKER_COOLDOWN",
        "10s",
        "How long an open breaker answers UNAVAILABLE at once (RetryInfo: the rest of it) before one probe call may try the upstream again.",
    ),
    (
        "DEVGATE_SHUTDOWN_GRACE",
        "30s",
        "On SIGINT/SIGTERM, how long in-flight calls may take to finish.",
    ),
    (
        "DEVGATE_LOG",
        "info",
        "Log filter (tracing EnvFilter syntax, e.g. `info,devgate=debug`).",
    ),
    (
        "DEVGATE_LOG_FORMAT",
        "json",
        "`json` (one object per line) or `pretty`.",
    ),
    (
        "DEVGATE_OTLP_ENDPOINT",
        "",
        "OTLP/gRPC collector (e.g. http://127.0.0.1:4317); traces are exported only when set.",
    ),
];

/// Development relaxes checks meant for the internet (e.g. http webhook URLs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnvironment {
    Development,
    Production,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub environment: RunEnvironment,
    pub public_addr: SocketAddr,
    pub internal_addr: SocketAddr,
    pub database: DatabaseConfig,
    pub redis: RedisConfig,
    pub rabbitmq: MqConfig,
    pub relay: RelayConfig,
    pub edge: EdgeConfig,
    pub auth: AuthConfig,
    pub api_keys: ApiKeyConfig,
    pub rate_limits: RateLimitConfig,
    pub usage: UsageConfig,
    pub webhook_security: WebhookSecurityConfig,
    pub webhook_delivery: WebhookDeliveryConfig,
    pub upstream: UpstreamConfig,
    pub generation: GenerationConfig,
    pub log: LogConfig,
    pub shutdown_grace: Duration,
}

/// A variable that is set but cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{variable}: {message} (got {value:?})")]
pub struct ConfigError {
    pub variable: &'static str,
    pub value: String,
    pub message: String,
}

impl Config {
    /// Reads and validates every variable from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the configuration from any name → value lookup (tests pass a map).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env { lookup: &lookup };
        let environment = match env.string("DEVGATE_ENVIRONMENT").as_str() {
            "development" => RunEnvironment::Development,
            "production" => RunEnvironment::Production,
            other => {
                return Err(env.invalid(
                    "DEVGATE_ENVIRONMENT",
                    other,
                    "expected development or production",
                ));
            }
        };
        let log_format = match env.string("DEVGATE_LOG_FORMAT").as_str() {
            "json" => LogFormat::Json,
            "pretty" => LogFormat::Pretty,
            other => {
                return Err(env.invalid("DEVGATE_LOG_FORMAT", other, "expected json or pretty"));
            }
        };
        let hs256 = env.optional("DEVGATE_JWT_HS256_SECRET");
        if let Some(secret) = &hs256
            && secret.len() < 32
        {
            return Err(env.invalid(
                "DEVGATE_JWT_HS256_SECRET",
                "<redacted>",
                "must be at least 32 bytes",
            ));
        }
        let hash_concurrency = match env.optional("DEVGATE_HASH_CONCURRENCY") {
            Some(v) => env.parse_value("DEVGATE_HASH_CONCURRENCY", &v)?,
            None => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
        };
        if hash_concurrency == 0 {
            return Err(env.invalid("DEVGATE_HASH_CONCURRENCY", "0", "must be at least 1"));
        }
        let argon2 = Argon2Params {
            memory_kib: env.parse("DEVGATE_ARGON2_MEMORY_KIB")?,
            iterations: env.parse("DEVGATE_ARGON2_ITERATIONS")?,
            parallelism: env.parse("DEVGATE_ARGON2_PARALLELISM")?,
        };
        argon2::Params::new(
            argon2.memory_kib,
            argon2.iterations,
            argon2.parallelism,
            None,
        )
        .map_err(|e| {
            env.invalid(
                "DEVGATE_ARGON2_MEMORY_KIB",
                &argon2.memory_kib.to_string(),
                &format!("argon2 parameters rejected: {e}"),
            )
        })?;
        let api_keys = ApiKeyConfig {
            argon2,
            hash_concurrency,
            cache_ttl: env.duration("DEVGATE_KEY_CACHE_TTL")?,
            cache_capacity: env.parse("DEVGATE_KEY_CACHE_CAPACITY")?,
            failure_limit: env.parse("DEVGATE_AUTH_FAILURE_LIMIT")?,
            failure_window: env.duration("DEVGATE_AUTH_FAILURE_WINDOW")?,
            last_used_flush_interval: env.duration("DEVGATE_LAST_USED_FLUSH_INTERVAL")?,
            rotation_grace_default: env.duration("DEVGATE_ROTATION_GRACE_DEFAULT")?,
            rotation_grace_max: env.duration("DEVGATE_ROTATION_GRACE_MAX")?,
            expiring_notice: env.duration("DEVGATE_API_KEY_EXPIRING_NOTICE")?,
            expiring_check_interval: env.duration("DEVGATE_API_KEY_EXPIRING_INTERVAL")?,
        };
        let max_notice = Duration::from_secs(crate::api_keys::expiring::MAX_NOTICE_DAYS * 86_400);
        if api_keys.expiring_notice.is_zero() || api_keys.expiring_notice > max_notice {
            return Err(env.invalid(
                "DEVGATE_API_KEY_EXPIRING_NOTICE",
                &env.string("DEVGATE_API_KEY_EXPIRING_NOTICE"),
                "must be positive and at most 30d (the event's days_left)",
            ));
        }
        if api_keys.expiring_check_interval.is_zero() {
            return Err(env.invalid(
                "DEVGATE_API_KEY_EXPIRING_INTERVAL",
                "0s",
                "must be positive",
            ));
        }
        if api_keys.rotation_grace_default > api_keys.rotation_grace_max {
            return Err(env.invalid(
                "DEVGATE_ROTATION_GRACE_DEFAULT",
                &env.string("DEVGATE_ROTATION_GRACE_DEFAULT"),
                "must not exceed DEVGATE_ROTATION_GRACE_MAX",
            ));
        }
        if api_keys.failure_window.is_zero() || api_keys.last_used_flush_interval.is_zero() {
            return Err(env.invalid(
                "DEVGATE_AUTH_FAILURE_WINDOW",
                "0s",
                "windows and intervals must be positive",
            ));
        }
        let internal_tls = match (
            env.optional("DEVGATE_INTERNAL_TLS_CERT"),
            env.optional("DEVGATE_INTERNAL_TLS_KEY"),
        ) {
            (Some(cert), Some(key)) => Some(InternalTls {
                cert: cert.into(),
                key: key.into(),
                client_ca: env
                    .optional("DEVGATE_INTERNAL_TLS_CLIENT_CA")
                    .map(Into::into),
            }),
            (None, None) => {
                if let Some(ca) = env.optional("DEVGATE_INTERNAL_TLS_CLIENT_CA") {
                    return Err(env.invalid(
                        "DEVGATE_INTERNAL_TLS_CLIENT_CA",
                        &ca,
                        "needs DEVGATE_INTERNAL_TLS_CERT and DEVGATE_INTERNAL_TLS_KEY",
                    ));
                }
                None
            }
            (cert, _) => {
                return Err(env.invalid(
                    "DEVGATE_INTERNAL_TLS_CERT",
                    &cert.unwrap_or_default(),
                    "set both DEVGATE_INTERNAL_TLS_CERT and DEVGATE_INTERNAL_TLS_KEY, or neither",
                ));
            }
        };
        let rabbitmq_prefix = env.string("DEVGATE_RABBITMQ_PREFIX");
        if rabbitmq_prefix.is_empty()
            || rabbitmq_prefix.len() > 100
            || !rabbitmq_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(env.invalid(
                "DEVGATE_RABBITMQ_PREFIX",
                &rabbitmq_prefix,
                "expected 1 to 100 of A-Z a-z 0-9 . _ -",
            ));
        }
        let relay = RelayConfig {
            batch_size: env.parse("DEVGATE_OUTBOX_BATCH_SIZE")?,
            poll_interval: env.duration("DEVGATE_OUTBOX_POLL_INTERVAL")?,
            confirm_timeout: env.duration("DEVGATE_OUTBOX_CONFIRM_TIMEOUT")?,
        };
        if relay.batch_size == 0 || relay.poll_interval.is_zero() || relay.confirm_timeout.is_zero()
        {
            return Err(env.invalid(
                "DEVGATE_OUTBOX_BATCH_SIZE",
                &relay.batch_size.to_string(),
                "the batch size, poll interval and confirm timeout must be positive",
            ));
        }
        let pool_size: u32 = env.parse("DEVGATE_DATABASE_POOL_SIZE")?;
        if pool_size == 0 {
            return Err(env.invalid("DEVGATE_DATABASE_POOL_SIZE", "0", "must be at least 1"));
        }
        let webhook_security = WebhookSecurityConfig {
            // The value is never echoed: it is key material.
            encryption_keys: env
                .optional("DEVGATE_ENCRYPTION_KEYS")
                .map(|v| v.parse())
                .transpose()
                .map_err(|e: crate::webhooks::secret_box::SecretBoxError| {
                    env.invalid("DEVGATE_ENCRYPTION_KEYS", "<redacted>", &e.to_string())
                })?,
            allowed_cidrs: env.parse("DEVGATE_WEBHOOK_ALLOWED_CIDRS")?,
        };
        let webhook_delivery = WebhookDeliveryConfig {
            concurrency: env.parse("DEVGATE_WEBHOOK_CONCURRENCY")?,
            timeout: env.duration("DEVGATE_WEBHOOK_TIMEOUT")?,
            retry_schedule: env.parse("DEVGATE_WEBHOOK_RETRY_SCHEDULE")?,
            disable_after: env.parse("DEVGATE_WEBHOOK_DISABLE_AFTER")?,
        };
        if !(1..=10_000).contains(&webhook_delivery.concurrency) {
            return Err(env.invalid(
                "DEVGATE_WEBHOOK_CONCURRENCY",
                &webhook_delivery.concurrency.to_string(),
                "expected 1 to 10000",
            ));
        }
        if webhook_delivery.timeout.is_zero() {
            return Err(env.invalid("DEVGATE_WEBHOOK_TIMEOUT", "0", "must be positive"));
        }
        let endpoint = |name: &'static str| {
            env.optional(name)
                .map(|v| parse_endpoint(&v).map_err(|e| env.invalid(name, &v, &e)))
                .transpose()
        };
        let mut upstream = UpstreamConfig::new(
            endpoint("DEVGATE_ASSET_SERVICE_ADDR")?,
            endpoint("DEVGATE_USER_TEAM_SERVICE_ADDR")?,
            env.duration("DEVGATE_UPSTREAM_TIMEOUT")?,
        );
        if upstream.timeout.is_zero() {
            return Err(env.invalid("DEVGATE_UPSTREAM_TIMEOUT", "0", "must be positive"));
        }
        upstream.breaker_failures = env.parse("DEVGATE_UPSTREAM_BREAKER_FAILURES")?;
        if !(1..=1000).contains(&upstream.breaker_failures) {
            return Err(env.invalid(
                "DEVGATE_UPSTREAM_BREAKER_FAILURES",
                &upstream.breaker_failures.to_string(),
                "expected 1 to 1000",
            ));
        }
        upstream.breaker_cooldown = env.duration("DEVGATE_UPSTREAM_BREAKER_COOLDOWN")?;
        if upstream.breaker_cooldown.is_zero() {
            return Err(env.invalid("DEVGATE_UPSTREAM_BREAKER_COOLDOWN", "0", "must be positive"));
        }
        let kinds = KindCatalog::new(
            env.parse::<Prices>("DEVGATE_GENERATION_PRICES")?,
            env.parse::<Formats>("DEVGATE_GENERATION_FORMATS")?,
        )
        .map_err(|e| {
            env.invalid(
                "DEVGATE_GENERATION_FORMATS",
                &env.string("DEVGATE_GENERATION_FORMATS"),
                &e,
            )
        })?;
        let generation = GenerationConfig {
            kinds,
            jobs_exchange: env
                .optional("DEVGATE_GENERATION_JOBS_EXCHANGE")
                .map(|e| e.trim().to_string())
                .unwrap_or_else(|| routing::default_jobs_exchange(&rabbitmq_prefix)),
            timeout: env.duration("DEVGATE_GENERATION_TIMEOUT")?,
        };
        if generation.timeout.is_zero() {
            return Err(env.invalid("DEVGATE_GENERATION_TIMEOUT", "0", "must be positive"));
        }
        Ok(Config {
            environment,
            public_addr: env.parse("DEVGATE_PUBLIC_ADDR")?,
            internal_addr: env.parse("DEVGATE_INTERNAL_ADDR")?,
            database: DatabaseConfig {
                url: env.string("DEVGATE_DATABASE_URL").into(),
                pool_size,
                connect_timeout: env.duration("DEVGATE_DATABASE_CONNECT_TIMEOUT")?,
                statement_timeout: env.duration("DEVGATE_DATABASE_STATEMENT_TIMEOUT")?,
            },
            redis: RedisConfig {
                url: env.string("DEVGATE_REDIS_URL").into(),
                cluster_nodes: env
                    .string("DEVGATE_REDIS_CLUSTER_NODES")
                    .split(',')
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                    .map(|n| SecretString::from(n.to_string()))
                    .collect(),
                prefix: env.string("DEVGATE_REDIS_PREFIX"),
            },
            rabbitmq: MqConfig {
                url: env.string("DEVGATE_RABBITMQ_URL").into(),
                queue_type: env.parse::<QueueType>("DEVGATE_RABBITMQ_QUEUE_TYPE")?,
                prefix: rabbitmq_prefix,
            },
            relay,
            edge: EdgeConfig {
                trusted_proxies: env.parse("DEVGATE_TRUSTED_PROXIES")?,
            },
            auth: AuthConfig {
                jwt_hs256_secret: hs256.map(Into::into),
                jwt_public_key_path: env
                    .optional("DEVGATE_JWT_PUBLIC_KEY_PATH")
                    .map(PathBuf::from),
                jwt_issuer: env.optional("DEVGATE_JWT_ISSUER"),
                jwt_audience: env.optional("DEVGATE_JWT_AUDIENCE"),
                jwt_leeway: env.duration("DEVGATE_JWT_LEEWAY")?,
                service_callers: env.parse("DEVGATE_SERVICE_TOKENS")?,
                internal_tls,
            },
            api_keys,
            rate_limits: RateLimitConfig {
                plans: PlanLimits {
                    free: env.parse::<Limits>("DEVGATE_PLAN_FREE")?,
                    standard: env.parse("DEVGATE_PLAN_STANDARD")?,
                    professional: env.parse("DEVGATE_PLAN_PROFESSIONAL")?,
                    business: env.parse("DEVGATE_PLAN_BUSINESS")?,
                    enterprise: env.parse("DEVGATE_PLAN_ENTERPRISE")?,
                },
                quotas: PlanQuotas {
                    free: env.parse::<QuotaLimits>("DEVGATE_QUOTA_FREE")?,
                    standard: env.parse("DEVGATE_QUOTA_STANDARD")?,
                    professional: env.parse("DEVGATE_QUOTA_PROFESSIONAL")?,
                    business: env.parse("DEVGATE_QUOTA_BUSINESS")?,
                    enterprise: env.parse("DEVGATE_QUOTA_ENTERPRISE")?,
                },
                fail_closed: env.parse("DEVGATE_RATE_LIMIT_FAIL_CLOSED")?,
            },
            usage: UsageConfig {
                retention: env.duration("DEVGATE_USAGE_RETENTION")?,
                flush_interval: env.duration("DEVGATE_USAGE_FLUSH_INTERVAL")?,
                batch_size: env.parse("DEVGATE_USAGE_BATCH_SIZE")?,
                buffer: env.parse("DEVGATE_USAGE_BUFFER")?,
            },
            webhook_security,
            webhook_delivery,
            upstream,
            generation,
            log: LogConfig {
                filter: env.string("DEVGATE_LOG"),
                format: log_format,
                otlp_endpoint: env.optional("DEVGATE_OTLP_ENDPOINT"),
            },
            shutdown_grace: env.duration("DEVGATE_SHUTDOWN_GRACE")?,
        })
    }
}

/// Looks variables up and falls back to the documented defaults in [`VARIABLES`].
struct Env<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl Env<'_> {
    fn optional(&self, name: &str) -> Option<String> {
        (self.lookup)(name).filter(|v| !v.trim().is_empty())
    }

    fn string(&self, name: &'static str) -> String {
        self.optional(name)
            .unwrap_or_else(|| default_of(name).to_string())
    }

    fn parse<T: FromStr>(&self, name: &'static str) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        self.parse_value(name, &self.string(name))
    }

    fn parse_value<T: FromStr>(&self, name: &'static str, value: &str) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        value
            .trim()
            .parse()
            .map_err(|e: T::Err| self.invalid(name, value, &e.to_string()))
    }

    fn duration(&self, name: &'static str) -> Result<Duration, ConfigError> {
        let value = self.string(name);
        humantime::parse_duration(value.trim()).map_err(|e| {
            self.invalid(
                name,
                &value,
                &format!("{e} (write e.g. 500ms, 30s, 5m, 24h)"),
            )
        })
    }

    fn invalid(&self, variable: &'static str, value: &str, message: &str) -> ConfigError {
        ConfigError {
            variable,
            value: value.to_string(),
            message: message.to_string(),
        }
    }
}

fn default_of(name: &str) -> &'static str {
    VARIABLES
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, default, _)| *default)
        .unwrap_or_else(|| panic!("{name} is missing from config::VARIABLES"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_are_valid() {
        let c = config(&[]).unwrap();
        assert_eq!(c.public_addr.port(), 50051);
        assert_eq!(c.internal_addr.port(), 50052);
        assert_eq!(
            c.api_keys.rotation_grace_default,
            Duration::from_secs(86_400)
        );
        assert_eq!(
            c.api_keys.rotation_grace_max,
            Duration::from_secs(7 * 86_400)
        );
        assert!(c.auth.jwt_hs256_secret.is_none());
        assert_eq!(c.environment, RunEnvironment::Production);
        assert_eq!(
            c.rate_limits.plans.standard.to_string(),
            "100/2000/20000/10"
        );
        assert!(!c.rate_limits.fail_closed);
        assert_eq!(c.api_keys.expiring_notice, Duration::from_secs(7 * 86_400));
        assert!(c.webhook_security.encryption_keys.is_none());
        assert_eq!(c.webhook_security.allowed_cidrs, Default::default());
        assert_eq!(c.upstream.timeout, Duration::from_secs(2));
        assert!(c.upstream.asset_service.is_none());
        assert_eq!(c.upstream.breaker_failures, 5);
        assert_eq!(c.upstream.breaker_cooldown, Duration::from_secs(10));
        assert_eq!(c.generation.kinds.get("image_hd").unwrap().price, 25);
        assert_eq!(c.generation.jobs_exchange, "devgate.generation.jobs");
        assert_eq!(c.generation.timeout, Duration::from_secs(900));
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        let err = config(&[("DEVGATE_KEY_CACHE_TTL", "soon")]).unwrap_err();
        assert_eq!(err.variable, "DEVGATE_KEY_CACHE_TTL");
        let err = config(&[("DEVGATE_PUBLIC_ADDR", "localhost")]).unwrap_err();
        assert_eq!(err.variable, "DEVGATE_PUBLIC_ADDR");
        let err = config(&[("DEVGATE_JWT_HS256_SECRET", "short")]).unwrap_err();
        assert_eq!(err.variable, "DEVGATE_JWT_HS256_SECRET");
        assert!(!err.to_string().contains("short"), "secrets are not echoed");
        let err = config(&[("DEVGATE_PLAN_FREE", "30/500")]).unwrap_err();
        assert_eq!(err.variable, "DEVGATE_PLAN_FREE");
        let err = config(&[("DEVGATE_ROTATION_GRACE_DEFAULT", "8d")]).unwrap_err();
        assert_eq!(err.variable, "DEVGATE_ROTATION_GRACE_DEFAULT");
        // A 31-byte key: refused, and neither the key nor the whole value is echoed.
        let short_key = "c2hvcnQta2V5LXNob3J0LWtleS1zaG9ydC1rZXktMQ==";
        let err = config(&[("DEVGATE_ENCRYPTION_KEYS", &format!("k1:{short_key}"))]).unwrap_err();
        assert_eq!(err.variable, "DEVGATE_ENCRYPTION_KEYS");
        let shown = format!("{err} {err:?}");
        assert!(
            !shown.contains(short_key),
            "key material is not echoed: {shown}"
        );
        assert!(
            shown.contains("k1"),
            "the entry is named by its id: {shown}"
        );
        let err = config(&[("DEVGATE_API_KEY_EXPIRING_NOTICE", "31d")]).unwrap_err();
        assert_eq!(err.variable, "DEVGATE_API_KEY_EXPIRING_NOTICE");
        let err = config(&[("DEVGATE_GENERATION_PRICES", "image=free")]).unwrap_err();
        assert_eq!(err.variable, "DEVGATE_GENERATION_PRICES");
        let err = config(&[("DEVGATE_GENERATION_PRICES", "image=1,sculpture=5")]).unwrap_err();
        assert_eq!(err.variable, "DEVGATE_GENERATION_FORMATS");
        let err = config(&[("DEVGATE_WEBHOOK_ALLOWED_CIDRS", "127.0.0.1/40")]).unwrap_err();
        assert_eq!(err.variable, "DEVGATE_WEBHOOK_ALLOWED_CIDRS");
        let err = config(&[("DEVGATE_ASSET_SERVICE_ADDR", "https://assets:443")]).unwrap_err();
        assert_eq!(err.variable, "DEVGATE_ASSET_SERVICE_ADDR");
        let err = config(&[("DEVGATE_UPSTREAM_TIMEOUT", "0s")]).unwrap_err();
        assert_eq!(err.variable, "DEVGATE_UPSTREAM_TIMEOUT");
        let err = config(&[("DEVGATE_UPSTREAM_BREAKER_FAILURES", "0")]).unwrap_err();
        assert_eq!(err.variable, "DEVGATE_UPSTREAM_BREAKER_FAILURES");
        let err = config(&[("DEVGATE_UPSTREAM_BREAKER_COOLDOWN", "0s")]).unwrap_err();
        assert_eq!(err.variable, "DEVGATE_UPSTREAM_BREAKER_COOLDOWN");
        let c = config(&[("DEVGATE_USER_TEAM_SERVICE_ADDR", "127.0.0.1:50062")]).unwrap();
        assert_eq!(
            c.upstream.user_team_service.unwrap().to_string(),
            "http://127.0.0.1:50062/"
        );
    }

    #[test]
    fn every_variable_read_is_documented() {
        // default_of panics for an undocumented name; reading all defaults exercises them.
        for (name, _, meaning) in VARIABLES {
            assert!(name.starts_with("DEVGATE_"));
            assert!(!meaning.is_empty());
        }
    }
}

#[cfg(test)]
mod readme {
    #[test]
    fn the_readme_documents_every_variable() {
        let readme = include_str!("../README.md");
        for (name, _, _) in super::VARIABLES {
            assert!(
                readme.contains(&format!("| `{name}` |")),
                "README.md's configuration table misses {name}"
            );
        }
    }
}
