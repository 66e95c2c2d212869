//! devgate's clients of the Asset and User/Team services (`generation::upstream`) against
//! the simulator as a real process: reads with the tenant check, deadlines on a stopped,
//! slow or black-holed upstream, the circuit breaker opening and recovering when the
//! service returns, and the metadata every call carries (on a tiny in-test server that
//! records it).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use devgate::{
    generation::upstream::{
        CALLER_HEADER, REQUEST_ID_HEADER, TENANT_HEADER, UpstreamConfig, UpstreamError,
        UpstreamReads, parse_endpoint,
    },
    identity::TenantId,
    proto::upstream::assets::v1::{
        Asset, GetAssetRequest, ListAssetsRequest, ListAssetsResponse, asset_service_server,
    },
};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, Request, Response, Status, metadata::MetadataMap};
use tonic_types::StatusExt;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use uuid::Uuid;

use crate::harness::upstream_sim::UpstreamSim;

/// Slack over the deadline for scheduling and process noise: a bound on a hang, not a
/// latency target.
const MARGIN: Duration = Duration::from_millis(750);

fn prefix() -> String {
    format!("devgate-test-{}", Uuid::new_v4().simple())
}

fn config(asset: SocketAddr, user_team: SocketAddr, timeout: Duration) -> UpstreamConfig {
    let mut config = UpstreamConfig::new(
        Some(parse_endpoint(&asset.to_string()).unwrap()),
        Some(parse_endpoint(&user_team.to_string()).unwrap()),
        timeout,
    );
    config.breaker_failures = 3;
    config.breaker_cooldown = Duration::from_secs(2);
    config
}

fn reads(sim: &UpstreamSim, timeout: Duration) -> UpstreamReads {
    UpstreamReads::new(&config(
        sim.ready.asset_addr,
        sim.ready.user_team_addr,
        timeout,
    ))
}

const CALLER: &str = "api_key:AbCdEfGhIjKl";

#[tokio::test]
async fn reads_work_and_another_tenants_objects_are_not_found() {
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let sim = UpstreamSim::start(&prefix(), &[a, b], &[]).await;
    let reads = reads(&sim, Duration::from_secs(2));
    let (ta, tb) = (TenantId(a), TenantId(b));
    let (seed_a, seed_b) = (sim.tenant(a).clone(), sim.tenant(b).clone());

    let asset = reads
        .get_asset(ta, CALLER, "req-1", &seed_a.assets[0])
        .await
        .unwrap();
    assert_eq!(asset.id, seed_a.assets[0]);
    assert_eq!(asset.tenant_id, a.to_string());
    // The simulator answers b's asset with b as its owner: devgate says NOT_FOUND, exactly
    // as for an id that does not exist.
    let foreign = reads
        .get_asset(ta, CALLER, "req-2", &seed_b.assets[0])
        .await
        .unwrap_err();
    assert!(
        matches!(foreign, UpstreamError::NotFound { .. }),
        "{foreign:?}"
    );
    let unknown = reads
        .get_asset(ta, CALLER, "req-3", &Uuid::new_v4().to_string())
        .await
        .unwrap_err();
    let status = Status::from(foreign);
    assert_eq!(status.code(), Code::NotFound);
    let info = status.get_error_details().error_info().cloned().unwrap();
    assert_eq!(info.reason, "ASSET_NOT_FOUND");
    assert_eq!(Status::from(unknown).code(), Code::NotFound);

    let page = reads
        .list_assets(ta, CALLER, "req-4", "", 100, "")
        .await
        .unwrap();
    assert_eq!(page.assets.len(), seed_a.assets.len());
    assert!(page.assets.iter().all(|x| x.tenant_id == a.to_string()));
    let bad_token = reads
        .list_assets(ta, CALLER, "req-5", "", 10, "not-a-token")
        .await
        .unwrap_err();
    let status = Status::from(bad_token);
    assert_eq!(status.code(), Code::InvalidArgument);
    let br = status.get_error_details().bad_request().cloned().unwrap();
    assert_eq!(br.field_violations[0].field, "page_token");

    let alice = reads
        .get_user(ta, CALLER, "req-6", &seed_a.users["alice"])
        .await
        .unwrap();
    assert_eq!(alice.tenant_id, a.to_string());
    let err = reads
        .get_user(ta, CALLER, "req-7", &seed_b.users["alice"])
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::NotFound { .. }), "{err:?}");

    let design = reads
        .get_team(ta, CALLER, "req-8", &seed_a.teams["design"])
        .await
        .unwrap();
    assert_eq!(design.tenant_id, a.to_string());
    let err = reads
        .get_team(tb, CALLER, "req-9", &seed_a.teams["design"])
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::NotFound { .. }), "{err:?}");

    let members = reads
        .list_team_members(ta, CALLER, "req-10", &seed_a.teams["design"], 10, "")
        .await
        .unwrap();
    assert_eq!(members.members.len(), design.member_count as usize);
    let err = reads
        .list_team_members(tb, CALLER, "req-11", &seed_a.teams["design"], 10, "")
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::NotFound { .. }), "{err:?}");
}

