//! The results consumer and the timeout sweep (issue 8 §3, §6), against the real upstream
//! simulator process and RabbitMQ: a generation runs to SUCCEEDED with its assets and metered
//! usage, and a webhook endpoint receives generation.queued/started/completed (verified with
//! the Standard Webhooks library); a failing prompt is refunded exactly once even when the
//! orchestrator sends every update twice and late; updates the test publishes itself
//! (duplicates, out of order, backwards, after the end, another tenant's, malformed) change
//! nothing; the timeout sweep fails and refunds a generation nobody answers, once, and tells
//! the orchestrator to stop; WatchGeneration (gRPC, and `curl -N` through Envoy) streams to
//! completion while a separate `devgate worker` process consumes the updates.

use std::{process::Stdio, time::Duration};

use devgate::{
    app::Roles,
    events::Catalog,
    proto::{
        upstream::{
            assets::v1::GetAssetRequest,
            orchestrator::v1::{
                GenerationCancel, GenerationError, GenerationState, GenerationUpdate,
                GenerationUsage, routing,
            },
        },
        v1::{self, generation_proxy_client::GenerationProxyClient},
    },
};
use diesel::{ExpressionMethods, QueryDsl};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use lapin::{
    BasicProperties,
    options::{BasicPublishOptions, QueueDeclareOptions},
};
use prost::{Message, Name};
use serde_json::{Value, json};
use tonic::transport::Channel;
use uuid::Uuid;

use crate::{
    generations::{Jobs, balance, client, events, grant, image, ledger},
    harness::{envoy::Edge, receiver::Receiver, upstream_sim::UpstreamSim, *},
};

/// How long a test waits for a state that must come.
const WITHIN: Duration = Duration::from_secs(60);

fn rabbitmq_prefix(app: &TestApp) -> String {
    app.settings.vars["DEVGATE_RABBITMQ_PREFIX"].clone()
}

/// The simulator under the instance's RabbitMQ prefix, seeding `tenant`.
async fn sim(app: &TestApp, tenant: Uuid, args: &[&str]) -> UpstreamSim {
    UpstreamSim::start(&rabbitmq_prefix(app), &[tenant], args).await
}

fn failing(count: i32) -> v1::CreateGenerationRequest {
    v1::CreateGenerationRequest {
        prompt: "this one should FAIL halfway".into(),
        ..image(count)
    }
}

async fn get(c: &mut GenerationProxyClient<Channel>, token: &str, id: &str) -> v1::Generation {
    c.get_generation(bearer(v1::GetGenerationRequest { id: id.into() }, token))
        .await
        .expect("get generation")
        .into_inner()
}

