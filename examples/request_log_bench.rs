//! The request log's INSERT alone, to measure what the writer can store: `--concurrency`
//! connections (the server's writer uses one) each inserting batches of `--batch` records
//! like the ones an `authorize` call makes (operation, key id, service caller, cost 1) with
//! the writer's own insert (`usage::store::insert`), for `--seconds`, into
//! `DEVGATE_DATABASE_URL` (migrated), under a fresh random tenant. Needs Postgres only.
//!
//! ```text
//! DEVGATE_DATABASE_URL=postgres://postgres@127.0.0.1:5432/devgate_bench \
//!     cargo run --release --example request_log_bench -- --batch 500 --seconds 20
//! ```
//!
//! Output: one JSON line on stdout,
//! `{"rows_per_s":…,"client_cpu_us_per_row":…,"server_cpu_us_per_row":…,"inserts":…,"insert_p50_ms":…,"insert_p99_ms":…,"errors":…,"batch":…,"concurrency":…}`.
//!
//! On a shared machine rows/s follows whatever else runs; the CPU figures do much less:
//! `client_cpu_us_per_row` is this process's CPU time spent inside the inserts (building
//! the statement, serializing; exact at `--concurrency 1`: the runtime has one thread), and
//! `server_cpu_us_per_row` the Postgres backends' CPU time over the run (parse, plan,
//! execute, WAL), both from Linux's `/proc/…/schedstat` (absent elsewhere or when Postgres
//! is not on this machine).

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use diesel::{QueryableByName, sql_types::Integer};
use diesel_async::RunQueryDsl;

use anyhow::{Context, anyhow, bail};
use clap::Parser;
use devgate::{
    identity::TenantId,
    usage::{RequestRecord, store},
};
use uuid::Uuid;

/// What a consuming VerifyApiKey without an operation is recorded under.
const AUTHORIZE_OPERATION: &str = "/devgate.internal.v1.ApiKeyService/VerifyApiKey";

#[derive(Parser)]
#[command(
    name = "request_log_bench",
    about = "Rows per second of the request log's INSERT"
)]
struct Cli {
    /// Rows per INSERT (DEVGATE_USAGE_BATCH_SIZE's default).
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// INSERTs in flight, each on its own connection (the server writes with one).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// How long to insert.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The database (migrated with `devgate migrate`).
    #[arg(long, env = "DEVGATE_DATABASE_URL")]
    database_url: String,
}

#[derive(serde::Serialize)]
struct Report {
    rows_per_s: f64,
    client_cpu_us_per_row: Option<f64>,
    server_cpu_us_per_row: Option<f64>,
    inserts: usize,
    insert_p50_ms: f64,
    insert_p99_ms: f64,
    errors: usize,
    batch: usize,
    concurrency: usize,
}

#[derive(QueryableByName)]
struct BackendPid {
    #[diesel(sql_type = Integer)]
    pid: i32,
}

/// CPU time a thread or process has run, in ns (`/proc/<path>/schedstat`'s first field).
fn cpu_ns(path: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{path}/schedstat"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// This thread's CPU time in ns. The kernel brings a running thread's figure up to date
/// only at scheduler events; `sched_yield` is one (it accounts the caller's time first).
fn thread_cpu_ns() -> Option<u64> {
    std::thread::yield_now();
    cpu_ns("thread-self")
}

/// What one connection measured.
struct Measured {
    latencies: Vec<Duration>,
    errors: usize,
    client_ns: Option<u64>,
    server_ns: Option<u64>,
}

// One thread: the client CPU measured around an insert is that insert's.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("request_log_bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.batch == 0 || cli.concurrency == 0 {
        bail!("--batch and --concurrency must be at least 1");
    }
    let pool_size = cli.concurrency.to_string();
    let config = devgate::Config::from_lookup(|k| match k {
        "DEVGATE_DATABASE_URL" => Some(cli.database_url.clone()),
        "DEVGATE_DATABASE_POOL_SIZE" => Some(pool_size.clone()),
        _ => None,
    })
    .context("database configuration")?;
    let pool = devgate::db::pool(&config.database);
    let tenant = TenantId(Uuid::new_v4());
    eprintln!("request_log_bench: tenant={tenant}");
    let batch = cli.batch;
    let deadline = Instant::now() + Duration::from_secs(cli.seconds);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(cli.concurrency);
    for _ in 0..cli.concurrency {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = pool
                .get_owned()
                .await
                .map_err(|e| anyhow!("cannot connect to Postgres: {e}"))?;
            let backend: Option<BackendPid> = diesel::sql_query("SELECT pg_backend_pid() AS pid")
                .get_result(&mut *conn)
                .await
                .ok();
            let backend = backend.map(|b| b.pid.to_string());
            let server_before = backend.as_deref().and_then(cpu_ns);
            let mut client_ns = Some(0u64);
            let mut latencies = Vec::new();
            let mut errors = 0;
            while Instant::now() < deadline {
                // Built outside the timed part: the server's records already exist.
                let records: Vec<RequestRecord> = (0..batch)
                    .map(|_| {
                        let mut r = RequestRecord::new(tenant, AUTHORIZE_OPERATION, 0);
                        r.api_key_id = Some("loadgen00001".into());
                        r.service_caller = Some("local-dev".into());
                        r.cost = 1;
                        r
                    })
                    .collect();
                let sent = Instant::now();
                let cpu_before = thread_cpu_ns();
                let inserted = store::insert(&mut conn, &records).await;
                client_ns = match (client_ns, cpu_before, thread_cpu_ns()) {
                    (Some(sum), Some(a), Some(b)) => Some(sum + b.saturating_sub(a)),
                    _ => None,
                };
                match inserted {
                    Ok(n) if n == batch => latencies.push(sent.elapsed()),
                    Ok(n) => {
                        errors += 1;
                        eprintln!("request_log_bench: {n} of {batch} rows inserted");
                    }
                    Err(e) => {
                        errors += 1;
                        eprintln!("request_log_bench: insert failed: {e}");
                    }
                }
            }
            let server_ns = match (server_before, backend.as_deref().and_then(cpu_ns)) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a)),
                _ => None,
            };
            anyhow::Ok(Measured {
                latencies,
                errors,
                client_ns,
                server_ns,
            })
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    let (mut client_ns, mut server_ns) = (Some(0u64), Some(0u64));
    for task in tasks {
        let m = task.await.context("an insert task panicked")??;
        latencies.extend(m.latencies);
        errors += m.errors;
        client_ns = client_ns.zip(m.client_ns).map(|(a, b)| a + b);
        server_ns = server_ns.zip(m.server_ns).map(|(a, b)| a + b);
    }
    let rows = (latencies.len() * batch) as f64;
    let per_row = |ns: Option<u64>| {
        ns.filter(|_| rows > 0.0)
            .map(|ns| round(ns as f64 / 1000.0 / rows))
    };
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort();
    let ms = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| round(d.as_secs_f64() * 1000.0))
    };
    let report = Report {
        rows_per_s: (rows / elapsed).round(),
        client_cpu_us_per_row: per_row(client_ns),
        server_cpu_us_per_row: per_row(server_ns),
        inserts: latencies.len(),
        insert_p50_ms: ms(0.5),
        insert_p99_ms: ms(0.99),
        errors,
        batch,
        concurrency: cli.concurrency,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
