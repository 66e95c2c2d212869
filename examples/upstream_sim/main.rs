//! `devgate-upstream-sim`: a stand-in for the platform services devgate is a client of, for
//! the local stack (deploy/local/run.sh starts it) and the integration tests (which run it
//! as a real process over real gRPC and RabbitMQ). Contracts: proto/upstream/.
//!
//! * `upstream.assets.v1.AssetService` on `--asset-addr` and `upstream.users.v1.UserTeamService`
//!   on `--user-team-addr` (each with grpc.health.v1 and reflection, so grpcurl works), with
//!   three users, two teams, two projects and five assets seeded for every `--seed-tenant`
//!   (default: the local stack's tenant `00000000-0000-0000-0000-000000000001`), and the
//!   assets its jobs produce. Ids are derived from the tenant id: the same on every start.
//! * the AI orchestrator (see orchestrator.rs): jobs from the jobs exchange, progress and
//!   results to devgate's updates queue, `fail` prompts FAILED, cancels honoured.
//!
//! ```text
//! cargo run --bin devgate-upstream-sim -- --env-file deploy/local/devgate.env --job-duration 10s
//! ```
//!
//! With `--env-file` (or the environment) it reads devgate's own settings, so it listens
//! where devgate dials and uses devgate's broker and names: DEVGATE_ASSET_SERVICE_ADDR,
//! DEVGATE_USER_TEAM_SERVICE_ADDR, DEVGATE_RABBITMQ_URL, DEVGATE_RABBITMQ_PREFIX,
//! DEVGATE_RABBITMQ_QUEUE_TYPE and DEVGATE_GENERATION_JOBS_EXCHANGE. Port 0 picks a free port.
//!
//! When both services listen and the orchestrator's queues are bound, it prints one JSON
//! line on stdout and nothing else there (logs go to stderr):
//!
//! ```text
//! {"asset_addr":"127.0.0.1:50061","user_team_addr":"127.0.0.1:50062","jobs_exchange":…,
//!  "updates_queue":…,"jobs_queue":…,"cancels_queue":…,"tenants":[{"tenant_id":…,
//!  "projects":{"brand":…,"launch":…},"users":{"alice":…,…},"teams":{…},"assets":[…]}]}
//! ```
//!
//! SIGINT/SIGTERM stop it; jobs in progress stay unacked, so RabbitMQ hands them to the next
//! start.

mod directory;
mod orchestrator;
mod services;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Parser;
use devgate::{
    mq::{Mq, MqConfig, QueueType},
    proto::upstream::{
        self, assets::v1::asset_service_server::AssetServiceServer, orchestrator::v1::routing,
        users::v1::user_team_service_server::UserTeamServiceServer,
    },
};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Server, server::Router};
use uuid::Uuid;

use crate::{
    directory::{Directory, Seed},
    orchestrator::{Options, Orchestrator},
    services::Api,
};

/// The tenant of the local stack's quick-start (README).
const LOCAL_TENANT: &str = "00000000-0000-0000-0000-000000000001";

#[derive(Parser, Debug)]
#[command(
    name = "devgate-upstream-sim",
    about = "Simulates the platform's AI orchestrator (RabbitMQ) and Asset and User/Team gRPC services for devgate's local stack and tests"
)]
struct Cli {
    /// Read KEY=value lines from this file first (variables already set win), e.g.
    /// deploy/local/devgate.env.
    #[arg(long)]
    env_file: Option<PathBuf>,
    /// Where the Asset service listens (`host:port` or `http://host:port`).
    #[arg(long, env = "DEVGATE_ASSET_SERVICE_ADDR", default_value = "127.0.0.1:50061", value_parser = listen_addr)]
    asset_addr: SocketAddr,
    /// Where the User/Team service listens (`host:port` or `http://host:port`).
    #[arg(long, env = "DEVGATE_USER_TEAM_SERVICE_ADDR", default_value = "127.0.0.1:50062", value_parser = listen_addr)]
    user_team_addr: SocketAddr,
    #[arg(
        long,
        env = "DEVGATE_RABBITMQ_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    rabbitmq_url: String,
    /// devgate's RabbitMQ prefix: the default jobs exchange and updates queue are named
    /// after it, and so are the simulator's own queues.
    #[arg(long, env = "DEVGATE_RABBITMQ_PREFIX", default_value = "devgate")]
    rabbitmq_prefix: String,
    /// `classic` or `quorum`: the type of the simulator's queues.
    #[arg(long, env = "DEVGATE_RABBITMQ_QUEUE_TYPE", default_value = "classic")]
    queue_type: QueueType,
    /// The jobs exchange (default `<prefix>.generation.jobs`).
    #[arg(long, env = "DEVGATE_GENERATION_JOBS_EXCHANGE")]
    jobs_exchange: Option<String>,
    /// How long a job runs before it succeeds.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    job_duration: Duration,
    /// RUNNING updates per job (at 0 % and after each step but the last).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=100))]
    progress_steps: u32,
    /// Publish every update twice.
    #[arg(long)]
    duplicate_updates: bool,
    /// After every update, publish the previous one again (a late, out-of-order update).
    #[arg(long)]
    out_of_order_updates: bool,
    /// Jobs run at once; more wait in the queue.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..))]
    max_jobs: u16,
    /// Every gRPC answer waits this long first (to exercise deadlines).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    rpc_delay: Duration,
    /// A tenant to seed users, teams, projects and assets for; repeatable.
    #[arg(long = "seed-tenant", default_value = LOCAL_TENANT)]
    seed_tenants: Vec<Uuid>,
    /// Produced and seeded assets have URLs under this base (nothing serves them).
    #[arg(long, default_value = "https://assets.sim.invalid")]
    asset_base_url: String,
    /// Log filter (tracing EnvFilter syntax); logs go to stderr.
    #[arg(long, env = "UPSTREAM_SIM_LOG", default_value = "info")]
    log: String,
}

