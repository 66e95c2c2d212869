//! `webhooks`: the delivery pipeline end to end, as a tenant's receiver sees it.
//!
//! Setup: a [`Sink`](crate::sink::Sink) in this process; a fresh tenant (admin user JWT,
//! like the key scenarios) creates `--endpoints` endpoints with the public
//! `CreateWebhookEndpoint` (URL `http://127.0.0.1:<sink port>/<n>`, subscribed to
//! [`EVENT_TYPE`] only, so devgate's own `webhook_endpoint.*` events do not mix in), each
//! with its own secret. One warm-up event is published and awaited at every endpoint
//! (catalog, caches and connections warm; a stack that does not deliver fails here).
//!
//! Run: events are published with the internal `PublishEvent` (service token
//! `DEVGATE_LOCAL_SERVICE_TOKEN`, `--concurrency` calls in flight over `--channels`
//! connections): `--events` as fast as they go, or with `--rate` one every `1/rate` s for
//! `--seconds`. Each event's payload carries its sequence number (`data.balance`), so the
//! sink ties every delivery to the moment its publish returned. The loadgen then waits until
//! every (event, endpoint) arrived, or until none arrived for `--wait`, and deletes the
//! endpoints (also after a failure).
//!
//! Output, one JSON line on stdout:
//!
//! ```text
//! {"deliveries_per_s":…,"first_attempt_p50_ms":…,"first_attempt_p99_ms":…,"lost":…,"duplicates":…, …}
//! ```
//!
//! * `deliveries_per_s`: distinct deliveries that arrived, divided by the time from the
//!   first publish to the last first arrival;
//! * `first_attempt_*`: first arrival at the sink − return of the event's PublishEvent;
//! * `lost`: expected (events published × endpoints) − distinct (endpoint, `webhook-id`)
//!   arrived by the end of the wait; `duplicates`: arrivals beyond the first per
//!   (endpoint, `webhook-id`);
//! * then the run's context: publish rate and p99, publish errors, deliveries the sink
//!   refused (`bad_signatures`, `unexpected`), events, endpoints, wall times.

use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use devgate::{
    proto::json::json_to_struct,
    proto::{
        internal::v1::{
            PublishEventRequest, webhook_service_client::WebhookServiceClient as InternalWebhooks,
        },
        v1::{
            CreateWebhookEndpointRequest, DeleteWebhookEndpointRequest,
            webhook_service_client::WebhookServiceClient,
        },
    },
    webhooks::signing::Secret,
};
use futures_util::{StreamExt, stream};
use hdrhistogram::Histogram;
use tonic::{
    metadata::MetadataValue, service::interceptor::InterceptedService, transport::Channel,
};
use uuid::Uuid;

use crate::{Opts, ServiceAuth, Status, admin_bearer, connect, round, service_auth, sink::Sink};

/// The type every event of the run has: a small schema (two integers and a time), one of
/// them free to carry the event's sequence number.
pub const EVENT_TYPE: &str = "credits.low";
/// The warm-up event's sequence number; measured events are numbered from 1.
const WARM_UP: u64 = 0;
/// How long the warm-up event may take to reach every endpoint.
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the loadgen looks at the sink while waiting for the last deliveries.
const POLL: Duration = Duration::from_millis(20);
/// The most endpoints a tenant may have (devgate refuses more).
const MAX_ENDPOINTS: usize = 50;
/// Latency histograms' range: 1 µs to 2 h (a retried first delivery may take the retry
/// schedule's first steps, 1m and 5m by default).
const MAX_DELIVERY_US: u64 = 2 * 3600 * 1_000_000;

pub struct Params {
    pub events: u64,
    pub endpoints: usize,
    pub rate: Option<f64>,
    pub wait: Duration,
    pub channels: usize,
}

type Bearer = MetadataValue<tonic::metadata::Ascii>;
type Publisher = InternalWebhooks<InterceptedService<Channel, ServiceAuth>>;

