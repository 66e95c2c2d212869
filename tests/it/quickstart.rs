//! The README's quick-start block, executed verbatim against a private stack (devgate,
//! Envoy); only the addresses, the binary path and the env file are substituted.

use std::process::Command;

use crate::harness::{
    envoy::{Envoy, grpcurl_binary},
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_quickstart_runs_as_written() {
    // The local stack's plans (deploy/local/devgate.env), not the harness's generous ones:
    // the quick-start must work against what deploy/local/run.sh really runs.
    let local_env = manifest_dir().join("deploy/local/devgate.env");
    let plans: Vec<(String, String)> = dotenvy::from_path_iter(&local_env)
        .unwrap()
        .map(Result::unwrap)
        .filter(|(k, _)| k.starts_with("DEVGATE_PLAN_") || k.starts_with("DEVGATE_QUOTA_"))
        .collect();
    let w = World::with(|mut s| {
        for (k, v) in &plans {
            s = s.set(k, v);
        }
        s
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
        "target/release/devgate",
        ".venv/bin/grpcurl",
    ] {
        assert!(script.contains(literal), "the quick-start uses {literal}");
    }
    let script = script
        .replace("http://127.0.0.1:8080", &envoy.base)
        .replace("127.0.0.1:50051", &w.app.public.to_string())
        .replace("127.0.0.1:50052", &w.app.internal.to_string())
        .replace("target/release/devgate", env!("CARGO_BIN_EXE_devgate"))
        .replace("deploy/local/devgate.env", env_file.to_str().unwrap())
        .replace(".venv/bin/grpcurl", grpcurl_binary().to_str().unwrap());

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
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
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
