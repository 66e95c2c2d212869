//! gRPC health per service (`grpc.health.v1.Health`): the server ("") and each API service
//! answer SERVING only while the process is not draining and Postgres answers a probe, so a
//! load balancer or readiness probe stops sending calls that could only fail.
//! `devgate.liveness` stays SERVING while the process runs: a liveness probe must not restart
//! replicas because the database is away.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    api_keys::grpc::ApiKeyGrpc,
    db::PgPool,
    generation::grpc::GenerationGrpc,
    proto::internal::v1::{
        api_key_service_server::ApiKeyServiceServer as InternalApiKeyServiceServer,
        usage_service_server::UsageServiceServer as InternalUsageServiceServer,
        webhook_service_server::WebhookServiceServer as InternalWebhookServiceServer,
    },
    proto::v1::{
        api_key_service_server::ApiKeyServiceServer,
        generation_proxy_server::GenerationProxyServer, usage_service_server::UsageServiceServer,
        webhook_service_server::WebhookServiceServer,
    },
    usage::grpc::UsageGrpc,
    webhooks::grpc::WebhookGrpc,
};

/// The names whose status follows readiness (draining, Postgres).
pub const READINESS: [&str; 8] = [
    "",
    <ApiKeyServiceServer<ApiKeyGrpc> as NamedService>::NAME,
    <UsageServiceServer<UsageGrpc> as NamedService>::NAME,
    <WebhookServiceServer<WebhookGrpc> as NamedService>::NAME,
    <GenerationProxyServer<GenerationGrpc> as NamedService>::NAME,
    <InternalApiKeyServiceServer<ApiKeyGrpc> as NamedService>::NAME,
    <InternalUsageServiceServer<UsageGrpc> as NamedService>::NAME,
    <InternalWebhookServiceServer<WebhookGrpc> as NamedService>::NAME,
];

/// SERVING while the process runs (for liveness probes).
pub const LIVENESS: &str = "devgate.liveness";

/// How often Postgres is probed, and how long one probe may take.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct ServiceHealth {
    reporter: HealthReporter,
    draining: Arc<AtomicBool>,
    database_up: Arc<AtomicBool>,
}

impl ServiceHealth {
    /// NOT_SERVING until the first probe has reached Postgres.
    pub async fn new(reporter: HealthReporter) -> Self {
        reporter
            .set_service_status(LIVENESS, ServingStatus::Serving)
            .await;
        let health = Self {
            reporter,
            draining: Arc::default(),
            database_up: Arc::default(),
        };
        health.publish().await;
        health
    }

    /// Shutdown has begun: every readiness name goes NOT_SERVING for good.
    pub async fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.publish().await;
    }

    async fn publish(&self) {
        let status =
            if !self.draining.load(Ordering::SeqCst) && self.database_up.load(Ordering::SeqCst) {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
        for name in READINESS {
            self.reporter.set_service_status(name, status).await;
        }
    }

    /// Probes Postgres every [`PROBE_INTERVAL`] until `stop`, flipping the status on each
    /// change (logged once per change, not per probe).
    pub async fn watch_postgres(
        self,
        pool: PgPool,
        stop: CancellationToken,
    ) -> Result<(), Infallible> {
        let mut tick = tokio::time::interval(PROBE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            let up = postgres_answers(&pool).await;
            if self.database_up.swap(up, Ordering::SeqCst) != up {
                if up {
                    tracing::info!("postgres reachable: services SERVING");
                } else {
                    tracing::warn!("postgres unreachable: services NOT_SERVING until it returns");
                }
            }
            self.publish().await;
        }
    }
}

/// `SELECT 1` on a pooled connection within [`PROBE_TIMEOUT`].
async fn postgres_answers(pool: &PgPool) -> bool {
    use diesel_async::RunQueryDsl;
    let probe = async {
        let mut conn = pool.get().await.ok()?;
        diesel::sql_query("SELECT 1").execute(&mut conn).await.ok()
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, probe).await,
        Ok(Some(_))
    )
}
