//! devgate's webhook signatures checked by the official Standard Webhooks library (PyPI
//! `standardwebhooks` in the project venv, installed by deploy/local/common.sh), not only
//! by devgate's own verifier.

use std::{io::Write, path::PathBuf, process::Stdio};

use base64::{Engine, engine::general_purpose::STANDARD};
use devgate::webhooks::signing::{Secret, secrets_valid_at, sign};

use crate::harness::manifest_dir;

/// Reads `{secret, body_b64, headers}` as JSON on stdin and verifies with the reference
/// library; exit 0 and `ok` on success, exit 1 and the library's error otherwise.
const VERIFY_PY: &str = r#"
import base64, json, sys
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
case = json.load(sys.stdin)
try:
    Webhook(case["secret"]).verify(base64.b64decode(case["body_b64"]), case["headers"], json_parse=False)
except WebhookVerificationError as e:
    print("refused:", e)
    sys.exit(1)
print("ok")
"#;

fn python() -> PathBuf {
    std::env::var_os("DEVGATE_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join(".venv/bin/python"))
}

/// Runs the reference verifier on one delivery; true when it accepts.
fn reference_verifies(
    whsec: &str,
    msg_id: &str,
    timestamp: i64,
    signature: &str,
    body: &[u8],
) -> bool {
    let case = serde_json::json!({
        "secret": whsec,
        "body_b64": STANDARD.encode(body),
        "headers": {
            "webhook-id": msg_id,
            "webhook-timestamp": timestamp.to_string(),
            "webhook-signature": signature,
        },
    });
    let mut child = std::process::Command::new(python())
        .args(["-c", VERIFY_PY])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "{} not runnable ({e}); deploy/local/common.sh creates the venv",
                python().display()
            )
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(case.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    match out.status.code() {
        Some(0) => {
            assert_eq!(stdout.trim(), "ok");
            true
        }
        Some(1) if stdout.starts_with("refused:") => false,
        _ => panic!(
            "the reference verifier did not run: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[test]
fn the_reference_library_verifies_devgate_signatures() {
    let body = serde_json::to_vec(&serde_json::json!({
        "type": "api_key.created",
        "timestamp": "2026-11-23T10:00:00Z",
        "data": {"name": "ünïcödé ✓", "quote": "\"", "n": 1.5e3},
    }))
    .unwrap();
    // A generated secret, and the spec's own 24-byte and a 64-byte one (the size bounds).
    let secrets = [
        Secret::generate().unwrap(),
        Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap(),
        Secret::from_bytes(vec![0x5a; 64]).unwrap(),
    ];
    for secret in &secrets {
        let (id, ts) = ("msg_01HZX3K9Q6", now());
        let sig = sign(&[secret], id, ts, &body).unwrap();
        assert!(reference_verifies(
            &secret.expose_whsec(),
            id,
            ts,
            &sig,
            &body
        ));
        // The same library refuses a changed body, id or timestamp: the check is real.
        let mut tampered = body.clone();
        tampered[10] ^= 1;
        assert!(!reference_verifies(
            &secret.expose_whsec(),
            id,
            ts,
            &sig,
            &tampered
        ));
        assert!(!reference_verifies(
            &secret.expose_whsec(),
            "msg_other",
            ts,
            &sig,
            &body
        ));
        assert!(!reference_verifies(
            &secret.expose_whsec(),
            id,
            ts - 1,
            &sig,
            &body
        ));
    }
}

#[test]
fn during_a_rotation_both_secrets_verify_and_only_the_new_one_after() {
    let old = Secret::generate().unwrap();
    let new = Secret::generate().unwrap();
    let body = br#"{"type":"webhook.test","timestamp":"2026-11-23T10:00:00Z","data":{}}"#;
    let ts = now();
    let grace_end = ts + 60;

    let during = sign(
        &secrets_valid_at(&new, Some((&old, grace_end)), ts),
        "msg_rot",
        ts,
        body,
    )
    .unwrap();
    assert_eq!(during.split(' ').count(), 2, "{during}");
    assert!(reference_verifies(
        &new.expose_whsec(),
        "msg_rot",
        ts,
        &during,
        body
    ));
    assert!(reference_verifies(
        &old.expose_whsec(),
        "msg_rot",
        ts,
        &during,
        body
    ));

    let after = sign(
        &secrets_valid_at(&new, Some((&old, grace_end)), grace_end),
        "msg_rot",
        ts,
        body,
    )
    .unwrap();
    assert_eq!(after.split(' ').count(), 1, "{after}");
    assert!(reference_verifies(
        &new.expose_whsec(),
        "msg_rot",
        ts,
        &after,
        body
    ));
    assert!(!reference_verifies(
        &old.expose_whsec(),
        "msg_rot",
        ts,
        &after,
        body
    ));
}

#[test]
fn the_reference_library_refuses_stale_timestamps() {
    // Receivers bound replays by the timestamp (5 minutes): each delivery attempt must be
    // signed afresh with its own send time, or a retry hours later would be refused too.
    let secret = Secret::generate().unwrap();
    let body = b"{}";
    let stale = now() - 600;
    let sig = sign(&[&secret], "msg_old", stale, body).unwrap();
    assert!(!reference_verifies(
        &secret.expose_whsec(),
        "msg_old",
        stale,
        &sig,
        body
    ));
}
