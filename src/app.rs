//! Application wiring: [`Application::build`] connects the backends and binds the listeners;
//! [`Application::run_until_stopped`] serves until SIGINT/SIGTERM and drains in-flight calls.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::pb::health_server::{Health, HealthServer};
use tower_http::{
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    trace::TraceLayer,
};

use crate::{
    api_keys::{
        self,
        expiring::ExpiringNotices,
        grpc::ApiKeyGrpc,
        hashing::SecretHasher,
        invalidation::Invalidations,
        last_used::{LastUsedFlusher, LastUsedRecorder},
        service::{ApiKeys, Metering},
        verifier::KeyVerifier,
    },
    auth::jwt::JwtVerifier,
    config::Config,
    credits::{Credits, grpc::CreditsGrpc},
    db::{
        self, PgPool, StoreError,
        batch::{BatchLog, BatchWriter},
    },
    edge::client_ip::TrustedProxies,
    edge::{
        auth::{AuthLayer, Authenticator, Listener},
        usage::UsageLayer,
    },
    events::{emitter::Emitter, relay::Relay},
    generation::{
        grpc::GenerationGrpc, service::Generations, updates::UpdateConsumer, watch::Changes,
    },
    health::ServiceHealth,
    idempotency::Idempotency,
    kv::Redis,
    mq::Mq,
    proto::v1::usage_service_server::UsageServiceServer,
    proto::{
        self,
        internal::v1::{
            api_key_service_server::ApiKeyServiceServer as InternalApiKeyServiceServer,
            usage_service_server::UsageServiceServer as InternalUsageServiceServer,
            webhook_service_server::WebhookServiceServer as InternalWebhookServiceServer,
        },
        v1::{
            api_key_service_server::ApiKeyServiceServer,
            generation_proxy_server::GenerationProxyServer,
            webhook_service_server::WebhookServiceServer,
        },
    },
    ratelimit::RateLimiter,
    supervise::{Backoff, Supervisor},
    tenants::TenantDirectory,
    usage::{
        RequestLog, RequestLogWriter,
        grpc::UsageGrpc,
        notices::QuotaNotices,
        service::{PlanChanged, Usage},
    },
    webhooks::{
        delivery::{Attempt, fanout::FanOut, queue::TaskQueue, worker::DeliveryWorker},
        grpc::WebhookGrpc,
        service::Webhooks,
        ssrf::{ClientTimeouts, GuardedClient, Policy},
    },
};
// The generation proxy's asset, user and team reads.
use crate::generation::{directory::Directory, upstream::UpstreamReads};

/// The feature services both listeners serve (cheap to clone).
#[derive(Clone)]
struct Services {
    keys: Arc<ApiKeys>,
    limiter: Arc<RateLimiter>,
    usage: Arc<Usage>,
    credits: CreditsGrpc,
    request_log: RequestLog,
    webhooks: Arc<Webhooks>,
    generations: Arc<Generations>,
    /// Asset, user and team reads through the upstream clients (one breaker per upstream
    /// for the whole process).
    directory: Arc<Directory>,
    /// Idempotency-Key of every create RPC; the worker sweeps its expired keys.
    idempotency: Idempotency,
}

/// Which parts run in this process: `serve` = api, `worker` = worker, `all` = both.
#[derive(Debug, Clone, Copy)]
pub struct Roles {
    pub api: bool,
    pub worker: bool,
}

impl Roles {
    pub const ALL: Roles = Roles {
        api: true,
        worker: true,
    };
    pub const API: Roles = Roles {
        api: true,
        worker: false,
    };
    pub const WORKER: Roles = Roles {
        api: false,
        worker: true,
    };
}

/// How often the worker clears rotated-out secret hashes whose grace period has ended.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(60);

pub struct Application {
    config: Config,
    roles: Roles,
    listeners: Option<(TcpListener, TcpListener)>,
    services: Services,
    authenticator: Arc<Authenticator>,
    last_used_flusher: LastUsedFlusher,
    request_log_writer: RequestLogWriter,
    invalidations: Invalidations,
    pool: PgPool,
    /// RabbitMQ, connected on first use (the worker's relay, fan-out and deliveries).
    mq: Mq,
    /// The worker's webhook pipeline.
    delivery: DeliveryWorker,
    fan_out: FanOut,
    attempt_log_writer: BatchWriter<Attempt>,
    /// The worker's `api_key.expiring` task.
    expiring: Arc<ExpiringNotices>,
    /// `usage.quota.*`: sent on crossings, and by the worker's check what those missed.
    quota_notices: Arc<QuotaNotices>,
    /// TLS of the internal listener (read at build, so a bad file stops the start).
    internal_tls: Option<ServerTlsConfig>,
    shutdown: CancellationToken,
}

