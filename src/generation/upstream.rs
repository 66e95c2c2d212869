//! Clients of the platform's Asset and User/Team gRPC services (proto/upstream/): the reads
//! behind GetAsset, ListAssets, GetUser, GetTeam and ListTeamMembers.
//!
//! Another team runs these services, so every call is defended: a deadline on the whole
//! call (`DEVGATE_UPSTREAM_TIMEOUT`, retries included) so a stopped or black-holed upstream
//! never hangs a caller; retries with exponential backoff and full jitter on UNAVAILABLE
//! only (these reads are idempotent); a circuit breaker per upstream, so a dead service
//! costs callers nothing while it is down; request id, tenant, caller and W3C trace context
//! as metadata; and the tenant of every answer checked, because lookups by id are by id
//! alone (another tenant's object answers NOT_FOUND, exactly like an unknown id).

use std::{
    fmt,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use opentelemetry::propagation::{Injector, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::{
    Code, Request, Status,
    metadata::{MetadataMap, MetadataValue},
    transport::{Channel, Endpoint, Uri},
};
use tonic_types::StatusExt;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::{
    identity::TenantId,
    proto::upstream::{
        assets::v1::{
            Asset, GetAssetRequest, ListAssetsRequest, ListAssetsResponse,
            asset_service_client::AssetServiceClient,
        },
        users::v1::{
            GetTeamRequest, GetUserRequest, ListTeamMembersRequest, ListTeamMembersResponse, Team,
            User, user_team_service_client::UserTeamServiceClient,
        },
    },
    validation::Violations,
};

/// Metadata naming the tenant a call is made for.
pub const TENANT_HEADER: &str = "x-devgate-tenant";
/// Metadata naming who made the call: `api_key:<key id>` or `user:<user id>`.
pub const CALLER_HEADER: &str = "x-devgate-caller";
/// Metadata carrying the request id of the call that caused this one.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Attempts of one read, the first included (retries only on UNAVAILABLE, within the
/// deadline).
pub const MAX_ATTEMPTS: u32 = 3;
/// Backoff before the first retry; doubles each retry, with full jitter.
const BACKOFF_BASE: Duration = Duration::from_millis(50);
/// Longest backoff between two attempts.
const BACKOFF_CAP: Duration = Duration::from_millis(500);
/// Consecutive failed calls (UNAVAILABLE or deadline) that open an upstream's breaker.
pub const DEFAULT_BREAKER_FAILURES: u32 = 5;
/// How long an open breaker fails calls fast before it lets one probe through.
pub const DEFAULT_BREAKER_COOLDOWN: Duration = Duration::from_secs(10);

/// The `DEVGATE_ASSET_SERVICE_ADDR`, `DEVGATE_USER_TEAM_SERVICE_ADDR`,
/// `DEVGATE_UPSTREAM_TIMEOUT` and `DEVGATE_UPSTREAM_BREAKER_*` section, composed by
/// `crate::config`.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// `None`: not configured; the asset reads answer UNAVAILABLE.
    pub asset_service: Option<Uri>,
    /// `None`: not configured; the user and team reads answer UNAVAILABLE.
    pub user_team_service: Option<Uri>,
    /// Deadline of a whole call, retries included.
    pub timeout: Duration,
    /// Consecutive failed calls that open a breaker.
    pub breaker_failures: u32,
    /// How long an open breaker fails fast.
    pub breaker_cooldown: Duration,
}

impl UpstreamConfig {
    /// The configuration for these endpoints with the default breaker.
    pub fn new(
        asset_service: Option<Uri>,
        user_team_service: Option<Uri>,
        timeout: Duration,
    ) -> Self {
        Self {
            asset_service,
            user_team_service,
            timeout,
            breaker_failures: DEFAULT_BREAKER_FAILURES,
            breaker_cooldown: DEFAULT_BREAKER_COOLDOWN,
        }
    }
}

/// An endpoint address as configured: `http://host:port`, or a bare `host:port` (cleartext
/// h2c, as the contracts say). `https` is refused: no TLS client is configured for these.
pub fn parse_endpoint(value: &str) -> Result<Uri, String> {
    let value = value.trim();
    let with_scheme = if value.contains("://") {
        value.to_string()
    } else {
        format!("http://{value}")
    };
    let uri: Uri = with_scheme
        .parse()
        .map_err(|e| format!("expected http://host:port: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err("expected an http:// endpoint (cleartext h2c)".to_string());
    }
    if uri.host().is_none() || uri.port_u16().is_none() {
        return Err("expected http://host:port with a port".to_string());
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err("expected no path after host:port".to_string());
    }
    Ok(uri)
}

/// Which upstream service an error or a breaker is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Assets,
    UserTeam,
}

impl Service {
    pub fn as_str(self) -> &'static str {
        match self {
            Service::Assets => "asset service",
            Service::UserTeam => "user/team service",
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What can go wrong with an upstream read; mapped to a status in `crate::status`.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Unknown, or another tenant's (the same answer, so ids of other tenants leak nothing).
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    /// The upstream refused the request's arguments (a bad page token, ...).
    #[error("invalid request: {0}")]
    InvalidArgument(Violations),
    /// UNAVAILABLE on every attempt (down, refusing connections, or saying so).
    #[error("the {service} is unavailable: {cause}")]
    Unavailable { service: Service, cause: String },
    /// No answer within the deadline (`DEVGATE_UPSTREAM_TIMEOUT`).
    #[error("the {service} did not answer within {timeout:?}")]
    DeadlineExceeded { service: Service, timeout: Duration },
    /// The breaker is open: failed fast without calling.
    #[error("the {service} is failing; not called for another {retry_after:?}")]
    CircuitOpen {
        service: Service,
        retry_after: Duration,
    },
    /// No address configured for the service.
    #[error("the {0} is not configured")]
    NotConfigured(Service),
    /// Any other status: a bug on one side or the other.
    #[error("the {service} answered {rpc} with {}: {}", .status.code(), .status.message())]
    Unexpected {
        service: Service,
        rpc: &'static str,
        #[source]
        status: Status,
    },
    /// An answer naming a tenant that is not a UUID, or missing what the contract promises.
    #[error("the {service} answered {rpc} with an invalid message: {why}")]
    BadAnswer {
        service: Service,
        rpc: &'static str,
        why: String,
    },
}

impl UpstreamError {
    /// Whether the error says the upstream is unhealthy (what the breaker counts).
    fn is_failure(&self) -> bool {
        matches!(
            self,
            UpstreamError::Unavailable { .. } | UpstreamError::DeadlineExceeded { .. }
        )
    }
}

/// The reads devgate makes of the Asset and User/Team services. Cheap to clone: clones share
/// the channels and the breakers.
#[derive(Clone)]
pub struct UpstreamReads {
    assets: Option<Upstream<AssetServiceClient<Channel>>>,
    user_team: Option<Upstream<UserTeamServiceClient<Channel>>>,
    timeout: Duration,
}

/// One service: its client (over a lazily connected channel) and its breaker.
#[derive(Clone)]
struct Upstream<C> {
    service: Service,
    client: C,
    breaker: Arc<Breaker>,
}

impl UpstreamReads {
    /// Builds the clients. Channels connect on first use and reconnect by themselves, so
    /// devgate starts (and answers everything else) while an upstream is down.
    pub fn new(config: &UpstreamConfig) -> Self {
        let endpoint = |uri: &Uri| {
            Endpoint::from(uri.clone())
                .connect_timeout(config.timeout)
                .tcp_nodelay(true)
                .connect_lazy()
        };
        let breaker = || {
            Arc::new(Breaker::new(
                config.breaker_failures,
                config.breaker_cooldown,
            ))
        };
        Self {
            assets: config.asset_service.as_ref().map(|uri| Upstream {
                service: Service::Assets,
                client: AssetServiceClient::new(endpoint(uri)),
                breaker: breaker(),
            }),
            user_team: config.user_team_service.as_ref().map(|uri| Upstream {
                service: Service::UserTeam,
                client: UserTeamServiceClient::new(endpoint(uri)),
                breaker: breaker(),
            }),
            timeout: config.timeout,
        }
    }

    fn assets(&self) -> Result<&Upstream<AssetServiceClient<Channel>>, UpstreamError> {
        self.assets
            .as_ref()
            .ok_or(UpstreamError::NotConfigured(Service::Assets))
    }

    fn user_team(&self) -> Result<&Upstream<UserTeamServiceClient<Channel>>, UpstreamError> {
        self.user_team
            .as_ref()
            .ok_or(UpstreamError::NotConfigured(Service::UserTeam))
    }

    /// One asset of `tenant`'s; another tenant's is NOT_FOUND.
    pub async fn get_asset(
        &self,
        tenant: TenantId,
        caller: &str,
        request_id: &str,
        id: &str,
    ) -> Result<Asset, UpstreamError> {
        let up = self.assets()?;
        let message = GetAssetRequest {
            tenant_id: tenant.to_string(),
            asset_id: id.to_string(),
        };
        let meta = CallMeta::new(tenant, caller, request_id);
        let asset = self
            .call(
                up,
                &meta,
                "GetAsset",
                ("asset", id),
                message,
                |mut c, req| async move { c.get_asset(req).await },
            )
            .await?;
        check_owner(
            up.service,
            "GetAsset",
            tenant,
            &asset.tenant_id,
            "asset",
            id,
        )?;
        Ok(asset)
    }

    /// A page of `tenant`'s assets, newest first (`project_id` empty: every project's).
    /// Items of another tenant, which the contract rules out, are dropped and logged.
    pub async fn list_assets(
        &self,
        tenant: TenantId,
        caller: &str,
        request_id: &str,
        project_id: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<ListAssetsResponse, UpstreamError> {
        let up = self.assets()?;
        let message = ListAssetsRequest {
            tenant_id: tenant.to_string(),
            project_id: project_id.to_string(),
            page_size,
            page_token: page_token.to_string(),
        };
        let meta = CallMeta::new(tenant, caller, request_id);
        let mut page = self
            .call(
                up,
                &meta,
                "ListAssets",
                ("project", project_id),
                message,
                |mut c, req| async move { c.list_assets(req).await },
            )
            .await?;
        if parse_tenant(up.service, "ListAssets", &page.tenant_id)? != tenant {
            return Err(UpstreamError::BadAnswer {
                service: up.service,
                rpc: "ListAssets",
                why: "the page names another tenant than the request's".to_string(),
            });
        }
        let before = page.assets.len();
        let tenant_id = tenant.to_string();
        page.assets.retain(|a| a.tenant_id == tenant_id);
        if page.assets.len() != before {
            tracing::warn!(
                service = %up.service,
                dropped = before - page.assets.len(),
                "ListAssets returned assets of another tenant; dropped"
            );
        }
        Ok(page)
    }

    /// One user of `tenant`'s; another tenant's is NOT_FOUND.
    pub async fn get_user(
        &self,
        tenant: TenantId,
        caller: &str,
        request_id: &str,
        id: &str,
    ) -> Result<User, UpstreamError> {
        let up = self.user_team()?;
        let message = GetUserRequest {
            tenant_id: tenant.to_string(),
            user_id: id.to_string(),
        };
        let meta = CallMeta::new(tenant, caller, request_id);
        let user = self
            .call(
                up,
                &meta,
                "GetUser",
                ("user", id),
                message,
                |mut c, req| async move { c.get_user(req).await },
            )
            .await?;
        check_owner(up.service, "GetUser", tenant, &user.tenant_id, "user", id)?;
        Ok(user)
    }

    /// One team of `tenant`'s; another tenant's is NOT_FOUND.
    pub async fn get_team(
        &self,
        tenant: TenantId,
        caller: &str,
        request_id: &str,
        id: &str,
    ) -> Result<Team, UpstreamError> {
        let up = self.user_team()?;
        let message = GetTeamRequest {
            tenant_id: tenant.to_string(),
            team_id: id.to_string(),
        };
        let meta = CallMeta::new(tenant, caller, request_id);
        let team = self
            .call(
                up,
                &meta,
                "GetTeam",
                ("team", id),
                message,
                |mut c, req| async move { c.get_team(req).await },
            )
            .await?;
        check_owner(up.service, "GetTeam", tenant, &team.tenant_id, "team", id)?;
        Ok(team)
    }

    /// A page of the members of one of `tenant`'s teams; another tenant's team is NOT_FOUND.
    pub async fn list_team_members(
        &self,
        tenant: TenantId,
        caller: &str,
        request_id: &str,
        team_id: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<ListTeamMembersResponse, UpstreamError> {
        let up = self.user_team()?;
        let message = ListTeamMembersRequest {
            tenant_id: tenant.to_string(),
            team_id: team_id.to_string(),
            page_size,
            page_token: page_token.to_string(),
        };
        let meta = CallMeta::new(tenant, caller, request_id);
        let mut page = self
            .call(
                up,
                &meta,
                "ListTeamMembers",
                ("team", team_id),
                message,
                |mut c, req| async move { c.list_team_members(req).await },
            )
            .await?;
        check_owner(
            up.service,
            "ListTeamMembers",
            tenant,
            &page.tenant_id,
            "team",
            team_id,
        )?;
        let tenant_id = tenant.to_string();
        let before = page.members.len();
        page.members.retain(|m| m.tenant_id == tenant_id);
        if page.members.len() != before {
            tracing::warn!(
                service = %up.service,
                dropped = before - page.members.len(),
                "ListTeamMembers returned members of another tenant; dropped"
            );
        }
        Ok(page)
    }

    /// One read through the breaker, with retries, under one deadline for the whole call.
    /// `send` makes one attempt with the request it is given (metadata and timeout set);
    /// `target` (kind, id) names what a NOT_FOUND is about.
    async fn call<C, M, T, F, Fut>(
        &self,
        up: &Upstream<C>,
        meta: &CallMeta<'_>,
        rpc: &'static str,
        target: (&'static str, &str),
        message: M,
        send: F,
    ) -> Result<T, UpstreamError>
    where
        C: Clone,
        M: Clone,
        F: Fn(C, Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let permit = up.breaker.acquire(Instant::now()).map_err(|retry_after| {
            UpstreamError::CircuitOpen {
                service: up.service,
                retry_after,
            }
        })?;
        let span = tracing::info_span!("upstream", service = %up.service, rpc);
        let result = self
            .attempts(up, meta, rpc, target, &message, &send)
            .instrument(span)
            .await;
        match &result {
            Err(e) if e.is_failure() => {
                if permit.failure(Instant::now()) {
                    tracing::warn!(service = %up.service, cooldown = ?up.breaker.cooldown, error = %e, "circuit breaker opened: calls fail fast");
                }
            }
            _ => {
                if permit.success() {
                    tracing::info!(service = %up.service, "circuit breaker closed: the probe call succeeded");
                }
            }
        }
        result
    }

    async fn attempts<C, M, T, F, Fut>(
        &self,
        up: &Upstream<C>,
        meta: &CallMeta<'_>,
        rpc: &'static str,
        (kind, id): (&'static str, &str),
        message: &M,
        send: &F,
    ) -> Result<T, UpstreamError>
    where
        C: Clone,
        M: Clone,
        F: Fn(C, Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let timed_out = || UpstreamError::DeadlineExceeded {
            service: up.service,
            timeout: self.timeout,
        };
        let mut attempt = 1;
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                return Err(timed_out());
            }
            let mut request = Request::new(message.clone());
            request.set_timeout(remaining);
            meta.apply(request.metadata_mut());
            let status =
                match tokio::time::timeout_at(deadline, send(up.client.clone(), request)).await {
                    Err(_) => return Err(timed_out()),
                    Ok(Ok(response)) => return Ok(response.into_inner()),
                    Ok(Err(status)) => status,
                };
            match status.code() {
                Code::Unavailable => {}
                // A connection that broke under the call (the upstream was stopped): tonic
                // reports it as UNKNOWN with the transport error as its source, which a
                // status sent by the upstream never has. As retryable as UNAVAILABLE.
                Code::Unknown if std::error::Error::source(&status).is_some() => {}
                // The client side reports its own expired timeout as CANCELLED.
                Code::DeadlineExceeded => return Err(timed_out()),
                Code::Cancelled if tokio::time::Instant::now() >= deadline => {
                    return Err(timed_out());
                }
                // The upstream's own wording is not passed on.
                Code::NotFound => {
                    return Err(UpstreamError::NotFound {
                        kind,
                        id: id.to_string(),
                    });
                }
                Code::InvalidArgument => {
                    return Err(UpstreamError::InvalidArgument(violations_of(&status)));
                }
                _ => {
                    return Err(UpstreamError::Unexpected {
                        service: up.service,
                        rpc,
                        status,
                    });
                }
            }
            let backoff = backoff(attempt);
            if attempt >= MAX_ATTEMPTS || tokio::time::Instant::now() + backoff >= deadline {
                return Err(UpstreamError::Unavailable {
                    service: up.service,
                    cause: cause_of(&status),
                });
            }
            tracing::debug!(attempt, ?backoff, cause = %cause_of(&status), "upstream unavailable; retrying");
            tokio::time::sleep(backoff).await;
            attempt += 1;
        }
    }
}

/// A status's message with the transport error under it, if any (what an operator needs).
fn cause_of(status: &Status) -> String {
    let mut cause = status.message().to_string();
    let mut source = std::error::Error::source(status);
    while let Some(s) = source {
        cause.push_str(": ");
        cause.push_str(&s.to_string());
        source = s.source();
    }
    cause
}

fn parse_tenant(
    service: Service,
    rpc: &'static str,
    value: &str,
) -> Result<TenantId, UpstreamError> {
    value.parse().map_err(|_| UpstreamError::BadAnswer {
        service,
        rpc,
        why: format!("tenant_id {value:?} is not a UUID"),
    })
}

/// The tenant check every answer by id goes through.
fn check_owner(
    service: Service,
    rpc: &'static str,
    tenant: TenantId,
    owner: &str,
    kind: &'static str,
    id: &str,
) -> Result<(), UpstreamError> {
    if parse_tenant(service, rpc, owner)? == tenant {
        Ok(())
    } else {
        tracing::debug!(%service, rpc, kind, "answer owned by another tenant: not found");
        Err(UpstreamError::NotFound {
            kind,
            id: id.to_string(),
        })
    }
}

/// The upstream's field violations in devgate's field names: its `BadRequest` details if it
/// sent any, otherwise its message under the field it starts with.
fn violations_of(status: &Status) -> Violations {
    let rename = |field: &str| match field {
        "asset_id" | "user_id" | "team_id" => "id".to_string(),
        other => other.to_string(),
    };
    let mut violations = Violations::new();
    if let Some(br) = status.get_details_bad_request() {
        for v in br.field_violations {
            violations.add(rename(&v.field), v.description);
        }
    }
    if violations.is_empty() {
        let first = status.message().split_whitespace().next().unwrap_or("");
        let field = match first {
            "asset_id" | "user_id" | "team_id" | "page_token" | "page_size" | "project_id" => {
                rename(first)
            }
            _ => "request".to_string(),
        };
        violations.add(field, status.message());
    }
    violations
}

/// Backoff before retry number `attempt` (1-based): full jitter over an exponential cap.
fn backoff(attempt: u32) -> Duration {
    let cap = BACKOFF_BASE
        .saturating_mul(1 << attempt.saturating_sub(1).min(10))
        .min(BACKOFF_CAP);
    cap.mul_f64(fastrand::f64())
}

/// The metadata every call carries.
struct CallMeta<'a> {
    tenant: String,
    caller: &'a str,
    request_id: &'a str,
}

impl<'a> CallMeta<'a> {
    fn new(tenant: TenantId, caller: &'a str, request_id: &'a str) -> Self {
        Self {
            tenant: tenant.to_string(),
            caller,
            request_id,
        }
    }

    /// Sets tenant, caller, request id and the current span's W3C trace context. A value
    /// that cannot be a header (not visible ASCII) is left out rather than failing the read.
    fn apply(&self, metadata: &mut MetadataMap) {
        for (name, value) in [
            (TENANT_HEADER, self.tenant.as_str()),
            (CALLER_HEADER, self.caller),
            (REQUEST_ID_HEADER, self.request_id),
        ] {
            if value.is_empty() {
                continue;
            }
            match MetadataValue::try_from(value) {
                Ok(v) => {
                    metadata.insert(name, v);
                }
                Err(_) => tracing::debug!(header = name, "value is not a valid header; not sent"),
            }
        }
        let context = tracing::Span::current().context();
        TraceContextPropagator::new().inject_context(&context, &mut MetadataInjector(metadata));
    }
}

/// Lets the OpenTelemetry propagator write into gRPC metadata.
struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// A circuit breaker: closed → (`failures` consecutive failed calls) → open for `cooldown`,
/// failing fast → half-open: one probe call → closed on success, open again on failure.
/// Time is passed in, so the state machine is tested without sleeping.
#[derive(Debug)]
pub struct Breaker {
    failures: u32,
    cooldown: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// Leave to make one call; report its outcome with [`Permit::success`] or
/// [`Permit::failure`]. Dropped without one (the caller gave up), a probe's slot is freed.
#[derive(Debug)]
#[must_use]
pub struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    reported: bool,
}

impl Breaker {
    pub fn new(failures: u32, cooldown: Duration) -> Self {
        Self {
            failures: failures.max(1),
            cooldown,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a plain value: a panic elsewhere cannot leave it half-written.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Leave to call now, or how long until the next call may be tried.
    pub fn acquire(&self, now: Instant) -> Result<Permit<'_>, Duration> {
        let mut state = self.state();
        let probe = match *state {
            State::Closed { .. } => false,
            State::Open { until } if now < until => return Err(until - now),
            State::Open { .. } | State::HalfOpen { probing: false } => {
                *state = State::HalfOpen { probing: true };
                true
            }
            // A probe is out: its answer decides; come back after about one cooldown at most.
            State::HalfOpen { probing: true } => {
                return Err(self.cooldown.min(Duration::from_secs(1)));
            }
        };
        Ok(Permit {
            breaker: self,
            probe,
            reported: false,
        })
    }

    /// Whether calls are failed fast right now.
    pub fn is_open(&self, now: Instant) -> bool {
        matches!(*self.state(), State::Open { until } if now < until)
    }
}

impl Permit<'_> {
    /// The upstream answered (whatever the answer): it is healthy. True when this closed
    /// the breaker (a probe succeeded).
    pub fn success(mut self) -> bool {
        self.reported = true;
        let mut state = self.breaker.state();
        let was_closed = matches!(*state, State::Closed { .. });
        *state = State::Closed { failures: 0 };
        !was_closed
    }

    /// The upstream failed (unavailable or too slow). True when this opened the breaker.
    pub fn failure(mut self, now: Instant) -> bool {
        self.reported = true;
        let breaker = self.breaker;
        let mut state = breaker.state();
        let open = State::Open {
            until: now + breaker.cooldown,
        };
        let (next, opened) = match *state {
            _ if self.probe => (open, true),
            State::Closed { failures } if failures + 1 >= breaker.failures => (open, true),
            State::Closed { failures } => (
                State::Closed {
                    failures: failures + 1,
                },
                false,
            ),
            // Opened meanwhile by another call's failure: keep its cooldown.
            other => (other, false),
        };
        *state = next;
        opened
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.reported {
            let mut state = self.breaker.state();
            if *state == (State::HalfOpen { probing: true }) {
                *state = State::HalfOpen { probing: false };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOLDOWN: Duration = Duration::from_secs(10);

    #[test]
    fn opens_after_consecutive_failures_only() {
        let b = Breaker::new(3, COOLDOWN);
        let t0 = Instant::now();
        assert!(!b.acquire(t0).unwrap().failure(t0));
        assert!(!b.acquire(t0).unwrap().failure(t0));
        // A success in between resets the count.
        assert!(!b.acquire(t0).unwrap().success(), "it was closed already");
        b.acquire(t0).unwrap().failure(t0);
        b.acquire(t0).unwrap().failure(t0);
        assert!(!b.is_open(t0));
        assert!(
            b.acquire(t0).unwrap().failure(t0),
            "the third failure opens it"
        );
        assert!(b.is_open(t0));
        let wait = b.acquire(t0 + Duration::from_secs(4)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(6), "the remaining cooldown");
    }

    #[test]
    fn half_open_lets_one_probe_through_and_its_success_closes() {
        let b = Breaker::new(1, COOLDOWN);
        let t0 = Instant::now();
        b.acquire(t0).unwrap().failure(t0);
        let later = t0 + COOLDOWN;
        let probe = b.acquire(later).unwrap();
        assert!(b.acquire(later).is_err(), "one probe at a time");
        assert!(probe.success(), "the probe closes it");
        assert!(b.acquire(later).is_ok());
        assert!(b.acquire(later).is_ok());
    }

    #[test]
    fn a_failed_probe_opens_again_for_a_whole_cooldown() {
        let b = Breaker::new(2, COOLDOWN);
        let t0 = Instant::now();
        b.acquire(t0).unwrap().failure(t0);
        b.acquire(t0).unwrap().failure(t0);
        let t1 = t0 + COOLDOWN + Duration::from_secs(1);
        b.acquire(t1).unwrap().failure(t1);
        assert_eq!(b.acquire(t1).unwrap_err(), COOLDOWN);
    }

    #[test]
    fn an_abandoned_probe_frees_its_slot() {
        let b = Breaker::new(1, COOLDOWN);
        let t0 = Instant::now();
        b.acquire(t0).unwrap().failure(t0);
        let t1 = t0 + COOLDOWN;
        drop(b.acquire(t1).unwrap());
        b.acquire(t1).expect("another probe").success();
        assert!(!b.is_open(t1));
    }

    #[test]
    fn backoff_grows_and_stays_capped() {
        for attempt in 1..20 {
            let d = backoff(attempt);
            assert!(d <= BACKOFF_CAP, "{d:?}");
            assert!(
                d <= BACKOFF_BASE * 2u32.pow(attempt - 1),
                "{attempt}: {d:?}"
            );
        }
    }

    #[test]
    fn endpoints_parse_with_or_without_scheme() {
        assert_eq!(
            parse_endpoint("127.0.0.1:50061").unwrap().to_string(),
            "http://127.0.0.1:50061/"
        );
        assert!(parse_endpoint("http://assets.internal:8080").is_ok());
        assert!(parse_endpoint("https://assets.internal:8080").is_err());
        assert!(parse_endpoint("assets.internal").is_err());
        assert!(parse_endpoint("http://a:1/x").is_err());
    }

    #[test]
    fn invalid_arguments_name_devgate_fields() {
        let v = violations_of(&Status::invalid_argument("asset_id is required"));
        let f: Vec<_> = v.iter().collect();
        assert_eq!(f[0].field, "id");
        let v = violations_of(&Status::invalid_argument("bad token"));
        assert_eq!(v.iter().next().unwrap().field, "request");
    }
}