/// `host:port`, or an `http://host:port` endpoint URI as devgate's configuration holds it.
fn listen_addr(value: &str) -> Result<SocketAddr, String> {
    let bare = value
        .strip_prefix("http://")
        .unwrap_or(value)
        .trim_end_matches('/');
    bare.parse()
        .map_err(|e| format!("expected host:port or http://host:port with an IP host: {e}"))
}

/// The ready line.
#[derive(Serialize)]
struct Ready<'a> {
    asset_addr: SocketAddr,
    user_team_addr: SocketAddr,
    jobs_exchange: &'a str,
    updates_queue: &'a str,
    jobs_queue: &'a str,
    cancels_queue: &'a str,
    tenants: &'a [Seed],
}

#[tokio::main]
async fn main() -> ExitCode {
    // Parsed once for --env-file, then again so the file's variables fill the defaults.
    if let Some(path) = Cli::parse().env_file
        && let Err(e) = dotenvy::from_path(&path)
    {
        eprintln!("devgate-upstream-sim: {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("devgate-upstream-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    tokio::spawn(stop_on_signal(stop.clone()));

    let directory = Arc::new(Directory::seeded(&cli.seed_tenants, &cli.asset_base_url));
    let api = Api::new(directory.clone(), cli.rpc_delay);
    let asset_listener = TcpListener::bind(cli.asset_addr)
        .await
        .with_context(|| format!("binding the Asset service to {}", cli.asset_addr))?;
    let user_team_listener = TcpListener::bind(cli.user_team_addr)
        .await
        .with_context(|| format!("binding the User/Team service to {}", cli.user_team_addr))?;
    let asset_addr = asset_listener.local_addr()?;
    let user_team_addr = user_team_listener.local_addr()?;

    let prefix = cli.rabbitmq_prefix;
    let options = Options {
        jobs_exchange: cli
            .jobs_exchange
            .unwrap_or_else(|| routing::default_jobs_exchange(&prefix)),
        updates_queue: routing::updates_queue(&prefix),
        jobs_queue: format!("{prefix}.upstream-sim.jobs"),
        cancels_queue: format!("{prefix}.upstream-sim.cancels"),
        job_duration: cli.job_duration,
        progress_steps: cli.progress_steps,
        duplicate_updates: cli.duplicate_updates,
        out_of_order_updates: cli.out_of_order_updates,
        max_jobs: cli.max_jobs,
    };
    let mq = Mq::new(MqConfig {
        url: cli.rabbitmq_url.into(),
        queue_type: cli.queue_type,
        prefix: prefix.clone(),
    });
    let orchestrator =
        Orchestrator::new(mq.clone(), options.clone(), directory.clone(), stop.clone());

    let mut servers = tokio::task::JoinSet::new();
    servers.spawn(
        router("upstream.assets.v1.AssetService")
            .await
            .add_service(AssetServiceServer::new(api.clone()))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(asset_listener),
                stop.clone().cancelled_owned(),
            ),
    );
    servers.spawn(
        router("upstream.users.v1.UserTeamService")
            .await
            .add_service(UserTeamServiceServer::new(api))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(user_team_listener),
                stop.clone().cancelled_owned(),
            ),
    );

    if !orchestrator.declare_topology().await {
        return Ok(()); // Stopped while waiting for RabbitMQ.
    }
    let consumers = [
        tokio::spawn(orchestrator.clone().run_jobs()),
        tokio::spawn(orchestrator.clone().run_cancels()),
    ];

    let ready = Ready {
        asset_addr,
        user_team_addr,
        jobs_exchange: &options.jobs_exchange,
        updates_queue: &options.updates_queue,
        jobs_queue: &options.jobs_queue,
        cancels_queue: &options.cancels_queue,
        tenants: directory.seeds(),
    };
    println!("{}", serde_json::to_string(&ready)?);
    tracing::info!(%asset_addr, %user_team_addr, jobs_exchange = %options.jobs_exchange, updates_queue = %options.updates_queue, "upstream simulator ready");

    // Runs until a signal, or until a server fails.
    let failed = tokio::select! {
        _ = stop.cancelled() => None,
        Some(result) = servers.join_next() => Some(result),
    };
    stop.cancel();
    for consumer in consumers {
        let _ = consumer.await;
    }
    mq.reset().await;
    match failed {
        Some(Ok(Err(e))) => Err(e).context("a gRPC server failed"),
        Some(Err(e)) => Err(e).context("a gRPC server panicked"),
        _ => Ok(()),
    }
}

/// A server for one service: grpc.health.v1 (SERVING) and reflection (v1 and v1alpha, for
/// grpcurl 1.8) listing `name`; the caller adds the service itself.
async fn router(name: &'static str) -> Router {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(name, tonic_health::ServingStatus::Serving)
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(upstream::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(name)
            .with_service_name("grpc.health.v1.Health")
    };
    Server::builder()
        .add_service(health)
        .add_service(
            reflection()
                .build_v1()
                .expect("the embedded descriptor set is valid"),
        )
        .add_service(
            reflection()
                .build_v1alpha()
                .expect("the embedded descriptor set is valid"),
        )
}

async fn stop_on_signal(stop: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping");
    stop.cancel();
}
