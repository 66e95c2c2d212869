//! Load generator for the API-key hot path (`ApiKeyService/VerifyApiKey` on the internal
//! listener), the webhook pipeline and generation creates, run against a local stack
//! (`deploy/local/run.sh`):
//!
//! ```text
//! cargo run --release --example loadgen -- verify --concurrency 64 --seconds 10
//! cargo run --release --example loadgen -- verify-cold --keys 1500
//! cargo run --release --example loadgen -- health      # the ceiling of `verify`
//! cargo run --release --example loadgen -- argon2      # the ceiling of `verify-cold`
//! cargo run --release --example loadgen -- webhooks --events 20000 --endpoints 10
//! cargo run --release --example loadgen -- webhooks --rate 1000 --seconds 20
//! cargo run --release --example loadgen -- rabbitmq    # the ceiling of `webhooks`
//! cargo run --release --example loadgen -- generate --concurrency 64 --seconds 10
//! ```
//!
//! `webhooks` and `rabbitmq` are described in their modules ([`webhooks`], [`rabbitmq`]);
//! the rest of this page is about the API-key scenarios.
//!
//! Setup mints an admin JWT for a tenant (a fresh random one per run unless `--tenant`),
//! signed with `DEVGATE_JWT_HS256_SECRET` (the environment, else `--env-file`), and creates
//! the keys it needs with `CreateApiKey` on the public listener. It fails with a non-zero
//! exit status when the stack cannot be reached or a key cannot be created.
//!
//! Scenarios:
//!
//! * `verify`: one key, verified once to warm the server's cache; then `--concurrency`
//!   tasks call `VerifyApiKey { token, required_scope: "usage:read" }` in a closed loop
//!   (each task sends its next call as soon as the previous answer arrives) for
//!   `--seconds`. Every call is a cache hit: this measures the per-call overhead of the
//!   gRPC stack, the auth layer and the cache lookup. Run it for longer than
//!   `DEVGATE_KEY_CACHE_TTL` (e.g. `--seconds 40` with the default 30 s) so an expiry falls
//!   inside: the entry is then re-validated by re-reading the row, without argon2 (count
//!   the server's `argon2id computation` debug lines of `devgate::api_keys::hashing`).
//! * `verify-cold`: `--keys` keys are created first (16 `CreateApiKey` calls in flight);
//!   then every call presents a token that was never verified, so each one misses the
//!   cache and pays the database lookup and an argon2id verification. The run ends when
//!   the keys are used up or `--seconds` have passed, whichever comes first.
//! * `authorize`: like `verify` with `consume = true`: the rate-limit script runs in Redis
//!   and the call is recorded in the key's usage. Baseline: `benches/redis_limit_baseline.sh`
//!   (redis-benchmark EVALSHA of the same script, same concurrency).
//! * `health`: the baseline of `verify`: `grpc.health.v1.Health/Check` on the same internal
//!   listener, same channels and concurrency: the server's transport with no work.
//! * `argon2`: the baseline of `verify-cold`: argon2id verifications through the server's
//!   own hasher (default parameters, one blocking thread per CPU) in this process; needs no
//!   stack.
//! * `generate`: `GenerationProxy/CreateGeneration` on the public listener with one API key
//!   (scopes `*`), a fresh `Idempotency-Key` per call, one `image` (`png`) each: the whole
//!   create transaction (idempotency record, credit debit and ledger entry, generation row,
//!   outbox job and `generation.queued` event). Setup puts the tenant on a plan no run can
//!   exhaust (SetPlan) and grants it [`GENERATE_CREDITS`] credits (GrantCredits), so no
//!   call is refused for credits or quota; an error is any call that did not create a
//!   generation. Baseline: `benches/pg_generation_baseline.sh` (pgbench running the same
//!   SQL transaction at the same concurrency).
//!
//! The callers share a few HTTP/2 connections (`--channels`, default
//! [`DEFAULT_CHANNELS`]; tonic multiplexes the calls of one channel over one connection).
//! The loadgen and the server share the machine's cores, so the numbers are a lower bound
//! for the server alone.
//!
//! Output: exactly one JSON line on stdout (progress and diagnostics go to stderr):
//!
//! ```text
//! {"scenario":"verify","rps":…,"p50_ms":…,"p99_ms":…,"errors":…,"calls":…,"concurrency":…,"seconds":…}
//! ```
//!
//! * `calls`: calls completed, errors included; `errors`: calls that failed at the gRPC
//!   level or answered `valid: false` (each call's token is valid, so both are failures).
//! * `rps`: `calls` divided by the measured wall time from the first call to the end of
//!   the last one (for `verify-cold` possibly shorter than `--seconds`).
//! * `p50_ms`, `p99_ms`: per-call latency percentiles (microsecond resolution, all tasks'
//!   histograms merged, errors included), from sending the request to the full answer.
//! * `concurrency`, `seconds`: the options the run was started with.

