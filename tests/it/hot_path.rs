//! The verification hot path never hashes twice: concurrent misses share one argon2 run,
//! stale entries are re-admitted by re-reading the row, correct secrets of revoked keys are
//! refused from the cache, a broadcast racing a verification wins, and the failed-attempt
//! limiter counts per (key id, client network) without overshooting.
//! Every test asserts on the argon2 run counter (`SecretHasher::runs`), never on timing.

use std::time::Duration;

use devgate::{
    api_keys::token,
    identity::{Environment, KeyId},
    proto::{
        internal::v1::{self as internal, VerifyFailureReason as Reason},
        v1,
    },
};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use crate::harness::{proxy::Proxy, *};

fn runs(app: &TestApp) -> u64 {
    app.verifier().hash_runs()
}

/// A well-formed token for `id` with a random (wrong) secret.
fn wrong_token(id: &str) -> String {
    let id: KeyId = id.parse().unwrap();
    token::generate(Environment::Test, &id).token
}

/// Runs `sql` on the instance's database directly: a change no broadcast announces.
async fn execute_sql(app: &TestApp, sql: &str) {
    let url = &app.settings.vars["DEVGATE_DATABASE_URL"];
    let mut conn = AsyncPgConnection::establish(url).await.unwrap();
    diesel::sql_query(sql).execute(&mut conn).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_calls_for_one_token_cost_one_argon2_run() {
    let w = World::new().await;
    let (_, token) = create_key(&w.app, Uuid::new_v4(), &["*"]).await;
    let start = runs(&w.app);
    let calls = (0..16).map(|_| verify(&w.app, &token));
    let answers = futures_util::future::join_all(calls).await;
    assert!(answers.iter().all(|r| r.valid), "{answers:?}");
    assert_eq!(
        runs(&w.app) - start,
        1,
        "16 concurrent misses, one argon2 run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_cache_entries_are_readmitted_without_hashing() {
    let w = World::with(|s| s.set("DEVGATE_KEY_CACHE_TTL", "200ms")).await;
    let tenant = Uuid::new_v4();
    let (key, token) = create_key(&w.app, tenant, &["*"]).await;
    let start = runs(&w.app);
    assert!(verify(&w.app, &token).await.valid);
    assert_eq!(runs(&w.app) - start, 1, "the first sight of a token hashes");

    // Within the stale window (TTL..2×TTL) and past it: the row is re-read, nothing hashed.
    for pause in [250, 600, 1000] {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        assert!(verify(&w.app, &token).await.valid);
    }
    assert_eq!(
        runs(&w.app) - start,
        1,
        "expiry re-reads the row, never hashes"
    );

    // The re-read is real: a revocation written straight to the database (no broadcast)
    // is seen once the entry is past its stale window, still without hashing.
    execute_sql(
        &w.app,
        &format!(
            "UPDATE api_keys SET revoke_time = now() WHERE id = '{}'",
            key.id
        ),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    wait_until(Duration::from_secs(5), || async {
        reason(&verify(&w.app, &token).await) == Reason::Revoked
    })
    .await;
    assert_eq!(runs(&w.app) - start, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_costs_at_most_one_run_per_token() {
    let w = World::new().await;
    let tenant = Uuid::new_v4();
    let (key, old) = create_key(&w.app, tenant, &["*"]).await;
    assert!(verify(&w.app, &old).await.valid);
    let rotated = rotate(&w.app, tenant, &key.id, Some(3600)).await.unwrap();
    let start = runs(&w.app);
    for _ in 0..5 {
        assert!(verify(&w.app, &old).await.valid, "old secret in grace");
        assert!(verify(&w.app, &rotated.secret).await.valid, "new secret");
    }
    // The old token's proof is the stored previous hash: re-admitted without hashing.
    assert_eq!(runs(&w.app) - start, 1, "only the new token hashed, once");

    // Rotating again, ending the grace: the old token is refused (one run to find out it no
    // longer matches), the newest verifies with one run.
    let again = rotate_ending_grace(&w.app, tenant, &key.id).await.unwrap();
    let start = runs(&w.app);
    for _ in 0..3 {
        assert!(verify(&w.app, &again.secret).await.valid);
    }
    assert!(!verify(&w.app, &rotated.secret).await.valid);
    assert!(runs(&w.app) - start <= 2, "at most one run per token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_keys_correct_secret_is_hashed_once_then_refused_from_the_cache() {
    let w = World::new().await;
    let tenant = Uuid::new_v4();
    let (key, token) = create_key(&w.app, tenant, &["*"]).await;
    revoke(&w.app, tenant, &key.id).await.unwrap();
    let start = runs(&w.app);
    for _ in 0..10 {
        let r = verify(&w.app, &token).await;
        assert_eq!(reason(&r), Reason::Revoked);
    }
    assert_eq!(runs(&w.app) - start, 1, "refused from the negative cache");

    // The negative entry goes with the same broadcasts: deleting the key is seen at once.
    w.app
        .public_client()
        .await
        .delete_api_key(bearer(
            v1::DeleteApiKeyRequest { id: key.id.clone() },
            &admin_token(tenant),
        ))
        .await
        .unwrap();
    assert_eq!(reason(&verify(&w.app, &token).await), Reason::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verification_that_read_the_row_before_a_revoke_does_not_cache_it() {
    let w = World::new().await;
    let tenant = Uuid::new_v4();
    let (key, token) = create_key(&w.app, tenant, &["*"]).await;
    let verifier = w.app.verifier().clone();
    let (reached_tx, reached_rx) = tokio::sync::oneshot::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    verifier.pause_once_before_caching(async move {
        let _ = reached_tx.send(());
        let _ = go_rx.await;
    });
    let in_flight = tokio::spawn({
        let verifier = verifier.clone();
        let token = token.clone();
        async move { verifier.verify(&token, None).await }
    });
    // The verification has read the (active) row and matched the secret; now the key is
    // revoked and the broadcast handled before it caches anything.
    reached_rx.await.unwrap();
    revoke(&w.app, tenant, &key.id).await.unwrap();
    go_tx.send(()).unwrap();
    let answer = in_flight.await.unwrap().unwrap();
    assert!(
        matches!(answer, Err(devgate::auth::VerifyFailure::Revoked)),
        "the verification re-read the row after the broadcast: {answer:?}"
    );
    for _ in 0..3 {
        assert_eq!(reason(&verify(&w.app, &token).await), Reason::Revoked);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_from_one_network_do_not_lock_out_another() {
    let w = World::with(|s| {
        s.set("DEVGATE_AUTH_FAILURE_LIMIT", "3")
            .set("DEVGATE_AUTH_FAILURE_WINDOW", "60s")
    })
    .await;
    let tenant = Uuid::new_v4();
    for (attacker, neighbour, owner) in [
        ("192.0.2.10", "192.0.2.99", "198.51.100.7"),
        ("2001:db8:0:1::1", "2001:db8:0:1::ffff", "2001:db8:0:2::1"),
    ] {
        // A fresh key per family: its token has never been verified (not cached).
        let (key, token) = create_key(&w.app, tenant, &["*"]).await;
        for _ in 0..3 {
            let r = verify_from(&w.app, &wrong_token(&key.id), attacker).await;
            assert_eq!(reason(&r), Reason::NotFound);
        }
        // The attacker's whole network is locked, even for the right secret...
        for ip in [attacker, neighbour] {
            let r = verify_from(&w.app, &wrong_token(&key.id), ip).await;
            assert_eq!(reason(&r), Reason::TooManyAttempts, "{ip}");
        }
        // ...the owner elsewhere is not.
        assert!(verify_from(&w.app, &token, owner).await.valid, "{owner}");
        // Once verified, the token is cached: the attacker's network answers from the cache
        // too (the allow-list, not the limiter, decides where a key may be used).
        assert!(verify_from(&w.app, &token, attacker).await.valid);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_wrong_guesses_never_exceed_the_limit_of_argon2_runs() {
    let w = World::with(|s| {
        s.set("DEVGATE_AUTH_FAILURE_LIMIT", "5")
            .set("DEVGATE_AUTH_FAILURE_WINDOW", "60s")
    })
    .await;
    let (key, token) = create_key(&w.app, Uuid::new_v4(), &["*"]).await;
    let guesses: Vec<String> = (0..50).map(|_| wrong_token(&key.id)).collect();
    let start = runs(&w.app);
    let calls = guesses
        .iter()
        .map(|g| verify_from(&w.app, g, "203.0.113.5"));
    let answers = futures_util::future::join_all(calls).await;
    let not_found = answers
        .iter()
        .filter(|r| reason(r) == Reason::NotFound)
        .count();
    let locked = answers
        .iter()
        .filter(|r| reason(r) == Reason::TooManyAttempts)
        .count();
    assert_eq!(not_found + locked, 50, "{answers:?}");
    assert_eq!(not_found, 5, "exactly the limit got an answer from argon2");
    assert_eq!(runs(&w.app) - start, 5, "no argon2 past the limit");
    // The owner's correct secret from that network is locked too, until the window passes;
    // a correct secret from another network refunds its slot (it was no failure).
    let r = verify_from(&w.app, &token, "203.0.113.77").await;
    assert_eq!(reason(&r), Reason::TooManyAttempts);
    assert!(verify_from(&w.app, &token, "198.51.100.1").await.valid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_during_a_database_outage_share_one_wait() {
    let db = TestDb::create().await;
    let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let proxied = db.url().replace("127.0.0.1:5432", &proxy.addr.to_string());
    let prefix = format!("devgate-test:{}:", Uuid::new_v4().simple());
    let app = TestApp::spawn(
        Settings::new(&db, &prefix)
            .set("DEVGATE_DATABASE_URL", &proxied)
            .set("DEVGATE_DATABASE_CONNECT_TIMEOUT", "1s"),
    )
    .await;
    let (_, token) = create_key(&app, Uuid::new_v4(), &["*"]).await;
    proxy.cut();
    let started = std::time::Instant::now();
    let calls = (0..16).map(|_| async {
        app.internal_client()
            .await
            .verify_api_key(internal::VerifyApiKeyRequest {
                token: token.clone(),
                ..Default::default()
            })
            .await
    });
    let answers = futures_util::future::join_all(calls).await;
    for answer in answers {
        assert_eq!(answer.unwrap_err().code(), tonic::Code::Unavailable);
    }
    // Queued behind one verification, the callers share its failure instead of each
    // waiting for a connection in turn (16 × 1 s).
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    app.stop().await;
    dbx::delete_redis_prefix(&prefix);
}