#[tokio::test]
async fn a_stopped_upstream_is_unavailable_opens_the_breaker_and_recovers() {
    let tenant = Uuid::new_v4();
    let prefix = prefix();
    let sim = UpstreamSim::start(&prefix, &[tenant], &[]).await;
    let (asset_addr, user_team_addr) = (sim.ready.asset_addr, sim.ready.user_team_addr);
    let asset_id = sim.tenant(tenant).assets[0].clone();
    let timeout = Duration::from_secs(1);
    let reads = reads(&sim, timeout);
    let t = TenantId(tenant);
    reads.get_asset(t, CALLER, "r", &asset_id).await.unwrap();

    drop(sim); // Kills the process.

    // Three failed calls (the breaker's threshold), each within the deadline.
    for _ in 0..3 {
        let started = Instant::now();
        let err = reads
            .get_asset(t, CALLER, "r", &asset_id)
            .await
            .unwrap_err();
        let elapsed = started.elapsed();
        assert!(
            matches!(
                err,
                UpstreamError::Unavailable { .. } | UpstreamError::DeadlineExceeded { .. }
            ),
            "{err:?}"
        );
        assert!(elapsed < timeout + MARGIN, "no hang: {elapsed:?}");
        let status = Status::from(err);
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.get_error_details().retry_info().is_some());
    }

    // Open: failed without calling, with the rest of the cooldown to wait.
    let err = reads
        .get_asset(t, CALLER, "r", &asset_id)
        .await
        .unwrap_err();
    let UpstreamError::CircuitOpen { retry_after, .. } = err else {
        panic!("expected an open breaker, got {err:?}");
    };
    assert!(retry_after <= Duration::from_secs(2), "{retry_after:?}");
    let status = Status::from(UpstreamError::CircuitOpen {
        service: devgate::generation::upstream::Service::Assets,
        retry_after,
    });
    assert_eq!(status.code(), Code::Unavailable);
    let retry = status.get_error_details().retry_info().cloned().unwrap();
    assert_eq!(retry.retry_delay, Some(retry_after));
    // The User/Team service has a breaker of its own, still closed: its call is attempted.
    let err = reads
        .get_user(t, CALLER, "r", &Uuid::new_v4().to_string())
        .await
        .unwrap_err();
    assert!(!matches!(err, UpstreamError::CircuitOpen { .. }), "{err:?}");

    // The service comes back on the same port; after the cooldown one probe goes through
    // and closes the breaker.
    let sim = UpstreamSim::start_at(
        &prefix,
        &[tenant],
        &asset_addr.to_string(),
        &user_team_addr.to_string(),
        &[],
    )
    .await;
    assert_eq!(sim.ready.asset_addr, asset_addr);
    tokio::time::sleep(retry_after).await;
    let asset = reads.get_asset(t, CALLER, "r", &asset_id).await.unwrap();
    assert_eq!(asset.id, asset_id);
    for _ in 0..3 {
        reads.get_asset(t, CALLER, "r", &asset_id).await.unwrap();
    }
}