/// Polls GetGeneration until the generation is in `state`.
async fn wait_state(
    c: &mut GenerationProxyClient<Channel>,
    token: &str,
    id: &str,
    state: v1::GenerationState,
) -> v1::Generation {
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        let g = get(c, token, id).await;
        if g.state == state as i32 {
            return g;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "generation {id} not {state:?} within {WITHIN:?}: {g:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// (state, progress, last_sequence, refunded, error_code) as stored.
type Row = (String, i32, i64, bool, Option<String>);

async fn row(conn: &mut AsyncPgConnection, id: &str) -> Row {
    use devgate::db::schema::generations::dsl as g;
    g::generations
        .filter(g::id.eq(Uuid::parse_str(id).unwrap()))
        .select((
            g::state,
            g::progress,
            g::last_sequence,
            g::refunded,
            g::error_code,
        ))
        .first(conn)
        .await
        .unwrap()
}

async fn wait_row(conn: &mut AsyncPgConnection, id: &str, check: impl Fn(&Row) -> bool) -> Row {
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        let r = row(conn, id).await;
        if check(&r) {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "generation {id}: {r:?} within {WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// (metric, quantity, api_key_id, idempotency_id) of the tenant's metered usage.
async fn metered(
    conn: &mut AsyncPgConnection,
    tenant: Uuid,
) -> Vec<(String, i64, Option<String>, String)> {
    use devgate::db::schema::metered_usage::dsl as m;
    m::metered_usage
        .filter(m::tenant_id.eq(tenant))
        .order(m::metric.asc())
        .select((m::metric, m::quantity, m::api_key_id, m::idempotency_id))
        .load(conn)
        .await
        .unwrap()
}

/// The tenant's refunds of generation `id` in the ledger.
async fn refunds_of(conn: &mut AsyncPgConnection, tenant: Uuid, id: &str) -> Vec<i64> {
    ledger(conn, tenant)
        .await
        .into_iter()
        .filter(|(_, reason, key)| {
            reason == "generation_refund"
                && key.as_deref() == Some(format!("generation-refund:{id}").as_str())
        })
        .map(|(amount, _, _)| amount)
        .collect()
}

/// The tenant's `generation.*` events of generation `id`, oldest first, each checked
/// against its catalog schema.
async fn generation_events(
    conn: &mut AsyncPgConnection,
    tenant: Uuid,
    id: &str,
) -> Vec<(String, Value)> {
    let catalog = Catalog::load(conn).await.unwrap();
    let list: Vec<_> = events(conn, tenant)
        .await
        .into_iter()
        .filter(|(t, p)| t.starts_with("generation.") && p["generation_id"] == json!(id))
        .collect();
    for (t, payload) in &list {
        catalog
            .validate(t, payload)
            .unwrap_or_else(|e| panic!("{t} fits its schema: {e}: {payload}"));
    }
    list
}

fn types(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(t, _)| t.as_str()).collect()
}

/// Messages on `queue` that RabbitMQ still holds, ready or delivered and not yet acked
/// (the consumer acks after its commit), as `rabbitmqctl list_queues` counts them.
fn queue_messages(queue: &str) -> Option<u64> {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages",
        ])
        .stderr(Stdio::null())
        .output()
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut parts = l.split_whitespace();
        (parts.next() == Some(queue)).then(|| parts.next()?.parse().ok())?
    })
}

/// Waits until every message published to `queue` so far has been consumed and acked.
async fn wait_settled(queue: &str) {
    let queue = queue.to_string();
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        let q = queue.clone();
        let left = tokio::task::spawn_blocking(move || queue_messages(&q))
            .await
            .unwrap();
        if left == Some(0) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{queue} still holds {left:?} messages"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The orchestrator's side of the updates queue, played by the test.
struct Orchestrator {
    channel: lapin::Channel,
    queue: String,
}

impl Orchestrator {
    /// Declares devgate's updates queue as the consumer does (idempotent), so nothing the
    /// test publishes is lost before the consumer has declared it.
    async fn connect(app: &TestApp) -> Orchestrator {
        let mq = app.mq();
        let queue = routing::updates_queue(&mq.config().prefix);
        let channel = mq
            .confirm_channel()
            .await
            .expect("RabbitMQ at 127.0.0.1:5672");
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                mq.config().queue_type.arguments(),
            )
            .await
            .unwrap();
        mq.note_queue(&queue);
        Orchestrator { channel, queue }
    }

    /// Publishes `body` as the orchestrator does (persistent, mandatory, confirmed).
    async fn publish_raw(&self, body: &[u8], kind: &str) {
        let properties = BasicProperties::default()
            .with_content_type(routing::CONTENT_TYPE.into())
            .with_type(kind.into())
            .with_delivery_mode(2);
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await
            .unwrap();
        devgate::mq::Mq::confirmed(confirm, "update")
            .await
            .expect("the updates queue took it");
    }

    async fn publish(&self, update: &GenerationUpdate) {
        self.publish_raw(&update.encode_to_vec(), &GenerationUpdate::full_name())
            .await
    }
}

fn update(
    id: &str,
    tenant: Uuid,
    sequence: u64,
    state: GenerationState,
    progress: u32,
) -> GenerationUpdate {
    let mut u = GenerationUpdate {
        generation_id: id.into(),
        tenant_id: tenant.to_string(),
        sequence,
        progress,
        ..GenerationUpdate::default()
    };
    u.set_state(state);
    u
}