mod rabbitmq;
mod sink;
mod webhooks;

/// The load generator shares the machine's cores with the server it measures: mimalloc (as
/// in `devgate` itself) keeps its own allocation cost out of the way.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{
    fmt,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use clap::{Parser, Subcommand};
use devgate::api_keys::hashing::SecretHasher;
use devgate::proto::{
    internal::v1::{
        GrantCreditsRequest, SetPlanRequest, VerifyApiKeyRequest,
        api_key_service_client::ApiKeyServiceClient as InternalKeyClient,
        usage_service_client::UsageServiceClient,
    },
    v1::{
        CreateApiKeyRequest, CreateGenerationRequest, Environment, Plan, Quotas, RateLimits,
        api_key_service_client::ApiKeyServiceClient,
        generation_proxy_client::GenerationProxyClient,
    },
};
use futures_util::{StreamExt, TryStreamExt, stream};
use hdrhistogram::Histogram;
use tonic::{
    metadata::MetadataValue,
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use uuid::Uuid;

/// Every window's limit of the loadgen's keys (the most a key may have).
const KEY_LIMIT: u32 = 100_000_000;
/// A monthly quota no loadgen run can use up.
const QUOTA: i64 = 1_000_000_000_000;
/// The scope every verify call requires; keys are created with `*`, which grants it.
const REQUIRED_SCOPE: &str = "usage:read";
/// HTTP/2 connections when `--channels` is not given. Measured on a 2-core machine that
/// also runs the server (`verify`, concurrency 64): 1 connection ~15k rps (p99 ~45 ms),
/// 2 to 8 ~20-21k rps (4 the best by a hair), 16 ~16k, 64 ~11k; so a fixed few, not one
/// per N callers.
const DEFAULT_CHANNELS: usize = 4;
/// Credits granted before `generate`: 10⁸ image generations at the default price of 10, far
/// more than any run makes, and within one ledger entry's bound.
const GENERATE_CREDITS: i64 = 1_000_000_000;
/// What each `generate` call asks for: the default catalog's `image`, one `png`.
const GENERATE_KIND: &str = "image";
const GENERATE_FORMAT: &str = "png";
/// `CreateApiKey` calls in flight while preparing `verify-cold`.
const CREATE_CONCURRENCY: usize = 16;
/// A call that takes longer than this counts as an error (and cannot stall the run).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Histogram range: 1 µs to 60 s, 3 significant digits.
const MAX_LATENCY_US: u64 = 60_000_000;
/// How many distinct error messages the run prints to stderr.
const ERRORS_SHOWN: usize = 5;
const STACK_HINT: &str = "is the stack running? start deploy/local/run.sh";

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "Load generator for devgate's API-key hot path (VerifyApiKey), webhook pipeline and CreateGeneration"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    #[command(flatten)]
    opts: Opts,
}