#[tokio::test]
async fn a_slow_or_black_holed_upstream_answers_unavailable_at_the_deadline() {
    let tenant = Uuid::new_v4();
    let sim = UpstreamSim::start(&prefix(), &[tenant], &["--rpc-delay", "10s"]).await;
    let timeout = Duration::from_millis(500);
    let reads = reads(&sim, timeout);
    let seed = sim.tenant(tenant).clone();
    let t = TenantId(tenant);

    let started = Instant::now();
    let err = reads
        .get_asset(t, CALLER, "r", &seed.assets[0])
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < timeout + MARGIN,
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(err, UpstreamError::DeadlineExceeded { .. }),
        "{err:?}"
    );
    let status = Status::from(err);
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.get_error_details().retry_info().is_some());
    let started = Instant::now();
    let err = reads
        .list_team_members(t, CALLER, "r", &seed.teams["design"], 10, "")
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < timeout + MARGIN,
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(err, UpstreamError::DeadlineExceeded { .. }),
        "{err:?}"
    );

    // A black hole: the kernel accepts the connection, nothing ever answers.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = hole.local_addr().unwrap();
    let reads = UpstreamReads::new(&config(addr, addr, timeout));
    let started = Instant::now();
    let err = reads
        .get_team(t, CALLER, "r", &seed.teams["design"])
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < timeout + MARGIN,
        "{:?}",
        started.elapsed()
    );
    assert_eq!(Status::from(err).code(), Code::Unavailable);
}

/// An Asset service that records the metadata of every call and answers for its tenant.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<MetadataMap>>>,
}

#[tonic::async_trait]
impl asset_service_server::AssetService for Recorder {
    async fn get_asset(&self, req: Request<GetAssetRequest>) -> Result<Response<Asset>, Status> {
        self.seen.lock().unwrap().push(req.metadata().clone());
        let r = req.into_inner();
        Ok(Response::new(Asset {
            id: r.asset_id,
            tenant_id: r.tenant_id,
            ..Default::default()
        }))
    }

    async fn list_assets(
        &self,
        req: Request<ListAssetsRequest>,
    ) -> Result<Response<ListAssetsResponse>, Status> {
        self.seen.lock().unwrap().push(req.metadata().clone());
        Ok(Response::new(ListAssetsResponse {
            tenant_id: req.into_inner().tenant_id,
            ..Default::default()
        }))
    }
}

#[tokio::test]
async fn every_call_carries_request_id_tenant_caller_and_trace_context() {
    let recorder = Recorder::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(asset_service_server::AssetServiceServer::new(
                recorder.clone(),
            ))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    // Spans exported nowhere, but with real trace ids: what devgate has with an OTLP endpoint.
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let tenant = TenantId(Uuid::new_v4());
    let reads = UpstreamReads::new(&config(addr, addr, Duration::from_secs(2)));
    let span = tracing::info_span!("rpc");
    let trace_id = span.context().span().span_context().trace_id();
    assert_ne!(trace_id, opentelemetry::trace::TraceId::INVALID);
    async {
        reads
            .get_asset(tenant, CALLER, "req-meta-1", "asset-1")
            .await
            .unwrap();
        reads
            .list_assets(tenant, CALLER, "req-meta-2", "", 10, "")
            .await
            .unwrap();
    }
    .instrument(span)
    .await;

    let seen = recorder.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    for (meta, request_id) in seen.iter().zip(["req-meta-1", "req-meta-2"]) {
        assert_eq!(meta.get(REQUEST_ID_HEADER).unwrap(), request_id);
        assert_eq!(
            meta.get(TENANT_HEADER).unwrap().to_str().unwrap(),
            tenant.to_string()
        );
        assert_eq!(meta.get(CALLER_HEADER).unwrap(), CALLER);
        let traceparent = meta.get("traceparent").unwrap().to_str().unwrap();
        let parts: Vec<&str> = traceparent.split('-').collect();
        assert_eq!(parts.len(), 4, "{traceparent}");
        assert_eq!(parts[0], "00");
        assert_eq!(parts[1], trace_id.to_string(), "the caller's trace");
        assert_eq!(parts[3], "01", "sampled");
        assert!(
            meta.get("grpc-timeout").is_some(),
            "the deadline travels too"
        );
    }
    server.abort();
}