fn failed(id: &str, tenant: Uuid, sequence: u64) -> GenerationUpdate {
    GenerationUpdate {
        error: Some(GenerationError {
            code: "CONTENT_POLICY".into(),
            message: "the prompt was refused".into(),
        }),
        ..update(id, tenant, sequence, GenerationState::Failed, 60)
    }
}

fn succeeded(id: &str, tenant: Uuid, sequence: u64) -> GenerationUpdate {
    let asset = Uuid::new_v4();
    GenerationUpdate {
        asset_ids: vec![asset.to_string()],
        result_urls: vec![format!("https://assets.example/{asset}.png")],
        usage: Some(GenerationUsage {
            seconds: 7,
            outputs: 1,
        }),
        ..update(id, tenant, sequence, GenerationState::Succeeded, 100)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_updates_success_stores_assets_meters_usage_and_webhooks_the_events() {
    let w = World::with(|s| s.set("DEVGATE_WEBHOOK_ALLOWED_CIDRS", "127.0.0.0/8")).await;
    let tenant = Uuid::new_v4();
    let receiver = Receiver::start().await;
    receiver
        .subscribe(&w.app, tenant, "gen", &["generation.*"])
        .await;
    let sim = sim(
        &w.app,
        tenant,
        &["--job-duration", "900ms", "--progress-steps", "3"],
    )
    .await;
    grant(&w.app, tenant, 100).await;
    let (key, token) = create_key(&w.app, tenant, &["generations:write", "generations:read"]).await;
    let mut c = client(&w.app).await;

    let queued = c
        .create_generation(api_key(image(2), &token))
        .await
        .expect("create")
        .into_inner();
    let done = wait_state(
        &mut c,
        &admin_token(tenant),
        &queued.id,
        v1::GenerationState::Succeeded,
    )
    .await;
    assert_eq!(done.progress, 100);
    assert!(!done.refunded);
    assert!(done.error.is_none());
    assert_eq!((done.asset_ids.len(), done.result_urls.len()), (2, 2));
    let (start, end) = (done.start_time.unwrap(), done.end_time.unwrap());
    assert!(
        start.seconds * 1_000_000_000 + i64::from(start.nanos)
            <= end.seconds * 1_000_000_000 + i64::from(end.nanos)
    );
    // The assets are the simulator's, readable from the Asset service, in URL order.
    let mut assets = sim.assets().await;
    for (id, url) in done.asset_ids.iter().zip(&done.result_urls) {
        let asset = assets
            .get_asset(GetAssetRequest {
                tenant_id: tenant.to_string(),
                asset_id: id.clone(),
            })
            .await
            .expect("the asset exists")
            .into_inner();
        assert_eq!(asset.generation_id, queued.id);
        assert_eq!(&asset.url, url);
    }

    let mut conn = w.app.db().await;
    assert_eq!(
        balance(&mut conn, tenant).await,
        80,
        "charged once, nothing refunded"
    );
    assert!(refunds_of(&mut conn, tenant, &queued.id).await.is_empty());
    // Metered once per metric: 900 ms of work is 1 second (rounded up), 2 outputs.
    let usage = metered(&mut conn, tenant).await;
    let key_id = Some(key.id.clone());
    assert_eq!(
        usage,
        [
            (
                "generation_outputs".to_string(),
                2,
                key_id.clone(),
                format!("generation:{}:generation_outputs", queued.id)
            ),
            (
                "generation_seconds".to_string(),
                1,
                key_id,
                format!("generation:{}:generation_seconds", queued.id)
            ),
        ]
    );
    let evs = generation_events(&mut conn, tenant, &queued.id).await;
    assert_eq!(
        types(&evs),
        [
            "generation.queued",
            "generation.started",
            "generation.completed"
        ]
    );
    let completed = &evs[2].1;
    assert_eq!(completed["credits_charged"], json!(20));
    assert_eq!(completed["api_key_id"], json!(key.id));
    let asset_ids: Vec<_> = completed["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["asset_id"].clone())
        .collect();
    assert_eq!(
        asset_ids,
        done.asset_ids.iter().map(|a| json!(a)).collect::<Vec<_>>()
    );
    assert_eq!(completed["assets"][0]["mime_type"], "image/png");

    // The endpoint got the three, each verified by the reference library.
    let got = receiver.wait_for("gen", 3, WITHIN).await;
    let mut received: Vec<String> = got
        .iter()
        .map(|d| {
            assert_eq!(d.verified_by, vec![0], "verified: {d:?}");
            let body = d.json();
            assert_eq!(body["data"]["generation_id"], json!(queued.id));
            body["type"].as_str().unwrap().to_string()
        })
        .collect();
    received.sort();
    assert_eq!(
        received,
        [
            "generation.completed",
            "generation.queued",
            "generation.started"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_updates_a_failure_is_refunded_once_despite_repeated_and_late_updates() {
    // A quota of 2 generations a month: the failed one must give its 2 back.
    let w = World::with(|s| s.set("DEVGATE_QUOTA_FREE", "100000000/2")).await;
    let tenant = Uuid::new_v4();
    // Every update twice, and each one's predecessor again after it.
    let _sim = sim(
        &w.app,
        tenant,
        &[
            "--job-duration",
            "800ms",
            "--progress-steps",
            "4",
            "--duplicate-updates",
            "--out-of-order-updates",
        ],
    )
    .await;
    grant(&w.app, tenant, 100).await;
    let token = admin_token(tenant);
    let mut c = client(&w.app).await;
    let created = c
        .create_generation(bearer(failing(2), &token))
        .await
        .expect("create")
        .into_inner();
    let ended = wait_state(&mut c, &token, &created.id, v1::GenerationState::Failed).await;
    assert!(ended.refunded);
    assert_eq!(ended.error.as_ref().unwrap().code, "MODEL_ERROR");
    // The simulator's last repeats reach the queue after the terminal one: all consumed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    wait_settled(&routing::updates_queue(&rabbitmq_prefix(&w.app))).await;

    let mut conn = w.app.db().await;
    assert_eq!(balance(&mut conn, tenant).await, 100);
    assert_eq!(refunds_of(&mut conn, tenant, &created.id).await, [20]);
    assert_eq!(
        ledger(&mut conn, tenant).await.len(),
        3,
        "grant, charge, one refund"
    );
    let (state, _, last_sequence, refunded, code) = row(&mut conn, &created.id).await;
    assert_eq!(
        (state.as_str(), refunded, code.as_deref()),
        ("failed", true, Some("MODEL_ERROR"))
    );
    assert_eq!(last_sequence, 3, "RUNNING 0 %, RUNNING 25 %, FAILED");
    let evs = generation_events(&mut conn, tenant, &created.id).await;
    assert_eq!(
        types(&evs),
        [
            "generation.queued",
            "generation.started",
            "generation.failed"
        ]
    );
    let failed = &evs[2].1;
    assert_eq!(failed["credits_refunded"], json!(20));
    assert_eq!(failed["error"]["code"], "internal");
    assert_eq!(failed["error"]["retryable"], true);
    assert!(
        metered(&mut conn, tenant).await.is_empty(),
        "failed work is not metered"
    );
    // The quota was given back once: two more generations fit this month, a third does not.
    let again = c
        .create_generation(bearer(image(2), &token))
        .await
        .expect("the failed generation's quota was given back");
    assert_eq!(again.into_inner().cost, 20);
    let status = c
        .create_generation(bearer(image(1), &token))
        .await
        .unwrap_err();
    assert_refused(&status, tonic::Code::ResourceExhausted, "QUOTA_EXHAUSTED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_updates_duplicates_late_backward_foreign_and_malformed_change_nothing() {
    let w = World::new().await;
    let tenant = Uuid::new_v4();
    grant(&w.app, tenant, 100).await;
    let token = admin_token(tenant);
    let mut c = client(&w.app).await;
    let g = c
        .create_generation(bearer(image(1), &token))
        .await
        .unwrap()
        .into_inner();
    let id = g.id.clone();
    let orchestrator = Orchestrator::connect(&w.app).await;
    let queue = orchestrator.queue.clone();
    let mut conn = w.app.db().await;
    use GenerationState as S;

    // RUNNING 30 % as update 2 (update 1 is late): applied, the generation started.
    orchestrator
        .publish(&update(&id, tenant, 2, S::Running, 30))
        .await;
    wait_row(&mut conn, &id, |r| r.2 == 2).await;
    // Late (1), repeated (2), backwards (QUEUED 3), another tenant's (FAILED 9), an unknown
    // generation, a body that is no update, and a message of another type; then update 4.
    orchestrator
        .publish(&update(&id, tenant, 1, S::Running, 10))
        .await;
    orchestrator
        .publish(&update(&id, tenant, 2, S::Running, 30))
        .await;
    orchestrator
        .publish(&update(&id, tenant, 3, S::Queued, 0))
        .await;
    orchestrator.publish(&failed(&id, Uuid::new_v4(), 9)).await;
    orchestrator
        .publish(&failed(&Uuid::now_v7().to_string(), tenant, 1))
        .await;
    orchestrator
        .publish_raw(b"\x0a\xff\xff not protobuf", &GenerationUpdate::full_name())
        .await;
    let cancel = GenerationCancel {
        generation_id: id.clone(),
        tenant_id: tenant.to_string(),
        reason: "wrong queue".into(),
    };
    orchestrator
        .publish_raw(&cancel.encode_to_vec(), &GenerationCancel::full_name())
        .await;
    orchestrator
        .publish(&update(&id, tenant, 4, S::Running, 60))
        .await;
    wait_settled(&queue).await;
    assert_eq!(
        row(&mut conn, &id).await,
        ("running".into(), 60, 4, false, None)
    );
    assert_eq!(balance(&mut conn, tenant).await, 90);

    // FAILED as update 6 (5 is late): failed and refunded.
    orchestrator.publish(&failed(&id, tenant, 6)).await;
    wait_row(&mut conn, &id, |r| r.0 == "failed").await;
    // Repeated, late, and anything after the end: ignored, nothing refunded twice.
    orchestrator.publish(&failed(&id, tenant, 6)).await;
    orchestrator
        .publish(&update(&id, tenant, 5, S::Running, 80))
        .await;
    orchestrator
        .publish(&update(&id, tenant, 7, S::Cancelled, 80))
        .await;
    orchestrator.publish(&succeeded(&id, tenant, 8)).await;
    orchestrator.publish(&failed(&id, tenant, 9)).await;
    wait_settled(&queue).await;
    assert_eq!(
        row(&mut conn, &id).await,
        ("failed".into(), 60, 6, true, Some("CONTENT_POLICY".into()))
    );
    assert_eq!(balance(&mut conn, tenant).await, 100);
    assert_eq!(refunds_of(&mut conn, tenant, &id).await, [10]);
    assert!(metered(&mut conn, tenant).await.is_empty());
    let evs = generation_events(&mut conn, tenant, &id).await;
    assert_eq!(
        types(&evs),
        [
            "generation.queued",
            "generation.started",
            "generation.failed"
        ]
    );
    assert_eq!(
        evs[2].1["error"],
        json!({"code": "content_policy", "message": "the prompt was refused", "retryable": false})
    );
    let got = get(&mut c, &token, &id).await;
    assert_eq!(got.error.unwrap().code, "CONTENT_POLICY");

    // The orchestrator's CANCELLED answer to a developer's cancel is a duplicate end.
    let other = c
        .create_generation(bearer(image(1), &token))
        .await
        .unwrap()
        .into_inner();
    c.cancel_generation(bearer(
        v1::CancelGenerationRequest {
            id: other.id.clone(),
        },
        &token,
    ))
    .await
    .unwrap();
    orchestrator
        .publish(&update(&other.id, tenant, 1, S::Cancelled, 0))
        .await;
    wait_settled(&queue).await;
    assert_eq!(row(&mut conn, &other.id).await.2, 0, "nothing applied");
    assert_eq!(refunds_of(&mut conn, tenant, &other.id).await, [10]);
    assert_eq!(balance(&mut conn, tenant).await, 100);
    let evs = generation_events(&mut conn, tenant, &other.id).await;
    assert_eq!(types(&evs), ["generation.queued", "generation.cancelled"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_updates_the_timeout_sweep_fails_refunds_once_and_cancels_the_job() {
    // No orchestrator answers: only the test's queue on the jobs exchange sees the job. A
    // quota of 3 generations a month: the timed-out one must give its 3 back.
    let w = World::with(|s| {
        s.set("DEVGATE_GENERATION_TIMEOUT", "2s")
            .set("DEVGATE_QUOTA_FREE", "100000000/3")
    })
    .await;
    let mut jobs = Jobs::bind(&w.app).await;
    let tenant = Uuid::new_v4();
    grant(&w.app, tenant, 100).await;
    let token = admin_token(tenant);
    let mut c = client(&w.app).await;
    let g = c
        .create_generation(bearer(image(3), &token))
        .await
        .unwrap()
        .into_inner();
    let (routing_key, _, _, _) = jobs.next().await;
    assert_eq!(routing_key, routing::JOB_ROUTING_KEY);
    let mut conn = w.app.db().await;
    assert_eq!(balance(&mut conn, tenant).await, 70);

    let ended = wait_state(&mut c, &token, &g.id, v1::GenerationState::Failed).await;
    let error = ended.error.clone().unwrap();
    assert_eq!(error.code, "TIMEOUT");
    assert!(error.message.contains("2s"), "{error:?}");
    assert!(ended.refunded);
    let (created, end) = (ended.create_time.unwrap(), ended.end_time.unwrap());
    assert!(end.seconds - created.seconds >= 2, "not before the timeout");
    assert_eq!(balance(&mut conn, tenant).await, 100);
    assert_eq!(refunds_of(&mut conn, tenant, &g.id).await, [30]);
    // The orchestrator is told to stop.
    let (routing_key, kind, message_id, body) = jobs.next().await;
    assert_eq!(routing_key, routing::CANCEL_ROUTING_KEY);
    assert_eq!(kind, GenerationCancel::full_name());
    assert_eq!(message_id, format!("cancel:{}", g.id));
    assert_eq!(
        GenerationCancel::decode(body.as_slice())
            .unwrap()
            .generation_id,
        g.id
    );

    // A result that comes after all is ignored: no second refund, no usage, no completion.
    let orchestrator = Orchestrator::connect(&w.app).await;
    orchestrator.publish(&succeeded(&g.id, tenant, 1)).await;
    wait_settled(&orchestrator.queue).await;
    // More sweeps pass over it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        row(&mut conn, &g.id).await,
        ("failed".into(), 0, 0, true, Some("TIMEOUT".into()))
    );
    assert_eq!(balance(&mut conn, tenant).await, 100);
    assert_eq!(refunds_of(&mut conn, tenant, &g.id).await, [30]);
    assert!(metered(&mut conn, tenant).await.is_empty());
    let evs = generation_events(&mut conn, tenant, &g.id).await;
    assert_eq!(types(&evs), ["generation.queued", "generation.failed"]);
    assert_eq!(evs[1].1["error"]["code"], "timeout");
    assert_eq!(evs[1].1["credits_refunded"], json!(30));
    // The month's quota was given back: 3 more fit, and then no more.
    c.create_generation(bearer(image(3), &token))
        .await
        .expect("the timed-out generation's quota was given back");
    let status = c
        .create_generation(bearer(image(1), &token))
        .await
        .unwrap_err();
    assert_refused(&status, tonic::Code::ResourceExhausted, "QUOTA_EXHAUSTED");
    jobs.delete().await;
}

/// `curl -N` on the watch path through Envoy: what it has received so far (it keeps
/// growing while the call is open), and the thread that ends with the call.
fn curl_watch(
    url: String,
    token: String,
) -> (
    std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    std::thread::JoinHandle<()>,
) {
    use std::io::Read;
    let mut child = std::process::Command::new("curl")
        .args(["-N", "-s", "--max-time", "90", "-H"])
        .arg(format!("authorization: Bearer {token}"))
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("curl runs");
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = received.clone();
    let reader = std::thread::spawn(move || {
        let mut stdout = child.stdout.take().unwrap();
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = stdout.read(&mut chunk) {
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
        let _ = child.wait();
    });
    (received, reader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_updates_watch_streams_to_completion_while_another_process_consumes() {
    // This process serves the API only; a `devgate worker` process relays the jobs and
    // consumes the updates, so every change the watchers see was made by the other one.
    let e = Edge::on(World::with_roles(Roles::API, |s| s).await).await;
    let _worker = WorkerProcess::spawn(&e.world.app.settings);
    let tenant = Uuid::new_v4();
    grant(&e.world.app, tenant, 100).await;
    let token = admin_token(tenant);
    let mut c = client(&e.world.app).await;

    // Both watches are open, on their QUEUED state, before the orchestrator starts.
    let over_grpc = c
        .create_generation(bearer(image(1), &token))
        .await
        .unwrap()
        .into_inner();
    let mut stream = c
        .watch_generation(bearer(
            v1::WatchGenerationRequest {
                id: over_grpc.id.clone(),
            },
            &token,
        ))
        .await
        .expect("watch")
        .into_inner();
    let first = stream.message().await.unwrap().expect("the current state");
    assert_eq!(first.state, v1::GenerationState::Queued as i32);
    let over_rest = c
        .create_generation(bearer(image(1), &token))
        .await
        .unwrap()
        .into_inner();
    let (received, curl) = curl_watch(
        e.url(&format!("/v1/generations/{}:watch", over_rest.id)),
        token.clone(),
    );
    wait_until(WITHIN, || async {
        String::from_utf8_lossy(&received.lock().unwrap()).contains("GENERATION_STATE_QUEUED")
    })
    .await;
    let _sim = sim(
        &e.world.app,
        tenant,
        &["--job-duration", "1500ms", "--progress-steps", "3"],
    )
    .await;

    let mut seen = vec![first];
    while let Some(g) = tokio::time::timeout(WITHIN, stream.message())
        .await
        .expect("a change or the end within 60 s")
        .expect("the stream stays healthy")
    {
        seen.push(g);
    }
    let states: Vec<i32> = seen.iter().map(|g| g.state).collect();
    assert_eq!(
        <[_]>::first(&states),
        Some(&(v1::GenerationState::Queued as i32))
    );
    assert_eq!(
        states.last(),
        Some(&(v1::GenerationState::Succeeded as i32))
    );
    assert!(
        states.contains(&(v1::GenerationState::Running as i32)),
        "{states:?}"
    );
    assert!(
        states.windows(2).all(|w| w[0] <= w[1]),
        "forward only: {states:?}"
    );
    let progress: Vec<i32> = seen.iter().map(|g| g.progress).collect();
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
    assert_eq!(seen.last().unwrap().asset_ids.len(), 1);

    tokio::task::spawn_blocking(move || curl.join().unwrap())
        .await
        .unwrap();
    let body = String::from_utf8(received.lock().unwrap().clone()).unwrap();
    let streamed: Vec<Value> =
        serde_json::from_str(&body).unwrap_or_else(|err| panic!("a JSON array ({err}): {body}"));
    let states: Vec<&str> = streamed
        .iter()
        .map(|g| g["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        <[_]>::first(&states),
        Some(&"GENERATION_STATE_QUEUED"),
        "{states:?}"
    );
    assert_eq!(
        states.last(),
        Some(&"GENERATION_STATE_SUCCEEDED"),
        "{states:?}"
    );
    assert!(states.contains(&"GENERATION_STATE_RUNNING"), "{states:?}");
    let last = streamed.last().unwrap();
    assert_eq!(last["progress"], 100);
    assert_eq!(last["asset_ids"].as_array().unwrap().len(), 1);
}