impl Application {
    /// Connects lazily to Postgres and Redis (the process starts while they are down and
    /// answers UNAVAILABLE until they are back) and binds the listeners of the api role.
    pub async fn build(config: Config, roles: Roles) -> anyhow::Result<Self> {
        let pool = db::pool(&config.database);
        let redis = Redis::connect(&config.redis)?;
        let mq = Mq::new(config.rabbitmq.clone());
        let hasher = Arc::new(SecretHasher::new(
            config.api_keys.argon2,
            config.api_keys.hash_concurrency,
        ));
        let (last_used, last_used_flusher) = LastUsedRecorder::new();
        let verifier = Arc::new(KeyVerifier::new(
            pool.clone(),
            hasher.clone(),
            redis.clone(),
            last_used,
            &config.api_keys,
            config.rate_limits.plans,
            config.rate_limits.quotas,
        ));
        // One compiled event catalog for every feature that emits events.
        let events = Arc::new(Emitter::new(pool.clone()));
        let quota_notices = Arc::new(QuotaNotices::new(
            pool.clone(),
            events.clone(),
            config.rate_limits.quotas,
        ));
        let limiter = Arc::new(
            RateLimiter::new(redis.clone(), config.rate_limits.fail_closed)
                .with_crossings(quota_notices.clone()),
        );
        let invalidations = Invalidations::new(redis.clone());
        let tenants = TenantDirectory::new(pool.clone());
        let (request_log, request_log_writer) = RequestLog::with_capacity(config.usage.buffer);
        let expiring = Arc::new(ExpiringNotices::new(
            pool.clone(),
            events.clone(),
            config.api_keys.expiring_notice,
        ));
        let idempotency = Idempotency::new(pool.clone());
        let keys = Arc::new(ApiKeys::new(
            pool.clone(),
            hasher,
            verifier.clone(),
            invalidations.clone(),
            config.api_keys.clone(),
            tenants.clone(),
            Metering {
                plans: config.rate_limits.plans,
                limiter: limiter.clone(),
                request_log: request_log.clone(),
            },
            events.clone(),
            idempotency.clone(),
        ));
        let jwt = JwtVerifier::from_config(&config.auth)?;
        let authenticator = Arc::new(Authenticator::new(verifier.clone(), jwt, tenants.clone()));
        let credits = Credits::new(pool.clone());
        let usage = Arc::new(Usage::new(
            pool.clone(),
            credits.clone(),
            tenants.clone(),
            limiter.clone(),
            (config.rate_limits.plans, config.rate_limits.quotas),
            plan_changed(verifier, invalidations.clone()),
        ));
        let generations = Arc::new(Generations::new(
            pool.clone(),
            config.generation.clone(),
            events.clone(),
            idempotency.clone(),
            limiter.clone(),
            (tenants.clone(), config.rate_limits.quotas),
            Changes::new(redis.clone()),
        ));
        let directory = Arc::new(Directory::new(UpstreamReads::new(&config.upstream)));
        let credits = CreditsGrpc::new(credits, tenants);
        // One shared task publisher: the RPCs (retry, recover) and the worker's retries.
        let tasks = TaskQueue::new(mq.clone());
        let webhooks = Arc::new(Webhooks::new(
            pool.clone(),
            config.webhook_security.encryption_keys.clone(),
            Policy::new(
                config.webhook_security.allowed_cidrs.clone(),
                config.environment == crate::config::RunEnvironment::Production,
            ),
            events.clone(),
            tasks.clone(),
            idempotency.clone(),
        ));

        let internal_tls = config
            .auth
            .internal_tls
            .as_ref()
            .map(internal_tls_config)
            .transpose()?;
        let listeners = if roles.api {
            let bind = |addr: SocketAddr, var: &'static str| async move {
                TcpListener::bind(addr)
                    .await
                    .map_err(|e| anyhow::anyhow!("{var}: cannot listen on {addr}: {e}"))
            };
            Some((
                bind(config.public_addr, "DEVGATE_PUBLIC_ADDR").await?,
                bind(config.internal_addr, "DEVGATE_INTERNAL_ADDR").await?,
            ))
        } else {
            None
        };
        let delivery_client = GuardedClient::new(
            Policy::new(
                config.webhook_security.allowed_cidrs.clone(),
                config.environment == crate::config::RunEnvironment::Production,
            ),
            ClientTimeouts {
                total: config.webhook_delivery.timeout,
                connect: config.webhook_delivery.timeout.min(Duration::from_secs(10)),
            },
        )?;
        let (attempt_log, attempt_log_writer) = BatchLog::with_capacity(config.usage.buffer);
        let delivery = DeliveryWorker::new(
            pool.clone(),
            tasks.clone(),
            delivery_client,
            config.webhook_security.encryption_keys.clone(),
            config.webhook_delivery.clone(),
            events.clone(),
            attempt_log,
            redis.clone(),
        );
        let fan_out = FanOut::new(
            pool.clone(),
            config.database.url.clone(),
            TaskQueue::new(mq.clone()),
        );
        Ok(Self {
            config,
            roles,
            listeners,
            services: Services {
                keys,
                limiter,
                usage,
                credits,
                request_log,
                webhooks,
                generations,
                directory,
                idempotency,
            },
            authenticator,
            last_used_flusher,
            request_log_writer,
            invalidations,
            pool,
            mq,
            delivery,
            fan_out,
            attempt_log_writer,
            expiring,
            quota_notices,
            internal_tls,
            shutdown: CancellationToken::new(),
        })
    }

    /// The bound public address (port 0 in the config picks a free port).
    pub fn public_addr(&self) -> Option<SocketAddr> {
        self.listeners
            .as_ref()
            .and_then(|(p, _)| p.local_addr().ok())
    }

    pub fn internal_addr(&self) -> Option<SocketAddr> {
        self.listeners
            .as_ref()
            .and_then(|(_, i)| i.local_addr().ok())
    }

    pub fn key_verifier(&self) -> Arc<KeyVerifier> {
        self.services.keys.verifier().clone()
    }

    /// Idempotency keys (tests hold a request in flight with its pause point).
    pub fn idempotency(&self) -> Idempotency {
        self.services.idempotency.clone()
    }

    /// The process's RabbitMQ handle (tests delete the queues it declared).
    pub fn mq(&self) -> Mq {
        self.mq.clone()
    }

    pub fn pool(&self) -> PgPool {
        self.pool.clone()
    }

    /// Cancelling this token stops the application as a signal would.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Serves until SIGINT or SIGTERM, then drains.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let token = self.shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown signal received; draining in-flight calls");
            token.cancel();
        });
        self.run().await
    }

    /// Serves until the shutdown token is cancelled. In-flight calls get
    /// DEVGATE_SHUTDOWN_GRACE to finish; then background tasks flush and stop. Background
    /// tasks run supervised: a restartable one is restarted after a failure or panic; one
    /// that cannot be (it owns its channel) shuts the process down and `run` returns an error.
    pub async fn run(self) -> anyhow::Result<()> {
        let shutdown = self.shutdown.clone();
        let background = CancellationToken::new();
        let mut tasks = Supervisor::new(background.clone());
        let backoff = Backoff::default();
        // A task that failed for good stops the process like a signal would.
        let (fatal, stopping) = (tasks.fatal(), shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = fatal.cancelled() => stopping.cancel(),
                _ = stopping.cancelled() => {}
            }
        });

        if self.roles.worker {
            let (pool, stop) = (self.pool.clone(), background.clone());
            tasks.restartable("secret maintenance", backoff, move || {
                let (pool, stop) = (pool.clone(), stop.clone());
                async move {
                    maintenance(pool, stop).await;
                    Ok::<(), Infallible>(())
                }
            });
            let (pool, stop, retention) = (
                self.pool.clone(),
                background.clone(),
                self.config.usage.retention,
            );
            tasks.restartable("partition maintenance", backoff, move || {
                let (pool, stop) = (pool.clone(), stop.clone());
                async move {
                    partition_maintenance(pool, retention, stop).await;
                    Ok::<(), Infallible>(())
                }
            });
            let (pool, stop, limiter, notices) = (
                self.pool.clone(),
                background.clone(),
                self.services.limiter.clone(),
                self.quota_notices.clone(),
            );
            tasks.restartable("quota reconciliation", backoff, move || {
                let (pool, stop, limiter, notices) =
                    (pool.clone(), stop.clone(), limiter.clone(), notices.clone());
                async move {
                    quota_reconciliation(pool, limiter, notices, stop).await;
                    Ok::<(), Infallible>(())
                }
            });
            let (expiring, stop, interval) = (
                self.expiring.clone(),
                background.clone(),
                self.config.api_keys.expiring_check_interval,
            );
            tasks.restartable("api key expiring notices", backoff, move || {
                let (expiring, stop) = (expiring.clone(), stop.clone());
                async move {
                    expiring.run(interval, stop).await;
                    Ok::<(), Infallible>(())
                }
            });
            let (idempotency, stop) = (self.services.idempotency.clone(), background.clone());
            tasks.restartable("idempotency key sweep", backoff, move || {
                let (idempotency, stop) = (idempotency.clone(), stop.clone());
                async move {
                    idempotency.run_sweeper(stop).await;
                    Ok::<(), Infallible>(())
                }
            });
            let relay = Relay::new(
                self.pool.clone(),
                self.config.database.url.clone(),
                self.mq.clone(),
                self.config.relay.clone(),
            );
            let (updates, stop) = (
                UpdateConsumer::new(self.services.generations.clone(), self.mq.clone()),
                background.clone(),
            );
            tasks.restartable("generation updates", backoff, move || {
                let (updates, stop) = (updates.clone(), stop.clone());
                async move {
                    updates.run(stop).await;
                    Ok::<(), Infallible>(())
                }
            });
            let (generations, stop) = (self.services.generations.clone(), background.clone());
            tasks.restartable("generation timeout sweep", backoff, move || {
                let (generations, stop) = (generations.clone(), stop.clone());
                async move {
                    generations.run_timeout_sweep(stop).await;
                    Ok::<(), Infallible>(())
                }
            });
            let (fan_out, stop) = (self.fan_out.clone(), background.clone());
            tasks.restartable("webhook fan-out", backoff, move || {
                let (fan_out, stop) = (fan_out.clone(), stop.clone());
                async move {
                    fan_out.run(stop).await;
                    Ok::<(), Infallible>(())
                }
            });
            let (delivery, stop) = (self.delivery.clone(), background.clone());
            tasks.restartable("webhook delivery", backoff, move || {
                let (delivery, stop) = (delivery.clone(), stop.clone());
                async move {
                    delivery.run(stop).await;
                    Ok::<(), Infallible>(())
                }
            });
            let usage = &self.config.usage;
            let writer = self.attempt_log_writer.run(
                self.pool.clone(),
                usage.flush_interval,
                usage.batch_size,
                background.clone(),
            );
            tasks.once("webhook attempt log writer", async move {
                let stats = writer.await;
                tracing::info!(
                    rows = stats.rows_written,
                    dropped = stats.rows_dropped,
                    "webhook attempt log writer stopped"
                );
            });
            let stop = background.clone();
            tasks.restartable("outbox relay", backoff, move || {
                let (relay, stop) = (relay.clone(), stop.clone());
                async move {
                    let stats = relay.run(stop).await;
                    tracing::info!(published = stats.published, "outbox relay stopped");
                    Ok::<(), Infallible>(())
                }
            });
        }
        let servers = match self.listeners {
            Some((public, internal)) => {
                let usage = &self.config.usage;
                let writer = self.request_log_writer.run(
                    self.pool.clone(),
                    usage.flush_interval,
                    usage.batch_size,
                    background.clone(),
                );
                tasks.once("request log writer", async move {
                    let stats = writer.await;
                    tracing::info!(
                        rows = stats.rows_written,
                        dropped = stats.rows_dropped,
                        "request log writer stopped"
                    );
                });
                tasks.once(
                    "last-used flusher",
                    self.last_used_flusher.run(
                        self.pool.clone(),
                        self.config.api_keys.last_used_flush_interval,
                        background.clone(),
                    ),
                );
                let (invalidations, verifier, stop) = (
                    self.invalidations.clone(),
                    self.services.keys.verifier().clone(),
                    background.clone(),
                );
                tasks.restartable("key invalidation listener", backoff, move || {
                    let listen = invalidations.clone().listen(verifier.clone(), stop.clone());
                    async move {
                        listen.await;
                        Ok::<(), Infallible>(())
                    }
                });
                let (reporter, health_service) = tonic_health::server::health_reporter();
                let health = ServiceHealth::new(reporter).await;
                let (probe, pool, stop) = (health.clone(), self.pool.clone(), background.clone());
                tasks.restartable("health probe", backoff, move || {
                    probe.clone().watch_postgres(pool.clone(), stop.clone())
                });
                let draining = (health.clone(), shutdown.clone());
                tokio::spawn(async move {
                    draining.1.cancelled().await;
                    draining.0.drain().await;
                });
                tracing::info!(public = %public.local_addr()?, internal = %internal.local_addr()?, "devgate listening");
                if self.config.auth.service_callers.is_empty() {
                    tracing::warn!(
                        "DEVGATE_SERVICE_TOKENS is empty: every internal call will be refused"
                    );
                }
                let public_listener = Listener::Public {
                    authenticator: self.authenticator.clone(),
                    limiter: self.services.limiter.clone(),
                    trusted_proxies: self.config.edge.trusted_proxies.clone(),
                };
                let internal_listener = Listener::Internal {
                    callers: Arc::new(self.config.auth.service_callers.clone()),
                };
                Some(futures_util::future::try_join(
                    serve(
                        public,
                        public_listener,
                        None,
                        self.services.clone(),
                        health_service.clone(),
                        shutdown.clone(),
                    ),
                    serve(
                        internal,
                        internal_listener,
                        self.internal_tls.clone(),
                        self.services.clone(),
                        health_service,
                        shutdown.clone(),
                    ),
                ))
            }
            None => None,
        };

        let grace = self.config.shutdown_grace;
        let drained = async {
            match servers {
                Some(servers) => servers.await.map(|_| ()),
                None => {
                    shutdown.cancelled().await;
                    Ok(())
                }
            }
        };
        let deadline = async {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
        };
        let result = tokio::select! {
            r = drained => r.map_err(anyhow::Error::from),
            _ = deadline => {
                tracing::warn!(grace_s = grace.as_secs(), "in-flight calls did not finish within the shutdown grace");
                Ok(())
            }
        };
        background.cancel();
        let supervised = tasks.join().await;
        tracing::info!("devgate stopped");
        result?;
        supervised?;
        Ok(())
    }
}

