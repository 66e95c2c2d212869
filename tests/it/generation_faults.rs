//! `kill -9` of the worker while 500 generations run: the API runs in the test process, the
//! relay, results consumer and sweep in a real `devgate worker` process, the orchestrator in
//! the simulator process. After the restart every generation reaches a terminal state once
//! (one terminal event each), every failed one is refunded exactly once (one ledger entry
//! each), every succeeded one is metered once, and the balance is exact.

use std::{collections::HashMap, time::Duration};

use devgate::{app::Roles, proto::v1};
use diesel::{ExpressionMethods, QueryDsl};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures_util::{StreamExt, stream};
use uuid::Uuid;

use crate::{
    generations::{balance, events, grant, image, ledger},
    harness::{proxy::Proxy, upstream_sim::UpstreamSim, *},
};

const GENERATIONS: usize = 500;
/// Every FAIL_EVERY-th prompt fails.
const FAIL_EVERY: usize = 5;
const PRICE: i64 = 10;

/// (id, state) of the tenant's generations.
async fn states(conn: &mut AsyncPgConnection, tenant: Uuid) -> Vec<(Uuid, String)> {
    use devgate::db::schema::generations::dsl as g;
    g::generations
        .filter(g::tenant_id.eq(tenant))
        .select((g::id, g::state))
        .load(conn)
        .await
        .unwrap()
}

fn terminal(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "cancelled")
}

