//! One transaction across stores: the stores take the caller's connection, so "deduct
//! credits + record what they paid for" commits together or not at all — the shape of the
//! generation proxy's "deduct + insert generation + outbox job".

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use devgate::{
    credits::store::{self as credit_store, Applied, NewEntry},
    db::StoreError,
    identity::TenantId,
    usage::store::{self as usage_store, MeteredRecord},
};
use diesel::result::Error as DieselError;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::harness::TestDb;

async fn connect(db: &TestDb) -> AsyncPgConnection {
    AsyncPgConnection::establish(db.url())
        .await
        .expect("connect to the test database")
}

fn entry<'a>(tenant: TenantId, amount: i64, idempotency_id: Option<&'a str>) -> NewEntry<'a> {
    NewEntry {
        tenant,
        amount,
        reason: "generation",
        reference: "gen-1",
        idempotency_id,
        created_by: "devgate",
    }
}

fn metered(tenant: TenantId, idempotency_id: &str) -> MeteredRecord<'_> {
    MeteredRecord {
        tenant,
        api_key_id: None,
        metric: "generations",
        quantity: 1,
        idempotency_id,
        time: Utc::now(),
        recorded_by: "service:test",
    }
}

/// What is committed, read on a fresh connection: balance, ledger length, metered total.
async fn committed(db: &TestDb, tenant: TenantId) -> (i64, usize, i64) {
    let mut conn = connect(db).await;
    let balance = credit_store::balance(&mut conn, tenant).await.unwrap();
    let ledger = credit_store::ledger(&mut conn, tenant, 100, None)
        .await
        .unwrap()
        .expect("no cursor, so a page");
    let now = Utc::now();
    let metered = usage_store::metered_totals(
        &mut conn,
        tenant,
        now - TimeDelta::hours(1),
        now + TimeDelta::hours(1),
    )
    .await
    .unwrap()
    .into_iter()
    .map(|(_, quantity)| quantity)
    .sum();
    (balance, ledger.len(), metered)
}

/// Grants `amount` on its own committed connection.
async fn grant(db: &TestDb, tenant: TenantId, amount: i64) {
    let mut conn = connect(db).await;
    let applied = credit_store::credit(&mut conn, &entry(tenant, amount, Some("grant")))
        .await
        .unwrap();
    assert!(matches!(applied, Applied::Inserted(_)), "{applied:?}");
}