/// One listener: its services behind the auth and usage layers, plus health and reflection
/// (v1 and v1alpha, for grpcurl 1.8). The public listener serves `devgate.v1`; the internal
/// one only `devgate.internal.v1`, so neither lists the other's RPCs.
async fn serve(
    listener: TcpListener,
    auth: Listener,
    tls: Option<ServerTlsConfig>,
    services: Services,
    health_service: HealthServer<impl Health>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let public = matches!(&auth, Listener::Public { .. });
    let trusted_proxies = match &auth {
        Listener::Public {
            trusted_proxies, ..
        } => trusted_proxies.clone(),
        Listener::Internal { .. } => TrustedProxies::default(),
    };
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // Reflection lists only the services this listener serves.
    let names: &[&str] = if public {
        &[
            "devgate.v1.ApiKeyService",
            "devgate.v1.UsageService",
            "devgate.v1.WebhookService",
            "devgate.v1.GenerationProxy",
        ]
    } else {
        &[
            "devgate.internal.v1.ApiKeyService",
            "devgate.internal.v1.UsageService",
            "devgate.internal.v1.WebhookService",
        ]
    };
    let with_services = |mut b: tonic_reflection::server::Builder<'static>| {
        for name in names {
            b = b.with_service_name(*name);
        }
        b.with_service_name("grpc.health.v1.Health")
    };
    let reflection_v1 = with_services(reflection())
        .build_v1()
        .expect("the embedded descriptor set is valid");
    let reflection_v1alpha = with_services(reflection())
        .build_v1alpha()
        .expect("the embedded descriptor set is valid");

    let layers = tower::ServiceBuilder::new()
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(PropagateRequestIdLayer::x_request_id())
        // After SetRequestId, so the span carries the generated id too. Only the span: a log
        // line per call would cost the hot path; refusals and failures log where they happen.
        .layer(
            TraceLayer::new_for_grpc()
                .make_span_with(|req: &http::Request<_>| {
                    let request_id = req
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    tracing::info_span!("rpc", path = %req.uri().path(), request_id = %request_id)
                })
                .on_request(())
                .on_response(())
                .on_body_chunk(())
                .on_eos(())
                .on_failure(()),
        )
        // Internal calls are not a tenant's API usage: the request log gets the calls that
        // internal callers gate for a tenant (consuming VerifyApiKey, with the caller's
        // name), and the rows they create name them (plan changes, grants, metered usage).
        .layer(UsageLayer::new(
            public.then(|| services.request_log.clone()),
            trusted_proxies,
        ))
        .layer(AuthLayer::new(auth))
        .into_inner();
    let stop = shutdown.clone();

    let mut builder = Server::builder().tcp_nodelay(true);
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let grpc = ApiKeyGrpc::new(services.keys);
    let usage = UsageGrpc::new(services.usage, services.credits);
    let webhooks = WebhookGrpc::new(services.webhooks);
    let router = builder
        .layer(layers)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let router = if public {
        router
            .add_service(ApiKeyServiceServer::new(grpc))
            .add_service(UsageServiceServer::new(usage))
            .add_service(WebhookServiceServer::new(webhooks))
            .add_service(GenerationProxyServer::new(GenerationGrpc::new(
                services.generations,
                services.directory,
            )))
    } else {
        router
            .add_service(InternalApiKeyServiceServer::new(grpc))
            .add_service(InternalUsageServiceServer::new(usage))
            .add_service(InternalWebhookServiceServer::new(webhooks))
    };
    // Statuses are set by `ServiceHealth` (NOT_SERVING as soon as draining starts).
    router
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop.cancelled_owned())
        .await
}