async fn wait_terminal(conn: &mut AsyncPgConnection, tenant: Uuid, n: usize, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let done = states(conn, tenant)
            .await
            .iter()
            .filter(|(_, s)| terminal(s))
            .count();
        if done >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {done} of {n} generations ended within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_faults_worker_killed_with_sigkill_ends_every_generation_once() {
    let w = World::with_roles(Roles::API, |s| {
        s.set("DEVGATE_DATABASE_POOL_SIZE", "16")
            .set("DEVGATE_DATABASE_CONNECT_TIMEOUT", "10s")
    })
    .await;
    let tenant = Uuid::new_v4();
    let prefix = w.app.settings.vars["DEVGATE_RABBITMQ_PREFIX"].clone();
    let _sim = UpstreamSim::start(
        &prefix,
        &[tenant],
        &["--job-duration", "400ms", "--progress-steps", "2"],
    )
    .await;
    let worker = WorkerProcess::spawn(&w.app.settings);
    let granted = PRICE * GENERATIONS as i64;
    grant(&w.app, tenant, granted).await;
    let token = admin_token(tenant);
    let channel = channel(w.app.public).await;

    let creating = {
        let (channel, token) = (channel.clone(), token.clone());
        tokio::spawn(async move {
            stream::iter(0..GENERATIONS)
                .map(|i| {
                    let mut c =
                        v1::generation_proxy_client::GenerationProxyClient::new(channel.clone());
                    let token = token.clone();
                    async move {
                        let mut req = image(1);
                        if i % FAIL_EVERY == 0 {
                            req.prompt = format!("generation {i} must fail");
                        }
                        c.create_generation(bearer(req, &token))
                            .await
                            .expect("create")
                            .into_inner()
                            .id
                    }
                })
                .buffer_unordered(16)
                .collect::<Vec<String>>()
                .await
        })
    };
    let mut conn = w.app.db().await;
    wait_terminal(&mut conn, tenant, 100, Duration::from_secs(120)).await;
    worker.kill9();
    let ended = states(&mut conn, tenant)
        .await
        .iter()
        .filter(|(_, s)| terminal(s))
        .count();
    assert!(ended < GENERATIONS, "the worker died with work in flight");
    eprintln!("worker killed with {ended} of {GENERATIONS} generations ended");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _worker = WorkerProcess::spawn(&w.app.settings);
    let created = creating.await.unwrap();
    assert_eq!(created.len(), GENERATIONS);
    wait_terminal(&mut conn, tenant, GENERATIONS, Duration::from_secs(240)).await;

    let all = states(&mut conn, tenant).await;
    assert_eq!(all.len(), GENERATIONS);
    let failed: Vec<Uuid> = all
        .iter()
        .filter(|(_, s)| s == "failed")
        .map(|(id, _)| *id)
        .collect();
    let succeeded = all.iter().filter(|(_, s)| s == "succeeded").count();
    assert_eq!(
        failed.len(),
        GENERATIONS / FAIL_EVERY,
        "the `fail` prompts, and only they"
    );
    assert_eq!(succeeded + failed.len(), GENERATIONS);

    // One refund per failed generation, none for the others; the balance is exact.
    let mut refunds: HashMap<String, usize> = HashMap::new();
    for (amount, reason, key) in ledger(&mut conn, tenant).await {
        if reason == "generation_refund" {
            assert_eq!(amount, PRICE);
            *refunds.entry(key.unwrap()).or_default() += 1;
        }
    }
    assert_eq!(refunds.len(), failed.len());
    for id in &failed {
        assert_eq!(
            refunds.get(&format!("generation-refund:{id}")),
            Some(&1),
            "{id}"
        );
    }
    assert_eq!(
        balance(&mut conn, tenant).await,
        granted - PRICE * succeeded as i64
    );

    // One terminal event per generation.
    let mut ends: HashMap<String, usize> = HashMap::new();
    for (t, payload) in events(&mut conn, tenant).await {
        if matches!(
            t.as_str(),
            "generation.completed" | "generation.failed" | "generation.cancelled"
        ) {
            *ends
                .entry(payload["generation_id"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    assert_eq!(ends.len(), GENERATIONS);
    assert!(ends.values().all(|n| *n == 1), "a generation ended twice");

    // One metered output per succeeded generation.
    use devgate::db::schema::metered_usage::dsl as m;
    let outputs: i64 = m::metered_usage
        .filter(m::tenant_id.eq(tenant))
        .filter(m::metric.eq("generation_outputs"))
        .count()
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(outputs, succeeded as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_faults_postgres_cut_under_the_consumer_requeues_and_loses_no_update() {
    let w = World::with_roles(Roles::API, |s| s).await;
    let tenant = Uuid::new_v4();
    let prefix = w.app.settings.vars["DEVGATE_RABBITMQ_PREFIX"].clone();
    // The worker reaches Postgres through a proxy the test cuts.
    let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let mut settings = w.app.settings.clone();
    let proxied =
        settings.vars["DEVGATE_DATABASE_URL"].replace("127.0.0.1:5432", &proxy.addr.to_string());
    settings = settings.set("DEVGATE_DATABASE_URL", &proxied);
    let _worker = WorkerProcess::spawn(&settings);
    // RUNNING at 0 s, 1 s and 2 s, SUCCEEDED at 3 s.
    let _sim = UpstreamSim::start(
        &prefix,
        &[tenant],
        &["--job-duration", "3s", "--progress-steps", "3"],
    )
    .await;
    grant(&w.app, tenant, 100).await;
    let token = admin_token(tenant);
    let id = v1::generation_proxy_client::GenerationProxyClient::new(channel(w.app.public).await)
        .create_generation(bearer(image(1), &token))
        .await
        .expect("create")
        .into_inner()
        .id;
    let id = Uuid::parse_str(&id).unwrap();
    let mut conn = w.app.db().await;
    use devgate::db::schema::generations::dsl as g;
    let row = async |conn: &mut AsyncPgConnection| -> (String, i64) {
        g::generations
            .filter(g::id.eq(id))
            .select((g::state, g::last_sequence))
            .first(conn)
            .await
            .unwrap()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while row(&mut conn).await.0 != "running" {
        assert!(tokio::time::Instant::now() < deadline, "never running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The rest of the updates arrive while the consumer cannot reach Postgres.
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        row(&mut conn).await.0,
        "running",
        "nothing applied while cut"
    );
    proxy.restore();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (state, last_sequence) = row(&mut conn).await;
        if state == "succeeded" {
            assert_eq!(
                last_sequence, 4,
                "the SUCCEEDED update was requeued, not lost"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{state} after the restore"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ends: Vec<String> = events(&mut conn, tenant)
        .await
        .into_iter()
        .map(|(t, _)| t)
        .filter(|t| t.starts_with("generation."))
        .collect();
    assert_eq!(
        ends,
        [
            "generation.queued",
            "generation.started",
            "generation.completed"
        ]
    );
    assert_eq!(balance(&mut conn, tenant).await, 90);
}