/// The scenarios. A new one (e.g. `authorize`: VerifyApiKey with `consume = true`) is a
/// variant here, an arm in [`Scenario::name`] and one in [`run_scenario`].
#[derive(Subcommand, Clone, Copy)]
enum Scenario {
    /// Closed-loop VerifyApiKey of one warmed-up key: the cache-hit path.
    Verify,
    /// VerifyApiKey of a never-seen token per call: cache miss, database and argon2id.
    VerifyCold {
        /// How many keys to create beforehand; the run stops when they are used up.
        #[arg(long, default_value_t = 1500)]
        keys: usize,
    },
    /// VerifyApiKey with `consume = true` on one warmed-up key: verification, the Redis
    /// rate-limit script and the usage record, i.e. what a gateway pays per gated call.
    /// The key's own limits are set high enough that no call is refused.
    Authorize,
    /// Baseline of `verify`: closed-loop `grpc.health.v1.Health/Check` on the same internal
    /// listener. Same server, transport and auth layer, no work: the ceiling for `verify`.
    Health,
    /// Baseline of `verify-cold`: argon2id verifications in this process with the server's
    /// default parameters, on as many blocking threads as the server uses (one per CPU):
    /// the ceiling for a cold verification. Needs no stack.
    Argon2,
    /// Webhook deliveries end to end: events published with the internal PublishEvent
    /// (`--concurrency` in flight), delivered by devgate to `--endpoints` endpoints of a
    /// sink in this process that verifies every signature. Without `--rate`, `--events`
    /// as fast as they go (throughput); with `--rate`, that many events per second for
    /// `--seconds` (first-attempt latency at a steady load).
    Webhooks {
        /// Events to publish (ignored with --rate).
        #[arg(long, default_value_t = 20_000)]
        events: u64,
        /// Webhook endpoints created for the run (each event is delivered to every one).
        #[arg(long, default_value_t = 1)]
        endpoints: usize,
        /// Publish this many events per second for --seconds instead of --events at once.
        #[arg(long)]
        rate: Option<f64>,
        /// Stop waiting for deliveries when none arrived for this long; what has not
        /// arrived by then counts as lost. (A failed first attempt is retried after the
        /// schedule's first step, 1m by default.)
        #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
    /// Baseline of `webhooks`: lapin, persistent publishes with batched publisher confirms
    /// and a consumer acking each message, through one durable queue of its own (deleted
    /// at the end). Needs only RabbitMQ.
    Rabbitmq {
        /// Messages sent through the queue.
        #[arg(long, default_value_t = 100_000)]
        messages: u64,
        /// Body size in bytes (default: about an event message of the `webhooks` run).
        #[arg(long, default_value_t = 400)]
        size: usize,
        /// Publishes per confirm batch, and the consumer's prefetch (the relay's default
        /// batch size).
        #[arg(long, default_value_t = 500)]
        batch: u16,
    },
    /// Closed-loop CreateGeneration on the public listener with one key, a fresh
    /// Idempotency-Key per call; credits granted first. Baseline:
    /// benches/pg_generation_baseline.sh.
    Generate,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Verify => "verify",
            Scenario::VerifyCold { .. } => "verify-cold",
            Scenario::Authorize => "authorize",
            Scenario::Health => "health",
            Scenario::Argon2 => "argon2",
            Scenario::Webhooks { .. } => "webhooks",
            Scenario::Rabbitmq { .. } => "rabbitmq",
            Scenario::Generate => "generate",
        }
    }
}

#[derive(clap::Args)]
struct Opts {
    /// Concurrent callers (tasks), each in a closed loop.
    #[arg(long, global = true, default_value_t = 64)]
    concurrency: usize,
    /// How long to send calls.
    #[arg(long, global = true, default_value_t = 10)]
    seconds: u64,
    /// HTTP/2 connections the callers share [default: 4, at most --concurrency].
    #[arg(long, global = true)]
    channels: Option<usize>,
    /// devgate's public gRPC listener (key creation, CreateGeneration).
    #[arg(long, global = true, default_value = "http://127.0.0.1:50051")]
    public: String,
    /// devgate's internal gRPC listener (VerifyApiKey).
    #[arg(long, global = true, default_value = "http://127.0.0.1:50052")]
    internal: String,
    /// Where DEVGATE_JWT_HS256_SECRET is read when it is not in the environment.
    #[arg(long, global = true, default_value = "deploy/local/devgate.env")]
    env_file: PathBuf,
    /// The tenant whose keys are created (default: a fresh random UUID per run).
    #[arg(long, global = true)]
    tenant: Option<Uuid>,
}