/// A debit and a metered row in one transaction: rolled back, neither is stored (though
/// both were visible inside it); committed, both are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_span_stores_commit_and_rollback() {
    let db = TestDb::create().await;
    let tenant = TenantId(Uuid::new_v4());
    grant(&db, tenant, 100).await;
    let mut conn = connect(&db).await;

    let outcome = conn
        .transaction::<(), StoreError, _>(async move |c| {
            let applied = credit_store::debit(c, &entry(tenant, 30, Some("gen-1"))).await?;
            assert!(matches!(applied, Applied::Inserted(ref e) if e.balance_after == 70));
            assert!(usage_store::record_metered(c, &metered(tenant, "gen-1")).await?);
            // Inside the transaction both writes are there.
            assert_eq!(credit_store::balance(c, tenant).await?, 70);
            Err(DieselError::RollbackTransaction.into())
        })
        .await;
    assert!(matches!(
        outcome,
        Err(StoreError::Query(DieselError::RollbackTransaction))
    ));
    assert_eq!(
        committed(&db, tenant).await,
        (100, 1, 0),
        "rolled back: nothing of either store"
    );

    conn.transaction::<(), StoreError, _>(async move |c| {
        let applied = credit_store::debit(c, &entry(tenant, 30, Some("gen-1"))).await?;
        assert!(matches!(applied, Applied::Inserted(_)), "{applied:?}");
        assert!(usage_store::record_metered(c, &metered(tenant, "gen-1")).await?);
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(
        committed(&db, tenant).await,
        (70, 2, 1),
        "committed: both stores"
    );

    // A failure after both writes (here: the metered row's CHECK) rolls the debit back too.
    let failed = conn
        .transaction::<(), StoreError, _>(async move |c| {
            credit_store::debit(c, &entry(tenant, 10, Some("gen-2"))).await?;
            let mut bad = metered(tenant, "gen-2");
            bad.quantity = 0;
            usage_store::record_metered(c, &bad).await?;
            Ok(())
        })
        .await;
    assert!(matches!(failed, Err(StoreError::Query(_))), "{failed:?}");
    assert_eq!(
        committed(&db, tenant).await,
        (70, 2, 1),
        "a failed write undoes the debit"
    );
}

/// The credit store's own transaction is a savepoint inside the caller's: an insufficient
/// debit undoes only itself, and the caller's other writes still commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_refused_debit_rolls_back_only_its_savepoint() {
    let db = TestDb::create().await;
    let tenant = TenantId(Uuid::new_v4());
    grant(&db, tenant, 5).await;
    let mut conn = connect(&db).await;
    conn.transaction::<(), StoreError, _>(async move |c| {
        assert!(usage_store::record_metered(c, &metered(tenant, "m-1")).await?);
        let refused = credit_store::debit(c, &entry(tenant, 50, Some("gen-1"))).await?;
        assert!(
            matches!(refused, Applied::Insufficient { balance: 5 }),
            "{refused:?}"
        );
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(committed(&db, tenant).await, (5, 1, 1));
}

/// Two callers' transactions race the same idempotent debit: the second waits on the
/// first's balance lock, loses the idempotency id when it commits, rolls back its savepoint
/// (its balance change) and answers with the first's entry; its own other write commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_idempotent_debit_race_inside_callers_transactions() {
    let db = TestDb::create().await;
    let tenant = TenantId(Uuid::new_v4());
    grant(&db, tenant, 100).await;

    let (debited_tx, debited_rx) = oneshot::channel::<i64>();
    let (commit_tx, commit_rx) = oneshot::channel::<()>();
    let mut first = connect(&db).await;
    let first = tokio::spawn(async move {
        first
            .transaction::<i64, StoreError, _>(async move |c| {
                let Applied::Inserted(e) =
                    credit_store::debit(c, &entry(tenant, 30, Some("gen-1"))).await?
                else {
                    panic!("the first debit is inserted");
                };
                debited_tx.send(e.id).unwrap();
                // Hold the balance row's lock until the second caller waits on it.
                commit_rx.await.unwrap();
                Ok(e.id)
            })
            .await
            .unwrap()
    });
    let first_id = debited_rx.await.unwrap();

    let mut second = connect(&db).await;
    let second = tokio::spawn(async move {
        second
            .transaction::<Applied, StoreError, _>(async move |c| {
                assert!(usage_store::record_metered(c, &metered(tenant, "gen-1")).await?);
                credit_store::debit(c, &entry(tenant, 30, Some("gen-1"))).await
            })
            .await
            .unwrap()
    });
    // The second debit blocks on the first's row lock before the first commits.
    let mut probe = connect(&db).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while lock_waiters(&mut probe).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the second debit never waited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    commit_tx.send(()).unwrap();

    assert_eq!(first.await.unwrap(), first_id);
    match second.await.unwrap() {
        Applied::Existing(e) => assert_eq!(e.id, first_id),
        other => panic!("the second debit replays the first: {other:?}"),
    }
    assert_eq!(
        committed(&db, tenant).await,
        (70, 2, 1),
        "one debit; the loser's metered row commits"
    );
}

#[derive(diesel::QueryableByName)]
struct Waiters {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// Backends of this database waiting for a lock.
async fn lock_waiters(conn: &mut AsyncPgConnection) -> i64 {
    diesel::sql_query(
        "SELECT count(*) AS n FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .get_result::<Waiters>(conn)
    .await
    .unwrap()
    .n
}