/// The one line on stdout.
#[derive(serde::Serialize)]
struct Report {
    deliveries_per_s: f64,
    first_attempt_p50_ms: f64,
    first_attempt_p99_ms: f64,
    lost: u64,
    duplicates: u64,
    scenario: &'static str,
    /// Events published (PublishEvent answered OK).
    events: u64,
    endpoints: usize,
    expected: u64,
    delivered: u64,
    first_attempt_max_ms: f64,
    /// Events published per second (first publish to last publish return).
    publish_per_s: f64,
    publish_p99_ms: f64,
    publish_errors: u64,
    bad_signatures: u64,
    unexpected: u64,
    /// The requested rate (events/s), or null for `--events`.
    rate: Option<f64>,
    /// First publish to last publish return.
    publish_seconds: f64,
    /// First publish to the last first arrival.
    delivery_seconds: f64,
}

pub async fn run(params: Params, opts: &Opts) -> anyhow::Result<()> {
    if params.endpoints == 0 || params.endpoints > MAX_ENDPOINTS {
        bail!("--endpoints must be 1 to {MAX_ENDPOINTS}");
    }
    let events = match params.rate {
        Some(rate) if rate.is_finite() && rate > 0.0 => (rate * opts.seconds as f64).round() as u64,
        Some(_) => bail!("--rate must be a positive number of events per second"),
        None => params.events,
    };
    if events == 0 {
        bail!("no events to publish (--events, or --rate × --seconds, is 0)");
    }
    eprintln!(
        "loadgen: webhooks events={events} endpoints={} rate={} concurrency={} channels={}",
        params.endpoints,
        params
            .rate
            .map_or_else(|| "max".to_string(), |r| format!("{r}/s")),
        opts.concurrency,
        params.channels
    );

    let (sink, addr) = Sink::start(EVENT_TYPE).await?;
    let (bearer, tenant) = admin_bearer(opts)?;
    let mut admin = WebhookServiceClient::new(connect(&opts.public, "public").await?);
    let mut created = Vec::with_capacity(params.endpoints);
    let outcome = async {
        let mut secrets = Vec::with_capacity(params.endpoints);
        for n in 0..params.endpoints {
            let (id, secret) =
                create_endpoint(&mut admin, &bearer, &format!("http://{addr}/{n}")).await?;
            created.push(id);
            secrets.push(secret);
        }
        sink.set_secrets(secrets);
        eprintln!(
            "loadgen: sink on {addr}, {} endpoints created",
            params.endpoints
        );
        measure(&params, opts, &sink, tenant, events).await
    }
    .await;
    // Deleted whatever happened; a failure here is reported after the run's own error.
    let mut cleanup = Ok(());
    for id in created {
        if let Err(e) = delete_endpoint(&mut admin, &bearer, &id).await {
            cleanup = Err(e);
        }
    }
    let report = outcome?;
    cleanup?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Warm-up, publishing and waiting; the report of the run.
async fn measure(
    params: &Params,
    opts: &Opts,
    sink: &Sink,
    tenant: Uuid,
    events: u64,
) -> anyhow::Result<Report> {
    let auth = service_auth(&opts.env_file)?;
    let mut publishers = Vec::with_capacity(params.channels);
    for _ in 0..params.channels {
        let channel = connect(&opts.internal, "internal").await?;
        publishers.push(InternalWebhooks::with_interceptor(channel, auth.clone()));
    }
    let run_id = Uuid::new_v4();

    // Warm-up: one event to every endpoint before the clock starts.
    publish(publishers[0].clone(), tenant, run_id, WARM_UP)
        .await
        .map_err(|e| anyhow!("the warm-up PublishEvent failed: {e}"))?;
    let warm_up_deadline = Instant::now() + WARM_UP_TIMEOUT;
    while sink.arrived_for(WARM_UP) < params.endpoints {
        if Instant::now() > warm_up_deadline {
            bail!(
                "the warm-up event reached {} of {} endpoints within {WARM_UP_TIMEOUT:?}: is the \
                 worker running, and does DEVGATE_WEBHOOK_ALLOWED_CIDRS allow 127.0.0.0/8? \
                 (refused deliveries: {} bad signatures, {} unexpected)",
                sink.arrived_for(WARM_UP),
                params.endpoints,
                sink.bad_signatures
                    .load(std::sync::atomic::Ordering::Relaxed),
                sink.unexpected.load(std::sync::atomic::Ordering::Relaxed),
            );
        }
        tokio::time::sleep(POLL).await;
    }
    eprintln!("loadgen: warm-up event delivered to every endpoint; publishing");

    // Publish; `published[seq]` is when the event's PublishEvent returned OK.
    let start = Instant::now();
    let mut published: Vec<Option<Instant>> = vec![None; events as usize + 1];
    let mut publish_latency = Histogram::<u64>::new_with_bounds(1, MAX_DELIVERY_US, 3)?;
    let mut errors = 0u64;
    let mut first_errors: Vec<String> = Vec::new();
    let progress_step = (events / 10).max(1);
    let mut results = stream::iter(1..=events)
        .map(|seq| {
            let publisher = publishers[seq as usize % publishers.len()].clone();
            async move {
                if let Some(rate) = params.rate {
                    let due = start + Duration::from_secs_f64((seq - 1) as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                let sent = Instant::now();
                let outcome = publish(publisher, tenant, run_id, seq).await;
                (seq, sent, Instant::now(), outcome)
            }
        })
        .buffer_unordered(opts.concurrency);
    let mut done = 0u64;
    while let Some((seq, sent, returned, outcome)) = results.next().await {
        let us = u64::try_from((returned - sent).as_micros()).unwrap_or(u64::MAX);
        publish_latency.saturating_record(us.max(1));
        match outcome {
            Ok(()) => published[seq as usize] = Some(returned),
            Err(e) => {
                errors += 1;
                if first_errors.len() < crate::ERRORS_SHOWN && !first_errors.contains(&e) {
                    first_errors.push(e);
                }
            }
        }
        done += 1;
        if done.is_multiple_of(progress_step) {
            eprintln!(
                "loadgen: published {done}/{events} ({:.1}s), {} deliveries arrived",
                start.elapsed().as_secs_f64(),
                sink.measured()
            );
        }
    }
    let publish_time = start.elapsed();
    for e in &first_errors {
        eprintln!("loadgen: publish error: {e}");
    }
    let ok_events = events - errors;
    let expected = ok_events * params.endpoints as u64;

    // Wait for every delivery, or until none arrived for --wait.
    let (mut seen, mut progress) = (sink.measured(), Instant::now());
    let mut last_report = Instant::now();
    while sink.measured() < expected && progress.elapsed() < params.wait {
        tokio::time::sleep(POLL).await;
        if sink.measured() > seen {
            (seen, progress) = (sink.measured(), Instant::now());
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "loadgen: waiting: {}/{expected} deliveries arrived ({:.1}s)",
                sink.measured(),
                start.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
    }

    // Tally: one entry per (endpoint, webhook-id).
    let mut latency = Histogram::<u64>::new_with_bounds(1, MAX_DELIVERY_US, 3)?;
    let (mut delivered, mut duplicates) = (0u64, 0u64);
    let mut last_arrival = start;
    for arrival in sink.arrivals() {
        if arrival.seq == WARM_UP || arrival.seq > events {
            continue;
        }
        delivered += 1;
        duplicates += arrival.count - 1;
        last_arrival = last_arrival.max(arrival.first);
        if let Some(returned) = published[arrival.seq as usize] {
            let us = u64::try_from(
                arrival
                    .first
                    .saturating_duration_since(returned)
                    .as_micros(),
            )
            .unwrap_or(u64::MAX);
            latency.saturating_record(us.max(1));
        }
    }
    let delivery_time = last_arrival - start;
    let ms = |h: &Histogram<u64>, q: f64| {
        if h.is_empty() {
            0.0
        } else {
            round(h.value_at_quantile(q) as f64 / 1000.0, 2)
        }
    };
    let per_s = |n: u64, d: Duration| {
        if d.is_zero() {
            0.0
        } else {
            round(n as f64 / d.as_secs_f64(), 1)
        }
    };
    let bad_signatures = sink
        .bad_signatures
        .load(std::sync::atomic::Ordering::Relaxed);
    let unexpected = sink.unexpected.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "loadgen: {delivered}/{expected} deliveries in {:.2}s ({} published in {:.2}s, {errors} \
         publish errors); first attempt p50 {} ms, p90 {} ms, p99 {} ms, max {} ms; {duplicates} \
         duplicates, {bad_signatures} bad signatures, {unexpected} unexpected",
        delivery_time.as_secs_f64(),
        ok_events,
        publish_time.as_secs_f64(),
        ms(&latency, 0.5),
        ms(&latency, 0.9),
        ms(&latency, 0.99),
        round(latency.max() as f64 / 1000.0, 2),
    );
    Ok(Report {
        deliveries_per_s: per_s(delivered, delivery_time),
        first_attempt_p50_ms: ms(&latency, 0.5),
        first_attempt_p99_ms: ms(&latency, 0.99),
        lost: expected.saturating_sub(delivered),
        duplicates,
        scenario: "webhooks",
        events: ok_events,
        endpoints: params.endpoints,
        expected,
        delivered,
        first_attempt_max_ms: round(latency.max() as f64 / 1000.0, 2),
        publish_per_s: per_s(ok_events, publish_time),
        publish_p99_ms: ms(&publish_latency, 0.99),
        publish_errors: errors,
        bad_signatures,
        unexpected,
        rate: params.rate,
        publish_seconds: round(publish_time.as_secs_f64(), 3),
        delivery_seconds: round(delivery_time.as_secs_f64(), 3),
    })
}

/// Publishes event `seq` of the run: a valid [`EVENT_TYPE`] payload whose `balance` is
/// `seq`, idempotency id unique to the run and event.
async fn publish(
    mut publisher: Publisher,
    tenant: Uuid,
    run_id: Uuid,
    seq: u64,
) -> Result<(), String> {
    let payload = serde_json::json!({
        "balance": seq,
        "threshold": 1,
        "check_time": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    });
    let request = PublishEventRequest {
        tenant_id: tenant.to_string(),
        event_type: EVENT_TYPE.to_string(),
        payload: json_to_struct(&payload),
        idempotency_id: format!("loadgen-{run_id}-{seq}"),
    };
    match publisher.publish_event(request).await {
        Ok(response) if response.get_ref().duplicate => {
            Err("PublishEvent answered duplicate for a new idempotency id".into())
        }
        Ok(_) => Ok(()),
        Err(status) => Err(Status(&status).to_string()),
    }
}

/// Creates one endpoint to `url` subscribed to [`EVENT_TYPE`]: its id and secret.
async fn create_endpoint(
    admin: &mut WebhookServiceClient<Channel>,
    bearer: &Bearer,
    url: &str,
) -> anyhow::Result<(String, Secret)> {
    let mut request = tonic::Request::new(CreateWebhookEndpointRequest {
        url: url.to_string(),
        description: "loadgen".into(),
        event_types: vec![EVENT_TYPE.into()],
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("authorization", bearer.clone());
    let response = admin
        .create_webhook_endpoint(request)
        .await
        .map_err(|s| anyhow!("CreateWebhookEndpoint {url} failed: {}", Status(&s)))?
        .into_inner();
    let id = response
        .webhook_endpoint
        .map(|e| e.id)
        .context("CreateWebhookEndpoint answered without the endpoint")?;
    let secret = Secret::parse(&response.secret)
        .map_err(|e| anyhow!("CreateWebhookEndpoint answered an unusable secret: {e}"))?;
    Ok((id, secret))
}

async fn delete_endpoint(
    admin: &mut WebhookServiceClient<Channel>,
    bearer: &Bearer,
    id: &str,
) -> anyhow::Result<()> {
    let mut request = tonic::Request::new(DeleteWebhookEndpointRequest { id: id.into() });
    request
        .metadata_mut()
        .insert("authorization", bearer.clone());
    admin
        .delete_webhook_endpoint(request)
        .await
        .map_err(|s| anyhow!("DeleteWebhookEndpoint {id} failed: {}", Status(&s)))?;
    Ok(())
}
