//! The credits ledger as a library: concurrency (no overdraft, idempotent under races),
//! replays, validation, tenant isolation, pagination and the append-only ledger.

use std::time::Duration;

use devgate::{
    credits::{CreditError, Credits, LedgerEntry},
    db::DatabaseConfig,
    identity::TenantId,
};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::harness::TestDb;

/// A service on the test's own database. The pool is smaller than the number of concurrent
/// calls, so the tests also exercise waiting for connections.
fn credits(db: &TestDb) -> Credits {
    let pool = devgate::db::pool(&DatabaseConfig {
        url: db.url().to_string().into(),
        pool_size: 8,
        connect_timeout: Duration::from_secs(30),
        statement_timeout: Duration::from_secs(30),
    });
    Credits::new(pool)
}

fn new_tenant() -> TenantId {
    TenantId(Uuid::new_v4())
}

/// The whole ledger, newest first, read page by page.
async fn all_entries(credits: &Credits, tenant: TenantId) -> Vec<LedgerEntry> {
    let mut out: Vec<LedgerEntry> = Vec::new();
    loop {
        let before = out.last().map(|e| e.id);
        let page = credits.ledger(tenant, 7, before).await.unwrap();
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

/// Sum of amounts = balance, and each balance_after follows from the previous one.
fn assert_consistent(entries: &[LedgerEntry], balance: i64) {
    let mut by_id = entries.to_vec();
    by_id.sort_by_key(|e| e.id);
    let mut running = 0;
    for e in &by_id {
        running += e.amount;
        assert_eq!(e.balance_after, running, "balance_after of entry {}", e.id);
        assert!(e.balance_after >= 0);
    }
    assert_eq!(running, balance, "the ledger explains the balance");
    // Newest first means the order the entries were applied in, reversed.
    let listed: Vec<i64> = entries.iter().map(|e| e.id).collect();
    let expected: Vec<i64> = by_id.iter().rev().map(|e| e.id).collect();
    assert_eq!(listed, expected, "ledger is newest first");
}

fn is_invalid(r: &Result<LedgerEntry, CreditError>, field: &str) -> bool {
    matches!(r, Err(CreditError::Invalid(v)) if v.iter().any(|f| f.field == field))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deductions_never_overdraw() {
    let db = TestDb::create().await;
    let credits = credits(&db);
    let tenant = new_tenant();
    credits
        .grant(tenant, 50, "monthly allowance", "", "grant-1")
        .await
        .unwrap();

    let mut tasks = JoinSet::new();
    for i in 0..200 {
        let credits = credits.clone();
        tasks.spawn(async move {
            credits
                .deduct(tenant, 1, "generation", &format!("gen-{i}"), None)
                .await
        });
    }
    let (mut ok, mut insufficient) = (0, 0);
    while let Some(result) = tasks.join_next().await {
        match result.unwrap() {
            Ok(entry) => {
                assert_eq!(entry.amount, -1);
                ok += 1;
            }
            Err(CreditError::InsufficientCredits { balance, requested }) => {
                assert_eq!((balance, requested), (0, 1));
                insufficient += 1;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!((ok, insufficient), (50, 150));
    assert_eq!(credits.balance(tenant).await.unwrap(), 0);
    let entries = all_entries(&credits, tenant).await;
    assert_eq!(entries.len(), 51);
    assert_consistent(&entries, 0);

    // Empty balance: refused, and nothing written.
    let refused = credits.deduct(tenant, 1, "generation", "", None).await;
    assert!(matches!(
        refused,
        Err(CreditError::InsufficientCredits {
            balance: 0,
            requested: 1
        })
    ));
    assert_eq!(all_entries(&credits, tenant).await.len(), 51);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_grants_with_one_idempotency_id_apply_once() {
    let db = TestDb::create().await;
    let credits = credits(&db);
    // A tenant the database has never seen: the races also create its rows.
    let tenant = new_tenant();

    let mut tasks = JoinSet::new();
    for _ in 0..50 {
        let credits = credits.clone();
        tasks.spawn(async move {
            credits
                .grant(tenant, 100, "welcome bonus", "signup", "welcome")
                .await
        });
    }
    let mut ids = Vec::new();
    while let Some(result) = tasks.join_next().await {
        ids.push(result.unwrap().expect("every retry succeeds").id);
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "all 50 calls return the same entry");

    assert_eq!(credits.balance(tenant).await.unwrap(), 100);
    let entries = all_entries(&credits, tenant).await;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].id, ids[0]);
    assert_eq!(entries[0].idempotency_id.as_deref(), Some("welcome"));
    assert_eq!(entries[0].reference, "signup");
    assert_consistent(&entries, 100);

    // A later retry returns the original entry (even with another reference).
    let retry = credits
        .grant(tenant, 100, "welcome bonus", "other", "welcome")
        .await
        .unwrap();
    assert_eq!(retry, entries[0]);

    // The same id with another amount or reason, or for a deduction: conflict.
    for result in [
        credits
            .grant(tenant, 101, "welcome bonus", "signup", "welcome")
            .await,
        credits
            .grant(tenant, 100, "other reason", "signup", "welcome")
            .await,
        credits
            .deduct(tenant, 100, "welcome bonus", "", Some("welcome"))
            .await,
    ] {
        assert!(
            matches!(result, Err(CreditError::Conflict(_))),
            "{result:?}"
        );
    }
    assert_eq!(credits.balance(tenant).await.unwrap(), 100);
    assert_eq!(all_entries(&credits, tenant).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_deductions_and_refunds() {
    let db = TestDb::create().await;
    let credits = credits(&db);
    let tenant = new_tenant();
    credits.grant(tenant, 10, "top-up", "", "g").await.unwrap();

    let first = credits
        .deduct(tenant, 7, "image generation", "gen-1", Some("d1"))
        .await
        .unwrap();
    assert_eq!((first.amount, first.balance_after), (-7, 3));
    // A retry answers with the original entry, even though 3 < 7 now.
    let retry = credits
        .deduct(tenant, 7, "image generation", "gen-1", Some("d1"))
        .await
        .unwrap();
    assert_eq!(retry, first);
    assert_eq!(credits.balance(tenant).await.unwrap(), 3);

    // Concurrent deductions sharing one id: applied once.
    let mut tasks = JoinSet::new();
    for _ in 0..20 {
        let credits = credits.clone();
        tasks.spawn(async move {
            credits
                .deduct(tenant, 2, "video generation", "gen-2", Some("d2"))
                .await
        });
    }
    let mut ids = Vec::new();
    while let Some(result) = tasks.join_next().await {
        ids.push(result.unwrap().unwrap().id);
    }
    ids.dedup();
    assert_eq!(ids.len(), 1);
    assert_eq!(credits.balance(tenant).await.unwrap(), 1);

    // The generation failed: refund it, once.
    let refund = credits
        .refund(tenant, 2, "generation failed", "gen-2", "r-gen-2")
        .await
        .unwrap();
    assert_eq!((refund.amount, refund.balance_after), (2, 3));
    let again = credits
        .refund(tenant, 2, "generation failed", "gen-2", "r-gen-2")
        .await
        .unwrap();
    assert_eq!(again, refund);
    assert_eq!(credits.balance(tenant).await.unwrap(), 3);

    // An insufficient deduction with an id records nothing, so it can succeed later.
    let refused = credits
        .deduct(tenant, 5, "upscale", "gen-3", Some("d3"))
        .await;
    assert!(matches!(
        refused,
        Err(CreditError::InsufficientCredits {
            balance: 3,
            requested: 5
        })
    ));
    credits.grant(tenant, 2, "top-up", "", "g2").await.unwrap();
    let later = credits
        .deduct(tenant, 5, "upscale", "gen-3", Some("d3"))
        .await
        .unwrap();
    assert_eq!(later.balance_after, 0);

    let entries = all_entries(&credits, tenant).await;
    let amounts: Vec<i64> = entries.iter().rev().map(|e| e.amount).collect();
    assert_eq!(amounts, vec![10, -7, -2, 2, 2, -5]);
    assert_consistent(&entries, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_inputs_are_rejected_before_any_write() {
    let db = TestDb::create().await;
    let credits = credits(&db);
    let tenant = new_tenant();
    let long = "x".repeat(201);
    let max = "é".repeat(200); // 200 characters, 400 bytes: allowed

    assert!(is_invalid(
        &credits.grant(tenant, 0, "r", "", "i").await,
        "amount"
    ));
    assert!(is_invalid(
        &credits.grant(tenant, -5, "r", "", "i").await,
        "amount"
    ));
    assert!(is_invalid(
        &credits.grant(tenant, 1_000_000_000_001, "r", "", "i").await,
        "amount"
    ));
    assert!(is_invalid(
        &credits.deduct(tenant, 0, "r", "", None).await,
        "amount"
    ));
    assert!(is_invalid(
        &credits.refund(tenant, -1, "r", "", "i").await,
        "amount"
    ));
    assert!(is_invalid(
        &credits.grant(tenant, 1, "", "", "i").await,
        "reason"
    ));
    assert!(is_invalid(
        &credits.grant(tenant, 1, "   ", "", "i").await,
        "reason"
    ));
    assert!(is_invalid(
        &credits.grant(tenant, 1, &long, "", "i").await,
        "reason"
    ));
    assert!(is_invalid(
        &credits.grant(tenant, 1, "r", &long, "i").await,
        "reference"
    ));
    assert!(is_invalid(
        &credits.grant(tenant, 1, "r", "", "").await,
        "idempotency_id"
    ));
    assert!(is_invalid(
        &credits.deduct(tenant, 1, "r", "", Some("")).await,
        "idempotency_id"
    ));
    assert!(is_invalid(
        &credits.deduct(tenant, 1, "r", "", Some(&long)).await,
        "idempotency_id"
    ));
    // Every bad field is reported at once.
    match credits.grant(tenant, 0, "", &long, "").await {
        Err(CreditError::Invalid(v)) => assert_eq!(v.iter().count(), 4),
        other => panic!("{other:?}"),
    }
    for limit in [0, -1, 101] {
        assert!(matches!(
            credits.ledger(tenant, limit, None).await,
            Err(CreditError::Invalid(_))
        ));
    }
    assert_eq!(credits.balance(tenant).await.unwrap(), 0);

    // The limits are inclusive, in characters.
    let entry = credits
        .grant(tenant, 1_000_000_000_000, &max, &max, &max)
        .await
        .unwrap();
    assert_eq!(entry.balance_after, 1_000_000_000_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_isolated() {
    let db = TestDb::create().await;
    let credits = credits(&db);
    let (a, b) = (new_tenant(), new_tenant());

    let a_grant = credits.grant(a, 30, "grant", "", "same-id").await.unwrap();
    // Idempotency ids are per tenant: B's "same-id" is a different entry.
    let b_grant = credits.grant(b, 5, "grant", "", "same-id").await.unwrap();
    assert_ne!(a_grant.id, b_grant.id);
    credits.deduct(a, 10, "use", "", None).await.unwrap();

    assert_eq!(credits.balance(a).await.unwrap(), 20);
    assert_eq!(credits.balance(b).await.unwrap(), 5);
    // B cannot spend A's credits.
    assert!(matches!(
        credits.deduct(b, 6, "use", "", None).await,
        Err(CreditError::InsufficientCredits {
            balance: 5,
            requested: 6
        })
    ));
    let b_entries = all_entries(&credits, b).await;
    assert_eq!(b_entries.len(), 1);
    assert!(b_entries.iter().all(|e| e.tenant_id == b));
    let a_entries = all_entries(&credits, a).await;
    assert_eq!(a_entries.len(), 2);
    assert!(a_entries.iter().all(|e| e.tenant_id == a));
    // A cursor from another tenant's ledger is rejected, not used.
    assert!(matches!(
        credits.ledger(b, 10, Some(a_grant.id)).await,
        Err(CreditError::Invalid(_))
    ));
    // A tenant without credits has a zero balance and an empty ledger.
    let c = new_tenant();
    assert_eq!(credits.balance(c).await.unwrap(), 0);
    assert!(credits.ledger(c, 10, None).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_is_append_only_but_goes_with_its_tenant() {
    let db = TestDb::create().await;
    let credits = credits(&db);
    let tenant = new_tenant();
    credits.grant(tenant, 3, "grant", "", "g").await.unwrap();
    credits.deduct(tenant, 1, "use", "", None).await.unwrap();

    let mut conn = AsyncPgConnection::establish(db.url()).await.unwrap();
    let update = diesel::sql_query("UPDATE credit_ledger SET amount = 1000")
        .execute(&mut conn)
        .await;
    assert!(
        update.unwrap_err().to_string().contains("append-only"),
        "UPDATE refused"
    );
    let delete = diesel::sql_query("DELETE FROM credit_ledger")
        .execute(&mut conn)
        .await;
    assert!(
        delete.unwrap_err().to_string().contains("append-only"),
        "DELETE refused"
    );
    assert_eq!(all_entries(&credits, tenant).await.len(), 2);

    // Deleting the tenant still cascades to its ledger and balance.
    let deleted = diesel::sql_query(format!("DELETE FROM tenants WHERE id = '{}'", tenant.0))
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    assert!(all_entries(&credits, tenant).await.is_empty());
    assert_eq!(credits.balance(tenant).await.unwrap(), 0);
}
