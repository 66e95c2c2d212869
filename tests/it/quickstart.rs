//! The README's quick-start block, executed verbatim against a private stack (devgate with
//! its worker, Envoy, the README's webhook receiver); only the addresses, the binary paths
//! and the env file are substituted.

use std::process::Command;

use uuid::Uuid;

use crate::harness::{
    envoy::{Envoy, grpcurl_binary},
    receiver::python_binary,
    upstream_sim::UpstreamSim,
    *,
};

fn quickstart_block() -> String {
    let readme = std::fs::read_to_string(manifest_dir().join("README.md")).unwrap();
    let start = readme
        .find("<!-- quickstart:begin -->")
        .expect("quickstart begin marker");
    let end = readme
        .find("<!-- quickstart:end -->")
        .expect("quickstart end marker");
    let block = &readme[start..end];
    let body_start = block.find("```bash\n").expect("a bash fence") + "```bash\n".len();
    let body_end = block.rfind("```").unwrap();
    block[body_start..body_end].to_string()
}

/// A port nothing listens on now: the README's receiver binds it itself.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_quickstart_runs_as_written() {
    // The local stack's plans (deploy/local/devgate.env), not the harness's generous ones,
    // and its webhook allow-list (loopback): the quick-start must work against what
    // deploy/local/run.sh really runs.
    let local_env = manifest_dir().join("deploy/local/devgate.env");
    let plans: Vec<(String, String)> = dotenvy::from_path_iter(&local_env)
        .unwrap()
        .map(Result::unwrap)
        .filter(|(k, _)| {
            k.starts_with("DEVGATE_PLAN_")
                || k.starts_with("DEVGATE_QUOTA_")
                || k.starts_with("DEVGATE_WEBHOOK_")
        })
        .collect();
    // The simulator of the platform services as deploy/local/run.sh starts it (its default
    // job duration, the local tenant seeded), on this test's own RabbitMQ prefix.
    let prefix = format!("devgate-test-{}", Uuid::new_v4().simple());
    let local_tenant = Uuid::from_u128(1);
    let sim = UpstreamSim::start(&prefix, &[local_tenant], &[]).await;
    let w = World::with(|mut s| {
        for (k, v) in &plans {
            s = s.set(k, v);
        }
        s.set("DEVGATE_RABBITMQ_PREFIX", &prefix)
            .set(
                "DEVGATE_ASSET_SERVICE_ADDR",
                &sim.ready.asset_addr.to_string(),
            )
            .set(
                "DEVGATE_USER_TEAM_SERVICE_ADDR",
                &sim.ready.user_team_addr.to_string(),
            )
    })
    .await;
    let envoy = Envoy::start(w.app.public).await;
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("devgate.env");
    std::fs::write(
        &env_file,
        format!(
            "DEVGATE_JWT_HS256_SECRET={JWT_SECRET}\nDEVGATE_LOCAL_SERVICE_TOKEN={SERVICE_TOKEN}\n"
        ),
    )
    .unwrap();

    let script = quickstart_block();
    for literal in [
        "http://127.0.0.1:8080",
        "127.0.0.1:50051",
        "127.0.0.1:50052",
        "127.0.0.1:8090",
        "target/release/devgate",
        ".venv/bin/grpcurl",
        ".venv/bin/python",
    ] {
        assert!(script.contains(literal), "the quick-start uses {literal}");
    }
    let script = script
        .replace("http://127.0.0.1:8080", &envoy.base)
        .replace("127.0.0.1:50051", &w.app.public.to_string())
        .replace("127.0.0.1:50052", &w.app.internal.to_string())
        .replace("127.0.0.1:8090", &format!("127.0.0.1:{}", free_port()))
        .replace("target/release/devgate", env!("CARGO_BIN_EXE_devgate"))
        .replace("deploy/local/devgate.env", env_file.to_str().unwrap())
        .replace(".venv/bin/grpcurl", grpcurl_binary().to_str().unwrap())
        .replace(".venv/bin/python", python_binary().to_str().unwrap());

    let out = tokio::task::spawn_blocking(move || {
        Command::new("bash")
            .args(["-euo", "pipefail", "-c", &script])
            .current_dir(manifest_dir())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "quick-start failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for expected in [
        "\"secret\": \"dg_test_",
        "\"name\": \"ci key\"",
        "old secret: 200",
        "new secret: 200",
        "\"state\": \"API_KEY_STATE_REVOKED\"",
        "\"reason\":\"API_KEY_REVOKED\"",
        "HTTP 401",
        "devgate.v1.ApiKeyService",
        "rpc RotateApiKey",
        "\"valid\": true",
        "\"requests\": \"",
        "/devgate.v1.ApiKeyService/ListApiKeys",
        "\"monthly_requests\"",
        "\"state\": \"WEBHOOK_ENDPOINT_STATE_ENABLED\"",
        "\"trigger\": \"scheduled\"",
        "\"trigger\": \"manual\"",
        "endpoint deleted: 200",
        "{\"amount\":\"100\",",
        "idempotent-replayed: true",
        "{\"state\":\"GENERATION_STATE_RUNNING\",",
        "{\"credit_balance\":\"",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    assert!(
        !stdout.contains("NOT verified"),
        "the receiver refused a signature:\n{stdout}"
    );

    // The webhook block. PublishEvent twice with one idempotency id: one event.
    let published: Vec<serde_json::Value> = stdout
        .lines()
        .filter(|l| l.starts_with("{\"id\":") && l.contains("\"duplicate\":"))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(published.len(), 2, "two publish lines in:\n{stdout}");
    assert_eq!(published[0]["duplicate"], false, "{published:?}");
    assert_eq!(published[1]["duplicate"], true, "{published:?}");
    assert_eq!(published[0]["id"], published[1]["id"]);
    let event = published[0]["id"].as_str().unwrap();
    // The receiver got it once, verified by the reference library, with the event id as
    // webhook-id; the event log shows its delivery SUCCEEDED.
    let received = format!("webhook {event}: credits.low, signature verified");
    assert_eq!(
        stdout.matches(&received).count(),
        1,
        "{received:?} once in:\n{stdout}"
    );
    let logged = stdout
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "{{\"id\":\"{event}\",\"event_type\":\"credits.low\""
            ))
        })
        .unwrap_or_else(|| panic!("the event log line of {event} in:\n{stdout}"));
    assert!(
        logged.contains("\"status\":\"WEBHOOK_DELIVERY_STATUS_SUCCEEDED\",\"attempts\":1"),
        "{logged}"
    );
    // The test event arrived verified, and its manual retry came with the same webhook-id.
    let test_event = stdout
        .lines()
        .find_map(|l| l.strip_suffix(": webhook.test, signature verified"))
        .and_then(|l| l.strip_prefix("webhook "))
        .unwrap_or_else(|| panic!("the verified test event in:\n{stdout}"));
    assert!(
        stdout.contains(&format!(
            "webhook {test_event}: already handled (a redelivery); answered 204"
        )),
        "the retry of {test_event} in:\n{stdout}"
    );
    // The endpoint's deliveries, newest first, both SUCCEEDED.
    let listed: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("{\"event_type\":"))
        .collect();
    assert_eq!(
        listed,
        [
            r#"{"event_type":"webhook.test","status":"WEBHOOK_DELIVERY_STATUS_SUCCEEDED","attempts":2,"last_status_code":204}"#,
            r#"{"event_type":"credits.low","status":"WEBHOOK_DELIVERY_STATUS_SUCCEEDED","attempts":1,"last_status_code":204}"#,
        ],
        "{stdout}"
    );

    // The generation block: created once (the replay names the same id), watched to
    // SUCCEEDED, its asset read from the simulator's Asset service, 10 credits spent once.
    let created: Vec<serde_json::Value> = stdout
        .lines()
        .filter(|l| l.starts_with("{\"id\":") && l.contains("\"state\":\"GENERATION_STATE_"))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(created.len(), 2, "the create and its replay in:\n{stdout}");
    assert_eq!(created[0]["id"], created[1]["id"], "{created:?}");
    assert_eq!(created[0]["cost"], "10", "{created:?}");
    let watched: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("{\"state\":\"GENERATION_STATE_"))
        .collect();
    // The stream's first message is the generation as it was then (queued, or already
    // running), its last the end; the GET after it too.
    assert!(watched.len() >= 3, "{stdout}");
    assert!(
        watched
            .iter()
            .any(|l| l.starts_with(r#"{"state":"GENERATION_STATE_SUCCEEDED","progress":100,"#)),
        "the watch and the get end SUCCEEDED:\n{stdout}"
    );
    let asset = stdout
        .lines()
        .find(|l| l.starts_with("{\"id\":") && l.contains("\"media_type\":\"image/png\""))
        .unwrap_or_else(|| panic!("the asset line in:\n{stdout}"));
    assert!(
        asset.contains(&format!("\"generation_id\":{}", created[0]["id"])),
        "{asset}"
    );
    let balance_line = stdout
        .lines()
        .find(|l| l.starts_with("{\"credit_balance\":"))
        .unwrap();
    let grant_line = stdout
        .lines()
        .find(|l| l.starts_with("{\"amount\":\"100\","))
        .unwrap();
    let granted: serde_json::Value = serde_json::from_str(grant_line).unwrap();
    let balance: serde_json::Value = serde_json::from_str(balance_line).unwrap();
    let after_grant: i64 = granted["balance_after"].as_str().unwrap().parse().unwrap();
    let now: i64 = balance["credit_balance"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        now,
        after_grant - 10,
        "charged once: {grant_line} then {balance_line}"
    );
    drop(sim);

    // The documented 401 body is what Envoy really answers.
    let readme = std::fs::read_to_string(manifest_dir().join("README.md")).unwrap();
    let documented = readme
        .lines()
        .find(|l| l.starts_with("{\"code\":16"))
        .expect("documented 401 body");
    assert!(
        stdout.contains(documented),
        "README's 401 example differs from:\n{stdout}"
    );
}