/// The internal listener's TLS from its PEM files; with a client CA, client certificates are
/// verified (and optional: callers without one authenticate with a service token).
fn internal_tls_config(tls: &crate::auth::config::InternalTls) -> anyhow::Result<ServerTlsConfig> {
    let read = |path: &std::path::Path, var: &str| {
        std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("{var}: cannot read {}: {e}", path.display()))
    };
    let identity = Identity::from_pem(
        read(&tls.cert, "DEVGATE_INTERNAL_TLS_CERT")?,
        read(&tls.key, "DEVGATE_INTERNAL_TLS_KEY")?,
    );
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &tls.client_ca {
        config = config
            .client_ca_root(Certificate::from_pem(read(
                ca,
                "DEVGATE_INTERNAL_TLS_CLIENT_CA",
            )?))
            .client_auth_optional(true);
    }
    Ok(config)
}

async fn purge_expired_previous_secrets(pool: &PgPool) -> Result<usize, StoreError> {
    let mut conn = db::connect(pool).await?;
    api_keys::store::purge_expired_previous_secrets(&mut conn, chrono::Utc::now()).await
}

/// A plan change drops the tenant's cached keys here and publishes it to the other replicas.
fn plan_changed(verifier: Arc<KeyVerifier>, invalidations: Invalidations) -> PlanChanged {
    Arc::new(move |tenant| {
        verifier.invalidate_tenant(tenant);
        let invalidations = invalidations.clone();
        Box::pin(async move { invalidations.publish_tenant(tenant).await })
    })
}

