//! The `webhooks` scenario's receiver: an HTTP/1.1 server on `127.0.0.1:0` in the loadgen's
//! process. Endpoint `n` of the run is `POST /<n>`. Every delivery is checked the way a
//! Standard Webhooks receiver does (signature with that endpoint's secret, timestamp within
//! the spec's 5 minutes) and must carry one of the run's events; accepted deliveries are
//! answered 204 and recorded per (endpoint, `webhook-id`): first arrival and count. A
//! refused delivery is answered 4xx (devgate retries it later) and counted, never recorded.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use anyhow::Context;
use axum::{
    Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    routing::post,
};
use devgate::webhooks::signing::{self, Secret};

/// One delivery as the sink saw it.
#[derive(Clone, Copy)]
pub struct Arrival {
    /// When the first attempt arrived.
    pub first: Instant,
    /// Attempts accepted (more than one is a duplicate).
    pub count: u64,
    /// The run's sequence number of the event, read from its payload.
    pub seq: u64,
}

/// What the sink has seen so far; shared with the request handlers.
pub struct Sink {
    /// The endpoints' secrets, by path number; set once the endpoints exist. Until then
    /// every delivery is answered 503.
    secrets: OnceLock<Vec<Secret>>,
    /// The event type every delivery must have.
    event_type: &'static str,
    arrivals: Mutex<HashMap<(usize, String), Arrival>>,
    /// Distinct (endpoint, webhook-id) of events with `seq >= 1` (the measured ones).
    measured: AtomicU64,
    /// Deliveries refused: bad or missing signature, timestamp out of tolerance.
    pub bad_signatures: AtomicU64,
    /// Deliveries refused: no such endpoint path, or a body that is not one of the run's
    /// events (wrong type, no sequence number).
    pub unexpected: AtomicU64,
}

impl Sink {
    /// Binds `127.0.0.1:0` and serves in a background task (it lives as long as the process).
    pub async fn start(event_type: &'static str) -> anyhow::Result<(Arc<Sink>, SocketAddr)> {
        let sink = Arc::new(Sink {
            secrets: OnceLock::new(),
            event_type,
            arrivals: Mutex::new(HashMap::new()),
            measured: AtomicU64::new(0),
            bad_signatures: AtomicU64::new(0),
            unexpected: AtomicU64::new(0),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot bind the sink on 127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let app = Router::new()
            .route("/{n}", post(receive))
            .with_state(sink.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("loadgen: the sink stopped: {e}");
            }
        });
        Ok((sink, addr))
    }

    /// Sets the secrets of endpoints `0..secrets.len()`; deliveries are accepted from now on.
    pub fn set_secrets(&self, secrets: Vec<Secret>) {
        // Called once per run; a second call would be a bug in the loadgen.
        assert!(self.secrets.set(secrets).is_ok(), "secrets set twice");
    }

    /// How many distinct measured deliveries arrived so far.
    pub fn measured(&self) -> u64 {
        self.measured.load(Ordering::Relaxed)
    }

    /// Every delivery recorded so far (a copy; the server keeps running).
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals
            .lock()
            .expect("arrivals lock")
            .values()
            .copied()
            .collect()
    }

    /// The arrivals of event `seq` (e.g. the warm-up's), one per endpoint reached.
    pub fn arrived_for(&self, seq: u64) -> usize {
        self.arrivals
            .lock()
            .expect("arrivals lock")
            .values()
            .filter(|a| a.seq == seq)
            .count()
    }
}

async fn receive(
    State(sink): State<Arc<Sink>>,
    Path(n): Path<usize>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let arrived = Instant::now();
    let Some(secrets) = sink.secrets.get() else {
        return StatusCode::SERVICE_UNAVAILABLE;
    };
    let Some(secret) = secrets.get(n) else {
        sink.unexpected.fetch_add(1, Ordering::Relaxed);
        return StatusCode::NOT_FOUND;
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(id), Some(timestamp), Some(signature)) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    ) else {
        sink.bad_signatures.fetch_add(1, Ordering::Relaxed);
        return StatusCode::BAD_REQUEST;
    };
    let now = chrono::Utc::now().timestamp();
    if signing::verify(
        secret,
        id,
        timestamp,
        signature,
        &body,
        now,
        signing::DEFAULT_TOLERANCE_SECS,
    )
    .is_err()
    {
        sink.bad_signatures.fetch_add(1, Ordering::Relaxed);
        return StatusCode::UNAUTHORIZED;
    }
    let Some(seq) = event_seq(&body, sink.event_type) else {
        sink.unexpected.fetch_add(1, Ordering::Relaxed);
        return StatusCode::UNPROCESSABLE_ENTITY;
    };
    let mut arrivals = sink.arrivals.lock().expect("arrivals lock");
    arrivals
        .entry((n, id.to_string()))
        .and_modify(|a| a.count += 1)
        .or_insert_with(|| {
            if seq >= 1 {
                sink.measured.fetch_add(1, Ordering::Relaxed);
            }
            Arrival {
                first: arrived,
                count: 1,
                seq,
            }
        });
    StatusCode::NO_CONTENT
}

/// The run's sequence number of a delivered event: the body is
/// `{"type", "timestamp", "data"}` and the loadgen publishes `data.balance = seq`.
fn event_seq(body: &[u8], event_type: &str) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Delivery {
        #[serde(rename = "type")]
        event_type: String,
        data: Data,
    }
    #[derive(serde::Deserialize)]
    struct Data {
        balance: serde_json::Number,
    }
    let delivery: Delivery = serde_json::from_slice(body).ok()?;
    if delivery.event_type != event_type {
        return None;
    }
    let n = &delivery.data.balance;
    // devgate may write an integer carried as a protobuf double either way.
    n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0)
            .map(|f| f as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_sequence_number() {
        let body = br#"{"type":"credits.low","timestamp":"2026-01-01T00:00:00Z","data":{"balance":42,"threshold":1,"check_time":"2026-01-01T00:00:00Z"}}"#;
        assert_eq!(event_seq(body, "credits.low"), Some(42));
        let float = br#"{"type":"credits.low","data":{"balance":42.0}}"#;
        assert_eq!(event_seq(float, "credits.low"), Some(42));
        assert_eq!(event_seq(body, "credits.granted"), None);
        assert_eq!(event_seq(b"{}", "credits.low"), None);
    }
}