/// Adds the internal caller's `authorization: Bearer <service token>` to every call.
#[derive(Clone)]
struct ServiceAuth(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for ServiceAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// The internal key service as the local stack's caller (DEVGATE_LOCAL_SERVICE_TOKEN).
type InternalKeys =
    InternalKeyClient<tonic::service::interceptor::InterceptedService<Channel, ServiceAuth>>;

fn service_auth(env_file: &Path) -> anyhow::Result<ServiceAuth> {
    let token = env_value(env_file, "DEVGATE_LOCAL_SERVICE_TOKEN")?;
    Ok(ServiceAuth(format!("Bearer {token}").parse().context(
        "the service token is not a valid metadata value",
    )?))
}

/// What the callers share in a run.
struct Run {
    channels: Vec<Channel>,
    concurrency: usize,
    deadline: Instant,
}

/// What the callers measured, merged.
struct Tally {
    histogram: Histogram<u64>,
    calls: u64,
    errors: u64,
    first_errors: Vec<String>,
}

impl Tally {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            histogram: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)?,
            calls: 0,
            errors: 0,
            first_errors: Vec::new(),
        })
    }

    fn record(&mut self, latency: Duration, outcome: Result<(), String>) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.histogram.saturating_record(us.max(1));
        self.calls += 1;
        if let Err(e) = outcome {
            self.errors += 1;
            self.note_error(e);
        }
    }

    fn note_error(&mut self, e: String) {
        if self.first_errors.len() < ERRORS_SHOWN && !self.first_errors.contains(&e) {
            self.first_errors.push(e);
        }
    }

    fn merge(&mut self, other: Tally) -> anyhow::Result<()> {
        self.histogram.add(&other.histogram)?;
        self.calls += other.calls;
        self.errors += other.errors;
        for e in other.first_errors {
            self.note_error(e);
        }
        Ok(())
    }
}

/// The one line on stdout.
#[derive(serde::Serialize)]
struct Report {
    scenario: &'static str,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    calls: u64,
    concurrency: usize,
    seconds: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let opts = &cli.opts;
    if opts.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let channels = opts
        .channels
        .unwrap_or(DEFAULT_CHANNELS)
        .clamp(1, opts.concurrency);
    // These two print their own line.
    match cli.scenario {
        Scenario::Rabbitmq {
            messages,
            size,
            batch,
        } => {
            let params = rabbitmq::Params {
                messages,
                size,
                batch,
            };
            return rabbitmq::run(params, &opts.env_file).await;
        }
        Scenario::Webhooks {
            events,
            endpoints,
            rate,
            wait,
        } => {
            let params = webhooks::Params {
                events,
                endpoints,
                rate,
                wait,
                channels,
            };
            return webhooks::run(params, opts).await;
        }
        _ => {}
    }
    eprintln!(
        "loadgen: {} concurrency={} channels={channels} seconds={}",
        cli.scenario.name(),
        opts.concurrency,
        opts.seconds
    );
    let (tally, elapsed) = run_scenario(cli.scenario, opts, channels).await?;