/// Worker housekeeping: rotated-out secret hashes are deleted once their grace has ended.
async fn maintenance(pool: PgPool, stop: CancellationToken) {
    let mut tick = tokio::time::interval(MAINTENANCE_INTERVAL);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => match purge_expired_previous_secrets(&pool).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(keys = n, "cleared rotated-out secrets past their grace period"),
                Err(e) => tracing::warn!(error = %e, "maintenance failed; will retry"),
            },
        }
    }
}

/// How often the worker creates request-log partitions ahead and drops expired ones.
const PARTITION_INTERVAL: Duration = Duration::from_secs(3600);
/// Months of request-log partitions kept ready ahead of time.
const PARTITIONS_AHEAD: i32 = 2;

async fn partition_maintenance(pool: PgPool, retention: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(PARTITION_INTERVAL);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                if let Err(e) = crate::usage::log::maintain_partitions(&pool, PARTITIONS_AHEAD, retention).await {
                    tracing::warn!(error = %e, "request-log partition maintenance failed; will retry");
                }
            }
        }
    }
}

/// How often the worker raises this month's quota counters in Redis to what Postgres logged.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(60);

/// Restores quota counters after a Redis restart or flush (they only ever go up), then
/// sends the `usage.quota.*` notices a crossing on the hot path could not.
async fn quota_reconciliation(
    pool: PgPool,
    limiter: Arc<RateLimiter>,
    notices: Arc<QuotaNotices>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(RECONCILE_INTERVAL);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                let quotas = limiter.quotas();
                if let Err(e) = quotas.reconcile_requests(&pool).await {
                    tracing::warn!(error = %e, "quota reconciliation failed; will retry");
                } else {
                    match notices.check(quotas).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(events = n, "quota notices sent by the worker's check"),
                        Err(e) => tracing::warn!(error = %e, "quota notice check failed; will retry"),
                    }
                }
            },
        }
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
