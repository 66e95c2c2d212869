//! The tower layer that records every authenticated call in the request log: RPC, REST
//! method and path (when Envoy transcoded it), final gRPC status (from the headers of a
//! trailers-only reply or from the trailers), error reason, latency, request and response
//! sizes, client address, user agent, cost.
//!
//! It sits outside the auth layer, so refusals that happen there (rate limits) are recorded
//! too; the auth layer tells it who called through the response's extensions
//! ([`CallIdentity`]). Unauthenticated calls have no identity and are not recorded.
//!
//! Calls whose request stream the peer reset are not recorded either: Envoy does that when
//! it refuses a REST body it cannot transcode (`{"":1}`, bad JSON) after it has already
//! forwarded the headers. Its client got Envoy's 400, not the INTERNAL tonic answers to the
//! broken stream, so a record would report a server error that no client saw.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body::{Frame, SizeHint};
use tonic::{Status, body::Body};
use tonic_types::StatusExt;
use tower::{Layer, Service};

use super::{client_ip::TrustedProxies, context::CallIdentity};
use crate::usage::{RequestLog, RequestRecord};

#[derive(Clone)]
pub struct UsageLayer {
    /// `None`: pass calls through untouched (the internal listener, whose callers are
    /// services; the RPCs that act for a tenant record those calls themselves).
    log: Option<RequestLog>,
    trusted_proxies: TrustedProxies,
}

impl UsageLayer {
    pub fn new(log: Option<RequestLog>, trusted_proxies: TrustedProxies) -> Self {
        Self {
            log,
            trusted_proxies,
        }
    }
}

impl<S> Layer<S> for UsageLayer {
    type Service = UsageService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        UsageService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct UsageService<S> {
    inner: S,
    layer: UsageLayer,
}

impl<S> Service<http::Request<Body>> for UsageService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let Some(log) = layer
                .log
                .filter(|_| !req.uri().path().starts_with("/grpc."))
            else {
                return inner.call(req).await;
            };
            let started = Instant::now();
            let call = {
                let header = |name: &str| {
                    req.headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                };
                Call {
                    rpc: req.uri().path().to_string(),
                    http_method: header("x-envoy-original-method"),
                    http_path: header("x-envoy-original-path"),
                    user_agent: header("user-agent"),
                    client_ip: layer.trusted_proxies.of_request(&req),
                }
            };
            let request_bytes = Arc::new(AtomicU64::new(0));
            let request_failed = Arc::new(AtomicBool::new(false));
            let (parts, body) = req.into_parts();
            let counted = Body::new(MeteredBody {
                inner: body,
                bytes: request_bytes.clone(),
                failed: request_failed.clone(),
                pending: None,
            });
            let response = inner
                .call(http::Request::from_parts(parts, counted))
                .await?;
            let Some(identity) = response.extensions().get::<CallIdentity>().cloned() else {
                return Ok(response);
            };
            let (parts, body) = response.into_parts();
            // A trailers-only reply (every error) carries the status in its headers.
            let status = Status::from_header_map(&parts.headers);
            let pending = Pending {
                call,
                identity,
                started,
                request_bytes,
                request_failed,
                log,
                status,
            };
            let body = MeteredBody {
                inner: body,
                bytes: Arc::new(AtomicU64::new(0)),
                failed: Arc::new(AtomicBool::new(false)),
                pending: Some(pending),
            };
            Ok(http::Response::from_parts(parts, Body::new(body)))
        })
    }
}

struct Call {
    rpc: String,
    http_method: Option<String>,
    http_path: Option<String>,
    user_agent: Option<String>,
    client_ip: Option<std::net::IpAddr>,
}

/// What is known before the response body ends.
struct Pending {
    call: Call,
    identity: CallIdentity,
    started: Instant,
    request_bytes: Arc<AtomicU64>,
    /// Set when the request body ended in an error (the peer reset the stream).
    request_failed: Arc<AtomicBool>,
    log: RequestLog,
    status: Option<Status>,
}

impl Pending {
    fn finish(self, response_bytes: u64) {
        if self.request_failed.load(Ordering::Relaxed) {
            tracing::debug!(
                rpc = %self.call.rpc,
                "request stream reset by the peer; the client never saw this answer: not recorded"
            );
            return;
        }
        let (code, error_code) = match &self.status {
            None => (0, None),
            Some(s) => (
                s.code() as i16,
                s.get_error_details().error_info().map(|i| i.reason.clone()),
            ),
        };
        let mut record = RequestRecord::new(self.identity.tenant_id, self.call.rpc, code);
        record.api_key_id = self.identity.api_key_id;
        record.user_id = self.identity.user_id;
        record.http_method = self.call.http_method;
        record.http_path = self.call.http_path;
        record.error_code = error_code;
        record.latency_us = i32::try_from(self.started.elapsed().as_micros()).unwrap_or(i32::MAX);
        record.request_bytes =
            i32::try_from(self.request_bytes.load(Ordering::Relaxed)).unwrap_or(i32::MAX);
        record.response_bytes = i32::try_from(response_bytes).unwrap_or(i32::MAX);
        record.client_ip = self.call.client_ip;
        record.user_agent = self
            .call
            .user_agent
            .map(|ua| ua.chars().take(200).collect());
        record.cost = self.identity.cost;
        self.log.record(record);
    }
}

/// Passes a body through, counting its data bytes. For a response it also reads the final
/// status from the trailers and records the call when the body ends or is dropped
/// (cancelled calls too); for a request (`pending: None`) it only counts, for the handler
/// reads it before the response exists.
struct MeteredBody {
    inner: Body,
    bytes: Arc<AtomicU64>,
    /// Set when the inner body yields an error (for a request: the stream was reset).
    failed: Arc<AtomicBool>,
    pending: Option<Pending>,
}

impl http_body::Body for MeteredBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                } else if let (Some(trailers), Some(pending)) =
                    (frame.trailers_ref(), this.pending.as_mut())
                {
                    pending.status =
                        Status::from_header_map(trailers).filter(|s| s.code() != tonic::Code::Ok);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                this.failed.store(true, Ordering::Relaxed);
                this.finish();
            }
            Poll::Ready(None) => this.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl MeteredBody {
    fn finish(&mut self) {
        if let Some(pending) = self.pending.take() {
            pending.finish(self.bytes.load(Ordering::Relaxed));
        }
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        self.finish();
    }
}