    let secs = elapsed.as_secs_f64();
    let rps = if secs > 0.0 {
        tally.calls as f64 / secs
    } else {
        0.0
    };
    let ms = |q: f64| {
        if tally.calls == 0 {
            0.0
        } else {
            round(tally.histogram.value_at_quantile(q) as f64 / 1000.0, 2)
        }
    };
    eprintln!(
        "loadgen: {} calls, {} errors in {secs:.2}s; p50 {} ms, p90 {} ms, p99 {} ms, max {} ms",
        tally.calls,
        tally.errors,
        ms(0.5),
        ms(0.9),
        ms(0.99),
        round(tally.histogram.max() as f64 / 1000.0, 2),
    );
    for e in &tally.first_errors {
        eprintln!("loadgen: error: {e}");
    }
    let report = Report {
        scenario: cli.scenario.name(),
        rps: round(rps, 1),
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        errors: tally.errors,
        calls: tally.calls,
        concurrency: opts.concurrency,
        seconds: opts.seconds,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Prepares and runs one scenario: the merged tally and the measured wall time.
async fn run_scenario(
    scenario: Scenario,
    opts: &Opts,
    channels: usize,
) -> anyhow::Result<(Tally, Duration)> {
    match scenario {
        Scenario::Argon2 => return argon2_baseline(opts).await,
        Scenario::Generate => return generate(opts, channels).await,
        _ => {}
    }
    let mut internal = Vec::with_capacity(channels);
    for _ in 0..channels {
        internal.push(connect(&opts.internal, "internal").await?);
    }
    let auth = match scenario {
        Scenario::Health => None,
        _ => Some(service_auth(&opts.env_file)?),
    };
    let keys = |channel: Channel| {
        InternalKeyClient::with_interceptor(channel, auth.clone().expect("a service token"))
    };
    let tokens: Vec<String> = match scenario {
        Scenario::Verify | Scenario::Authorize => {
            let (mut admin, bearer, tenant) = admin(opts).await?;
            // Before the key: its limits follow the tenant's, which only SetPlan raises.
            unlimited_plan(
                internal[0].clone(),
                auth.clone().expect("a service token"),
                tenant,
            )
            .await?;
            let token = create_key(&mut admin, &bearer).await?;
            verify(keys(internal[0].clone()), token.as_str().into(), false)
                .await
                .map_err(|e| anyhow!("warm-up VerifyApiKey failed: {e}"))?;
            vec![token]
        }
        Scenario::VerifyCold { keys } => {
            if keys == 0 {
                bail!("--keys must be at least 1");
            }
            let (admin, bearer, _) = admin(opts).await?;
            create_keys(&admin, &bearer, keys).await?
        }
        Scenario::Health | Scenario::Argon2 | Scenario::Generate => Vec::new(),
        Scenario::Webhooks { .. } | Scenario::Rabbitmq { .. } => unreachable!("handled in run"),
    };
    let start = Instant::now();
    let run = Arc::new(Run {
        channels: internal,
        concurrency: opts.concurrency,
        deadline: start + Duration::from_secs(opts.seconds),
    });
    let tally = match scenario {
        Scenario::Verify | Scenario::Authorize => {
            let consume = matches!(scenario, Scenario::Authorize);
            let token: Arc<str> = tokens.into_iter().next().expect("one key").into();
            spawn_callers(&run, |channel| {
                let (client, token) = (keys(channel), token.clone());
                move || Some(verify(client.clone(), token.clone(), consume))
            })
            .await?
        }
        Scenario::VerifyCold { .. } => {
            let tokens: Arc<[Arc<str>]> = tokens.into_iter().map(Arc::from).collect();
            let next = Arc::new(AtomicUsize::new(0));
            spawn_callers(&run, |channel| {
                let (client, tokens, next) = (keys(channel), tokens.clone(), next.clone());
                move || {
                    let token = tokens.get(next.fetch_add(1, Ordering::Relaxed))?.clone();
                    Some(verify(client.clone(), token, false))
                }
            })
            .await?
        }
        Scenario::Health => {
            spawn_callers(&run, |channel| {
                let client = HealthClient::new(channel);
                move || Some(health(client.clone()))
            })
            .await?
        }
        Scenario::Argon2
        | Scenario::Generate
        | Scenario::Webhooks { .. }
        | Scenario::Rabbitmq { .. } => {
            unreachable!("handled above")
        }
    };
    Ok((tally, start.elapsed()))
}

/// `generate`: the tenant on an unlimited plan with credits for the whole run, one key, then
/// `--concurrency` callers creating generations on the public listener.
async fn generate(opts: &Opts, channels: usize) -> anyhow::Result<(Tally, Duration)> {
    let internal = connect(&opts.internal, "internal").await?;
    let auth = service_auth(&opts.env_file)?;
    let (mut admin, bearer, tenant) = admin(opts).await?;
    unlimited_plan(internal.clone(), auth.clone(), tenant).await?;
    UsageServiceClient::with_interceptor(internal, auth)
        .grant_credits(GrantCreditsRequest {
            tenant_id: tenant.to_string(),
            amount: GENERATE_CREDITS,
            reason: "loadgen generate".into(),
            idempotency_id: format!("loadgen-generate-{tenant}"),
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow!("GrantCredits failed: {}", Status(&s)))?;
    let token: MetadataValue<tonic::metadata::Ascii> = create_key(&mut admin, &bearer)
        .await?
        .parse()
        .context("the key is not a valid metadata value")?;
    let mut public = Vec::with_capacity(channels);
    for _ in 0..channels {
        public.push(connect(&opts.public, "public").await?);
    }
    // One call outside the measurement: a stack that cannot create fails here, clearly.
    create_generation(GenerationProxyClient::new(public[0].clone()), token.clone())
        .await
        .map_err(|e| anyhow!("warm-up CreateGeneration failed: {e}"))?;
    let start = Instant::now();
    let run = Arc::new(Run {
        channels: public,
        concurrency: opts.concurrency,
        deadline: start + Duration::from_secs(opts.seconds),
    });
    let tally = spawn_callers(&run, |channel| {
        let (client, token) = (GenerationProxyClient::new(channel), token.clone());
        move || Some(create_generation(client.clone(), token.clone()))
    })
    .await?;
    Ok((tally, start.elapsed()))
}

/// One CreateGeneration with a fresh Idempotency-Key; `Err` unless it created one.
async fn create_generation(
    mut client: GenerationProxyClient<Channel>,
    key: MetadataValue<tonic::metadata::Ascii>,
) -> Result<(), String> {
    let mut request = tonic::Request::new(CreateGenerationRequest {
        kind: GENERATE_KIND.into(),
        prompt: "a lighthouse at dusk, loadgen".into(),
        output_format: GENERATE_FORMAT.into(),
        count: 1,
        ..Default::default()
    });
    let idempotency_key = Uuid::new_v4().simple().to_string();
    request.metadata_mut().insert("x-api-key", key);
    request.metadata_mut().insert(
        "idempotency-key",
        idempotency_key.parse().expect("hex is ASCII"),
    );
    match client.create_generation(request).await {
        Ok(response) if response.metadata().get("idempotent-replayed").is_some() => {
            Err("a fresh key was answered as a replay".to_string())
        }
        Ok(response) if response.get_ref().id.is_empty() => {
            Err("answered without a generation id".to_string())
        }
        Ok(_) => Ok(()),
        Err(status) => Err(Status(&status).to_string()),
    }
}

/// Puts the tenant on a plan so large (SetPlan, internal) that no call is ever refused: the
/// runs measure cost, not limits or quotas.
async fn unlimited_plan(internal: Channel, auth: ServiceAuth, tenant: Uuid) -> anyhow::Result<()> {
    UsageServiceClient::with_interceptor(internal, auth)
        .set_plan(SetPlanRequest {
            tenant_id: tenant.to_string(),
            plan: Plan::Enterprise.into(),
            rate_limits: Some(RateLimits {
                per_minute: KEY_LIMIT,
                per_hour: KEY_LIMIT,
                per_day: KEY_LIMIT,
                burst: KEY_LIMIT,
            }),
            quotas: Some(Quotas {
                monthly_requests: QUOTA,
                monthly_generations: QUOTA,
            }),
        })
        .await
        .map_err(|s| anyhow!("SetPlan failed: {}", Status(&s)))?;
    Ok(())
}

async fn admin(
    opts: &Opts,
) -> anyhow::Result<(
    ApiKeyServiceClient<Channel>,
    MetadataValue<tonic::metadata::Ascii>,
    Uuid,
)> {
    let (bearer, tenant) = admin_bearer(opts)?;
    Ok((
        ApiKeyServiceClient::new(connect(&opts.public, "public").await?),
        bearer,
        tenant,
    ))
}

/// An admin user's `authorization` value for the run's tenant (`--tenant`, else a fresh
/// one), and the tenant.
fn admin_bearer(opts: &Opts) -> anyhow::Result<(MetadataValue<tonic::metadata::Ascii>, Uuid)> {
    let tenant = opts.tenant.unwrap_or_else(Uuid::new_v4);
    let secret = env_value(&opts.env_file, "DEVGATE_JWT_HS256_SECRET")?;
    let jwt = devgate::auth::jwt::mint_hs256(
        &secret,
        tenant,
        "loadgen",
        &["admin".into()],
        Duration::from_secs(3600),
    )
    .context("cannot sign the admin JWT")?;
    let bearer = format!("Bearer {jwt}")
        .parse()
        .context("the JWT is not a valid metadata value")?;
    eprintln!("loadgen: tenant={tenant}");
    Ok((bearer, tenant))
}

/// Runs `run.concurrency` closed-loop callers until the deadline or until their call source
/// (`per_task(channel)` builds one per task) runs dry, and merges what they measured.
async fn spawn_callers<F, S, Fut>(run: &Arc<Run>, per_task: F) -> anyhow::Result<Tally>
where
    F: Fn(Channel) -> S,
    S: FnMut() -> Option<Fut> + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let mut tasks = Vec::with_capacity(run.concurrency);
    for task in 0..run.concurrency {
        let run = run.clone();
        let mut next_call = per_task(run.channels[task % run.channels.len()].clone());
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::new()?;
            while Instant::now() < run.deadline {
                let Some(call) = next_call() else { break };
                let sent = Instant::now();
                let outcome = call.await;
                tally.record(sent.elapsed(), outcome);
            }
            anyhow::Ok(tally)
        }));
    }
    let mut total = Tally::new()?;
    for task in tasks {
        total.merge(task.await.context("a caller task panicked")??)?;
    }
    Ok(total)
}

/// `--concurrency` tasks verifying one argon2id hash through the server's own hasher (same
/// parameters, same bounded blocking pool) for `--seconds`.
async fn argon2_baseline(opts: &Opts) -> anyhow::Result<(Tally, Duration)> {
    let defaults = devgate::Config::from_lookup(|_| None)
        .context("default configuration")?
        .api_keys;
    let hasher = Arc::new(SecretHasher::new(
        defaults.argon2,
        defaults.hash_concurrency,
    ));
    let phc: Arc<str> = hasher.hash("loadgen-baseline-secret").await?.into();
    let deadline = Instant::now() + Duration::from_secs(opts.seconds);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(opts.concurrency);
    for _ in 0..opts.concurrency {
        let (hasher, phc) = (hasher.clone(), phc.clone());
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::new()?;
            while Instant::now() < deadline {
                let sent = Instant::now();
                let outcome = match hasher.verify("loadgen-baseline-secret", &phc).await {
                    Ok(true) => Ok(()),
                    Ok(false) => Err("no match".to_string()),
                    Err(e) => Err(e.to_string()),
                };
                tally.record(sent.elapsed(), outcome);
            }
            anyhow::Ok(tally)
        }));
    }
    let mut total = Tally::new()?;
    for task in tasks {
        total.merge(task.await.context("a hashing task panicked")??)?;
    }
    Ok((total, start.elapsed()))
}

/// One Health/Check call of the whole server.
async fn health(mut client: HealthClient<Channel>) -> Result<(), String> {
    match client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
    {
        Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => Ok(()),
        Ok(r) => Err(format!("status {}", r.get_ref().status)),
        Err(status) => Err(Status(&status).to_string()),
    }
}

/// One VerifyApiKey call; `Err` says why it does not count as a success.
async fn verify(mut client: InternalKeys, token: Arc<str>, consume: bool) -> Result<(), String> {
    let request = VerifyApiKeyRequest {
        token: token.to_string(),
        required_scope: REQUIRED_SCOPE.to_string(),
        consume,
        ..Default::default()
    };
    match client.verify_api_key(request).await {
        Ok(response) => {
            let response = response.into_inner();
            if response.valid {
                Ok(())
            } else {
                Err(format!(
                    "valid=false, failure_reason={}",
                    response.failure_reason().as_str_name()
                ))
            }
        }
        Err(status) => Err(Status(&status).to_string()),
    }
}

/// Creates one key (scopes `*`, test environment) and returns its token.
async fn create_key(
    admin: &mut ApiKeyServiceClient<Channel>,
    bearer: &MetadataValue<tonic::metadata::Ascii>,
) -> anyhow::Result<String> {
    let mut request = tonic::Request::new(CreateApiKeyRequest {
        name: "loadgen".into(),
        scopes: vec!["*".into()],
        environment: Environment::Test.into(),
        // No own limits: the key follows its tenant's (see unlimited_plan).
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("authorization", bearer.clone());
    let response = admin
        .create_api_key(request)
        .await
        .map_err(|s| anyhow!("CreateApiKey failed: {}", Status(&s)))?
        .into_inner();
    if response.secret.is_empty() {
        bail!("CreateApiKey answered without a secret");
    }
    Ok(response.secret)
}

/// Creates `count` keys, [`CREATE_CONCURRENCY`] at a time, with progress on stderr.
async fn create_keys(
    admin: &ApiKeyServiceClient<Channel>,
    bearer: &MetadataValue<tonic::metadata::Ascii>,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    eprintln!("loadgen: creating {count} keys ({CREATE_CONCURRENCY} in flight)");
    let started = Instant::now();
    let step = (count / 10).max(1);
    let mut tokens = Vec::with_capacity(count);
    let mut created = stream::iter(0..count)
        .map(|_| {
            let mut admin = admin.clone();
            async move { create_key(&mut admin, bearer).await }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .into_stream();
    while let Some(token) = created.try_next().await? {
        tokens.push(token);
        if tokens.len() % step == 0 || tokens.len() == count {
            eprintln!(
                "loadgen: created {}/{count} keys ({:.1}s)",
                tokens.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(tokens)
}

/// Connects eagerly so that an unreachable stack fails the setup, not the run.
async fn connect(url: &str, which: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(url.to_string())
        .with_context(|| format!("--{which} {url:?} is not a valid URL"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(CALL_TIMEOUT)
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot connect to the {which} listener {url} ({STACK_HINT})"))
}

/// `name` from the environment, else from the env file (the local stack's dev values).
fn env_value(env_file: &Path, name: &str) -> anyhow::Result<String> {
    if let Ok(value) = std::env::var(name)
        && !value.is_empty()
    {
        return Ok(value);
    }
    let lines = dotenvy::from_path_iter(env_file).map_err(|e| {
        anyhow!(
            "{name} is not set and the env file {} cannot be read: {e}",
            env_file.display()
        )
    })?;
    env_file_value(lines, env_file, name)?
        .ok_or_else(|| anyhow!("{name} is neither set nor in {}", env_file.display()))
}

/// Like [`env_value`] for settings with a default: `None` when neither the environment
/// nor the env file (which may be missing) has it.
fn env_optional(env_file: &Path, name: &str) -> anyhow::Result<Option<String>> {
    if let Ok(value) = std::env::var(name)
        && !value.is_empty()
    {
        return Ok(Some(value));
    }
    match dotenvy::from_path_iter(env_file) {
        Ok(lines) => env_file_value(lines, env_file, name),
        Err(_) if !env_file.exists() => Ok(None),
        Err(e) => bail!("cannot read {}: {e}", env_file.display()),
    }
}

fn env_file_value<R: std::io::Read>(
    lines: dotenvy::Iter<R>,
    env_file: &Path,
    name: &str,
) -> anyhow::Result<Option<String>> {
    for line in lines {
        let (key, value) = line.with_context(|| format!("cannot parse {}", env_file.display()))?;
        if key == name && !value.is_empty() {
            return Ok(Some(value));
        }
    }
    Ok(None)
}

/// A gRPC status on one line: code and message (binary error details are left out).
struct Status<'a>(&'a tonic::Status);

impl fmt::Display for Status<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hint = match self.0.code() {
            tonic::Code::Unavailable => format!(" ({STACK_HINT})"),
            _ => String::new(),
        };
        write!(f, "{:?}: {}{hint}", self.0.code(), self.0.message())
    }
}

fn round(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}
